"""Learned parameters that stay on disk until read (`qrealign.tensorfiles`): the streaming writer
gives files safetensors reads back exactly, and a checkpointed run holds no parameter tensor in
memory until it is saved (learned rounding is one int8 per weight: about 69 GB at 70B)."""

import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qrealign.calibrate.api import quantize
from qrealign.calibrate.engine import CalibConfig, calibrate
from qrealign.models.tiny import tiny_model
from qrealign.tensorfiles import TensorFiles, save_streaming


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "d.i8": torch.randint(-1, 2, (4, 6), generator=g).to(torch.int8),
        "e.i64": torch.arange(5),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 4),
        "i.u8": torch.tensor([0, 255], dtype=torch.uint8),
        "j.f64": torch.randn(3, generator=g).double(),
        "k.i16": torch.tensor([-3, 7], dtype=torch.int16),
        "l.i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "m.non-ascii é": torch.ones(2),
    }


def test_the_streaming_writer_gives_what_safetensors_reads_back_exactly(tmp_path):
    tensors = _tensors()
    save_streaming(tensors, tmp_path / "streamed.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "streamed.safetensors"))
    assert back.keys() == tensors.keys()
    # save_file's own bytes (its order: larger dtypes first, then names; so every tensor starts
    # at a multiple of its element size)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    header_len = int.from_bytes((tmp_path / "streamed.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    import json

    header = json.loads((tmp_path / "streamed.safetensors").read_bytes()[8:8 + header_len])
    for k, v in tensors.items():
        assert header[k]["data_offsets"][0] % v.element_size() == 0, k
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    # from a TensorFiles (read one at a time from another file) too, with held tensors replacing
    save_file(tensors, str(tmp_path / "source.safetensors"))
    lazy = TensorFiles([tmp_path / "source.safetensors"], tensors={"a.f32": torch.ones(1)})
    save_streaming(lazy, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert torch.equal(again["a.f32"], torch.ones(1)) and torch.equal(again["b.bf16"], tensors["b.bf16"])
    with pytest.raises(TypeError, match="strings to strings"):
        save_streaming(tensors, tmp_path / "bad.safetensors", metadata={"epochs": 2})
    with pytest.raises(TypeError, match="no safetensors code"):
        save_streaming({"x": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "bad.safetensors")


def test_tensor_files_read_on_access_and_say_dtype_and_shape_without_reading(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "one.safetensors"))
    save_file({"a.f32": torch.zeros(1), "z": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    lazy = TensorFiles([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
    assert len(lazy) == len(tensors) + 1 and "z" in lazy and "nope" not in lazy
    assert torch.equal(lazy["a.f32"], torch.zeros(1))  # the later file's entry replaces the earlier's
    assert torch.equal(lazy["d.i8"], tensors["d.i8"])
    assert lazy.dtype_and_shape("b.bf16") == (torch.bfloat16, [7])
    assert lazy.dtype_and_shape("g.scalar") == (torch.float32, [])
    assert not lazy._held  # nothing was kept in memory by reading
    # a snapshot: the same path written again, or removed, does not change what it reads
    save_file({"a.f32": torch.full((1,), 7.0), "z": torch.zeros(2)}, str(tmp_path / "two.tmp"))
    (tmp_path / "two.tmp").replace(tmp_path / "two.safetensors")
    assert torch.equal(lazy["z"], torch.ones(2))
    (tmp_path / "one.safetensors").unlink()
    assert torch.equal(lazy["d.i8"], tensors["d.i8"])
    assert lazy.to_dict().keys() == set(tensors) | {"z"}
    # a file cut short in place after it was opened: a clear error (a memory map would crash)
    save_file(tensors, str(tmp_path / "three.safetensors"))
    cut = TensorFiles([tmp_path / "three.safetensors"])
    with open(tmp_path / "three.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(OSError, match="cut short after it was opened"):
        cut.to_dict()
    lazy.drop("z")
    lazy.drop("never there")
    assert "z" not in lazy
    with pytest.raises(KeyError):
        lazy["z"]


def test_a_checkpointed_run_keeps_its_parameters_on_disk_and_saves_the_same_run(calib_set, tmp_path, monkeypatch):
    cfg = CalibConfig(epochs=1, batch_size=3, learn_rounding=True, lr_round=0.1)
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    in_memory = calibrate(model, tok, calib_set, "W4A8", cfg, progress=False)
    # without a checkpoint, a block with rounding offsets waits in an unlinked temporary file, not
    # in memory, and leaves nothing behind
    assert isinstance(in_memory.params, TensorFiles) and not in_memory.params._held
    assert any(".round." in k for k in in_memory.params) and not list(spill.iterdir())
    # it holds open files: a copy would share their descriptors, so copying says how instead
    import copy
    import pickle

    for duplicate in (pickle.dumps, copy.deepcopy):
        with pytest.raises(TypeError, match="holds an open file: call to_dict"):
            duplicate(in_memory.params)
    # a temp folder that cannot take them: kept in memory, with a warning, and the run goes on
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    with pytest.warns(UserWarning, match="kept in memory"):
        held = calibrate(model, tok, calib_set, "W4A8", cfg, progress=False)
    assert held.params._held.keys() == in_memory.params.keys()
    assert all(torch.equal(held.params[k], in_memory.params[k]) for k in held.params)
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    on_disk = calibrate(model, tok, calib_set, "W4A8", cfg, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert isinstance(on_disk.params, TensorFiles) and not on_disk.params._held  # only file references
    assert any(".round." in k for k in on_disk.params)
    assert on_disk.params.keys() == in_memory.params.keys()
    assert all(torch.equal(on_disk.params[k], in_memory.params[k]) for k in in_memory.params)

    # quantize(out=...): the saved file is streamed from the block files, and the result's
    # parameters are read from it once the checkpoint is gone
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=3)
    saved = quantize(model, tok, calib_set, "W4A8", cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / ".run.checkpoint").exists() and not saved.params._held
    written = load_file(str(tmp_path / "run" / "quant_params.safetensors"))
    assert written.keys() == in_memory.params.keys()
    assert all(torch.equal(written[k], in_memory.params[k]) and torch.equal(saved.params[k], written[k])
               for k in written)


def test_a_run_with_nothing_learned_still_saves_a_readable_file(calib_set, tmp_path):
    from qrealign.calibrate.artifact import apply_quant_params, read_params

    model, tok = tiny_model("llama", seed=0, num_hidden_layers=2)
    result = quantize(model, tok, calib_set, "W8A8", CalibConfig(method="rtn"), out=tmp_path / "rtn",
                      progress=False)
    assert len(result.params) == 0 and len(read_params(tmp_path / "rtn")) == 0  # the placeholder is not a parameter
    rebuilt, _ = tiny_model("llama", seed=0, num_hidden_layers=2)
    apply_quant_params(rebuilt, "W8A8", read_params(tmp_path / "rtn"))
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, rebuilt(**ids).logits)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_file_that_fails_to_open_closes_its_descriptor_once(tmp_path):
    import gc

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")  # a header longer than the file
    with pytest.raises(ValueError, match="a header of 1000000 bytes"):
        TensorFiles([bad])
    gc.collect()  # a second close of the same number would surface here as an unraisable error


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_spilled_file_is_unlinked_before_it_is_written(tmp_path, monkeypatch):
    # a kill during the write must leave nothing behind: while any tensor is read for writing,
    # the temp folder is already empty, and what the mapping reads back is what was given
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    seen = []

    class Watched(dict):
        def __getitem__(self, key):
            seen.append(sorted(p.name for p in spill.iterdir()))
            return super().__getitem__(key)

    given = _tensors()
    held = TensorFiles()
    held.spill(Watched(given))
    assert seen and all(names == [] for names in seen)
    assert not held._held and held.keys() == given.keys()
    assert all(torch.equal(held[k], given[k]) and held[k].dtype == given[k].dtype for k in given)
    # a write that fails half way (a full disk at the third write: the header's length, the
    # header, then the first tensor) closes the descriptor once, keeps the tensors in memory with a
    # warning, and leaves nothing behind
    import os

    fdopen, writes = os.fdopen, []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(fdopen(*a, **k)))
    kept = TensorFiles()
    with pytest.warns(UserWarning, match="No space left on device.*kept in memory"):
        kept.spill(given)
    assert len(writes) == 3 and kept._held.keys() == given.keys() and not list(spill.iterdir())
