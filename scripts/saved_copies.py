"""How many float32 copies of a block's weights one calibration step keeps for its backward
(review 71 estimated about five; docs/performance.md). A wide tiny Llama (width 512), W8A8 and
W4A8 with learned rounding; a pack hook sums the distinct storages autograd saves before each
backward call (the prompts are short, so the weights' copies dominate).

Run: PYTHONPATH=src python scripts/saved_copies.py"""

import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig
from qrealign.models.tiny import tiny_model

SHAPE = dict(num_hidden_layers=2, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=8)


def main() -> None:
    torch.set_num_threads(1)  # a small measurement: one thread
    seen: dict = {}
    per_step: list[int] = []

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        per_step.append(sum(seen.values()))
        seen.clear()
        return real_backward(self, *args, **kwargs)

    calib = CalibrationSet([f"tell me something about topic number {i} please" for i in range(8)], [1, 0] * 4)
    torch.Tensor.backward = backward
    try:
        for scheme, options in (("W8A8", {"lwc": False}), ("W4A8", {})):
            model, tok = tiny_model("llama", **SHAPE)
            block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
            per_step.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                quantize(model, tok, calib, scheme, CalibConfig(epochs=1, batch_size=4, learn_rounding=True, **options),
                         progress=False)
            print(f"{scheme} {options}: block weights {block_bytes / 2**20:.1f} MiB in float32; saved for one "
                  f"backward at most {max(per_step) / 2**20:.1f} MiB = {max(per_step) / block_bytes:.2f} copies")
    finally:
        torch.Tensor.backward = real_backward


if __name__ == "__main__":
    main()
