"""Errors that reach the user as one line.

Every expected failure (bad file, bad value, missing weights, ...) raises a subclass of
:class:`SchedsearchError` whose message names the field or file, the bad value and the fix.
The CLI prints ``error: <message>`` and exits with :attr:`SchedsearchError.exit_code`;
library users get an ordinary exception.
"""

from __future__ import annotations


class SchedsearchError(Exception):
    """Base class of all user-facing errors; ``str(err)`` is a single line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ScheduleError(SchedsearchError, ValueError):
    """A schedule file or object that breaks the contract (see schedule.schema.json)."""


class ModelLoadError(SchedsearchError):
    """A model that cannot be loaded: missing directory/weights, unsupported model_type."""


class CalibrationError(SchedsearchError, ValueError):
    """A calibration manifest or image that cannot be used."""


class ImageError(CalibrationError):
    """An image that cannot be used: missing, undecodable, too large or elongated, no faithful RGB view."""


class IncompatibleScheduleError(ScheduleError):
    """A valid schedule that was made for another model (layer count, fingerprint)."""


class VideoError(CalibrationError):
    """A video that cannot be used: missing, empty, zero frames, corrupt, frames of different sizes, or a model
    family that takes no video."""
