from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deepspark.errors import ConfigError
from deepspark.models import Preprocess


def test_it_scales_and_normalises_each_channel_without_touching_its_input() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 3, 4, 6), dtype=np.uint8)
    preprocess = Preprocess(input_shape=(3, 4, 6), mean=(0.5,), std=(0.2, 0.3, 0.4))
    expected = (images.astype(np.float64) / 255 - 0.5) / np.array([0.2, 0.3, 0.4]).reshape(3, 1, 1)
    out = preprocess.apply(images)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 4, 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    # A float input is copied, never normalised in place.
    floats = torch.from_numpy(images).to(torch.float32)
    before = floats.clone()
    np.testing.assert_allclose(preprocess.apply(floats).numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(floats, before)
    # A read-only array (a memory map, an image decoded by Pillow) is read, without a torch warning.
    frozen = images.astype(np.float32)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(preprocess.apply(frozen).numpy(), expected, rtol=0, atol=1e-6)


def test_one_channel_images_may_leave_the_channel_out() -> None:
    preprocess = Preprocess(input_shape=(1, 2, 2), mean=(0.1307,), std=(0.3081,))
    images = np.array([[[0, 255], [128, 7]]], dtype=np.uint8)
    out = preprocess.apply(images)
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out.numpy()[:, 0], (images / 255 - 0.1307) / 0.3081, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="do not match the model input"):
        preprocess.apply(np.zeros((1, 3, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((float("nan"),), (1.0,), "mean: expected finite values"),
        ((float("inf"),), (1.0,), "mean: expected finite values"),
        ((0.0,), (float("nan"),), "std: expected positive finite values"),
        ((0.0,), (float("inf"),), "std: expected positive finite values"),
        ((0.0,), (0.0,), "std: expected positive finite values"),
    ],
)
def test_nan_or_infinite_mean_and_std_are_refused(
    mean: tuple[float, ...], std: tuple[float, ...], match: str
) -> None:
    # `predict --input-shape 1,28,28 --std nan` (float() reads 'nan' and 'inf') normalised every image
    # to NaN (or, with std inf, to zeros): class 0 with a NaN probability for every row, and no error.
    with pytest.raises(ConfigError, match=match):
        Preprocess(input_shape=(1, 28, 28), mean=mean, std=std)


def test_the_input_shape_is_checked_however_the_preprocess_is_made() -> None:
    # A bool is an int to Python: True channels would have read as one.
    with pytest.raises(ConfigError, match=r"preprocess\.input_shape: expected an integer >= 1, got True"):
        Preprocess(input_shape=(True, 28, 28), mean=(0.0,), std=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"preprocess\.input_shape: expected three integers"):
        Preprocess(input_shape=(28, 28), mean=(0.0,), std=(1.0,))  # type: ignore[arg-type]
    # A list is taken as the tuple it names (it compared unequal to every image shape).
    listed = Preprocess(input_shape=[1, 2, 2], mean=(0.0,), std=(1.0,))  # type: ignore[arg-type]
    assert listed.input_shape == (1, 2, 2)
    assert listed.apply(np.zeros((3, 2, 2), dtype=np.uint8)).shape == (3, 1, 2, 2)


@pytest.mark.parametrize("key", ["mean", "std", "scale"])
def test_a_metadata_number_beyond_the_float_range_is_a_config_error(key: str) -> None:
    # A metadata.json may hold any integer; math.isfinite raised OverflowError (a traceback in predict).
    entry = {"input_shape": [1, 28, 28], "mean": [0.1], "std": [0.3]}
    entry[key] = 10**400 if key == "scale" else [10**400]
    with pytest.raises(ConfigError, match=f"preprocess.{key}: expected"):
        Preprocess.from_dict(entry)
