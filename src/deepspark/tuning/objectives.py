"""The built-in objective: train a zoo network on a broadcast image dataset with one trial's config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from deepspark.errors import ConfigError, SpecError
from deepspark.models import ZOO, ModelSpec, checkpoint_files, load_spec, model_spec
from deepspark.training import DEFAULT_TRAIN_CONFIG, EpochMetrics, TrainConfig, train_one_process
from deepspark.tuning.trial import Reporter

__all__ = ["TRAIN_KEYS", "TorchObjective"]

TRAIN_KEYS = frozenset(TrainConfig.__dataclass_fields__) - {"threads"}


class TorchObjective:
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
    ) -> None:
        if evaluated_on not in ("validation", "test"):
            raise ConfigError(f"evaluated_on: expected 'validation' or 'test', got {evaluated_on!r}")
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
        """Raise :class:`ConfigError` unless the network fits the dataset (a spec's input shape and
        output count; a zoo network is built for the data, so it always does)."""
        if self.spec is not None:
            self.spec.check_fits(input_shape=input_shape, num_classes=num_classes)

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
        data = reporter.data
        train_config, hyper = self.split(config)
        train_config = TrainConfig.from_dict({**train_config.to_dict(), "threads": reporter.threads})
        spec = self.spec or model_spec(
            self.model, input_shape=data.input_shape, num_classes=data.num_classes, **hyper
        )

        def on_epoch(m: EpochMetrics) -> None:
            reporter.report(m.epoch, m.test_accuracy, final=m.epoch == train_config.epochs)

        result = train_one_process(spec, data, train_config, callback=on_epoch)
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
        }
