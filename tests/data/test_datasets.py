"""Registry, verified fetching (directory → cache → mirrors), loading and describing datasets.

Fetch tests never touch the network or the user's cache: mirrors are an ``http.server`` on
127.0.0.1, the cache root is a temporary directory, and the registered "mnist" entry is swapped
for one whose digests are those of small synthetic files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepspark.data import DATASETS, DatasetInfo, ImageDataset, fetch, info, load_dataset, verify, write_idx
from deepspark.data.files import MNIST_FILES
from deepspark.errors import ConfigError, DatasetError


def _make_split(n: int, *, classes: int = 3, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    return images, labels


def _write_layout(directory: Path, *, gz: bool = False, dotted: bool = False) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [*_make_split(12, seed=1), *_make_split(6, seed=2)]
    paths = []
    for raw_name, array in zip(MNIST_FILES, arrays, strict=True):
        name = raw_name.replace("-idx", ".idx") if dotted else raw_name
        paths.append(write_idx(directory / (name + (".gz" if gz else "")), array))
    return paths


def _raw_digest(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPSPARK_DATA", raising=False)
    monkeypatch.delenv("DEEPSPARK_MNIST_MIRRORS", raising=False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A good copy of the synthetic dataset (raw files)."""
    return _write_layout(tmp_path / "source")[0].parent


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, source: Path) -> DatasetInfo:
    """Register the synthetic files as "mnist": their digests, no default mirrors, no npm."""
    digests = {name: _raw_digest(source / name) for name in MNIST_FILES}
    entry = dataclasses.replace(
        DATASETS["mnist"], files=digests, mirrors=(), npm_package=None, mean=None, std=None
    )
    monkeypatch.setitem(DATASETS, "mnist", entry)
    return entry


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; under /partial/ it promises the whole file but sends half and hangs up."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/partial/"):
            body = (Path(self.directory) / "good" / self.path.rsplit("/", 1)[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def mirror(tmp_path: Path, source: Path) -> Iterator[str]:
    """An HTTP mirror on 127.0.0.1: /good/ serves correct .gz files, /bad/ corrupted ones."""
    root = tmp_path / "www"
    for sub in ("good", "bad"):
        (root / sub).mkdir(parents=True)
    for name in MNIST_FILES:
        raw = (source / name).read_bytes()
        (root / "good" / f"{name}.gz").write_bytes(gzip.compress(raw))
        corrupted = raw[:-1] + bytes([raw[-1] ^ 0xFF])
        (root / "bad" / f"{name}.gz").write_bytes(gzip.compress(corrupted))

    def handler(*args: object, **kwargs: object) -> _Handler:
        return _Handler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "mnist"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.part")) if directory.is_dir() else []


# ------------------------------------------------------------------------------------------- fetch
def test_fetch_from_mirror_caches_raw_verified_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, source: Path, mirror: str
) -> None:
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/good/")
    directory = fetch("mnist")
    assert directory == _cache_dir(tmp_path)
    for name in MNIST_FILES:
        assert (directory / name).read_bytes() == (source / name).read_bytes()
    assert _leftovers(directory) == []
    data = load_dataset("mnist")
    assert data.train_images.shape == (12, 8, 8) and data.test_labels.shape == (6,)
    assert data.num_classes == 10 and data.class_names[:3] == ("0", "1", "2")


def test_bad_mirror_is_skipped_for_the_next_one(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny: DatasetInfo,
    mirror: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/bad/,{mirror}/good/")
    with caplog.at_level(logging.WARNING, logger="deepspark.data"):
        directory = fetch("mnist")
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")
    assert _leftovers(directory) == []
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "train-images-idx3-ubyte" in warned and "sha256 mismatch" in warned
    assert tiny.files["train-images-idx3-ubyte"] in warned


def test_user_dir_with_a_corrupt_copy_falls_back_to_the_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny: DatasetInfo,
    source: Path,
    mirror: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/good/")
    cache = fetch("mnist")
    user = tmp_path / "user"
    _write_layout(user, gz=True)
    bad = user / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[:-1] + b"\x00" if raw[-1] else raw[:-1] + b"\x01"))
    with caplog.at_level(logging.WARNING, logger="deepspark.data"):
        assert fetch("mnist", data_dir=user, mirrors=False) == cache
    assert any(str(bad) in r.getMessage() and "expected" in r.getMessage() for r in caplog.records)
    # verify looks in the user's directory first and reports the bad copy there.
    report = verify("mnist", data_dir=user)
    assert report["t10k-images-idx3-ubyte"].startswith("sha256 mismatch: expected ")
    assert report["train-images-idx3-ubyte"] == "ok"


