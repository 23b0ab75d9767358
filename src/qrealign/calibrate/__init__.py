"""Block-wise calibration: capture, losses, engine, run artefacts."""

from .api import quantize
from .artifact import apply_quant_params, load_quantized, save_quantized
from .data import CalibrationSet, build_calibration
from .engine import CalibConfig, CalibResult, calibrate
from .losses import LossInputs, ReconstructionLoss
from .targets import TeacherTargets, compute_teacher_targets

__all__ = ["CalibConfig", "CalibResult", "CalibrationSet", "LossInputs", "ReconstructionLoss", "TeacherTargets",
           "apply_quant_params", "build_calibration", "calibrate", "compute_teacher_targets", "load_quantized",
           "quantize", "save_quantized"]
