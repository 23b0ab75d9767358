"""Foundation: registry, loading from every source kind, adapter merge, clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qrealign.cli import main
from qrealign.errors import ModelLoadError, UnsupportedArchitecture
from qrealign.models import block_pairs, get_arch, get_blocks, load_model, resolve_source
from qrealign.models.tiny import TINY_MODEL_TYPES, tiny_model


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_registry_finds_blocks_and_pairs_and_model_runs(model_type):
    model, tok = tiny_model(model_type)
    assert len(get_blocks(model)) == 2
    pairs = block_pairs(model)
    assert {"qkv", "fc1", "out"} <= set(pairs)
    for smooth, balance in pairs.values():
        assert all(isinstance(get_blocks(model)[0].get_submodule(b), torch.nn.Linear) for b in balance)
    ids = tok(["hello"], return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_save_load_round_trip(model_type, tmp_path):
    model, tok = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    ids = tok(["round trip"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, loaded(**ids).logits, atol=1e-6)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token is not None
    assert loaded.config.qrealign_source == str(tmp_path.resolve())


def _save_adapter(model, path, seed=0, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(path)
    return peft_model


def test_adapter_is_merged_on_load(tmp_path):
    base, tok = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = _save_adapter(tiny_model("llama")[0], tmp_path / "adapter")
    merged, _ = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    ids = tok(["adapter"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(peft_model(**ids).logits, merged(**ids).logits, atol=1e-5)
        assert not torch.allclose(base(**ids).logits, merged(**ids).logits, atol=1e-3)


def test_an_adapter_s_own_tokenizer_is_used(tmp_path):
    base, tok = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _save_adapter(tiny_model("llama")[0], tmp_path / "adapter")
    _, plain = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))  # no tokenizer saved: the base's
    assert plain.chat_template == tok.chat_template
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tok.save_pretrained(tmp_path / "adapter")  # the fine-tune's own chat format, next to its adapter
    _, own = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert own.chat_template == tok.chat_template and own.padding_side == "left"


def test_an_adapter_that_added_tokens_grows_the_base_embeddings_first(tmp_path):
    """A fine-tune that added tokens ships a larger embedding (modules_to_save) and its tokenizer
    next to the adapter: the base is grown to the tokenizer's size before the merge, and the merged
    model answers like the adapter model on ids that use a new token."""
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = base.get_input_embeddings().weight.shape[0]
    model, tok = tiny_model("llama")
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    model.resize_token_embeddings(len(tok))
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     modules_to_save=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # the fine-tune trained the new rows
        peft_model.get_input_embeddings().weight[-2:].normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merged, merged_tok = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert len(merged_tok) == len(tok) > rows
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok(["call <tool_call> now"], return_tensors="pt")
    assert ids.input_ids.max() >= rows  # the prompt really uses a new token
    with torch.no_grad():
        assert torch.allclose(peft_model(**ids).logits, merged(**ids).logits, atol=1e-5)


def test_a_mistyped_adapter_fails_before_the_base_weights_load(tmp_path, monkeypatch):
    import transformers

    from qrealign.errors import ModelLoadError
    from qrealign.models.load import load_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    def no_weights(*a, **k):
        raise AssertionError("read the base weights before checking the adapter")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ModelLoadError, match="not a PEFT adapter directory"):
        load_model(str(tmp_path / "base"), adapter=str(tmp_path / "atack"))


def test_adapter_for_another_base_is_rejected(tmp_path):
    base, tok = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _save_adapter(tiny_model("llama", hidden_size=32, head_dim=8)[0], tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="does not match the base model"):
        load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitecture, match="supported: .*llama"):
        resolve_source(str(tmp_path))
    with pytest.raises(UnsupportedArchitecture):
        get_arch(type("C", (), {"model_type": "gpt2"}))


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "noconfig").mkdir()
    good, tok = tiny_model("llama")
    good.save_pretrained(tmp_path / "truncated")
    st = tmp_path / "truncated" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    (tmp_path / "notgguf.gguf").write_bytes(b"hello world, not a model")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return tmp_path


@pytest.mark.parametrize("name,message", [
    ("missing", "does not exist"),
    ("noconfig", "no config.json"),
    ("truncated", "corrupt or truncated"),
    ("bad.gguf", "corrupt or truncated"),
    ("notgguf.gguf", "not a GGUF file"),
    ("bert", "unsupported architecture"),
])
def test_cli_bad_input_is_one_line_nonzero_and_writes_nothing(bad_inputs, capsys, name, message):
    before = sorted(p.name for p in bad_inputs.rglob("*"))
    code = main(["inspect", str(bad_inputs / name)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in bad_inputs.rglob("*")) == before


def test_a_model_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "notok")
    with pytest.raises(ModelLoadError, match="cannot load tokenizer for .*the folder has none of tokenizer.json, "
                       "tokenizer.model, vocab.json, tokenizer_config.json; save the tokenizer beside the weights"):
        load_model(str(tmp_path / "notok"))  # it said "...from one of: " and stopped (review 79)


def test_a_mistyped_path_under_a_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """"runs/attackd" has a hub id's shape; with a local "runs" folder it is a missing path (a hub
    lookup without network retried for half a minute). A name whose first part is no local
    folder stays a hub id."""
    from qrealign.models.load import ModelLoadError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match="model path runs/attackd does not exist"):
        resolve_source("runs/attackd")
    assert resolve_source("Qwen/Qwen2.5-7B-Instruct").kind == "hub"


def test_cli_debug_shows_traceback(bad_inputs):
    with pytest.raises(ModelLoadError):
        main(["inspect", str(bad_inputs / "missing"), "--debug"])


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "qrealign", "--help"], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and "quantize" in out


@pytest.mark.slow
def test_inspect_embedded_model(capsys):
    assert main(["inspect", "smollm2-135m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["hidden_size"] == 576 and info["kv_heads"] == 3
    assert set(info["smoothing_pairs"]) == {"qkv", "fc1", "out", "qk"}


# Templates written for the test, in the style of two families' (not copied from either).
_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
_NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_chat_rendering_turns_thinking_off_and_folds_an_unsupported_system_turn():
    from qrealign.models.chat import render_chat

    _, tok = tiny_model("llama")
    tok.chat_template = _THINKING_TEMPLATE  # a reasoning model answers directly, not mid-thought
    assert render_chat(tok, "hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok.chat_template = _NO_SYSTEM_TEMPLATE
    assert render_chat(tok, "hi", system="Be brief.") == "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n" \
                                                         "<start_of_turn>model\n"
    assert render_chat(tok, "hi") == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    # a training pair ends the way the chat format ends a turn, not with the eos token
    assert render_chat(tok, "hi", response="Hello.").endswith("<start_of_turn>model\nHello.<end_of_turn>")
    tok.chat_template = None  # no template: the eos token closes the answer
    assert render_chat(tok, "hi", response="Hello.").endswith("Hello." + tok.eos_token)


def test_a_hub_model_of_an_unsupported_architecture_fails_before_its_weights_download(monkeypatch):
    import transformers

    from qrealign.errors import QrealignError

    def no_weights(*a, **k):
        raise AssertionError("weights were requested before the checks")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: transformers.GPT2Config())  # stands in for the hub's config.json
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(UnsupportedArchitecture, match="some-org/some-model: unsupported architecture 'gpt2'"):
        load_model("some-org/some-model")
    with pytest.raises(QrealignError, match="unknown device"):  # the device is checked first, too
        load_model("some-org/some-model", device="gpu")


def test_inspect_reads_the_config_not_the_weights(tmp_path, capsys, monkeypatch):
    import transformers

    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    full = {"parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers}

    def no_weights(*a, **k):
        raise AssertionError("inspect loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == full["parameters"] and info["layers"] == full["layers"]
    assert set(info["smoothing_pairs"]) >= {"qkv", "fc1", "out"}


def test_the_embedded_cache_is_converted_again_for_another_gguf(tmp_path, monkeypatch):
    from qrealign.models import embedded

    monkeypatch.setenv("QREALIGN_CACHE", str(tmp_path))
    converted = []
    monkeypatch.setattr(embedded, "_convert", lambda name, target: converted.append(name))
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / embedded._COMPLETE_MARKER).write_text("an-older-release.gguf\n")
    assert embedded.embedded_dir("smollm2-135m") == target and converted == ["smollm2-135m"]
    (target / embedded._COMPLETE_MARKER).write_text(f"{embedded.EMBEDDED['smollm2-135m'].filename}\n")
    embedded.embedded_dir("smollm2-135m")
    assert converted == ["smollm2-135m"]  # the matching conversion is reused


def test_the_cli_silences_library_warnings_but_not_qrealign_s_own():
    import warnings

    from qrealign import cli

    with warnings.catch_warnings(record=True) as caught:
        cli._quiet_libraries()
        warnings.warn_explicit("ours", UserWarning, "targets.py", 1, module="qrealign.calibrate.targets")
        warnings.warn_explicit("theirs", UserWarning, "modeling.py", 1, module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["ours"]


def test_cli_output_to_a_closed_pipe_exits_quietly(tmp_path):
    """`qrealign inspect --json DIR | head -1`: the reader may leave before qrealign writes; that
    is not an error worth a traceback (the write gets EPIPE: the pipe's read end is closed first)."""
    from qrealign.models.tiny import tiny_model

    model, tok = tiny_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([sys.executable, "-m", "qrealign", "inspect", "--json", str(tmp_path)],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Broken pipe" not in res.stderr


def test_a_base_model_without_a_template_still_starts_with_its_bos():
    """Every stage tokenizes rendered text without special tokens; the plain format writes the BOS
    a base Llama/Mistral tokenizer would add itself (it ran without it before)."""
    from tokenizers.processors import TemplateProcessing

    from qrealign.models.chat import encode_prompts, render_chat

    _, tok = tiny_model("llama")
    tok.chat_template = None
    assert not render_chat(tok, "hi").startswith(tok.bos_token)  # this tokenizer adds no BOS: none written
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert render_chat(tok, "hi").startswith(tok.bos_token + "### User:\nhi")
    ids = encode_prompts(tok, ["hi"]).input_ids[0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # once, not twice


@pytest.mark.parametrize("files, said", [
    ({"qrealign.json": '{"kind": "quantized"}', "quant_params.safetensors": ""}, "it is a quantization run"),
    ({"qrealign.json": '{"kind": "probes"}'}, "it is a probe set: realign --probes and analyze --probes take it"),
    ({"result.json": "{}"}, "it is an evaluation: report takes it"),
    ({"notes.txt": "mine"}, "not a Hugging Face model directory"),
])
def test_a_qrealign_output_passed_as_a_model_says_what_it_is(tmp_path, files, said):
    # review 81: a run, probe or eval folder gave only "not a Hugging Face model directory"
    folder = tmp_path / "out"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(ModelLoadError, match=said):
        load_model(str(folder))
