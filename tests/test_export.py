"""compressed-tensors export: the checkpoint decodes to the calibrated model, loads back through
transformers / load_model, and every inexpressible or broken input fails with nothing written.

Tolerances (float32 exports, tiny llama, logits of magnitude ~1): through `load_model` (dequantized
weights + the engines' per-token activation rule) every scheme reproduces the calibrated fake-quant
model, max |d logit| <= 1e-4 (measured 0.0). transformers' own compressed-tensors route differs for
symmetric activations (absmax/127.5): < 0.05 here, and <= 1e-4 once that rule is put into the
reference. bfloat16 exports: < 0.05.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from qrealign.calibrate.artifact import PARAMS_FILE, load_quantized
from qrealign.calibrate.engine import CalibConfig
from qrealign.errors import IncompatibleArtifact, QrealignError
from qrealign.export import ExportError, export_compressed_tensors, plan_export
from qrealign.quant.scheme import QuantArgs, Scheme, get_scheme

PROMPTS = ["bake bread", "a cat joke", "2+2?", "rain poem"]  # byte-level tokens: short keeps calibration fast
EVAL_PROMPTS = ["hello world how are you", "what", "tell me a story about a dragon and a knight"]
EXACT = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny quantization runs, built on demand: runs(scheme, method="omniquant") -> run dir."""
    from qrealign.calibrate.api import quantize
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.models import load_model
    from qrealign.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("export")
    fp = root / "fp"
    model, tok = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)  # group 128 tiles
    model.save_pretrained(fp)
    tok.save_pretrained(fp)
    cache = {}

    def make(scheme: str, method: str = "omniquant", rounding: bool = False):
        if (scheme, method, rounding) not in cache:
            m, t = load_model(fp)
            out = root / f"{scheme}-{method}{'-round' if rounding else ''}"
            cfg = CalibConfig(method=method, epochs=1, learn_rounding=rounding, lr_round=0.2)
            quantize(m, t, CalibrationSet(PROMPTS, [0, 1, 0, 1]), scheme, cfg, out=out, progress=False)
            cache[scheme, method, rounding] = out
        return cache[scheme, method, rounding]

    return make


def _logits(model, tokenizer, prompts=EVAL_PROMPTS):
    from qrealign.models.chat import encode_prompts

    enc = encode_prompts(tokenizer, prompts)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    return logits[enc.attention_mask.bool()]


def _quantized_linears(model):
    from qrealign.quant.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, (nn.Linear, QuantLinear))}


def _symmetric_act_scale_like_compressed_tensors(monkeypatch):
    """Swap the reference's symmetric activation rule absmax/127 for compressed-tensors' absmax/127.5."""
    from qrealign.quant import quantizer

    original = quantizer.qparams

    def qparams(xmin, xmax, args):
        scale, zero = original(xmin, xmax, args)
        if args.symmetric:
            absmax = torch.maximum(xmax.abs(), xmin.abs())
            scale = (absmax / ((args.qmax - args.qmin) / 2)).clamp(quantizer.SCALE_MIN, quantizer.SCALE_MAX)
        return scale, zero

    monkeypatch.setattr(quantizer, "qparams", qparams)


@pytest.mark.parametrize("scheme,rounding", [("W8A8", False), ("W8A8-sym", False), ("W4A16", False),
                                             ("W4A16-sym", False), ("W8A8", True), ("W4A16-g128", True)])
