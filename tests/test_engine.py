"""Block-wise calibration engine: resume, batch/padding invariance, artefact round trip."""

import math
from dataclasses import replace

import pytest
import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.artifact import apply_quant_params, load_quantized, read_quantized_metadata
from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig, NonFiniteLoss, calibrate
from qrealign.errors import IncompatibleArtifact, QrealignError
from qrealign.models.tiny import tiny_model
from qrealign.quant.qlinear import QuantLinear


def _run(calib, cfg, seed=0, progress=False, **kw):
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=3)
    return model, tok, calibrate(model, tok, calib, "W4A8", cfg, progress=progress, **kw)


def test_training_lowers_block_loss_and_learned_clipping_beats_rtn(calib_set):
    # Random tiny weights have no activation outliers, so SmoothQuant-initialised LET starts
    # behind RTN here; the real-model comparison lives in the benchmark. What must hold anywhere:
    # training lowers each block's loss, and learned clipping beats plain min-max rounding.
    _, _, rtn = _run(calib_set, CalibConfig(method="rtn"))
    _, _, omni = _run(calib_set, CalibConfig(epochs=20, batch_size=2, measure_init_loss=True))
    for log in omni.layer_logs:
        assert log["loss_last_epoch"] < log["loss_init"]
    _, _, lwc = _run(calib_set, CalibConfig(epochs=20, batch_size=2, let=False))
    assert lwc.layer_logs[-1]["q_mse"] < rtn.layer_logs[-1]["q_mse"]


@pytest.mark.parametrize("cfg", [CalibConfig(epochs=2, batch_size=3),
                                 CalibConfig(epochs=2, batch_size=3, learn_rounding=True, lr_round=0.1)],
                         ids=["let-lwc", "learned-rounding"])
def test_interrupted_run_resumes_bit_identical(calib_set, tmp_path, cfg):
    _, _, full = _run(calib_set, cfg)
    _interrupt_after_first_block(calib_set, cfg, tmp_path)
    _, _, resumed = _run(calib_set, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_blocks == 1
    assert full.params.keys() == resumed.params.keys()
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k


def test_measuring_the_initial_loss_logs_it_without_changing_what_is_learned(calib_set, tmp_path):
    cfg = CalibConfig(epochs=2, batch_size=3, learn_rounding=True, lr_round=0.1)
    _, _, quiet = _run(calib_set, cfg)
    assert all("loss_init" not in log for log in quiet.layer_logs)  # the extra pass is off by default
    measured_cfg = replace(cfg, measure_init_loss=True)
    _, _, measured = _run(calib_set, measured_cfg)
    assert all(log["loss_init"] > 0 for log in measured.layer_logs)
    assert measured.fingerprint == quiet.fingerprint
    for k in quiet.params:
        assert torch.equal(quiet.params[k], measured.params[k]), k

    # a run interrupted with the flag off resumes with it on: it is not part of the fingerprint
    _interrupt_after_first_block(calib_set, cfg, tmp_path)
    _, _, resumed = _run(calib_set, measured_cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_blocks == 1


def _interrupt_after_first_block(calib_set, cfg, checkpoint_dir):
    def stop_after_first(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(calib_set, cfg, checkpoint_dir=checkpoint_dir, on_block_end=stop_after_first)


def test_changed_config_does_not_resume(calib_set, tmp_path):
    _run(calib_set, CalibConfig(epochs=1), checkpoint_dir=tmp_path)
    _, _, other = _run(calib_set, CalibConfig(epochs=1, lr_let=5e-3), checkpoint_dir=tmp_path)
    assert other.resumed_blocks == 0


def test_resuming_and_setting_aside_a_checkpoint_are_said(calib_set, tmp_path, capsys):
    """A resumed run says where it continues; a checkpoint of other settings is set aside, not
    deleted (one mistyped flag used to delete hours of blocks), and says so; the run that made it,
    started again, takes it back and resumes, even after the mistyped run wrote blocks of its own
    (which are set aside in their turn, in their own folder)."""
    cfg, ckpt = CalibConfig(epochs=1), tmp_path / "ckpt"
    _interrupt_after_first_block(calib_set, cfg, ckpt)
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    capsys.readouterr()
    calibrate(model, tok, calib_set, "W4A8", cfg, checkpoint_dir=ckpt, progress=True)
    err = capsys.readouterr().err
    assert "resuming from" in err and "continuing at block 1" in err
    ckpt = tmp_path / "other"
    _interrupt_after_first_block(calib_set, cfg, ckpt)
    other = CalibConfig(epochs=1, lr_let=5e-3)
    with pytest.raises(KeyboardInterrupt):  # the mistyped run, stopped after its first block
        _run(calib_set, other, checkpoint_dir=ckpt, progress=True, on_block_end=_stop)
    err = capsys.readouterr().err
    first_aside = [p for p in tmp_path.iterdir() if p.name.startswith("other.stale-")]
    assert len(first_aside) == 1 and "set aside in" in err and str(first_aside[0]) in err
    assert "1 set aside beside this run" in err and "MiB: delete the ones you no longer need" in err
    assert (first_aside[0] / "state.json").is_file() and (first_aside[0] / "block_0000.safetensors").is_file()
    assert (ckpt / "state.json").is_file()  # the mistyped run's own block

    _, _, resumed = _run(calib_set, cfg, checkpoint_dir=ckpt, progress=True)  # the first settings again
    err = capsys.readouterr().err
    assert resumed.resumed_blocks == 1 and "taken back" in err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("other.stale-")]
    assert len(aside) == 1 and aside != first_aside  # the mistyped run's block, kept for it
    _, _, mistyped = _run(calib_set, other, checkpoint_dir=aside[0].parent / "other")
    assert mistyped.resumed_blocks == 1


def _stop(i):
    raise KeyboardInterrupt


def test_a_finished_run_names_the_checkpoints_still_set_aside_beside_it(calib_set, tmp_path, capsys):
    """They hold another setting's blocks, kept for the run that made them, and take disk until
    deleted: the finished run says so once more, where the user looks last."""
    out = tmp_path / "run"
    ckpt = tmp_path / ".run.checkpoint"
    _interrupt_after_first_block(calib_set, CalibConfig(epochs=1), ckpt)  # settings A, stopped after block 0
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    capsys.readouterr()
    quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1, lr_let=5e-3), out=out, progress=True)  # B
    err = capsys.readouterr().err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".run.checkpoint.stale-")]
    assert len(aside) == 1 and not ckpt.exists()
    assert "1 checkpoint of other settings is still set aside beside this run" in err and str(aside[0]) in err
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), out=tmp_path / "run", progress=True)  # A again
    err = capsys.readouterr().err
    assert "taken back" in err and "still set aside" not in err  # A resumed from its blocks; nothing left aside
    assert not any(p.name.startswith(".run.checkpoint") for p in tmp_path.iterdir())


