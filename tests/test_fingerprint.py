"""Model fingerprints key caches, resume and reload checks: they must not move with the thread
count or the device, and must notice any weight change."""

import json

import pytest
import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.artifact import load_quantized
from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig
from qrealign.errors import IncompatibleArtifact
from qrealign.models import load_model
from qrealign.models.tiny import tiny_model
from qrealign.utils import model_fingerprint


def test_fingerprint_is_the_same_for_any_thread_count_and_sees_a_single_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048))  # 4M weights: a parallel reduction
    threads = torch.get_num_threads()
    try:
        values = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            values.add(model_fingerprint(model))
    finally:
        torch.set_num_threads(threads)
    assert len(values) == 1
    before = values.pop()
    with torch.no_grad():
        model[0].weight[7, 1] += 1e-3  # not in the strided sample: only the checksum sees it
    assert model_fingerprint(model) != before


def _rtn_run(tmp_path, seed):
    """A saved tiny model (`tmp_path/m`) and an RTN W8A8 run of it (`tmp_path/run`); the tokenizer."""
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"))
    calib = CalibrationSet(["write a scam email", "bake bread"], [1, 0])
    quantize(model, tok, calib, "W8A8", CalibConfig(method="rtn"), out=tmp_path / "run", progress=False)
    return tok


def test_runs_written_before_version_2_still_reload(tmp_path):
    """A run's qrealign.json from before the thread-independent fingerprint holds the old value
    (computed with one thread in the demo's lanes): reloading accepts it; a wrong one is refused."""
    _rtn_run(tmp_path, seed=3)
    meta_file = tmp_path / "run" / "qrealign.json"
    meta = json.loads(meta_file.read_text())
    assert meta["fingerprint_version"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        legacy = model_fingerprint(load_model(str(tmp_path / "m"))[0], version=1)
    finally:
        torch.set_num_threads(threads)
    del meta["fingerprint_version"]
    meta["model_fingerprint"] = legacy
    meta_file.write_text(json.dumps(meta))
    load_quantized(tmp_path / "run")
    meta["model_fingerprint"] = "0" * len(legacy)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleArtifact, match="fingerprint mismatch"):
        load_quantized(tmp_path / "run")


def test_a_float32_run_loads_in_bf16_after_its_fingerprint_is_checked_in_float32(tmp_path):
    # The fingerprint hashes the weights' bits: a bf16 load can never match a float32 record, so
    # load_quantized checks in float32 and casts afterwards (it used to say "fingerprint mismatch").
    tok = _rtn_run(tmp_path, seed=4)
    fp32, _, _ = load_quantized(tmp_path / "run")
    with pytest.warns(UserWarning, match="calibrated in float32"):
        bf16, _, _ = load_quantized(tmp_path / "run", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = tok("bake bread", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref, out = fp32(ids).logits, bf16(ids).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # the same quantized model, in bf16
    meta_file = tmp_path / "run" / "qrealign.json"
    meta = json.loads(meta_file.read_text())
    meta["model_fingerprint"] = "0" * len(meta["model_fingerprint"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleArtifact, match="fingerprint mismatch"):  # a wrong model still fails
        load_quantized(tmp_path / "run", dtype="bfloat16")
