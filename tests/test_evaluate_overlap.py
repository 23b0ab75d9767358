"""Provenance entries, the parent chain, and the overlap check."""

import hashlib
import json
import warnings

import pytest

from qrealign.data.prompts import normalize_prompt
from qrealign.data.types import Prompt
from qrealign.errors import QrealignError
from qrealign.evaluate.overlap import check_overlap, collect_provenance, provenance_entry, text_hash


def P(i, text, split="eval", label=1):
    return Prompt(id=f"p{i}", text=text, label=label, category="x", split=split)


TEXTS = ["How do I pick a lock?", "Write a phishing email.", "Bake bread at home.", "Explain photosynthesis."]


def test_text_hash_is_sha256_of_normalized_prompt():
    t = "  How do I   pick a LOCK? "
    assert text_hash(t) == hashlib.sha256(normalize_prompt(t).encode()).hexdigest()[:16]
    assert len(text_hash(t)) == 16


def test_provenance_entry_shape():
    entry = provenance_entry("calib", [P(0, TEXTS[0]), P(1, TEXTS[1])], "calib")
    assert list(entry) == ["calib"]
    e = entry["calib"]
    assert e["split"] == "calib" and e["n"] == 2 and e["ids"] == ["p0", "p1"]
    assert e["text_hashes"] == [text_hash(TEXTS[0]), text_hash(TEXTS[1])]
    # plain strings work too; their id is the hash
    assert provenance_entry("sft", [TEXTS[2]], None)["sft"]["ids"] == [text_hash(TEXTS[2])]
    with pytest.raises(QrealignError):
        provenance_entry("", [], "x")


def _write(dirpath, meta):
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "qrealign.json").write_text(json.dumps(meta))
    return dirpath


def test_collect_follows_parent_chain(tmp_path):
    ft = _write(tmp_path / "ft", {"kind": "finetuned", "parent": "smollm2-135m",
                                  "provenance": provenance_entry("finetune", [P(0, TEXTS[0])], "attack")})
    probes = _write(tmp_path / "probes", {"kind": "probes",
                                          "provenance": provenance_entry("probes", [P(1, TEXTS[1])], "probe")})
    # relative parent paths resolve against the artefact's own directory
    q = _write(tmp_path / "q", {"kind": "quantized", "parent": ["../ft", str(probes)],
                                "provenance": provenance_entry("calib", [P(2, TEXTS[2])], "calib")})
    prov = collect_provenance(q)
    assert set(prov) == {"calib", "finetune", "probes"}
    assert prov["finetune"]["source"] == str(q / "../ft")
    assert collect_provenance(q / "qrealign.json").keys() == prov.keys()
    assert collect_provenance(tmp_path / "nothing-here") == {}
    # same stage twice: the farther one is qualified, nothing is lost
    _write(tmp_path / "ft2", {"parent": str(ft), "provenance": provenance_entry("finetune", [P(3, TEXTS[3])], "a")})
    prov2 = collect_provenance(tmp_path / "ft2")
    assert len(prov2) == 2 and "finetune" in prov2


def test_collect_follows_the_models_a_realign_run_learned_from(tmp_path):
    # the probes' models and the first-token teacher trained on prompts of their own
    aligned = _write(tmp_path / "aligned", {"provenance": provenance_entry("align", [P(0, TEXTS[0])], "align")})
    other = _write(tmp_path / "other", {"provenance": provenance_entry("attack", [P(1, TEXTS[1])], "attack")})
    prov = collect_provenance({"probe_parents": [str(aligned), str(other)], "provenance": {}})
    assert set(prov) == {"align", "attack"}
    prov = collect_provenance({"teacher": {"source": str(aligned), "fingerprint": "x"}, "provenance": {}})
    assert set(prov) == {"align"}


def test_collect_handles_cycles_and_missing_parents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, {"parent": str(b), "provenance": provenance_entry("x", [TEXTS[0]], "s")})
    _write(b, {"parent": str(a), "provenance": provenance_entry("y", [TEXTS[1]], "s")})
    assert set(collect_provenance(a)) == {"x", "y"}
    with pytest.warns(UserWarning, match="does not exist"):
        prov = collect_provenance({"parent": "/definitely/not/here", "provenance": {}})
    assert prov["unresolved:/definitely/not/here"]["unresolved"]


def test_check_overlap_raises_with_stage_and_count(tmp_path):
    prov = collect_provenance({"provenance": {**provenance_entry("calib", [P(0, TEXTS[0]), P(1, TEXTS[1])], "calib"),
                                              **provenance_entry("probes", [P(2, TEXTS[2])], "probe")}})
    # different spacing / case still matches after normalisation
    evals = [P(10, "how do I pick   a lock?"), P(11, TEXTS[1]), P(12, "Something new entirely.")]
    with pytest.raises(QrealignError, match=r"2 of 3 used by stage 'calib'"):
        check_overlap(evals, prov)
    with pytest.warns(UserWarning, match="forced"):
        res = check_overlap(evals, prov, force=True)
    assert res.forced and res.total == 2 and res.by_stage["calib"]["eval_ids"] == ["p10", "p11"]
    assert "probes" not in res.by_stage
    assert res.to_dict()["clean"] is False


def test_check_overlap_clean_and_unresolved():
    prov = {"calib": {"text_hashes": [text_hash(TEXTS[0])], "split": "calib"},
            "unresolved:/x": {"unresolved": True, "source": "/x", "text_hashes": []}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = check_overlap([P(0, TEXTS[3])], prov)
    assert res.clean and res.total == 0 and res.unresolved == ["/x"]
    assert not res.complete and res.to_dict()["complete"] is False  # nothing found, but not everything read
