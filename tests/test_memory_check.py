"""The engine's GPU memory check (`calibrate.memory.check_block_fits`): one block's float32
training state, a step's activations and the calibration set's streams against the free memory,
refused before any work with the way out. Tested with a faked `mem_get_info`: this suite has no
GPU, so the count is checked, not a real allocation."""

import pytest
import torch

from qrealign.calibrate import memory
from qrealign.calibrate.api import quantize
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.calibrate.engine import CalibConfig
from qrealign.errors import QrealignError
from qrealign.models.tiny import tiny_model

CALIB = CalibrationSet(["bake a loaf of rye bread", "say hello", "list three fruits", "name a river"], [0, 0, 1, 1])
CUDA = torch.device("cuda")


def _need(model, cfg, batches, copies, streams):
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    step = max(b.enc.attention_mask.numel() for b in batches)
    total = sum(b.enc.attention_mask.numel() for b in batches)
    return copies * block + step * (6 * hidden + 4 * inter) * 4 + streams * total * hidden * 4


def test_one_block_and_the_streams_against_the_free_memory(monkeypatch):
    model, tok = tiny_model("llama", num_hidden_layers=2)
    cfg = CalibConfig(batch_size=2)
    batches = make_batches(tok, CALIB, cfg.batch_size, cfg.max_length, cfg.padding_side, None)
    need = _need(model, cfg, batches, copies=7, streams=3)
    free = {"bytes": int(need / 0.9) + 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 ** 12))
    memory.check_block_fits(model, CUDA, cfg, batches)  # just room enough
    free["bytes"] = need
    with pytest.raises(QrealignError, match=r"7 copies.*GiB are free\. To fit: keep the FP targets in CPU memory"):
        memory.check_block_fits(model, CUDA, cfg, batches)
    # learned rounding: four copies more, and leaving it off is named
    free["bytes"] = int(need / 0.9) + 1
    with pytest.raises(QrealignError, match="11 copies.*leave learned rounding off"):
        memory.check_block_fits(model, CUDA, CalibConfig(batch_size=2, learn_rounding=True), batches)
    # the FP targets in CPU memory: one stream instead of three
    free["bytes"] = int(_need(model, cfg, batches, copies=7, streams=1) / 0.9) + 1
    memory.check_block_fits(model, CUDA, CalibConfig(batch_size=2, offload_targets=True), batches)
    with pytest.raises(QrealignError) as err:
        memory.check_block_fits(model, CUDA, cfg, batches)
    assert "offload-targets" in str(err.value)
    with pytest.raises(QrealignError) as err:  # on already: not advised again
        free["bytes"] = 1
        memory.check_block_fits(model, CUDA, CalibConfig(batch_size=2, offload_targets=True), batches)
    assert "offload-targets" not in str(err.value) and "--batch-size" in str(err.value)
    memory.check_block_fits(model, CUDA, CalibConfig(method="rtn"), batches)  # RTN trains nothing


def test_the_engine_checks_before_any_work_and_never_on_a_cpu(monkeypatch):
    from qrealign.calibrate import engine

    def no_query(device=None):
        raise AssertionError("a CPU run asked a GPU for its memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_query)
    model, tok = tiny_model("llama", num_hidden_layers=2)
    quantize(model, tok, CALIB, "W8A8", CalibConfig(epochs=1, batch_size=2), device="cpu", progress=False)

    seen = []

    def check(model, dev, cfg, batches):
        seen.append((dev, len(batches)))
        raise QrealignError("stop here")

    monkeypatch.setattr(engine, "check_block_fits", check)
    monkeypatch.setattr(engine, "capture_block_inputs", lambda *a, **k: pytest.fail("FP pass before the check"))
    model, tok = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(QrealignError, match="stop here"):
        quantize(model, tok, CALIB, "W8A8", CalibConfig(epochs=1, batch_size=2), device="cpu", progress=False)
    assert seen == [(torch.device("cpu"), 2)]
