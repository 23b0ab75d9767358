"""What a learned-rounding run keeps in host memory once its blocks are done (review 71: about
69 GB at 70B). A random Llama of 16 blocks at width 1024 (about 180 M weights in its linears),
quantized at W4A8 with learned rounding and no training epochs (the memory does not depend on
them), calibrated with a checkpoint folder as `quantize(out=...)` does (the engine's own result,
before `quantize` writes the run), or with `--no-checkpoint` as an API call without `out` or
`checkpoint_dir` (its blocks' parameters in unlinked temporary files). Prints the bytes the result holds in memory, the bytes the
calibrated model's quantized linears hold beside their weights, and the process's peak RSS.

Run: PYTHONPATH=src python scripts/rounding_memory.py [--no-checkpoint]"""

import resource
import sys
import tempfile
from pathlib import Path

import torch

from qrealign.calibrate.data import CalibrationSet
from qrealign.calibrate.engine import CalibConfig, calibrate
from qrealign.models.tiny import tiny_model
from qrealign.quant.qlinear import QuantLinear

SHAPE = dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16)


def main() -> None:
    torch.set_num_threads(1)
    model, tok = tiny_model("llama", **SHAPE)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - \
        model.lm_head.weight.numel()
    calib = CalibrationSet([f"tell me something about topic number {i} please" for i in range(4)], [1, 0] * 2)
    cfg = CalibConfig(epochs=0, batch_size=2, learn_rounding=True, let=False, lwc=False)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None if "--no-checkpoint" in sys.argv[1:] else Path(tmp) / "ckpt"
        result = calibrate(model, tok, calib, "W4A8", cfg, checkpoint_dir=ckpt, progress=False)
        held = getattr(result.params, "_held", result.params)  # a TensorFiles holds only what is not on disk
        result_bytes = sum(t.numel() * t.element_size() for t in held.values())
        beside = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                     for n, p in m.named_parameters() if n != "weight" and n != "bias")
    mib = 2 ** 20
    print(f"quantized linear weights: {weights / 1e6:.1f} M")
    print(f"the result's parameters in memory: {result_bytes / mib:.1f} MiB")
    print(f"the quantized linears' tensors beside their weights: {beside / mib:.1f} MiB")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
