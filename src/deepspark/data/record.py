"""The dataset record: :class:`ImageDataset`, its validation hold-out and its channel statistics.

Depends on nothing of ours but errors and validation: loaders (MNIST layout, CIFAR-10) build records,
and every layer above takes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from deepspark.errors import ConfigError
from deepspark.validation import check_int, fail

__all__ = [
    "DEFAULT_VALIDATION",
    "ImageDataset",
    "arrays_sha256",
    "channel_stats",
    "channels_last_hint",
    "validation_indices",
]

#: The hold-out that :meth:`ImageDataset.split_validation` takes when none is given: 10% of training.
DEFAULT_VALIDATION = 0.1


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory as uint8 arrays.

    Images stay uint8 (4× smaller than float32) so the whole of MNIST ships cheaply to Spark
    tasks; scaling and normalising with :attr:`mean`/:attr:`std` happens where tensors are made.

    ``validation_images``/``validation_labels`` hold a validation split when there is one: a
    dataset that ships its own sets them when it is loaded; otherwise :meth:`split_validation`
    carves a seeded, stratified one out of the training split. Both are None, or both arrays.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.validation_images is None) != (self.validation_labels is None):
            raise ConfigError(
                "validation_images and validation_labels must both be arrays or both be None; got "
                f"{type(self.validation_images).__name__} and {type(self.validation_labels).__name__}"
            )
        for split in self.splits:
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ConfigError(
                    f"{split}_images must be a uint8 array [N,H,W] or [N,C,H,W]; got "
                    f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
                )
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
                raise ConfigError(
                    f"{split}_labels must be an int64 array [N]; got "
                    f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}"
                )
            if len(images) != len(labels):
                raise ConfigError(
                    f"{split}_images and {split}_labels must have the same length; "
                    f"got {len(images)} and {len(labels)}"
                )
            hint = channels_last_hint(images.shape[1:])
            if hint is not None:
                raise ConfigError(f"{split}_images: {hint}")
            if split != "train" and images.shape[1:] != self.train_images.shape[1:]:
                raise ConfigError(
                    f"train and {split} images must have the same shape; got {self.train_images.shape[1:]} "
                    f"and {images.shape[1:]}"
                )
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"class_names must have num_classes={self.num_classes} entries; got {len(self.class_names)}"
            )
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"mean and std must have one value per channel ({channels}); got {self.mean} and {self.std}"
            )

    @classmethod
    def from_splits(
        cls,
        name: str,
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
        class_names: tuple[str, ...],
        *,
        stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> ImageDataset:
        """A record from loaded ``(images, labels)`` splits, as every loader builds one.

        ``stats`` is ``(mean, std)`` when the dataset publishes them; otherwise they are computed
        exactly from the training images (:func:`channel_stats`).
        """
        mean, std = channel_stats(train[0]) if stats is None else stats
        return cls(
            name=name,
            train_images=train[0],
            train_labels=train[1],
            test_images=test[0],
            test_labels=test[1],
            num_classes=len(class_names),
            class_names=class_names,
            mean=mean,
            std=std,
        )

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this dataset holds: ``("train", "test")``, with ``"validation"`` when it has one."""
        return ("train", "test") if self.validation_labels is None else ("train", "validation", "test")

    @property
    def has_validation(self) -> bool:
        return self.validation_labels is not None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image; grey images have C = 1."""
        shape = self.train_images.shape[1:]
        if len(shape) == 2:
            return (1, int(shape[0]), int(shape[1]))
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def subset(self, *, train: int | None = None, test: int | None = None) -> ImageDataset:
        """The first ``train`` training and ``test`` test examples (None keeps a whole split).

        A limit above a split's size keeps the whole split. Normalisation statistics are kept
        from the full training split so a quick run preprocesses exactly like a full one. A
        validation split is kept whole: take the subset first and :meth:`split_validation` after,
        so the hold-out comes out of the ``train`` examples kept (``train=6000`` with the default
        10% trains on 5,400 and validates on 600).
        """
        for pname, value in (("train", train), ("test", test)):
            if value is not None:
                check_int(pname, value, minimum=0)
        n_train = len(self.train_labels) if train is None else train
        n_test = len(self.test_labels) if test is None else test
        return replace(
            self,
            train_images=self.train_images[:n_train],
            train_labels=self.train_labels[:n_train],
            test_images=self.test_images[:n_test],
            test_labels=self.test_labels[:n_test],
        )

    def split_validation(self, size: float | int = DEFAULT_VALIDATION, *, seed: int = 0) -> ImageDataset:
        """This dataset with a validation split held out of its training split.

        ``size`` is a fraction of the training split (a float in (0, 1), default 0.1) or a number of
        examples (an int >= 1). The hold-out is stratified and seeded (:func:`validation_indices`):
        each class gives its share to within one example, the same ``seed`` takes the same examples,
        and a class keeps at least one example in training. The examples held out leave the training
        split, which keeps its order otherwise. A dataset that already has a validation split (one
        that ships it, or one split before) is returned as it is: the split it has is the one to use.
        """
        if self.has_validation:
            return self
        held = validation_indices(self.train_labels, size, seed=seed)
        keep = np.ones(len(self.train_labels), dtype=bool)
        keep[held] = False
        return replace(
            self,
            train_images=self.train_images[keep],
            train_labels=self.train_labels[keep],
            validation_images=self.train_images[held],
            validation_labels=self.train_labels[held],
        )

    def validation_as_test(self) -> ImageDataset:
        """The training split with the validation split in the test split's place.

        What a model selection sees: a trainer that evaluates on ``test_*`` (``train_one_process``)
        then reports validation accuracy, and the real test split is not in the record at all (so it
        never ships to a Spark task). Raises :class:`ConfigError` when there is no validation split.
        """
        if self.validation_images is None or self.validation_labels is None:
            raise ConfigError(
                f"validation_as_test: dataset {self.name!r} has no validation split; call "
                "split_validation() first"
            )
        return replace(
            self,
            test_images=self.validation_images,
            test_labels=self.validation_labels,
            validation_images=None,
            validation_labels=None,
        )

    def validation_in_training(self) -> ImageDataset:
        """The training split with the validation split appended (and no validation split): what a
        model is refitted on once its configuration was chosen on validation. A dataset without a
        validation split is returned as it is."""
        if self.validation_images is None or self.validation_labels is None:
            return self
        return replace(
            self,
            train_images=np.concatenate([self.train_images, self.validation_images]),
            train_labels=np.concatenate([self.train_labels, self.validation_labels]),
            validation_images=None,
            validation_labels=None,
        )

    def __repr__(self) -> str:
        validation = (
            f", validation={len(self.validation_labels)}" if self.validation_labels is not None else ""
        )
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_labels)}{validation}, "
            f"test={len(self.test_labels)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def validation_indices(
    labels: np.ndarray, size: float | int = DEFAULT_VALIDATION, *, seed: int = 0
) -> np.ndarray:
    """The sorted indices of a seeded, stratified validation hold-out of ``labels``.

    ``size`` is a fraction (float in (0, 1)) or a count (int >= 1) of ``len(labels)``. The total is
    ``round(fraction * n)`` (halves up), or the count. It is shared between classes by largest
    remainder: class ``c`` with ``n_c`` examples gives ``floor(f * n_c)`` or one more, the extra
    examples going to the largest remainders ``f * n_c - floor(f * n_c)`` (ties: the lower class),
    so each class is within one example of its exact share ``f * n_c`` and the total is exact. A
    class never gives all its examples: at least one stays in training (a class of one example
    gives none), so the total may come out smaller on tiny datasets. Which examples of a class are
    held out is a permutation drawn from ``numpy.random.default_rng(seed)``: the same seed takes
    the same indices.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise ConfigError(f"labels: expected a 1-D integer array; got {labels.dtype} {labels.shape}")
    check_int("seed", int(seed) if isinstance(seed, np.integer) else seed)
    n = len(labels)
    either = "a fraction in (0, 1) or a count >= 1"
    if isinstance(size, bool) or not isinstance(size, int | float | np.integer | np.floating):
        raise fail("validation size", either, size)
    if isinstance(size, int | np.integer):
        if size < 1:
            raise fail("validation size", either, size)
        if size >= n:
            raise fail("validation size", f"a count smaller than the training split ({n} examples)", size)
        fraction = Fraction(int(size), n)
    else:
        if not 0.0 < float(size) < 1.0:
            raise fail("validation size", either, size)
        # The decimal the user wrote (0.1), not the binary float nearest to it: 0.1 * 60000 is 6000.
        fraction = Fraction(str(float(size)))
    classes, counts = np.unique(labels, return_counts=True)
    exact = [fraction * int(c) for c in counts]
    caps = [int(c) - 1 for c in counts]
    take = [min(int(e), cap) for e, cap in zip(exact, caps, strict=True)]
    target = min(int(fraction * n + Fraction(1, 2)), sum(caps))
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder:
        if sum(take) >= target:
            break
        if take[i] < caps[i] and take[i] < exact[i]:
            take[i] += 1
    rng = np.random.default_rng(int(seed))
    held = [rng.permutation(np.flatnonzero(labels == cls))[:k] for cls, k in zip(classes, take, strict=True)]
    out = np.concatenate(held) if held else np.empty(0, dtype=np.int64)
    return np.sort(out).astype(np.int64)