def test_a_resumed_run_keeps_the_training_logs_of_its_resumed_blocks(calib_set, tmp_path):
    cfg = CalibConfig(epochs=2, batch_size=3, measure_init_loss=True)
    _, _, full = _run(calib_set, cfg)
    _interrupt_after_first_block(calib_set, cfg, tmp_path)
    _, _, resumed = _run(calib_set, cfg, checkpoint_dir=tmp_path)
    first = resumed.layer_logs[0]
    assert first["resumed"] and "replay_seconds" in first and first["seconds"] > 0  # its training time kept
    for key in ("loss_init", "loss_first_epoch", "loss_last_epoch", "steps", "epochs", "q_mse"):
        assert first[key] == full.layer_logs[0][key], key


def test_a_lost_block_file_is_recomputed_not_fatal(calib_set, tmp_path):
    cfg = CalibConfig(epochs=1)
    with pytest.raises(KeyboardInterrupt):  # stopped after blocks 0 and 1
        _run(calib_set, cfg, checkpoint_dir=tmp_path, on_block_end=lambda i: None if i < 1 else _stop(i))
    (tmp_path / "block_0001.safetensors").unlink()
    _, _, resumed = _run(calib_set, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_blocks == 1


def test_calibrating_a_half_quantized_model_again_is_refused(calib_set, tmp_path):
    """The notebook pattern: Ctrl-C, run the cell again on the same model object. It is wrapped and
    partly folded, so calibrating it again would quantize twice and miss its own checkpoint."""
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    cfg = CalibConfig(epochs=1)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, tok, calib_set, "W4A8", cfg, checkpoint_dir=tmp_path, progress=False, on_block_end=_stop)
    with pytest.raises(QrealignError, match="already .partly. quantized"):
        calibrate(model, tok, calib_set, "W4A8", cfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "state.json").is_file()  # the checkpoint is still there for a fresh model
    # the commoner case: a second call on the model a finished call quantized in place (review 79)
    done, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    calibrate(done, tok, calib_set, "W4A8", CalibConfig(method="rtn"), progress=False)
    with pytest.raises(QrealignError, match="the result of an earlier call .finished or interrupted.*Load the FP "
                                            "model again for each call"):
        calibrate(done, tok, calib_set, "W8A8", CalibConfig(method="rtn"), progress=False)


