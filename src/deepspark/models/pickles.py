"""Which files are pickles: one rule for every loader (checkpoints and inference model files).

Unpickling runs arbitrary code from whoever wrote the file, so deepspark never does it. A file is refused
when

* its suffix is one that only pickles use: ``.pkl``, ``.pickle``, ``.joblib``, ``.bin`` (``pytorch_model.bin``)
  and ``.ckpt`` (Lightning), whatever the content;
* its content is a pickle: it starts with the protocol-2+ opcode ``0x80`` (``pickle.dump``, the legacy
  ``torch.save`` format);
* it is a zip whose program is a pickled object: a ``torch.save`` archive (``data.pkl`` without
  TorchScript's ``code/`` folder) or a ``torch.export`` archive in the pre-2.7 layout.

``.pt``/``.pth`` are decided by content, since ``torch.jit.save`` writes them too: a TorchScript archive's
``data.pkl`` is read by TorchScript's own unpickler, which builds tensors and TorchScript types only.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from deepspark.errors import CheckpointError

__all__ = ["PICKLE_SUFFIXES", "archive_names", "pickle_reason", "refusal", "refuse_pickle"]

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".bin", ".ckpt"})


def archive_names(zf: zipfile.ZipFile) -> list[str]:
    """Entry names relative to the archive root (torch writes every entry under one top folder)."""
    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) == 1 and all("/" in n for n in names):
        return [n.split("/", 1)[1] for n in names]
    return names


def pickle_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is (or must be taken for) a pickle, or ``None`` when it is not one.

    A zip that cannot be read is not called a pickle here: the caller's own reading reports it.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return f"'{suffix}' files are pickles"
    if not p.is_file():
        return None
    with p.open("rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":
        return "it is a pickle (torch.save with the legacy format, or pickle.dump)"
    if head[:2] != b"PK":
        return None
    try:
        with zipfile.ZipFile(p) as zf:
            names = archive_names(zf)
    except zipfile.BadZipFile:
        return None
    if "data.pkl" in names and not any(n.startswith("code/") for n in names):
        return "it is a torch.save archive (a pickled object in data.pkl)"
    if "version" in names and "serialized_exported_program.json" in names and "archive_format" not in names:
        return "it is a torch.export archive in the pre-2.7 format, whose state is pickled"
    return None


def refusal(path: str | os.PathLike[str], why: str) -> CheckpointError:
    """The one error for a file deepspark will not load because loading it would unpickle."""
    return CheckpointError(
        f"refusing to load {path}: {why}; unpickling runs arbitrary code from whoever wrote the file. "
        "Save the model as a deepspark checkpoint (deepspark.models.save_checkpoint, safetensors), or "
        "export it with torch.jit.save (TorchScript), torch.export.save (.pt2) or to ONNX "
        "(deepspark.inference.export_model does all three)."
    )


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` if ``path`` is a pickle by :func:`pickle_reason`'s rule."""
    why = pickle_reason(path)
    if why is not None:
        raise refusal(path, why)