_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA: the channel counts images come in


def channels_last_hint(shape: Any) -> str | None:
    """Why ``shape`` (one image's, as ``(C, H, W)``) looks channels-last, or None.

    deepspark reads a 3-dimensional image as ``(C, H, W)``; images stored ``(H, W, C)`` (as PIL,
    numpy and TensorFlow hold them) would be read as H channels of W x C pixels and train or
    predict scrambled without a word. A shape whose last dimension is a channel count and whose
    first is not is refused by every reader with this reason: transposing is the user's one fix.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or dims[2] not in _CHANNEL_COUNTS or dims[0] in _CHANNEL_COUNTS:
        return None
    h, w, c = dims
    return (
        f"images of shape {list(dims)} look channels-last (height {h}, width {w}, {c} channels), but "
        f"deepspark reads (channels, height, width); transpose them first, e.g. "
        f"images.transpose(0, 3, 1, 2) for [N, {c}, {h}, {w}]"
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1].

    Sums and sums of squares are accumulated as integers (exact), working through blocks of about
    a million values so the widened copy stays small.
    """
    grey = images.ndim == 3
    channels = 1 if grey else int(images.shape[1])
    n = len(images)
    pixels = int(np.prod(images.shape[1:], dtype=np.int64)) // channels if n else 0
    rows = max(1, (1 << 20) // max(pixels, 1))
    sums = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, n, rows):
        block = images[start : start + rows]
        for c in range(channels):
            x = (block if grey else block[:, c]).reshape(-1).astype(np.uint32)
            sums[c] += int(x.sum(dtype=np.uint64))
            squares[c] += int((x * x).sum(dtype=np.uint64))
    count = n * pixels
    if count == 0:
        return (0.0,) * channels, (1.0,) * channels
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return (
        tuple(round(float(m) / 255.0, 6) for m in mean),
        tuple(round(float(s) / 255.0, 6) or 1.0 for s in std),
    )


def arrays_sha256(*arrays: np.ndarray) -> str:
    """A SHA-256 of ``arrays``, each with its dtype and shape: what identifies the data a run or study
    trained on, so that a resume on other data (as many rows, other content) is refused."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous: Any = array if array.flags.c_contiguous else array.copy(order="C")  # a buffer
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        if contiguous.size:  # an empty array has no bytes (and memoryview cannot cast its zero shape)
            digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()