def test_another_chat_template_does_not_resume(calib_set, tmp_path):
    """The blocks see tokens, not prompt text: the same prompts rendered by another template are
    another run."""
    cfg = CalibConfig(epochs=1)
    _interrupt_after_first_block(calib_set, cfg, tmp_path)
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    tok.chat_template = tok.chat_template.replace("{{", "says: {{", 1)
    result = calibrate(model, tok, calib_set, "W4A8", cfg, checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_blocks == 0


def test_a_chosen_checkpoint_dir_is_cleared_of_the_engines_files_only(calib_set, tmp_path):
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("keep me")
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), out=tmp_path / "run", progress=False,
             checkpoint_dir=ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]
    assert (tmp_path / "run" / "qrealign.json").is_file()
    for bad in (tmp_path / "run2", tmp_path / "run2" / "ck", tmp_path):
        model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
        with pytest.raises(QrealignError, match="separate folders"):
            quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), out=tmp_path / "run2",
                     progress=False, checkpoint_dir=bad)
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"batch_size": 0}, {"max_length": 0}, {"pad_to": 0},
                                 {"lr_let": -1e-3}, {"lr_round": float("nan")}, {"padding_side": "middle"},
                                 {"epoch_schedule": "paper", "epochs": 5}])
def test_calib_config_rejects_values_that_would_train_nothing_or_fail_late(bad):
    # epochs=-1 used to pass and calibrate nothing under the name "omniquant"; the others failed
    # only after the model had loaded (or deep in the tokenizer)
    with pytest.raises(QrealignError, match=next(iter(bad))):
        CalibConfig(**bad)
    assert CalibConfig(epochs=0, max_length=None).epochs == 0  # 0 epochs and no length limit are valid
    assert CalibConfig(epoch_schedule="paper", epochs=6).epochs_for(0, 30) == 1  # the paper's E-5, at least one


def test_autocast_setting_resolves_per_device_and_keys_the_run(calib_set):
    from qrealign.quant.scheme import get_scheme

    w4, w8 = get_scheme("W4A8"), get_scheme("W8A8")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert CalibConfig().resolve_autocast(w4, cuda) == "cuda"  # OmniQuant's mixed precision
    assert CalibConfig().resolve_autocast(w8, cuda) is None
    assert CalibConfig().resolve_autocast(w4, cpu) is None
    assert CalibConfig(autocast="off").resolve_autocast(w4, cuda) is None
    assert CalibConfig(autocast="bf16").resolve_autocast(w8, cpu) == "cpu"
    with pytest.raises(QrealignError, match="autocast"):
        CalibConfig(autocast="fp16")
    # the resolved choice is what keys a run: "auto" and "off" are the same run on a CPU
    prints = {a: _run(calib_set, CalibConfig(method="rtn", autocast=a), device="cpu")[2].fingerprint
              for a in ("auto", "off", "bf16")}
    assert prints["auto"] == prints["off"] != prints["bf16"]
    # the initial loss (and the init guard's comparison) is measured in the training's precision
    init = {a: _run(calib_set, CalibConfig(method="omniquant", epochs=0, autocast=a, measure_init_loss=True),
                    device="cpu")[2].layer_logs[0]["loss_init"] for a in ("off", "bf16")}
    assert init["off"] != init["bf16"] and init["bf16"] == pytest.approx(init["off"], rel=0.2)


@pytest.mark.parametrize("batch_size,padding_side", [(1, "left"), (8, "left"), (8, "right"), (3, "right")])
def test_losses_do_not_depend_on_batch_size_or_padding(calib_set, batch_size, padding_side):
    ref_cfg = CalibConfig(method="rtn", batch_size=1, padding_side="left", measure_init_loss=True)
    _, _, ref = _run(calib_set, ref_cfg)
    cfg = CalibConfig(method="rtn", batch_size=batch_size, padding_side=padding_side, measure_init_loss=True)
    _, _, got = _run(calib_set, cfg)
    for a, b in zip(ref.layer_logs, got.layer_logs):
        assert b["loss_init"] == pytest.approx(a["loss_init"], rel=1e-4)


@pytest.mark.parametrize("batch_size, padding_side", [(8, "left"), (8, "right"), (3, "right")])
def test_let_starting_scales_do_not_depend_on_batch_size_or_padding(calib_set, batch_size, padding_side):
    """The SmoothQuant start of LET reads each input channel's absmax; padding positions used to
    count (on SmolLM2 they held thousands of channels' maxima), so the start moved with the batch."""
    def let_start(bs, side):
        _, _, res = _run(calib_set, CalibConfig(epochs=0, batch_size=bs, padding_side=side, lwc=False))
        return {k: v for k, v in res.params.items() if ".let." in k}

    ref, got = let_start(1, "left"), let_start(batch_size, padding_side)
    assert ref and ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_non_finite_loss_stops_with_clear_message(calib_set, tmp_path):
    def bad_loss(inp):
        return inp.q_out.sum() * float("nan"), {}

    bad_loss.needs_fp = lambda labels, layer: torch.ones_like(labels, dtype=torch.bool)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at block 0"):
        _run(calib_set, CalibConfig(epochs=1), loss=bad_loss, checkpoint_dir=tmp_path)


