"""Streamed compressed-tensors export (`export_compressed_tensors(..., offload="disk")`): the same
checkpoint as the in-memory export (tensor names, dtypes, values, config), written one decoder
block at a time into `save_pretrained`'s sharded layout, and nothing written for what it refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qrealign.export import ExportError, export_compressed_tensors
from qrealign.models import load_model
from qrealign.models.offload import DiskBlocks

LAYERS = 3
PROMPTS = ["bake bread", "a cat joke", "2+2?", "rain poem"]
SAME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(model_type, scheme[, model_dtype]) -> an omniquant (LWC + LET) run of a tiny model saved
    in shards (in `model_dtype`: a bf16 model is calibrated in float32 and cast back)."""
    from qrealign.calibrate.api import quantize
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.calibrate.engine import CalibConfig

    root = tmp_path_factory.mktemp("export-offload")
    cache = {}

    def make(model_type: str, scheme: str, model_dtype: str = "float32"):
        key = model_type, scheme, model_dtype
        if key not in cache:
            fp = root / f"fp-{model_type}-{model_dtype}"
            if not fp.exists():
                _save_sharded(model_type, fp, getattr(torch, model_dtype))
            model, tok = load_model(fp, dtype=model_dtype)
            out = root / f"{model_type}-{scheme}-{model_dtype}"
            quantize(model, tok, CalibrationSet(PROMPTS, [0, 1, 0, 1]), scheme, CalibConfig(epochs=1), out=out,
                     progress=False)
            cache[key] = out
        return cache[key]

    return make


def _save_sharded(model_type: str, directory, dtype: torch.dtype = torch.float32) -> None:
    """Several shards (a block spans more than one), and sampling defaults in generation_config.json
    that `from_config` alone would not know."""
    from qrealign.models.tiny import tiny_model

    tied = model_type == "gemma2"
    model, tok = tiny_model(model_type, seed=2, num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256,
                            head_dim=32, tie_word_embeddings=tied)  # group 128 tiles every linear
    model.generation_config.temperature, model.generation_config.do_sample = 0.3, True
    model.to(dtype)
    model.save_pretrained(directory, max_shard_size="100KB")
    tok.save_pretrained(directory)
    assert len(list(directory.glob("*.safetensors"))) > LAYERS


def _tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _logits(directory, tokenizer):
    from qrealign.models.chat import encode_prompts

    model, _ = load_model(directory)
    enc = encode_prompts(tokenizer, ["hello world how are you", "tell me a story about a dragon"])
    with torch.no_grad():
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits


def _count_resident(monkeypatch) -> list[int]:
    """How many blocks are in memory right after each onload."""
    counts, onload = [], DiskBlocks.onload

    def counting(self, i, *args, **kwargs):
        block = onload(self, i, *args, **kwargs)
        counts.append(len(self.resident))
        return block

    monkeypatch.setattr(DiskBlocks, "onload", counting)
    return counts


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


