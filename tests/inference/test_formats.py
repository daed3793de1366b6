"""Model formats, pickle refusal, top-k, decoding and URL fetching: no Spark needed."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _inference_support import CLASS_NAMES, Model, Server, png_bytes, reference_probabilities

from deepspark.errors import CheckpointError, ConfigError
from deepspark.inference import ModelFormat, UrlPolicy, export_model, load_model
from deepspark.inference.decode import InputKind, RowError, decode_column, decode_image, fetch_url
from deepspark.inference.formats import detect_format
from deepspark.inference.topk import softmax, top_k
from deepspark.models import Preprocess, build_model, load_spec, save_checkpoint

PREPROCESS = Preprocess(input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))


# ---------------------------------------------------------------------------------------------- top-k
def test_top_k_is_sorted_and_breaks_ties_by_class_index() -> None:
    p = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.15, 0.05]], dtype=np.float32)
    idx, values = top_k(p, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 2, 1]]
    np.testing.assert_allclose(values, [[0.4, 0.4, 0.1], [0.7, 0.15, 0.1]])
    assert top_k(p, 10)[0].shape == (2, 4)


def test_softmax_is_stable_for_large_logits() -> None:
    out = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0]], atol=1e-7)
    assert out.dtype == np.float32


# -------------------------------------------------------------------------------------------- formats
@pytest.fixture(scope="module")
def exported(small_model: Model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {
        "checkpoint": small_model.path,
        "torchscript": export_model(small_model.path, folder / "model.pt"),
        "torch.export": export_model(small_model.path, folder / "model.pt2"),
        "onnx": export_model(small_model.path, folder / "model.onnx"),
    }


def test_an_export_into_the_checkpoints_own_folder_keeps_its_metadata(
    small_model: Model, tmp_path: Path
) -> None:
    """Its metadata.json, which agrees with the export, was replaced by the two entries an export writes:
    the checkpoint lost its metrics, config and versions."""
    checkpoint = Path(shutil.copytree(small_model.path, tmp_path / "ck"))
    before = (checkpoint / "metadata.json").read_text()
    export_model(checkpoint, checkpoint / "model.onnx")
    assert (checkpoint / "metadata.json").read_text() == before
    assert load_model(checkpoint / "model.onnx").class_names == tuple(CLASS_NAMES)


@pytest.mark.parametrize("name", ["model.onnx", "model.pt", "model.pt2"])
def test_an_export_the_disk_cuts_short_keeps_the_file_it_was_to_replace(
    small_model: Model, tmp_path: Path, name: str
) -> None:
    """A full disk midway through overwrite=True left a cut model file in place of the working one."""
    import resource
    import signal

    target = export_model(small_model.path, tmp_path / name)
    before = sorted(os.listdir(tmp_path)), target.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # files may grow to 1000 bytes only
    try:
        with pytest.raises(OSError):
            export_model(small_model.path, target, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (sorted(os.listdir(tmp_path)), target.read_bytes()) == before
    assert load_model(target).class_names == tuple(CLASS_NAMES)


def _other_model(small_model: Model, folder: Path) -> Path:
    """``small_model``'s network saved with other class names: another model's metadata."""
    path = folder / "other"
    spec = load_spec(small_model.path / "spec.json")
    save_checkpoint(path, small_model.module, spec, preprocess=PREPROCESS, class_names=list("abcdefghij"))
    return path


def test_an_export_never_pairs_another_model_with_its_metadata(small_model: Model, tmp_path: Path) -> None:
    """overwrite=True rewrote the folder's metadata.json, which also described the folder's other model
    files (and a checkpoint's own): they then loaded with this model's class names, without a word."""
    folder = tmp_path / "exports"
    onnx = export_model(small_model.path, folder / "model.onnx")
    before = (folder / "metadata.json").read_bytes()
    with pytest.raises(ConfigError, match=r"describes another model \(it also describes model\.onnx\)"):
        export_model(_other_model(small_model, tmp_path), folder / "model.pt", overwrite=True)
    assert (folder / "metadata.json").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["metadata.json", "model.onnx"]
    assert load_model(onnx).class_names == tuple(CLASS_NAMES)
    checkpoint = Path(shutil.copytree(small_model.path, tmp_path / "ck"))
    with pytest.raises(ConfigError, match=r"it also describes model\.safetensors"):
        export_model(_other_model(small_model, tmp_path / "o"), checkpoint / "model.onnx", overwrite=True)
    assert load_model(checkpoint).class_names == tuple(CLASS_NAMES)


def test_an_export_that_fails_midway_leaves_no_model_with_another_models_metadata(
    small_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model was replaced before metadata.json: a failure or kill between the two writes paired the
    new model with the old model's class names. Now the old metadata is gone first (a load is refused)."""
    import deepspark.inference.model as model_module

    target = export_model(small_model.path, tmp_path / "model.onnx")
    other = _other_model(small_model, tmp_path / "o")
    writes: list[str] = []

    def fail_the_metadata(path: Path, data: bytes) -> None:
        writes.append(Path(path).name)
        if Path(path).name == "metadata.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    real = model_module.write_file_atomic
    monkeypatch.setattr(model_module, "write_file_atomic", fail_the_metadata)
    with pytest.raises(OSError):
        export_model(other, target, overwrite=True)
    assert writes == ["model.onnx", "metadata.json"]
    with pytest.raises(ConfigError, match="no preprocessing metadata"):
        load_model(target)
    monkeypatch.undo()
    export_model(other, target, overwrite=True)
    assert load_model(target).class_names == tuple("abcdefghij")


def test_each_format_is_detected_loads_and_agrees_with_the_model(
    small_model: Model, exported: dict[str, Path]
) -> None:
    expected = reference_probabilities(small_model, small_model.images)
    for name, path in exported.items():
        assert detect_format(path) is ModelFormat(name)
        model = load_model(path, threads=1)
        assert model.format is ModelFormat(name)
        assert model.backend == ("onnx" if name in ("onnx", "checkpoint") else "torch")
        assert model.class_names == tuple(CLASS_NAMES)
        assert model.preprocess == PREPROCESS
        np.testing.assert_allclose(model.predict(small_model.images), expected, atol=1e-5, err_msg=name)


def test_onnx_backend_converts_a_torch_model(small_model: Model, exported: dict[str, Path]) -> None:
    expected = reference_probabilities(small_model, small_model.images)
    for name in ("checkpoint", "torchscript", "torch.export"):
        model = load_model(exported[name], backend="onnx", threads=1)
        np.testing.assert_allclose(model.predict(small_model.images), expected, atol=1e-5, err_msg=name)


def test_torch_backend_cannot_run_onnx(exported: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="backend"):
        load_model(exported["onnx"], backend="torch")
    with pytest.raises(ConfigError, match="backend"):
        load_model(exported["onnx"], backend="tensorflow")


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda m, p: torch.save(m, p), id="torch.save-module"),
        pytest.param(lambda m, p: torch.save(m.state_dict(), p), id="torch.save-state-dict"),
        pytest.param(
            lambda m, p: torch.save(m, p, _use_new_zipfile_serialization=False), id="legacy-torch.save"
        ),
        pytest.param(lambda m, p: p.write_bytes(pickle.dumps({"w": 1})), id="pickle.dumps"),
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".model"])
def test_pickles_are_refused(small_model: Model, tmp_path: Path, write: object, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    write(small_model.module, path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=r"refusing to load .*(pickle|torch\.save)"):
        load_model(path, preprocess=PREPROCESS)


def test_pickle_suffixes_are_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(b"anything")
    with pytest.raises(CheckpointError, match="refusing"):
        load_model(path, preprocess=PREPROCESS)


def _rewrite_pt2(source: Path, target: Path, edit: object) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))  # type: ignore[operator]
            if data is not None:
                zout.writestr(info, data)
    return target


