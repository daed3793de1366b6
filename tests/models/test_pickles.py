"""One pickle rule for every loader: the names and contents refused, and the same refusal from the
checkpoint loader and the inference loader."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from deepspark.errors import CheckpointError
from deepspark.inference import load_model
from deepspark.models import Preprocess, build_model, load_checkpoint, model_spec
from deepspark.models.pickles import pickle_reason

PRE = Preprocess(input_shape=(1, 28, 28), mean=(0.0,), std=(1.0,))


def _module() -> torch.nn.Module:
    return build_model(model_spec("mlp", hidden=8), seed=0).eval()


def _torch_save(path: Path) -> None:
    torch.save(_module().state_dict(), path)


def _data_pkl_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize(
    ("name", "write", "why"),
    [
        ("model.pkl", lambda p: p.write_bytes(b"not even a pickle"), "'.pkl' files are pickles"),
        ("pytorch_model.bin", lambda p: p.write_bytes(b"anything"), "'.bin' files are pickles"),
        ("last.ckpt", lambda p: p.write_bytes(b"anything"), "'.ckpt' files are pickles"),
        ("model.pt", _torch_save, "it is a torch.save archive"),
        ("model.pth", _torch_save, "it is a torch.save archive"),
        ("weights.zip", _data_pkl_zip, "it is a torch.save archive"),
        ("innocent.safetensors", _torch_save, "it is a torch.save archive"),
        ("model.pth", lambda p: p.write_bytes(pickle.dumps([1, 2])), "it is a pickle"),
        ("legacy.pt", lambda p: torch.save({}, p, _use_new_zipfile_serialization=False), "it is a pickle"),
    ],
)
def test_every_loader_refuses_the_same_files_the_same_way(
    tmp_path: Path, name: str, write: object, why: str
) -> None:
    path = tmp_path / name
    write(path)  # type: ignore[operator]
    assert why in (pickle_reason(path) or "")
    with pytest.raises(CheckpointError) as by_checkpoint:
        load_checkpoint(path)
    with pytest.raises(CheckpointError) as by_inference:
        load_model(path, preprocess=PRE)
    assert str(by_checkpoint.value) == str(by_inference.value)
    assert str(by_checkpoint.value).startswith(f"refusing to load {path}: ")
    assert why in str(by_checkpoint.value)
    assert "unpickling runs arbitrary code" in str(by_checkpoint.value)


def test_torchscript_pt_is_not_a_pickle_and_its_content_decides(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(_module(), torch.zeros(2, 1, 28, 28)), buffer)
    for name in ("model.pt", "model.pth"):
        (tmp_path / name).write_bytes(buffer.getvalue())
        assert pickle_reason(tmp_path / name) is None
        with pytest.raises(CheckpointError, match="is not a deepspark checkpoint"):
            load_checkpoint(tmp_path / name)
        assert load_model(tmp_path / name, preprocess=PRE, threads=1).format.value == "torchscript"
    assert pickle_reason(tmp_path / "missing.pt") is None
