"""genkit's exception types: one small hierarchy, each message names the value seen and the fix."""

from __future__ import annotations

__all__ = [
    "GenkitError",
    "ShapeError",
    "ConfigError",
    "TimeGridError",
    "DataError",
    "NonFiniteLossError",
    "CheckpointError",
    "SolverError",
    "ActionError",
    "TrainingInterrupted",
    "GenkitWarning",
    "DataWarning",
]


class GenkitError(Exception):
    """Base class of every error genkit raises on purpose."""


class ShapeError(GenkitError, ValueError):
    """A tensor has the wrong shape, dtype or device."""


class ConfigError(GenkitError, ValueError):
    """An unknown name (path, solver, family, network, data set) or an invalid option value."""


class TimeGridError(GenkitError, ValueError):
    """A time grid is not monotone, leaves [0, 1], or has too few points."""


class DataError(GenkitError, ValueError):
    """Training or evaluation data is unusable (NaN/inf values, unreadable files, empty sets)."""


class NonFiniteLossError(GenkitError, FloatingPointError):
    """A training loss became NaN or inf and the policy is to stop."""


class CheckpointError(GenkitError, OSError):
    """A checkpoint is missing, truncated, of another family, or of an incompatible version."""


class SolverError(GenkitError, ValueError):
    """A solver cannot run as asked (too few steps, singular field at a grid time, ...)."""


class ActionError(GenkitError, ValueError):
    """An action an environment does not allow in its state (a GFlowNet stepping off the grid, a full slot)."""


class TrainingInterrupted(GenkitError):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) after saving a checkpoint at
    the step it had reached; ``step`` and ``checkpoint`` say which. Re-running the same command resumes."""

    def __init__(self, message: str, step: int, checkpoint: object, signum: int | None = None):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class GenkitWarning(UserWarning):
    """Base class of every warning genkit issues on purpose (``warnings.simplefilter("error", GenkitWarning)``
    makes them errors)."""


class DataWarning(GenkitWarning):
    """Training data is usable but likely wrong for the model (e.g. far from unit scale); said once per fit."""
