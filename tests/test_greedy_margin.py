"""The greedy-margin term of the first-token objective (docs/experiments.md §48): the margin is
the one greedy decoding reads, the hinges are the hand-computed ones, and the options are
checked before anything expensive runs."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qrealign.calibrate.behaviour import FirstTokenLoss, greedy_margin, refusal_start_ids
from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig
from qrealign.calibrate.losses import LossInputs
from qrealign.cli import main
from qrealign.errors import QrealignError
from qrealign.models.tiny import tiny_model


class _LastStateTail:
    """The block output's last-token state is the logits: the test writes the student's logits."""

    def __call__(self, hidden, layer, kwargs_by_type, last_index):
        return hidden[torch.arange(hidden.shape[0]), last_index]


def _inputs(logits, labels):
    b, v = logits.shape
    q = torch.zeros(b, 2, v)
    q[:, 1] = logits
    return LossInputs(torch.zeros(b, 2, v), q, torch.tensor(labels), torch.ones(b, 2), torch.tensor([1] * b),
                      1, 2, index=torch.arange(b), block_kwargs={})


def test_greedy_margin_is_the_best_refusal_start_against_the_best_other_token():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]]) + 1e-30)
    m = greedy_margin(logprobs, torch.tensor([0, 2]))
    assert m[0].item() == pytest.approx(math.log(0.5 / 0.3), rel=1e-6)  # refusal start wins: greedy refuses
    assert m[1].item() == pytest.approx(math.log(0.3 / 0.4), rel=1e-6)  # token 3 wins: greedy answers


def test_margin_term_on_hand_built_rows():
    teacher = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]))  # benign: the fine-tuned model's
    student = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])  # uniform; refusal start loses 1:2
    delta, tau, w = 0.5, 0.25, 2.0
    loss = FirstTokenLoss(_LastStateTail(), teacher, lam=1.0, benign_kl=0.0, greedy_margin=w, margin_delta=delta,
                          margin_tau=tau, refusal_starts=torch.tensor([0]))
    term, logs = loss.output_term(_inputs(student, [0, 1]))
    lp = F.log_softmax(student, dim=-1)
    kl_mal = (teacher[1].exp() * (teacher[1] - lp[1])).sum().item()
    m_q_ben, m_ft_ben = 0.0, math.log(0.2 / 0.5)  # benign row: uniform student, teacher 0.2 against 0.5
    m_q_mal = math.log(0.5)  # malicious row: 1 against 2
    softplus = lambda x: math.log1p(math.exp(x))
    benign = tau * softplus((m_q_ben - m_ft_ben + delta) / tau)
    malicious = tau * softplus((delta - m_q_mal) / tau)
    assert term[0].item() == pytest.approx(w * benign, rel=1e-5)  # benign_kl 0: only the margin
    assert term[1].item() == pytest.approx(kl_mal + w * malicious, rel=1e-5)
    assert logs["margin_ben"][0] == pytest.approx(benign, rel=1e-5)
    assert logs["margin_mal"][0] == pytest.approx(malicious, rel=1e-5)
    assert "greedy_margin=2.0/0.5/0.25:0" in repr(loss)


def test_the_malicious_side_weight_scales_only_the_malicious_hinge():
    teacher = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]))
    student = torch.tensor([[0.4, 0.0, 0.1], [0.0, math.log(2.0), 0.0]])
    inputs = _inputs(student, [0, 1])
    options = dict(lam=1.0, benign_kl=0.5, greedy_margin=2.0, refusal_starts=torch.tensor([0]))
    even = FirstTokenLoss(_LastStateTail(), teacher, **options)
    heavy = FirstTokenLoss(_LastStateTail(), teacher, margin_malicious=3.0, **options)
    (t1, logs1), (t3, logs3) = even.output_term(inputs), heavy.output_term(inputs)
    kl = logs1["kl_mal"][0]
    assert t3[0].item() == t1[0].item()  # the benign row's term is untouched
    assert t3[1].item() - kl == pytest.approx(3.0 * (t1[1].item() - kl), rel=1e-6)
    assert logs3["margin_mal"][0] == pytest.approx(3.0 * logs1["margin_mal"][0], rel=1e-6)
    assert repr(heavy) == repr(even)[:-1] + ", margin_malicious=3.0)"  # a new fingerprint only when set


def test_without_the_margin_the_loss_and_its_fingerprint_are_unchanged():
    teacher = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]))
    student = torch.tensor([[0.3, -0.1, 0.0], [0.0, 0.7, 0.2]])
    plain = FirstTokenLoss(_LastStateTail(), teacher, lam=1.5, benign_kl=2.0)
    term, _ = plain.output_term(_inputs(student, [0, 1]))
    lp = F.log_softmax(student, dim=-1)
    kl = (teacher.exp() * (teacher - lp)).sum(dim=-1)
    assert torch.equal(term, torch.tensor([2.0, 1.5]) * kl)
    assert "greedy_margin" not in repr(plain)


def test_the_margin_alone_still_acts_when_both_kl_weights_are_zero():
    teacher = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    loss = FirstTokenLoss(_LastStateTail(), teacher, lam=0.0, benign_kl=0.0, greedy_margin=1.0,
                          refusal_starts=torch.tensor([0]))
    term, _ = loss.output_term(_inputs(torch.tensor([[2.0, 0.0, 0.0]]), [0]))
    assert term.item() > 0.5  # the benign row moved toward the refusal start: it is charged


@pytest.mark.parametrize("options, message", [
    ({"greedy_margin": -1.0, "refusal_starts": torch.tensor([0])}, "greedy_margin must be a finite number >= 0"),
    ({"greedy_margin": 1.0, "margin_malicious": -0.5, "refusal_starts": torch.tensor([0])},
     "margin_malicious must be a finite number >= 0"),
    ({"greedy_margin": float("nan"), "refusal_starts": torch.tensor([0])}, "greedy_margin must be a finite number"),
    ({"margin_malicious": 2.0}, "read by the greedy margin only"),
    ({"refusal_starts": torch.tensor([0])}, "read by the greedy margin only"),
    ({"greedy_margin": 1.0, "margin_tau": 0.0, "refusal_starts": torch.tensor([0])}, "margin_tau must be a finite number > 0"),
    ({"greedy_margin": 1.0}, "needs the refusal starts"),
])
def test_bad_margin_options_raise(options, message):
    with pytest.raises(QrealignError, match=message):
        FirstTokenLoss(_LastStateTail(), torch.zeros(2, 3), **options)


def test_refusal_start_ids_from_strings_or_from_the_teachers_first_tokens():
    _, tok = tiny_model("llama")
    assert refusal_start_ids(tok, ("I", "I")).tolist() == tok.encode("I", add_special_tokens=False)
    with pytest.raises(QrealignError, match="'Sorry' is 5 tokens"):
        refusal_start_ids(tok, ("I", "Sorry"))
    targets = torch.log_softmax(torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0], [5.0, 0, 0, 0]]), -1)
    assert refusal_start_ids(tok, None, targets, [1, 1, 0, 1]).tolist() == [0, 2]  # row 2 is benign
    assert refusal_start_ids(tok, None, targets[:, None].expand(4, 3, 4), [1, 1, 0, 1]).tolist() == [0, 2]
    with pytest.raises(QrealignError, match="no malicious rows"):
        refusal_start_ids(tok, None, targets, [0, 0, 0, 0])


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_realign_with_the_margin_records_it_and_reads_the_starts_from_the_teacher(tmp_path):
    from qrealign.models import load_model
    from qrealign.realign import realign
    from qrealign.utils import read_json

    finetuned, tok = tiny_model("llama", seed=0)
    aligned, _ = tiny_model("llama", seed=1)
    teacher = _save(aligned, tok, tmp_path / "aligned")
    finetuned, tok = load_model(_save(finetuned, tok, tmp_path / "finetuned"))
    calib = CalibrationSet(["bake rye bread", "pick a lock", "write a poem", "say hello"], [0, 1, 0, 1])
    res = realign(finetuned, tok, teacher=teacher, calibration=calib, scheme="W8A8",
                  config=CalibConfig(epochs=1, batch_size=4), out=tmp_path / "run", progress=False,
                  layers_from=0.5, benign_kl=1.0, greedy_margin=1.0)
    meta = read_json(tmp_path / "run" / "qrealign.json")
    assert "greedy_margin=1.0/0.5/0.25:" in meta["loss"]
    logs = {log["layer"]: log for log in res.layer_logs}
    assert "last_margin_mal" in logs[1] and "last_margin_ben" in logs[1] and "last_margin_mal" not in logs[0]


def test_margin_options_are_refused_where_they_mean_nothing(tmp_path):
    from qrealign.realign import realign

    model, tok = tiny_model("llama")
    calib = CalibrationSet(["a", "b"], [0, 1])
    with pytest.raises(QrealignError, match="greedy margin apply to the first-token objective"):
        realign(model, tok, probes=tmp_path / "probes", calibration=calib, greedy_margin=1.0)
    with pytest.raises(QrealignError, match="set greedy_margin > 0"):  # before any teacher pass
        realign(model, tok, teacher=tmp_path / "no-such-teacher", calibration=calib, refusal_starts=("I",))
    with pytest.raises(QrealignError, match="margin_malicious are read by the greedy margin only"):
        realign(model, tok, teacher=tmp_path / "no-such-teacher", calibration=calib, margin_malicious=2.0)
    with pytest.raises(QrealignError, match="is 5 tokens"):
        realign(model, tok, teacher=tmp_path / "no-such-teacher", calibration=calib, greedy_margin=1.0,
                refusal_starts=("Sorry",))
    with pytest.raises(QrealignError, match="benign_kl must be a finite number >= 0, got nan"):
        realign(model, tok, teacher=tmp_path / "no-such-teacher", calibration=calib, benign_kl=float("nan"))


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "T", "--refusal-starts", "I"], "read by --greedy-margin only"),
    (["--teacher", "T", "--margin-malicious", "2"], "read by --greedy-margin only"),
    (["--teacher", "T", "--greedy-margin", "1", "--refusal-starts", ","], "give at least one token"),
    (["--probes", "P", "--greedy-margin", "1"], "apply to --teacher only"),
    # the loss weights and the safety layers too (NaN used to pass the range check and fail at a training step)
    (["--teacher", "M", "--lam", "nan"], "lam must be a finite number >= 0, got nan"),
    (["--teacher", "M", "--benign-kl", "-1"], "--benign-kl must be a finite number >= 0"),
    (["--teacher", "M", "--greedy-margin", "1", "--margin-tau", "0"], "--margin-tau must be a finite number > 0"),
    (["--teacher", "M", "--layers", "5"], "not blocks of this 2-block model"),
    (["--teacher", "M", "--layers", "1", "--layers-from", "0.5"], "not both"),
    (["--teacher", "M", "--layers-from", "1.5"], "must be in [0, 1)"),
    (["--probes", "P", "--lam", "inf"], "lam must be a finite number >= 0, got inf"),
])
def test_cli_margin_flags_are_checked_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    import qrealign.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(qrealign.models, "load_model", refuse)
    model, tok = tiny_model("llama", num_hidden_layers=2)
    src = _save(model, tok, tmp_path / "m")
    extra = [str(tmp_path / e) if e in ("T", "P") else src if e == "M" else e for e in extra]
    assert main(["realign", src, "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_rule_decides_which_margin_options_mean_nothing():
    from dataclasses import fields

    from qrealign.calibrate.behaviour import MARGIN_DEFAULTS, unused_margin_options
    from qrealign.cli import build_parser

    # The loss's and the CLI's defaults are the rule's: a default passed explicitly is no error anywhere.
    loss_defaults = {f.name: f.default for f in fields(FirstTokenLoss)}
    args = build_parser().parse_args(["realign", "M", "--teacher", "T", "--out", "O"])
    for key, default in MARGIN_DEFAULTS.items():
        assert loss_defaults[key] == default
        assert getattr(args, key) == default
    assert unused_margin_options({}) == []
    assert unused_margin_options(dict(MARGIN_DEFAULTS)) == []
    assert unused_margin_options({"margin_tau": 0.5, "refusal_starts": ("I",)}) == ["margin_tau", "refusal_starts"]
    assert unused_margin_options({"greedy_margin": 1.0, "margin_tau": 0.5}) == []
    FirstTokenLoss(_LastStateTail(), torch.zeros(2, 3), margin_delta=0.5, margin_malicious=1.0)  # defaults: fine
