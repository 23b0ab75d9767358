"""The joint safety stage (CalibConfig.joint_safety): the blocks with a safety term trained
together. Its loss is the chain's mean block loss; a chain of one block is the block-by-block
run exactly; it checkpoints and resumes as one stage; bad settings fail before any work."""

import copy

import pytest
import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.artifact import apply_quant_params, read_quantized_metadata
from qrealign.calibrate.behaviour import FirstTokenLoss, ModelTail, first_token_targets
from qrealign.calibrate.capture import block_output, capture_block_inputs, record_block_inputs
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.calibrate.engine import CalibConfig, calibrate
from qrealign.calibrate.losses import ReconstructionLoss, per_sample_mse
from qrealign.calibrate.safety import SafetyLoss
from qrealign.calibrate.train import Learnable, joint_step, loss_inputs
from qrealign.errors import QrealignError
from qrealign.models.tiny import tiny_model
from qrealign.utils import read_json

PROMPTS = ["bake a loaf of rye bread", "describe how to pick a lock", "write a poem about rain", "say hello",
           "how do I hotwire a car", "list three fruits"]
CALIB = CalibrationSet(PROMPTS, [0, 1, 0, 1, 1, 0])
CFG = dict(batch_size=2, epochs=2, lr_let=5e-2, learn_rounding=True, lr_round=1e-1, plain_epochs=1)


def _models(layers=4):
    finetuned, tok = tiny_model("llama", seed=0, num_hidden_layers=layers)
    aligned = copy.deepcopy(finetuned)
    with torch.no_grad():
        aligned.lm_head.weight.add_(0.5 * torch.randn(aligned.lm_head.weight.shape,
                                                      generator=torch.Generator().manual_seed(1)))
    return finetuned, aligned, tok


def _run(joint: bool, layers=(2, 3), ckpt=None, **cfg):
    finetuned, aligned, tok = _models()
    config = CalibConfig(**{**CFG, **cfg}, joint_safety=joint)
    targets = first_token_targets(aligned, finetuned, tok, CALIB, config)
    model = copy.deepcopy(finetuned)
    loss = FirstTokenLoss(ModelTail(model), targets, layers=layers, lam=1.0, benign_kl=2.0)
    return calibrate(model, tok, CALIB, "W4A8", config, loss=loss, checkpoint_dir=ckpt, progress=False), model


def test_a_chain_of_one_block_is_the_block_by_block_run():
    """With the safety term on the last block only, the joint stage trains that one block on the
    same loss, seed and epochs as the block-by-block engine: the same parameters, bit for bit."""
    blockwise, _ = _run(False, layers=(3,))
    joint, _ = _run(True, layers=(3,))
    assert blockwise.params.keys() == joint.params.keys()
    assert all(torch.equal(blockwise.params[k], joint.params[k]) for k in blockwise.params)
    assert joint.layer_logs[3]["joint_blocks"] == [3, 3]
    assert blockwise.fingerprint != joint.fingerprint  # another setting, another run


