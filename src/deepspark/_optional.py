"""Optional dependencies: each belongs to an extra, and is imported only by the feature that needs it.

``pip install deepspark`` tunes and trains; ONNX inference, plots and the hyperopt benchmark need their
extras. A missing one raises :class:`~deepspark.errors.MissingDependencyError` (with the ``pip install``
line) when the feature is used, or, for a nicety such as a plot, is skipped with a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

from deepspark.errors import MissingDependencyError

__all__ = ["EXTRAS", "available", "install_hint", "require", "skip_unless"]

_log = logging.getLogger(__name__)

#: module -> the extra of ``deepspark`` that installs it
EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "matplotlib": "report",
    "hyperopt": "bench",
    "mlflow": "mlflow",
    "optuna_dashboard": "dashboard",
}

_warned: set[str] = set()


def install_hint(module: str) -> str:
    extra = EXTRAS[module.partition(".")[0]]
    return f"pip install 'deepspark[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (cheap: no onnxruntime start-up)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise MissingDependencyError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the optional dependency {module.partition('.')[0]!r}, which is not "
            f"installed ({exc}); install it with: {install_hint(module)}"
        ) from exc


def skip_unless(module: str, *, feature: str) -> bool:
    """True when ``module`` is importable; otherwise warn once that ``feature`` is skipped and return False."""
    if available(module):
        return True
    if feature not in _warned:
        _warned.add(feature)
        _log.warning("%s skipped: %r is not installed (%s)", feature, module, install_hint(module))
    return False
