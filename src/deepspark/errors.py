"""The exceptions deepspark raises.

Every user-facing error derives from :class:`DeepsparkError`, so ``except DeepsparkError`` catches
everything we raise on purpose. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DeepsparkError",
    "DivergenceError",
    "MissingDependencyError",
    "RunError",
    "SpecError",
]


class DeepsparkError(Exception):
    """Base class of every error deepspark raises on purpose."""


class ConfigError(DeepsparkError, ValueError):
    """A parameter or configuration value is invalid (raised before any Spark job starts)."""


class RunError(DeepsparkError):
    """The work started and then failed as a whole (every Spark task failed the same way, say).

    The command line exits 1 for it, and 2 for the other errors, which are raised before work starts.
    """


class DatasetError(DeepsparkError):
    """A dataset file is missing, corrupt, or fails its checksum."""


class SpecError(DeepsparkError, ValueError):
    """A declarative model spec is malformed or its shapes do not fit together."""


class CheckpointError(DeepsparkError):
    """A checkpoint is missing, malformed, or in a format we refuse to load (pickle)."""


class MissingDependencyError(DeepsparkError, ImportError):
    """An optional dependency a feature needs is not installed; the message has the ``pip install`` line.

    Raised when the feature is used, never at import time (Optuna's ``try_import`` habit), so a plain
    ``pip install deepspark`` tunes and trains without the extras.
    """


class DivergenceError(RunError, FloatingPointError):
    """Training produced a NaN or infinite loss: a failure at run time (the command line exits 1), whichever
    strategy's worker met it.

    ``epoch`` and ``step`` (both 0-based) locate the first non-finite loss.
    """

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
