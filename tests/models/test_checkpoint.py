from __future__ import annotations

import json

import pytest
import torch

from deepspark.errors import CheckpointError, ConfigError
from deepspark.models import Preprocess, build_model, load_checkpoint, model_spec, save_checkpoint

PRE = Preprocess(input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))


def test_round_trip_gives_identical_outputs(tmp_path) -> None:
    spec = model_spec("cnn", conv1=4, conv2=8, fc=16)
    model = build_model(spec, seed=1).eval()
    path = save_checkpoint(
        tmp_path / "ck",
        model,
        spec,
        preprocess=PRE,
        class_names=list("abcdefghij"),
        metrics={"accuracy": 0.5},
    )
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "model.safetensors", "spec.json"]
    loaded = load_checkpoint(path)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.class_names == tuple("abcdefghij")
    assert loaded.preprocess == PRE
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["metrics"] == {"accuracy": 0.5} and "torch" in meta["versions"]
    # Loading through the weights file works too.
    assert load_checkpoint(path / "model.safetensors").spec == spec


def test_a_model_with_more_outputs_than_classes_names_every_output_and_loads_for_inference(tmp_path) -> None:
    from deepspark.inference import load_model

    spec = model_spec("mlp", hidden=8, num_classes=11)  # trained on data of 3 classes: allowed
    path = save_checkpoint(
        tmp_path / "ck", build_model(spec), spec, preprocess=PRE, class_names=["a", "b", "c"]
    )
    names = ("a", "b", "c", *(str(i) for i in range(3, 11)))
    assert load_checkpoint(path).class_names == names
    assert load_model(path).class_names == names


def test_loading_a_checkpoint_leaves_the_callers_torch_rng_as_it_was(tmp_path) -> None:
    from deepspark.inference import load_model

    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec, seed=1), spec, preprocess=PRE)
    torch.manual_seed(123)  # a notebook's own seed
    state = torch.get_rng_state()
    load_checkpoint(path)
    load_model(path)
    assert torch.equal(torch.get_rng_state(), state)


def test_existing_path_is_not_overwritten_by_default(tmp_path) -> None:
    spec = model_spec("mlp", hidden=8)
    save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)


def test_pickle_files_are_refused(tmp_path) -> None:
    model = build_model(model_spec("mlp", hidden=8))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*unpickling runs arbitrary code"):
        load_checkpoint(tmp_path / "model.pt")
    renamed = tmp_path / "innocent.safetensors"
    renamed.write_bytes((tmp_path / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(renamed)
    import pickle

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.pkl").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="pickled files are refused"):
        load_checkpoint(tmp_path / "d")


def test_weights_that_do_not_match_the_spec(tmp_path) -> None:
    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    (path / "spec.json").write_text(model_spec("mlp", hidden=9).to_json())
    with pytest.raises(CheckpointError, match="do not match spec.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("units", [10**12, 10**20])
def test_a_spec_far_larger_than_its_weights_is_refused_before_any_allocation(tmp_path, units) -> None:
    spec = model_spec("mlp", hidden=8)
    names = [str(i) for i in range(10)]
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE, class_names=names)
    data = json.loads((path / "spec.json").read_text())
    data["layers"][1]["out_features"] = units  # terabytes of weights: torch's allocation error before
    (path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="spec.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8])
def test_weights_that_are_not_floats_are_refused_not_cast(tmp_path, dtype) -> None:
    from safetensors.torch import load_file, save_file

    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    state = load_file(path / "model.safetensors")
    name = next(iter(state))
    save_file({**state, name: state[name].to(dtype)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} is {dtype}"):
        load_checkpoint(path)


def test_state_bytes_round_trip_is_exact_and_never_pickles() -> None:
    from deepspark.models import state_from_bytes, state_to_bytes

    model = build_model(model_spec("cnn", conv1=4, conv2=8, fc=16), seed=2)
    data = state_to_bytes(model.state_dict())
    assert data[8:9] == b"{"  # safetensors: an 8-byte header length, then a JSON header
    state = state_from_bytes(data)
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)
    with pytest.raises(CheckpointError, match="not a safetensors state dict"):
        state_from_bytes(b"\x80\x04K\x01.")  # a pickle


def test_checkpoint_files_are_what_save_checkpoint_writes(tmp_path) -> None:
    from deepspark.models import checkpoint_files

    spec = model_spec("cnn", conv1=4, conv2=8, fc=16)
    model = build_model(spec, seed=3).eval()
    files = checkpoint_files(model, spec, preprocess=PRE, metrics={"accuracy": 0.25})
    assert sorted(files) == ["metadata.json", "model.safetensors", "spec.json"]
    (tmp_path / "ck").mkdir()
    for name, data in files.items():
        (tmp_path / "ck" / name).write_bytes(data)
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.metadata["metrics"] == {"accuracy": 0.25}


def test_preprocessing_for_another_input_shape_than_the_spec_is_refused(tmp_path) -> None:
    """A 1x5x7 network whose metadata.json says 1x7x5: the conv + flatten + linear layers accept both
    (4 * 3 * 5 == 4 * 5 * 3 features), so inference would run on transposed images without a word."""
    from deepspark.models import ModelSpec

    layers = [
        {"type": "conv", "out_channels": 4, "kernel_size": 3},
        {"type": "flatten"},
        {"type": "fc", "out_features": 3},
    ]
    spec = ModelSpec.from_dict({"input_shape": [1, 5, 7], "layers": layers})
    path = save_checkpoint(
        tmp_path / "ck", build_model(spec, seed=0), spec, preprocess=Preprocess((1, 5, 7), (0.1,), (0.3,))
    )
    meta = json.loads((path / "metadata.json").read_text())
    meta["preprocess"]["input_shape"] = [1, 7, 5]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"preprocesses images to \[1, 7, 5\] but spec.json builds .*\[1, 5, 7\]"
    ):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("preprocess", "named"),
    [
        ({"mean": [0.1], "std": [0.3]}, "preprocess.input_shape"),
        ({"input_shape": [1, 28, 28, 1], "mean": [0.1], "std": [0.3]}, "preprocess.input_shape"),
        ({"input_shape": [1, 28, 28], "mean": "0.1", "std": [0.3]}, "preprocess.mean"),
        ({"input_shape": [1, 28, 28], "mean": [0.1], "std": [float("nan")]}, "preprocess.std"),
        ([1, 28, 28], "preprocess"),
    ],
)
def test_a_malformed_preprocess_entry_is_a_checkpoint_error(tmp_path, preprocess, named) -> None:
    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    meta = json.loads((path / "metadata.json").read_text())
    meta["preprocess"] = preprocess
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"bad 'preprocess' entry in metadata.json: {named}: expected"):
        load_checkpoint(path)


