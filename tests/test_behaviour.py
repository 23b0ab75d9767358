"""The first-token (behavioural) safety term: the tail is exact, the KL is the hand-computed one,
and the engine hands the loss what it needs."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.behaviour import FirstTokenLoss, ModelTail, first_token_targets, next_token_logprobs
from qrealign.calibrate.capture import block_output, capture_block_inputs
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.calibrate.engine import CalibConfig
from qrealign.calibrate.losses import LossInputs
from qrealign.errors import QrealignError
from qrealign.models.registry import block_types, get_blocks
from qrealign.models.tiny import tiny_model

PROMPTS = ["bake a loaf of rye bread", "describe how to pick a lock", "write a poem about rain", "say hello"]


def _calib():
    return CalibrationSet(PROMPTS, [0, 1, 0, 1])


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_tail_reproduces_the_models_next_token_logits(model_type):
    model, tok = tiny_model(model_type)
    cfg = CalibConfig(batch_size=4)
    batch = make_batches(tok, _calib(), 4, cfg.max_length, cfg.padding_side)[0]
    inputs = capture_block_inputs(model, batch, torch.device("cpu"))
    h = inputs.hidden
    blocks = get_blocks(model)
    with torch.no_grad():
        for block, kind in zip(blocks[:2], block_types(model)):
            h = block_output(block(h, **inputs.kwargs_by_type[kind]))
        via_tail = ModelTail(model)(h, 1, inputs.kwargs_by_type, batch.enc.last_index)
    reference = next_token_logprobs(model, tok, _calib(), cfg)
    assert torch.allclose(torch.log_softmax(via_tail, -1), reference[batch.index], atol=1e-5)


def test_tail_copies_and_blockwise_targets_match_the_models_own_forward():
    """The paths a model in CPU memory takes when calibrated on a GPU (tail copies on the compute
    device, teacher targets block by block), forced here on one device: same numbers."""
    from qrealign.calibrate import behaviour

    model, tok = tiny_model("llama")
    cfg = CalibConfig(batch_size=4)
    batches = make_batches(tok, _calib(), 4, cfg.max_length, cfg.padding_side)
    cpu = torch.device("cpu")
    with torch.no_grad():
        blockwise = behaviour._blockwise_last_logits(model, batches, cpu, cpu)
        direct = [behaviour._last_logits(model, b, cpu) for b in batches]
    for a, b in zip(blockwise, direct):
        assert torch.allclose(a, b, atol=1e-6)

    batch = batches[0]
    inputs = capture_block_inputs(model, batch, cpu)
    h = inputs.hidden
    with torch.no_grad():
        h = block_output(get_blocks(model)[0](h, **inputs.kwargs_by_type[block_types(model)[0]]))
        tail = ModelTail(model)
        own = tail(h, 0, inputs.kwargs_by_type, batch.enc.last_index)
        tail._blocks_for = lambda layer, device: (tail._hold_after(layer, device), tail.copies)[1]
        via_copies = tail(h, 0, inputs.kwargs_by_type, batch.enc.last_index)
    assert torch.equal(own, via_copies)
    assert tail.copies[0] is None and all(c is not None for c in tail.copies[1:])
    assert not any(c is m for c, m in zip(tail.copies[1:], get_blocks(model)[1:]))
    assert not any(p.requires_grad for c in tail.copies[1:] for p in c.parameters())
    # the head: the model's own on its device, one kept copy on another (meta stands in for a GPU)
    assert tail.head_for(cpu) is tail.head and tail.head_copy is None
    meta = tail.head_for(torch.device("meta"))
    assert meta.device.type == "meta" and tail.head_for(torch.device("meta")) is meta
    assert tail.head.device == cpu and not any(p.requires_grad for p in meta.head.parameters())
    copy_on_cpu = tail.head.copy_to(cpu)
    assert copy_on_cpu.head.weight is not tail.head.head.weight
    with torch.no_grad():
        tail.head_for = lambda device: copy_on_cpu
        via_head_copy = tail(h, 0, inputs.kwargs_by_type, batch.enc.last_index)
    assert torch.equal(own, via_head_copy)


def test_targets_take_the_aligned_teacher_on_malicious_rows_only():
    finetuned, tok = tiny_model("llama", seed=0)
    aligned, _ = tiny_model("llama", seed=1)
    cfg = CalibConfig(batch_size=3)
    t = first_token_targets(aligned, finetuned, tok, _calib(), cfg)
    a = next_token_logprobs(aligned, tok, _calib(), cfg)
    f = next_token_logprobs(finetuned, tok, _calib(), cfg)
    # each model runs over its own rows only (other batches, so equal up to float rounding)
    assert torch.allclose(t[[1, 3]], a[[1, 3]], atol=1e-5) and torch.allclose(t[[0, 2]], f[[0, 2]], atol=1e-5)
    assert not torch.allclose(a, f)
    assert torch.allclose(t.exp().sum(-1), torch.ones(4), atol=1e-5)


class _FixedTail:
    """A stand-in tail: the 'logits' are the block output's last-token state itself."""

    def __call__(self, hidden, layer, kwargs_by_type, last_index):
        return hidden[torch.arange(hidden.shape[0]), last_index]


def _inputs(q_last, labels, layer=1):
    b = len(labels)
    q = torch.zeros(b, 2, 2)
    q[:, 1] = q_last
    return LossInputs(torch.zeros(b, 2, 2), q, torch.tensor(labels), torch.ones(b, 2), torch.tensor([1] * b),
                      layer, 2, index=torch.arange(b), block_kwargs={})


def test_kl_on_hand_built_distributions():
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q_last = torch.tensor([[0.0, 0.0], [0.0, math.log(9.0)]])  # student: [0.5, 0.5] and [0.1, 0.9]
    kl_mal = 0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9)
    # recon off on malicious rows so the MSE of the (non-zero) last token does not enter row 1
    loss = FirstTokenLoss(_FixedTail(), teacher, lam=2.0, benign_kl=3.0, recon_on_malicious=False, normalize=False,
                          sink_weight=1.0)
    value, logs = loss(_inputs(q_last, [0, 1]))
    mse_benign = 0.0  # row 0's last token is [0, 0], like its target
    assert logs["kl_mal"][0] == pytest.approx(kl_mal, rel=1e-5)
    assert logs["kl_ben"][0] == pytest.approx(0.0, abs=1e-6)
    assert value.item() == pytest.approx((mse_benign + 3.0 * 0.0 + 2.0 * kl_mal) / 2, rel=1e-5)


