from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepspark.data import ImageDataset
from deepspark.errors import ConfigError, DivergenceError
from deepspark.models import model_spec
from deepspark.training import EpochMetrics, TrainConfig, evaluate, train_one_process
from deepspark.training.loop import DataCursor, _random_shift, augment_batch


def _toy(n: int = 256, seed: int = 0) -> ImageDataset:
    """Two classes: a bright square top-left vs bottom-right, on 8x8 images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.integers(0, 40, size=(n, 8, 8)).astype(np.uint8)
    images[labels == 0, :3, :3] = 250
    images[labels == 1, 5:, 5:] = 250
    return ImageDataset(
        name="toy",
        train_images=images[: n // 2],
        train_labels=labels[: n // 2].astype(np.int64),
        test_images=images[n // 2 :],
        test_labels=labels[n // 2 :].astype(np.int64),
        num_classes=2,
        class_names=("tl", "br"),
        mean=(0.2,),
        std=(0.3,),
    )


def test_config_validation_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match="optimizer: expected one of"):
        TrainConfig(optimizer="adagrad")
    with pytest.raises(ConfigError, match="learning_rate: expected a number > 0, got -1"):
        TrainConfig(learning_rate=-1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 0.1})


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_learns_toy_problem_and_reports_each_epoch(optimizer) -> None:
    seen: list[EpochMetrics] = []
    lr = 0.05 if optimizer != "adam" else 0.01
    result = train_one_process(
        model_spec("mlp", input_shape=(1, 8, 8), num_classes=2, hidden=16),
        _toy(),
        TrainConfig(optimizer=optimizer, learning_rate=lr, epochs=3, batch_size=16, threads=1),
        callback=seen.append,
    )
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert result.test_accuracy > 0.95


@pytest.mark.parametrize("augment", [True, "affine"])
def test_deterministic_for_a_seed(augment: bool | str) -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, seed=7, threads=1, augment=augment)
    spec = model_spec("mlp", input_shape=(1, 8, 8), num_classes=2, hidden=8, dropout=0.2)
    a = train_one_process(spec, _toy(), cfg)
    b = train_one_process(spec, _toy(), cfg)
    assert [m.train_loss for m in a.history] == [m.train_loss for m in b.history]
    c = train_one_process(
        spec, _toy(), TrainConfig(epochs=2, batch_size=16, seed=8, threads=1, augment=augment)
    )
    assert [m.train_loss for m in a.history] != [m.train_loss for m in c.history]
    plain = train_one_process(spec, _toy(), TrainConfig(epochs=2, batch_size=16, seed=7, threads=1))
    assert [m.train_loss for m in a.history] != [m.train_loss for m in plain.history]


@pytest.mark.parametrize("bad", ["rotate", "true", 1, None])
def test_augment_takes_true_false_or_affine(bad: object) -> None:
    assert TrainConfig(augment="affine").augment == "affine"
    with pytest.raises(ConfigError, match='augment: expected true \\(random shifts\\), false or "affine"'):
        TrainConfig(augment=bad)  # type: ignore[arg-type]


def test_divergence_names_epoch_and_step() -> None:
    with pytest.raises(DivergenceError, match="epoch 1, step") as info:
        train_one_process(
            model_spec("mlp", input_shape=(1, 8, 8), num_classes=2, hidden=16),
            _toy(),
            TrainConfig(optimizer="sgd", learning_rate=1e12, epochs=2, batch_size=16, threads=1),
        )
    assert info.value.epoch == 0 and info.value.step >= 0


def test_callback_exception_stops_training() -> None:
    class Stop(Exception):
        pass

    def stop(m: EpochMetrics) -> None:
        raise Stop(m.epoch)

    with pytest.raises(Stop):
        train_one_process(
            model_spec("mlp", input_shape=(1, 8, 8), num_classes=2, hidden=4),
            _toy(),
            TrainConfig(epochs=5, batch_size=32, threads=1),
            callback=stop,
        )


def test_input_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ConfigError, match="does not match the dataset"):
        train_one_process(model_spec("mlp"), _toy(), TrainConfig(epochs=1))


def test_random_shift_moves_pixels_within_bounds() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = _random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    where = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = where // 8, where % 8
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5


def test_random_affine_maps_resample_within_the_images_range_and_follow_the_generator() -> None:
    from deepspark.training.loop import _random_affine

    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 13:15, 13:15] = 1.0  # a bright square at the centre
    x[:, :, 4, 4] = 0.5
    out = augment_batch(x, "affine", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # bilinear: a convex mix of the pixels
    assert torch.equal(out, augment_batch(x, "affine", torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, "affine", torch.Generator().manual_seed(1)))
    # The centre's square moves by at most the shift (2 pixels) and a little scaling; images differ.
    centre = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = centre // 28, centre % 28
    assert rows.min() >= 10 and rows.max() <= 17 and cols.min() >= 10 and cols.max() <= 17
    assert len({tuple(img.flatten().tolist()) for img in out[:, 0, 10:18, 10:18]}) > 32
    # No rotation, scaling or shift: the identity, to float rounding.
    still = _random_affine(x, torch.Generator().manual_seed(0), degrees=0.0, scale=0.0, pad=0)
    torch.testing.assert_close(still, x, rtol=0, atol=1e-6)
    assert augment_batch(x, False, torch.Generator()) is x


def test_evaluate_counts_correct_predictions() -> None:
    model = torch.nn.Flatten()
    inputs = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]], [[5.0, 1.0]]])
    scores = evaluate(model, inputs, torch.tensor([0, 1, 1]))
    assert scores["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_short_mnist_run_beats_chance(mnist) -> None:
    data = mnist.subset(train=3000, test=1000)
    result = train_one_process(model_spec("lenet"), data, TrainConfig(epochs=1, batch_size=32, threads=2))
    assert result.test_accuracy > 0.85  # chance is 0.10


def test_a_data_cursor_is_its_position_and_resumes_the_same_batches_and_augmentation() -> None:
    cursor = DataCursor(103, 10, seed=7)
    for _ in range(25):  # two epochs and a half: 11 steps per epoch
        cursor.next_indices()
    state = cursor.state()
    assert len(json.dumps(state)) < 120  # it travels with every round of average and async
    copy = DataCursor.from_state(json.loads(json.dumps(state)))
    for _ in range(15):  # across the next epoch boundary
        a, b = cursor.next_indices(), copy.next_indices()
        assert torch.equal(a, b)
        assert torch.equal(
            torch.randint(0, 5, (8,), generator=cursor.batch_generator()),
            torch.randint(0, 5, (8,), generator=copy.batch_generator()),
        )
    # every epoch is a permutation of all examples, and epochs differ
    fresh = DataCursor(103, 10, seed=7)
    epochs = [torch.cat([fresh.next_indices() for _ in range(11)]) for _ in range(2)]
    assert all(sorted(e.tolist()) == list(range(103)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    # augmentation streams differ from step to step
    fresh.next_indices()
    g1 = torch.randint(0, 1000, (8,), generator=fresh.batch_generator())
    fresh.next_indices()
    assert not torch.equal(g1, torch.randint(0, 1000, (8,), generator=fresh.batch_generator()))


def test_a_data_cursor_of_the_earlier_generator_format_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="start the run again"):
        DataCursor.from_state({"n": 10, "batch_size": 2, "epoch": 0, "step": 1, "generator": "AAAA"})


def test_a_last_batch_of_one_that_batch_norm_cannot_normalise_is_a_config_error() -> None:
    """129 examples in batches of 8 leave one: BatchNorm1d's ValueError escaped as a traceback."""
    spec = {
        "input_shape": [1, 8, 8],
        "layers": [
            {"type": "flatten"},
            {"type": "linear", "out_features": 4},
            {"type": "batchnorm"},
            {"type": "linear", "out_features": 2},
        ],
    }
    data = _toy(258)
    with pytest.raises(ConfigError, match=r"last batch holds one example \(129 examples, batch size 8\)"):
        train_one_process(spec, data, TrainConfig(epochs=1, batch_size=8, threads=1))
    train_one_process(spec, data, TrainConfig(epochs=1, batch_size=10, threads=1))  # a last batch of 9


