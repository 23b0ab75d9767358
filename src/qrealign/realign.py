"""`realign`: Q-realign in one call: safety-aware quantization of a fine-tuned model.

    model, tok = qrealign.load_model("runs/attacked")
    probes = qrealign.probes.load_probes("runs/probes")         # fit on the ALIGNED model
    qrealign.realign(model, tok, probes, scheme="W8A8", out="runs/realigned")

The model is quantized in place (fake quantization, activations per token) and the run
directory rebuilds it with `qrealign.calibrate.load_quantized`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from .calibrate.api import quantize
from .calibrate.data import CalibrationSet, build_calibration
from .calibrate.engine import CalibConfig, CalibResult
from .calibrate.safety import SafetyLoss
from .errors import NoSafetyLayers, QrealignError
from .quant.scheme import Scheme


def realign(
    model,
    tokenizer,
    probes,
    calibration: CalibrationSet | None = None,
    scheme: str | Scheme = "W8A8",
    config: CalibConfig | None = None,
    out: str | Path | None = None,
    device=None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    layers_from: float | None = None,
    **loss_options,
) -> CalibResult:
    """Quantize `model` with the Q-realign objective.

    `probes`: a ProbeSet (or its directory) fit on the aligned model. `calibration`: default the
    bundled "calib" split at the paper's 75 % malicious ratio. `loss_options` go to
    `SafetyLoss` (lam, margin, probe_loss, layers, recon_on_malicious, normalize, sink_weight,
    benign_side, benign_margin); the defaults are the paper's objective. `layers_from`: a depth
    fraction, e.g. 0.5 = the safety term only on the second half of the blocks (a depth-relative
    form of `layers`, so one setting transfers across model sizes)."""
    from .probes.store import load_probes

    if isinstance(probes, (str, Path)):
        probes = load_probes(probes)
    probes.check_compatible(model)
    active = safety_layers(probes, loss_options.get("layers"), layers_from)
    if layers_from is not None:
        loss_options["layers"] = active
    calibration = calibration or build_calibration()
    loss = SafetyLoss.from_probes(probes, **loss_options)
    if loss.benign_side and probes.target != "paper":
        warnings.warn(f"benign_side keeps benign prompts on class 0 of the probe; for the {probes.target!r} target "
                      "class 0 is not 'benign', so the term has no over-refusal meaning there", stacklevel=2)
    meta = {"method": "qrealign", "probes": {"target": probes.target, "id": loss.probe_id,
                                             "usable_layers": probes.usable_layers}, "safety_layers": list(active)}
    parents = getattr(probes, "parents", None)
    return quantize(model, tokenizer, calibration, scheme, config or CalibConfig(), out=out, loss=loss,
                    device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                    extra_metadata={**meta, "probe_parents": parents() if callable(parents) else None})


def safety_layers(probes, layers=None, layers_from: float | None = None) -> tuple[int, ...]:
    """The blocks that will get the safety term: the chosen ones (`layers`, or from the depth
    fraction `layers_from`, default all) whose probe is usable. Raises NoSafetyLayers if none."""
    if layers_from is not None:
        if layers is not None:
            raise QrealignError("give either layers or layers_from, not both")
        layers = layers_from_fraction(probes.num_layers, layers_from)
    rule = SafetyLoss.from_probes(probes, layers=layers)  # the loss's own rule: usable and chosen
    active = tuple(layer for layer in range(probes.num_layers) if rule.active(layer))
    if not active:
        raise NoSafetyLayers("the safety term is active on no block (the chosen layers are out of range or their "
                             f"probes are unusable; usable: {probes.usable_layers}): this would be plain "
                             "reconstruction, run `qrealign quantize --method omniquant` for that")
    return active


def layers_from_fraction(num_layers: int, fraction: float) -> tuple[int, ...]:
    """Blocks from ceil(fraction * num_layers) to the last: 0.5 of 30 -> 15..29, of 5 -> 3..4."""
    if not 0.0 <= fraction < 1.0:
        raise QrealignError(f"layers_from must be in [0, 1), got {fraction}")
    return tuple(range(min(math.ceil(fraction * num_layers - 1e-9), num_layers - 1), num_layers))
