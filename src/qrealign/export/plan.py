"""What a qrealign scheme becomes in compressed-tensors, decided before anything heavy runs.

compressed-tensors can state both of Q-realign's W8A8 flavours exactly: asymmetric per-channel
int8 weights (with `weight_zero_point`) and asymmetric dynamic per-token int8 activations, or
the symmetric INT8_W8A8 shape engines run. The serving engines are narrower than the format:
vLLM's int8 W8A8 path takes symmetric weights only (its `_is_dynamic_token_w8a8` requires
`weight_quant.symmetric`; asymmetric *activations* run through its azp kernels), and SGLang's
int8 W8A8 quantizes activations symmetrically whatever the checkpoint says. So the default
export writes what was calibrated, and `symmetric_weights` / `symmetric_activations` trade
exactness for engine reach; every such trade is listed in `deviations` and in the model card.
The honest way to an exact vLLM model is to calibrate the `-sym` presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import QrealignError
from ..quant.scheme import QuantArgs, Scheme

FORMAT = "compressed-tensors"
WEIGHT_ONLY_BITS = range(2, 9)  # pack-quantized stores 1..8-bit codes; vLLM serves 4 and 8
ENGINE_WEIGHT_ONLY_BITS = (4, 8)


class ExportError(QrealignError):
    """The run cannot be exported as asked (inexpressible scheme, unreadable run, bad output path)."""


def require_compressed_tensors(what: str, error: type[Exception] = ExportError) -> None:
    """compressed-tensors is an optional extra (`qrealign[export]`): say so before the model loads,
    not as a traceback after every code is computed (review 69)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise error(f"{what}: the compressed-tensors library is not installed: pip install "
                    "'qrealign[export]', or in a checkout pip install -e '.[export]' (./run installs it)")


