"""The real MNIST, from the cache `deepspark data fetch mnist` fills before the test run."""

from __future__ import annotations

import numpy as np
import pytest

from deepspark.data import ImageDataset, load_dataset, verify


@pytest.mark.slow
def test_real_mnist_loads_verified(mnist: ImageDataset) -> None:
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    assert set(np.unique(mnist.test_labels)) == set(range(10))
    assert mnist.input_shape == (1, 28, 28) and mnist.class_names == tuple("0123456789")
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert verify("mnist") == dict.fromkeys(verify("mnist"), "ok")
    assert load_dataset("mnist").train_images[0].sum() == mnist.train_images[0].sum()