@pytest.mark.parametrize("model_type,scheme,dtype,model_dtype", [
    ("llama", "W8A8", "bfloat16", "float32"),        # int-quantized int8 with zero points
    ("llama", "W4A16-g128", "float32", "float32"),   # pack-quantized int32 words, per-group scales
    ("gemma2", "W4A16", "bfloat16", "float32"),      # tied embeddings: the LM head is not written twice
    # a bf16 model (a 7B one is the streamed export's user): its blocks stream in bf16, and the
    # codes must come from the float32 folded weights, as calibration's and the in-memory export's
    ("llama", "W8A8", "bfloat16", "bfloat16"),
])
def test_streamed_export_equals_the_in_memory_one(runs, model_type, scheme, dtype, model_dtype, tmp_path,
                                                  monkeypatch):
    run = runs(model_type, scheme, model_dtype)
    in_memory = export_compressed_tensors(run, tmp_path / "mem", dtype=dtype, progress=False)
    resident = _count_resident(monkeypatch)
    streamed = export_compressed_tensors(run, tmp_path / "disk", dtype=dtype, progress=False, offload="disk")
    assert resident == [1] * LAYERS  # each block read once, alone
    assert streamed.plan == in_memory.plan

    mem, disk = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert mem.keys() == disk.keys()
    for name, tensor in mem.items():
        assert disk[name].dtype == tensor.dtype and torch.equal(disk[name], tensor), name
    suffix = "weight" if "A8" in scheme else "weight_packed"
    assert mem[f"model.layers.0.mlp.up_proj.{suffix}"].dtype == (torch.int8 if "A8" in scheme else torch.int32)
    assert ("lm_head.weight" in mem) != (model_type == "gemma2")
    for name in SAME_FILES:  # config.json: quantization_config, dtype, qrealign_export; sampling defaults
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name
    assert json.loads((tmp_path / "disk" / "generation_config.json").read_text())["temperature"] == 0.3

    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == disk.keys()
    shards = sorted({f for f in index["weight_map"].values()})
    assert shards == [f"model-{k:05d}-of-{LAYERS + 1:05d}.safetensors" for k in range(1, LAYERS + 2)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in disk.values())
    meta = [json.loads((tmp_path / d / "qrealign.json").read_text()) for d in ("mem", "disk")]
    for m in meta:  # the shard headers make the streamed files a few bytes larger; nothing else differs
        m.pop("sizes")
    assert meta[0] == meta[1]

    tok = load_model(run.parent / f"fp-{model_type}-{model_dtype}")[1]
    assert torch.equal(_logits(tmp_path / "disk", tok), _logits(tmp_path / "mem", tok))


def _with_source(run, tmp_path, **changes):
    """A copy of `run` whose qrealign.json records another source."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "qrealign.json").read_text())
    (copy / "qrealign.json").write_text(json.dumps({**meta, **changes}))
    return copy


def test_runs_it_cannot_stream_fail_before_writing(runs, tmp_path):
    import gguf

    gguf_file = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(gguf_file), "llama")
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                 writer.close):
        step()
    run = runs("llama", "W8A8")
    out = tmp_path / "out"
    cases = [(_with_source(run, tmp_path / "a", adapter=str(tmp_path)), "disk", "cannot merge an adapter"),
             (_with_source(run, tmp_path / "g", source=str(gguf_file)), "disk", "GGUF file"),
             (run, "ram", "only offload is 'disk'")]
    for bad_run, offload, message in cases:
        with pytest.raises(ExportError, match=message):
            export_compressed_tensors(bad_run, out, progress=False, offload=offload)
        _no_output(out)


def test_failure_mid_stream_keeps_the_earlier_export(runs, tmp_path, monkeypatch):
    """Shards are written as blocks finish, inside the atomic directory: a failure at block 1
    leaves the previous export as it was and no temporary directory."""
    from qrealign.export import stream

    run = runs("llama", "W8A8")
    out = tmp_path / "out"
    export_compressed_tensors(run, out, progress=False)
    before = _tensors(out)
    compressed_block = stream._compressed_block

    def fail_at_block_1(model, i, *args):
        if i == 1:
            raise RuntimeError("disk full")
        return compressed_block(model, i, *args)

    monkeypatch.setattr(stream, "_compressed_block", fail_at_block_1)
    with pytest.raises(RuntimeError, match="disk full"):
        export_compressed_tensors(run, out, progress=False, offload="disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "model.safetensors.index.json").exists()
    after = _tensors(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_cli_export_offload(runs, tmp_path, capsys):
    from qrealign.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(runs("llama", "W8A8")), "--offload", "disk", "--out", str(out)]) == 0
    assert "int-quantized" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and (out / "README.md").is_file()
    bad = _with_source(runs("llama", "W8A8"), tmp_path, adapter=str(tmp_path))
    assert main(["export", str(bad), "--offload", "disk", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrealign: error:") and "adapter" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