@dataclass(frozen=True)
class ExportPlan:
    scheme: Scheme                  # as calibrated
    weights: QuantArgs              # as exported
    activations: QuantArgs | None   # as exported (None: weight-only)
    ct_format: str                  # "int-quantized" | "pack-quantized"
    dtype: str                      # storage dtype of everything that is not an integer code
    deviations: tuple[str, ...] = field(default_factory=tuple)
    runtimes: dict = field(default_factory=dict)

    @property
    def matches_calibration(self) -> bool:
        """Same integer grid and activation rule as the calibrated fake-quant model (dtype aside)."""
        return self.weights == self.scheme.weights and self.activations == self.scheme.activations

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "ct_format": self.ct_format,
            "scheme": self.scheme.name,
            "calibrated": self.scheme.to_dict(),
            "exported": {"weights": asdict(self.weights),
                         "activations": asdict(self.activations) if self.activations else None},
            "dtype": self.dtype,
            "matches_calibration": self.matches_calibration,
            "deviations": list(self.deviations),
            "runtimes": dict(self.runtimes),
        }

    def ct_config(self, ignore: list[str]):
        """The compressed-tensors QuantizationConfig: every nn.Linear except `ignore`."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        w = self.weights
        wargs = QuantizationArgs(num_bits=w.num_bits, type="int", symmetric=w.symmetric, strategy=w.strategy,
                                 group_size=w.group_size if w.strategy == "group" else None, dynamic=False)
        aargs = None
        if self.activations is not None:
            a = self.activations
            aargs = QuantizationArgs(num_bits=a.num_bits, type="int", symmetric=a.symmetric, strategy="token",
                                     dynamic=True)
        group = QuantizationScheme(targets=["Linear"], weights=wargs, input_activations=aargs)
        return QuantizationConfig(config_groups={"group_0": group}, ignore=sorted(ignore), format=self.ct_format)


MARLIN_GROUP_SIZES = (32, 64, 128)  # vLLM's Marlin WNA16 kernels, read from its source


def plan_export(scheme: Scheme, dtype: str = "bfloat16", symmetric_weights: bool = False,
                symmetric_activations: bool = False) -> ExportPlan:
    """Check that `scheme` can be written as compressed-tensors and say what the export computes."""
    w, a = scheme.weights, scheme.activations
    if w is None:
        raise ExportError(f"scheme {scheme.name} quantizes no weights: nothing to export as compressed-tensors")
    if w.strategy not in ("channel", "group"):
        raise ExportError(f"scheme {scheme.name}: weight strategy {w.strategy!r} has no compressed-tensors form here")
    if a is not None:
        if a.num_bits != 8:
            raise ExportError(
                f"scheme {scheme.name}: {a.num_bits}-bit activations cannot be exported; compressed-tensors "
                f"engines run int activations at 8 bits only (W8A8, or weight-only W4A16/W8A16)")
        if not a.dynamic or a.strategy != "token":
            raise ExportError(
                f"scheme {scheme.name}: static ({a.strategy}) activation ranges are not exported; only dynamic "
                f"per-token int8 activations (W8A8) are")
        if w.num_bits != 8:
            raise ExportError(
                f"scheme {scheme.name}: {w.num_bits}-bit weights with int8 activations (W{w.num_bits}A8) have no "
                f"engine-backed compressed-tensors form; export W8A8 or weight-only W{w.num_bits}A16")
        if w.strategy != "channel":
            raise ExportError(
                f"scheme {scheme.name}: group-wise weights with int8 activations have no engine-backed form "
                "(vLLM's and SGLang's int8 W8A8 kernels take per-channel weight scales); calibrate W8A8 "
                "per channel")
    elif w.num_bits not in WEIGHT_ONLY_BITS:
        raise ExportError(f"scheme {scheme.name}: {w.num_bits}-bit weights cannot be packed (2..8 bits)")
    if a is None and symmetric_activations:
        raise ExportError(f"scheme {scheme.name} is weight-only: there are no activations to make symmetric "
                          "(drop --symmetric-activations)")

    if symmetric_weights and w.symmetric:
        raise ExportError(f"scheme {scheme.name} has symmetric weights already: there is nothing to re-quantize "
                          "(drop --symmetric-weights)")
    if a is not None and symmetric_activations and a.symmetric:
        raise ExportError(f"scheme {scheme.name} has symmetric activations already (drop --symmetric-activations)")
    weights = replace(w, symmetric=True) if symmetric_weights else w
    acts = replace(a, symmetric=True) if (a is not None and symmetric_activations) else a
    deviations = []
    if weights != w:
        deviations.append("weights re-quantized symmetric (scale = max(|clipped min|, |clipped max|) / "
                          f"{2 ** (w.num_bits - 1) - 1}, learned clipping kept); calibrated asymmetric")
    if acts != a:
        deviations.append("activations quantized symmetric per token at run time; calibrated asymmetric")
    if dtype != "float32":
        deviations.append(f"embeddings, norms, lm_head, biases and quantization scales stored in {dtype}; "
                          "the calibrated model is evaluated in float32")
    return ExportPlan(scheme=scheme, weights=weights, activations=acts,
                      ct_format="int-quantized" if acts is not None else "pack-quantized", dtype=dtype,
                      deviations=tuple(deviations), runtimes=_runtimes(weights, acts))


def _runtimes(w: QuantArgs, a: QuantArgs | None) -> dict:
    """What each runtime does with this checkpoint. transformers was run here; vLLM and SGLang were
    read from their source (vLLM compressed_tensors.py + int8_quant_kernels.cu, SGLang
    compressed_tensors.py + compressed_tensors_w8a8_int8.py), not run: no GPU engine is installed."""
    unverified = " (read from source, not run here)"
    if a is not None:
        if a.symmetric:
            tf = ("qrealign.models.load_model: dequantized weights + per-token absmax/127 activations, the "
                  "calibrated arithmetic; plain from_pretrained runs compressed-tensors' reference forward, whose "
                  "absmax/127.5 activation scale is a slightly different model")
            vllm_act = "symmetric dynamic per-token int8, scale absmax/127 as calibrated"
            sglang = "int8 W8A8, symmetric dynamic per-token activations"
        else:
            tf = ("qrealign.models.load_model: dequantized weights + the calibrated asymmetric per-token rule, "
                  "the calibrated arithmetic; plain from_pretrained runs compressed-tensors' reference forward, "
                  "which rounds after adding the zero point (rare one-code differences)")
            vllm_act = "asymmetric dynamic per-token int8 via azp kernels, same grid as calibrated"
            sglang = ("loads but quantizes activations symmetrically anyway (its int8 W8A8 apply ignores the "
                      "zero point): a different model; calibrate W8A8-sym for SGLang")
        if w.symmetric:
            vllm = f"int8 W8A8 (CompressedTensorsW8A8Int8): {vllm_act}"
        else:
            vllm = ("refused: vLLM's int8 W8A8 needs symmetric weights; re-export with --symmetric-weights "
                    "(inexact) or calibrate W8A8-sym (exact)")
            sglang = "refused: int8 W8A8 needs symmetric weights"
        return {"transformers": tf, "vllm": vllm + unverified, "sglang": sglang + unverified}
    group = w.group_size if w.strategy == "group" else "per-channel"
    if w.symmetric:
        tf = "loads compressed or with CompressedTensorsConfig(dequantize=True); decodes to the calibrated weights"
        vllm = f"WNA16 (Marlin/Machete) int{w.num_bits}, group {group}"
        sglang = "WNA16 through vLLM's kernels (needs vllm installed)"
    else:
        tf = ("load with CompressedTensorsConfig(dequantize=True) (qrealign.models.load_model does): "
              "compressed-tensors 0.20 cannot build the packed zero-point layout when loading compressed; "
              "decodes to the calibrated weights")
        vllm = f"WNA16 with zero points in recent vLLM (older releases need symmetric weights), group {group}"
        sglang = "refused in the version read (WNA16 requires symmetric weights)"
    if w.strategy == "group" and w.group_size not in MARLIN_GROUP_SIZES:
        sizes = ", ".join(map(str, MARLIN_GROUP_SIZES))
        vllm += f" (Marlin takes groups of {sizes} or per channel: group {group} may be refused)"
    if w.num_bits not in ENGINE_WEIGHT_ONLY_BITS:
        vllm = sglang = f"not served: WNA16 supports {ENGINE_WEIGHT_ONLY_BITS} bits"
    return {"transformers": tf, "vllm": vllm + unverified, "sglang": sglang + unverified}