def test_pt2_entries_that_would_be_unpickled_are_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    def pickled_weight(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    def unsafe_sample_inputs(name: str, data: bytes) -> bytes:
        if "/sample_inputs/" in name:
            buffer = io.BytesIO()
            torch.save(((torch.zeros(1),), {"f": shutil.copy}), buffer)  # needs weights_only=False
            return buffer.getvalue()
        return data

    for edit, why in ((pickled_weight, "pickled"), (unsafe_sample_inputs, "sample inputs")):
        path = _rewrite_pt2(exported["torch.export"], tmp_path / f"{edit.__name__}.pt2", edit)
        with pytest.raises(CheckpointError, match=why):
            load_model(path)


@pytest.mark.parametrize(
    ("entry", "data", "why"),
    [
        (
            "_weights_config.json",
            b"{not json",
            "model_weights_config.json in the torch.export archive is not",
        ),
        ("_weights_config.json", b"[1, 2]", "is not a JSON config of entries"),
        ("_constants_config.json", b'{"config": {"c": 1}}', "is not a JSON config of entries"),
        ("archive_version", b"\xff\xfe", "not a readable torch.export archive"),
    ],
)
def test_a_malformed_pt2_archive_is_a_checkpoint_error_not_a_traceback(
    exported: dict[str, Path], tmp_path: Path, entry: str, data: bytes, why: str
) -> None:
    def edit(name: str, old: bytes) -> bytes:
        return data if name.endswith(entry) else old

    path = _rewrite_pt2(exported["torch.export"], tmp_path / "bad.pt2", edit)
    with pytest.raises(CheckpointError, match=why):
        load_model(path)


def _damaged_zip(path: Path, entries: dict[str, bytes], damage: str) -> Path:
    """A zip of ``entries`` whose entry ``damage`` has its first compressed bytes flipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    data = bytearray(buffer.getvalue())
    start = data.find(damage.encode()) + len(damage)  # the local header's name, then the entry's bytes
    data[start : start + 6] = bytes(b ^ 0xFF for b in data[start : start + 6])
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_torch_archive_is_a_checkpoint_error_not_a_traceback(tmp_path: Path) -> None:
    # An entry whose deflated bytes are damaged: zlib.error while telling the format.
    torn = _damaged_zip(
        tmp_path / "a.pt", {"m/archive_format": b"pt2" * 100, "m/models/x": b"{}"}, "m/archive_format"
    )
    with pytest.raises(CheckpointError, match="starts like a zip archive but cannot be read"):
        load_model(torn, preprocess=PREPROCESS)
    # A TorchScript layout torch.jit.load cannot read (no version record): torch's RuntimeError.
    script = tmp_path / "b.pt"
    with zipfile.ZipFile(script, "w") as zf:
        zf.writestr("m/code/m.py", b"x")
        zf.writestr("m/data.pkl", b"}.")
    for backend in ("torch", "auto"):
        with pytest.raises(CheckpointError, match=r"torch cannot load .*b\.pt as torchscript"):
            load_model(script, preprocess=PREPROCESS, backend=backend)


def test_a_model_without_metadata_needs_preprocessing(exported: dict[str, Path], tmp_path: Path) -> None:
    bare = shutil.copy(exported["onnx"], tmp_path / "bare.onnx")
    with pytest.raises(ConfigError, match="preprocess"):
        load_model(bare)
    model = load_model(bare, preprocess=PREPROCESS, labels=[str(i) for i in range(10)])
    assert model.num_classes == 10
    assert model.class_names[0] == "0"


def test_preprocessing_that_contradicts_the_models_own_is_refused(exported: dict[str, Path]) -> None:
    for path in exported.values():
        assert load_model(path, preprocess=PREPROCESS).preprocess == PREPROCESS  # the same: fine
        for other in (
            Preprocess(input_shape=(1, 28, 28), mean=(0.0,), std=(1.0,)),  # the CLI's old defaults
            Preprocess(input_shape=(1, 32, 32), mean=(0.1307,), std=(0.3081,)),
        ):
            with pytest.raises(ConfigError, match="carries its own preprocessing"):
                load_model(path, preprocess=other)


def test_an_input_shape_the_model_cannot_take_is_a_config_error(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    wrong = Preprocess(input_shape=(1, 20, 20), mean=(0.1307,), std=(0.3081,))
    for name in ("torchscript", "torch.export", "onnx"):
        bare = tmp_path / name
        bare.mkdir()
        model = shutil.copy(exported[name], bare / exported[name].name)  # without its metadata.json
        with pytest.raises(ConfigError, match=r"cannot run on inputs of shape \[N, 1, 20, 20\]") as caught:
            load_model(model, preprocess=wrong)
        assert "\n" not in str(caught.value), name


def test_label_file_overrides_names_and_must_match_the_classes(small_model: Model, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"n{i}" for i in range(10)) + "\n\n")
    assert load_model(small_model.path, labels=labels).class_names[3] == "n3"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match="10 classes but 3 class names"):
        load_model(small_model.path, labels=labels)


def test_a_label_file_with_a_byte_order_mark_names_the_first_class_without_it(
    small_model: Model, tmp_path: Path
) -> None:
    """Notepad's UTF-8 (a BOM, CRLF): the first class was named '\\ufeffn0', printed as 'n0' but unequal to it."""
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(f"n{i}" for i in range(10)).encode())
    assert load_model(small_model.path, labels=labels).class_names == tuple(f"n{i}" for i in range(10))


