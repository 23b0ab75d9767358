"""Learnable Equivalent Transformation (LET): smoothing scales between a producer (a norm, or
v_proj) and the linears that consume its output.

For a pair (smooth -> balance) with scale s: producer outputs are divided by s and consumers'
input columns multiplied by s, so the FP function is unchanged while activation outliers move
into the weights (SmoothQuant; OmniQuant learns s). The q <-> k scale divides q rows and
multiplies k rows: QK^T is unchanged without RoPE, and with RoPE only when s[d] == s[d + D/2]
(`rope_invariant_qk`); the paper's per-channel version is a deliberate, non-equivalent knob.

Scales act functionally during training (`transformed_params` feeds torch.func.functional_call)
and are folded into the weights in place when the block is done (`fold_`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.registry import ArchSpec, HeadLayout

SCALE_FLOOR = 1e-2  # OmniQuant truncates |s| < 1e-2 each step


def _expand_kv(s: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """A per-(kv head, dim) vector repeated over the query heads that share each kv head."""
    return s.view(layout.num_kv_heads, 1, layout.head_dim).expand(
        layout.num_kv_heads, layout.group, layout.head_dim).reshape(-1)


class LETParams(nn.Module):
    """The learnable scales of one block, named by registry pair ("qkv", "fc1", "out", "qk")."""

    def __init__(self, spec: ArchSpec, block: nn.Module, layout: HeadLayout, pairs: tuple[str, ...],
                 rope_invariant_qk: bool = False):
        super().__init__()
        self.spec, self.layout, self.rope_invariant_qk = spec, layout, rope_invariant_qk
        self.scales = nn.ParameterDict()
        self.norm_pairs = {p.name: p for p in spec.smooth_pairs if p.name in pairs}
        device = next(block.parameters()).device
        for name, pair in self.norm_pairs.items():
            width = block.get_submodule(pair.balance[0]).in_features
            self.scales[name] = nn.Parameter(torch.ones(width, device=device))
        if "out" in pairs and spec.vo_pair:
            self.scales["out"] = nn.Parameter(torch.ones(layout.num_kv_heads * layout.head_dim, device=device))
        if "qk" in pairs and spec.qk_pair:
            width = layout.num_kv_heads * (layout.head_dim // 2 if rope_invariant_qk else layout.head_dim)
            self.scales["qk"] = nn.Parameter(torch.ones(width, device=device))

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_smoothquant(self, block: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float) -> None:
        """s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha) (SmoothQuant), per pair, from the
        absmax of each consumer's input over the calibration prompts. The weight max is taken
        over all consumers of the pair (the authors used only the first)."""
        for name, pair in self.norm_pairs.items():
            x = act_absmax[pair.balance[0]]
            w = torch.stack([block.get_submodule(b).weight.abs().amax(dim=0) for b in pair.balance]).amax(dim=0)
            self.scales[name].copy_(_smooth(x, w, alpha))
        if "out" in self.scales:
            o_name = self.spec.vo_pair[1]
            lay = self.layout
            x = act_absmax[o_name].view(lay.num_kv_heads, lay.group, lay.head_dim).amax(dim=1).reshape(-1)
            w = block.get_submodule(o_name).weight.abs().amax(dim=0)
            w = w.view(lay.num_kv_heads, lay.group, lay.head_dim).amax(dim=1).reshape(-1)
            self.scales["out"].copy_(_smooth(x, w, alpha))

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.scales.values():
            small = p.abs() < SCALE_FLOOR
            p[small] = torch.where(p[small] < 0, -SCALE_FLOOR, SCALE_FLOOR)

    # ---- the transformation ---------------------------------------------------------------
    def qk_scale(self) -> torch.Tensor:
        s = self.scales["qk"]
        if self.rope_invariant_qk:
            half = s.view(self.layout.num_kv_heads, self.layout.head_dim // 2)
            s = torch.cat([half, half], dim=1).reshape(-1)
        return s

    def transformed_params(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter path: transformed tensor} for every parameter a scale touches."""
        out: dict[str, torch.Tensor] = {}

        def weight(path: str) -> torch.Tensor:
            key = f"{path}.weight"
            return out.get(key, block.get_submodule(path).weight)

        for name, pair in self.norm_pairs.items():
            s = self.scales[name]
            norm = block.get_submodule(pair.smooth)
            gamma = (norm.weight + self.spec.norm_offset) / s
            out[f"{pair.smooth}.weight"] = gamma - self.spec.norm_offset
            if getattr(norm, "bias", None) is not None:
                out[f"{pair.smooth}.bias"] = norm.bias / s
            for b in pair.balance:
                out[f"{b}.weight"] = weight(b) * s.view(1, -1)
        if "out" in self.scales:
            v, o = self.spec.vo_pair
            s = self.scales["out"]
            out[f"{v}.weight"] = weight(v) / s.view(-1, 1)
            vb = block.get_submodule(v).bias
            if vb is not None:
                out[f"{v}.bias"] = vb / s
            out[f"{o}.weight"] = weight(o) * _expand_kv(s, self.layout).view(1, -1)
        if "qk" in self.scales:
            q, k = self.spec.qk_pair
            s = self.qk_scale()
            out[f"{q}.weight"] = weight(q) / _expand_kv(s, self.layout).view(-1, 1)
            out[f"{k}.weight"] = weight(k) * s.view(-1, 1)
            qb, kb = block.get_submodule(q).bias, block.get_submodule(k).bias
            if qb is not None:
                out[f"{q}.bias"] = qb / _expand_kv(s, self.layout)
            if kb is not None:
                out[f"{k}.bias"] = kb * s
        return out

    @torch.no_grad()
    def fold_(self, block: nn.Module) -> None:
        """Write the transformation into the block's weights and reset the scales to 1."""
        for path, tensor in self.transformed_params(block).items():
            block.get_parameter(path).copy_(tensor)
        for p in self.scales.values():
            p.fill_(1.0)


def _smooth(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    x = x_absmax.float().clamp(min=1e-5)
    w = w_absmax.float().clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def cast_keeping_folded_norms(block: nn.Module, spec: ArchSpec, dtype: torch.dtype, device=None) -> None:
    """`block.to(device, dtype)`, except that in a 16-bit dtype the norms a smoothing scale folds
    into stay float32 where they multiply by (offset + w) (Gemma). Such a norm stores
    (1 + w) / s - 1, near -1 for a large s, and bf16 keeps few bits of the small multiplier: on a
    tiny Gemma-2 with scales 10-40 the folded bf16 model's logit error was 7x the unfolded one's
    (review 67). Gemma's norms compute in float32 anyway (`1 + weight.float()`), so nothing else
    changes; an export casts them itself and says what that costs (`check_norm_storage`)."""
    keep = {}
    if spec.norm_offset and dtype != torch.float32:
        keep = {pair.smooth: block.get_submodule(pair.smooth).weight.detach().float().clone()
                for pair in spec.smooth_pairs}
    block.to(dtype) if device is None else block.to(device, dtype)
    for name, exact in keep.items():
        norm = block.get_submodule(name)
        norm.float()
        with torch.no_grad():
            norm.weight.copy_(exact)  # the values before the cast rounded them
