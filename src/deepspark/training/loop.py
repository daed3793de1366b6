"""Training and evaluation in one process: the unit every distributed mode is built from.

A trial in tuning is one call of :func:`train` inside a Spark task; the data-parallel modes to come
run this same step function on each partition.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deepspark.errors import ConfigError, DivergenceError
from deepspark.models import ModelSpec, Preprocess, SpecModel, build_model, load_spec

if TYPE_CHECKING:
    from deepspark.data import ImageDataset

__all__ = ["EpochMetrics", "TrainConfig", "TrainResult", "evaluate", "train"]

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Validated on construction, so a bad value fails before any work starts."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    augment: bool = False
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule: expected one of {list(SCHEDULES)}, got {self.lr_schedule!r}")
        _positive("learning_rate", self.learning_rate, float)
        _positive("batch_size", self.batch_size, int)
        _positive("epochs", self.epochs, int)
        if self.threads is not None:
            _positive("threads", self.threads, int)
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.augment, bool):
            raise ConfigError(f"augment: expected true or false, got {self.augment!r}")
        if not isinstance(self.momentum, int | float) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool) or value <= 0 or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"{name}: expected a positive {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class EpochMetrics:
    """What one finished epoch reports (to callbacks, pruners and progress displays)."""

    epoch: int  # 1-based
    train_loss: float
    test_accuracy: float
    test_loss: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    model: SpecModel
    spec: ModelSpec
    preprocess: Preprocess
    history: tuple[EpochMetrics, ...] = field(default_factory=tuple)

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy

    @property
    def test_loss(self) -> float:
        return self.history[-1].test_loss


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(
        params, lr=config.learning_rate, momentum=momentum, weight_decay=config.weight_decay
    )


def _random_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (edges replicated): cheap augmentation for digits."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1000
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on preprocessed ``inputs``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    n = int(labels.shape[0])
    for start in range(0, n, batch_size):
        logits = model(inputs[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


def train(
    spec: ModelSpec | Mapping[str, Any] | str,
    data: ImageDataset,
    config: TrainConfig | None = None,
    *,
    callback: Callable[[EpochMetrics], None] | None = None,
) -> TrainResult:
    """Train ``spec`` on ``data.train_*`` and evaluate on ``data.test_*`` after every epoch.

    Deterministic for a given ``config.seed`` and thread count. ``callback`` receives each epoch's
    metrics; an exception it raises (a pruner's, say) stops training and propagates.
    Raises :class:`DivergenceError` with the epoch and step of the first NaN/inf loss.
    """
    config = config or TrainConfig()
    spec = load_spec(spec)
    if tuple(spec.input_shape) != tuple(data.input_shape):
        raise ConfigError(
            f"model input shape {spec.input_shape} does not match the dataset's {data.input_shape}"
        )
    if config.threads is not None and torch.get_num_threads() != config.threads:
        torch.set_num_threads(config.threads)
    preprocess = Preprocess(input_shape=data.input_shape, mean=tuple(data.mean), std=tuple(data.std))
    x_train = preprocess.apply(data.train_images)
    y_train = torch.as_tensor(np.asarray(data.train_labels, dtype=np.int64))
    x_test = preprocess.apply(data.test_images)
    y_test = torch.as_tensor(np.asarray(data.test_labels, dtype=np.int64))

    torch.manual_seed(config.seed)
    model = build_model(spec, seed=config.seed)
    optimizer = _optimizer(model, config)
    n = int(y_train.shape[0])
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if config.lr_schedule == "cosine"
        else None
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[EpochMetrics] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=shuffle)
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = x_train[idx]
            if config.augment:
                batch = _random_shift(batch, shuffle)
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, y_train[idx])
            value = loss.item()
            if not math.isfinite(value):
                raise DivergenceError(
                    f"training diverged: loss is {value} at epoch {epoch + 1}, step {step + 1} "
                    f"(learning_rate={config.learning_rate}); lower the learning rate",
                    epoch=epoch,
                    step=step,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += value * int(idx.shape[0])
        scores = evaluate(model, x_test, y_test)
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=loss_sum / n,
            test_accuracy=scores["accuracy"],
            test_loss=scores["loss"],
            seconds=time.perf_counter() - started,
        )
        history.append(metrics)
        if callback is not None:
            callback(metrics)
    model.eval()
    return TrainResult(model=model, spec=spec, preprocess=preprocess, history=tuple(history))
