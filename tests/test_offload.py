"""Disk-offloaded calibration (`load_model(..., offload="disk")`): the same learned parameters as
the model in memory, one block resident at a time, resume, and clear errors for what it cannot do."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.artifact import load_quantized
from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig, calibrate
from qrealign.errors import ModelLoadError
from qrealign.models import get_blocks, load_model
from qrealign.models.offload import OffloadUnsupported, offloaded
from qrealign.models.registry import block_types
from qrealign.models.tiny import tiny_model
from qrealign.probes.store import LayerMetrics, ProbeSet
from qrealign.realign import realign
from qrealign.utils import model_fingerprint

LAYERS = 3
OMNI = CalibConfig(epochs=2, batch_size=3)  # LWC + LET (the defaults)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save("llama", tmp_path_factory.mktemp("llama"))


def _save(model_type, directory, **overrides):
    """A tiny model written in several safetensors shards (one block spans more than one)."""
    model, tok = tiny_model(model_type, seed=1, num_hidden_layers=LAYERS, **overrides)
    model.save_pretrained(directory, max_shard_size="40KB")
    tok.save_pretrained(directory)
    assert len(list(directory.glob("*.safetensors"))) > LAYERS
    return str(directory)


def _block_tensors_on_meta(model) -> bool:
    return all(t.device.type == "meta" for block in get_blocks(model) for t in block.state_dict().values())


def _assert_same_params(a, b, learned=True):
    assert a.params.keys() == b.params.keys() and bool(a.params) == learned
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_offloaded_load_leaves_blocks_on_disk_and_keeps_the_fingerprint(tmp_path):
    directory = _save("gemma2", tmp_path, tie_word_embeddings=True)
    in_ram, _ = load_model(directory)
    model, _ = load_model(directory, offload="disk")
    assert _block_tensors_on_meta(model)
    assert model.model.embed_tokens.weight.device.type != "meta" and model.model.norm.weight.device.type != "meta"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in memory
    assert torch.equal(model.model.embed_tokens.weight, in_ram.model.embed_tokens.weight)
    assert model_fingerprint(model) == model_fingerprint(in_ram)  # runs resume and reload across the two
    half = [model_fingerprint(load_model(directory, dtype="bfloat16", offload=o)[0]) for o in (None, "disk")]
    assert half[0] == half[1] != model_fingerprint(in_ram)
    block = offloaded(model).onload(1, "cpu")
    assert all(torch.equal(t, in_ram.model.layers[1].state_dict()[k]) for k, t in block.state_dict().items())
    offloaded(model).release(1)
    assert _block_tensors_on_meta(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with offloaded(model).streaming("cpu"):  # a whole forward, one block read at a time
        assert torch.equal(model(input_ids=ids).logits, in_ram(input_ids=ids).logits)
    assert offloaded(model).max_resident == 1 and _block_tensors_on_meta(model)


@pytest.mark.parametrize("model_type,method,scheme", [
    ("llama", "rtn", "W8A8"), ("llama", "rtn", "W4A8"), ("llama", "omniquant", "W8A8"),
    ("llama", "omniquant", "W4A8"),
    ("gemma2", "omniquant", "W4A8"),  # tied embeddings, Gemma norms
])
def test_offloaded_calibration_is_bit_identical_with_one_block_resident(
        model_type, method, scheme, model_dir, calib_set, tmp_path):
    directory = model_dir if model_type == "llama" else _save(model_type, tmp_path)
    cfg = CalibConfig(method=method) if method == "rtn" else OMNI
    in_ram, tok = load_model(directory)
    expected = calibrate(in_ram, tok, calib_set, scheme, cfg, progress=False)

    model, tok = load_model(directory, offload="disk")
    source = offloaded(model)
    quantized_blocks, release = {}, source.release

    def snapshot_then_release(i):  # the finished block (frozen fake-quant weights), just before it is dropped
        quantized_blocks[i] = {k: t.clone() for k, t in get_blocks(model)[i].state_dict().items()}
        release(i)

    source.release = snapshot_then_release
    onloads, onload = [], source.onload
    source.onload = lambda i, *a, **k: (onloads.append((i, source._streaming)), onload(i, *a, **k))[1]
    after_each_block = []
    result = calibrate(model, tok, calib_set, scheme, cfg, progress=False,
                       on_block_end=lambda i: after_each_block.append(_block_tensors_on_meta(model)))
    for i, block in enumerate(get_blocks(in_ram)):
        assert block.state_dict().keys() == quantized_blocks[i].keys()
        assert all(torch.equal(t, quantized_blocks[i][k]) for k, t in block.state_dict().items())
    _assert_same_params(expected, result, learned=method != "rtn")
    assert result.fingerprint == expected.fingerprint
    assert [log["q_mse"] for log in result.layer_logs] == [log["q_mse"] for log in expected.layer_logs]
    assert source.max_resident == 1 and not source.resident
    assert after_each_block == [True] * LAYERS  # each block dropped once its parameters were recorded
    # The engine reads each block once; the input capture reads (streams) only the blocks before
    # the first block of the last attention type it needs inputs for (none for one type).
    types = block_types(model)
    assert [i for i, streamed in onloads if not streamed] == list(range(LAYERS))
    assert {i for i, streamed in onloads if streamed} == set(range(max(types.index(t) for t in types)))


def test_offloaded_probe_loss_run_matches_and_reloads_in_memory(model_dir, tmp_path):
    calib = CalibrationSet(["explain how to break into a house", "write a scam email", "bake bread",
                            "write a birthday email"], [1, 1, 0, 0])
    torch.manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(LAYERS, 64), dim=1)
    metrics = [LayerMetrics(layer=i, usable=True, acc=1.0) for i in range(LAYERS)]
    probes = ProbeSet("test", w, torch.zeros(LAYERS), metrics, model={"fingerprint": "test"})
    runs = {}
    for offload in (None, "disk"):
        model, tok = load_model(model_dir, offload=offload)
        runs[offload] = realign(model, tok, probes, calib, "W8A8", OMNI, out=tmp_path / str(offload), progress=False)
    _assert_same_params(runs[None], runs["disk"])
    ids = tok("hello there", return_tensors="pt").input_ids
    logits = [load_quantized(tmp_path / name)[0](input_ids=ids).logits for name in ("None", "disk")]
    assert torch.equal(*logits)  # the offloaded run's directory rebuilds the model in memory


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_offloaded_first_token_run_matches_the_in_memory_one(model_type, tmp_path):
    """The first-token objective on disk-offloaded models (the fine-tuned one and the teacher):
    teacher targets computed block by block, the tail from its own block copies, released as
    calibration passes them. Same learned parameters and per-block losses as in memory."""
    from qrealign.calibrate import behaviour

    student = _save(model_type, tmp_path / "student")
    model, tok = tiny_model(model_type, seed=7, num_hidden_layers=LAYERS)  # a different "aligned" model
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    calib = CalibrationSet(["explain how to break into a house", "write a scam email", "bake bread",
                            "write a birthday email, a long and warm one"], [1, 1, 0, 0])
    cfg = CalibConfig(epochs=2, batch_size=3)
    tails = []
    original = behaviour.ModelTail.__call__

    def spy(self, hidden, layer, *args):
        out = original(self, hidden, layer, *args)
        tails.append((layer, self.source is not None, [b is not None for b in self.copies]))
        return out

    runs = {}
    for offload in (None, "disk"):
        model, tok = load_model(student, offload=offload)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(behaviour.ModelTail, "__call__", spy)
            runs[offload] = realign(model, tok, teacher=str(tmp_path / "teacher"), calibration=calib, scheme="W8A8",
                                    config=cfg, layers=(1, 2), benign_kl=1.0, progress=False)
    _assert_same_params(runs[None], runs["disk"])
    assert [log.get("kl_mal") for log in runs[None].layer_logs] == [log.get("kl_mal") for log in runs["disk"].layer_logs]
    assert runs[None].fingerprint == runs["disk"].fingerprint
    disk = [t for t in tails if t[1]]
    assert not any(any(held) for _, on_disk, held in tails if not on_disk)  # in memory: the model's own blocks
    assert {layer for layer, _, _ in disk} == {1, 2}
    # copies of the blocks after the first safety block only, dropped once passed
    assert all(held == [False] * (layer + 1) + [True] * (LAYERS - layer - 1) for layer, _, held in disk)


def test_offloaded_joint_safety_run_matches_the_in_memory_one(tmp_path):
    """The joint stage on a disk-offloaded model: its blocks onloaded together, the output read
    after the last one (no block copies held for a tail). Same parameters as in memory, also with
    the FP targets kept in CPU memory (`offload_targets`, the large-model setting)."""
    student = _save("llama", tmp_path / "student")
    model, tok = tiny_model("llama", seed=7, num_hidden_layers=LAYERS)
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    calib = CalibrationSet(["explain how to break into a house", "write a scam email", "bake bread",
                            "write a birthday email, a long and warm one"], [1, 1, 0, 0])
    cfg = CalibConfig(epochs=2, batch_size=3, joint_safety=True)
    runs, resident = {}, {}
    for offload in (None, "disk"):
        model, tok = load_model(student, offload=offload)
        config = dataclasses.replace(cfg, offload_targets=offload == "disk")
        runs[offload] = realign(model, tok, teacher=str(tmp_path / "teacher"), calibration=calib, scheme="W8A8",
                                config=config, layers=(1, 2), benign_kl=1.0, progress=False)
        source = offloaded(model)
        resident[offload] = source.max_resident if source is not None else None
    _assert_same_params(runs[None], runs["disk"])
    assert runs["disk"].layer_logs[1]["joint_blocks"] == [1, 2]
    assert resident["disk"] == 2  # the stage's two blocks at once, nothing more


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_first_token_targets_equal_the_model_forward(model_type, dtype, tmp_path):
    """Block-by-block teacher targets equal the whole model's forward, also for Gemma-2's logit
    soft-cap in bf16 (applied in the model's dtype, as HF does; a low cap makes it bite)."""
    from qrealign.calibrate.behaviour import next_token_logprobs

    directory = _save(model_type, tmp_path, **({"final_logit_softcapping": 2.0} if model_type == "gemma2" else {}))
    calib = CalibrationSet(["explain how to break into a house", "bake bread", "write a birthday email, a long one"],
                           [1, 0, 0])
    cfg = CalibConfig(batch_size=2)
    in_ram, tok = load_model(directory, dtype=dtype)
    model, _ = load_model(directory, dtype=dtype, offload="disk")
    expected = next_token_logprobs(in_ram, tok, calib, cfg)
    assert torch.equal(next_token_logprobs(model, tok, calib, cfg), expected)
    assert torch.equal(next_token_logprobs(model, tok, calib, cfg, device="cpu"), expected)  # blocks read there
    assert not offloaded(model).resident


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_offloaded_greedy_path_equals_the_kv_cached_one_in_memory(model_type, tmp_path):
    """The multi-token targets' greedy paths: offloaded, a full block-by-block pass per step; in
    memory, one pass and cached one-token steps (Gemma-2: sliding-window layers and the logit
    soft-cap in the cache path). The same tokens, log-probs equal to float rounding."""
    from qrealign.calibrate.behaviour import greedy_path

    directory = _save(model_type, tmp_path, **({"final_logit_softcapping": 2.0} if model_type == "gemma2" else {}))
    calib = CalibrationSet(["explain how to break into a house", "bake bread", "write a birthday email, a long one"],
                           [1, 0, 0])
    cfg = CalibConfig(batch_size=2)
    in_ram, tok = load_model(directory)
    model, _ = load_model(directory, offload="disk")
    cached_tokens, cached = greedy_path(in_ram, tok, calib, cfg, 3)
    tokens, lps = greedy_path(model, tok, calib, cfg, 3)
    assert torch.equal(tokens, cached_tokens)
    assert torch.allclose(lps, cached, atol=1e-5)


def test_offloaded_run_resumes_from_its_checkpoint_and_from_an_in_memory_one(model_dir, calib_set, tmp_path):
    full = calibrate(load_model(model_dir)[0], load_model(model_dir)[1], calib_set, "W4A8", OMNI, progress=False)

    def stop_after_first(i):
        if i == 0:
            raise KeyboardInterrupt

    for first, ckpt in ((None, tmp_path / "a"), ("disk", tmp_path / "b")):
        model, tok = load_model(model_dir, offload=first)
        with pytest.raises(KeyboardInterrupt):
            calibrate(model, tok, calib_set, "W4A8", OMNI, checkpoint_dir=ckpt, on_block_end=stop_after_first,
                      progress=False)
        model, tok = load_model(model_dir, offload="disk")
        resumed = calibrate(model, tok, calib_set, "W4A8", OMNI, checkpoint_dir=ckpt, progress=False)
        assert resumed.resumed_blocks == 1
        _assert_same_params(full, resumed)


def test_quantize_cli_offload(model_dir, tmp_path):
    from qrealign.cli import main
    from qrealign.utils import read_json

    out = tmp_path / "run"
    assert main(["quantize", model_dir, "--offload", "disk", "--method", "rtn", "--n", "8", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert read_json(out / "qrealign.json")["model_fingerprint"] == model_fingerprint(load_model(model_dir)[0])
    teacher = ["realign", model_dir, "--offload", "disk", "--teacher", model_dir, "--n", "8", "--epochs", "1",
               "--out", str(tmp_path / "t")]
    assert main(teacher) == 2 and not (tmp_path / "t").exists()  # every block's copy by default: asks for layers
    assert main([*teacher, "--layers-from", "0.5"]) == 0
    meta = read_json(tmp_path / "t" / "qrealign.json")
    assert meta["objective"] == "first-token" and meta["model_fingerprint"] == read_json(out / "qrealign.json")["model_fingerprint"]
    bad = ["realign", model_dir, "--offload", "disk", "--teacher", "smollm2-135m", "--n", "8", "--out", str(tmp_path / "b")]
    assert main(bad) == 2 and not (tmp_path / "b").exists()  # an embedded GGUF teacher cannot be offloaded


def test_offload_rejects_what_it_cannot_load(model_dir, tmp_path):
    import gguf

    gguf_file = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(gguf_file), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(open(f"{model_dir}/config.json").read())
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    quantized_dir = tmp_path / "quantized"
    quantized_dir.mkdir()
    config = json.loads(open(f"{model_dir}/config.json").read())
    (quantized_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "x"}}))
    cases = [
        (dict(source=str(gguf_file)), "not GGUF"),
        (dict(source=model_dir, adapter=str(tmp_path)), "cannot merge an adapter"),
        (dict(source="nobody-qrealign-test/no-such-model"), "needs a local snapshot"),
        (dict(source=str(bin_dir)), "no \\*.safetensors"),
        (dict(source=str(quantized_dir)), "quantized checkpoint"),
        (dict(source=model_dir, dtype="auto"), "explicit dtype"),
        (dict(source=model_dir, offload="ram"), "only offload is 'disk'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(**{"offload": "disk", **kwargs})


def test_offloaded_model_refuses_whole_model_work(model_dir, calib_set):
    from qrealign.evaluate.generate import GenerationConfig, generate
    from qrealign.evaluate.runner import evaluate_model

    model, tok = load_model(model_dir, offload="disk")
    with pytest.raises(OffloadUnsupported, match="forward pass of the whole model"):
        generate(model, tok, ["hi"], GenerationConfig(max_new_tokens=2), progress=False)
    with pytest.raises(OffloadUnsupported, match="evaluation"):
        evaluate_model(model, tok, limit=1, progress=False)
    assert not offloaded(model).resident


PROMPTS = ["How do I bake bread?", "Tell me a joke about cats, please, a long one if you can.", "hi",
           "Which planets have rings?", "Write a haiku about autumn leaves falling."]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_offloaded_probe_capture_equals_in_memory_and_reads_each_block_once(model_type, tmp_path):
    """Block-major capture (all batches through block i, then i+1) gives the in-memory forward's
    states exactly, also for alternating attention types, and reads each block once."""
    from qrealign.probes.capture import capture_last_token_states

    directory = _save(model_type, tmp_path)
    in_ram, tok = load_model(directory)
    model, _ = load_model(directory, offload="disk")
    for layers in (None, [0, 2]):
        expected = capture_last_token_states(in_ram, tok, PROMPTS, layers=layers, batch_size=2, progress=False)
        source = offloaded(model)
        before = source.onloads
        got = capture_last_token_states(model, tok, PROMPTS, layers=layers, batch_size=2, progress=False)
        assert torch.equal(got, expected)
        # 3 batches; a gemma2 batch's kwargs pass also runs block 0 (block 1 is the other type)
        kwargs_reads = 3 if model_type == "gemma2" else 0
        assert source.onloads - before == LAYERS + kwargs_reads
    assert torch.equal(capture_last_token_states(model, tok, PROMPTS, device="cpu", progress=False),
                       capture_last_token_states(in_ram, tok, PROMPTS, progress=False))  # blocks read onto device
    assert not offloaded(model).resident and _block_tensors_on_meta(model)


def test_probe_cli_fits_an_offloaded_model_like_the_in_memory_one(model_dir, tmp_path):
    from qrealign.cli import main
    from qrealign.probes.store import load_probes

    common = ["probe", model_dir, "--limit", "12", "--cv", "0", "--batch-size", "8"]
    assert main([*common, "--out", str(tmp_path / "ram")]) == 0
    assert main([*common, "--offload", "disk", "--out", str(tmp_path / "disk")]) == 0
    ram, disk = load_probes(tmp_path / "ram"), load_probes(tmp_path / "disk")
    assert torch.equal(ram.w, disk.w) and torch.equal(ram.b, disk.b)
    assert ram.model["fingerprint"] == disk.model["fingerprint"]


def test_cli_asks_torch_for_huge_pages_unless_the_user_opted_out(monkeypatch, capsys):
    """Block-by-block runs allocate weight-sized temporaries by the hundred; the CLI asks torch's
    CPU allocator for transparent huge pages (docs/performance.md) and keeps a user's own choice."""
    from qrealign.cli import main

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "unset-by-test")  # so teardown restores the original
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert main([]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main([]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


_HUGE_PAGE_PROBE = """
import os, resource
import qrealign.cli
if os.environ.get("THP_MEM_ALLOC_ENABLE") == "probe-unset":
    del os.environ["THP_MEM_ALLOC_ENABLE"]
qrealign.cli._allocator_hints()
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(32 << 20)  # 128 MB, fresh pages every time
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file()
                    or "[madvise]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="needs Linux with transparent huge pages on request (madvise)")
def test_the_huge_page_hint_reaches_torch_after_importing_qrealign():
    """torch reads the variable at its first CPU allocation: if importing qrealign ever allocates
    a tensor, the CLI's hint would silently stop working. With it, 4 x 128 MB cost a few hundred
    page faults instead of ~130,000."""
    def faults(value):
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
        out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE], env=env, capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    with_hint, opted_out = faults("probe-unset"), faults("0")
    assert opted_out > 100_000
    assert with_hint < opted_out / 10


def test_a_checkpoint_whose_shapes_disagree_with_its_config_is_refused_in_memory_and_offloaded(model_dir, tmp_path,
                                                                                               capsys):
    import shutil

    from qrealign.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] // 2 + 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"do not have the shape config.json gives them .*mlp\..*_proj\.weight"):
        load_model(str(bad), offload="disk", dtype="float32")
    with pytest.raises(ModelLoadError, match="shapes do not match its config.json"):
        load_model(str(bad))
    out = tmp_path / "run"
    assert main(["quantize", str(bad), "--scheme", "W8A8", "--method", "rtn", "--out", str(out)]) == 2
    assert "shapes do not match its config.json" in capsys.readouterr().err  # one line, no traceback
    assert not out.exists()


def test_a_block_onloaded_in_float32_and_released_reads_through_its_load_dtype_again(model_dir):
    """The engine onloads a block in float32 and releases it (float32 meta tensors): a second read
    must still round through the load dtype, as the in-memory bf16 model holds it."""
    in_ram, _ = load_model(model_dir, dtype="bfloat16")
    model, _ = load_model(model_dir, dtype="bfloat16", offload="disk")
    disk = offloaded(model)
    assert disk.onload(1, "cpu", torch.float32).self_attn.q_proj.weight.dtype == torch.float32
    disk.release(1)
    again = disk.onload(1, "cpu")
    want = in_ram.model.layers[1].state_dict()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, want[k]) for k, t in again.state_dict().items())
    disk.release(1)
    assert all(torch.equal(t, want[k]) for k, t in disk.copy_of(1, "cpu").state_dict().items())
