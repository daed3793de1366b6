"""Training and evaluation in one process: the unit every distributed strategy is built from.

A trial in tuning is one call of :func:`train_one_process` inside a Spark task. The data-parallel
strategies (:func:`deepspark.training.fit`) run the same pieces on each partition: a
:class:`DataCursor` walks a worker's examples in a seeded order, epoch after epoch, and
:func:`run_steps` takes optimizer steps from it. One worker with tau = 1 therefore takes exactly the
steps this module's loop takes.
"""

from __future__ import annotations

import hashlib
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
from deepspark.models.preprocess import Normaliser
from deepspark.validation import check_choice, check_int, check_number, check_positive_int, fail

if TYPE_CHECKING:
    from deepspark.data import ImageDataset
    from deepspark.training.frame import RowFile

__all__ = [
    "DEFAULT_TRAIN_CONFIG",
    "DataCursor",
    "EpochMetrics",
    "EpochState",
    "Examples",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
    "cosine_rate",
    "evaluate",
    "make_optimizer",
    "run_steps",
    "train_one_process",
]

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
    augment: bool | str = False  # False, True (random shifts) or "affine": see augment_batch
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("epochs", self.epochs)
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        check_number("weight_decay", self.weight_decay, low=0)
        if not isinstance(self.augment, bool) and self.augment != "affine":
            raise fail("augment", 'true (random shifts), false or "affine"', self.augment)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)  # as tune's: seeds derive from it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The default configuration: TensorFlow's deep-MNIST CNN trained with Adam (cosine-decayed over 4
# epochs): the 2016 blog's default reached 99.2% test accuracy. Tuning measures its error reduction
# against this configuration; it is also `deepspark train`'s one-process default.
DEFAULT_TRAIN_CONFIG = TrainConfig(
    optimizer="adam", learning_rate=1e-3, batch_size=64, epochs=4, lr_schedule="cosine", seed=0
)


@dataclass(frozen=True)
class EpochMetrics:
    """What one finished epoch reports (to callbacks, pruners and progress displays)."""

    epoch: int  # 1-based
    train_loss: float
    test_accuracy: float
    test_loss: float
    seconds: float


@dataclass(frozen=True)
class EpochState:
    """A one-process run after ``epochs_done`` whole epochs: what :func:`train_one_process` needs to go on
    exactly as if it had never stopped (weights, optimizer and schedule state, the CPU RNG that drives
    dropout, the data position)."""

    epochs_done: int
    weights: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any] | None
    rng: torch.Tensor
    cursor: Mapping[str, Any]


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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``model``'s parameters."""
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(
        params, lr=config.learning_rate, momentum=momentum, weight_decay=config.weight_decay
    )