def test_float32_export_reloads_to_the_calibrated_model(runs, scheme, rounding, tmp_path):
    from qrealign.models import load_model

    run = runs(scheme, rounding=rounding)
    if rounding:  # the export must carry learned steps, not only round-to-nearest
        from safetensors.torch import load_file

        steps = [v for k, v in load_file(str(run / "quant_params.safetensors")).items() if ".round." in k]
        assert steps and any(bool((v != 0).any()) for v in steps)
    out = tmp_path / "export"
    result = export_compressed_tensors(run, out, dtype="float32", progress=False)
    assert result.plan.matches_calibration and result.plan.deviations == ()

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert [k for k in config if k.startswith("qrealign")] == ["qrealign_export"]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["format"] == ("int-quantized" if "A8" in scheme else "pack-quantized")
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] == scheme.endswith("-sym")
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md", "qrealign.json"):
        assert (out / name).is_file(), name

    ref, tok, _ = load_quantized(run)
    model, _ = load_model(out)
    got = _logits(model, tok)
    ref_linears, got_linears = _quantized_linears(ref), _quantized_linears(model)
    assert sorted(ref_linears) == sorted(got_linears) and len(got_linears) == 14  # standard names, 2 x 7
    assert all(type(m) is nn.Linear for m in got_linears.values())
    for name, linear in got_linears.items():  # the checkpoint decodes to the frozen fake-quant weights
        assert torch.allclose(linear.weight.float(), ref_linears[name].weight, rtol=0, atol=1e-7), name
    assert (got - _logits(ref, tok)).abs().max() <= EXACT


def test_transformers_own_route_runs_the_reference_activation_rule(runs, tmp_path, monkeypatch):
    """Plain `from_pretrained` (no qrealign) runs compressed-tensors' reference forward: for
    symmetric activations that is absmax/127.5, which is why load_model attaches the engine rule."""
    from transformers import AutoModelForCausalLM

    run = runs("W8A8-sym")
    out = tmp_path / "export"
    export_compressed_tensors(run, out, dtype="float32", progress=False)
    ref, tok, _ = load_quantized(run)
    plain = AutoModelForCausalLM.from_pretrained(out)
    got = _logits(plain, tok)
    assert 1e-3 < (got - _logits(ref, tok)).abs().max() < 0.05
    _symmetric_act_scale_like_compressed_tensors(monkeypatch)
    assert (got - _logits(ref, tok)).abs().max() <= EXACT


