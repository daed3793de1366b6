"""The one HTTP fetcher (deepspark.http): schemes, redirects, size cap, retries, deadlines, progress.

Every request goes to an ``http.server`` on 127.0.0.1; nothing touches the network.
"""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from deepspark.http import FetchError, download

BODY = bytes(range(256)) * 1000  # 256,000 bytes: several reads of the fetcher's 64 KiB chunks


@dataclass
class _State:
    hits: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: _State

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, *, length: int | None = None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        hits = self.state.hits
        hits[self.path] = hits.get(self.path, 0) + 1
        count = hits[self.path]
        if self.path == "/ok":
            self._send(BODY)
        elif self.path == "/redirect-ok":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.end_headers()
        elif self.path == "/redirect-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/ok")
            self.end_headers()
        elif self.path == "/redirect-file":
            self.send_response(301)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/missing":
            self._send(b"no", status=404)
        elif self.path == "/unavailable-once":
            self._send(b"busy", status=503) if count == 1 else self._send(BODY)
        elif self.path == "/unavailable":
            self._send(b"busy", status=503)
        elif self.path == "/cut-once":
            # The first answer promises the whole body, sends half and hangs up; the second is whole.
            if count == 1:
                self._send(BODY[: len(BODY) // 2], length=len(BODY))
                self.close_connection = True
            else:
                self._send(BODY)
        elif self.path == "/unsized":
            # No Content-Length: the cap can only be enforced on the bytes as they arrive.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif self.path == "/odd-length":
            # A Content-Length of one byte 0xB2, read as Latin-1 "²": a digit to str.isdigit.
            self.send_response(200)
            self.send_header("Content-Length", "\u00b2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif self.path in ("/redirect-torn-ipv6", "/redirect-huge-port"):
            self.send_response(302)
            torn = self.path == "/redirect-torn-ipv6"
            self.send_header(
                "Location", "http://[::1/x" if torn else "http://127.0.0.1:99999999999999999999/"
            )
            self.end_headers()
        elif self.path == "/silent":
            self.state.release.wait(30)  # never answers while the test runs
        elif self.path == "/trickle":
            # Headers at once, then one byte at a time: every read succeeds, the whole never comes.
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            for byte in BODY:
                if self.state.release.wait(0.02):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, _State]]:
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _get(url: str, **limits: object) -> bytes:
    out = io.BytesIO()
    options: dict[str, object] = {"timeout": 5.0, "max_bytes": 1 << 20, "backoff": 0.01, **limits}
    assert download(url, out, **options) == len(out.getvalue())  # type: ignore[arg-type]
    return out.getvalue()


def test_body_streams_to_the_file_object_and_progress_counts_its_bytes(server: tuple[str, _State]) -> None:
    url, _ = server
    calls: list[tuple[int, int | None]] = []
    out = io.BytesIO(b"kept:")
    out.seek(0, io.SEEK_END)
    written = download(
        f"{url}/ok", out, timeout=5, max_bytes=1 << 20, progress=lambda d, t: calls.append((d, t))
    )
    assert written == len(BODY) and out.getvalue() == b"kept:" + BODY
    assert calls[0] == (0, len(BODY)) and calls[-1] == (len(BODY), len(BODY))
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) > 2  # streamed in several reads, never backwards
    assert _get(f"{url}/redirect-ok") == BODY  # http -> http redirects are followed


def test_redirect_to_another_scheme_is_refused_and_not_retried(server: tuple[str, _State]) -> None:
    url, state = server
    with pytest.raises(FetchError, match="redirect to a non-http\\(s\\) URL refused \\(ftp://\\)") as err:
        _get(f"{url}/redirect-ftp", retries=3)
    assert not err.value.transient and state.hits["/redirect-ftp"] == 1
    # urllib itself refuses file:// before asking our handler; refused all the same, and not retried.
    with pytest.raises(FetchError, match="HTTP 301 .*'file:///etc/passwd' is not allowed") as err:
        _get(f"{url}/redirect-file", retries=3)
    assert not err.value.transient and state.hits["/redirect-file"] == 1
    for bad in ("file:///etc/passwd", "ftp://127.0.0.1/ok", "127.0.0.1/ok"):
        with pytest.raises(FetchError, match="unsupported URL scheme"):
            _get(bad)


