"""config.json and tokenizer_config.json keys for engines that still read checkpoints with
transformers 4.

transformers 5 writes the RoPE base and scaling only inside `rope_parameters`, and the dtype as
`dtype`. transformers 4 knows neither key: it falls back to the architecture's default base
(10000 for Llama, where SmolLM2 was trained at 100000 and Llama-3 at 500000) and drops the
scaling, with no warning. vLLM bundled transformers 4 well into 2026 (vllm-project/vllm#44158),
so an export read there would serve a model with the wrong positions. The legacy keys are
written beside the new ones, and only when transformers 5 still reads the same RoPE from the
result (it prefers a legacy `rope_scaling` over `rope_parameters` when both are present).
The tokenizer fails loudly instead: transformers 4 has no `TokenizersBackend` class and reads
`extra_special_tokens` as a mapping, where transformers 5 writes a list.
"""

from __future__ import annotations

import copy


def with_legacy_keys(config: dict) -> dict:
    """`config` (a config.json dict) plus `rope_theta`, `rope_scaling`, `rope_local_base_freq`,
    `partial_rotary_factor` and `torch_dtype` where transformers 4 needs them and they are
    missing. A config transformers 5 would read differently with them is returned unchanged."""
    out = copy.deepcopy(config)
    if out.get("torch_dtype") is None and out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return out
    nested = all(isinstance(v, dict) for v in rope.values())
    full = rope.get("full_attention", {}) if nested else rope  # Gemma-2/3: one dict per layer type
    legacy = {}
    if full.get("rope_theta") is not None:
        legacy["rope_theta"] = full["rope_theta"]
    if nested and rope.get("sliding_attention", {}).get("rope_theta") is not None:
        legacy["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if full.get("partial_rotary_factor") is not None:
        legacy["partial_rotary_factor"] = full["partial_rotary_factor"]
    if full.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    legacy = {k: v for k, v in legacy.items() if out.get(k) is None}
    if not legacy:
        return out
    candidate = {**out, **legacy}
    try:
        same = _rope_as_read(candidate) == _rope_as_read(out)
    except Exception:  # a model type this transformers cannot build a config for: nothing to compare with
        same = False
    return candidate if same else out


def _rope_as_read(config: dict):
    """The RoPE parameters transformers (the installed one) builds from a config.json dict."""
    from transformers import AutoConfig

    fields = {k: v for k, v in copy.deepcopy(config).items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **fields).rope_parameters


def tokenizer_with_legacy_keys(tokenizer_config: dict) -> dict:
    """`tokenizer_config` (a tokenizer_config.json dict) in the form both transformers 4 and 5
    load: the generic fast-tokenizer class name and the special-token list under its old key.
    Both name the same tokenizer.json, so the token ids do not change."""
    out = copy.deepcopy(tokenizer_config)
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in out:
        out["additional_special_tokens"] = out.pop("extra_special_tokens")
    return out