def test_good_user_dir_is_used_in_place_and_only_good_files_are_copied(
    tmp_path: Path, tiny: DatasetInfo, source: Path
) -> None:
    user = tmp_path / "user"
    _write_layout(user, gz=True)
    assert fetch("mnist", data_dir=user, mirrors=False) == user
    assert not _cache_dir(tmp_path).exists()
    # One file missing from the user's directory and no other source: the good ones are cached,
    # and the error says what each source said and how to fix it.
    (user / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        fetch("mnist", data_dir=user, mirrors=False)
    message = str(err.value)
    assert "train-labels-idx1-ubyte missing" in message and "--data-dir" in message
    assert "mirrors: skipped" in message
    cached = sorted(p.name for p in _cache_dir(tmp_path).iterdir() if not p.name.startswith("."))
    assert cached == sorted(set(MNIST_FILES) - {"train-labels-idx1-ubyte"})


def test_a_cache_that_cannot_be_written_is_a_failed_source_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main

    # $DEEPSPARK_CACHE under a file: copying the user's good files into the cache raised
    # NotADirectoryError out of fetch (a traceback from `deepspark data fetch`).
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("DEEPSPARK_CACHE", str(blocker / "cache"))
    user = tmp_path / "user"
    _write_layout(user)
    (user / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError) as err:
        fetch("mnist", data_dir=user, mirrors=False)
    assert f"copying {user / 'train-images-idx3-ubyte'}: failed: " in str(err.value)
    assert main(["data", "fetch", "mnist", "--data-dir", str(user), "--no-mirrors", "-q"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("deepspark: error: could not obtain") and "Traceback" not in stderr


def test_failed_or_partial_download_leaves_no_file_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, mirror: str
) -> None:
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/partial/,{mirror}/bad/,{mirror}/missing/")
    with pytest.raises(DatasetError) as err:
        fetch("mnist")
    message = str(err.value)
    assert f"{mirror}/partial/train-images-idx3-ubyte.gz: failed" in message
    assert f"{mirror}/bad/train-images-idx3-ubyte.gz: sha256 mismatch" in message
    assert "404" in message
    cache = _cache_dir(tmp_path)
    assert not any((cache / name).exists() for name in MNIST_FILES)
    assert _leftovers(cache) == []


@pytest.fixture
def good_mirror(monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, mirror: str) -> str:
    """The synthetic "mnist" registered, and the local mirror's good files as its only mirror."""
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/good/")
    return mirror


def test_mirror_downloads_report_progress_in_bytes_and_print_nothing(
    tmp_path: Path, good_mirror: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror = good_mirror
    calls: dict[str, list[tuple[int, int | None]]] = {}
    fetch("mnist", progress=lambda url, done, total: calls.setdefault(url, []).append((done, total)))
    assert capsys.readouterr() == ("", "")  # library code never prints; the caller draws the bars
    www = tmp_path / "www" / "good"
    assert sorted(calls) == sorted(f"{mirror}/good/{name}.gz" for name in MNIST_FILES)
    for url, seen in calls.items():
        size = (www / url.rsplit("/", 1)[1]).stat().st_size
        assert seen[0] == (0, size) and seen[-1] == (size, size)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(ConfigError, match="progress: expected a callable"):
        fetch("mnist", progress="bars")  # type: ignore[arg-type]


def test_a_mirror_that_is_down_is_not_asked_for_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, mirror: str
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{down},{mirror}/missing/")
    with pytest.raises(DatasetError) as err:
        fetch("mnist")
    message = str(err.value)
    assert f"mirror {down}train-images-idx3-ubyte.gz: failed: cannot fetch" in message
    rest = ", ".join(MNIST_FILES[1:])
    assert f"mirror {down}: not asked for {rest} (down)" in message
    assert message.count(down) == 2
    # A 404 is one missing file, not a mirror that is down: the next mirror is asked for every file.
    for name in MNIST_FILES:
        assert f"mirror {mirror}/missing/{name}.gz: failed: HTTP 404" in message
    # And a mirror after a down one still serves everything.
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{down},{mirror}/good/")
    assert fetch("mnist") == _cache_dir(tmp_path)
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")


def test_cli_data_fetch_draws_byte_bars_only_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_mirror: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    assert main(["data", "fetch", "mnist"]) == 0
    out, err = capsys.readouterr()
    assert out == f"mnist: verified files in {_cache_dir(tmp_path)}\n"
    assert ".gz" not in err  # not a terminal (a CI log): no bars
    for name in MNIST_FILES:
        (_cache_dir(tmp_path) / name).unlink()
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's own switch: behave as on a terminal
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["data", "fetch", "mnist"]) == 0
    out, err = capsys.readouterr()
    assert out == f"mnist: verified files in {_cache_dir(tmp_path)}\n"
    for name in MNIST_FILES:
        assert f"{name}.gz" in err
    size = (tmp_path / "www" / "good" / "train-images-idx3-ubyte.gz").stat().st_size
    assert f"{size}/{size} bytes" in err  # the finished bar shows every byte of the download


def test_verified_marker_is_keyed_by_the_files_identity_not_only_size_and_mtime(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny: DatasetInfo,
    mirror: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deepspark.data import cache as verified

    caplog.set_level(logging.INFO, logger="deepspark.data.cache")
    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/good/")
    cache = fetch("mnist")
    path = cache / "train-labels-idx1-ubyte"
    # Files this fresh are hashed on every use (the next test says why); here, as if long still.
    monkeypatch.setattr(verified, "RACY_NS", 0)
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")
    caplog.clear()
    # An untouched file keeps its remembered result (that is what saves rehashing 50 MB on every load).
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")
    assert "computing the SHA-256" not in caplog.text
    # Other bytes of the same size with the old modification time put back (another dataset's file
    # copied over with cp -p, say): its change time differs, so it is hashed again and found out.
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert verify("mnist")["train-labels-idx1-ubyte"].startswith("sha256 mismatch")
    # So is a file replaced by another (a new inode) with the same size and times.
    fetch("mnist")
    good = path.stat()
    other = path.with_name("other")
    other.write_bytes(bytes(data))
    os.utime(other, ns=(good.st_atime_ns, good.st_mtime_ns))
    os.replace(other, path)
    assert verify("mnist")["train-labels-idx1-ubyte"].startswith("sha256 mismatch")
    fetch("mnist")
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")


def test_the_verified_marker_is_as_readable_as_the_files_it_vouches_for(
    monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, mirror: str
) -> None:
    # It was written 0600 (a temporary file's mode): a team sharing the cache rehashed every file.
    import stat

    from deepspark.data import cache as verified

    monkeypatch.setenv("DEEPSPARK_MNIST_MIRRORS", f"{mirror}/good/")
    monkeypatch.setattr(verified, "RACY_NS", 0)  # as if the fetched files had been still for long
    umask = os.umask(0o022)
    try:
        cache = fetch("mnist")
        verify("mnist")  # the first use after the fetch records the digests
    finally:
        os.umask(umask)
    modes = {stat.S_IMODE((cache / name).stat().st_mode) for name in (".verified.json", *MNIST_FILES)}
    assert modes == {0o644}


@pytest.mark.parametrize("same_tick", [False, True], ids=["times-moved", "same-clock-tick"])
def test_a_file_written_while_it_is_hashed_is_not_remembered_as_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, same_tick: bool
) -> None:
    # The file is written in place, same size, after the hash read its good bytes and before the digest
    # is kept. Either its times moved, or the write fell in the clock tick of the stat the digest is
    # keyed by, which leaves size, times and inode as they were (simulated by a stat that keeps
    # answering what it saw before the write, as a coarse clock would): the marker then vouched for
    # bytes it never saw.
    import contextlib
    import io

    from deepspark.data import cache

    user = tmp_path / "user"
    path = _write_layout(user)[1]
    real_open_raw, real_stat = cache.open_raw, Path.stat
    frozen: dict[Path, os.stat_result] = {}

    def coarse_stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        return frozen.get(self) or real_stat(self, *args, **kwargs)

    @contextlib.contextmanager
    def overwritten_after_reading(p: Path) -> Iterator[io.BytesIO]:
        with real_open_raw(p) as stream:
            yield io.BytesIO(stream.read())  # the hash sees the good bytes...
        if p == path:  # ...and then the file is written in place
            st = real_stat(p)
            data = bytearray(p.read_bytes())
            data[-1] ^= 0xFF
            p.write_bytes(bytes(data))
            if same_tick:
                frozen[p] = st
            else:
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    monkeypatch.setattr(Path, "stat", coarse_stat)
    monkeypatch.setattr(cache, "open_raw", overwritten_after_reading)
    assert verify("mnist", data_dir=user) == dict.fromkeys(MNIST_FILES, "ok")
    monkeypatch.setattr(cache, "open_raw", real_open_raw)
    # The good digest was kept for the changed file's identity: its other bytes passed from then on.
    assert verify("mnist", data_dir=user)["train-labels-idx1-ubyte"].startswith("sha256 mismatch")
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        load_dataset("mnist", data_dir=user)


def test_a_digest_is_remembered_once_the_file_has_been_still_for_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: DatasetInfo, caplog: pytest.LogCaptureFixture
) -> None:
    from deepspark.data import cache

    caplog.set_level(logging.INFO, logger="deepspark.data.cache")
    user = tmp_path / "user"
    _write_layout(user)
    monkeypatch.setattr(cache, "RACY_NS", 300_000_000)
    assert verify("mnist", data_dir=user) == dict.fromkeys(MNIST_FILES, "ok")  # just written: racy
    caplog.clear()
    assert verify("mnist", data_dir=user) == dict.fromkeys(MNIST_FILES, "ok")
    assert caplog.text.count("computing the SHA-256") == len(MNIST_FILES)  # so hashed again
    time.sleep(0.4)  # still for longer than the window: now the digests are kept...
    assert verify("mnist", data_dir=user) == dict.fromkeys(MNIST_FILES, "ok")
    caplog.clear()
    assert verify("mnist", data_dir=user) == dict.fromkeys(MNIST_FILES, "ok")
    assert "computing the SHA-256" not in caplog.text  # ...and trusted


def test_verify_reports_missing_and_unknown_names_are_config_errors(tiny: DatasetInfo) -> None:
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "missing")
    with pytest.raises(ConfigError, match="registered dataset"):
        fetch("imagenet")
    with pytest.raises(ConfigError, match="registered dataset"):
        load_dataset("no-such-dataset-or-dir")


