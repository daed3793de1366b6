"""What a study is, and how one run of it goes: two frozen records instead of two dozen arguments.

:class:`StudyConfig` is the study: its space, target, sampler, pruner, metric, seed, where Optuna keeps
it, and (for the built-in objective) :class:`~deepspark.tuning.objectives.BuiltinOptions`. It is
validated when made, written once to the run directory's ``config.json`` and read back on resume, where
a setting given again that differs from the saved one is refused (:meth:`StudyConfig.conflicts`).
:class:`RunOptions` holds what may change from one run of a study to the next (parallelism, clocks,
the master, the device, progress hooks and Optuna callbacks); it is never saved.

``config.json`` is flat: the study's keys and the built-in objective's side by side (``"format": 2``).
Files written before the record existed (no ``format``) hold the same keys less ``study_name`` and
``storage``: they read as a study named ``"deepspark"`` in the run directory's journal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna

from deepspark.errors import ConfigError
from deepspark.spark import DEVICES
from deepspark.tuning.coordinator import TrialEvent
from deepspark.tuning.objectives import BUILTIN_KEYS, BuiltinOptions
from deepspark.validation import (
    check_choice,
    check_heartbeat_timeout,
    check_int,
    check_number,
    check_positive_int,
    fail,
)
from deepspark.wire import DEFAULT_HEARTBEAT_TIMEOUT

__all__ = [
    "BUILTIN",
    "FORMAT",
    "LEGACY_STUDY_NAME",
    "PRUNERS",
    "SAMPLERS",
    "RunOptions",
    "StudyConfig",
    "object_name",
]

FORMAT = 2
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "asha")
#: The name every study had before studies were named after their run directory.
LEGACY_STUDY_NAME = "deepspark"
#: What a user's own sampler or pruner object is saved as: ``object:ClassName``.
OBJECT_PREFIX = "object:"
BUILTIN = "builtin"
DIRECTIONS = ("maximize", "minimize")


def object_name(obj: object) -> str:
    """How ``config.json`` names a sampler or pruner object (it cannot hold the object itself)."""
    return f"{OBJECT_PREFIX}{type(obj).__name__}"


@dataclass(frozen=True)
class StudyConfig:
    """A study's settings (see the module's docstring); every field is checked when the record is made.

    ``sampler`` and ``pruner`` are names (``SAMPLERS``, ``PRUNERS``) or ``object:ClassName`` for an
    object the caller passed. ``objective`` is ``"builtin"`` (then ``builtin`` holds its options) or
    the qualified name of the caller's function. ``storage`` is an Optuna storage URL, or None for the
    journal file in the run directory.
    """

    space: Mapping[str, Any]
    study_name: str
    trials: int = 24
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "accuracy"
    direction: str = "maximize"
    seed: int = 0
    threads_per_trial: int = 1
    objective: str = BUILTIN
    storage: str | None = None
    builtin: BuiltinOptions | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.space, Mapping) or not self.space:
            raise fail("space", "a mapping of parameter -> distribution or value", self.space)
        if not isinstance(self.study_name, str) or not self.study_name.strip():
            raise fail("study_name", "a non-empty string", self.study_name)
        check_positive_int("trials", self.trials)
        if not self.sampler.startswith(OBJECT_PREFIX):
            check_choice("sampler", self.sampler, SAMPLERS)
        if not self.pruner.startswith(OBJECT_PREFIX):
            check_choice("pruner", self.pruner, PRUNERS)
        if not isinstance(self.metric, str) or not self.metric:
            raise fail("metric", "the name of a metric the objective returns", self.metric)
        check_choice("direction", self.direction, DIRECTIONS)
        # Optuna's samplers (numpy's legacy seeding) take 0..2**32-1: anything else fails in the sampler.
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        check_positive_int("threads_per_trial", self.threads_per_trial)
        if self.storage is not None and (not isinstance(self.storage, str) or "://" not in self.storage):
            raise fail("storage", "an Optuna storage URL (e.g. sqlite:///study.db) or None", self.storage)
        if (self.objective == BUILTIN) != (self.builtin is not None):
            raise ConfigError("objective: the built-in objective's study needs its options, and only it")

    # ------------------------------------------------------------------------------- config.json
    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``config.json`` holds (flat: the built-in objective's keys beside the study's)."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "space": _plain(self.space),
            "trials": self.trials,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "metric": self.metric,
            "direction": self.direction,
            "seed": self.seed,
            "threads_per_trial": self.threads_per_trial,
            "objective": self.objective,
            "study_name": self.study_name,
            "storage": self.storage,
        }
        builtin = self.builtin.to_dict() if self.builtin is not None else dict.fromkeys(BUILTIN_KEYS)
        return {**out, **_plain(builtin)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str) -> StudyConfig:
        """Read a ``config.json`` (this format, or the one before it: see the module's docstring).

        A file that does not make a valid record is refused naming ``where`` and what is wrong.
        """
        objective = str(data.get("objective") or BUILTIN)
        try:
            return cls(
                space=data["space"],
                study_name=data.get("study_name") or LEGACY_STUDY_NAME,
                trials=data["trials"],
                sampler=data["sampler"],
                pruner=data["pruner"],
                metric=data["metric"],
                direction=data["direction"],
                seed=data.get("seed", 0),
                threads_per_trial=data.get("threads_per_trial", 1),
                objective=objective,
                storage=data.get("storage"),
                builtin=BuiltinOptions.from_dict(data) if objective == BUILTIN else None,
            )
        except (ConfigError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"resume: {where} does not hold a valid tune study configuration ({exc})"
            ) from None

    # ------------------------------------------------------------------------------- resume
    def conflicts(self, given: Mapping[str, Any]) -> list[str]:
        """``name (saved X, given Y)`` for each setting in ``given`` that differs from this saved study.

        ``given`` holds only what the caller gave explicitly, normalised as this record holds it
        (``space`` as a dict, ``sampler``/``pruner`` as names or ``object:ClassName``, the built-in
        objective's keys at the top level). ``trials`` never conflicts: see :meth:`resumed`.
        """
        saved = self.to_dict()
        out = []
        for name, value in given.items():
            if name == "trials" or value is None:
                continue
            was, now = saved.get(name), _plain(value)
            if now == was:
                continue
            if isinstance(was, Mapping) and isinstance(now, Mapping):
                # A space (say) cut short would show the same first keys on both sides: name the keys
                # that differ, each with its two values.
                keys = sorted(
                    k for k in was.keys() | now.keys() if k not in was or k not in now or was[k] != now[k]
                )
                parts = [
                    f"{k}: saved {_show(was[k]) if k in was else 'none'}, given {_show(now[k]) if k in now else 'none'}"
                    for k in keys
                ]
                out.append(f"{name} ({'; '.join(parts)})")
            else:
                out.append(f"{name} (saved {_show(was)}, given {_show(value)})")
        return out

    def resumed(self, trials: int | None) -> StudyConfig:
        """The study a resume continues: a larger ``trials`` extends it (and is saved); a smaller or
        equal one only bounds this run (see :func:`deepspark.tuning.tune`)."""
        if trials is not None and trials > self.trials:
            return replace(self, trials=trials)
        return self

    # ------------------------------------------------------------------------------- Optuna
    def user_attrs(self) -> dict[str, Any]:
        """The study's fixed settings as Optuna study user attributes (optuna-dashboard shows them)."""
        out = self.to_dict()
        out.pop("format")
        fixed = {k: v for k, v in out["space"].items() if not isinstance(v, Mapping)}
        return {**out, "fixed": fixed}

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


@dataclass(frozen=True)
class RunOptions:
    """What one run of a study may set afresh (never saved): see :func:`deepspark.tuning.tune`."""

    parallelism: int | None = None
    max_failures: int | None = None
    max_attempts: int = 3
    timeout: float | None = None
    trial_timeout: float | None = None
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT
    master: str | None = None
    device: str = "auto"
    #: Optuna study callbacks: ``callback(study, frozen_trial)`` on the driver after each finished trial.
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = ()
    on_event: Callable[[TrialEvent], None] | None = None
    on_start: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        for name in ("parallelism", "max_failures"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_positive_int("max_attempts", self.max_attempts)
        for name in ("timeout", "trial_timeout"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _seconds(name, value))
        object.__setattr__(self, "heartbeat_timeout", check_heartbeat_timeout(self.heartbeat_timeout))
        check_choice("device", self.device, DEVICES)
        given = self.callbacks or ()
        if callable(given) or not isinstance(given, Iterable):  # one callback, not in a list
            raise fail("callbacks", "a list of Optuna study callbacks: callable(study, frozen_trial)", given)
        callbacks = tuple(given)
        for callback in callbacks:
            if not callable(callback):
                raise fail("callbacks", "Optuna study callbacks: callable(study, frozen_trial)", callback)
        object.__setattr__(self, "callbacks", callbacks)


def _seconds(name: str, value: Any) -> float:
    try:
        return check_number(name, value, low=0, low_open=True)
    except ConfigError:
        raise fail(name, "a positive number of seconds (or None)", value) from None


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, keys strings), so saved and given compare."""
    return json.loads(json.dumps(value))


def _show(value: Any) -> str:
    text = json.dumps(_plain(value), sort_keys=True) if isinstance(value, Mapping | list) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