def test_joint_stage_trains_every_safety_block_and_logs_it_once():
    res, model = _run(True)
    blockwise, _ = _run(False)
    logs = res.layer_logs
    assert [log["layer"] for log in logs] == [0, 1, 2, 3]
    assert logs[2]["joint_blocks"] == [2, 3] and logs[3]["joint_with"] == 2
    # 3 benign + 3 malicious prompts, batches of 2 within a label: 4 batches, two epochs
    assert logs[2]["epochs"] == 2 and logs[2]["steps"] == 2 * 4
    assert "last_kl_mal" in logs[2] and "last_mse" in logs[2]
    assert "epochs" not in logs[3]  # trained in block 2's stage
    assert logs[2]["seconds"] >= logs[2]["joint_seconds"] > 0  # the stage's time is its first block's
    for i in (2, 3):  # every block of the chain learned something, and not what it learns alone
        assert any(k.startswith(f"layers.{i}.round") and res.params[k].abs().sum() > 0 for k in res.params)
        assert not all(torch.equal(res.params[k], blockwise.params[k]) for k in res.params
                       if k.startswith(f"layers.{i}."))
    for i in (0, 1):  # the blocks before the stage are trained as without it
        assert all(torch.equal(res.params[k], blockwise.params[k]) for k in res.params if k.startswith(f"layers.{i}."))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_joint_loss_is_the_mean_block_loss_with_the_output_term_once():
    """The step's value by hand: each block's reconstruction on the quantized chain's own stream,
    averaged, plus the first-token term read after the last block."""
    finetuned, aligned, tok = _models(layers=2)
    cfg = CalibConfig(batch_size=6)
    targets = first_token_targets(aligned, finetuned, tok, CALIB, cfg)
    loss = FirstTokenLoss(ModelTail(finetuned), targets, lam=1.5, benign_kl=0.5)
    batch = make_batches(tok, CALIB, 6, cfg.max_length, cfg.padding_side)[0]
    inputs = capture_block_inputs(finetuned, batch, torch.device("cpu"))
    kw = next(iter(inputs.kwargs_by_type.values()))  # one attention type in a tiny Llama
    blocks = list(finetuned.model.layers)
    with torch.no_grad():
        fp1 = block_output(blocks[0](inputs.hidden, **kw))
        fp2 = block_output(blocks[1](fp1, **kw))
        noisy = inputs.hidden + 0.05 * torch.randn(inputs.hidden.shape, generator=torch.Generator().manual_seed(3))
        chain = [Learnable(0, blocks[0], None, [kw], [fp1]), Learnable(1, blocks[1], None, [kw], [fp2])]
        value, logs = joint_step(chain, [noisy], [batch], [batch.enc.attention_mask], loss, 2, None,
                                 all_kw=[inputs.kwargs_by_type])(0)
        q1 = block_output(blocks[0](noisy, **kw))
        q2 = block_output(blocks[1](q1, **kw))
        mask = batch.enc.attention_mask
        recon = [per_sample_mse(fp, q, mask, True, 0.0).mean() for fp, q in ((fp1, q1), (fp2, q2))]
        logits = finetuned.lm_head(finetuned.model.norm(q2[torch.arange(6), batch.enc.last_index]))
        teacher = targets[batch.index]
        kl = (teacher.exp() * (teacher - torch.log_softmax(logits.float(), -1))).sum(-1)
        weight = torch.where(batch.labels.bool(), 1.5, 0.5)
        expected = (recon[0] + recon[1]) / 2 + (weight * kl).mean()
        # joint_recon_weight scales the reconstruction mean only, not the output term
        weighted, _ = joint_step(chain, [noisy], [batch], [batch.enc.attention_mask], loss, 2, None,
                                 all_kw=[inputs.kwargs_by_type], recon_weight=3.0)(0)
    assert torch.allclose(value, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weighted, 3.0 * (recon[0] + recon[1]) / 2 + (weight * kl).mean(), rtol=1e-5, atol=1e-7)
    assert set(logs) >= {"mse", "kl_mal", "kl_ben"}


def test_joint_stage_with_a_probe_loss_scores_each_block_once():
    """A loss that reads only its own block (the paper's probe term) gives the plain mean of the
    blocks' losses."""
    finetuned, _, tok = _models(layers=2)
    batch = make_batches(tok, CALIB, 6, 256, "left")[0]
    inputs = capture_block_inputs(finetuned, batch, torch.device("cpu"))
    kw = next(iter(inputs.kwargs_by_type.values()))
    blocks = list(finetuned.model.layers)
    d = finetuned.config.hidden_size
    loss = SafetyLoss(torch.randn(2, d, generator=torch.Generator().manual_seed(0)), torch.zeros(2), lam=2.0)
    with torch.no_grad():
        fp1 = block_output(blocks[0](inputs.hidden, **kw))
        fp2 = block_output(blocks[1](fp1, **kw))
        chain = [Learnable(0, blocks[0], None, [kw], [fp1]), Learnable(1, blocks[1], None, [kw], [fp2])]
        noisy = inputs.hidden * 1.01
        value, _ = joint_step(chain, [noisy], [batch], [batch.enc.attention_mask], loss, 2, None)(0)
        q1 = block_output(blocks[0](noisy, **kw))
        q2 = block_output(blocks[1](q1, **kw))
        mask = batch.enc.attention_mask
        expected = (loss(loss_inputs(fp1, q1, batch, mask, 0, 2))[0] + loss(loss_inputs(fp2, q2, batch, mask, 1, 2))[0]) / 2
    assert torch.allclose(value, expected, rtol=1e-6)
    # no output term to weigh reconstruction against: a reconstruction weight is refused
    with pytest.raises(QrealignError, match="SafetyLoss has none"):
        joint_step(chain, [noisy], [batch], [batch.enc.attention_mask], loss, 2, None, recon_weight=2.0)