def test_a_blank_line_inside_a_label_file_is_refused(small_model: Model, tmp_path: Path) -> None:
    """It named a class "" (and the count still matched when a name was missing elsewhere)."""
    labels = tmp_path / "labels.txt"
    labels.write_text("n0\n\n" + "\n".join(f"n{i}" for i in range(2, 10)) + "\n\n")
    with pytest.raises(ConfigError, match=r"labels: line 2 of .*labels.txt is blank"):
        load_model(small_model.path, labels=labels)


def test_an_onnx_model_with_external_data_is_refused_not_read_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime, given the model's bytes, read the external file from each process's working folder:
    the driver's check passed when run from the model's folder, and the executors failed or read another."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 10), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weights, numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=64)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"tensor 'W' is stored outside the model file \('m.onnx.data'\)"
    ):
        load_model(path, preprocess=Preprocess(input_shape=(1, 2, 2), mean=(0.0,), std=(1.0,)))
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_model(
            tmp_path / "junk.onnx", preprocess=Preprocess(input_shape=(1, 2, 2), mean=(0.0,), std=(1.0,))
        )


@pytest.mark.parametrize("side", [10**6, 10**20])
def test_an_input_shape_too_large_to_export_is_a_config_error(tmp_path: Path, side: int) -> None:
    """Converting a checkpoint for the ONNX backend allocated two example inputs outside the export's
    error handling: a checkpoint made for 10**6 x 10**6 images was torch's RuntimeError (past 64-bit
    sizes its TypeError), a traceback."""
    spec = load_spec(
        {
            "input_shape": [1, side, side],
            "layers": [
                {"type": "avgpool", "kernel_size": side},
                {"type": "flatten"},
                {"type": "linear", "out_features": 2},
            ],
        }
    )
    preprocess = Preprocess(input_shape=(1, side, side), mean=(0.0,), std=(1.0,))
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec, preprocess=preprocess)
    with pytest.raises(
        ConfigError, match=r"cannot export it to ONNX: an example batch .* does not fit in memory"
    ):
        load_model(path, backend="onnx")