def test_quantize_writes_run_that_rebuilds_same_model(calib_set, tmp_path):
    model, tok = tiny_model("qwen2", seed=3)
    model.config.qrealign_source = None
    out = tmp_path / "run"
    result = quantize(model, tok, calib_set, "W8A8", CalibConfig(epochs=1, batch_size=4), out=out, progress=False)
    meta = read_quantized_metadata(out)
    assert meta["kind"] == "quantized" and meta["scheme"]["name"] == "W8A8"
    assert meta["provenance"]["calibration"]["n"] == len(calib_set.prompts)
    assert not (tmp_path / ".run.checkpoint").exists()

    fresh, _ = tiny_model("qwen2", seed=3)
    apply_quant_params(fresh, meta["scheme"], result.params)
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, fresh(**ids).logits, atol=1e-5)
    assert any(isinstance(m, QuantLinear) and m.frozen for m in fresh.modules())
    text = fresh.generate(**ids, max_new_tokens=3, do_sample=False)
    assert text.shape[1] == ids["input_ids"].shape[1] + 3


def test_a_run_calibrated_on_a_bf16_model_reloads_with_the_weights_it_learned_and_exports(calib_set, tmp_path):
    """Calibration folds and freezes each block in float32 and casts back; the reload must do the
    same (it folded straight into bf16 weights, and a quarter of the codes came out different),
    and the reload and the export check the fingerprint in the dtype the run was calibrated in
    (the export loaded float32 and refused the run as another model's)."""
    from qrealign.export import export_compressed_tensors
    from qrealign.models import load_model

    model, tok = tiny_model("llama", seed=4, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"), dtype="bfloat16")
    quantize(model, tok, calib_set, "W8A8", CalibConfig(epochs=1, batch_size=4), out=tmp_path / "run", progress=False)
    assert read_quantized_metadata(tmp_path / "run")["model_dtype"] == "bfloat16"
    fresh, _, _ = load_quantized(tmp_path / "run", dtype="bfloat16")
    learned = {n: m.weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    rebuilt = {n: m.weight for n, m in fresh.named_modules() if isinstance(m, QuantLinear)}
    assert learned.keys() == rebuilt.keys() and learned
    assert all(rebuilt[n].dtype == torch.bfloat16 and torch.equal(learned[n], rebuilt[n]) for n in learned)
    export_compressed_tensors(tmp_path / "run", tmp_path / "export", progress=False)
    assert (tmp_path / "export" / "config.json").is_file()


def test_a_run_that_moved_with_its_base_model_still_loads_and_only_onto_that_model(calib_set, tmp_path):
    """A run records its base model by path; a folder holding both (the demo's stages) that is
    moved or copied whole must still load (the base is found from the run, as a relative path or
    a sibling), and the fingerprint still refuses another model in its place."""
    import shutil

    from qrealign.calibrate.artifact import run_source
    from qrealign.evaluate.overlap import collect_provenance
    from qrealign.models import load_model

    model, tok = tiny_model("llama", seed=4, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "a" / "base")
    tok.save_pretrained(tmp_path / "a" / "base")
    model, tok = load_model(str(tmp_path / "a" / "base"))
    quantize(model, tok, calib_set, "W8A8", CalibConfig(method="rtn"), out=tmp_path / "a" / "run", progress=False)
    meta = read_quantized_metadata(tmp_path / "a" / "run")
    assert meta["source_relative"] == "../base"
    (tmp_path / "a").rename(tmp_path / "b")
    moved, _, _ = load_quantized(tmp_path / "b" / "run")
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(moved(ids).logits, model(ids).logits)
    assert not [k for k in collect_provenance(tmp_path / "b" / "run") if k.startswith("unresolved:")]
    # a sibling of the recorded name, for runs written before the relative path was recorded
    del meta["source_relative"]
    assert run_source(meta, tmp_path / "b" / "run") == str((tmp_path / "b" / "base").resolve())
    assert run_source(meta) == meta["source"]  # no run directory: the recorded path as it is
    # a hub id is not a path: never swapped for a local folder of the same name
    assert run_source({**meta, "source": "some-org/base"}, tmp_path / "b" / "run") == "some-org/base"
    other, other_tok = tiny_model("llama", seed=5, num_hidden_layers=2)
    shutil.rmtree(tmp_path / "b" / "base")
    other.save_pretrained(tmp_path / "b" / "base")
    other_tok.save_pretrained(tmp_path / "b" / "base")
    with pytest.raises(IncompatibleArtifact, match="fingerprint mismatch"):
        load_quantized(tmp_path / "b" / "run")
    # no base at all: said that a run folder holds only its parameters (review 81)
    shutil.rmtree(tmp_path / "b" / "base")
    from qrealign.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist. A run folder holds only its quantization "
                                             "parameters: it needs the model it was calibrated on"):
        load_quantized(tmp_path / "b" / "run")


def test_static_activation_schemes_are_refused_before_calibrating(calib_set):
    from qrealign.quant.scheme import QuantArgs, Scheme

    static = Scheme("W8A8-static", QuantArgs(8, True, "channel"), QuantArgs(8, True, "tensor", None, False))
    model, tok = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(QrealignError, match="static activation ranges"):
        calibrate(model, tok, calib_set, static, CalibConfig(epochs=1), progress=False)


def test_bad_artifacts_fail_clearly(tmp_path):
    with pytest.raises(IncompatibleArtifact, match="not a qrealign quantization run"):
        load_quantized(tmp_path)
    model, _ = tiny_model("llama")
    params = {"layers.5.lwc.self_attn.q_proj.weight_quantizer.upbound_factor": torch.zeros(1)}
    with pytest.raises(IncompatibleArtifact, match="cover 6 layers"):
        apply_quant_params(model, "W8A8", params)


def test_bad_calibration_inputs():
    with pytest.raises(QrealignError):
        CalibrationSet([], [])
    with pytest.raises(QrealignError):
        CalibrationSet(["a"], [0, 1])
    with pytest.raises(QrealignError):
        CalibConfig(method="gptq")


def test_label_grouped_batches_and_fp_stream_skipped_for_probe_only_samples(calib_set):
    from qrealign.calibrate.data import make_batches
    from qrealign.calibrate.safety import SafetyLoss

    model, tok = tiny_model("llama", num_hidden_layers=3)
    batches = make_batches(tok, calib_set, 3, group_by_label=True)
    assert all(len(set(b.labels.tolist())) == 1 for b in batches)
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(len(calib_set.prompts)))

    seen = []
    loss = SafetyLoss(torch.randn(3, 64), torch.zeros(3))
    original = loss.__call__

    def spy(inp):
        seen.append((inp.fp_out is None, bool(inp.labels.all())))
        return original(inp)

    class Spy:
        needs_fp = loss.needs_fp
        __call__ = staticmethod(spy)

    result = calibrate(model, tok, calib_set, "W8A8", CalibConfig(epochs=1, batch_size=3), loss=Spy(), progress=False)
    # malicious-only batches never carry an FP target; benign ones always do
    assert seen and all(no_fp == all_malicious for no_fp, all_malicious in seen)
    assert all(log["loss_last_epoch"] is not None for log in result.layer_logs)


