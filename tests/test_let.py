"""LET is an equivalence: with quantization off, folding the scales leaves every registered
architecture's block output unchanged."""

import pytest
import torch
from torch.func import functional_call

from qrealign.calibrate.capture import block_output, capture_block_inputs
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.models.registry import block_pairs, block_types, get_arch, get_blocks, head_layout
from qrealign.models.tiny import TINY_MODEL_TYPES, tiny_model
from qrealign.quant.let import LETParams
from qrealign.quant.qlinear import set_quant_state, wrap_linears
from qrealign.quant.scheme import get_scheme


def _block_and_inputs(model_type):
    model, tok = tiny_model(model_type, seed=1)
    batch = make_batches(tok, CalibrationSet(["hello there", "a longer prompt about bread"], [0, 1]), 2)[0]
    inputs = capture_block_inputs(model, batch, torch.device("cpu"))
    block = get_blocks(model)[0]
    kw = inputs.kwargs_by_type[block_types(model)[0]]
    return model, block, inputs.hidden, kw


def _random_let(model, block, rope_invariant_qk):
    spec = get_arch(model)
    let = LETParams(spec, block, head_layout(model.config), tuple(block_pairs(model)), rope_invariant_qk)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in let.scales.values():
            p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    return let


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fold_leaves_fp_block_output_unchanged(model_type):
    model, block, x, kw = _block_and_inputs(model_type)
    with torch.no_grad():
        ref = block_output(block(x, **kw)).clone()
        wrap_linears(block, get_arch(model).linears, get_scheme("W8A8"), lwc=True)
        set_quant_state(block, weight=False, act=False)
        let = _random_let(model, block, rope_invariant_qk=True)
        during = block_output(functional_call(block, let.transformed_params(block), (x,), kw))
        let.fold_(block)
        after = block_output(block(x, **kw))
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()
    assert rel(during) <= 1e-5
    assert rel(after) <= 1e-5
    assert all(torch.all(p == 1) for p in let.scales.values())


def test_per_channel_qk_scale_is_not_rope_invariant():
    """The paper's per-channel q<->k scale changes the function under RoPE: a documented,
    deliberate extra degree of freedom, not an equivalence."""
    model, block, x, kw = _block_and_inputs("llama")
    with torch.no_grad():
        ref = block_output(block(x, **kw)).clone()
        spec = get_arch(model)
        let = LETParams(spec, block, head_layout(model.config), ("qk",), rope_invariant_qk=False)
        let.scales["qk"].copy_(torch.exp(torch.randn_like(let.scales["qk"])))
        let.fold_(block)
        after = block_output(block(x, **kw))
    assert ((after - ref).norm() / ref.norm()).item() > 1e-3


def test_registry_skips_qk_where_a_head_norm_breaks_it():
    for model_type, has_qk in [("llama", True), ("qwen3", False), ("gemma3_text", False), ("gemma2", True)]:
        model, _ = tiny_model(model_type)
        assert ("qk" in block_pairs(model)) is has_qk


@pytest.mark.parametrize("model_type", ["gemma2", "llama"])
def test_a_folded_gemma_norm_stays_float32_in_a_bf16_block(model_type):
    """Review 67: LET folded into Gemma's (1 + w) norm stores (1 + w) / s - 1, near -1 for a large s,
    and casting the block back to bf16 lost a few to tens of per cent of that channel's multiplier.
    Those norms now stay float32 (Gemma computes them in float32 anyway); other norms are cast."""
    from qrealign.quant.let import cast_keeping_folded_norms

    model, block, x, kw = _block_and_inputs(model_type)
    spec = get_arch(model)
    let = LETParams(spec, block, head_layout(model.config), tuple(block_pairs(model)), False)
    with torch.no_grad():
        for p in let.scales.values():
            p.copy_(10 + 30 * torch.rand_like(p))  # SmoothQuant-sized scales
        let.fold_(block)
        ref = block_output(block(x, **kw)).clone()
        exact = {pair.smooth: block.get_submodule(pair.smooth).weight.clone() for pair in spec.smooth_pairs}
        cast_keeping_folded_norms(block, spec, torch.bfloat16)
        norm_dtypes = {block.get_submodule(name).weight.dtype for name in exact}
        half = lambda v: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else (  # noqa: E731
            tuple(half(t) for t in v) if isinstance(v, tuple) else v)
        kw16 = {k: half(v) if k == "position_embeddings" else v for k, v in kw.items()}  # the mask stays float32
        out = block_output(block(x.bfloat16(), **kw16)).float()
    assert block.get_submodule(spec.linears[0]).weight.dtype == torch.bfloat16
    if spec.norm_offset:
        assert norm_dtypes == {torch.float32}
        assert all(torch.equal(block.get_submodule(n).weight, w) for n, w in exact.items())
        # what a plain bf16 cast of the norm would have done to its multiplier (1 + w)
        w = next(iter(exact.values()))
        lost = ((w.bfloat16().float() + 1) - (w + 1)).abs() / (w + 1).abs()
        assert lost.max() > 0.01
    else:
        assert norm_dtypes == {torch.bfloat16}
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.05
