"""Framed messages over TCP between the driver and code running in Spark tasks.

A frame is ``struct ">IQ"`` (JSON header length, payload length), a UTF-8 JSON header (always an object)
and raw payload bytes. Headers are JSON and payloads are opaque bytes (safetensors, say): nothing read
from a socket is ever unpickled, so a message can only ever be data.

:class:`Server` accepts a connection only after its first frame, a hello carrying the per-run token,
arrives within ``handshake_timeout``; until then a frame may hold at most :data:`MAX_HELLO` bytes, so an
unauthenticated peer can make the server allocate 64 KiB at most, and, once the server is full, the
oldest peer still without its hello is closed to make room for a new one. :func:`connect` is the client
side.

This module is the shared layer of tuning and distributed training: it imports nothing from deepspark.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "HEARTBEAT",
    "MAX_FRAME",
    "MAX_HELLO",
    "MIN_HEARTBEAT_TIMEOUT",
    "Connection",
    "Heartbeat",
    "PeerClosed",
    "ProtocolError",
    "Server",
    "connect",
    "deliver",
    "heartbeat_interval",
    "receive",
    "recv",
    "send",
]

_log = logging.getLogger(__name__)

MAX_FRAME = 1 << 30
"""Largest frame (JSON header + payload) accepted after the hello: 1 GiB."""
MAX_HELLO = 64 << 10
"""Largest frame accepted before the hello is verified: 64 KiB."""

#: Seconds a peer that owes a frame may stay silent before it counts as lost (tune's trials, training's
#: workers). Spark declares an executor lost after its own 60 s heartbeat timeout; ours is the same
#: order, for the same reason (a long garbage-collection pause must not look like a death).
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: The least a user may set: shorter, a worker busy for a moment looks frozen.
MIN_HEARTBEAT_TIMEOUT = 1.0
#: Peers send a heartbeat every ``min(HEARTBEAT_EVERY, heartbeat_timeout / 4)`` seconds.
HEARTBEAT_EVERY = 5.0
#: The ``op`` of a heartbeat frame; a server skips these wherever it reads.
HEARTBEAT = "heartbeat"

_PREFIX = struct.Struct(">IQ")
_COALESCE = 64 << 10  # payloads up to this size go out in one write with their header (no Nagle stall)
_JOIN_S = 5.0  # how long close() waits in all for handler threads to notice its connection closed


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of ours, closed the connection mid-frame, sent a frame
    larger than allowed, or refused our hello."""


class PeerClosed(ProtocolError):
    """The peer closed the connection, between frames or mid-frame: its process went away."""


class _TooBig(ProtocolError):
    pass


def _encode(header: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(header), separators=(",", ":"), allow_nan=True).encode("utf-8")


def send(
    sock: socket.socket, header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b""
) -> int:
    """Write one frame; return the number of bytes written (prefix, header and payload)."""
    head = _encode(header)
    view = memoryview(payload).cast("B")
    if len(head) + view.nbytes > MAX_FRAME:
        raise _TooBig(f"frame of {len(head) + view.nbytes} bytes exceeds the {MAX_FRAME}-byte limit")
    prefix = _PREFIX.pack(len(head), view.nbytes)
    if view.nbytes <= _COALESCE:
        _send_all(sock, prefix + head + view)
    else:
        _send_all(sock, prefix + head)
        _send_all(sock, view)
    return _PREFIX.size + len(head) + view.nbytes


def _send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    # Not sendall: under a socket timeout, sendall gives the whole payload that many seconds; here each
    # send waits that long for the peer to take a byte, so a slow link is not a frozen peer (deliver).
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[sock.send(view) :]


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame before the deadline")
            sock.settimeout(left)
        count = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not count:
            raise PeerClosed("connection closed by peer" + (" mid-frame" if got else ""))
        got += count
    return buf


def _recv_frame(
    sock: socket.socket, limit: int, deadline: float | None = None
) -> tuple[dict[str, Any], bytes, int]:
    head_len, size = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size, deadline))
    if head_len + size > limit:
        raise _TooBig(f"frame of {head_len + size} bytes exceeds the {limit}-byte limit")
    try:
        header = json.loads(_recv_exact(sock, head_len, deadline).decode("utf-8"))
    except ValueError as exc:  # bad UTF-8 or bad JSON
        raise ProtocolError(f"frame header is not UTF-8 JSON: {exc}") from exc
    except RecursionError:  # json recurses per nesting level: 64 KiB of "[" is a hello's worth
        raise ProtocolError("frame header is not a frame of ours: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header must be a JSON object, got {type(header).__name__}")
    payload = bytes(_recv_exact(sock, size, deadline)) if size else b""
    return header, payload, _PREFIX.size + head_len + size


