"""The one HTTP(S) fetcher: dataset mirrors and predict's URL inputs both go through it.

What it guarantees, whoever calls it: only ``http``/``https`` URLs, and redirects only to them (urllib
would follow ``ftp://`` too); a deadline per attempt (``timeout`` seconds end to end, checked after every
socket read of the body, and enforced on the TLS handshake, status line and headers by shutting the
attempt's sockets down, so a server trickling bytes cannot hold a task forever); a size cap checked against
``Content-Length`` before reading and against the bytes actually read; and a bounded number of retries
with exponential backoff for failures that asking again can cure (5xx answers, refused or dropped
connections, truncated bodies, timeouts), never for a 4xx, an oversized body or a refused redirect.

Every failure is a :class:`FetchError` whose message says what happened; callers turn it into their own
error (a row's error in predict, a source's report line in ``data fetch``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import urlsplit

__all__ = ["ALLOWED_SCHEMES", "FetchError", "Progress", "download"]

#: The URL schemes we fetch and follow redirects to.
ALLOWED_SCHEMES = ("http", "https")
_CHUNK = 1 << 16

#: Called as ``progress(bytes_so_far, total_bytes_or_None)`` when an attempt starts and after each read;
#: ``bytes_so_far`` starts again from 0 when an attempt is retried.
Progress = Callable[[int, int | None], None]


class FetchError(Exception):
    """A URL could not be fetched within the limits; the message says why.

    ``transient`` is True when every attempt failed in a way that asking again might have cured (a 5xx,
    a refused or dropped connection, a timeout): the server looks down. False for an answer that will not
    change (a 4xx) and for what we refuse (a body over the cap, a redirect or URL that is not http(s)).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise FetchError(f"redirect to a non-http(s) URL refused ({scheme}://)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Shuts down the sockets of one attempt when its ``seconds`` are up.

    A socket timeout bounds each read, not the status line and headers (and a TLS handshake), which
    urllib reads before any body byte reaches our loop: a server sending them a byte at a time held an
    attempt for hours. Each connection registers a duplicate of its TCP socket (a TLS wrap detaches the
    original), whose shutdown wakes any read on the connection with an end of stream.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            expired = self.expired
        if expired:
            _shut(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.cancel()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    deadline: _Deadline  # set by _watched right after construction, before connect()

    def connect(self) -> None:
        super().connect()  # for HTTPS, the TCP connection before its TLS wrap (the MRO below)
        self.deadline.watch(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection, _WatchedHTTPConnection):
    pass


def _watched(cls: type[_WatchedHTTPConnection], deadline: _Deadline) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> _WatchedHTTPConnection:
        conn = cls(*args, **kwargs)
        conn.deadline = deadline
        return conn

    return make


class _WatchedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handlers, whose connections register with ``deadline``."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(_watched(_WatchedHTTPConnection, self.deadline), req)

    def https_open(self, req: Any) -> Any:
        return self.do_open(_watched(_WatchedHTTPSConnection, self.deadline), req)


def _check_url(url: str) -> None:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise FetchError(f"malformed URL: {exc}") from None
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError(
            f"unsupported URL scheme {scheme + '://' if scheme else '(none)'}: only http and https"
        )


def _attempt(
    request: urllib.request.Request,
    out: BinaryIO,
    *,
    timeout: float,
    read_timeout: float,
    max_bytes: int,
    progress: Progress | None,
) -> int:
    deadline = time.monotonic() + timeout
    with _Deadline(timeout) as watch:
        opener = urllib.request.build_opener(_SafeRedirects(), _WatchedHandler(watch))
        try:
            size = _read(opener, request, out, deadline, timeout, read_timeout, max_bytes, progress)
        except (http.client.HTTPException, OSError) as exc:  # URLError and HTTPError are OSErrors
            # Whichever noticed first, the shutdown or a socket timeout as long as the attempt: one message.
            if (watch.expired or time.monotonic() >= deadline) and not isinstance(
                exc, urllib.error.HTTPError
            ):
                raise TimeoutError(f"no complete answer within {timeout:g} s") from exc
            raise
        if watch.expired:  # the shutdown may read as the end of a body without Content-Length
            raise TimeoutError(f"no complete answer within {timeout:g} s")
        return size


def _read(
    opener: urllib.request.OpenerDirector,
    request: urllib.request.Request,
    out: BinaryIO,
    deadline: float,
    timeout: float,
    read_timeout: float,
    max_bytes: int,
    progress: Progress | None,
) -> int:
    with opener.open(request, timeout=read_timeout) as resp:
        length = resp.headers.get("Content-Length")
        # isascii: "²" (a 0xB2 byte, read as Latin-1) is a digit to isdigit() and a ValueError to int().
        total = int(length) if length and length.isascii() and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise FetchError(f"too large: {total} bytes > max {max_bytes}")
        size = 0
        if progress is not None:
            progress(0, total)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
            # read1: at most one socket read, so the deadline is checked however slowly bytes arrive.
            chunk = resp.read1(_CHUNK)
            if not chunk:
                if total is not None and size < total:  # read1, unlike read, does not raise for this
                    raise ConnectionError(f"connection closed after {size} of {total} bytes")
                return size
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"too large: more than max {max_bytes} bytes")
            out.write(chunk)
            if progress is not None:
                progress(size, total)


def download(
    url: str,
    out: BinaryIO,
    *,
    timeout: float,
    max_bytes: int,
    retries: int = 2,
    backoff: float = 0.5,
    read_timeout: float | None = None,
    progress: Progress | None = None,
    user_agent: str = "deepspark",
) -> int:
    """GET ``url`` and write its body to ``out``; return the number of bytes written.

    ``out`` must be seekable: a retried attempt rewinds it to where it was and truncates what the failed
    attempt wrote, so ``out`` never holds bytes of two attempts. ``timeout`` bounds each attempt end to
    end; ``read_timeout`` (default ``timeout``) bounds each connect and socket read. Failures that asking
    again can cure are retried ``retries`` times, after ``backoff``, ``2 * backoff``, … seconds.
    """
    _check_url(url)
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    start = out.tell()
    message = ""
    transient = False
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))  # backoff between retries, not a polling loop
            out.seek(start)
            out.truncate()
        try:
            return _attempt(
                request,
                out,
                timeout=timeout,
                read_timeout=timeout if read_timeout is None else read_timeout,
                max_bytes=max_bytes,
                progress=progress,
            )
        except urllib.error.HTTPError as exc:
            message = f"HTTP {exc.code} {exc.reason}"
            transient = 500 <= exc.code < 600
            if not transient:
                break  # 4xx: asking again will not help
        except (ValueError, OverflowError) as exc:
            # A URL or redirect Location the standard library cannot take, raised past its own handlers:
            # a host IDNA cannot encode (UnicodeError), a torn IPv6 host, a port past a C long.
            message, transient = f"malformed URL: {type(exc).__name__}: {exc}", False
            break
        except urllib.error.URLError as exc:
            message, transient = f"cannot fetch: {exc.reason}", True
        except (http.client.HTTPException, OSError) as exc:
            message, transient = f"cannot fetch: {type(exc).__name__}: {exc}", True
    raise FetchError(message, transient=transient)
