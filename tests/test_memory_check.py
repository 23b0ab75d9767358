"""The engine's GPU memory check (`calibrate.memory.check_block_fits`): one block's float32
training state (a joint stage's: all its blocks'), a step's activations and the calibration
set's streams against the free memory, refused before any work with the ways out that would each
make the run fit. Tested with faked CUDA memory counters: this suite has no GPU, so the count is
checked, not a real allocation."""

import dataclasses

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


@pytest.fixture
def gpu(monkeypatch):
    """Fake CUDA memory: `free` from the driver, `cached` held by the allocator but unused."""
    state = {"free": 0, "cached": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 10 ** 12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["cached"] + 7)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 7)
    return state


def _setup():
    model, tok = tiny_model("llama", num_hidden_layers=2)
    batches = make_batches(tok, CALIB, 2, 256, "left", None)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    step = max(b.enc.attention_mask.numel() for b in batches)
    stream = sum(b.enc.attention_mask.numel() for b in batches) * hidden * 4
    return model, batches, block, step * (6 * hidden + 4 * inter) * 4, stream


def test_one_block_and_the_streams_against_the_free_memory(gpu):
    model, batches, block, acts, stream = _setup()
    cfg = CalibConfig(batch_size=2)
    need = 7 * block + acts + 3 * stream
    gpu["free"] = int(need / 0.9) + 1
    memory.check_block_fits(model, CUDA, cfg, batches)  # just room enough
    gpu["free"] = int((7 * block + acts + stream) / 0.9) + 1  # refused; one stream instead of three fits
    with pytest.raises(QrealignError, match=r"7 copies.*GiB are free\. To fit: keep the FP targets in CPU memory"):
        memory.check_block_fits(model, CUDA, cfg, batches)
    # the allocator's cached, unused memory is free for the run (a teacher moved on and off the GPU)
    gpu["cached"] = need
    memory.check_block_fits(model, CUDA, cfg, batches)
    gpu["cached"] = 0
    # learned rounding: four copies more; leaving it off is named where that alone fits
    rounding = dataclasses.replace(cfg, learn_rounding=True)
    with pytest.raises(QrealignError, match="11 copies.*leave learned rounding off"):
        gpu["free"] = int(need / 0.9) + 1
        memory.check_block_fits(model, CUDA, rounding, batches)
    # the FP targets in CPU memory: one stream instead of three
    gpu["free"] = int((7 * block + acts + stream) / 0.9) + 1
    memory.check_block_fits(model, CUDA, dataclasses.replace(cfg, offload_targets=True), batches)
    # no single way out, but all of them together: said so; not even together: a bigger GPU
    one_row = max(b.enc.attention_mask.shape[1] for b in batches)
    together = 7 * block + one_row * acts // max(b.enc.attention_mask.numel() for b in batches) + stream
    gpu["free"] = int(together / 0.9) + 1
    with pytest.raises(QrealignError, match="No one setting makes it fit; together they do: keep the FP targets in "
                                            "CPU memory .*; leave learned rounding off; use a smaller --batch-size"):
        memory.check_block_fits(model, CUDA, rounding, batches)
    gpu["free"] = together
    with pytest.raises(QrealignError, match=r"Use a GPU with more memory \(with every setting that saves memory"):
        memory.check_block_fits(model, CUDA, rounding, batches)


def test_a_joint_stage_counts_all_its_blocks_and_names_recompute(gpu):
    model, batches, block, acts, stream = _setup()
    hidden = model.config.hidden_size
    cfg = CalibConfig(batch_size=2, joint_safety=True)
    step = max(b.enc.attention_mask.numel() for b in batches)
    joint = 2 * 7 * block + 2 * acts + 4 * stream  # two blocks, their targets, the FP input, the quantized stream
    again = (2 * 2 + 5) * block + step * 2 * 3 * hidden * 4 + acts + 4 * stream
    assert again < joint
    gpu["free"] = int(joint / 0.9) + 1
    memory.check_block_fits(model, CUDA, cfg, batches, joint_blocks=2)
    gpu["free"] = joint
    with pytest.raises(QrealignError, match="joint stage's 2 blocks"):
        memory.check_block_fits(model, CUDA, cfg, batches, joint_blocks=2)
    memory.check_block_fits(model, CUDA, cfg, batches)  # one block's state fits where two do not
    gpu["free"] = int(again / 0.9) + 1
    with pytest.raises(QrealignError, match=r"recompute the joint blocks in the backward \(--recompute\)"):
        memory.check_block_fits(model, CUDA, cfg, batches, joint_blocks=2)
    memory.check_block_fits(model, CUDA, dataclasses.replace(cfg, recompute=True), batches, joint_blocks=2)
    with pytest.raises(QrealignError, match="5 of them one block at a time"):  # the count is tight
        gpu["free"] = int(again / 0.9) - 1
        memory.check_block_fits(model, CUDA, dataclasses.replace(cfg, recompute=True), batches, joint_blocks=2)
    with pytest.raises(QrealignError, match="together they do: .*--recompute"):  # not enough alone
        gpu["free"] = int((again - 3 * stream) / 0.9) + 1
        memory.check_block_fits(model, CUDA, cfg, batches, joint_blocks=2)


def test_a_run_that_learns_nothing_is_not_checked(gpu):
    model, batches, *_ = _setup()
    gpu["free"] = 0
    memory.check_block_fits(model, CUDA, CalibConfig(), batches, learns=False)
    memory.check_block_fits(model, CUDA, CalibConfig(let=False, lwc=False), batches)  # nothing to learn
    with pytest.raises(QrealignError):
        memory.check_block_fits(model, CUDA, CalibConfig(), batches)


def test_the_engine_checks_before_any_work_and_never_on_a_cpu(monkeypatch):
    from qrealign.calibrate import engine

    def no_query(device=None):
        raise AssertionError("a CPU run asked a GPU for its memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_query)
    model, tok = tiny_model("llama", num_hidden_layers=2)
    quantize(model, tok, CALIB, "W8A8", CalibConfig(epochs=1, batch_size=2), device="cpu", progress=False)

    seen = []

    def check(model, dev, cfg, batches, joint_blocks=0, learns=True):
        seen.append((dev, len(batches), joint_blocks, learns))
        raise QrealignError("stop here")

    monkeypatch.setattr(engine, "check_block_fits", check)
    monkeypatch.setattr(engine, "capture_block_inputs", lambda *a, **k: pytest.fail("FP pass before the check"))
    model, tok = tiny_model("llama", num_hidden_layers=2)
    for cfg in (CalibConfig(epochs=1, batch_size=2), CalibConfig(epochs=0, batch_size=2),
                CalibConfig(epochs=0, plain_epochs=1, batch_size=2), CalibConfig(method="rtn", batch_size=2)):
        with pytest.raises(QrealignError, match="stop here"):
            quantize(model, tok, CALIB, "W8A8", cfg, device="cpu", progress=False)
    # the engine reads whether any block trains from the epochs each block gets under the loss
    assert seen == [(torch.device("cpu"), 2, 0, learns) for learns in (True, False, True, False)]
