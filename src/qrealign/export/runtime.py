"""Load a compressed-tensors checkpoint so that it computes what the serving engine computes.

transformers' compressed-tensors route runs the library's *reference* forward, which is not the
engines' arithmetic: symmetric dynamic activations get scale absmax/127.5 (vLLM's and SGLang's
kernels, and qrealign's calibration, use absmax/127), asymmetric ones are rounded after adding the
zero point (vLLM rounds first, as calibration does). On a model with strong activation outliers
that alone moves logits well beyond the float noise floor (runs/export: SmolLM2 W8A8-sym RTN).
So `load_model` loads compressed-tensors checkpoints (local or on the hub) dequantized and puts
qrealign's own per-token activation quantizer in front of every quantized linear: evaluating an
export then measures the model an engine serves. One difference stays: the library dequantizes
`(q - z) * s` in the scales' dtype, so a bfloat16 export loads with every weight rounded to
bfloat16 (up to 1/256 relative, a fraction of an 8-bit step), where the engines' int8 kernels apply
the stored scale in float32; `dequantize_warning` says so, and a float32 export loads exactly.
Checkpoints whose activation scheme this cannot reproduce (FP8, static ranges, a quantized KV
cache) keep transformers' own route.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..quant.quantizer import ActQuantizer
from ..quant.scheme import QuantArgs


@dataclass(frozen=True)
class CompressedTensorsCheckpoint:
    activations: QuantArgs | None  # dynamic per-token int activations, or None (weight-only)
    targets: tuple[str, ...]        # class names, module names or "re:" patterns
    ignore: tuple[str, ...]         # the same forms
    dtype: str | None = None        # the checkpoint's floating dtype (its scales'), from config.json

    @classmethod
    def detect(cls, directory: str | Path) -> "CompressedTensorsCheckpoint | None":
        """The checkpoint's activation scheme if qrealign can run it exactly, else None."""
        try:
            config = json.loads((Path(directory) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config) -> "CompressedTensorsCheckpoint | None":
        """`detect` on a config.json already read (a dict), e.g. a hub model's."""
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
            return None
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        if not groups or any((g.get("weights") or {}).get("type", "int") != "int" for g in groups):
            return None
        acts = {json.dumps(g.get("input_activations"), sort_keys=True) for g in groups}
        targets = tuple(t for g in groups for t in g.get("targets") or ())
        if len(acts) != 1 or not targets or qc.get("kv_cache_scheme"):  # a quantized KV cache: not reproduced
            return None
        a = groups[0].get("input_activations")
        dtype = config.get("dtype") or config.get("torch_dtype")
        dtype = dtype if isinstance(dtype, str) else None
        if a is None:
            return cls(None, targets, tuple(qc.get("ignore") or ()), dtype)
        if a.get("type", "int") != "int" or not a.get("dynamic") or a.get("strategy") != "token":
            return None
        args = QuantArgs(int(a["num_bits"]), bool(a.get("symmetric", True)), "token", None, True)
        return cls(args, targets, tuple(qc.get("ignore") or ()), dtype)

    def dequantize_warning(self) -> str | None:
        """What loading dequantized adds to the engines' arithmetic, or None: the library rebuilds
        each weight in its scales' dtype, so below float32 every weight is rounded once more."""
        if self.dtype in (None, "float32"):
            return None
        return (f"this compressed-tensors checkpoint stores its scales in {self.dtype}, and loading it "
                f"dequantized rounds every weight to {self.dtype} (up to 1/256 relative, a fraction of an "
                "8-bit step) where the engines' int8 kernels apply the scale in float32: its evaluation is "
                "close to, not exactly, what they serve; export with dtype float32 to evaluate it exactly")

    def load_kwargs(self) -> dict:
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}

    def attach(self, model: nn.Module) -> int:
        """Quantize the input of every targeted linear per token, as the engines do; returns how many.
        Which linears: compressed-tensors' own rule (`is_match`: names, `re:` prefix patterns and class
        names, for targets and ignore alike), the one vLLM and the library apply."""
        if self.activations is None:
            return 0
        from compressed_tensors.utils.match import is_match

        quantizer = ActQuantizer(self.activations)

        def pre_hook(module, args):
            return (quantizer(args[0]), *args[1:])

        count = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and is_match(name, module, self.targets, self.ignore):
                module.register_forward_pre_hook(pre_hook)
                count += 1
        return count
