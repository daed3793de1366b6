from __future__ import annotations

import json

import pytest
import torch

from deepspark.errors import ConfigError, SpecError
from deepspark.models import ModelSpec, build_model, load_spec, model_spec


def test_spec_builds_and_infers_shapes() -> None:
    spec = ModelSpec.from_dict(
        {
            "input_shape": [1, 28, 28],
            "layers": [
                {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1},
                {"type": "batchnorm"},
                {"type": "relu"},
                {"type": "maxpool", "kernel_size": 2},
                {"type": "flatten"},
                {"type": "linear", "out_features": 10},
            ],
        }
    )
    assert spec.output_shape() == (10,)
    out = build_model(spec)(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_linear_on_image_names_the_layer_and_shapes() -> None:
    with pytest.raises(SpecError, match=r"layer 1 \(linear\).*\(4, 26, 26\).*add a flatten"):
        build_model(
            {
                "input_shape": [1, 28, 28],
                "layers": [{"type": "conv", "out_channels": 4}, {"type": "linear", "out_features": 3}],
            }
        )


def test_kernel_too_large_for_input() -> None:
    with pytest.raises(SpecError, match=r"layer 2 \(conv\).*does not fit input \(4, 2, 2\)"):
        load_spec(
            {
                "input_shape": [1, 8, 8],
                "layers": [
                    {"type": "conv", "out_channels": 4, "kernel_size": 3},
                    {"type": "maxpool", "kernel_size": 3},
                    {"type": "conv", "out_channels": 4, "kernel_size": 5},
                ],
            }
        ).output_shape()


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([{"type": "attention"}], "unknown type 'attention'"),
        ([{"type": "conv", "out_channels": 4, "stride_": 2}], "unknown parameter"),
        ([{"type": "conv"}], "missing required parameter"),
        ([{"type": "dropout", "p": 1.5}], "p must be in"),
        ([{"type": "conv", "out_channels": -1}], "positive integer"),
        ([{"out_channels": 4}], "with a 'type' key"),
        # Each of these used to pass the spec and fail later: a TypeError while building, or torch's
        # error (or silently wrong running statistics) in the first training step, inside a task.
        (
            [{"type": "conv", "out_channels": 4, "stride": None}],
            r"layer 0 \(conv\): stride must be a positive",
        ),
        (
            [{"type": "maxpool", "kernel_size": 3, "padding": 2}],
            r"padding 2 is more than half the kernel size 3",
        ),
        ([{"type": "batchnorm", "eps": 0}], r"layer 0 \(batchnorm\): momentum must be in \[0, 1\] and eps"),
        ([{"type": "batchnorm", "momentum": -1}], r"layer 0 \(batchnorm\): momentum must be in \[0, 1\]"),
    ],
)
def test_bad_layers(layers, message) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec({"input_shape": [1, 8, 8], "layers": layers}).output_shape()


def test_output_shape_allocates_no_weights_and_a_size_torch_cannot_build_is_a_spec_error() -> None:
    huge = load_spec({"input_shape": [784], "layers": [{"type": "linear", "out_features": 10**12}]})
    assert huge.output_shape() == (10**12,)  # 3 TB of weights: torch's allocation error before
    with pytest.raises(SpecError, match=r"layer 0 \(linear\): torch cannot build it"):
        build_model(huge)
    beyond = load_spec({"input_shape": [784], "layers": [{"type": "linear", "out_features": 10**20}]})
    with pytest.raises(SpecError, match=r"layer 0 \(linear\): torch cannot build it"):
        beyond.output_shape()  # past int64: a TypeError before


def test_pool_stride_may_be_null_and_means_the_kernel_size() -> None:
    spec = load_spec(
        {"input_shape": [1, 5, 7], "layers": [{"type": "avgpool", "kernel_size": 2, "stride": None}]}
    )
    assert spec.output_shape() == (1, 2, 3)


def test_hyperparameters_that_are_not_a_mapping_are_a_spec_error() -> None:
    with pytest.raises(
        SpecError, match=r"hyperparameters must be a mapping of names to values, got \[1, 2\]"
    ):
        load_spec(
            {"input_shape": [4], "layers": [{"type": "linear", "out_features": 2}], "hyperparameters": [1, 2]}
        )


@pytest.mark.parametrize("shape", [[True, 28, 28], [1, False, 3], [0, 4], [], "1x28x28", [1.0, 28, 28]])
def test_an_input_shape_that_is_not_positive_integers_is_a_spec_error(shape) -> None:
    # true is an int to Python: [true, 28, 28] was read as one channel of 28 x 28.
    with pytest.raises(SpecError, match="input_shape must be a list of positive integers"):
        load_spec(
            {"input_shape": shape, "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 2}]}
        )


def test_spec_files_round_trip(tmp_path) -> None:
    spec = model_spec("lenet")
    (tmp_path / "s.json").write_text(spec.to_json())
    assert load_spec(tmp_path / "s.json") == spec
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(json.loads(spec.to_json())))
    assert load_spec(str(tmp_path / "s.yaml")).layers == spec.layers


@pytest.mark.parametrize(
    ("name", "text", "key", "line"),
    [
        (
            "s.json",
            '{"input_shape": [1, 4, 4],\n "layers": [{"type": "flatten"},\n'
            ' {"type": "linear", "out_features": 2, "out_features": 3}]}',
            "out_features",
            3,
        ),
        ("s.yaml", "input_shape: [1, 4, 4]\nlayers: []\nlayers:\n  - {type: flatten}\n", "layers", 3),
    ],
)
def test_a_spec_file_giving_a_key_twice_is_refused_not_the_last_kept(
    tmp_path, name: str, text: str, key: str, line: int
) -> None:
    """The JSON and YAML parsers keep a repeated key's last value: a layer of 2 outputs became one of 3."""
    (tmp_path / name).write_text(text)
    with pytest.raises(SpecError, match=rf"gives the key '{key}' twice \(again at line {line}\)"):
        load_spec(tmp_path / name)


