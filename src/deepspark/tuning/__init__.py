"""Distributed hyperparameter tuning: Optuna samples and prunes, Spark runs the trials.

Imported lazily (as the top-level package is), so a process that needs one light module of this
package (the sampler process runs ``deepspark.tuning.sampling``) does not import torch for the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deepspark._lazy import lazy_attributes

if TYPE_CHECKING:
    from deepspark.tuning.config import PRUNERS, SAMPLERS, RunOptions, StudyConfig
    from deepspark.tuning.coordinator import TrialEvent, TrialEventKind
    from deepspark.tuning.objectives import BuiltinOptions
    from deepspark.tuning.report import StudySummary, TrialSummary
    from deepspark.tuning.runner import StudyResult, tune
    from deepspark.tuning.space import SearchSpace, load_space
    from deepspark.tuning.trial import Reporter, TrialPruned, TrialRecord, TrialState

_API = {
    "PRUNERS": "deepspark.tuning.config",
    "SAMPLERS": "deepspark.tuning.config",
    "RunOptions": "deepspark.tuning.config",
    "StudyConfig": "deepspark.tuning.config",
    "TrialEvent": "deepspark.tuning.coordinator",
    "TrialEventKind": "deepspark.tuning.coordinator",
    "BuiltinOptions": "deepspark.tuning.objectives",
    "StudySummary": "deepspark.tuning.report",
    "TrialSummary": "deepspark.tuning.report",
    "StudyResult": "deepspark.tuning.runner",
    "tune": "deepspark.tuning.runner",
    "SearchSpace": "deepspark.tuning.space",
    "load_space": "deepspark.tuning.space",
    "Reporter": "deepspark.tuning.trial",
    "TrialPruned": "deepspark.tuning.trial",
    "TrialRecord": "deepspark.tuning.trial",
    "TrialState": "deepspark.tuning.trial",
}

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "BuiltinOptions",
    "Reporter",
    "RunOptions",
    "SearchSpace",
    "StudyConfig",
    "StudyResult",
    "StudySummary",
    "TrialEvent",
    "TrialEventKind",
    "TrialPruned",
    "TrialRecord",
    "TrialState",
    "TrialSummary",
    "load_space",
    "tune",
]


__getattr__, __dir__ = lazy_attributes("deepspark.tuning", _API)