def test_init_guard_starts_from_the_better_of_smoothquant_and_identity(calib_set):
    _, _, guarded = _run(calib_set, CalibConfig(epochs=1, init_guard=True))
    _, _, plain = _run(calib_set, CalibConfig(epochs=1, init_guard=False, measure_init_loss=True))
    first = guarded.layer_logs[0]
    assert first["init"] in ("identity", "smoothquant")
    if first["init"] == "identity":
        assert first["loss_init"] < first["loss_init_smooth"] == pytest.approx(plain.layer_logs[0]["loss_init"])
    else:
        assert first["loss_init"] <= first["loss_init_identity"]
    assert "init" not in plain.layer_logs[0]


def test_learned_rounding_trains_snaps_to_steps_and_round_trips(calib_set, tmp_path):
    cfg = CalibConfig(epochs=3, batch_size=2, learn_rounding=True, lr_round=0.1)
    model, tok = tiny_model("llama", seed=1, num_hidden_layers=2)
    result = quantize(model, tok, calib_set, "W4A8", cfg, out=tmp_path / "run", progress=False)
    rounding = {k: v for k, v in result.params.items() if ".round." in k}
    assert len(rounding) == 2 * 7 and all(v.dtype == torch.int8 for v in rounding.values())
    steps = torch.cat([v.flatten() for v in rounding.values()])
    assert set(steps.unique().tolist()) <= {-1, 0, 1} and (steps != 0).any()
    assert all(0 < log["rounding_moved"] < 1 for log in result.layer_logs)

    from safetensors.torch import load_file

    fresh, _ = tiny_model("llama", seed=1, num_hidden_layers=2)
    apply_quant_params(fresh, "W4A8", load_file(str(tmp_path / "run" / "quant_params.safetensors")))
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, fresh(**ids).logits, atol=1e-5)
    # frozen weights hold the offsets: the models keep no weight-sized offset tensor per linear
    from qrealign.quant.qlinear import QuantLinear

    for m in (*model.modules(), *fresh.modules()):
        if isinstance(m, QuantLinear):
            assert m.frozen and m.weight_quantizer.rounding is None
            assert not any("rounding" in name for name, _ in m.named_parameters())


