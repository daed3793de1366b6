"""The one HTTP(S) fetcher: dataset mirrors and predict's URL inputs both go through it.

What it guarantees, whoever calls it: only ``http``/``https`` URLs, and redirects only to them (urllib
would follow ``ftp://`` too); a deadline per attempt (``timeout`` seconds end to end, checked after every
socket read, so a server trickling bytes cannot hold a task forever); a size cap checked against
``Content-Length`` before reading and against the bytes actually read; and a bounded number of retries
with exponential backoff for failures that asking again can cure (5xx answers, refused or dropped
connections, truncated bodies, timeouts), never for a 4xx, an oversized body or a refused redirect.

Every failure is a :class:`FetchError` whose message says what happened; callers turn it into their own
error (a row's error in predict, a source's report line in ``data fetch``).
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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


_opener = urllib.request.build_opener(_SafeRedirects())


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
    with _opener.open(request, timeout=read_timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
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
        except urllib.error.URLError as exc:
            message, transient = f"cannot fetch: {exc.reason}", True
        except (http.client.HTTPException, OSError) as exc:
            message, transient = f"cannot fetch: {type(exc).__name__}: {exc}", True
    raise FetchError(message, transient=transient)
