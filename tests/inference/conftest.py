"""Fixtures for the inference tests: a small untrained cnn checkpoint, PNG files, a local HTTP server."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from _inference_support import CLASS_NAMES, Model, Server


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from deepspark.models import Preprocess, build_model, model_spec, save_checkpoint

    spec = model_spec("cnn", conv1=4, conv2=8, fc=32)
    module = build_model(spec, seed=0).eval()
    path = tmp_path_factory.mktemp("model") / "ckpt"
    preprocess = Preprocess(input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    save_checkpoint(path, module, spec, preprocess=preprocess, class_names=CLASS_NAMES)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    return Model(path=path, module=module, images=images)


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: dict[str, int]

    def do_GET(self) -> None:
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1  # type: ignore[attr-defined]
        if self.path.startswith("/fail500"):
            self.send_error(500, "boom")
            return
        if self.path.startswith("/redirect-ftp"):
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.png")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Serves a temp folder on 127.0.0.1 (never the internet); counts requests per path."""
    root = tmp_path_factory.mktemp("www")

    def handler(*args: object, **kwargs: object) -> _Handler:
        return _Handler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    server.hits = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_address[1]}", root, server.hits)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