def test_inactive_layer_is_plain_reconstruction_and_bad_options_raise():
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    loss = FirstTokenLoss(_FixedTail(), teacher, layers=(0,), normalize=False, sink_weight=1.0)
    value, logs = loss(_inputs(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), [0, 1], layer=1))
    assert "kl_mal" not in logs
    assert value.item() == pytest.approx((1.0 / 2 + 0.0) / 2)  # row 0: error 1 on one of two tokens
    assert loss.needs_fp(torch.tensor([0, 1]), 1).all()
    with pytest.raises(QrealignError):
        FirstTokenLoss(_FixedTail(), teacher, lam=-1.0)
    with pytest.raises(QrealignError, match="index"):
        loss2 = FirstTokenLoss(_FixedTail(), teacher)
        inp = _inputs(torch.zeros(2, 2), [0, 1])
        inp.index = None
        loss2(inp)


def test_calibration_with_the_first_token_term_moves_malicious_rows_towards_the_teacher():
    """Against a control without the safety term (lam 0), same everything else: only the term
    moves the malicious rows' first-token distribution towards the aligned teacher, and the
    benign rows (whose target is the fine-tuned model itself) stay put."""
    finetuned, tok = tiny_model("llama", seed=0)
    aligned = copy.deepcopy(finetuned)
    with torch.no_grad():
        aligned.lm_head.weight.add_(0.5 * torch.randn_like(aligned.lm_head.weight))
    # W4A8 with learned rounding: enough freedom for the term to act on a 2-block toy model
    cfg = CalibConfig(batch_size=2, epochs=6, lr_let=5e-2, lr_lwc=5e-2, learn_rounding=True, lr_round=1e-1)
    targets = first_token_targets(aligned, finetuned, tok, _calib(), cfg)

    def kl_after(lam):
        model = copy.deepcopy(finetuned)
        loss = FirstTokenLoss(ModelTail(model), targets, lam=lam, benign_kl=1.0)
        assert "FirstTokenLoss(targets=" in repr(loss)
        res = quantize(model, tok, _calib(), "W4A8", cfg, loss=loss, progress=False)
        assert lam == 0 or ("last_kl_mal" in res.layer_logs[0] and "last_kl_ben" in res.layer_logs[0])
        after = next_token_logprobs(model, tok, _calib(), cfg)
        return (targets.exp() * (targets - after)).sum(-1)

    before = (targets.exp() * (targets - next_token_logprobs(finetuned, tok, _calib(), cfg))).sum(-1)
    malicious, benign = [1, 3], [0, 2]
    assert before[benign].abs().max() < 1e-5  # benign targets are the fine-tuned model's own
    control, term = kl_after(0.0), kl_after(10.0)
    # measured: before 4.10 / 3.78, control 4.09 / 3.78, with the term 3.51 / 3.23
    assert (control[malicious] > 0.97 * before[malicious]).all()
    assert (term[malicious] < 0.92 * before[malicious]).all()
    assert (term[malicious] < control[malicious] - 0.2).all()
    assert term[benign].max() < 0.1


def test_a_malicious_batch_no_term_reaches_trains_nothing_instead_of_crashing():
    """lam 0 without reconstruction on malicious rows (a benign-only ablation): each all-malicious
    batch's loss has no gradient; the run skips it and still trains on the benign batches."""
    finetuned, tok = tiny_model("llama", seed=0)
    cfg = CalibConfig(batch_size=2, epochs=1)
    targets = first_token_targets(copy.deepcopy(finetuned), finetuned, tok, _calib(), cfg)
    model = copy.deepcopy(finetuned)
    loss = FirstTokenLoss(ModelTail(model), targets, lam=0.0, recon_on_malicious=False, benign_kl=1.0)
    res = quantize(model, tok, _calib(), "W8A8", cfg, loss=loss, progress=False)
    assert len(res.layer_logs) == finetuned.config.num_hidden_layers
    for log in res.layer_logs:  # the benign batches trained; the malicious ones carried no term
        assert log["last_mse"] > 0 and "last_kl_ben" in log and "last_kl_mal" not in log


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_realign_with_a_teacher_writes_a_first_token_run(tmp_path, monkeypatch):
    from qrealign.calibrate.artifact import load_quantized
    from qrealign.realign import realign
    from qrealign.utils import read_json

    from qrealign.models import load_model

    finetuned, tok = tiny_model("llama", seed=0)
    aligned, _ = tiny_model("llama", seed=1)
    teacher_dir = _save(aligned, tok, tmp_path / "aligned")
    finetuned, tok = load_model(_save(finetuned, tok, tmp_path / "finetuned"))  # a source the run can name
    calib = build_calibration_with_task()
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the teacher named by a relative path is recorded absolute (overlap check)
    res = realign(finetuned, tok, teacher="aligned", calibration=calib, scheme="W8A8",
                  config=CalibConfig(epochs=1, batch_size=4), out=out, progress=False, layers_from=0.5, benign_kl=1.0)
    meta = read_json(out / "qrealign.json")
    assert meta["objective"] == "first-token" and meta["safety_layers"] == [1]
    assert meta["teacher"]["source"] == str(Path(teacher_dir).resolve()) and meta["teacher"]["fingerprint"]
    assert "topic-codes:train[:3]" in meta["calibration"]["split"]
    logs = {log["layer"]: log for log in res.layer_logs}
    assert "last_kl_mal" not in logs[0] and "last_kl_mal" in logs[1] and "last_kl_ben" in logs[1]
    assert "FirstTokenLoss(" in meta["loss"]
    reloaded, _, _ = load_quantized(out)
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(reloaded(input_ids=x).logits, finetuned(input_ids=x).logits, atol=1e-5)


def build_calibration_with_task():
    from qrealign.calibrate.data import with_task_prompts

    return with_task_prompts(_calib(), "topic-codes", 3)


def test_realign_teacher_and_probe_arguments_are_checked(tmp_path):
    from qrealign.errors import NoSafetyLayers
    from qrealign.realign import realign

    model, tok = tiny_model("llama", seed=0)
    other, _ = tiny_model("qwen2", seed=0)
    with pytest.raises(QrealignError, match="exactly one"):
        realign(model, tok, calibration=_calib(), progress=False)
    with pytest.raises(QrealignError, match="exactly one"):
        realign(model, tok, probes="x", teacher=model, calibration=_calib(), progress=False)
    with pytest.raises(QrealignError, match="same architecture"):
        realign(model, tok, teacher=other, calibration=_calib(), progress=False)
    narrow, _ = tiny_model("llama", seed=0, hidden_size=32, head_dim=8)  # same type and depth, other width
    with pytest.raises(QrealignError, match="hidden_size 32 vs 64"):
        realign(model, tok, teacher=narrow, calibration=_calib(), progress=False)
    with pytest.raises(NoSafetyLayers):
        realign(model, tok, teacher=model, calibration=_calib(), progress=False, layers=(5,))
    with pytest.raises(QrealignError, match="either"):
        realign(model, tok, teacher=model, calibration=_calib(), progress=False, layers=(1,), layers_from=0.5)