def test_missing_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model"):
        load_model(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- decode
def test_decode_image_resizes_and_converts() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 40), (255, 0, 0)).save(buffer, format="JPEG")
    grey = decode_image(buffer.getvalue(), (1, 28, 28))
    assert grey.shape == (1, 28, 28) and grey.dtype == np.uint8
    rgb = decode_image(buffer.getvalue(), (3, 14, 14))
    assert rgb.shape == (3, 14, 14) and rgb[0].mean() > 200 and rgb[1].mean() < 50


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped(channels: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    wide = eight.astype(np.uint16) * 257
    for fmt in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(wide).save(buffer, format=fmt)  # mode I;16
        decoded = decode_image(buffer.getvalue(), (channels, 28, 28))
        assert decoded.shape == (channels, 28, 28)
        np.testing.assert_array_equal(decoded, np.broadcast_to(eight, (channels, 28, 28)))


def test_every_16_bit_value_becomes_its_nearest_8_bit_value() -> None:
    """v / 257 rounded, for each of the 65,536 values, in little- and big-endian files."""
    from PIL import Image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.rint(values / 257.0).astype(np.uint8)
    for array, fmt in ((values, "PNG"), (values, "TIFF"), (values.astype(">u2"), "TIFF")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        np.testing.assert_array_equal(decode_image(buffer.getvalue(), (1, 256, 256))[0], expected)


def test_a_16_bit_image_is_scaled_in_a_few_bytes_a_pixel() -> None:
    """Scaled through float64 it took 24 bytes a pixel at the peak (97 MB for 2000 x 2000)."""
    import tracemalloc

    from PIL import Image

    wide = (np.arange(2000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 2000)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    tracemalloc.start()
    try:
        decode_image(buffer.getvalue(), (1, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * wide.size, peak / wide.size


@pytest.mark.parametrize(("array", "kind"), [(np.float32, "floats"), (np.int32, "integers")])
def test_32_bit_images_are_row_errors_not_clipped_to_black(array: type, kind: str) -> None:
    """Pillow's convert() clips 32-bit pixels at 255: a float TIFF of values in [0, 1] decoded black."""
    from PIL import Image

    pixels = np.random.default_rng(0).random((28, 28)).astype(array) * (1 if array is np.float32 else 40000)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF")  # mode F or I
    for channels in (1, 3):
        with pytest.raises(
            RowError, match=f"the image's pixels are 32-bit {kind}, which have no fixed range"
        ):
            decode_image(buffer.getvalue(), (channels, 28, 28))


def test_corrupt_and_truncated_images_become_row_errors() -> None:
    good = png_bytes(np.full((28, 28), 7, dtype=np.uint8))
    column = pa.array([good, good[: len(good) // 2], b"garbage", None], pa.binary())
    decoded = decode_column(InputKind.IMAGE, column, PREPROCESS)
    assert decoded.ok.tolist() == [0]
    assert decoded.errors[0] is None
    assert all("cannot decode image" in str(e) for e in decoded.errors[1:3])
    assert decoded.errors[3] == "input is null"
    expected = PREPROCESS.apply(np.full((1, 28, 28), 7, np.uint8)).numpy()[0]
    np.testing.assert_allclose(decoded.inputs[0], expected)


def test_an_eps_value_is_an_error_row_and_never_runs_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow decodes EPS by running the gs program on the value's PostScript: input must never run."""
    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 0 moveto 28 28 lineto stroke\nshowpage\n"
    decoded = decode_column(InputKind.IMAGE, pa.array([eps], pa.binary()), PREPROCESS)
    assert decoded.ok.tolist() == [] and "cannot decode image" in str(decoded.errors[0])
    assert not marker.exists()


def test_a_task_puts_its_workers_model_and_imports_out_of_the_collectors_walks(small_model: Model) -> None:
    """pyspark's daemon runs a full gc.collect() after each task of a reused worker: 75-90 ms with torch
    imported, every task. A task freezes what the worker holds (the model, the modules) first."""
    import gc
    from types import SimpleNamespace

    from deepspark._compat import to_arrow_schema
    from deepspark.inference._predict import _output_schema
    from deepspark.inference._task import TaskPlan, run_task
    from deepspark.inference.decode import UrlPolicy
    from deepspark.inference.formats import read_model

    artifact = read_model(small_model.path)
    plan = TaskPlan(
        model_id=artifact.model_id, backend="torch", device="cpu", threads=1, batch_size=4, top_k=3,
        kind=InputKind.IMAGE, input_column="_0", passthrough=(), class_names=CLASS_NAMES,
        preprocess=artifact.preprocess, url_policy=UrlPolicy(), decode_threads=1,
    )  # fmt: skip
    pyspark_schema = _output_schema({}, ())
    schema = to_arrow_schema(pyspark_schema, timezone="UTC")
    batch = pa.record_batch([pa.array([png_bytes(small_model.images[0])], pa.binary())], names=["_0"])
    added: list[dict[str, object]] = []
    gc.unfreeze()
    try:
        out = list(
            run_task(
                iter([batch]),
                plan,
                SimpleNamespace(value=artifact),
                SimpleNamespace(add=added.append),
                schema,
            )
        )  # type: ignore[arg-type]
        assert gc.get_freeze_count() > 0
        assert sum(b.num_rows for b in out) == 1 and added[0]["rows"] == 1
    finally:
        gc.unfreeze()


def test_read_file_reads_a_file_whole_and_a_folder_or_a_missing_file_is_a_row_error(tmp_path: Path) -> None:
    from deepspark.inference.decode import read_file

    data = os.urandom(200_000)  # more than one 64 KiB read
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert read_file(f"file:{tmp_path}/big.bin") == data and read_file(str(tmp_path / "empty.bin")) == b""
    assert read_file(str(tmp_path / "big.bin"), max_bytes=len(data)) == data
    with pytest.raises(RowError, match=f"^{tmp_path}/big.bin holds 200000 bytes, more than the 199999 that "):
        read_file(str(tmp_path / "big.bin"), max_bytes=len(data) - 1)
    for name, why in (("", "Is a directory"), ("gone.png", "No such file or directory")):
        with pytest.raises(RowError, match=f"^cannot read {tmp_path}/{name}: {why}$"):
            read_file(f"file:{tmp_path}/{name}")


def test_a_model_a_worker_lets_go_is_collected_though_its_tasks_froze_it(
    small_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks freeze their worker's objects (the cached model among them): a model the cache lets go
    would keep whatever of it lies in a reference cycle for the worker's life."""
    import gc
    import weakref
    from dataclasses import replace
    from types import SimpleNamespace

    from deepspark.inference import _task, runners
    from deepspark.inference.decode import UrlPolicy
    from deepspark.spark import freeze_worker_objects

    class Cyclic:
        def __init__(self) -> None:
            self.me = self

    made: list[weakref.ref[Cyclic]] = []

    def build(artifact: object, **_: object) -> Cyclic:
        runner = Cyclic()
        made.append(weakref.ref(runner))
        return runner

    monkeypatch.setattr(runners, "build_runner", build)
    plan = _task.TaskPlan(
        model_id="m0", backend="torch", device="cpu", threads=1, batch_size=4, top_k=3, kind=InputKind.IMAGE,
        input_column="_0", passthrough=(), class_names=CLASS_NAMES, preprocess=PREPROCESS,
        url_policy=UrlPolicy(), decode_threads=1,
    )  # fmt: skip
    gc.collect()
    try:
        for i in range(3):  # the cache holds two: the third lets the first go
            _task._cached_runner(
                replace(plan, model_id=f"deepspark-test-{i}"), SimpleNamespace(value=None), "cpu"
            )  # type: ignore[arg-type]
            freeze_worker_objects()  # as each task does
        assert made[0]() is None and made[1]() is not None and made[2]() is not None
    finally:
        gc.unfreeze()


def test_common_formats_are_tried_first_and_a_format_registered_later_is_taken() -> None:
    """Pillow tries the formats it is given in turn: in its full list PNG came after 20 others (a fifth
    of a PNG's decoding time went to asking them). EPS is never among them."""
    from PIL import Image

    from deepspark.data.images import _formats

    assert _formats()[:4] == ["PNG", "JPEG", "BMP", "GIF"] and "EPS" not in _formats()
    Image.register_open("DEEPSPARKTEST", Image.Image, lambda prefix: False)
    try:
        assert _formats()[-1] == "DEEPSPARKTEST"
    finally:
        Image.ID.remove("DEEPSPARKTEST")
        del Image.OPEN["DEEPSPARKTEST"]
    assert "DEEPSPARKTEST" not in _formats()


def _grey_png_of_zeros(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` black pixels, written row by row (a few hundred KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, as it opens the file
def test_an_image_over_pillows_pixel_limit_is_an_error_row_not_decoded() -> None:
    """Pillow only warns between its limit and twice it, and decodes: gigabytes per row."""
    from PIL import Image

    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 1  # just over the limit, well under twice it
    bomb = _grey_png_of_zeros(side, side)
    decoded = decode_column(InputKind.IMAGE, pa.array([bomb], pa.binary()), PREPROCESS)
    assert decoded.ok.tolist() == []
    assert f"is {side}x{side} pixels, over Pillow's decompression-bomb limit" in str(decoded.errors[0])


def test_tensor_columns_check_size_shape_and_values() -> None:
    flat = [list(range(784)), list(range(700)), None, [float("nan")] * 784]
    decoded = decode_column(InputKind.TENSOR, pa.array(flat, pa.list_(pa.float64())).slice(0), PREPROCESS)
    assert decoded.ok.tolist() == [0]
    assert "700 values, expected 784" in str(decoded.errors[1])
    assert decoded.errors[2] == "input is null"
    assert "NaN" in str(decoded.errors[3])
    nested = [np.zeros((28, 28)).tolist(), np.zeros((28, 27)).tolist()]
    decoded = decode_column(InputKind.TENSOR, pa.array(nested), PREPROCESS)
    assert decoded.ok.tolist() == [0]
    assert "wrong tensor shape" in str(decoded.errors[1])


def test_tensor_values_beyond_float32_are_error_rows_without_a_warning() -> None:
    """numpy's "overflow encountered in cast" reached the executors' stderr for each such batch."""
    import warnings

    big = [[1e300] * 784, list(range(784))]
    nested = [np.full((28, 28), -1e300).tolist(), np.zeros((28, 28)).tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for column in (pa.array(big, pa.list_(pa.float64())), pa.array(nested)):
            decoded = decode_column(InputKind.TENSOR, column, PREPROCESS)
            assert decoded.ok.tolist() == [1]
            assert "NaN or infinite" in str(decoded.errors[0])


# ----------------------------------------------------------------------------------------------- URLs
def test_fetch_url_limits(http_server: Server, closed_port: int) -> None:
    (http_server.root / "ok.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    policy = UrlPolicy(timeout=5, retries=2, backoff=0.01)
    assert fetch_url(f"{http_server.url}/ok.png", policy).startswith(b"\x89PNG")

    with pytest.raises(RowError, match="HTTP 404"):
        fetch_url(f"{http_server.url}/missing.png", policy)
    assert http_server.hits["/missing.png"] == 1  # a 4xx is not retried

    with pytest.raises(RowError, match="HTTP 500"):
        fetch_url(f"{http_server.url}/fail500", policy)
    assert http_server.hits["/fail500"] == 3  # 1 + 2 retries

    with pytest.raises(RowError, match="cannot fetch"):
        fetch_url(f"http://127.0.0.1:{closed_port}/x.png", policy)
    with pytest.raises(RowError, match="too large"):
        fetch_url(f"{http_server.url}/ok.png", UrlPolicy(max_bytes=10))
    with pytest.raises(RowError, match="non-http"):
        fetch_url(f"{http_server.url}/redirect-ftp", policy)
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x.png", "127.0.0.1/x.png"):
        with pytest.raises(RowError, match="unsupported URL scheme"):
            fetch_url(url, policy)


def test_url_policy_is_validated() -> None:
    for bad in ({"timeout": 0}, {"max_bytes": -1}, {"retries": -1}, {"backoff": -0.1}):
        with pytest.raises(ConfigError):
            UrlPolicy(**bad)  # type: ignore[arg-type]
