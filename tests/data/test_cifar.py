"""The CIFAR-10 binary reader, on small files written in that format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepspark.data import load_cifar10, load_dataset, read_cifar10
from deepspark.data.cifar import CIFAR10_CLASSES
from deepspark.errors import DatasetError


def _write_batch(path: Path, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    path.write_bytes(records.tobytes())
    return images, labels.astype(np.int64)


def test_read_cifar10_records(tmp_path: Path) -> None:
    a = _write_batch(tmp_path / "data_batch_1.bin", 4, seed=0)
    b = _write_batch(tmp_path / "data_batch_2.bin", 3, seed=1)
    images, labels = read_cifar10([tmp_path / "data_batch_1.bin", tmp_path / "data_batch_2.bin"])
    assert images.dtype == np.uint8 and images.shape == (7, 3, 32, 32)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, np.concatenate([a[0], b[0]]))
    np.testing.assert_array_equal(labels, np.concatenate([a[1], b[1]]))


def test_size_not_a_multiple_of_the_record_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1.bin"
    _write_batch(path, 2, seed=0)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="not a positive multiple of the 3073-byte") as err:
        read_cifar10([path])
    assert str(path) in str(err.value)


def test_label_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "test_batch.bin"
    path.write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(DatasetError, match="label 10 is out of range"):
        read_cifar10([path])


def test_load_cifar10_directory_with_meta(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    for i in range(1, 6):
        _write_batch(base / f"data_batch_{i}.bin", 2, seed=i)
    test_images, _ = _write_batch(base / "test_batch.bin", 3, seed=9)
    data = load_cifar10(tmp_path)
    assert data.train_images.shape == (10, 3, 32, 32) and data.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(data.test_images, test_images)
    assert data.class_names == CIFAR10_CLASSES and data.num_classes == 10
    scaled = data.train_images / 255.0
    assert data.mean == pytest.approx(tuple(scaled[:, c].mean() for c in range(3)), abs=1e-6)
    assert data.std == pytest.approx(tuple(scaled[:, c].std() for c in range(3)), abs=1e-6)
    names = [f"class{i}" for i in range(10)]
    (base / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert load_dataset(data_dir=base).class_names == tuple(names)
    (base / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError, match=r"missing data_batch_3\.bin"):
        load_cifar10(base)


def test_unreadable_meta_file_is_a_dataset_error_naming_it(tmp_path: Path) -> None:
    for i in range(1, 6):
        _write_batch(tmp_path / f"data_batch_{i}.bin", 1, seed=i)
    _write_batch(tmp_path / "test_batch.bin", 1, seed=9)
    meta = tmp_path / "batches.meta.txt"
    meta.write_bytes(b"\xff\xfeairplane\n")  # not UTF-8: a UnicodeDecodeError traceback before
    with pytest.raises(DatasetError, match="cannot read the class names") as err:
        load_cifar10(tmp_path)
    assert str(meta) in str(err.value)