def recv(sock: socket.socket, *, limit: int = MAX_FRAME) -> tuple[dict[str, Any], bytes]:
    """Read one frame: ``(header, payload)``. A frame over ``limit`` bytes raises before any allocation."""
    header, payload, _ = _recv_frame(sock, limit)
    return header, payload


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One verified connection, made by :class:`Server` (passed to its handler) or :func:`connect`.

    ``hello`` is the client's hello header without the token; ``peer`` is ``"host:port"`` of the other
    end. ``bytes_sent`` / ``bytes_received`` count whole frames, the hello and welcome included. Any thread
    may send (frames are serialised by a lock, so a heartbeat thread can share the connection with the
    thread doing the work); one thread at a time may receive. :meth:`close` may be called from any thread
    and wakes a thread blocked in :meth:`recv` (it raises).
    """

    def __init__(self, sock: socket.socket, *, hello: Mapping[str, Any], peer: str) -> None:
        self._sock = sock
        self.hello: dict[str, Any] = dict(hello)
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False
        self._close_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def send(self, header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b"") -> int:
        with self._send_lock:
            n = send(self._sock, header, payload)
            self.bytes_sent += n
        return n

    def recv(self) -> tuple[dict[str, Any], bytes]:
        header, payload, n = _recv_frame(self._sock, MAX_FRAME)
        self.bytes_received += n
        return header, payload

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def peer_closed(self) -> bool:
        """Whether the peer hung up (or this side closed), checked without blocking or reading.

        For a server waiting on its own (a peer that awaits a reply sends nothing): a lost executor takes
        all its tasks at once, and work must not be handed to a peer that is already gone.
        """
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            # Without waiting: the connection's own reader may take what made it readable first, and a
            # blocking peek then waited for the peer's next frame (a coordinator thread checking a slot's
            # holder did so under the coordinator's lock, which that reader needed to answer the frame).
            return bool(readable) and self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # read meanwhile: the peer is there
            return False
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on this socket
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Connection(peer={self.peer!r}, hello={self.hello!r})"


def heartbeat_interval(timeout: float | None) -> float | None:
    """How often a peer watched with ``timeout`` (None: not watched) sends a heartbeat."""
    return None if timeout is None else min(HEARTBEAT_EVERY, timeout / 4)


def receive(conn: Connection, timeout: float | None) -> tuple[dict[str, Any], bytes, int]:
    """``conn``'s next frame other than a heartbeat, and its size in bytes; heartbeats that arrived while
    nobody read are skipped. Raises TimeoutError after ``timeout`` seconds (None: never) without a frame:
    the peer, which sends heartbeats while it works, is silent (frozen). Reads only count: sending a
    large payload to a slow link is not silence."""
    conn.settimeout(timeout)
    try:
        while True:
            before = conn.bytes_received
            header, payload = conn.recv()
            if header.get("op") != HEARTBEAT:
                return header, payload, conn.bytes_received - before
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile (the run ended): its error is raised
            conn.settimeout(None)


def deliver(
    conn: Connection,
    header: Mapping[str, Any],
    payload: bytes | bytearray | memoryview,
    timeout: float | None,
) -> int:
    """Send one frame to a peer watched with ``timeout`` (None: no clock), as :func:`receive` reads one;
    return its size in bytes. Raises TimeoutError when the peer takes no byte for ``timeout`` seconds: a
    frozen peer reads nothing, and a frame larger than the sockets' buffers (a model's weights) would
    block the sender for good. A slow link that takes bytes is not silence. After the error the frame is
    cut short: the connection is of no further use."""
    conn.settimeout(timeout)
    try:
        return conn.send(header, payload)
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile (the run ended): its error is raised
            conn.settimeout(None)


class Heartbeat:
    """A daemon thread that sends ``header`` (``{"op": HEARTBEAT, ...}``) on ``conn`` every ``interval``
    seconds (None: none) while the ``with`` block runs.

    A frozen process never closes its socket: the other side counts a peer lost when it has been silent
    past its heartbeat timeout, so a peer busy for longer (a trial, a round's steps) must keep talking.
    The frames share the connection, whose sends are serialised by a lock; nobody answers a heartbeat.
    """

    def __init__(
        self, conn: Connection, interval: float | None, header: Mapping[str, Any] | None = None
    ) -> None:
        self._conn, self._interval = conn, interval
        self._header = dict(header or {})
        self._header["op"] = HEARTBEAT
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._interval is not None and self._interval > 0:
            self._thread = threading.Thread(target=self._beat, name="deepspark-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        assert self._interval is not None
        while not self._stopped.wait(self._interval):
            try:
                self._conn.send(self._header)
            except OSError:
                return  # the other side hung up: the main thread finds out on its next send or receive

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self._interval)


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


class Server:
    """A TCP server that serves only peers holding ``token``, one daemon thread per connection.

    Within ``handshake_timeout`` seconds a peer must send one frame of at most :data:`MAX_HELLO` bytes
    whose header is ``{"op": "hello", "token": ..., ...}``; the server answers ``{"op": "welcome"}`` and
    calls ``handler(connection)`` in that connection's thread, closing the connection when the handler
    returns or raises (an exception is logged; it never stops the server). Any other peer (no token, a
    wrong one, an oversized frame, silence) is closed at once; each kind of rejection is logged at
    WARNING the first time, then at DEBUG. Past ``max_connections`` live connections, a new one takes the
    place of the oldest that has not sent its hello yet (which is closed), and is closed itself only when
    every live connection has: connections that never authenticate (a port scanner, a flood) cannot keep
    the workers out for ``handshake_timeout``.

    The constructor only checks its arguments; :meth:`start` binds a free port on ``bind`` and starts
    accepting. :meth:`close` is idempotent: it stops accepting and closes every live connection.
    """

    def __init__(
        self,
        *,
        token: str,
        handler: Callable[[Connection], None],
        bind: str = "127.0.0.1",
        max_connections: int = 256,
        handshake_timeout: float = 10.0,
        name: str = "deepspark-server",
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token: expected a non-empty string")
        if not callable(handler):
            raise TypeError(f"handler: expected a callable handler(connection), got {handler!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections: expected an integer >= 1, got {max_connections!r}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout: expected a positive number, got {handshake_timeout!r}")
        self._token = token.encode("utf-8")
        self._handler = handler
        self._bind = bind
        self._max_connections = max_connections
        self._handshake_timeout = float(handshake_timeout)
        self._name = name
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._live: dict[socket.socket, Connection | None] = {}  # None while the hello is awaited
        self._evicted: set[socket.socket] = set()  # awaiting their hello, closed to make room
        self._evicted_reason = f"no hello yet when the server was full ({max_connections} live)"
        self._threads: set[threading.Thread] = set()
        self._warned: set[str] = set()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on (known once :meth:`start` has run)."""
        if self._listener is None:
            raise RuntimeError(f"{self._name}: address is known only after start()")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: start() after close()")
            if self._listener is not None:
                raise RuntimeError(f"{self._name}: already started")
            self._listener = socket.create_server((self._bind, 0), backlog=128)
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(self._listener,), name=f"{self._name}-accept", daemon=True
            )
        self._accept_thread.start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
            live = list(self._live.items())
            threads = list(self._threads)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()
        for sock, conn in live:
            if conn is not None:
                conn.close()
            else:
                _shutdown(sock)
        current = threading.current_thread()
        deadline = time.monotonic() + _JOIN_S
        for thread in [self._accept_thread, *threads]:
            if thread is not None and thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------- internals
    def _reject(self, sock: socket.socket, peer: str, reason: str) -> None:
        with self._lock:
            closing = self._closed
            first = reason not in self._warned
            self._warned.add(reason)
        if not closing:  # else close() cut the handshake short: not the peer's fault
            # Logged before the socket closes, so a peer that sees the close sees a logged rejection
            # (the first one of a reason is the WARNING, also when the next peer is quick).
            _log.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: closed a connection from %s: %s",
                self._name,
                peer,
                reason,
            )
        _shutdown(sock)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._closed:
                    return
                _log.exception("%s: accept failed", self._name)
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            peer = _peer_name(sock)
            evict: socket.socket | None = None
            with self._lock:
                if self._closed:
                    full = False
                    closed = True
                else:
                    closed = False
                    full = len(self._live) - len(self._evicted) >= self._max_connections
                    if full:  # the oldest connection still awaiting its hello makes room, if any
                        evict = next(
                            (s for s, c in self._live.items() if c is None and s not in self._evicted), None
                        )
                        if evict is not None:
                            self._evicted.add(evict)
                            full = False
                    if not full:
                        self._live[sock] = None
                        thread = threading.Thread(
                            target=self._serve, args=(sock, peer), name=f"{self._name}-{peer}", daemon=True
                        )
                        self._threads.add(thread)
            if closed:
                _shutdown(sock)
                return
            if full:
                self._reject(sock, peer, f"more than {self._max_connections} live connections")
                continue
            if evict is not None:  # its handshake fails at once and says why; its own thread closes it
                with contextlib.suppress(OSError):
                    evict.shutdown(socket.SHUT_RDWR)
            thread.start()

    def _handshake(self, sock: socket.socket, peer: str) -> Connection | None:
        deadline = time.monotonic() + self._handshake_timeout
        try:
            header, _, received = _recv_frame(sock, MAX_HELLO, deadline)
        except _TooBig:
            self._reject(sock, peer, f"a first frame over the {MAX_HELLO}-byte hello limit")
            return None
        except TimeoutError:
            self._reject(sock, peer, f"no hello within {self._handshake_timeout:g} s")
            return None
        except (OSError, ProtocolError) as exc:
            with self._lock:
                evicted = sock in self._evicted
            self._reject(
                sock, peer, self._evicted_reason if evicted else f"no valid hello ({type(exc).__name__})"
            )
            return None
        token = header.get("token")
        if header.get("op") != "hello" or not isinstance(token, str):
            self._reject(sock, peer, "a first frame that is not a hello with a token")
            return None
        if not hmac.compare_digest(token.encode("utf-8"), self._token):
            self._reject(sock, peer, "a hello with the wrong token")
            return None
        _tune(sock)
        sock.settimeout(None)
        conn = Connection(sock, hello={k: v for k, v in header.items() if k != "token"}, peer=peer)
        conn.bytes_received = received
        with self._lock:  # from here on it is no longer the oldest unauthenticated one to make room
            evicted = sock in self._evicted
            if not evicted:
                self._live[sock] = conn
        if evicted:
            self._reject(sock, peer, self._evicted_reason)
            return None
        try:
            conn.send({"op": "welcome"})
        except OSError:
            conn.close()
            return None
        return conn

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn: Connection | None = None
        try:
            conn = self._handshake(sock, peer)
            if conn is None:
                return
            with self._lock:  # _handshake has made it live
                if self._closed:
                    return
            try:
                self._handler(conn)
            except (PeerClosed, ConnectionResetError, BrokenPipeError) as exc:
                # The peer went away (its task failed or was cancelled; Ctrl-C): the handler's owner says
                # what that costs (a lost worker, a restarted gang), so here it is one line at info.
                level = logging.DEBUG if self._closed else logging.INFO
                _log.log(level, "%s: the connection of %s ended: %s", self._name, peer, exc)
            except OSError as exc:  # ProtocolError included: a frame not of ours, too big, ...
                level = logging.DEBUG if self._closed else logging.WARNING
                _log.log(level, "%s: the connection of %s failed: %s", self._name, peer, exc)
            except Exception:
                _log.exception("%s: the handler of %s raised", self._name, peer)
        finally:
            if conn is not None:
                conn.close()
            else:
                sock.close()
            with self._lock:
                self._live.pop(sock, None)
                self._evicted.discard(sock)
                self._threads.discard(threading.current_thread())


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def connect(
    host: str, port: int, *, token: str, hello: Mapping[str, Any], timeout: float = 60.0
) -> Connection:
    """Connect to a :class:`Server`, say hello with ``token`` and wait for the welcome.

    Raises :class:`ProtocolError` if the server refuses (a wrong token, say) or closes; the returned
    connection has TCP keepalive on and blocks without a timeout.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        _tune(sock)
        greeting = {**hello, "op": "hello", "token": token}
        sent = send(sock, greeting)
        try:
            answer, _, received = _recv_frame(sock, MAX_HELLO)
        except (ConnectionResetError, BrokenPipeError, ProtocolError) as exc:
            raise ProtocolError(f"{host}:{port} refused the connection (wrong token?): {exc}") from exc
        if answer.get("op") != "welcome":
            raise ProtocolError(f"{host}:{port} answered the hello with {answer!r}, not a welcome")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    conn = Connection(sock, hello={k: v for k, v in greeting.items() if k != "token"}, peer=f"{host}:{port}")
    conn.bytes_sent, conn.bytes_received = sent, received
    return conn