def test_learned_rounding_alone_beats_round_to_nearest(calib_set):
    _, _, rtn = _run(calib_set, CalibConfig(method="rtn"))
    cfg = CalibConfig(epochs=10, batch_size=2, let=False, lwc=False, learn_rounding=True, lr_round=0.02)
    _, _, rounded = _run(calib_set, cfg)
    assert rounded.layer_logs[-1]["q_mse"] < rtn.layer_logs[-1]["q_mse"]


def test_compile_quantizer_keys_the_run_only_when_on_and_learns_the_same_up_to_rounding(calib_set):
    base = CalibConfig(epochs=2, batch_size=3, learn_rounding=True, lr_round=0.1)
    on = replace(base, compile_quantizer=True)
    assert "compile_quantizer" not in base.to_dict()  # existing run keys stay what they were
    assert on.to_dict()["compile_quantizer"] is True
    _, _, eager = _run(calib_set, base)
    model, _, fused = _run(calib_set, on)
    assert eager.fingerprint != fused.fingerprint
    assert eager.params.keys() == fused.params.keys()
    for k, v in eager.params.items():
        if "rounding" in k:  # snapped steps in {-1, 0, 1}: a last-bit difference may flip a few
            assert (v != fused.params[k]).float().mean() < 0.02, k
        else:
            torch.testing.assert_close(v, fused.params[k], rtol=1e-3, atol=1e-5)
    assert not any(m.weight_quantizer.compiled or m.act_quantizer.compiled
                   for m in model.modules() if isinstance(m, QuantLinear))


def test_plain_epochs_apply_where_the_loss_has_no_safety_term(calib_set):
    from dataclasses import dataclass

    from qrealign.calibrate.losses import ReconstructionLoss

    @dataclass
    class LastBlockGate(ReconstructionLoss):  # the engine only asks where a safety term acts
        def active(self, layer: int) -> bool:
            return layer == 2

    cfg = CalibConfig(epochs=2, batch_size=3, plain_epochs=1)
    assert "plain_epochs" not in replace(cfg, plain_epochs=None).to_dict()  # existing run keys unchanged
    assert cfg.to_dict()["plain_epochs"] == 1 and replace(cfg, plain_epochs=0).to_dict()["plain_epochs"] == 0
    _, _, gated = _run(calib_set, cfg, loss=LastBlockGate())
    assert [log["epochs"] for log in gated.layer_logs] == [1, 1, 2]
    steps = [log["steps"] for log in gated.layer_logs]
    assert steps[0] == steps[1] == steps[2] // 2 > 0
    _, _, plain = _run(calib_set, cfg)  # reconstruction only: a safety term nowhere
    assert [log["epochs"] for log in plain.layer_logs] == [1, 1, 1]
    _, _, default = _run(calib_set, replace(cfg, plain_epochs=None), loss=LastBlockGate())
    assert [log["epochs"] for log in default.layer_logs] == [2, 2, 2]
    with pytest.raises(QrealignError, match="plain_epochs"):
        CalibConfig(plain_epochs=-1)


def test_two_runs_on_one_checkpoint_are_refused(calib_set, tmp_path):
    """The same command started twice would write each other's blocks; the second one stops at
    once, and the lock goes with the first run (a killed run leaves none behind)."""
    from qrealign.calibrate.checkpoints import checkpoint_lock

    with checkpoint_lock(tmp_path):
        model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
        with pytest.raises(QrealignError, match="another run is calibrating with the checkpoint"):
            calibrate(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), checkpoint_dir=tmp_path, progress=False)
    _, _, result = _run(calib_set, CalibConfig(epochs=1), checkpoint_dir=tmp_path)  # free again
    assert result.resumed_blocks == 0


def test_the_checkpoint_stays_locked_until_the_finished_run_is_saved_and_cleared(calib_set, tmp_path, monkeypatch):
    """quantize(out=...) saves the run and deletes its checkpoint under the same lock as the
    calibration: a second copy of the command started in between is refused, instead of replaying
    a checkpoint that is being deleted under it."""
    from qrealign.calibrate import api

    out, ckpt = tmp_path / "run", tmp_path / ".run.checkpoint"
    refused = []

    def save_while_another_starts(*args, **kwargs):
        model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
        with pytest.raises(QrealignError, match="another run is calibrating with the checkpoint") as exc:
            calibrate(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), checkpoint_dir=ckpt, progress=False)
        refused.append(exc.value)
        return save_quantized(*args, **kwargs)

    save_quantized = api.save_quantized
    monkeypatch.setattr(api, "save_quantized", save_while_another_starts)
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    api.quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1), out=out, progress=False)
    assert len(refused) == 1 and (out / "qrealign.json").is_file() and not ckpt.exists()


