"""The export's config.json and tokenizer_config.json also carry the keys transformers 4 reads
(engines such as vLLM bundled it), and transformers 5 reads the same model from them."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, LlamaConfig

from qrealign.export.compat import _rope_as_read, tokenizer_with_legacy_keys, with_legacy_keys

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_llama3_rope_base_and_scaling_get_their_transformers_4_keys():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=dict(scaling), max_position_embeddings=131072)
    config.dtype = "bfloat16"
    saved = config.to_dict()
    assert saved.get("rope_theta") is None and saved.get("rope_scaling") is None  # transformers 5's layout
    legacy = with_legacy_keys(saved)
    assert legacy["rope_theta"] == 500000.0
    assert legacy["rope_scaling"] == scaling
    assert legacy["torch_dtype"] == "bfloat16"
    assert _rope_as_read(legacy) == _rope_as_read(saved) == config.rope_parameters
    assert saved.get("rope_theta") is None  # the input is not modified


def test_plain_rope_gets_only_its_base():
    saved = LlamaConfig(**SMALL, rope_theta=100000.0).to_dict()  # SmolLM2's base
    legacy = with_legacy_keys(saved)
    assert legacy["rope_theta"] == 100000.0 and legacy.get("rope_scaling") is None
    assert _rope_as_read(legacy) == _rope_as_read(saved)


def test_per_layer_type_rope_gets_both_bases():
    config = Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                              rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    saved = config.to_dict()
    legacy = with_legacy_keys(saved)
    assert (legacy["rope_theta"], legacy["rope_local_base_freq"]) == (1e6, 10000.0)
    assert legacy["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert _rope_as_read(legacy) == _rope_as_read(saved)


def test_keys_already_there_are_kept_and_a_config_without_rope_only_gains_its_dtype():
    saved = LlamaConfig(**SMALL, rope_theta=100000.0).to_dict()
    saved["rope_theta"] = 100000.0
    assert with_legacy_keys(saved) == saved
    assert with_legacy_keys({"model_type": "x", "dtype": "float16"}) == {"model_type": "x", "dtype": "float16",
                                                                          "torch_dtype": "float16"}


def test_legacy_keys_that_would_change_what_transformers_5_reads_are_not_written(monkeypatch):
    import qrealign.export.compat as compat

    saved = LlamaConfig(**SMALL, rope_theta=100000.0).to_dict()
    monkeypatch.setattr(compat, "_rope_as_read", lambda config: config.get("rope_theta"))  # any change "differs"
    assert compat.with_legacy_keys(saved).get("rope_theta") is None


@pytest.mark.parametrize("extra_key", ["extra_special_tokens", "additional_special_tokens"])
def test_tokenizer_config_takes_the_generic_class_and_the_old_special_token_key(extra_key):
    config = {"tokenizer_class": "TokenizersBackend", extra_key: ["<a>", "<b>"], "pad_token": "<pad>"}
    legacy = tokenizer_with_legacy_keys(config)
    assert legacy == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"],
                      "pad_token": "<pad>"}
    named = {"tokenizer_class": "GemmaTokenizer", "extra_special_tokens": {"image": "<img>"}}
    assert tokenizer_with_legacy_keys(named) == named  # a mapping is transformers 4's own form


def test_a_config_transformers_cannot_read_back_is_left_as_it_was():
    saved = {"model_type": "no-such-architecture", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    assert with_legacy_keys(saved) == saved  # no guess without the check, and no failed export