def test_bfloat16_export_is_smaller_and_stays_close(runs, tmp_path):
    from safetensors import safe_open

    from qrealign.models import load_model

    run = runs("W4A16")
    out16 = tmp_path / "bf16"
    r16 = export_compressed_tensors(run, out16, progress=False)
    assert r16.plan.dtype == "bfloat16" and any("bfloat16" in d for d in r16.plan.deviations)
    # 4-bit linears (+ 1/64 of that in scales and zero points) and a bf16 rest, vs an fp32 source
    assert r16.sizes["export_bytes"] < 0.35 * r16.sizes["source_bytes"]
    assert r16.sizes["ratio_vs_source"] == pytest.approx(r16.sizes["export_bytes"] / r16.sizes["source_bytes"], abs=1e-4)
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (256, 128 // 8)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_zero_point").dtype == torch.int32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ref, tok, _ = load_quantized(run)
    model, _ = load_model(out16)
    assert (_logits(model, tok) - _logits(ref, tok)).abs().max() < 0.05


def test_symmetric_weights_reexpress_an_asymmetric_run_and_say_so(runs, tmp_path):
    from safetensors import safe_open

    from qrealign.models import load_model

    run = runs("W8A8")
    out = tmp_path / "sym"
    result = export_compressed_tensors(run, out, dtype="float32", symmetric_weights=True, progress=False)
    assert not result.plan.matches_calibration
    assert any("re-quantized symmetric" in d for d in result.plan.deviations)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["symmetric"] is True and group["input_activations"]["symmetric"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("weight_zero_point")]
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
    assert "re-quantized symmetric" in (out / "README.md").read_text()
    ref, tok, _ = load_quantized(run)
    model, _ = load_model(out)
    diff = (_logits(model, tok) - _logits(ref, tok)).abs().max()
    assert 0 < diff < 0.1  # a different grid, close to the calibrated one


def test_symmetric_weights_say_that_learned_rounding_is_dropped(runs, tmp_path):
    """The rounding offsets choose floor or ceil on the calibrated grid; re-quantizing on the
    symmetric grid cannot keep them, and the export says so where the user reads (review 69). A
    same-grid export keeps them in its codes, and its card says that."""
    run = runs("W8A8", rounding=True)
    result = export_compressed_tensors(run, tmp_path / "sym", dtype="float32", symmetric_weights=True,
                                       progress=False)
    assert any("learned rounding discarded" in d for d in result.plan.deviations)
    card = (tmp_path / "sym" / "README.md").read_text()
    assert "learned rounding discarded" in card and "is in the integer codes" not in card
    kept = export_compressed_tensors(run, tmp_path / "same", dtype="float32", progress=False)
    assert not any("rounding" in d for d in kept.plan.deviations)
    assert "learned rounding (floor or ceil, chosen per weight) is in the integer codes" in \
        (tmp_path / "same" / "README.md").read_text()
    plain = export_compressed_tensors(runs("W8A8"), tmp_path / "plain", dtype="float32", symmetric_weights=True,
                                      progress=False)  # nothing learned to drop: no such line
    assert not any("rounding" in d for d in plain.plan.deviations)


def test_without_the_library_export_and_load_fail_clearly_before_any_work(runs, tmp_path, monkeypatch, capsys):
    """compressed-tensors is an optional extra: `qrealign export` used to load the model and compute
    every code, then end in a ModuleNotFoundError traceback; loading an export, in an ImportError."""
    import sys

    import qrealign.export.compressed as compressed
    from qrealign.cli import main
    from qrealign.errors import ModelLoadError
    from qrealign.models import load_model

    run = runs("W8A8-sym")
    export = tmp_path / "export"
    export_compressed_tensors(run, export, progress=False)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if not installed
    monkeypatch.setattr(compressed, "load_run_source", lambda *a, **k: pytest.fail("loaded before the check"))
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "pip install 'qrealign[export]', or in a checkout pip install -e '.[export]'" in capsys.readouterr().err
    _no_output(out)
    with pytest.raises(ModelLoadError, match=r"compressed-tensors checkpoint\): the compressed-tensors library"):
        load_model(export)


def test_plan_refuses_what_compressed_tensors_engines_cannot_run():
    for spec, match in [("W4A4", "4-bit activations"), ("W4A8", "W4A8"), ("W16A8", "no weights"),
                        ("W8A8-g128-sym", "per-channel weight scales")]:
        with pytest.raises(ExportError, match=match):
            plan_export(get_scheme(spec))
    static = Scheme("W8A8-static", QuantArgs(8, True, "channel"), QuantArgs(8, True, "tensor", None, False))
    with pytest.raises(ExportError, match="static"):
        plan_export(static)
    assert plan_export(get_scheme("W8A16")).ct_format == "pack-quantized"
    with pytest.raises(ExportError, match="weight-only: there are no activations"):  # not ignored in silence
        plan_export(get_scheme("W4A16"), symmetric_activations=True)
    assert plan_export(get_scheme("W8A8"), symmetric_activations=True).activations.symmetric
    assert plan_export(get_scheme("W8A8-sym"), dtype="float32").matches_calibration
    # a switch that would change nothing is said, not ignored (review 79)
    with pytest.raises(ExportError, match="symmetric weights already: there is nothing to re-quantize"):
        plan_export(get_scheme("W8A8-sym"), symmetric_weights=True)
    with pytest.raises(ExportError, match="symmetric activations already"):
        plan_export(get_scheme("W8A8-sym"), symmetric_activations=True)
    assert "may be refused" in plan_export(get_scheme("W4A16-g16-sym")).runtimes["vllm"]
    assert "may be refused" not in plan_export(get_scheme("W4A16-sym")).runtimes["vllm"]


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


def test_w4a4_run_fails_clearly_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "w4a4"
    with pytest.raises(ExportError, match="4-bit activations"):
        export_compressed_tensors(runs("W4A4", "rtn"), out, progress=False)
    _no_output(out)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_params_fail_clearly(runs, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(runs("W8A8-sym"), run)
    if damage == "missing":
        (run / PARAMS_FILE).unlink()
    else:
        (run / PARAMS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not safetensors")
    out = tmp_path / "out"
    with pytest.raises(IncompatibleArtifact, match=damage):
        export_compressed_tensors(run, out, progress=False)
    _no_output(out)


def test_export_in_memory_that_cannot_fit_is_refused_before_loading(runs, tmp_path, monkeypatch):
    import qrealign.export.compressed as compressed

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    run = runs("W8A8-sym")
    monkeypatch.setattr(compressed, "load_run_source", no_load)
    monkeypatch.setattr(compressed, "available_memory", lambda: 1 << 20)  # 1 MiB free
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"float32, about 0\.0 GiB at its peak, and 0\.0 GiB of RAM .* --offload disk"):
        export_compressed_tensors(run, out, progress=False)
    _no_output(out)
    monkeypatch.setattr(compressed, "available_memory", lambda: None)  # unknown: no refusal on a guess
    with pytest.raises(AssertionError, match="loaded before"):
        export_compressed_tensors(run, out, progress=False)


def test_the_in_memory_check_counts_learned_rounding_offsets(runs, monkeypatch):
    """review 74: with learned rounding every quantized linear holds its offsets until its codes
    are computed (one int8 per weight); a check that counted the weights only passed exports the
    kernel could then kill."""
    import qrealign.export.compressed as compressed
    from qrealign.calibrate.artifact import read_quantized_metadata, run_source
    from qrealign.models.load import load_skeleton
    from qrealign.models.registry import get_blocks

    run = runs("W8A8-sym")
    source = run_source(read_quantized_metadata(run), run)
    skeleton = load_skeleton(source)
    weights = int(compressed.PEAK_OVER_WEIGHTS * 4 * sum(p.numel() for p in skeleton.parameters()))  # at the peak
    offsets = sum(m.weight.numel() for b in get_blocks(skeleton) for m in b.modules()
                  if isinstance(m, torch.nn.Linear))  # one int8 each
    monkeypatch.setattr(compressed, "available_memory", lambda: weights + offsets // 2)
    compressed._check_memory(source)  # the weights alone fit
    monkeypatch.setattr(compressed, "available_memory", lambda: weights - 1)  # review 85: the float32 size is not
    with pytest.raises(ExportError, match="at its peak"):                     # the peak
        compressed._check_memory(source)
    monkeypatch.setattr(compressed, "available_memory", lambda: weights + offsets // 2)
    with pytest.raises(ExportError, match=r"in float32 \(and learned rounding's int8 offsets\)"):
        compressed._check_memory(source, rounding=True)


def test_group_size_that_does_not_divide_fails_before_writing(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs("W4A16-sym"), run)
    meta = json.loads((run / "qrealign.json").read_text())
    meta["scheme"]["weights"]["group_size"] = 96  # 128 inputs are not a whole number of groups
    (run / "qrealign.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="does not divide"):
        export_compressed_tensors(run, out, progress=False)
    _no_output(out)


def test_failure_while_writing_leaves_no_directory(runs, tmp_path, monkeypatch):
    from qrealign.export import card

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "render_card", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export_compressed_tensors(runs("W8A8-sym"), out, progress=False)
    _no_output(out)


def test_export_never_replaces_a_directory_that_is_not_an_export(runs, tmp_path):
    run = runs("W8A8-sym")
    with pytest.raises(ExportError, match="not a qrealign export"):
        export_compressed_tensors(run, run, progress=False)
    assert (run / PARAMS_FILE).is_file()
    with pytest.raises(ExportError, match="not a qrealign export"):
        export_compressed_tensors(run, run.parent, progress=False)
    out = tmp_path / "out"
    export_compressed_tensors(run, out, progress=False, dtype="float32")
    export_compressed_tensors(run, out, progress=False)  # an earlier export is replaced
    assert json.loads((out / "config.json").read_text())["qrealign_export"]["dtype"] == "bfloat16"


def test_a_same_sign_row_exports_with_its_zero_point_among_the_codes():
    """A row that never reaches 0 used to get a zero point outside the int8 codes, which export had
    to refuse; its range now holds 0 (review 67), as compressed-tensors' observers make it."""
    from qrealign.export.codes import linear_codes
    from qrealign.quant.qlinear import QuantLinear

    scheme = get_scheme("W8A16")  # asymmetric per-channel int8 weights
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-1.0, 0.0, 0.5, 3.0], [-2.0, -1.0, 1.0, 0.25]]))
    q = QuantLinear(linear, scheme, lwc=False)
    codes = linear_codes("ok", q, scheme.weights)
    # row 0: range [-1, 3] -> scale 4/255, zero round(255/4) = 64 -> signed zero point 64 - 128 = -64
    assert codes.scale[0, 0].item() == pytest.approx(4 / 255)
    assert codes.zero_point[:, 0].tolist() == [-64, round(2 / (3 / 255)) - 128]
    assert torch.equal(codes.dequantized, q.weight_quantizer(q.weight))
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[1.0, 1.5, 2.0, 3.0], [-2.0, -1.0, 1.0, 0.25]]))  # row 0 never reaches 0
    codes = linear_codes("same sign", q, scheme.weights)
    assert codes.zero_point[0, 0].item() == -128 and codes.scale[0, 0].item() == pytest.approx(3 / 255)
    assert torch.equal(codes.dequantized, q.weight_quantizer(q.weight))


