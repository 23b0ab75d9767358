"""The one-call quantization verb: calibrate, then write a run directory that rebuilds the model."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from ..errors import QrealignError
from ..quant.scheme import Scheme, get_scheme
from ..utils import FINGERPRINT_VERSION, check_out_dir, model_fingerprint
from .artifact import META_FILE, save_quantized
from .data import CalibrationSet
from .checkpoints import checkpoint_lock, remove_checkpoint, say_set_aside
from .engine import CalibConfig, CalibResult, _calibrate
from .losses import BlockLoss


# The run methods each command writes (`qrealign.json` "method"): quantize, realign.
QUANTIZE_METHODS = {False: ("rtn", "omniquant"), True: ("qrealign",)}


def check_run_out(out, realign: bool) -> None:
    """`out` may replace only an earlier run of the same command: a realign run is no earlier
    quantize run (and back)."""
    check_out_dir(out, META_FILE, kind="quantized", same={"method": QUANTIZE_METHODS[realign]})


def quantize(
    model,
    tokenizer,
    calibration: CalibrationSet,
    scheme: str | Scheme = "W8A8",
    config: CalibConfig | None = None,
    out: str | Path | None = None,
    loss: BlockLoss | None = None,
    device=None,
    progress: bool = True,
    extra_metadata: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    model_fp: str | None = None,
) -> CalibResult:
    """Quantize `model` in place (RTN or OmniQuant-style block-wise calibration).

    With `out`, learned parameters are checkpointed after every block in the sibling `.<out>.checkpoint`
    (an interrupted run resumes there) and the finished run is written atomically to `out`.
    `model_fp`: the model's `model_fingerprint`, when the caller has just computed it (hashing a
    7B model's weights in memory takes seconds; a run hashes them once)."""
    if not isinstance(calibration, CalibrationSet):  # else an AttributeError deep in the engine
        raise QrealignError(f"calibration must be a CalibrationSet (qrealign.calibrate.build_calibration()), got "
                            f"{type(calibration).__name__}")
    cfg = config or CalibConfig()
    scheme = get_scheme(scheme)
    source, adapter = model_source(model)
    fingerprint = model_fp or model_fingerprint(model)
    out = Path(out) if out else None
    if out is not None and source is None:
        warnings.warn("this model records no folder it was loaded from (built or changed in memory): the run in "
                      f"{out} will hold its parameters, but load_quantized, eval and export cannot rebuild it. Save "
                      "the model (save_pretrained) and load it with qrealign.load_model to get a loadable run",
                      stacklevel=2)
    if out is not None:
        check_run_out(out, realign=(extra_metadata or {}).get("method") == "qrealign")  # before calibrating
    ckpt = checkpoint_path(out, checkpoint_dir)
    if checkpoint_dir and out is not None:
        check_checkpoint_dir(ckpt, out)
    t0 = time.time()
    # Held through the save and the checkpoint's removal: a second copy of the command started
    # meanwhile must not replay a checkpoint that is being deleted (`calibrate` is `_calibrate` in this lock).
    with checkpoint_lock(ckpt):
        result = _calibrate(model, tokenizer, calibration, scheme, cfg, loss, ckpt, device, progress, None,
                            fingerprint)
        if out is not None:
            from ..evaluate.overlap import provenance_entry

            extra = dict(extra_metadata or {})
            # other prompts that shaped the run (e.g. the probes' training prompts) join the calibration's
            more_provenance = extra.pop("provenance", None) or {}
            metadata = {
                "source": source,
                "adapter": adapter,
                "parent": source,
                "model_fingerprint": fingerprint,
                "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # what the fingerprint hashed
                "fingerprint_version": FINGERPRINT_VERSION,
                "model_type": model.config.model_type,
                "method": cfg.method,
                "scheme": scheme.to_dict(),
                "config": cfg.to_dict(),
                "loss": repr(loss) if loss is not None else "ReconstructionLoss()",
                "run_fingerprint": result.fingerprint,
                "calibration": {"split": calibration.split, "n": len(calibration.prompts),
                                "malicious_ratio": calibration.malicious_ratio},
                "provenance": {**provenance_entry("calibration", calibration.records(), calibration.split),
                               **more_provenance},
                "layers": result.layer_logs,
                "seconds": round(time.time() - t0, 2),
                **extra,
            }
            save_quantized(out, result.params, metadata)
            from .artifact import read_params

            result.params = read_params(out)  # the checkpoint's block files go next
            if ckpt is not None:
                remove_checkpoint(ckpt)
                if progress:
                    say_set_aside(ckpt, lambda msg: print(msg, file=sys.stderr))
    return result


def model_source(model) -> tuple[str | None, str | None]:
    """(where the model's weights can be loaded again, its merged adapter): what `load_model`
    recorded; else where transformers loaded it from (a folder, or a hub id), whose weights the
    run's fingerprint check at load compares with the ones calibrated; None for a model built or
    fine-tuned in memory (qrealign's fine-tuning clears both)."""
    from ..models.load import looks_like_path

    config = model.config
    if getattr(config, "qrealign_source", None):  # load_model's stamp
        return config.qrealign_source, getattr(config, "qrealign_adapter", None)
    name = getattr(config, "_name_or_path", "") or ""
    if name and (Path(name).expanduser() / "config.json").is_file():
        return str(Path(name).expanduser().resolve()), None
    if name and not looks_like_path(name) and not Path(name).exists():
        return name, None  # a hub id
    return None, None


def checkpoint_path(out: str | Path | None, checkpoint_dir: str | Path | None) -> Path | None:
    """Where a run checkpoints: `checkpoint_dir`, else the sibling `.<out>.checkpoint`, else nowhere."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    return Path(out).with_name(f".{Path(out).name}.checkpoint") if out else None


def check_checkpoint_dir(ckpt: Path, out: Path) -> None:
    """A user-chosen checkpoint folder must not be, hold or sit inside the run's output: the
    finished run replaces `out` and then clears the checkpoint."""
    a, b = ckpt.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise QrealignError(f"checkpoint_dir {ckpt} and out {out} must be separate folders (neither inside the other)")