@pytest.mark.parametrize("names", ["abc", 3, {"a": 0, "b": 1, "c": 2}, [["a"], "b", "c"], ["a", None, "c"]])
def test_class_names_that_are_not_a_list_of_names_are_a_checkpoint_error(tmp_path, names) -> None:
    """A string was read as one class name per character and a mapping as its keys: a 3-output model
    then predicted labels 'a', 'b', 'c' without a word."""
    spec = model_spec("mlp", hidden=8, num_classes=3)
    path = save_checkpoint(
        tmp_path / "ck", build_model(spec), spec, preprocess=PRE, class_names=["x", "y", "z"]
    )
    meta = json.loads((path / "metadata.json").read_text())
    meta["class_names"] = names
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"'class_names' must be a list of class names"):
        load_checkpoint(path)


def test_a_metadata_json_that_is_not_utf8_is_a_checkpoint_error(tmp_path) -> None:
    """It was a UnicodeDecodeError: a traceback from the CLI instead of its one error line."""
    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    (path / "metadata.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=r"metadata.json is not valid JSON: not UTF-8 text"):
        load_checkpoint(path)


@pytest.mark.parametrize("count", [2, 4])
def test_class_names_for_another_number_of_outputs_are_a_checkpoint_error(tmp_path, count) -> None:
    """load_checkpoint took 4 names for a 3-output network as they were (export_model wrote them next to
    the model file) and inference said that 'labels' were given."""
    spec = model_spec("mlp", hidden=8, num_classes=3)
    path = save_checkpoint(
        tmp_path / "ck", build_model(spec), spec, preprocess=PRE, class_names=["x", "y", "z"]
    )
    meta = json.loads((path / "metadata.json").read_text())
    meta["class_names"] = [str(i) for i in range(count)]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=rf"names {count} classes but spec.json builds a network with 3 outputs"
    ):
        load_checkpoint(path)


def test_a_checkpoint_its_loader_would_refuse_is_not_written(tmp_path) -> None:
    """Preprocessing for a transposed input and more names than outputs were written, and only
    load_checkpoint refused them (saying to save the checkpoint again)."""
    spec = model_spec("mlp", hidden=8, input_shape=(1, 12, 20), num_classes=3)
    model = build_model(spec)
    with pytest.raises(ConfigError, match=r"preprocess: its input shape \[1, 20, 12\] is not the network's"):
        save_checkpoint(tmp_path / "a", model, spec, preprocess=Preprocess((1, 20, 12), (0.1,), (0.3,)))
    right = Preprocess((1, 12, 20), (0.1,), (0.3,))
    with pytest.raises(ConfigError, match=r"class_names: 4 names for a network with 3 outputs"):
        save_checkpoint(tmp_path / "b", model, spec, preprocess=right, class_names=list("abcd"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert load_checkpoint(save_checkpoint(tmp_path / "c", model, spec, preprocess=right)).class_names == (
        "0",
        "1",
        "2",
    )


def test_a_metadata_json_nested_too_deeply_is_a_checkpoint_error(tmp_path) -> None:
    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    (path / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="metadata.json is not a metadata file: nested too deeply"):
        load_checkpoint(path)


def test_a_bad_layer_in_spec_json_is_a_checkpoint_error_naming_the_file(tmp_path) -> None:
    spec = model_spec("mlp", input_shape=(1, 4, 4), num_classes=3)
    path = save_checkpoint(
        tmp_path / "ck", build_model(spec), spec, preprocess=Preprocess((1, 4, 4), (0.0,), (1.0,))
    )
    data = json.loads((path / "spec.json").read_text())
    data["layers"][-1]["bogus"] = 1
    (path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {path}: bad spec\.json: layer \d+ \(linear\): unknown"
    ):
        load_checkpoint(path)


def test_a_metadata_json_with_an_integer_too_long_to_read_is_a_checkpoint_error(tmp_path) -> None:
    spec = model_spec("mlp", hidden=8)
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=PRE)
    (path / "metadata.json").write_text('{"metrics": {"n": ' + "9" * 5000 + "}}")
    with pytest.raises(CheckpointError, match="metadata.json is not a metadata file: Exceeds the limit"):
        load_checkpoint(path)