def test_a_checkpoint_records_the_code_of_the_runs_start(calib_set, tmp_path, monkeypatch):
    """The package edited on disk while blocks train: every checkpoint state still names the code
    read when the run started (the code that is running), so a resume never joins blocks of two
    versions under one digest."""
    import itertools
    import json

    from qrealign.calibrate import checkpoints

    versions = (f"code-{k}" for k in itertools.count())
    monkeypatch.setattr(checkpoints, "calibration_code", lambda: next(versions))

    def stop_after_second(i):
        if i == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _run(calib_set, CalibConfig(epochs=1), checkpoint_dir=ckpt, on_block_end=stop_after_second)
    state = json.loads((ckpt / checkpoints.CHECKPOINT_STATE).read_text())
    assert state["completed_blocks"] == 2 and state["code"] == "code-0"


def test_a_checkpoint_made_by_other_code_is_set_aside(calib_set, tmp_path, capsys):
    """The fingerprint holds the inputs, not the code: a block checkpoint records the digest of the
    calibration code, and a run of other code does not join its blocks (one without the record,
    from before it existed, still resumes)."""
    import json

    from qrealign.calibrate import checkpoints

    cfg, ckpt = CalibConfig(epochs=1), tmp_path / "ckpt"
    _interrupt_after_first_block(calib_set, cfg, ckpt)
    state = json.loads((ckpt / checkpoints.CHECKPOINT_STATE).read_text())
    assert state["code"] == checkpoints.calibration_code()
    (ckpt / checkpoints.CHECKPOINT_STATE).write_text(json.dumps({**state, "code": "0" * 16}))
    capsys.readouterr()
    _, _, run = _run(calib_set, cfg, checkpoint_dir=ckpt, progress=True)
    assert run.resumed_blocks == 0 and "made by other code" in capsys.readouterr().err
    aside = checkpoints.stale_dir(ckpt, state["fingerprint"], "0" * 16)
    assert aside.name.startswith("ckpt.stale-") and (aside / checkpoints.CHECKPOINT_STATE).is_file()

    ckpt = tmp_path / "older"
    _interrupt_after_first_block(calib_set, cfg, ckpt)
    state = json.loads((ckpt / checkpoints.CHECKPOINT_STATE).read_text())
    del state["code"]
    (ckpt / checkpoints.CHECKPOINT_STATE).write_text(json.dumps(state))
    _, _, run = _run(calib_set, cfg, checkpoint_dir=ckpt)
    assert run.resumed_blocks == 1


def test_lr_factor_cosine_runs_from_one_to_zero():
    from qrealign.calibrate.train import lr_factor

    assert [lr_factor(None, t, 10) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 2, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(QrealignError, match="lr_schedule must be"):
        CalibConfig(lr_schedule="linear")


def test_cosine_schedule_sets_each_steps_learning_rate_and_keys_the_run(calib_set, monkeypatch):
    """Every optimiser step runs at base rate x lr_factor(step, the optimisation's steps), per
    block; the constant default keeps existing run keys."""
    from qrealign.calibrate.train import lr_factor

    base = CalibConfig(epochs=2, batch_size=3, learn_rounding=True)
    cosine = replace(base, lr_schedule="cosine")
    assert "lr_schedule" not in base.to_dict() and cosine.to_dict()["lr_schedule"] == "cosine"
    seen = []
    original = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _, _, run = _run(calib_set, cosine)
    steps = [log["steps"] for log in run.layer_logs]
    assert len(seen) == sum(steps) and steps[0] > 2
    bases = (cosine.lr_let, cosine.lr_lwc, cosine.lr_round)
    at = 0
    for total in steps:
        for t in range(total):
            assert seen[at + t] == pytest.approx([b * lr_factor("cosine", t, total) for b in bases])
        at += total
    seen.clear()
    _, _, const = _run(calib_set, base)
    assert all(lrs == list(bases) for lrs in seen) and const.fingerprint != run.fingerprint


@pytest.mark.parametrize("model_type", ["gemma2", "llama"])
def test_folded_gemma_norms_stay_float32_after_calibration_and_reload(calib_set, tmp_path, model_type):
    """Review 67, through the real paths: the engine puts each block back in bf16 and the reload
    folds and casts the same way; Gemma's LET-folded (1 + w) norms stay float32 and equal in both,
    other norms follow the model's dtype."""
    from qrealign.models import load_model
    from qrealign.models.registry import get_arch, get_blocks

    model, tok = tiny_model(model_type, seed=4, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"), dtype="bfloat16")
    quantize(model, tok, calib_set, "W8A8", CalibConfig(epochs=1, batch_size=4), out=tmp_path / "run", progress=False)
    fresh, _, _ = load_quantized(tmp_path / "run", dtype="bfloat16")
    spec = get_arch(model)
    want = torch.float32 if spec.norm_offset else torch.bfloat16
    for m in (model, fresh):
        for block in get_blocks(m):
            for pair in spec.smooth_pairs:
                assert block.get_submodule(pair.smooth).weight.dtype == want
            assert block.get_submodule(spec.linears[0]).weight.dtype == torch.bfloat16
    for a, b in zip(get_blocks(model), get_blocks(fresh)):
        for pair in spec.smooth_pairs:
            assert torch.equal(a.get_submodule(pair.smooth).weight, b.get_submodule(pair.smooth).weight)
    ids = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(fresh(**ids).logits).all()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "llama", "qwen2"])