def test_cli_export_card_and_eval_loading(runs, tmp_path, capsys):
    from qrealign.cli import main
    from qrealign.evaluate.runner import load_for_eval

    out = tmp_path / "cli"
    table = tmp_path / "table.md"
    table.write_text("| model | HS |\n|---|---|\n| fp | 40.0 |\n| export | 12.0 |\n")
    assert main(["export", str(runs("W8A8-sym")), "--format", "compressed-tensors", "--out", str(out),
                 "--card-table", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "int-quantized" in printed and "x bf16" in printed
    card = (out / "README.md").read_text()
    assert "split `custom`, n = 4" in card and "| export | 12.0 |" in card and "W8A8-sym" in card
    # the files meant to travel name a local source by its directory's name, not the user's path
    assert "- source model: `fp (local)`" in card
    assert str(tmp_path.parent) not in card and str(tmp_path.parent) not in (out / "config.json").read_text()
    model, tok, provenance, desc = load_for_eval(str(out))
    assert desc["kind"] == "export" and provenance["calibration"]["n"] == 4  # integer weights, not FP
    assert model.config.model_type == "llama"
    capsys.readouterr()  # loading prints compressed-tensors progress bars
    # in Python a Path names the file, as the CLI's --card-table does; a str is the Markdown itself (review 81)
    from qrealign.export import export_compressed_tensors

    export_compressed_tensors(runs("W8A8-sym"), tmp_path / "api", card_table=table)
    assert "| export | 12.0 |" in (tmp_path / "api" / "README.md").read_text()
    export_compressed_tensors(runs("W8A8-sym"), tmp_path / "api", card_table="| row | 1.0 |")
    assert "| row | 1.0 |" in (tmp_path / "api" / "README.md").read_text()
    capsys.readouterr()  # their progress bars

    assert main(["export", str(runs("W4A4", "rtn")), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrealign: error:") and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_only_reproducible_compressed_tensors_schemes_take_the_engine_route(tmp_path):
    from qrealign.export.runtime import CompressedTensorsCheckpoint

    def detect(qc):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
        return CompressedTensorsCheckpoint.detect(tmp_path)

    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    a = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}
    base = {"quant_method": "compressed-tensors", "ignore": ["lm_head"]}
    got = detect({**base, "config_groups": {"g": {"targets": ["Linear"], "weights": w, "input_activations": a}}})
    assert got.activations == QuantArgs(8, False, "token", None, True) and got.ignore == ("lm_head",)
    assert detect({**base, "config_groups": {"g": {"targets": ["Linear"], "weights": w}}}).activations is None
    fp8 = {**a, "type": "float", "symmetric": True}
    static = {**a, "dynamic": False, "strategy": "tensor"}
    for acts in (fp8, static):  # left to transformers' own compressed-tensors route
        assert detect({**base, "config_groups": {"g": {"targets": ["Linear"], "weights": w, "input_activations": acts}}}) is None
    assert detect({"quant_method": "gptq"}) is None and detect(None) is None
    # a bf16 checkpoint's weights are dequantized in bf16: said, not hidden; float32 loads exactly
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16", "quantization_config":
                                                      {**base, "config_groups": {"g": {"targets": ["Linear"], "weights": w}}}}))
    assert CompressedTensorsCheckpoint.detect(tmp_path).dtype == "bfloat16"
    assert "bfloat16" in CompressedTensorsCheckpoint(None, ("Linear",), (), "bfloat16").dequantize_warning()
    assert CompressedTensorsCheckpoint(None, ("Linear",), (), "float32").dequantize_warning() is None

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert CompressedTensorsCheckpoint(QuantArgs(8, True, "token", None, True), ("Linear",), ("1",)).attach(model) == 1
    x = torch.tensor([[0.5, -1.0, 0.25, 2.0]])
    with torch.no_grad():
        xq = torch.round(x / (2.0 / 127)) * (2.0 / 127)  # absmax/127 per token, as vLLM
        assert not torch.allclose(x, xq, atol=1e-3)
        assert torch.allclose(model[0](x), nn.functional.linear(xq, model[0].weight, model[0].bias), atol=1e-6)
        assert torch.equal(model[1](x), nn.functional.linear(x, model[1].weight, model[1].bias))  # ignored


