"""The built-in objective: train a zoo network on a broadcast image dataset with one trial's config.

:class:`BuiltinOptions` is what a study of the built-in objective is about (dataset, model, limits, the
selection split): a frozen, validated record that ``config.json`` keeps beside the study's settings, and
the factory of the objective (:meth:`BuiltinOptions.objective`) and of its data (:meth:`BuiltinOptions.data`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspark.data.record import DEFAULT_VALIDATION
from deepspark.errors import ConfigError, DatasetError, SpecError
from deepspark.models import ZOO, ModelSpec, checkpoint_files, load_spec, model_spec
from deepspark.spark import DEVICES
from deepspark.training import DEFAULT_TRAIN_CONFIG, EpochMetrics, TrainConfig, train_one_process
from deepspark.tuning.trial import Reporter
from deepspark.validation import check_choice, check_positive_int, fail

__all__ = ["BUILTIN_KEYS", "SELECT_ON", "TRAIN_KEYS", "BuiltinOptions", "ImageClassifierObjective"]

_log = logging.getLogger(__name__)

TRAIN_KEYS = frozenset(TrainConfig.__dataclass_fields__) - {"threads"}
#: The split the built-in objective's trials are chosen on: "validation" (the default), or "test" (the
#: 2016 blog's protocol, kept for comparison; the chosen trial's test accuracy is then optimistic).
SELECT_ON = ("validation", "test")


@dataclass(frozen=True)
class BuiltinOptions:
    """What a study of the built-in objective trains and on what: validated when made, JSON-ready.

    ``model`` is a zoo name or a model spec (a JSON/YAML file or mapping; the record keeps the spec
    itself, so a resume needs no file). ``data_dir`` is kept absolute. ``validation`` is the hold-out
    (a fraction of the training split or a count) when ``select_on`` is ``"validation"``, else None.
    ``refit``: once the study ends, train the best and the default configuration again on training +
    validation and measure those models on test (:mod:`deepspark.tuning.refit`); validation only.
    """

    dataset: str | None = None
    data_dir: str | None = None
    model: str | Mapping[str, Any] = "cnn"
    limit_train: int | None = None
    limit_test: int | None = None
    select_on: str = "validation"
    validation: float | int | None = DEFAULT_VALIDATION
    refit: bool = False

    def __post_init__(self) -> None:
        if self.dataset is None and self.data_dir is None:
            raise ConfigError(
                "give an objective function, or a dataset or data_dir (and model) for the built-in objective"
            )
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise fail("dataset", "a registered dataset name", self.dataset)
        object.__setattr__(self, "dataset", dataset_name(self.dataset))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().absolute()))
        for name in ("limit_train", "limit_test"):
            # an empty split fails every trial, and an empty test split scores none
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_choice("select_on", self.select_on, SELECT_ON)
        if not isinstance(self.refit, bool):
            raise fail("refit", "true or false", self.refit)
        if self.refit and self.select_on == "test":
            raise ConfigError(
                "refit: applies when trials are selected on validation (it trains the chosen "
                "configuration again on training + validation); drop refit or select_on='test'"
            )
        if self.select_on == "test":
            object.__setattr__(self, "validation", None)
        else:
            _check_validation(self.validation)
        # The spec (read once, here: the executors get the spec, not the path), checked before Spark starts.
        object.__setattr__(self, "model", ImageClassifierObjective(model=self.model).saved_model)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in BUILTIN_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuiltinOptions:
        """Read back :meth:`to_dict`; a study saved before ``select_on`` existed was chosen on test."""
        select_on = data.get("select_on") or "test"
        return cls(
            dataset=data.get("dataset"),
            data_dir=data.get("data_dir"),
            model=data.get("model") or "cnn",
            limit_train=data.get("limit_train"),
            limit_test=data.get("limit_test"),
            select_on=select_on,
            validation=data.get("validation", DEFAULT_VALIDATION) if select_on == "validation" else None,
            refit=data.get("refit") or False,
        )

    def objective(self, *, device: str = "auto", evaluated_on: str | None = None) -> ImageClassifierObjective:
        """The objective the study's trials run, on ``device`` (see :func:`deepspark.spark.task_device`);
        ``evaluated_on="test"`` is the refit's (trained on training + validation, scored on test)."""
        return ImageClassifierObjective(
            model=self.model, evaluated_on=evaluated_on or self.select_on, device=device
        )

    def data(self, *, seed: int) -> tuple[Any, Any]:
        """The data: (what trials get, the dataset holding the test split).

        Selecting on validation, trials get the training part with the validation split in the test
        split's place (:meth:`ImageDataset.validation_as_test`), so the test split stays on the driver.
        ``limit_train`` applies first: the hold-out comes out of the examples kept.
        """
        from deepspark.data import load_dataset

        data = load_dataset(self.dataset, data_dir=self.data_dir)
        if self.limit_train is not None or self.limit_test is not None:
            data = data.subset(train=self.limit_train, test=self.limit_test)
        if len(data.test_labels) == 0:
            # An accuracy over no image reads as 0.0 (or an error reduction of 0%) rather than as missing.
            raise DatasetError(
                f"{self.data_dir or self.dataset}: the test split holds no example; the study measures its "
                "chosen models on it (and with select_on='test' chooses on it): give a dataset with test examples"
            )
        if self.select_on == "test":
            return data, data
        assert self.validation is not None
        split = data.split_validation(self.validation, seed=seed)
        trials = split.validation_as_test()
        if len(trials.test_labels) == 0:
            raise ConfigError(
                f"validation={self.validation!r} holds out no example of the {len(data.train_labels)} "
                "training examples; give a larger validation (a fraction or a count), or select_on='test'"
            )
        _log.info(
            "selecting on a validation split of %d examples; training on %d",
            len(trials.test_labels),
            len(trials.train_labels),
        )
        return trials, split