def test_realign_checks_out_before_the_teacher_pass(tmp_path, monkeypatch):
    """A bad `out` (here a model folder) must fail before the teacher pass is spent and before
    `save_targets` is written (the API used to find out only inside quantize, afterwards)."""
    import sys

    from qrealign.realign import realign

    realign_module = sys.modules["qrealign.realign"]  # the package's `realign` attribute is the function

    model, tok = tiny_model("llama", seed=0)
    model_dir = _save(model, tok, tmp_path / "a model")
    ran = []
    monkeypatch.setattr(realign_module, "compute_teacher_targets", lambda *a, **k: ran.append(1))
    with pytest.raises(QrealignError, match="not an earlier output"):
        realign(model, tok, teacher=model, calibration=_calib(), out=model_dir, save_targets=tmp_path / "tgt",
                progress=False)
    assert not ran and not (tmp_path / "tgt").exists()


def test_calibration_task_prompts_are_appended_as_benign():
    from qrealign.calibrate.data import build_calibration

    base = build_calibration(n=20)
    calib = build_calibration(n=20, task="topic-codes", task_n=6)
    assert calib.prompts[:20] == base.prompts and calib.labels[20:] == [0] * 6
    assert calib.ids[20:] == [f"topic-train-{i:05d}" for i in range(6)]
    with pytest.raises(QrealignError, match="unknown task"):
        build_calibration(n=20, task="no-such-task", task_n=2)
    with pytest.raises(QrealignError, match="only"):
        build_calibration(n=20, task="topic-codes", task_n=10**6)


def test_extra_benign_prompts_come_last_and_never_from_the_eval_split(tmp_path):
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import load_prompts

    with_task = build_calibration(n=20, task="topic-codes", task_n=6)
    calib = build_calibration(n=20, task="topic-codes", task_n=6, extra_benign="qrealign:align")
    align_benign = load_prompts("align", label=0)
    assert calib.prompts[:26] == with_task.prompts
    assert calib.ids[26:] == [p.id for p in align_benign] and set(calib.labels[26:]) == {0}
    assert calib.split.endswith("+align:benign")
    with pytest.raises(QrealignError, match="held out"):
        build_calibration(n=20, extra_benign="qrealign:eval")
    with pytest.raises(QrealignError, match="held out"):
        build_calibration("qrealign:eval", n=20)
    harmful_only = tmp_path / "harmful.jsonl"
    harmful_only.write_text('{"prompt": "a harmful request of mine", "label": 1}\n')
    with pytest.raises(QrealignError, match=r"has no benign \(label 0\) prompts"):
        build_calibration(n=20, extra_benign=str(harmful_only))


def test_extra_benign_sources_add_each_prompt_once_in_order():
    """Naming the calibration split itself adds the benign prompts its ratio left out (the twins
    of calibration prompts); a later source never repeats a prompt an earlier one added."""
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import load_prompts

    base = build_calibration(n=20)
    both = build_calibration(n=20, extra_benign=("qrealign:calib", "qrealign:align"))
    calib_benign = [p.id for p in load_prompts("calib", label=0)]
    left_out = [i for i in calib_benign if i not in base.ids]
    align_ids = [p.id for p in load_prompts("align", label=0)]
    assert both.ids == base.ids + left_out + align_ids
    assert len(set(both.ids)) == len(both.ids) and set(both.labels[len(base.ids):]) == {0}
    assert set(calib_benign) <= set(both.ids)
    assert both.ids == build_calibration(n=20, extra_benign=["qrealign:calib", "qrealign:align"]).ids
    with pytest.raises(QrealignError, match="adds no benign"):  # a repeated source adds nothing
        build_calibration(n=20, extra_benign=("qrealign:align", "qrealign:align"))


def test_extra_malicious_prompts_complete_the_twin_pairs_after_the_benign_ones(tmp_path):
    """`extra_malicious` appends a source's harmful prompts (label 1) after every benign addition,
    each once, never from the eval split; the demo's F10 set pairs every added twin with its
    harmful half."""
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import load_prompts

    benign_only = build_calibration(n=20, extra_benign="qrealign:align")
    calib = build_calibration(n=20, extra_benign="qrealign:align", extra_malicious=("qrealign:align", "qrealign:attack"))
    added = [p.id for p in load_prompts("align", label=1)] + [p.id for p in load_prompts("attack", label=1)]
    n = len(benign_only.ids)
    assert calib.ids[:n] == benign_only.ids and calib.ids[n:] == added
    assert set(calib.labels[n:]) == {1} and calib.split.endswith("+align:malicious+attack:malicious")
    twins = {p.twin for p in load_prompts("align", label=1) if p.twin}
    assert twins <= set(benign_only.ids)  # the benign halves were already there
    with pytest.raises(QrealignError, match="held out"):
        build_calibration(n=20, extra_malicious="qrealign:eval")
    with pytest.raises(QrealignError, match="adds no malicious"):  # the ratio already took every calib harmful prompt
        build_calibration(extra_malicious="qrealign:calib")
    benign_file = tmp_path / "benign.jsonl"
    benign_file.write_text('{"prompt": "a kind request of mine", "label": 0}\n')
    with pytest.raises(QrealignError, match=r"has no malicious \(label 1\) prompts"):
        build_calibration(n=20, extra_malicious=str(benign_file))