def test_engine_route_matches_targets_and_ignore_as_compressed_tensors_does(tmp_path):
    from compressed_tensors.utils.match import is_match

    from qrealign.export.runtime import CompressedTensorsCheckpoint

    def tree():
        attn = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "o_proj": nn.Linear(4, 4)})
        mlp = nn.ModuleDict({"up_proj": nn.Linear(4, 4)})
        layer = nn.ModuleDict({"self_attn": attn, "mlp": mlp})
        return nn.ModuleDict({"layers": nn.ModuleList([layer, copy.deepcopy(layer)]), "lm_head": nn.Linear(4, 4)})

    acts = QuantArgs(8, True, "token", None, True)
    cases = [(("Linear",), ("lm_head", "re:.*self_attn")),  # an ignore prefix pattern: the engines skip q_proj
             (("re:.*up_proj$",), ()),                      # a pattern target
             (("layers.1.self_attn.o_proj",), ()),          # a module-name target
             (("Linear",), ("re:layers.0",))]               # a prefix: layer 0 left in full precision
    for targets, ignore in cases:
        model = tree()
        count = CompressedTensorsCheckpoint(acts, targets, ignore).attach(model)
        hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks}
        expected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_match(n, m, targets, ignore)}
        assert hooked == expected and count == len(expected) > 0, (targets, ignore, hooked)
    model = tree()
    CompressedTensorsCheckpoint(acts, ("Linear",), ("lm_head", "re:.*self_attn")).attach(model)
    assert not model["layers"][0]["self_attn"]["q_proj"]._forward_pre_hooks
    assert model["layers"][0]["mlp"]["up_proj"]._forward_pre_hooks

    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    a = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    qc = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["re:.*proj$"], "weights": w,
                                                                        "input_activations": a}}}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    assert CompressedTensorsCheckpoint.detect(tmp_path).targets == ("re:.*proj$",)
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {**qc, "kv_cache_scheme": kv}}))
    assert CompressedTensorsCheckpoint.detect(tmp_path) is None  # a quantized KV cache: transformers' own route