def test_joint_stage_resumes_whole_and_retrains_when_a_part_is_lost(tmp_path):
    ckpt = tmp_path / "ckpt"
    first, _ = _run(True, ckpt=ckpt)
    learned = first.params.to_dict()  # in memory: the checkpoint's files are rewritten below
    state = read_json(ckpt / "state.json")
    assert state["completed_blocks"] == 4 and [log["layer"] for log in state["logs"]] == [0, 1, 2, 3]
    again, _ = _run(True, ckpt=ckpt)  # everything replayed from the checkpoint
    assert again.resumed_blocks == 4
    assert all(torch.equal(learned[k], again.params[k]) for k in learned)
    (ckpt / "block_0003.safetensors").unlink()  # a lost file inside the stage: the whole stage again
    redone, _ = _run(True, ckpt=ckpt)
    assert redone.resumed_blocks == 2
    assert redone.layer_logs[2]["joint_blocks"] == [2, 3] and not redone.layer_logs[2].get("resumed")
    assert all(torch.equal(learned[k], redone.params[k]) for k in learned)


def test_joint_run_written_and_applied_to_a_fresh_model_is_the_calibrated_model(tmp_path):
    finetuned, aligned, tok = _models()
    config = CalibConfig(**CFG, joint_safety=True)
    targets = first_token_targets(aligned, finetuned, tok, CALIB, config)
    model = copy.deepcopy(finetuned)
    loss = FirstTokenLoss(ModelTail(model), targets, layers=(2, 3), lam=1.0, benign_kl=2.0)
    res = quantize(model, tok, CALIB, "W4A8", config, out=tmp_path / "run", loss=loss, progress=False)
    meta = read_quantized_metadata(tmp_path / "run")
    assert meta["config"]["joint_safety"] is True
    fresh = copy.deepcopy(finetuned)
    apply_quant_params(fresh, meta["scheme"], res.params)
    ids = tok(["say hello to the rain"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, fresh(**ids).logits, atol=1e-5)


def test_joint_settings_that_cannot_work_fail_before_any_work():
    with pytest.raises(QrealignError, match="init_guard"):
        CalibConfig(joint_safety=True, init_guard=True)
    with pytest.raises(QrealignError, match="epoch_schedule 'paper'\\) do not apply"):
        CalibConfig(joint_safety=True, epoch_schedule="paper", epochs=10)
    assert "joint_safety" not in CalibConfig().to_dict()  # off: existing run keys unchanged
    assert "joint_recon_weight" not in CalibConfig(joint_safety=True).to_dict()
    assert CalibConfig(joint_safety=True, joint_recon_weight=12.0).to_dict()["joint_recon_weight"] == 12.0
    with pytest.raises(QrealignError, match="needs joint_safety"):
        CalibConfig(joint_recon_weight=2.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(QrealignError, match="joint_recon_weight must be > 0"):
            CalibConfig(joint_safety=True, joint_recon_weight=bad)
    assert CalibConfig(joint_safety=True).to_dict()["joint_safety"] is True
    with pytest.raises(QrealignError, match="without a gap"):
        _run(True, layers=(1, 3))
    with pytest.raises(QrealignError, match="without a gap"):
        _run(True, layers=(1, 2))  # does not reach the last block
    finetuned, _, tok = _models()
    with pytest.raises(QrealignError, match="has none"):
        calibrate(finetuned, tok, CALIB, "W8A8", CalibConfig(joint_safety=True), loss=ReconstructionLoss(),
                  progress=False)
    probe = SafetyLoss(torch.zeros(4, finetuned.config.hidden_size), torch.zeros(4), layers=(2, 3))
    with pytest.raises(QrealignError, match="SafetyLoss has none"):  # before block 0 trains
        calibrate(finetuned, tok, CALIB, "W8A8", CalibConfig(joint_safety=True, joint_recon_weight=3.0), loss=probe,
                  progress=False)
    # RTN learns nothing: a joint stage (or its recompute) would be recorded in the run and never run
    for option in ("joint_safety", "recompute", "learn_rounding", "compile_quantizer"):
        with pytest.raises(QrealignError, match=f"method 'rtn' trains nothing, and {option} set"):
            CalibConfig(method="rtn", **{option: True})
    with pytest.raises(QrealignError, match="joint_safety, recompute set"):
        CalibConfig(method="rtn", joint_safety=True, recompute=True)


def test_cli_realign_joint_safety_and_the_commands_without_a_safety_term(tmp_path, capsys):
    from qrealign.cli import main

    finetuned, aligned, tok = _models()
    for model, name in ((finetuned, "finetuned"), (aligned, "aligned")):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    common = [str(tmp_path / "finetuned"), "--n", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    rc = main(["realign", *common, "--teacher", str(tmp_path / "aligned"), "--layers-from", "0.5", "--joint-safety",
               "--offload-targets", "--recompute", "--lr-schedule", "cosine", "--joint-recon-weight", "2", "--out",
               str(tmp_path / "run")])
    assert rc == 0
    meta = read_quantized_metadata(tmp_path / "run")
    assert meta["config"]["joint_safety"] is True and meta["config"]["offload_targets"] is True
    assert meta["config"]["recompute"] is True
    assert meta["config"]["joint_recon_weight"] == 2.0
    assert meta["config"]["lr_schedule"] == "cosine"
    assert [log.get("joint_blocks") for log in meta["layers"]][2] == [2, 3]
    # plain quantization has no safety term to train jointly: refused before anything is written
    assert main(["quantize", *common, "--joint-safety", "--out", str(tmp_path / "q")]) == 2
    assert "only realign" in capsys.readouterr().err and not (tmp_path / "q").exists()
    # block by block the first-token objective's tail is what --recompute runs again
    assert main(["realign", *common, "--teacher", str(tmp_path / "aligned"), "--layers-from", "0.5", "--recompute",
                 "--out", str(tmp_path / "r")]) == 0
    assert read_quantized_metadata(tmp_path / "r")["config"]["recompute"] is True
    # quantize runs no blocks after the trained one: said in flags, not sent round to a --joint-safety it
    # refuses (review 79)
    assert main(["quantize", *common, "--recompute", "--out", str(tmp_path / "q")]) == 2
    assert "that is realign's (--joint-safety, or --teacher block by block): drop it here" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    # a safety term that stops before the last block cannot be trained as one stage
    assert main(["realign", *common, "--teacher", str(tmp_path / "aligned"), "--layers", "1-2", "--joint-safety",
                 "--out", str(tmp_path / "gap")]) == 2
    assert "without a gap" in capsys.readouterr().err and not (tmp_path / "gap").exists()
    assert not (tmp_path / ".gap.checkpoint").exists()  # refused before the teacher pass, which it would hold


def test_first_token_settings_that_cannot_work_fail_before_the_teacher_pass(monkeypatch):
    # the teacher pass is the first-token run's first long step (minutes at 135 M, more at 7B):
    # a safety range the joint stage cannot train, or a compiler the run cannot use, is said before it
    import importlib

    import qrealign.quant.quantizer as quantizer
    from qrealign import realign

    module = importlib.import_module("qrealign.realign")  # `qrealign.realign` is the function
    monkeypatch.setattr(module, "compute_teacher_targets",
                        lambda *a, **k: pytest.fail("the teacher pass ran before the check"))
    finetuned, aligned, tok = _models()
    with pytest.raises(QrealignError, match="without a gap"):
        realign(finetuned, tok, teacher=aligned, calibration=CALIB, config=CalibConfig(joint_safety=True),
                layers=(1, 2), progress=False)
    # recompute with the term on the last block only: nothing after it to run again (review 83)
    with pytest.raises(QrealignError, match="on the last block only, which has none after it"):
        realign(finetuned, tok, teacher=aligned, calibration=CALIB, config=CalibConfig(recompute=True),
                layers=(3,), progress=False)

    def no_compiler(device, demo=False):
        raise QrealignError("needs a C++ compiler (stand-in)")
    monkeypatch.setattr(quantizer, "check_compiler", no_compiler)
    with pytest.raises(QrealignError, match="stand-in"):
        realign(finetuned, tok, teacher=aligned, calibration=CALIB, config=CalibConfig(compile_quantizer=True),
                layers_from=0.5, progress=False)


@pytest.mark.parametrize("joint", [False, True])
def test_offloaded_targets_change_nothing_learned(joint, monkeypatch):
    """`offload_targets` only moves where the FP targets wait between steps: the same parameters
    bit for bit and the same fingerprint (a run resumes across it). On this CPU-only suite the
    compute device is the CPU too, so `keep` would hand back the very tensor; a clone stands in
    for the device-to-host copy, so nothing may rely on a target being the tensor it came from
    (the GPU copy itself is not exercised here)."""
    from qrealign.calibrate import engine

    kept, _ = _run(joint)
    monkeypatch.setattr(engine._Run, "keep", lambda self, t: None if t is None else t.detach().clone())
    offloaded, _ = _run(joint, offload_targets=True)
    assert kept.fingerprint == offloaded.fingerprint
    assert all(torch.equal(kept.params[k], offloaded.params[k]) for k in kept.params)
    assert "offload_targets" not in CalibConfig().to_dict()  # off: existing run keys unchanged
    assert "offload_targets" not in CalibConfig(offload_targets=True).fingerprint_dict()


@pytest.mark.parametrize("compiled", [False, True])
def test_recomputed_joint_blocks_learn_the_same_parameters(compiled, monkeypatch):
    """`recompute` keeps only each joint block's input for the backward and runs the block again
    there (activation checkpointing): every block of the chain but the last goes through the checkpoint, and
    the learned parameters and the logged losses are the uninterrupted run's, bit for bit, eager
    and with the compiled fake-quantizers. It decides nothing learned: not in the fingerprint,
    and off leaves existing run keys as they were."""
    from qrealign.calibrate import train

    kept, _ = _run(True, compile_quantizer=compiled)
    calls = []
    real = train.checkpoint
    monkeypatch.setattr(train, "checkpoint", lambda fn, *a, **k: calls.append(a[0]) or real(fn, *a, **k))
    again, model = _run(True, compile_quantizer=compiled, recompute=True)
    # blocks 2-3 train jointly: block 2 is recomputed; block 3's backward comes first, right after
    # its forward, so recomputing it would free nothing
    assert calls and {id(block) for block in calls} == {id(model.model.layers[2])}
    assert kept.fingerprint == again.fingerprint
    assert kept.params.keys() == again.params.keys()
    assert all(torch.equal(kept.params[k], again.params[k]) for k in kept.params)
    assert kept.layer_logs[2]["last_kl_mal"] == again.layer_logs[2]["last_kl_mal"]
    assert "recompute" not in CalibConfig().to_dict()
    assert "recompute" not in CalibConfig(joint_safety=True, recompute=True).fingerprint_dict()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_recomputed_tail_learns_the_same_parameters_block_by_block(compiled, monkeypatch):
    """Block by block, `recompute` runs the FP blocks after each safety block again in the
    backward (`ModelTail.final_states`) instead of keeping their activations: every tail block
    of every step goes through the checkpoint, and the learned parameters and logged losses are
    the uninterrupted run's, bit for bit, with the same fingerprint."""
    from qrealign.calibrate import behaviour

    kept, _ = _run(False, layers=(1, 2, 3), compile_quantizer=compiled)
    calls = []
    real = behaviour.checkpoint
    monkeypatch.setattr(behaviour, "checkpoint", lambda fn, *a, **k: calls.append(a[0]) or real(fn, *a, **k))
    again, model = _run(False, layers=(1, 2, 3), compile_quantizer=compiled, recompute=True)
    blocks = model.model.layers
    # the tails of blocks 1 and 2 (blocks 2-3 and block 3); block 3 has none
    assert calls and {id(b) for b in calls} == {id(blocks[2]), id(blocks[3])}
    assert kept.fingerprint == again.fingerprint
    assert all(torch.equal(kept.params[k], again.params[k]) for k in kept.params)
    assert [log.get("last_kl_mal") for log in kept.layer_logs] == [log.get("last_kl_mal") for log in again.layer_logs]


def test_a_recomputed_tail_keeps_less_for_its_backward():
    """What the tail's autograd graph holds for the backward (every saved tensor but the weights,
    each storage once, counted with a pack hook): with recompute, each tail block's input and the
    head's few rows, far less than the blocks' activations; the logits and the input's gradient
    unchanged."""
    finetuned, _, _ = _models(layers=6)
    tail = ModelTail(finetuned)
    batch, length = 2, 7
    hidden = torch.randn(batch, length, finetuned.config.hidden_size, requires_grad=True)
    ids = torch.randint(0, finetuned.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    kwargs = record_block_inputs(finetuned, ids, torch.ones_like(ids), torch.arange(length).expand(batch, -1),
                                 torch.device("cpu")).kwargs_by_type

    weights = {p.untyped_storage().data_ptr() for p in finetuned.parameters()}

    def run(recompute: bool):
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # a linear saves its weight: not a copy
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = tail(hidden, 0, kwargs, torch.full((batch,), length - 1), recompute=recompute)
        grad, = torch.autograd.grad(logits.sum(), hidden)
        return sum(saved.values()), logits, grad

    plain, logits, grad = run(False)
    light, logits2, grad2 = run(True)
    assert torch.equal(logits, logits2) and torch.equal(grad, grad2)
    inputs_only = 5 * batch * length * finetuned.config.hidden_size * 4  # blocks 1-5's inputs
    head_rows = batch * (finetuned.config.hidden_size + 2 * finetuned.config.vocab_size) * 4  # norm in, logits
    assert inputs_only <= light <= inputs_only + head_rows + 4096  # 4 KiB of slack for the head's small tensors
    assert plain > 4 * light


def test_realign_with_probes_refuses_recompute_block_by_block_before_reading_them():
    # review 83: the probes' checks hash the model's weights (seconds at 7B) before the engine would
    # refuse; the probe folder here does not exist, so reading it first would fail otherwise
    from qrealign import realign

    finetuned, _, tok = _models()
    with pytest.raises(QrealignError, match="the probes' loss runs none"):
        realign(finetuned, tok, probes="/nowhere", calibration=CALIB, config=CalibConfig(recompute=True),
                progress=False)


def test_recompute_with_nothing_to_run_again_is_refused():
    """Neither a joint stage nor a loss that runs blocks after the trained one (a probe, plain
    reconstruction, the first-token term on the last block only): the engine says so before any
    block calibrates (the config alone cannot know the loss)."""
    finetuned, aligned, tok = _models()
    CalibConfig(recompute=True)  # the loss decides
    targets = first_token_targets(aligned, finetuned, tok, CALIB, CalibConfig())
    last_only = FirstTokenLoss(ModelTail(finetuned), targets, layers=(3,))
    for loss, name in ((ReconstructionLoss(), "ReconstructionLoss"), (SafetyLoss(torch.zeros(4, 64), torch.zeros(4)),
                                                                      "SafetyLoss"),
                       (last_only, r"FirstTokenLoss \(its term on no block before the last\)")):
        with pytest.raises(QrealignError, match=f"{name} runs neither block by block: leave recompute off, or train "
                                                 f"the safety blocks jointly"):
            calibrate(copy.deepcopy(finetuned), tok, CALIB, "W8A8", CalibConfig(recompute=True), loss=loss,
                      progress=False, on_block_end=lambda i: pytest.fail("a block calibrated before the refusal"))


def test_the_engines_memory_check_counts_the_joint_stage_whole(monkeypatch):
    """A joint stage holds every joint block's training state at once: the engine's GPU check is
    told how many (a Python-API run has no other check)."""
    from qrealign.calibrate import engine

    seen = []

    def check(model, dev, cfg, batches, joint_blocks=0, learns=True):
        seen.append(joint_blocks)
        raise QrealignError("stop here")

    monkeypatch.setattr(engine, "check_block_fits", check)
    with pytest.raises(QrealignError, match="stop here"):
        _run(True)  # the safety term on blocks 2-3 of 4
    with pytest.raises(QrealignError, match="stop here"):
        _run(False)
    assert seen == [2, 0]