def test_a_bf16_model_calibrates_whatever_its_norm_returns(calib_set, model_type):
    """Blocks compute in float32; Gemma's norm returns its input's dtype, so a bf16 model's block-0
    input fed bf16 into a float32 linear ("expected m1 and m2 to have the same dtype")."""
    model, tok = tiny_model(model_type, dtype=torch.bfloat16)
    result = calibrate(model, tok, calib_set, "W8A8", CalibConfig(epochs=1), progress=False)
    assert result.params and all(math.isfinite(v) for log in result.layer_logs for k, v in log.items()
                                 if k.startswith("loss") and isinstance(v, float))
    assert next(model.parameters()).dtype == torch.bfloat16  # blocks go back to the model's dtype


@pytest.mark.parametrize("pairs, message", [("qkv", "not the string 'qkv'"), (("qkv", "fc2"), r"unknown LET pairs \['fc2'\]")])
def test_let_pairs_that_would_switch_smoothing_off_in_silence_are_refused(pairs, message):
    with pytest.raises(QrealignError, match=message):
        CalibConfig(let_pairs=pairs)
    assert CalibConfig(let_pairs=["qkv", "out"]).let_pairs == ("qkv", "out")


def test_a_run_that_fails_before_its_first_block_leaves_no_checkpoint_folder(calib_set, tmp_path, monkeypatch):
    # a pre-flight failure (here the compiler check) left `.<out>.checkpoint/.lock` behind (review 79);
    # a folder the run did not create, or one holding a finished block, stays
    import qrealign.calibrate.engine as engine

    def no_compiler(device, demo=False):
        raise QrealignError("no compiler (stand-in)")
    monkeypatch.setattr(engine, "check_compiler", no_compiler)
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    with pytest.raises(QrealignError, match="stand-in"):
        quantize(model, tok, calib_set, "W4A8", CalibConfig(epochs=1, compile_quantizer=True), out=tmp_path / "run",
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(QrealignError, match="stand-in"):
        calibrate(model, tok, calib_set, "W4A8", CalibConfig(epochs=1, compile_quantizer=True), checkpoint_dir=mine,
                  progress=False)
    assert mine.is_dir()


def test_a_model_loaded_with_plain_transformers_gives_a_loadable_run(calib_set, tmp_path):
    # review 81: only qrealign.load_model recorded where the weights came from, so a run of a model
    # loaded with AutoModelForCausalLM could not be loaded back, and nothing said so when it was written
    import warnings

    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quantize(loaded, tok, calib_set, "W8A8", CalibConfig(method="rtn"), out=tmp_path / "run", progress=False)
    rebuilt, _, meta = load_quantized(tmp_path / "run")
    assert meta["source"] == str((tmp_path / "base").resolve())
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(rebuilt(**ids).logits, loaded(**ids).logits)
    # a folder qrealign's fine-tuning wrote (its config.json says "qrealign_source": null) loads the same way
    # (review 82), while the fine-tuned model in memory records nothing: it is other weights than its folder's
    from qrealign.finetune.sft import _clear_source_stamp

    _clear_source_stamp(loaded)
    loaded.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    from qrealign.calibrate.api import model_source

    assert model_source(loaded) == (None, None)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert reread.config.qrealign_source is None and model_source(reread)[0] == str((tmp_path / "tuned").resolve())
    assert model_source(type("M", (), {"config": type("C", (), {"_name_or_path": "org/model"})()})()) == \
        ("org/model", None)  # a hub id transformers loaded
    # a model built in memory: the run is written, and said up front not to be loadable
    memory, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    with pytest.warns(UserWarning, match="records no folder it was loaded from"):
        quantize(memory, tok, calib_set, "W8A8", CalibConfig(method="rtn"), out=tmp_path / "mem", progress=False)


def test_a_calibration_that_is_not_a_calibration_set_is_said(calib_set):
    # review 81: None or a list of strings gave "'NoneType' object has no attribute 'prompts'"
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    for bad in (None, ["hello"]):
        with pytest.raises(QrealignError, match="calibration must be a CalibrationSet .*build_calibration"):
            quantize(model, tok, bad, "W8A8", CalibConfig(method="rtn"), progress=False)
