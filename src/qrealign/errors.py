"""One exception type for every problem a user can fix.

The CLI prints a `QrealignError` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class QrealignError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, incompatible artefact."""


class UnsupportedArchitecture(QrealignError):
    pass


class ModelLoadError(QrealignError):
    pass


class IncompatibleArtifact(QrealignError):
    pass


class NoSafetyLayers(QrealignError):
    """Q-realign asked for, but no block would get the safety term (no usable probe layer chosen)."""