def test_verify_of_a_data_dir_that_does_not_exist_says_so(
    tiny: DatasetInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its files were reported from the cache alone, without a word that the directory given was absent."""
    missing = tmp_path / "typo"
    with caplog.at_level("WARNING", logger="deepspark.data.fetch"):
        assert verify("mnist", data_dir=missing) == dict.fromkeys(MNIST_FILES, "missing")
    assert f"data directory {missing} does not exist; checking the cache only" in caplog.text


# ----------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True), (True, True)])
def test_custom_mnist_layout_dir_loads_with_its_own_classes(tmp_path: Path, gz: bool, dotted: bool) -> None:
    directory = tmp_path / "custom"
    _write_layout(directory, gz=gz, dotted=dotted)
    data = load_dataset(data_dir=directory)
    images, labels = _make_split(12, seed=1)
    np.testing.assert_array_equal(data.train_images, images)
    assert data.train_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_labels, labels)
    assert data.num_classes == 3 and data.class_names == ("0", "1", "2")
    assert data.input_shape == (1, 8, 8)
    scaled = data.train_images / 255.0
    assert data.mean == pytest.approx((scaled.mean(),), abs=1e-6)
    assert data.std == pytest.approx((scaled.std(),), abs=1e-6)
    # A directory given as the name works too.
    assert load_dataset(str(directory)).train_images.shape == (12, 8, 8)


def test_image_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    paths = _write_layout(tmp_path / "d")
    write_idx(paths[1], np.zeros(11, dtype=np.uint8))
    with pytest.raises(DatasetError) as err:
        load_dataset(data_dir=tmp_path / "d")
    message = str(err.value)
    assert str(paths[0]) in message and str(paths[1]) in message
    assert "12 images" in message and "11 labels" in message


def test_images_without_pixels_are_refused_naming_the_file(tmp_path: Path) -> None:
    # A header of 12 x 0 x 8 images: training made a model of input [1, 0, 8] (or failed in Arrow).
    paths = _write_layout(tmp_path / "d")
    write_idx(paths[0], np.zeros((12, 0, 8), dtype=np.uint8))
    write_idx(paths[2], np.zeros((6, 0, 8), dtype=np.uint8))
    with pytest.raises(DatasetError, match=rf"{paths[0]}: images of shape \(0, 8\) hold no pixels"):
        load_dataset(data_dir=tmp_path / "d")


def test_channels_last_images_are_refused_not_read_as_channels(tmp_path: Path) -> None:
    # [N, 8, 8, 3] (RGB as PIL and numpy hold it) was read as 8 channels of 8x3 pixels and trained on.
    paths = _write_layout(tmp_path / "d")
    rgb = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    write_idx(paths[0], rgb)
    write_idx(paths[2], rgb[:6])
    with pytest.raises(DatasetError, match=rf"{paths[0]}: images of shape \[8, 8, 3\] look channels-last"):
        load_dataset(data_dir=tmp_path / "d")
    # The same images channels-first load as 3 channels of 8x8.
    write_idx(paths[0], rgb.transpose(0, 3, 1, 2))
    write_idx(paths[2], rgb[:6].transpose(0, 3, 1, 2))
    assert load_dataset(data_dir=tmp_path / "d").input_shape == (3, 8, 8)
    # So does a record built in Python.
    with pytest.raises(ConfigError, match=r"train_images: images of shape \[8, 8, 3\] look channels-last"):
        split = (rgb, np.zeros(12, dtype=np.int64))
        ImageDataset.from_splits("rgb", split, split, ("a",))


def test_missing_file_and_label_out_of_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_layout(tmp_path / "d")
    paths[2].unlink()
    with pytest.raises(DatasetError, match="missing t10k-images-idx3-ubyte"):
        load_dataset(data_dir=tmp_path / "d")
    # A registered dataset with two classes whose label file holds a 2.
    source = _write_layout(tmp_path / "e")[0].parent
    digests = {name: _raw_digest(source / name) for name in MNIST_FILES}
    entry = dataclasses.replace(DATASETS["mnist"], files=digests, class_names=("a", "b"), mean=None, std=None)
    monkeypatch.setitem(DATASETS, "mnist", entry)
    with pytest.raises(DatasetError, match="label 2 is out of range for 2 classes"):
        load_dataset("mnist", data_dir=source)


def test_subset_takes_the_first_examples_and_validates(tmp_path: Path) -> None:
    _write_layout(tmp_path / "d")
    data = load_dataset(data_dir=tmp_path / "d")
    small = data.subset(train=5, test=2)
    assert isinstance(small, ImageDataset)
    np.testing.assert_array_equal(small.train_images, data.train_images[:5])
    assert len(small.test_labels) == 2 and small.mean == data.mean
    assert len(data.subset(test=100).test_labels) == 6
    with pytest.raises(ConfigError, match="train: expected an integer >= 0, got -1"):
        data.subset(train=-1)
    with pytest.raises(ConfigError, match="test_labels must be an int64"):
        dataclasses.replace(data, test_labels=data.test_labels.astype(np.int32))


def test_info_describes_splits_classes_and_files(tmp_path: Path) -> None:
    paths = _write_layout(tmp_path / "d", gz=True)
    described = info(data_dir=tmp_path / "d")
    assert described["splits"] == {
        "train": {"count": 12, "image_shape": [8, 8]},
        "test": {"count": 6, "image_shape": [8, 8]},
    }
    assert described["num_classes"] == 3
    assert described["train_class_counts"] == {"0": 4, "1": 4, "2": 4}
    assert described["files"] == {str(p): p.stat().st_size for p in paths}


def test_developers_md_lists_the_digests_the_registry_checks() -> None:
    import re

    from deepspark.data.registry import MNIST

    text = (Path(__file__).parents[2] / "DEVELOPERS.md").read_text()
    documented = dict(re.findall(r"\| `([a-z0-9-]+-ubyte)` \| `([0-9a-f]{64})` \|", text))
    assert documented == dict(MNIST.files)


# ------------------------------------------------------------ a directory the user names is the dataset
def _write_other(
    directory: Path, *, classes: int = 3, size: int = 7, train: int = 50, test: int = 20
) -> Path:
    """An MNIST-layout directory that is not MNIST: other image size, class count and split sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [
        *_make_split(train, classes=classes, size=size, seed=3),
        *_make_split(test, classes=classes, size=size, seed=4),
    ]
    for raw_name, array in zip(MNIST_FILES, arrays, strict=True):
        write_idx(directory / raw_name, array)
    return directory


@pytest.fixture
def cached_mnist(tmp_path: Path, tiny: DatasetInfo) -> Path:
    """A verified copy of the (synthetic) registered "mnist" in the cache: what a wrong fallback would load."""
    cache = _write_layout(_cache_dir(tmp_path))[0].parent
    assert verify("mnist") == dict.fromkeys(MNIST_FILES, "ok")
    return cache


def test_a_named_directory_loads_as_itself_and_never_as_the_cached_registered_dataset(
    tmp_path: Path, cached_mnist: Path
) -> None:
    other = _write_other(tmp_path / "other")
    for data in (load_dataset(data_dir=other), load_dataset(str(other))):
        assert data.train_images.shape == (50, 7, 7) and data.test_images.shape == (20, 7, 7)
        assert data.num_classes == 3 and data.class_names == ("0", "1", "2")
    described = info(data_dir=other)
    assert described["directory"] == str(other) and described["num_classes"] == 3
    # Naming the registered dataset as well: the directory must hold it; the cache is no substitute.
    for call in (lambda: load_dataset("mnist", data_dir=other), lambda: info("mnist", data_dir=other)):
        with pytest.raises(DatasetError) as err:
            call()
        message = str(err.value)
        for name in MNIST_FILES:
            assert f"{other / name}: sha256 mismatch: expected {DATASETS['mnist'].files[name]}" in message
        assert str(cached_mnist) not in message
    with pytest.raises(DatasetError, match="expected an existing directory holding mnist"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    # Without data_dir the registered name still finds the verified cache.
    assert load_dataset("mnist").train_images.shape == (12, 8, 8)


def test_the_registered_name_beside_a_directory_of_that_name_says_which_it_reads(
    tmp_path: Path, cached_mnist: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # `train mnist` in a folder holding ./mnist (the user's own digits) trained on the registered
    # MNIST without a word; './mnist' reads the folder.
    work = tmp_path / "work"
    _write_other(work / "mnist")
    monkeypatch.chdir(work)
    with caplog.at_level(logging.WARNING, logger="deepspark.data.loading"):
        assert load_dataset("mnist").train_images.shape == (12, 8, 8)  # the registered (tiny) one
    assert [r.getMessage() for r in caplog.records] == [
        f"'mnist' is the registered dataset (read from {cached_mnist}); the directory {work / 'mnist'} here "
        "is not read: give './mnist' to use that directory's own data"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepspark.data.loading"):
        assert load_dataset("./mnist").train_images.shape == (50, 7, 7)
        monkeypatch.chdir(tmp_path)
        assert load_dataset("mnist").train_images.shape == (12, 8, 8)
    assert not caplog.records


def test_cli_train_with_a_data_dir_named_like_a_registered_dataset_reads_that_directory(
    tmp_path: Path, cached_mnist: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import deepspark.training
    from deepspark.cli import main

    # `train --data-dir mnist` (the user's own ./mnist) trained on the registered MNIST of the cache.
    work = tmp_path / "work"
    own = _write_other(work / "mnist")
    monkeypatch.chdir(work)
    given: dict[str, object] = {}

    def fit(**options: object) -> None:
        given.update(options)
        raise ConfigError("stop before training")

    monkeypatch.setattr(deepspark.training, "fit", fit)
    assert main(["train", "--data-dir", "mnist", "--model", "mlp", "--run-dir", str(tmp_path / "r")]) == 2
    assert "stop before training" in capsys.readouterr().err
    data = load_dataset(given["data"], data_dir=given["data_dir"])  # type: ignore[arg-type]
    assert data.train_images.shape == (50, 7, 7) and Path(str(given["data"])) == own


def test_cli_train_and_data_info_with_a_data_dir_use_that_directory(
    tmp_path: Path, cached_mnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main
    from deepspark.models import load_checkpoint

    other = _write_other(tmp_path / "other")
    output = tmp_path / "ckpt"
    args = ["train", "--data-dir", str(other), "--model", "mlp", "--epochs", "1", "--threads", "1"]
    args += ["--run-dir", str(tmp_path / "run")]
    assert main([*args, "--output", str(output)]) == 0
    ckpt = load_checkpoint(output)
    assert tuple(ckpt.spec.input_shape) == (1, 7, 7) and ckpt.class_names == ("0", "1", "2")
    assert main(["data", "info", "--data-dir", str(other)]) == 0
    assert '"num_classes": 3' in capsys.readouterr().out
    # `mnist` named explicitly with a directory of other files: an error naming the file, not the cache.
    bad = ["train", "mnist", "--data-dir", str(other), "--model", "mlp", "--run-dir", str(tmp_path / "bad")]
    assert main([*bad, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'train-images-idx3-ubyte'}: sha256 mismatch" in err
    assert not (tmp_path / "bad").exists()  # a failed start leaves no run directory behind


def _labelled_layout(directory: Path, train_labels: list[int], test_labels: list[int]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    arrays = [
        rng.integers(0, 256, (len(train_labels), 6, 6), dtype=np.uint8),
        np.asarray(train_labels, dtype=np.uint8),
        rng.integers(0, 256, (len(test_labels), 6, 6), dtype=np.uint8),
        np.asarray(test_labels, dtype=np.uint8),
    ]
    return [write_idx(directory / n, a) for n, a in zip(MNIST_FILES, arrays, strict=True)]


def test_a_stray_test_label_is_refused_not_turned_into_extra_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unregistered directory: the training labels define the classes (0..9 here).
    paths = _labelled_layout(tmp_path / "d", list(range(10)) * 3, [0, 1, 200, 3])
    with pytest.raises(DatasetError) as err:
        load_dataset(data_dir=tmp_path / "d")
    message = str(err.value)
    assert str(paths[3]) in message and "label 200" in message and "labels 0..9" in message
    assert "10 classes" in message
    # Within 0..max but never seen in training is refused too.
    paths = _labelled_layout(tmp_path / "gap", [0, 2, 3, 0, 2, 3], [0, 1])
    with pytest.raises(DatasetError, match=r"label 1 never occurs in the training labels"):
        load_dataset(data_dir=tmp_path / "gap")
    # Training labels alone set the class count, gaps included.
    ok = _labelled_layout(tmp_path / "ok", [0, 2, 3, 0, 2, 3], [3, 0])
    assert load_dataset(data_dir=ok[0].parent).num_classes == 4
    # A registered dataset with 10 known classes: the bad file, the value and the range are named.
    reg = _labelled_layout(tmp_path / "reg", list(range(10)) * 3, [0, 1, 200, 3])
    digests = {name: _raw_digest(reg[0].parent / name) for name in MNIST_FILES}
    entry = dataclasses.replace(DATASETS["mnist"], files=digests, mean=None, std=None)
    monkeypatch.setitem(DATASETS, "mnist", entry)
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", data_dir=reg[0].parent)
    message = str(err.value)
    assert str(reg[3]) in message and "label 200" in message and "expected labels 0..9" in message


def test_cli_data_fetch_and_verify_with_only_a_data_dir_check_that_directory(
    tmp_path: Path,
    cached_mnist: Path,
    tiny: DatasetInfo,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json

    from deepspark.cli import main

    # A registered dataset's files: checked against its checksums, in that directory (not the cache).
    good = _write_layout(tmp_path / "good")[0].parent
    assert main(["data", "verify", "--data-dir", str(good)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == dict.fromkeys(MNIST_FILES, "ok")
    assert f"checked {good}" in captured.err and str(cached_mnist) not in captured.err
    assert main(["data", "fetch", "--data-dir", str(good)]) == 0
    assert f"checked {good}" in capsys.readouterr().out
    # Any other MNIST-layout directory: read, and said to have no registered checksums.
    other = _write_other(tmp_path / "other")
    assert main(["data", "verify", "--data-dir", str(other), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == set(MNIST_FILES)
    assert all(
        v.startswith("ok (read as other: 50 train, 20 test") and "not mnist" in v for v in report.values()
    )
    # ... without a warning per file that it is "not using it": it is read, as the report says.
    with caplog.at_level(logging.WARNING):
        assert all(v.startswith("ok (read as other") for v in verify(data_dir=other).values())
    assert not [r for r in caplog.records if "not using it" in r.getMessage()]
    # Neither a name nor a directory: the error says what to give.
    assert main(["data", "fetch"]) == 2
    assert "--data-dir DIR" in capsys.readouterr().err
    (other / "train-labels-idx1-ubyte").write_bytes(b"junk")
    assert main(["data", "fetch", "--data-dir", str(other)]) == 2


def test_a_directory_name_with_another_data_dir_is_refused_not_one_of_them_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main

    first = _write_other(tmp_path / "first", classes=3, size=7)
    second = _write_other(tmp_path / "second", classes=4, size=5)
    for call in (
        lambda: load_dataset(str(first), data_dir=second),
        lambda: info(str(first), data_dir=second),
    ):
        with pytest.raises(ConfigError, match="give the dataset's directory once") as err:
            call()
        assert str(first) in str(err.value) and str(second) in str(err.value)
    # The same directory twice (another spelling of it) is one dataset.
    assert load_dataset(str(first), data_dir=tmp_path / "." / "first").input_shape == (1, 7, 7)
    # `train DIR --data-dir OTHER` trained on DIR and dropped OTHER without a word.
    args = ["train", str(first), "--data-dir", str(second), "--model", "mlp", "--epochs", "1"]
    assert main([*args, "--run-dir", str(tmp_path / "run")]) == 2
    assert "give the dataset's directory once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_training_label_past_the_examples_is_refused_not_made_into_classes(tmp_path: Path) -> None:
    paths = _write_layout(tmp_path / "d")
    # One stray label made 70,001 classes out of 12 examples; a corrupt int32 2**31 - 1 would make two
    # billion class names (memory, then a hang).
    for stray in (70_000, 2**31 - 1):
        write_idx(paths[1], np.array([0, 1, 2] * 3 + [0, 1, stray], dtype=np.int32))
        with pytest.raises(DatasetError) as err:
            load_dataset(data_dir=tmp_path / "d")
        message = str(err.value)
        assert str(paths[1]) in message and f"label {stray} would make {stray + 1} classes" in message
        assert "12 training examples" in message
    # 12 examples over labels 0..11 (gaps included) still define 12 classes.
    write_idx(paths[1], np.array([0, 1, 2] * 3 + [0, 1, 11], dtype=np.int32))
    write_idx(paths[3], np.array([0, 1, 2, 0, 1, 11], dtype=np.uint8))
    assert load_dataset(data_dir=tmp_path / "d").num_classes == 12


def test_a_directory_holding_cifar10_beside_an_mnist_layout_is_refused_not_read_as_either(
    tiny: DatasetInfo, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main

    # `data verify --data-dir DIR` vouched for DIR's MNIST files while `train --data-dir DIR` trained on
    # the CIFAR-10 batches beside them.
    batches = source / "cifar-10-batches-bin"
    batches.mkdir()
    for name in [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]:
        (batches / name).write_bytes(bytes(3073))
    for call in (lambda: load_dataset(data_dir=source), lambda: verify(data_dir=source)):
        with pytest.raises(DatasetError, match="holds two datasets") as err:
            call()
        assert str(batches) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    assert main(["data", "verify", "--data-dir", str(source)]) == 2
    assert "deepspark: error: " in capsys.readouterr().err
    # A registered name says which: the directory's verified MNIST files.
    assert load_dataset("mnist", data_dir=source).train_images.shape == (12, 8, 8)