def test_size_cap_from_the_header_and_from_the_bytes_read(server: tuple[str, _State]) -> None:
    url, state = server
    with pytest.raises(FetchError, match=f"too large: {len(BODY)} bytes > max 1000"):
        _get(f"{url}/ok", max_bytes=1000, retries=2)
    with pytest.raises(FetchError, match="too large: more than max 1000 bytes") as err:
        _get(f"{url}/unsized", max_bytes=1000, retries=2)
    assert not err.value.transient
    assert state.hits["/unsized"] == 1  # a body over the cap is not asked for again
    assert _get(f"{url}/unsized") == BODY  # within the cap, an unsized body is read to its end


def test_a_503_is_retried_and_a_retried_attempt_starts_the_output_again(server: tuple[str, _State]) -> None:
    url, state = server
    assert _get(f"{url}/unavailable-once", retries=1) == BODY
    assert state.hits["/unavailable-once"] == 2
    # A body cut off half way: the retry's bytes replace the first attempt's, never follow them.
    calls: list[tuple[int, int | None]] = []
    assert _get(f"{url}/cut-once", retries=1, progress=lambda d, t: calls.append((d, t))) == BODY
    assert state.hits["/cut-once"] == 2
    assert calls.count((0, len(BODY))) == 2 and calls[-1] == (len(BODY), len(BODY))
    with pytest.raises(FetchError, match="HTTP 503") as err:
        _get(f"{url}/unavailable", retries=2)
    assert err.value.transient and state.hits["/unavailable"] == 3  # 1 + 2 retries
    with pytest.raises(FetchError, match="HTTP 404") as err:
        _get(f"{url}/missing", retries=2)
    assert not err.value.transient and state.hits["/missing"] == 1  # a 4xx is not retried


def test_timeouts_a_silent_server_and_a_trickling_one(server: tuple[str, _State]) -> None:
    url, state = server
    with pytest.raises(FetchError, match="no complete answer within 0.3 s") as err:
        _get(f"{url}/silent", timeout=0.3, retries=1)
    assert err.value.transient and state.hits["/silent"] == 2
    # Each read gets a byte well within read_timeout; the per-attempt deadline still ends it.
    with pytest.raises(FetchError, match="no complete answer within 0.5 s"):
        _get(f"{url}/trickle", timeout=0.5, read_timeout=5.0, retries=0)


def _trickling_server(head: bytes) -> tuple[socket.socket, threading.Event]:
    """A server that answers every request with ``head``, a byte every 20 ms, and never ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in head * 1000:
                if stop.wait(0.02):
                    return
                conn.sendall(bytes([byte]))

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, stop


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\n", b"X-Padding: 0123456789\r\n"])
def test_a_status_line_or_headers_trickled_a_byte_at_a_time_end_at_the_deadline(head: bytes) -> None:
    # Each byte comes well within the socket timeout, so only the attempt's deadline can end it: urllib
    # reads the status line and headers before our loop sees a byte (100 headers of 64 KiB: hours).
    if not head.startswith(b"HTTP"):
        head = b"HTTP/1.1 200 OK\r\n" + head * 100
    listener, stop = _trickling_server(head)
    try:
        started = time.monotonic()
        with pytest.raises(FetchError, match="no complete answer within 0.5 s") as err:
            _get(f"http://127.0.0.1:{listener.getsockname()[1]}/x", timeout=0.5, read_timeout=5.0, retries=0)
        assert time.monotonic() - started < 3.0 and err.value.transient
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example"])
def test_a_host_name_idna_cannot_encode_is_a_fetch_error_not_a_unicode_error(host: str) -> None:
    # socket's IDNA encoding raised UnicodeError past every handler: in predict, the task failed (the
    # whole job) instead of that URL's row getting an error.
    with pytest.raises(FetchError, match="malformed URL") as err:
        _get(f"http://{host}/x.png", retries=2)
    assert not err.value.transient


@pytest.mark.parametrize("path", ["/redirect-torn-ipv6", "/redirect-huge-port"])
def test_a_redirect_to_a_malformed_url_is_a_fetch_error(server: tuple[str, _State], path: str) -> None:
    # urllib's ValueError (a torn IPv6 host) and OverflowError (the port) escaped every handler.
    url, state = server
    with pytest.raises(FetchError, match="malformed URL") as err:
        _get(f"{url}{path}", retries=2)
    assert not err.value.transient and state.hits[path] == 1


def test_a_content_length_that_is_no_number_is_ignored_not_a_value_error(server: tuple[str, _State]) -> None:
    # int("²") raised ValueError past every handler: in predict, the whole job failed for that one URL.
    url, _ = server
    assert _get(f"{url}/odd-length") == BODY


def test_a_refused_connection_is_a_transient_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="cannot fetch") as err:
        _get(f"http://127.0.0.1:{port}/x", retries=1)
    assert err.value.transient
