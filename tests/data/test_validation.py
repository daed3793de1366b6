"""The validation split: a seeded, stratified hold-out of the training split (docs/data.md)."""

from __future__ import annotations

import numpy as np
import pytest

from deepspark.data import ImageDataset, validation_indices
from deepspark.errors import ConfigError


def _dataset(counts: list[int], *, test: int = 5, seed: int = 0) -> ImageDataset:
    """Classes with ``counts[c]`` training examples each, shuffled; image i's first pixel is i % 256."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    images = np.zeros((len(labels), 4, 4), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256
    images[:, 0, 1] = labels
    return ImageDataset(
        name="toy",
        train_images=images,
        train_labels=labels,
        test_images=np.zeros((test, 4, 4), dtype=np.uint8),
        test_labels=np.arange(test, dtype=np.int64) % len(counts),
        num_classes=len(counts),
        class_names=tuple(str(c) for c in range(len(counts))),
        mean=(0.5,),
        std=(0.25,),
    )


def _per_class(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes)


def test_mnist_sized_split_takes_ten_percent_of_each_class_exactly() -> None:
    # MNIST's training class counts.
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    labels = np.repeat(np.arange(10), counts).astype(np.int64)
    held = validation_indices(labels, 0.1, seed=0)
    assert len(held) == 6000
    got = _per_class(labels[held], 10)
    assert np.all(np.abs(got - 0.1 * np.array(counts)) < 1.0)  # within one example of each share


@pytest.mark.parametrize(
    ("counts", "size", "expected_total"),
    [
        ([10, 10, 10], 0.1, 3),  # exact shares
        ([7, 7, 6], 0.25, 5),  # 1.75 1.75 1.5: floors 1 1 1, two extras to the largest remainders
        ([3, 3, 3, 3, 3], 0.5, 8),  # round(7.5) = 8 (halves up), ties to the lower class
        ([100, 1, 1, 1], 0.2, 20),  # 20.6 wanted, but the single examples stay in training
        ([40, 60], 25, 25),  # a count rather than a fraction
    ],
)
def test_sizes_per_class_and_rounding(counts: list[int], size: float, expected_total: int) -> None:
    data = _dataset(counts)
    held = validation_indices(data.train_labels, size, seed=3)
    assert len(held) == expected_total
    fraction = size if isinstance(size, float) else size / sum(counts)
    got = _per_class(data.train_labels[held], len(counts))
    exact = fraction * np.array(counts)
    assert np.all(np.abs(got - exact) < 1.0 + 1e-9), (got, exact)
    assert np.all(got <= np.array(counts) - 1)  # every class keeps at least one training example


def test_largest_remainders_get_the_extra_examples_and_ties_go_to_the_lower_class() -> None:
    labels = np.repeat(np.arange(3), [7, 7, 6]).astype(np.int64)
    assert _per_class(labels[validation_indices(labels, 0.25)], 3).tolist() == [2, 2, 1]
    labels = np.repeat(np.arange(5), 3).astype(np.int64)
    assert _per_class(labels[validation_indices(labels, 0.5)], 5).tolist() == [2, 2, 2, 1, 1]


def test_the_split_is_stratified_for_other_class_counts() -> None:
    for classes in (2, 3, 7, 100):
        rng = np.random.default_rng(classes)
        counts = rng.integers(5, 80, classes).tolist()
        data = _dataset(counts, seed=classes)
        split = data.split_validation(0.1, seed=1)
        assert split.validation_labels is not None
        got = _per_class(split.validation_labels, classes)
        assert np.all(np.abs(got - 0.1 * np.array(counts)) < 1.0)
        assert len(split.validation_labels) == int(0.1 * sum(counts) + 0.5)


def test_deterministic_by_seed() -> None:
    labels = _dataset([50, 60, 70]).train_labels
    first = validation_indices(labels, 0.2, seed=7)
    assert np.array_equal(first, validation_indices(labels, 0.2, seed=7))
    other = validation_indices(labels, 0.2, seed=8)
    assert len(other) == len(first) and not np.array_equal(first, other)
    # the split of a dataset too: the same examples, whichever time it is made
    data = _dataset([50, 60, 70])
    a, b = data.split_validation(0.2, seed=7), data.split_validation(0.2, seed=7)
    assert a.validation_images is not None and b.validation_images is not None
    assert np.array_equal(a.validation_images, b.validation_images)
    assert np.array_equal(a.train_images, b.train_images)


def test_validation_is_disjoint_from_training_and_together_they_are_the_training_split() -> None:
    data = _dataset([30, 20, 25])
    held = validation_indices(data.train_labels, 0.1, seed=0)
    split = data.split_validation(0.1, seed=0)
    assert split.validation_images is not None and split.validation_labels is not None
    # Image i carries i in its first pixel (all below 256 here): the indices each split holds.
    in_train = set(split.train_images[:, 0, 0].tolist())
    in_validation = set(split.validation_images[:, 0, 0].tolist())
    assert in_validation == set(held.tolist())
    assert not in_train & in_validation
    assert in_train | in_validation == set(range(75))
    # labels travel with their images; the training split keeps its order otherwise
    assert np.array_equal(split.validation_labels, split.validation_images[:, 0, 1].astype(np.int64))
    assert np.array_equal(split.train_labels, split.train_images[:, 0, 1].astype(np.int64))
    assert list(split.train_images[:, 0, 0]) == sorted(split.train_images[:, 0, 0])
    assert np.array_equal(split.test_images, data.test_images)
    assert split.splits == ("train", "validation", "test") and data.splits == ("train", "test")


def test_tiny_datasets_keep_a_lone_example_in_training() -> None:
    data = _dataset([1, 2, 1])
    split = data.split_validation(0.5, seed=0)
    assert split.validation_labels is not None
    # round(0.5 * 4) = 2 wanted; classes 0 and 2 have one example each and give none, class 1 gives one
    assert _per_class(split.validation_labels, 3).tolist() == [0, 1, 0]
    assert _per_class(split.train_labels, 3).tolist() == [1, 1, 1]
    # 10% of 4 rounds to 0: an empty validation split, the training split untouched
    empty = data.split_validation(0.1, seed=0)
    assert empty.validation_labels is not None and len(empty.validation_labels) == 0
    assert len(empty.train_labels) == 4


def test_a_shipped_validation_split_is_used_as_it_is() -> None:
    data = _dataset([10, 10])
    shipped = ImageDataset(
        **{
            **{f: getattr(data, f) for f in data.__dataclass_fields__},
            "validation_images": np.ones((3, 4, 4), dtype=np.uint8),
            "validation_labels": np.array([0, 1, 1], dtype=np.int64),
        }
    )
    assert shipped.split_validation(0.5, seed=3) is shipped
    view = shipped.validation_as_test()
    assert view.test_labels.tolist() == [0, 1, 1] and view.validation_labels is None
    assert len(view.train_labels) == 20


def test_validation_as_test_puts_the_validation_split_where_trainers_evaluate() -> None:
    data = _dataset([20, 20])
    split = data.split_validation(0.1, seed=0)
    view = split.validation_as_test()
    assert split.validation_labels is not None
    assert np.array_equal(view.test_labels, split.validation_labels)
    assert np.array_equal(view.train_labels, split.train_labels)
    assert not view.has_validation
    with pytest.raises(ConfigError, match="no validation split"):
        data.validation_as_test()


def test_limit_train_then_split_holds_out_of_the_examples_kept() -> None:
    data = _dataset([60, 60])
    split = data.subset(train=40).split_validation(0.1, seed=0)
    assert split.validation_labels is not None
    assert (len(split.train_labels), len(split.validation_labels)) == (36, 4)
    # a subset of a split dataset keeps its validation split whole
    again = split.subset(train=10)
    assert again.validation_labels is not None and len(again.validation_labels) == 4


@pytest.mark.parametrize("size", [0, 0.0, 1.0, -0.1, 1.5, 120, True, "0.1", None])
def test_bad_sizes_are_config_errors(size: object) -> None:
    with pytest.raises(ConfigError, match="validation size"):
        validation_indices(_dataset([60, 60]).train_labels, size)  # type: ignore[arg-type]


def test_half_a_validation_split_is_refused() -> None:
    data = _dataset([5, 5])
    with pytest.raises(ConfigError, match="both be arrays or both be None"):
        ImageDataset(
            **{
                **{f: getattr(data, f) for f in data.__dataclass_fields__},
                "validation_images": np.zeros((1, 4, 4), dtype=np.uint8),
            }
        )


def test_validation_in_training_gives_back_every_training_example_once() -> None:
    data = _dataset([30, 20, 25])
    split = data.split_validation(0.2, seed=3)
    merged = split.validation_in_training()
    assert merged.validation_images is None and merged.splits == ("train", "test")
    assert len(merged.train_labels) == len(data.train_labels) == 75
    # Image i carries i in its first pixel: each training example exactly once, its label with it.
    assert sorted(merged.train_images[:, 0, 0].tolist()) == list(range(75))
    assert np.array_equal(merged.train_labels, merged.train_images[:, 0, 1].astype(np.int64))
    assert np.array_equal(merged.test_images, data.test_images)
    assert data.validation_in_training() is data  # nothing held out: nothing to give back


def test_arrays_sha256_tells_contents_shapes_and_dtypes_apart_and_takes_empty_arrays() -> None:
    from deepspark.data.record import arrays_sha256

    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    digest = arrays_sha256(images, np.array([0, 1]))
    assert digest == arrays_sha256(images.copy(), np.array([0, 1]))
    assert digest != arrays_sha256(images, np.array([1, 0]))
    assert digest != arrays_sha256(images.reshape(2, 4, 3), np.array([0, 1]))
    assert digest != arrays_sha256(images.astype(np.int16), np.array([0, 1]))
    # An empty split (limit_train=0) is hashed, not a TypeError from memoryview's cast.
    empty = arrays_sha256(np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64))
    assert empty != arrays_sha256(np.zeros((0, 7, 8), np.uint8), np.zeros(0, np.int64))