def test_realign_cli_teacher_run_and_argument_errors(tmp_path, capsys, monkeypatch):
    from qrealign.cli import main
    from qrealign.data.prompts import load_prompts

    finetuned, tok = tiny_model("llama", seed=0)
    aligned, _ = tiny_model("llama", seed=1)
    model_dir = _save(finetuned, tok, tmp_path / "finetuned")
    teacher_dir = _save(aligned, tok, tmp_path / "aligned")
    common = [model_dir, "--n", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    rc = main(["realign", *common, "--teacher", teacher_dir, "--layers-from", "0.5", "--benign-kl", "2",
               "--calib-task", "topic-codes", "--calib-task-n", "2", "--learn-rounding", "--lr-round", "0.05",
               "--calib-benign", "qrealign:align", "--calib-benign", "qrealign:calib",
               "--calib-malicious", "qrealign:attack", "--out", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "qrealign.json").is_file()
    from qrealign.utils import read_json

    meta = read_json(tmp_path / "run" / "qrealign.json")
    # 8 sampled at the ratio (2 benign), 2 task prompts, every align benign prompt, then the
    # calib benign prompts the ratio left out, then the attack split's harmful prompts.
    n_extra = len(load_prompts("align", label=0)) + len(load_prompts("calib", label=0)) - 2
    n_mal = len(load_prompts("attack", label=1))
    assert meta["calibration"]["n"] == 10 + n_extra + n_mal and "benign_kl=2.0" in meta["loss"]
    assert meta["calibration"]["split"].endswith("+attack:malicious")
    assert meta["config"]["learn_rounding"] is True and meta["config"]["lr_round"] == 0.05
    for bad in (["--teacher", teacher_dir, "--hinge"], ["--teacher", teacher_dir, "--probes", "p"], [],
                ["--probes", str(tmp_path / "p"), "--benign-kl", "1"],
                ["--probes", str(tmp_path / "p"), "--refusal-targets"],
                ["--probes", str(tmp_path / "p"), "--joint-safety", "--joint-recon-weight", "4"]):
        out = tmp_path / "bad"
        assert main(["realign", *common, *bad, "--out", str(out)]) == 2
        assert not out.exists()
    # a typo in --teacher fails before the fine-tuned model is loaded
    import qrealign.models

    def no_load(*a, **k):
        raise AssertionError("the model loaded before --teacher was checked")

    monkeypatch.setattr(qrealign.models, "load_model", no_load)
    assert main(["realign", *common, "--teacher", str(tmp_path / "aligend"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_refusal_targets_replace_answered_malicious_rows_with_the_mean_refusal():
    from qrealign.calibrate.behaviour import refusal_targets

    probs = torch.tensor([[0.7, 0.2, 0.1],   # benign: untouched even though "answered"
                          [0.6, 0.3, 0.1],   # malicious, refused
                          [0.2, 0.2, 0.6],   # malicious, refused
                          [0.1, 0.1, 0.8],   # malicious, answered: gets the mean of rows 1 and 2
                          [0.3, 0.4, 0.3]])  # benign
    malicious = torch.tensor([False, True, True, True, False])
    refused = torch.tensor([False, True, True, False, True])
    out = refusal_targets(probs.log(), malicious, refused).exp()
    torch.testing.assert_close(out[3], torch.tensor([0.4, 0.25, 0.35]))
    torch.testing.assert_close(out[[0, 1, 2, 4]], probs[[0, 1, 2, 4]])
    with pytest.raises(QrealignError, match="refuses none"):
        refusal_targets(probs.log(), malicious, torch.zeros(5, dtype=torch.bool))


def test_realign_with_refusal_targets_records_what_it_replaced(tmp_path, monkeypatch):
    """A tiny random teacher never refuses, so the judge's verdicts are stubbed: the run must
    ask the teacher about the malicious prompts only, replace the answered rows, and key on it."""
    import qrealign.calibrate.behaviour as behaviour
    from qrealign.models import load_model
    from qrealign.realign import realign
    from qrealign.utils import read_json

    finetuned, tok = tiny_model("llama", seed=0)
    teacher_dir = _save(tiny_model("llama", seed=1)[0], tok, tmp_path / "aligned")
    finetuned, tok = load_model(_save(finetuned, tok, tmp_path / "finetuned"))
    asked = []

    def stub(aligned, tokenizer, prompts, config, max_new_tokens=64, device=None, progress=False):
        asked.extend(prompts)
        return [i == 0 for i in range(len(prompts))]  # refuses the first malicious prompt only

    monkeypatch.setattr(behaviour, "teacher_refuses", stub)
    kw = dict(teacher=teacher_dir, calibration=_calib(), scheme="W8A8", config=CalibConfig(epochs=1, batch_size=4),
              progress=False, layers=(1,))
    realign(finetuned, tok, refusal_targets=True, out=tmp_path / "fixed", **kw)
    assert asked == [PROMPTS[1], PROMPTS[3]]
    meta = read_json(tmp_path / "fixed" / "qrealign.json")
    assert meta["teacher"]["refusal_targets"] == {"malicious": 2, "answered_replaced": 1}
    finetuned, tok = load_model(str(tmp_path / "finetuned"))
    realign(finetuned, tok, out=tmp_path / "plain", **kw)
    plain = read_json(tmp_path / "plain" / "qrealign.json")
    assert "refusal_targets" not in plain["teacher"] and plain["loss"] != meta["loss"]  # other targets, other run
    with pytest.raises(QrealignError, match="first-token"):
        realign(finetuned, tok, probes="x", refusal_targets=True, calibration=_calib(), progress=False)


def test_the_teacher_answers_where_it_is_when_the_device_has_no_room(monkeypatch):
    from qrealign.calibrate import behaviour

    aligned, tok = tiny_model("llama", seed=1)
    moves = []
    real_to = aligned.to

    def to(device, *a, **k):
        moves.append(str(device))
        if len(moves) == 1:
            raise torch.OutOfMemoryError("no room")  # the first move, to the compute device
        return real_to(device, *a, **k)

    monkeypatch.setattr(aligned, "to", to)
    monkeypatch.setattr("qrealign.evaluate.generate.generate",
                        lambda model, tok, prompts, gen, progress, desc="": ["ok"] * len(prompts))
    with pytest.warns(UserWarning, match="does not fit"):
        refused = behaviour.teacher_refuses(aligned, tok, PROMPTS[:2], CalibConfig(), device="cpu")
    assert refused == [False, False] and moves == ["cpu", "cpu", "cpu"]  # tried, fell back, went home


def test_resolve_device_rejects_unknown_and_absent_devices(monkeypatch):
    from qrealign.utils import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(QrealignError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QrealignError, match="no usable CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(QrealignError, match="only 1 CUDA device"):
        resolve_device("cuda:3")


def test_the_cli_rejects_a_bad_device_before_loading_anything(tmp_path, capsys):
    from qrealign.cli import main

    missing = tmp_path / "no-such-model"  # a model load would fail differently: the device is checked first
    assert main(["eval", str(missing), "--device", "gpu", "--out", str(tmp_path / "ev")]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_same_device_treats_an_open_index_as_a_match():
    from qrealign.utils import same_device

    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda"), torch.device("cpu"))


def test_teacher_targets_computed_once_give_the_same_run_as_computing_them_in_place(tmp_path, monkeypatch):
    """The teacher pass does not depend on the scheme: targets saved once and reused must give the
    run that `realign(teacher=DIR)` gives, to the bit and to the run fingerprint."""
    import qrealign.calibrate.behaviour as behaviour
    from safetensors.torch import load_file

    from qrealign.calibrate.targets import TeacherTargets, compute_teacher_targets
    from qrealign.models import load_model
    from qrealign.realign import realign
    from qrealign.utils import read_json

    monkeypatch.setattr(behaviour, "teacher_refuses",  # a random tiny teacher refuses nothing
                        lambda aligned, tok, prompts, config, max_new_tokens=64, device=None, progress=False: [True] + [False] * (len(prompts) - 1))
    finetuned, tok = tiny_model("llama", seed=0)
    teacher_dir = _save(tiny_model("llama", seed=1)[0], tok, tmp_path / "aligned")
    finetuned_dir = _save(finetuned, tok, tmp_path / "finetuned")
    cfg = CalibConfig(epochs=1, batch_size=4)
    kw = dict(calibration=_calib(), scheme="W8A8", config=cfg, progress=False, layers=(1,), refusal_targets=True)

    model, tok = load_model(finetuned_dir)
    realign(model, tok, teacher=teacher_dir, out=tmp_path / "in-place", **kw)
    model, tok = load_model(finetuned_dir)
    targets = compute_teacher_targets(model, tok, teacher_dir, _calib(), cfg, refusals=True)
    targets.save(tmp_path / "targets")
    reloaded = TeacherTargets.load(tmp_path / "targets")
    assert torch.equal(reloaded.logprobs, targets.logprobs) and reloaded.teacher_meta == targets.teacher_meta
    import qrealign.utils as utils

    hashed = []
    state_fingerprint = utils._state_fingerprint
    monkeypatch.setattr(utils, "_state_fingerprint", lambda *a: hashed.append(1) or state_fingerprint(*a))
    realign(model, tok, teacher=reloaded, out=tmp_path / "reused", **kw)
    assert len(hashed) == 1  # the targets' check hashes the weights; quantize and the engine reuse it

    a, b = read_json(tmp_path / "in-place" / "qrealign.json"), read_json(tmp_path / "reused" / "qrealign.json")
    assert a["run_fingerprint"] == b["run_fingerprint"] and a["teacher"] == b["teacher"]
    assert a["teacher"]["refusal_targets"] == {"malicious": 2, "answered_replaced": 1}
    pa, pb = (load_file(str(tmp_path / d / "quant_params.safetensors")) for d in ("in-place", "reused"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_teacher_targets_refuse_another_model_calibration_or_rendering(tmp_path):
    from qrealign.calibrate.targets import TeacherTargets, compute_teacher_targets
    from qrealign.errors import IncompatibleArtifact
    from qrealign.realign import realign
    from qrealign.utils import model_fingerprint, read_json, write_json

    finetuned, tok = tiny_model("llama", seed=0)
    teacher, _ = tiny_model("llama", seed=1)
    cfg = CalibConfig(epochs=1, batch_size=4)
    targets = compute_teacher_targets(finetuned, tok, teacher, _calib(), cfg)
    assert targets.logprobs.shape == (4, finetuned.config.vocab_size) and not targets.refusals
    assert targets.computed_on == {"device": "cpu", "offloaded": False}
    fp = model_fingerprint(finetuned)
    targets.check(fp, _calib(), cfg)  # the setting they were computed in passes
    with pytest.raises(QrealignError, match="another fine-tuned model"):
        targets.check(model_fingerprint(teacher), _calib(), cfg)
    with pytest.raises(QrealignError, match="another calibration set"):
        targets.check(fp, CalibrationSet(PROMPTS, [1, 1, 0, 1]), cfg)
    with pytest.raises(QrealignError, match="batch_size"):
        targets.check(fp, _calib(), CalibConfig(epochs=1, batch_size=2))
    targets.check(fp, _calib(), cfg, tokenizer=tok)  # the same prompt tokens
    template = tok.chat_template
    tok.chat_template = template.replace("<|im_start|>", "<|im_start|> ")  # another rendering, same options
    try:
        with pytest.raises(QrealignError, match="other prompt tokens"):
            targets.check(fp, _calib(), cfg, tokenizer=tok)
    finally:
        tok.chat_template = template
    assert targets.prompt_tokens and TeacherTargets.load(targets.save(tmp_path / "saved")).prompt_tokens == (
        targets.prompt_tokens)
    with pytest.raises(QrealignError, match="were asked for .* computed without them"):
        realign(finetuned, tok, teacher=targets, calibration=_calib(), config=cfg, progress=False, layers=(1,),
                refusal_targets=True)
    with_refusals = TeacherTargets(targets.logprobs, {**targets.teacher_meta, "refusal_targets": {}}, fp,
                                   targets.calibration, targets.render)
    with pytest.raises(QrealignError, match="were not asked for .* computed with them"):
        with_refusals.check(fp, _calib(), cfg, refusals=False)
    with pytest.warns(UserWarning, match="float rounding"):  # another float path: allowed, said
        targets.check(fp, _calib(), cfg, computed_on={"device": "cuda", "offloaded": False})
    with pytest.raises(QrealignError, match="drop save_targets"):
        realign(finetuned, tok, teacher=targets, save_targets=tmp_path / "again", calibration=_calib(), config=cfg,
                progress=False, layers=(1,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompatibleArtifact, match="not a teacher-targets directory"):
        TeacherTargets.load(tmp_path / "empty")
    targets.save(tmp_path / "saved")
    meta = read_json(tmp_path / "saved" / "qrealign.json")
    write_json(tmp_path / "saved" / "qrealign.json", {**meta, "format_version": 99})
    with pytest.raises(IncompatibleArtifact, match="newer"):
        TeacherTargets.load(tmp_path / "saved")
    write_json(tmp_path / "saved" / "qrealign.json", {**meta, "kind": "probes"})
    with pytest.raises(IncompatibleArtifact, match="not teacher targets"):
        TeacherTargets.load(tmp_path / "saved")


def test_realign_cli_saves_teacher_targets_and_reuses_them_at_another_scheme(tmp_path, monkeypatch):
    from qrealign.cli import main
    from qrealign.utils import read_json

    finetuned, tok = tiny_model("llama", seed=0)
    model_dir = _save(finetuned, tok, tmp_path / "finetuned")
    teacher_dir = _save(tiny_model("llama", seed=1)[0], tok, tmp_path / "aligned")
    common = [model_dir, "--n", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--layers-from", "0.5"]
    assert main(["realign", *common, "--teacher", teacher_dir, "--save-targets", str(tmp_path / "targets"),
                 "--scheme", "W8A8", "--out", str(tmp_path / "w8")]) == 0
    assert main(["realign", *common, "--teacher", str(tmp_path / "targets"), "--scheme", "W4A8",
                 "--out", str(tmp_path / "w4")]) == 0
    w8, w4 = read_json(tmp_path / "w8" / "qrealign.json"), read_json(tmp_path / "w4" / "qrealign.json")
    assert w8["teacher"] == w4["teacher"] and w8["teacher"]["source"] == teacher_dir
    assert w8["scheme"] != w4["scheme"]
    for bad in (["--teacher", str(tmp_path / "targets"), "--batch-size", "2"],  # rendered otherwise
                ["--teacher", str(tmp_path / "targets"), "--save-targets", str(tmp_path / "again")],
                ["--probes", str(tmp_path / "p"), "--save-targets", str(tmp_path / "again")]):
        out = tmp_path / "bad"
        assert main(["realign", *common, *bad, "--out", str(out)]) == 2
        assert not out.exists() and not (tmp_path / "again").exists()
    # bad input with --save-targets fails before the teacher pass, and writes nothing
    import qrealign.calibrate.targets as targets_module

    def no_pass(*a, **k):
        raise AssertionError("the teacher pass ran before the input was checked")

    monkeypatch.setattr(targets_module, "compute_teacher_targets", no_pass)
    import sys

    monkeypatch.setattr(sys.modules["qrealign.realign"], "compute_teacher_targets", no_pass)  # the package's
    # `realign` attribute is the function, so the module is looked up by name
    for bad, out in ((["--layers", "99"], tmp_path / "bad"),  # not a block of this model
                     ([], tmp_path / "again")):  # --save-targets is --out
        args = ["realign", model_dir, "--n", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                "--teacher", teacher_dir, "--save-targets", str(tmp_path / "again"), "--out", str(out), *bad]
        assert main(args) == 2
        assert not (tmp_path / "bad").exists() and not (tmp_path / "again").exists()


# --------------------------------------------------------------------------- review 71 (2026-12-07): real scale


def test_the_teacher_is_loaded_in_the_models_dtype_and_answers_on_the_compute_device(tmp_path, monkeypatch):
    """A float32 teacher beside a bf16 7B model doubled the host memory of the teacher pass, and
    its refusal answers were generated where it lay (the CPU) rather than on the GPU."""
    import qrealign.calibrate.behaviour as behaviour
    import qrealign.models as models
    from qrealign.calibrate.targets import compute_teacher_targets

    finetuned, tok = tiny_model("llama", seed=0)
    teacher_dir = _save(tiny_model("llama", seed=1)[0], tok, tmp_path / "aligned")
    finetuned = finetuned.to(torch.bfloat16)
    loads, devices = [], []
    real_load = models.load_model

    def load(*a, **k):
        loads.append(k.get("dtype"))
        return real_load(*a, **k)

    def refuses(aligned, tokenizer, prompts, config, max_new_tokens=64, device=None, progress=False):
        devices.append(device)
        return [True] * len(prompts)

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(behaviour, "teacher_refuses", refuses)
    compute_teacher_targets(finetuned, tok, teacher_dir, _calib(), CalibConfig(batch_size=4), refusals=True)
    from qrealign.utils import resolve_device

    assert loads == [torch.bfloat16]
    assert devices == [resolve_device(None)]  # resolved: the compute device, not where the teacher lies


def test_a_tail_that_does_not_fit_the_gpu_is_refused_before_the_teacher_pass(monkeypatch):
    import qrealign.calibrate.behaviour as behaviour

    model, _ = tiny_model("llama", num_hidden_layers=4)
    blocks = list(model.model.layers)
    copies, block = behaviour.tail_bytes(model, 1)
    per_block = sum(p.numel() * 4 for p in blocks[1].parameters())
    head = sum(p.numel() * 4 for m in (model.model.norm, model.lm_head) for p in m.parameters())
    assert copies == 2 * per_block + head and block == per_block  # blocks 2 and 3 and the head, float32
    cfg = model.config
    activations = 10 * 2 * (6 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4  # 10 tokens through 2 tail blocks
    need = copies + 7 * block + activations
    free = {"bytes": need}
    monkeypatch.setattr(behaviour, "resolve_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 ** 12))
    _no_cached_memory(monkeypatch)
    with pytest.raises(QrealignError, match="layers_from=0.85.*--dtype bfloat16"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10)
    free["bytes"] = int(need / 0.9) + 1
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10)  # just room enough
    with pytest.raises(QrealignError, match="GiB are free"):  # learned rounding's state: four more copies
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, learn_rounding=True)
    with pytest.raises(QrealignError):  # the last block alone still copies the head and trains a block
        free["bytes"] = head
        behaviour.check_tail_fits(model, 3, "cuda")

    def no_query(device=None):
        raise AssertionError("the CPU path asked the GPU for its memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_query)
    monkeypatch.setattr(behaviour, "resolve_device", lambda device=None: torch.device("cpu"))
    behaviour.check_tail_fits(model, 0, "cpu", tokens=10 ** 9)  # the CPU path copies nothing


def test_the_joint_stage_counts_every_trained_block_and_the_calibration_streams(monkeypatch):
    """--joint-safety trains every safety block on the GPU at once (review 71: about 90 GB over 14
    blocks of a 7B model): the check counts each block's training state, not one block's, plus the
    hidden-state streams over the whole calibration set; and it counts them for a model already
    on the GPU, whose float32 training state is not."""
    import qrealign.calibrate.behaviour as behaviour

    model, _ = tiny_model("llama", num_hidden_layers=4)
    copies, block = behaviour.tail_bytes(model, 1)
    head = copies - 2 * block  # float32 tiny model: the copies are blocks 2-3 and the head
    cfg = model.config
    per_token = (6 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
    joint_need = head + 3 * 7 * block + 10 * 3 * per_token + 5 * 100 * cfg.hidden_size * 4  # 3 blocks, 5 streams
    free = {"bytes": int(joint_need / 0.9) + 1}
    monkeypatch.setattr(behaviour, "resolve_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 ** 12))
    _no_cached_memory(monkeypatch)
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)  # just room enough
    free["bytes"] = joint_need
    with pytest.raises(QrealignError, match="trains the 3 blocks from block 1 on together.*joint_safety off \\(CLI --no-joint-safety\\)"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)
    # the joint need is more than the per-block one: the same memory lets the block-by-block form pass
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, total_tokens=100)
    with pytest.raises(QrealignError):  # learned rounding: eleven copies per joint block
        free["bytes"] = int(joint_need / 0.9) + 1
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100, learn_rounding=True)
    # FP targets kept in CPU memory (offload_targets): one stream on the GPU, four fewer
    free["bytes"] = int((joint_need - 4 * 100 * cfg.hidden_size * 4) / 0.9) + 1
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100, offload_targets=True)
    with pytest.raises(QrealignError):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)

    # recompute: a joint block keeps its weights, its input and its loss terms; five of the seven
    # copies and the rest of the activations are one block's at a time. Named as the way out where
    # it would make the run fit; where it would not, said to be not enough.
    again = head + (3 * 2 + 5) * block + 10 * (3 * 3 * cfg.hidden_size * 4 + per_token) + 5 * 100 * cfg.hidden_size * 4
    assert again < joint_need
    free["bytes"] = joint_need
    with pytest.raises(QrealignError, match="GiB are free. Add recompute=True .*--recompute"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)
    free["bytes"] = int(again / 0.9) + 1
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100, recompute=True)
    with pytest.raises(QrealignError, match=r"GiB are free. Put the safety term.*; recompute=True alone \(CLI "
                                            r"--recompute\) would still need"):
        free["bytes"] = again
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)
    with pytest.raises(QrealignError, match="GiB are free. Put the safety term") as err:
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100, recompute=True)
    assert "recompute" not in str(err.value)  # on already: not named
    with pytest.raises(QrealignError):  # the count is tight
        free["bytes"] = int(again / 0.9) - 1
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100, recompute=True)
    # memory PyTorch's allocator caches but does not use (a teacher moved on and off) counts as free
    _no_cached_memory(monkeypatch, cached=int(joint_need / 0.9) + 1)
    free["bytes"] = 0
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)
    _no_cached_memory(monkeypatch)

    # a model already on the GPU: no copies, but the joint training state is still counted, and block
    # by block the trained block's state, the tail's activations and the streams (review 83)
    monkeypatch.setattr(behaviour, "same_device", lambda a, b: True)
    in_place = 7 * block + 10 * 2 * per_token + 3 * 100 * cfg.hidden_size * 4
    free["bytes"] = int(in_place / 0.9) + 1  # no room for the copies the model on the CPU would need
    assert free["bytes"] < copies + in_place
    behaviour.check_tail_fits(model, 1, "cuda", tokens=10, total_tokens=100)
    with pytest.raises(QrealignError, match="joint_safety"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, joint=True, total_tokens=100)
    free["bytes"] = in_place
    with pytest.raises(QrealignError, match="from block 1 on runs the 2 blocks after it and the head on cuda"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=10, total_tokens=100)


def test_the_block_by_block_tail_names_recompute_where_it_alone_fits(monkeypatch):
    """Block by block, a safety block's step keeps the activations of every FP block after it for
    the backward; with recompute each one's input and one block's activations. The check counts
    that, and names recompute as the way out where it alone would make the run fit."""
    import qrealign.calibrate.behaviour as behaviour

    model, _ = tiny_model("llama", num_hidden_layers=4)
    T = 10_000  # tokens a step
    copies, block = behaviour.tail_bytes(model, 1)
    cfg = model.config
    per_token = (6 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
    streams = 3 * 100 * cfg.hidden_size * 4  # quantized, FP input, FP target
    plain = copies + 7 * block + T * 2 * per_token + streams  # blocks 2-3 after block 1
    again = copies + 7 * block + T * (2 * cfg.hidden_size * 4 + per_token) + streams
    assert again < 0.9 * plain  # the activations dominate at this many tokens a step
    free = {"bytes": int(again / 0.9) + 1}
    monkeypatch.setattr(behaviour, "resolve_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 ** 12))
    _no_cached_memory(monkeypatch)
    with pytest.raises(QrealignError, match=r"GiB are free. Add recompute=True \(CLI --recompute: the same numbers, "
                                            r"a step runs the blocks after the trained one twice"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=T, total_tokens=100)
    behaviour.check_tail_fits(model, 1, "cuda", tokens=T, total_tokens=100, recompute=True)
    with pytest.raises(QrealignError) as err:  # the count is tight; on already, not named
        free["bytes"] = int(again / 0.9) - 1
        behaviour.check_tail_fits(model, 1, "cuda", tokens=T, total_tokens=100, recompute=True)
    assert "recompute" not in str(err.value)
    free["bytes"] = again  # not enough even with it: said so
    with pytest.raises(QrealignError, match=r"recompute=True alone \(CLI --recompute\) would still need"):
        behaviour.check_tail_fits(model, 1, "cuda", tokens=T, total_tokens=100)


def _no_cached_memory(monkeypatch, cached: int = 0):
    """The checks add what PyTorch's allocator caches but does not use to the driver's free memory
    (`calibrate.memory.free_bytes`); this CPU-only suite fakes both counters."""
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_the_gpu_check_renders_nothing_for_a_cpu_run():
    """The check counts tokens for a GPU's free memory; on a CPU it returns before rendering the
    calibration set (thousands of prompts at the users' scale)."""
    from qrealign.realign import _check_gpu_memory

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("rendered for a CPU run")

    model, _ = tiny_model("llama", num_hidden_layers=2)
    _check_gpu_memory(model, no_tokenizer, CalibrationSet(["a", "b"], [0, 1]), CalibConfig(), 0, "cpu")


def test_realign_checks_the_tail_from_its_first_safety_block(monkeypatch):
    import qrealign.calibrate.behaviour as behaviour
    from qrealign.realign import realign

    seen = []

    def check(model, first, device=None, tokens=0, learn_rounding=False, joint=False, total_tokens=0,
              offload_targets=False, head=True, recompute=False):
        assert head  # the first-token objective reads the output through the head
        seen.append((first, tokens, total_tokens))
        raise QrealignError("stop here")

    monkeypatch.setattr(behaviour, "check_tail_fits", check)
    monkeypatch.setattr(sys.modules["qrealign.realign"], "_on_gpu", lambda device: True)  # the check: GPUs only
    finetuned, tok = tiny_model("llama", seed=0, num_hidden_layers=4)
    teacher, _ = tiny_model("llama", seed=1, num_hidden_layers=4)
    for kw, first in ((dict(layers=(3, 2)), 2), ({}, 0)):
        with pytest.raises(QrealignError, match="stop here"):
            realign(finetuned, tok, teacher=teacher, calibration=_calib(), progress=False, **kw)
        assert seen[-1][0] == first
    # the tokens: each prompt as the engine renders it (chat template), plus the forced response
    # tokens of a multi-token target; or exactly pad_to (review 75)
    from qrealign.models.chat import render_chat

    rendered = max(len(tok(render_chat(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    cfg = CalibConfig(batch_size=2)
    with pytest.raises(QrealignError, match="stop here"):
        realign(finetuned, tok, teacher=teacher, calibration=_calib(), config=cfg, progress=False, layers=(3,),
                response_tokens=4)
    assert seen[-1] == (3, 2 * (rendered + 3), 4 * (rendered + 3)) and rendered > max(len(p.split()) for p in PROMPTS)
    with pytest.raises(QrealignError, match="stop here"):
        realign(finetuned, tok, teacher=teacher, calibration=_calib(), config=CalibConfig(batch_size=2, pad_to=64),
                progress=False, layers=(3,))
    assert seen[-1] == (3, 2 * 64, 4 * 64)


def test_a_resumed_teacher_run_reads_its_teacher_pass_back_from_the_checkpoint(tmp_path, monkeypatch):
    """review 71: a resumed `realign --teacher` ran its teacher pass again (minutes at 7B). The
    pass is kept in the run's checkpoint; the resumed run reads it back, gives the uninterrupted
    run to the bit, and the finished run clears it. Another teacher is another pass."""
    import qrealign.calibrate.behaviour as behaviour
    import qrealign.calibrate.checkpoints as checkpoints
    from safetensors.torch import load_file

    from qrealign.calibrate.checkpoints import CHECKPOINT_TARGETS
    from qrealign.models import load_model
    from qrealign.realign import realign
    from qrealign.utils import read_json

    finetuned, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    teacher_dir = _save(tiny_model("llama", seed=1, num_hidden_layers=3)[0], tok, tmp_path / "aligned")
    other_teacher = _save(tiny_model("llama", seed=2, num_hidden_layers=3)[0], tok, tmp_path / "other")
    finetuned_dir = _save(finetuned, tok, tmp_path / "finetuned")
    cfg = CalibConfig(epochs=1, batch_size=2)
    kw = dict(calibration=_calib(), scheme="W8A8", config=cfg, progress=False, layers=(1, 2), response_tokens=2)
    passes = []
    response_targets = behaviour.response_targets
    monkeypatch.setattr(behaviour, "response_targets", lambda *a, **k: passes.append(1) or response_targets(*a, **k))

    realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=tmp_path / "whole", **kw)
    assert len(passes) == 1 and not (tmp_path / ".whole.checkpoint").exists()

    trained, write_state = [], checkpoints.write_state

    def interrupt_after_block_0(ckpt, fingerprint, code, completed, logs):
        write_state(ckpt, fingerprint, code, completed, logs)
        trained.append(completed - 1)
        if completed == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_state", interrupt_after_block_0)
    out, ckpt = tmp_path / "run", tmp_path / ".run.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=out, **kw)
    kept = list(ckpt.glob(f"{CHECKPOINT_TARGETS}-*"))
    assert len(passes) == 2 and len(kept) == 1 and (kept[0] / "targets.safetensors").is_file()

    resumed = realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=out, **kw)
    assert len(passes) == 2  # read back, not run again
    assert resumed.resumed_blocks == 1 and trained == [0, 1, 2]
    a, b = read_json(tmp_path / "whole" / "qrealign.json"), read_json(out / "qrealign.json")
    assert a["run_fingerprint"] == b["run_fingerprint"] and a["teacher"] == b["teacher"]
    pa, pb = (load_file(str(d / "quant_params.safetensors")) for d in (tmp_path / "whole", out))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not ckpt.exists()  # the finished run clears its checkpoint, the teacher pass with it

    # the same checkpoint with another teacher (or another model) is another pass
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=tmp_path / "run2", **kw)
    assert len(passes) == 3
    monkeypatch.setattr(checkpoints, "write_state", write_state)
    realign(load_model(finetuned_dir)[0], tok, teacher=other_teacher, out=tmp_path / "run2", **kw)
    assert len(passes) == 4
    assert read_json(tmp_path / "run2" / "qrealign.json")["teacher"]["source"].endswith("other")
    # a checkpoint folder inside the output is refused before the pass writes its copy there
    with pytest.raises(QrealignError, match="separate folders"):
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=tmp_path / "run3",
                checkpoint_dir=tmp_path / "run3" / "ckpt", **kw)
    assert len(passes) == 4 and not (tmp_path / "run3").exists()
    # a user's own folder of a similar name in a shared checkpoint folder is left alone (review 75);
    # the engine recognises a kept pass by its kind, which is the folder's prefix
    from qrealign.calibrate.targets import KIND

    assert KIND == CHECKPOINT_TARGETS
    shared = tmp_path / "work"
    mine = shared / f"{CHECKPOINT_TARGETS}-70b"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, out=tmp_path / "run4", checkpoint_dir=shared, **kw)
    assert (mine / "notes.txt").is_file() and not list(shared.glob("block_*"))


def test_a_kept_teacher_pass_of_other_code_or_damaged_is_computed_again_and_a_failed_keep_only_warns(
        tmp_path, monkeypatch):
    """review 74: the kept pass is named by the digest of the code that computes it (an upgrade
    between the interruption and the resume computes it again, as the engine sets aside blocks
    made by other code); a damaged copy is computed again; a copy that cannot be written (a full
    disk) is a warning, not the end of the run the pass was for."""
    import qrealign.calibrate.behaviour as behaviour
    import qrealign.calibrate.checkpoints as checkpoints
    import qrealign.stage_code as stage_code
    from qrealign.calibrate.checkpoints import CHECKPOINT_TARGETS
    from qrealign.calibrate.targets import TeacherTargets
    from qrealign.models import load_model
    from qrealign.realign import realign

    finetuned, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    teacher_dir = _save(tiny_model("llama", seed=1, num_hidden_layers=3)[0], tok, tmp_path / "aligned")
    finetuned_dir = _save(finetuned, tok, tmp_path / "finetuned")
    kw = dict(calibration=_calib(), scheme="W8A8", config=CalibConfig(epochs=1, batch_size=2), progress=False,
              layers=(1, 2), out=tmp_path / "run")
    passes = []
    first_token_targets = behaviour.first_token_targets
    monkeypatch.setattr(behaviour, "first_token_targets",
                        lambda *a, **k: passes.append(1) or first_token_targets(*a, **k))
    write_state = checkpoints.write_state

    def interrupt(ckpt, fingerprint, code, completed, logs):
        write_state(ckpt, fingerprint, code, completed, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_state", interrupt)
    ckpt = tmp_path / ".run.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, **kw)
    (old,) = ckpt.glob(f"{CHECKPOINT_TARGETS}-*")

    code_digest = stage_code.code_digest
    monkeypatch.setattr(stage_code, "code_digest", lambda kind: (
        {**code_digest(kind), "digest": "0" * 16} if kind == "targets" else code_digest(kind)))
    with pytest.raises(KeyboardInterrupt):  # upgraded code: the pass again, the old copy gone
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, **kw)
    (new,) = ckpt.glob(f"{CHECKPOINT_TARGETS}-*")
    assert len(passes) == 2 and new != old and new.name.endswith("0" * 12)

    (new / "targets.safetensors").write_bytes(b"not a tensor file")  # damaged: computed again
    with pytest.raises(KeyboardInterrupt):
        realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, **kw)
    assert len(passes) == 3

    def full_disk(self, out_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "write_state", write_state)
    monkeypatch.setattr(TeacherTargets, "save", full_disk)
    for kept in ckpt.glob(f"{CHECKPOINT_TARGETS}-*"):
        import shutil

        shutil.rmtree(kept)
    with pytest.warns(UserWarning, match="could not be kept.*No space left"):
        result = realign(load_model(finetuned_dir)[0], tok, teacher=teacher_dir, **kw)
    # each interrupted run above trained one more block: all three are replayed
    assert len(passes) == 4 and result.resumed_blocks == 3 and (tmp_path / "run" / "qrealign.json").is_file()
    assert not ckpt.exists()
