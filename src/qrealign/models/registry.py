"""Architecture knowledge as data.

Everything qrealign needs to know about a model family lives in one `ArchSpec` entry keyed by the
HF config `model_type`: where the decoder blocks are, which norm/linear pairs can absorb a
smoothing scale (OmniQuant's LET pairs, llm-compressor's `AWQMapping`), and the norm flavour.
The calibration engine replays HF's own decoder layers, so adding an architecture is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class SmoothPair:
    """`smooth` output channels are divided by s; the input channels of every `balance` linear
    are multiplied by s. Exact when `smooth` is a norm (or a linear) feeding only `balance`."""

    name: str  # short id used for parameter names: "qkv", "fc1", "out"
    smooth: str  # module path inside the block (a norm, or a linear for v -> o)
    balance: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    linears: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    smooth_pairs: tuple[SmoothPair, ...] = ()
    # v -> o pair: exact for any head layout once the v scale is repeated over the query groups.
    vo_pair: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")
    # q <-> k scale: QK^T is unchanged without RoPE; with RoPE only if s[d] == s[d + D/2].
    # None where a per-head norm sits between the projection and the product (Qwen3, Gemma3).
    qk_pair: tuple[str, str] | None = ("self_attn.q_proj", "self_attn.k_proj")
    # RMSNorm computes x_hat * (offset + w): 0 for Llama-style, 1 for Gemma's (1 + w).
    norm_offset: float = 0.0
    notes: str = ""
    extra: dict = field(default_factory=dict)


_LLAMA_PAIRS = (
    SmoothPair("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothPair("fc1", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_GEMMA_PAIRS = (
    SmoothPair("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    # Gemma-2/3 normalise the attention output (post_attention_layernorm) before the residual;
    # the MLP input norm is pre_feedforward_layernorm.
    SmoothPair("fc1", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        REGISTRY[model_type] = spec
    return spec


register(ArchSpec(("llama", "mistral", "qwen2"), smooth_pairs=_LLAMA_PAIRS))
register(ArchSpec(("qwen3",), smooth_pairs=_LLAMA_PAIRS, qk_pair=None,
                  notes="q_norm/k_norm sit between q/k_proj and QK^T: no q<->k scale"))
register(ArchSpec(("gemma2",), smooth_pairs=_GEMMA_PAIRS, norm_offset=1.0,
                  notes="(1 + w) RMSNorm; attention logit soft-capping leaves q<->k exact"))
register(ArchSpec(("gemma3_text",), smooth_pairs=_GEMMA_PAIRS, norm_offset=1.0, qk_pair=None,
                  notes="(1 + w) RMSNorm; q_norm/k_norm: no q<->k scale"))


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def get_arch(model_or_config) -> ArchSpec:
    """The registry entry for a model (or its config); a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return spec


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitecture(f"{type(root).__name__} has no module {path!r} ({exc})") from None


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return get_submodule(model, get_arch(model).layers)


def block_types(model: nn.Module) -> list:
    """Each decoder block's attention type, as the model's own forward indexes its per-type inputs.

    Models that mix sliding-window and full attention (Gemma-2/3, Qwen2 with sliding layers) give
    each type its own mask, and Gemma-3 its own rotary table; transformers 5 keys them by
    `config.layer_types[i]` (the blocks carry no `attention_type` any more). A block replayed with
    another type's inputs computes something the model never does."""
    blocks = get_blocks(model)
    types = getattr(model.config, "layer_types", None)
    if types is None:  # older transformers kept the type on the block itself
        return [getattr(b, "attention_type", None) for b in blocks]
    return list(types)[:len(blocks)]


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def head_layout(config) -> HeadLayout:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, kv, head_dim)


def block_pairs(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every smoothing pair the registry finds for this model, as {name: (smooth, balance)}."""
    spec = get_arch(model)
    block = get_blocks(model)[0]
    pairs = {}
    for pair in spec.smooth_pairs:
        get_submodule(block, pair.smooth)
        for b in pair.balance:
            get_submodule(block, b)
        pairs[pair.name] = (pair.smooth, pair.balance)
    if spec.vo_pair:
        pairs["out"] = (spec.vo_pair[0], (spec.vo_pair[1],))
    if spec.qk_pair:
        pairs["qk"] = (spec.qk_pair[0], (spec.qk_pair[1],))
    return pairs


def architecture_difference(a, b) -> str | None:
    """How two models' configs differ in what makes one a version of the other (type, depth, width,
    vocabulary), or None. Contrast probes and the first-token teacher compare states and next-token
    distributions position by position: another architecture has no such correspondence."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
    a, b = getattr(a, "config", a), getattr(b, "config", b)
    diff = [f"{k} {getattr(a, k, None)} vs {getattr(b, k, None)}" for k in keys
            if getattr(a, k, None) != getattr(b, k, None)]
    return "; ".join(diff) or None
