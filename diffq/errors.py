"""Errors diffq raises for bad input: one message naming the cause and the fix."""
from __future__ import annotations


class DiffqError(ValueError):
    """Base class of diffq's user-facing errors (bad config, bad file, bad data)."""


class ConfigError(DiffqError):
    """A configuration value is invalid (unknown format, impossible bits, unknown key...)."""


class CheckpointError(DiffqError):
    """A checkpoint file or folder is missing, corrupt, or does not match the model."""


class CalibrationError(DiffqError):
    """Calibration data is unusable (NaN/Inf, empty, too small)."""


class TrainingError(DiffqError):
    """Finetuning cannot go on (a non-finite loss); the last good checkpoint is kept."""
