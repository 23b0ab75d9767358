"""`--layers` reads the same way in probe, analyze and realign."""
import pytest

from qrealign.cli._layers import parse_layers
from qrealign.errors import QrealignError


def test_indices_and_ranges():
    assert parse_layers(None) is None and parse_layers(" ") is None
    assert parse_layers("3,5,7") == [3, 5, 7]
    assert parse_layers("10-12, 20") == [10, 11, 12, 20]
    assert parse_layers("4,") == [4]


@pytest.mark.parametrize("bad", ["a", "3-", "5-2", "1-2-3", ",", " , "])
def test_bad_specs_raise(bad):
    with pytest.raises(QrealignError, match="--layers"):
        parse_layers(bad)


def test_an_empty_layer_list_is_an_error_not_a_crash():
    from qrealign.probes.capture import resolve_layers

    with pytest.raises(QrealignError, match="no layers"):
        resolve_layers([], 4)
    assert resolve_layers(None, 3) == [0, 1, 2]


def test_comma_lists_names_and_numbers():
    from qrealign.cli._lists import floats, one_per, split_list

    assert split_list(" W8A8, ,W4A8 ") == ["W8A8", "W4A8"] and split_list(None) == []
    assert split_list(",lora", keep_empty=True) == ["", "lora"]  # one entry per model, the first without
    assert one_per("a, b", [1, 2], "--names", []) == ["a", "b"]
    assert one_per(None, [1, 2], "--names", ["x", "y"]) == ["x", "y"]
    for bad, message in (("a", "1 names for 2"), ("a,a", "distinct"), ("a,", "non-empty")):
        with pytest.raises(QrealignError, match=message):
            one_per(bad, [1, 2], "--names", [])
    assert floats("0, 0.05,0.2", "--attack-sweep") == (0.0, 0.05, 0.2)
    with pytest.raises(QrealignError, match="--attack-sweep wants comma-separated numbers"):
        floats("0,x", "--attack-sweep")
