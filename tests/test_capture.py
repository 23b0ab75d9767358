"""Block capture and replay: a block replayed with the captured inputs of its attention type must
compute what the model's own forward computes, also when sliding and full blocks alternate."""

import pytest
import torch

from qrealign.calibrate.behaviour import ModelTail
from qrealign.calibrate.capture import block_output, capture_block_inputs
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.models.registry import block_types, get_blocks
from qrealign.models.tiny import tiny_model

# Longer than the 4-token window below, so a full-attention block replayed with the sliding mask
# (or, on Gemma-3, the local rotary table) gives other hidden states.
PROMPTS = ["explain how a sourdough starter is kept alive over a long winter", "name three rivers"]
MIXED = {
    "gemma2": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3_text": dict(sliding_window=4, rope_local_base_freq=100.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def _mixed_model(model_type):
    return tiny_model(model_type, num_hidden_layers=3, **MIXED[model_type])


@pytest.mark.parametrize("model_type", sorted(MIXED))
def test_block_types_follow_the_configs_layer_types(model_type):
    model, _ = _mixed_model(model_type)
    assert block_types(model) == MIXED[model_type]["layer_types"]


@pytest.mark.parametrize("model_type", sorted(MIXED))
def test_replaying_each_block_with_its_types_inputs_reproduces_the_models_hidden_states(model_type):
    model, tok = _mixed_model(model_type)
    batch = make_batches(tok, CalibrationSet(PROMPTS, [0, 1]), 2)[0]
    inputs = capture_block_inputs(model, batch, torch.device("cpu"))
    assert set(inputs.kwargs_by_type) == {"sliding_attention", "full_attention"}
    enc = batch.enc
    with torch.no_grad():
        ref = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    position_ids=batch.position_ids, output_hidden_states=True).hidden_states
        h = inputs.hidden
        for i, (block, kind) in enumerate(zip(get_blocks(model), block_types(model))):
            h = block_output(block(h, **inputs.kwargs_by_type[kind]))
            if i < len(ref) - 2:  # the last entry of hidden_states is after the final norm
                real = enc.attention_mask.bool()
                assert torch.allclose(h[real], ref[i + 1][real], atol=1e-5), f"block {i} ({kind})"
        # ... and the mixed types matter: the full block replayed with the sliding inputs differs.
        block1 = get_blocks(model)[1]
        first = block_output(get_blocks(model)[0](inputs.hidden, **inputs.kwargs_by_type["sliding_attention"]))
        right = block_output(block1(first, **inputs.kwargs_by_type["full_attention"]))
        wrong = block_output(block1(first, **inputs.kwargs_by_type["sliding_attention"]))
        assert not torch.allclose(right[real], wrong[real], atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(MIXED))
def test_the_tail_reproduces_the_logits_of_a_model_with_mixed_attention(model_type):
    model, tok = _mixed_model(model_type)
    batch = make_batches(tok, CalibrationSet(PROMPTS, [0, 1]), 2)[0]
    inputs = capture_block_inputs(model, batch, torch.device("cpu"))
    enc = batch.enc
    with torch.no_grad():
        h = block_output(get_blocks(model)[0](inputs.hidden, **inputs.kwargs_by_type[block_types(model)[0]]))
        via_tail = ModelTail(model)(h, 0, inputs.kwargs_by_type, enc.last_index)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       position_ids=batch.position_ids).logits
    ref = logits[torch.arange(2), enc.last_index]
    assert torch.allclose(via_tail, ref, atol=1e-4)