@pytest.mark.parametrize("shape", [(40, 6, 5), (40, 3, 6, 5)])
def test_examples_keep_pixels_and_give_the_batches_preprocessing_the_whole_set_gives(
    shape: tuple[int, ...],
) -> None:
    from deepspark.models import Preprocess
    from deepspark.training.loop import Examples

    pixels = np.random.default_rng(5).integers(0, 256, size=shape, dtype=np.uint8)
    channels = 1 if len(shape) == 3 else shape[1]
    preprocess = Preprocess(input_shape=(channels, 6, 5), mean=(0.4,) * channels, std=(0.27,) * channels)
    examples = Examples.of(pixels, preprocess)
    # Kept as the pixels themselves (a quarter of float32's memory), not a normalised copy.
    assert examples.stored.dtype == torch.uint8 and examples.stored.data_ptr() == pixels.ctypes.data
    assert len(examples) == 40
    whole = preprocess.apply(pixels)
    index = torch.tensor([7, 0, 39, 7, 12])
    assert torch.equal(examples[index], whole[index])  # bit for bit: the same operations per element
    assert np.array_equal(examples.stored.numpy(), pixels)  # batches never normalise the kept pixels
    # A read-only array (a memory map) is copied rather than viewed; model inputs pass as they are.
    frozen = pixels.copy()
    frozen.flags.writeable = False
    assert torch.equal(Examples.of(frozen, preprocess)[index], whole[index])
    floats = whole.numpy()
    assert torch.equal(Examples.of(floats, None)[index], whole[index])