def test_norm_storage_check_warns_where_a_folded_offset_norm_loses_its_multiplier():
    """Gemma's (1 + w) norm with a large smoothing scale folded in stores a value near -1; bf16
    keeps little of the multiplier left over, and the export says so. A Llama-style norm storing
    w / s keeps its multiplier to bf16's precision."""
    import warnings

    from qrealign.export.compressed import check_norm_storage
    from qrealign.models.tiny import tiny_model

    torch.manual_seed(0)
    gemma, _ = tiny_model("gemma2")
    llama, _ = tiny_model("llama")
    for model, offset in ((gemma, 1.0), (llama, 0.0)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # the fold of a scale of ~20 into a multiplier of ~1
                    p.copy_((1.0 + 0.1 * torch.randn_like(p)) / 20 - offset)
    with pytest.warns(UserWarning, match="dtype float32"):
        worst_gemma = check_norm_storage(gemma, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        worst_llama = check_norm_storage(llama, torch.bfloat16)
        assert check_norm_storage(gemma, torch.float32) == 0.0
    assert worst_gemma > 0.02 and worst_llama < 0.005  # 4.6 % and 0.4 % here


def test_export_config_and_tokenizer_carry_the_keys_transformers_4_reads(runs, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from qrealign.utils import read_json

    run = runs("W8A8")
    out = tmp_path / "exp"
    export_compressed_tensors(run, out, progress=False)
    source = read_json(run / "qrealign.json")["source"]
    config = read_json(out / "config.json")
    assert config["rope_theta"] == AutoConfig.from_pretrained(source).rope_parameters["rope_theta"]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(source).rope_parameters
    tok_config = read_json(out / "tokenizer_config.json")
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tok_config
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source)
    text = "hello <pad> world"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.all_special_tokens == theirs.all_special_tokens and ours.padding_side == theirs.padding_side


def test_a_hub_compressed_tensors_checkpoint_takes_the_engine_route_too(tmp_path):
    """The same files give the same evaluation wherever they are stored: a hub config is read for
    its activation scheme as a local config.json is."""
    from transformers import LlamaConfig

    from qrealign.models.load import ModelSource, _compressed_checkpoint

    qc = {"quant_method": "compressed-tensors", "ignore": ["lm_head"], "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}}}}
    config = LlamaConfig(quantization_config=qc, dtype="bfloat16")
    hub = _compressed_checkpoint(ModelSource("hub", "org/model-W8A8", name="org/model-W8A8"), config)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    local = _compressed_checkpoint(ModelSource("dir", str(tmp_path), name="x"))
    assert hub is not None and hub == local and hub.activations.num_bits == 8 and hub.dtype == "bfloat16"
    plain = LlamaConfig()
    assert _compressed_checkpoint(ModelSource("hub", "org/plain", name="org/plain"), plain) is None


def test_a_run_moved_with_its_base_still_exports(tmp_path):
    """A demo output folder renamed as a whole: the run's recorded base path is gone, and the
    export finds the base beside the run (as loading the run does) instead of failing."""
    from qrealign.calibrate.api import quantize
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.models import load_model
    from qrealign.models.tiny import tiny_model

    before = tmp_path / "before"
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(before / "fp")
    tok.save_pretrained(before / "fp")
    m, t = load_model(str(before / "fp"))
    quantize(m, t, CalibrationSet(PROMPTS, [0, 1, 0, 1]), "W8A8", CalibConfig(method="rtn"), out=before / "run",
             progress=False)
    after = before.rename(tmp_path / "after")
    result = export_compressed_tensors(after / "run", tmp_path / "export", dtype="float32", progress=False)
    assert result.plan.matches_calibration and (tmp_path / "export" / "config.json").is_file()
    # its size is compared with the base it was built from, and the export names where that is now
    assert result.sizes["source_bytes"] and result.sizes["ratio_vs_source"]
    meta = json.loads((tmp_path / "export" / "qrealign.json").read_text())
    assert Path(meta["source_model"]).resolve() == (after / "fp").resolve()
    assert Path(meta["source_model_recorded"]).resolve() == (before / "fp").resolve()


def test_inspect_describes_a_run_and_its_base_model(runs, tmp_path, capsys):
    # a run holds parameters only: inspect says what the run is and describes the base it was
    # calibrated on (it refused the folder as "no config.json")
    import json
    import shutil

    from qrealign.cli import main

    run = runs("W8A8")
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: a qrealign quantization run (W8A8, omniquant), its learned parameters only" in out
    assert "blocks calibrated" in out and "calibration: 4 prompts" in out
    assert "LlamaForCausalLM" in out and "smoothing pairs" in out  # the base model's architecture
    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"]["scheme"] == "W8A8" and info["run"]["blocks"] == info["layers"]
    assert Path(info["run"]["base"]).resolve() == (run.parent / "fp").resolve()
    assert main(["inspect", str(run), "--adapter", str(tmp_path)]) == 2
    assert "is a quantization run" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "quant_params.safetensors").unlink()
    assert main(["inspect", str(broken)]) == 2
    assert "quant_params.safetensors is missing" in capsys.readouterr().err
    gone = tmp_path / "gone"  # a base that moved away: the loaders' hint
    shutil.copytree(run, gone)
    meta = json.loads((gone / "qrealign.json").read_text())
    (gone / "qrealign.json").write_text(json.dumps(dict(meta, source=str(tmp_path / "nowhere"), source_relative=None)))
    assert main(["inspect", str(gone)]) == 2
    assert "put that model there, or beside the run folder" in capsys.readouterr().err


def test_inspect_says_an_export_is_quantized(runs, tmp_path, capsys):
    # review 81: `inspect EXPORT` described it as a plain model
    import json

    from qrealign.cli import main
    from qrealign.export import export_compressed_tensors

    export_compressed_tensors(runs("W8A8-sym"), tmp_path / "ex")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ex")]) == 0
    assert "quantized: a qrealign export, W8A8-sym compressed-tensors (int-quantized)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "ex"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["scheme"] == "W8A8-sym"


def test_a_missing_base_and_an_out_that_appears_during_the_export(runs, tmp_path, monkeypatch):
    # review 85: a run whose base is gone says what to do (it said only "does not exist"); a folder
    # created at --out while the model loaded is not swapped away with the user's files in it
    import qrealign.export.compressed as compressed

    run = tmp_path / "run"
    shutil.copytree(runs("W8A8-sym"), run)
    meta = json.loads((run / "qrealign.json").read_text())
    moved = dict(meta, source=str(tmp_path / "gone"), source_relative=None)
    (run / "qrealign.json").write_text(json.dumps(moved))
    with pytest.raises(ExportError, match="gone does not exist. A run folder holds only its quantization "
                                          "parameters: .*put that model there, or beside the run folder"):
        export_compressed_tensors(run, tmp_path / "ex")
    assert not (tmp_path / "ex").exists()

    out = tmp_path / "late"
    real = compressed.load_run_source

    def load_while_a_user_writes(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real(*args, **kwargs)
    monkeypatch.setattr(compressed, "load_run_source", load_while_a_user_writes)
    with pytest.raises(ExportError, match="late"):
        export_compressed_tensors(runs("W8A8-sym"), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    from qrealign.cli import build_parser, main

    parser = build_parser()

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/ex/model.safetensors")
    monkeypatch.setattr("qrealign.cli.build_parser", lambda: parser)
    parser.command_parsers["inspect"].set_defaults(_run=full)
    assert main(["inspect", "M"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("qrealign: error: No space left on device: /data/ex/model.safetensors (nothing "
                           "half-written; --debug shows the traceback)")
    with pytest.raises(OSError):
        main(["inspect", "M", "--debug"])


def test_a_bf16_calibrated_run_is_evaluated_as_it_is_exported(tmp_path):
    # review 85: load_quantized (what eval runs) applied a bf16 run's parameters before the float32
    # cast, so its weights were rounded to bf16; the export writes the exact grid: two models
    from qrealign.calibrate.api import quantize
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.models import load_model
    from qrealign.models.tiny import tiny_model

    model, tok = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    m, t = load_model(tmp_path / "fp", dtype="bfloat16")
    quantize(m, t, CalibrationSet(PROMPTS, [0, 1, 0, 1]), "W8A8-sym", CalibConfig(epochs=1), out=tmp_path / "run",
             progress=False)
    evaluated, _, meta = load_quantized(tmp_path / "run")
    assert meta["model_dtype"] == "bfloat16" and next(evaluated.parameters()).dtype == torch.float32
    export_compressed_tensors(tmp_path / "run", tmp_path / "ex", dtype="float32", progress=False)
    shipped, _ = load_model(tmp_path / "ex")
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        assert torch.equal(evaluated(input_ids=ids).logits, shipped(input_ids=ids).logits)