def test_zoo_networks() -> None:
    x = torch.zeros(2, 1, 28, 28)
    assert build_model(model_spec("cnn"))(x).shape == (2, 10)
    assert build_model(model_spec("lenet"))(x).shape == (2, 10)
    mlp = model_spec("mlp", hidden=32, depth=3, num_classes=4)
    assert build_model(mlp)(x).shape == (2, 4)
    assert sum(layer["type"] == "linear" for layer in mlp.layers) == 4
    # SparkNet's LeNet: conv20-pool-conv50-pool-ip500-relu-ip10
    kinds = [
        (layer["type"], layer.get("out_channels") or layer.get("out_features"))
        for layer in model_spec("lenet").layers
    ]
    assert kinds == [
        ("conv", 20),
        ("maxpool", None),
        ("conv", 50),
        ("maxpool", None),
        ("flatten", None),
        ("linear", 500),
        ("relu", None),
        ("linear", 10),
    ]
    cnn = model_spec("cnn", fc=256)
    assert [layer.get("out_features") for layer in cnn.layers if layer["type"] == "linear"] == [256, 10]


def test_the_cnn_takes_a_batch_normalisation_after_each_convolution() -> None:
    plain = [layer["type"] for layer in model_spec("cnn").layers]
    assert "batchnorm" not in plain  # the blog's network, unchanged by default
    assert [layer["type"] for layer in model_spec("cnn", batchnorm=False).layers] == plain
    normed = [layer["type"] for layer in model_spec("cnn", batchnorm=True).layers]
    assert normed[:4] == ["conv", "batchnorm", "relu", "maxpool"]
    assert normed[4:8] == ["conv", "batchnorm", "relu", "maxpool"]
    assert [t for t in normed if t != "batchnorm"] == plain
    model = build_model(model_spec("cnn", batchnorm=True, fc=64), seed=0)
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2
    for bad in (1, "true", None):
        with pytest.raises(ConfigError, match="batchnorm: expected true or false"):
            model_spec("cnn", batchnorm=bad)


def test_zoo_rejects_unknown_hyperparameters() -> None:
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['width'\]"):
        model_spec("cnn", width=3)
    with pytest.raises(ConfigError, match="expected one of"):
        model_spec("resnet")


def test_seeded_build_is_reproducible() -> None:
    a = build_model(model_spec("mlp", hidden=16), seed=3).state_dict()
    b = build_model(model_spec("mlp", hidden=16), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["lenet", "cnn"])
def test_convolutional_models_hold_channels_last_weights_and_compute_the_same(name: str) -> None:
    from deepspark.models import state_from_bytes, state_to_bytes

    model = build_model(model_spec(name, input_shape=(3, 28, 28)), seed=5).eval()
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout really changed (3 input channels)
    plain = build_model(model_spec(name, input_shape=(3, 28, 28)), seed=5).eval()
    plain.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    # written contiguous, read back into either layout with the same values
    state = state_from_bytes(state_to_bytes(model.state_dict()))
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    plain.load_state_dict(state)
    assert all(p.is_contiguous() for p in plain.parameters())


def test_models_without_convolutions_keep_the_default_layout() -> None:
    model = build_model(model_spec("mlp", hidden=16), seed=0)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("name", ["spec.json", "spec.yaml"])
def test_a_spec_file_nested_too_deeply_is_a_spec_error(tmp_path, name) -> None:
    """The parsers' RecursionError escaped: a traceback from the CLI instead of its one error line."""
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match="is nested too deeply"):
        load_spec(path)


BOMB = "".join(  # nine levels of ten aliases each: a billion values once expanded (printed, or as JSON)
    f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['1'] * 10)}]\n" for i in range(9)
)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "spec.json",
            '{"input_shape": [' + "9" * 5000 + '], "layers": []}',
            "holds a value that cannot be read",
        ),
        ("spec.yaml", "input_shape: [" + "9" * 5000 + "]\nlayers: []\n", "holds a value that cannot be read"),
        (
            "spec.yaml",
            "name: x\nhyperparameters:\n  bomb:\n" + BOMB + "input_shape: [4]\nlayers: [{type: flatten}]\n",
            "expands its YAML aliases to more than 1,000,000 values",
        ),
        ("spec.yaml", "input_shape: [4]\nlayers: &a [{type: flatten}, *a]\n", "a value that contains itself"),
    ],
    ids=["json-long-int", "yaml-long-int", "alias-bomb", "alias-cycle"],
)
def test_a_spec_file_that_would_exhaust_the_loader_is_a_spec_error(tmp_path, name, text, message) -> None:
    """A 5000-digit integer was a ValueError and an alias cycle a RecursionError (tracebacks); the alias
    bomb loaded, and its first repr or JSON dump (a checkpoint's spec.json) took all the memory."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_a_negative_mlp_depth_is_refused_not_read_as_zero() -> None:
    assert [layer["type"] for layer in model_spec("mlp", depth=0).layers] == ["flatten", "linear"]
    with pytest.raises(ConfigError, match=r"model 'mlp': depth: expected an integer >= 0, got -2"):
        model_spec("mlp", depth=-2)