def augment_batch(x: torch.Tensor, augment: bool | str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (a batch ``[N, C, H, W]``) augmented as ``augment`` says, drawing from ``generator``.

    ``True``: each image shifted by up to 2 pixels (edges replicated). ``"affine"``: each image rotated
    by up to 10 degrees, scaled by 0.9-1.1 and shifted by up to 2 pixels, resampled bilinearly (edges
    replicated). On MNIST's ``cnn`` the affine maps took the two configurations the ``paper`` studies
    selected from 99.50% and 99.47% test accuracy (shifts) to 99.58% and 99.50% (docs/benchmarks.md).
    """
    if augment == "affine":
        return _random_affine(x, generator)
    if augment:
        return _random_shift(x, generator)
    return x


def _random_affine(
    x: torch.Tensor, generator: torch.Generator, *, degrees: float = 10.0, scale: float = 0.1, pad: int = 2
) -> torch.Tensor:
    n, _, h, w = x.shape

    def uniform() -> torch.Tensor:  # in [-1, 1), one per image
        return torch.rand(n, generator=generator) * 2 - 1

    angle = uniform() * math.radians(degrees)
    factor = 1 + uniform() * scale
    shift_x, shift_y = uniform() * (2 * pad / w), uniform() * (2 * pad / h)
    cos, sin = factor * torch.cos(angle), factor * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (edges replicated): cheap augmentation for digits."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@dataclass(frozen=True)
class Examples:
    """Training examples as they are kept and, indexed by a batch's indices, that batch as model inputs.

    Pixels stay uint8 (a quarter of float32's memory) and are normalised a batch at a time by
    ``normaliser`` (the values are the same as normalising the whole set first: the same operations on
    each element); without one, ``stored`` holds model inputs already (an array column's floats).
    Normalising 30,000 MNIST images up front held a worker's start for 0.28 s; per batch it costs
    0.03 s over an epoch of 938 batches of 32. ``stored`` is a tensor on ``device``, or a worker's
    :class:`~deepspark.training.frame.RowFile` (rows over its memory budget), whose batches are read on
    the CPU and moved to ``device``.
    """

    stored: torch.Tensor | RowFile
    normaliser: Normaliser | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of(
        cls, stored: np.ndarray | RowFile, preprocess: Preprocess | None, device: torch.device | str = "cpu"
    ) -> Examples:
        """``stored`` (uint8 pixels for ``preprocess``, or model inputs when it is None) on ``device``;
        a writable array is viewed, not copied (a read-only one, e.g. a memory map, is copied)."""
        place = torch.device(device)
        if isinstance(stored, np.ndarray):
            tensor = torch.from_numpy(stored if stored.flags.writeable else stored.copy()).to(place)
            place = tensor.device  # "cuda" is "cuda:N" once there
            return cls(tensor, None if preprocess is None else preprocess.normaliser(place), place)
        return cls(stored, None if preprocess is None else preprocess.normaliser(place), place)

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: Any) -> torch.Tensor:
        batch = self.stored[index].to(self.device)
        return batch if self.normaliser is None else self.normaliser(batch, in_place=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on preprocessed ``inputs``.

    500 images a batch: LeNet's 10,000 MNIST test images took 0.45 s at 2 threads and 0.86 s at 1
    (batches of 1,000: 0.62 and 1.12 s; smaller batches no faster), as a batch's activations stay in cache.
    """
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


class DataCursor:
    """Where one worker is in its data: the epoch and the step within it.

    Epoch ``e`` visits the ``n`` examples in the order ``torch.randperm(n)`` drawn from a generator
    seeded from ``(seed, e)``; the augmentation of step ``s`` draws from one seeded from
    ``(seed, e, s)``. Every random draw is a function of the position, so the position is the whole
    state: :meth:`state` is five integers (it travels with every ``average`` and ``async`` round; a torch
    generator's state is 5 KB), and :meth:`from_state` makes it exact across processes (a checkpoint, a
    worker that replaces a lost one): a resumed run takes the very same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.epoch, self.step = 0, 0
        self._order = torch.randperm(self.n, generator=self._generator(self.epoch))

    def _generator(self, *position: int) -> torch.Generator:
        digest = hashlib.blake2b(repr((self.seed, *position)).encode("ascii"), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def next_indices(self) -> torch.Tensor:
        """The example indices of the next batch (the last batch of an epoch may be smaller)."""
        if self.n == 0:
            raise ConfigError("this worker has no examples to train on")
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._order = torch.randperm(self.n, generator=self._generator(self.epoch))
        start = self.step * self.batch_size
        self.step += 1
        return self._order[start : start + self.batch_size]

    def batch_generator(self) -> torch.Generator:
        """The generator for the augmentation of the batch :meth:`next_indices` returned last."""
        return self._generator(self.epoch, self.step - 1)

    def state(self) -> dict[str, Any]:
        """JSON-ready position: the seed, the epoch and the step (and the sizes it is valid for)."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DataCursor:
        if "seed" not in state:
            raise ConfigError(
                "this checkpoint's data position was written by an earlier deepspark (a torch generator "
                "state, before positions became seeds): start the run again rather than resume it"
            )
        cursor = cls(int(state["n"]), int(state["batch_size"]), int(state["seed"]))
        cursor.epoch, cursor.step = int(state["epoch"]), int(state["step"])
        cursor._order = torch.randperm(cursor.n, generator=cursor._generator(cursor.epoch))
        return cursor


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def train_forward(model: nn.Module, batch: torch.Tensor, cursor: DataCursor) -> torch.Tensor:
    """``model(batch)`` for a training step. An epoch's last batch of one example (``n`` one more than
    a multiple of ``batch_size``) is a :class:`ConfigError` saying so when a batch-norm layer cannot
    normalise it (torch's ValueError "Expected more than 1 value per channel" escaped as a traceback)."""
    try:
        return model(batch)
    except ValueError as exc:
        if len(batch) != 1 or not any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
            raise
        raise ConfigError(
            f"batch_size: an epoch's last batch holds one example ({cursor.n} examples, batch size "
            f"{cursor.batch_size}), which the model's batch-norm layers cannot normalise in training "
            f"({exc}); choose a batch_size that leaves no example or more than one in the last batch"
        ) from None


@dataclass(frozen=True)
class StepStats:
    """What :func:`run_steps` did: steps taken, examples seen and their summed loss."""

    steps: int
    samples: int
    loss_sum: float


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Examples | torch.Tensor,
    labels: torch.Tensor,
    cursor: DataCursor,
    steps: int,
    *,
    augment: bool | str = False,
    learning_rate: Callable[[int], float] | None = None,
    first_step: int = 0,
    scheduler: Any = None,
    deadline: float | None = None,
) -> StepStats:
    """Take up to ``steps`` optimizer steps on batches from ``cursor`` (fewer when ``deadline`` passes).

    ``learning_rate(t)`` sets the rate of global step ``t`` (counted from ``first_step``) before the
    step; ``scheduler`` is stepped after each step instead. Raises :class:`DivergenceError` at the
    first NaN/inf loss, naming the epoch and step.
    """
    model.train()
    loss_sum, samples, taken = 0.0, 0, 0
    for i in range(steps):
        if deadline is not None and taken and time.perf_counter() >= deadline:
            break
        if learning_rate is not None:
            rate = learning_rate(first_step + i)
            for group in optimizer.param_groups:
                group["lr"] = rate
        idx = cursor.next_indices()
        epoch, step = cursor.epoch, cursor.step - 1
        batch = inputs[idx]
        if augment:
            batch = augment_batch(batch, augment, cursor.batch_generator())
        logits = train_forward(model, batch, cursor)
        loss = nn.functional.cross_entropy(logits, labels[idx])
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(
                f"training diverged: loss is {value} at epoch {epoch + 1}, step {step + 1} "
                f"(learning rate {optimizer.param_groups[0]['lr']:g}); lower the learning rate",
                epoch=epoch,
                step=step,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += value * int(idx.shape[0])
        samples += int(idx.shape[0])
        taken += 1
    return StepStats(steps=taken, samples=samples, loss_sum=loss_sum)


def cosine_rate(base: float, total_steps: int) -> Callable[[int], float]:
    """The cosine-annealed rate of step ``t`` out of ``total_steps`` (closed form, to zero)."""

    def rate(t: int) -> float:
        return base * (1 + math.cos(math.pi * min(t, total_steps) / max(total_steps, 1))) / 2

    return rate


def train_one_process(
    spec: ModelSpec | Mapping[str, Any] | str,
    data: ImageDataset,
    config: TrainConfig | None = None,
    *,
    callback: Callable[[EpochMetrics], None] | None = None,
    device: torch.device | str | None = None,
    start: EpochState | None = None,
    checkpoint: Callable[[EpochState], None] | None = None,
) -> TrainResult:
    """Train ``spec`` on ``data.train_*`` in this process; evaluate on ``data.test_*`` after every epoch.

    ``checkpoint`` receives the run's :class:`EpochState` after each epoch (after ``callback``); given
    one back as ``start``, a run continues with the next epoch and takes exactly the steps the
    uninterrupted run would (on the CPU; ``history`` then holds the new epochs only).

    ``device`` is where the model and data live while training (default the CPU; a Spark task picks it
    with :func:`deepspark.spark.task_device`); the returned model is on the CPU.

    Deterministic for a given ``config.seed`` and thread count. ``callback`` receives each epoch's
    metrics; an exception it raises (a pruner's, say) stops training and propagates.
    Raises :class:`DivergenceError` with the epoch and step of the first NaN/inf loss. The torch
    thread count and global RNG are restored on return.
    """
    config = config or TrainConfig()
    spec = load_spec(spec)
    if tuple(spec.input_shape) != tuple(data.input_shape):
        raise ConfigError(
            f"model input shape {spec.input_shape} does not match the dataset's {data.input_shape}"
        )
    if len(data.train_labels) == 0:
        raise ConfigError("data: the training split is empty; give at least one training example")
    threads_before = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            if config.threads is not None and threads_before != config.threads:
                torch.set_num_threads(config.threads)
            return _train(spec, data, config, callback, torch.device(device or "cpu"), start, checkpoint)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _train(
    spec: ModelSpec,
    data: ImageDataset,
    config: TrainConfig,
    callback: Callable[[EpochMetrics], None] | None,
    device: torch.device,
    start: EpochState | None = None,
    checkpoint: Callable[[EpochState], None] | None = None,
) -> TrainResult:
    preprocess = Preprocess(input_shape=data.input_shape, mean=tuple(data.mean), std=tuple(data.std))
    x_train = Examples.of(data.train_images, preprocess, device)
    y_train = torch.as_tensor(np.asarray(data.train_labels, dtype=np.int64)).to(device)
    x_test = preprocess.apply(data.test_images).to(device)
    y_test = torch.as_tensor(np.asarray(data.test_labels, dtype=np.int64)).to(device)

    torch.manual_seed(config.seed)
    model = build_model(spec, seed=config.seed).to(device)
    optimizer = make_optimizer(model, config)
    n = int(y_train.shape[0])
    cursor = DataCursor(n, config.batch_size, config.seed)
    total_steps = cursor.steps_per_epoch * config.epochs
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if config.lr_schedule == "cosine"
        else None
    )
    first = 0
    if start is not None:
        if int(start.cursor.get("n", -1)) != n:
            raise ConfigError(
                f"resume: the checkpoint's data position covers {start.cursor.get('n')} training examples, "
                f"the data has {n}; resume with the data the run started on"
            )
        model.load_state_dict(dict(start.weights))
        optimizer.load_state_dict(dict(start.optimizer))
        if scheduler is not None and start.scheduler is not None:
            scheduler.load_state_dict(dict(start.scheduler))
        cursor = DataCursor.from_state(start.cursor)
        torch.set_rng_state(start.rng)
        first = start.epochs_done
    history: list[EpochMetrics] = []
    for epoch in range(first, config.epochs):
        started = time.perf_counter()
        stats = run_steps(
            model,
            optimizer,
            x_train,
            y_train,
            cursor,
            cursor.steps_per_epoch,
            augment=config.augment,
            scheduler=scheduler,
        )
        scores = evaluate(model, x_test, y_test)
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=stats.loss_sum / n,
            test_accuracy=scores["accuracy"],
            test_loss=scores["loss"],
            seconds=time.perf_counter() - started,
        )
        history.append(metrics)
        if callback is not None:
            callback(metrics)
        if checkpoint is not None:
            checkpoint(
                EpochState(
                    epochs_done=epoch + 1,
                    weights=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    rng=torch.get_rng_state(),
                    cursor=cursor.state(),
                )
            )
    model.eval()
    return TrainResult(model=model.to("cpu"), spec=spec, preprocess=preprocess, history=tuple(history))