def dataset_name(dataset: str | None) -> str | None:
    """``dataset`` as a study keeps it: a registered name as it is; a directory (``deepspark tune DIR``)
    made absolute, like ``data_dir``, so that a resume from another working directory reads the same
    directory, not whatever that relative name means there."""
    from deepspark.data.registry import DATASETS

    if dataset is None or dataset in DATASETS:
        return dataset
    path = Path(dataset).expanduser()
    return str(path.absolute()) if path.is_dir() else dataset


#: The keys :class:`BuiltinOptions` writes in a run directory's ``config.json``.
BUILTIN_KEYS = (
    "dataset",
    "data_dir",
    "model",
    "limit_train",
    "limit_test",
    "select_on",
    "validation",
    "refit",
)


def _check_validation(value: Any) -> None:
    """The validation size's type and range, before any data is read (its count is checked later)."""
    fraction = isinstance(value, float) and 0.0 < value < 1.0
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not (fraction or count):
        raise fail("validation", "a fraction of the training split in (0, 1) or a count >= 1", value)


class ImageClassifierObjective:
    """``objective(config, reporter)`` for a zoo model or a model spec; ``reporter.data`` is the broadcast
    ImageDataset.

    Config keys that name :class:`TrainConfig` fields go to the trainer, the rest are the zoo network's
    hyperparameters (``fc``, ``conv1``, …; a spec has none: its layers are fixed). Trains on
    ``data.train_*`` and reports the accuracy on ``data.test_*`` after every epoch, so pruners can act.
    ``tune`` selecting on validation (its default) broadcasts ``split.validation_as_test()``: the trials
    train on the training part, report validation accuracy, and never hold the test split.
    ``evaluated_on`` names that split (``"validation"`` or ``"test"``) in the checkpoint's metrics.
    """

    def __init__(
        self,
        *,
        model: str | ModelSpec | Mapping[str, Any],
        base: Mapping[str, Any] | None = None,
        evaluated_on: str = "test",
        device: str = "auto",
    ) -> None:
        check_choice("evaluated_on", evaluated_on, SELECT_ON)
        self.device = check_choice("device", device, DEVICES)
        self.spec: ModelSpec | None = None
        if isinstance(model, str) and model in ZOO:
            self.model = model
        else:
            try:
                self.spec = load_spec(model)  # read once, here: the executors get the spec, not the path
                self.spec.output_shape()
            except SpecError as exc:
                raise ConfigError(
                    f"model: expected a zoo model ({', '.join(sorted(ZOO))}) or a model spec (a JSON/YAML "
                    f"file or mapping), got {model if isinstance(model, str) else type(model).__name__!r}: "
                    f"{exc}"
                ) from None
            self.model = self.spec.name
        self.base = dict(base or {})
        self.evaluated_on = evaluated_on

    @property
    def saved_model(self) -> str | dict[str, Any]:
        """What a run directory's ``config.json`` keeps to rebuild this objective on resume."""
        return self.model if self.spec is None else self.spec.to_dict()

    def check_data(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Raise :class:`ConfigError` unless the network fits the dataset: a spec's input shape and
        output count; a zoo network built for the data (its hyperparameters change no image size), which
        needs two classes or more and images its convolutions and poolings fit (lenet: 16x16 and up)."""
        if self.spec is not None:
            self.spec.check_fits(input_shape=input_shape, num_classes=num_classes)
            return
        try:
            model_spec(self.model, input_shape=input_shape, num_classes=num_classes)
        except (SpecError, ConfigError) as exc:
            raise ConfigError(
                f"model {self.model!r} cannot take the data ({num_classes} classes of {list(input_shape)} "
                f"images): {exc}"
            ) from None

    def split(self, config: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
        merged = {**self.base, **config}
        train_cfg = {k: v for k, v in merged.items() if k in TRAIN_KEYS}
        hyper = {k: v for k, v in merged.items() if k not in TRAIN_KEYS}
        allowed = set(ZOO[self.model][1]) if self.spec is None else set()
        unknown = set(hyper) - allowed
        if unknown:
            raise ConfigError(
                f"parameter(s) {sorted(unknown)} are neither training options ({sorted(TRAIN_KEYS)}) nor "
                f"hyperparameters of model {self.model!r} ({sorted(allowed) or 'none: a spec is fixed'})"
            )
        return TrainConfig.from_dict({**DEFAULT_TRAIN_CONFIG.to_dict(), **train_cfg}), hyper

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` unless a trial could train with ``config``: names, training
        options and the model's hyperparameters (the network is built for 28x28 grey inputs)."""
        _, hyper = self.split(config)
        if self.spec is not None:
            return
        try:
            model_spec(self.model, **hyper)
        except SpecError as exc:
            raise ConfigError(f"model {self.model!r}: {exc}") from None

    def default_params(self, names: list[str]) -> dict[str, Any]:
        """The default configuration's value for each searched parameter (for the baseline trial)."""
        import inspect

        defaults: dict[str, Any] = {}
        if self.spec is None:
            make = ZOO[self.model][0]
            defaults = {k: p.default for k, p in inspect.signature(make).parameters.items()}
        defaults.update(DEFAULT_TRAIN_CONFIG.to_dict())
        defaults.update(self.base)
        missing = [n for n in names if n not in defaults]
        if missing:
            raise ConfigError(f"parameter(s) {missing} have no default value for model {self.model!r}")
        return {n: defaults[n] for n in names}

    def __call__(self, config: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
        from pyspark import TaskContext

        from deepspark.spark import assigned_gpus, device_label, task_device

        data = reporter.data
        # The GPU Spark assigned this task (auto: when CUDA can use it); cuda without one is an error.
        context = TaskContext.get()
        device = task_device(self.device, context)
        gpus = assigned_gpus(context)
        train_config, hyper = self.split(config)
        train_config = TrainConfig.from_dict({**train_config.to_dict(), "threads": reporter.threads})
        spec = self.spec or model_spec(
            self.model, input_shape=data.input_shape, num_classes=data.num_classes, **hyper
        )

        def on_epoch(m: EpochMetrics) -> None:
            reporter.report(m.epoch, m.test_accuracy, final=m.epoch == train_config.epochs)

        result = train_one_process(spec, data, train_config, callback=on_epoch, device=device)
        split = self.evaluated_on

        def files() -> dict[str, bytes]:
            # Made in memory: the weights travel to the driver as safetensors bytes in a frame's payload.
            return checkpoint_files(
                result.model,
                spec,
                preprocess=result.preprocess,
                class_names=data.class_names,
                metrics={
                    f"{split}_accuracy": result.test_accuracy,
                    f"{split}_loss": result.test_loss,
                },
                config={**train_config.to_dict(), **hyper},
            )

        reporter.keep_model(files)
        return {
            "accuracy": result.test_accuracy,
            "loss": result.test_loss,
            "epochs": len(result.history),
            "train_seconds": sum(m.seconds for m in result.history),
            "threads": reporter.threads,
            "pid": os.getpid(),
            "device": device_label(device, gpus),
        }
