"""deepspark.wire: frames, the token handshake and the server's rejections, over real sockets (no Spark)."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from deepspark import wire

TOKEN = "s3cret-token"
WAIT = 5.0  # the most any test waits for something that should happen at once


def _echo(conn: wire.Connection) -> None:
    while True:
        try:
            header, payload = conn.recv()
        except (wire.ProtocolError, OSError):
            return
        conn.send({**header, "echo": True}, payload)


@pytest.fixture
def server() -> Iterator[wire.Server]:
    with wire.Server(token=TOKEN, handler=_echo, handshake_timeout=0.5, name="test-wire") as srv:
        yield srv


def _client(srv: wire.Server, **hello: object) -> wire.Connection:
    host, port = srv.address
    return wire.connect(host, port, token=TOKEN, hello={"role": "test", **hello}, timeout=WAIT)


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within WAIT seconds (EOF or reset, never a reply)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("size", [0, 1, 3 << 20])
def test_frame_round_trip_keeps_header_and_binary_payload(size: int) -> None:
    payload = os.urandom(size)
    a, b = socket.socketpair()
    with a, b:
        received: list[tuple[dict, bytes]] = []
        reader = threading.Thread(target=lambda: received.append(wire.recv(b)))
        reader.start()
        written = wire.send(a, {"op": "model", "n": 1, "x": [1.5, None, "é"]}, payload)
        reader.join(WAIT)
        [(header, data)] = received
    assert header == {"op": "model", "n": 1, "x": [1.5, None, "é"]}
    assert data == payload and isinstance(data, bytes)
    head = len(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    assert written == 12 + head + size


def test_send_accepts_bytearray_and_memoryview_payloads() -> None:
    a, b = socket.socketpair()
    with a, b:
        wire.send(a, {"i": 0}, bytearray(b"abc"))
        wire.send(a, {"i": 1}, memoryview(b"xyzw")[1:3])
        assert wire.recv(b) == ({"i": 0}, b"abc")
        assert wire.recv(b) == ({"i": 1}, b"yz")


def test_recv_refuses_an_oversized_frame_before_reading_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">IQ", 2, 1 << 40))  # claims a terabyte: must not be allocated
        with pytest.raises(wire.ProtocolError, match="exceeds"):
            wire.recv(b)
        a.sendall(struct.pack(">IQ", 2, 100) + b"{}")
        with pytest.raises(wire.ProtocolError, match="exceeds the 50-byte limit"):
            wire.recv(b, limit=50)


@pytest.mark.parametrize("head", [b"[1,2]", b"not json", b"\xff\xfe{}", b"[" * 50_000, b'{"a":' * 20_000])
def test_a_header_that_is_not_a_json_object_is_a_protocol_error(head: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">IQ", len(head), 0) + head)
        with pytest.raises(wire.ProtocolError):
            wire.recv(b)


def test_a_peer_closing_mid_frame_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack(">IQ", 2, 10) + b"{}abc")
        a.close()
        with pytest.raises(wire.ProtocolError, match="mid-frame"):
            wire.recv(b)


def test_protocol_error_is_a_connection_error() -> None:
    assert issubclass(wire.ProtocolError, ConnectionError)
    assert wire.MAX_FRAME == 1 << 30 and wire.MAX_HELLO == 64 << 10


# ----------------------------------------------------------------------------------------- server
def test_a_client_is_served_and_both_sides_count_bytes() -> None:
    seen: list[wire.Connection] = []
    done = threading.Event()

    def handler(conn: wire.Connection) -> None:
        seen.append(conn)
        _echo(conn)
        done.set()

    with wire.Server(token=TOKEN, handler=handler) as srv:
        payload = os.urandom(2 << 20)
        with _client(srv, slot=3) as conn:
            assert conn.hello == {"role": "test", "slot": 3, "op": "hello"}
            assert conn.peer == "{}:{}".format(*srv.address)
            handshake_sent, handshake_received = conn.bytes_sent, conn.bytes_received
            assert handshake_sent > 0 and handshake_received > 0
            sent = conn.send({"op": "put"}, payload)
            header, data = conn.recv()
            assert header == {"op": "put", "echo": True} and data == payload
            empty = conn.send({"op": "ping"})
            assert conn.recv() == ({"op": "ping", "echo": True}, b"")
            assert conn.bytes_sent == handshake_sent + sent + empty
            assert conn.bytes_received == handshake_received + (sent + len(',"echo":true')) + (
                empty + len(',"echo":true')
            )
        assert done.wait(WAIT)
    [server_side] = seen
    assert server_side.hello == {"role": "test", "slot": 3, "op": "hello"}  # never the token
    assert server_side.bytes_received == conn.bytes_sent
    assert server_side.bytes_sent == conn.bytes_received


def test_address_is_known_only_after_start() -> None:
    srv = wire.Server(token=TOKEN, handler=_echo)
    with pytest.raises(RuntimeError, match="after start"):
        _ = srv.address
    srv.close()
    srv.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token": ""}, "token"),
        ({"max_connections": 0}, "max_connections"),
        ({"handshake_timeout": 0}, "handshake_timeout"),
    ],
)
def test_server_checks_its_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        wire.Server(**{"token": TOKEN, "handler": _echo, **kwargs})


def _bad_no_token(sock: socket.socket) -> None:
    wire.send(sock, {"op": "hello", "slot": 0})


def _bad_wrong_token(sock: socket.socket) -> None:
    wire.send(sock, {"op": "hello", "token": "guess"})


def _bad_not_hello(sock: socket.socket) -> None:
    wire.send(sock, {"op": "next", "token": TOKEN})


def _bad_oversized(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">IQ", 16, 1 << 40))


def _bad_hello_just_over_the_limit(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">IQ", 2, wire.MAX_HELLO))


def _bad_silent(sock: socket.socket) -> None:
    pass


def _bad_nested_hello(sock: socket.socket) -> None:
    head = b"[" * (wire.MAX_HELLO - 16)  # json recurses per level: a RecursionError, not a ValueError
    sock.sendall(struct.pack(">IQ", len(head), 0) + head)


@pytest.mark.parametrize(
    "misbehave",
    [
        _bad_no_token,
        _bad_wrong_token,
        _bad_not_hello,
        _bad_oversized,
        _bad_hello_just_over_the_limit,
        _bad_silent,
        _bad_nested_hello,
    ],
)
def test_a_bad_peer_is_closed_quickly_while_a_legitimate_client_is_served(server, misbehave) -> None:
    good = _client(server)
    with good:
        assert good.send({"op": "a"}) and good.recv() == ({"op": "a", "echo": True}, b"")
        started = time.monotonic()
        with socket.create_connection(server.address, timeout=WAIT) as bad:
            misbehave(bad)
            assert _closed_by_server(bad)
        # handshake_timeout is 0.5 s: even the silent peer is gone well before WAIT.
        assert time.monotonic() - started < 3.0
        assert good.send({"op": "b"}, b"still here") and good.recv() == (
            {"op": "b", "echo": True},
            b"still here",
        )
    with _client(server) as later:  # and the server still accepts
        later.send({"op": "c"})
        assert later.recv() == ({"op": "c", "echo": True}, b"")


def test_connect_with_the_wrong_token_raises_protocol_error(server) -> None:
    host, port = server.address
    with pytest.raises(wire.ProtocolError, match="refused"):
        wire.connect(host, port, token="guess", hello={}, timeout=WAIT)


def test_rejections_are_warned_once_per_reason_then_logged_at_debug(server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="deepspark.wire")
    for _ in range(3):
        with socket.create_connection(server.address, timeout=WAIT) as bad:
            _bad_wrong_token(bad)
            assert _closed_by_server(bad)
    _until(lambda: len([r for r in caplog.records if "wrong token" in r.getMessage()]) == 3)
    levels = [r.levelno for r in caplog.records if "wrong token" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_deeply_nested_hello_is_a_logged_rejection_not_a_thread_traceback(server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="deepspark.wire")
    with socket.create_connection(server.address, timeout=WAIT) as bad:
        _bad_nested_hello(bad)
        assert _closed_by_server(bad)
    _until(lambda: any("no valid hello (ProtocolError)" in r.getMessage() for r in caplog.records))


def test_max_connections_is_enforced() -> None:
    release = threading.Event()

    def hold(conn: wire.Connection) -> None:
        release.wait(WAIT)

    with wire.Server(token=TOKEN, handler=hold, max_connections=2) as srv:
        first, second = _client(srv), _client(srv)
        with first, second:
            with pytest.raises(wire.ProtocolError):
                _client(srv)
            release.set()
        _until(lambda: _can_connect(srv))


def test_silent_connections_make_room_for_a_worker_but_authenticated_ones_never(caplog) -> None:
    """Past max_connections, the oldest connection that has not said hello is closed for a new one:
    a flood of silent connections (a port scanner) cannot keep the workers out for the handshake
    timeout (60 s here), while connections that did authenticate keep their place."""
    with wire.Server(token=TOKEN, handler=_echo, max_connections=2, handshake_timeout=60) as srv:
        silent = [socket.create_connection(srv.address, timeout=WAIT) for _ in range(2)]
        try:
            time.sleep(0.2)  # both accepted and awaiting their hello
            with _client(srv) as worker:  # before: "more than 2 live connections", closed at once
                assert _closed_by_server(silent[0])  # the oldest silent one made room
                late = socket.create_connection(srv.address, timeout=WAIT)
                silent.append(late)
                assert _closed_by_server(silent[1])  # the other silent one, not the worker
                worker.send({"op": "ping"})
                assert worker.recv()[0] == {"op": "ping", "echo": True}
                with _client(srv) as second:  # and late, still silent, makes room for a second worker
                    assert _closed_by_server(late)
                    second.send({"op": "ping"})
                    assert second.recv()[0]["echo"] is True
                    with pytest.raises(wire.ProtocolError):  # two authenticated: a third is refused
                        _client(srv)
        finally:
            for sock in silent:
                sock.close()
    assert any("no hello yet when the server was full (2 live)" in r.getMessage() for r in caplog.records)


def _can_connect(srv: wire.Server) -> bool:
    try:
        _client(srv).close()
    except wire.ProtocolError:
        return False
    return True


def test_a_handler_that_raises_is_logged_and_the_server_goes_on(caplog) -> None:
    calls: list[int] = []

    def flaky(conn: wire.Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        _echo(conn)

    with wire.Server(token=TOKEN, handler=flaky) as srv:
        # The server closes the connection once its handler has raised.
        with _client(srv) as conn, pytest.raises(wire.ProtocolError):
            conn.recv()
        with _client(srv) as conn:
            conn.send({"op": "x"})
            assert conn.recv() == ({"op": "x", "echo": True}, b"")
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "handler" in logged.getMessage() and logged.exc_info and str(logged.exc_info[1]) == "boom"


def test_a_peer_that_goes_away_is_one_info_line_not_a_traceback(caplog) -> None:
    # A worker task that dies (or is cancelled by Ctrl-C) closes its connection while the handler reads.
    done = threading.Event()

    def reader(conn: wire.Connection) -> None:
        try:
            conn.recv()
        finally:
            done.set()

    caplog.set_level(logging.INFO, logger="deepspark.wire")
    with wire.Server(token=TOKEN, handler=reader) as srv:
        with _client(srv):
            pass
        assert done.wait(10)
        deadline = time.monotonic() + 10  # the log call follows the handler's return
        while not [r for r in caplog.records if "ended" in r.getMessage()] and time.monotonic() < deadline:
            time.sleep(0.01)
    [logged] = [r for r in caplog.records if r.name == "deepspark.wire"]
    assert logged.levelno == logging.INFO and logged.exc_info is None
    assert "connection of" in logged.getMessage() and "closed by peer" in logged.getMessage()


def test_close_ends_the_connections_of_live_handlers() -> None:
    ended: list[BaseException] = []
    entered = threading.Event()

    def blocked(conn: wire.Connection) -> None:
        entered.set()
        try:
            conn.recv()  # the client never sends: only close() can end this
        except (wire.ProtocolError, OSError) as exc:
            ended.append(exc)

    srv = wire.Server(token=TOKEN, handler=blocked)
    srv.start()
    address = srv.address
    client = _client(srv)
    with client:
        assert entered.wait(WAIT)
        srv.close()
        assert len(ended) == 1  # close() waited for the handler to see its connection end
        client.settimeout(WAIT)
        with pytest.raises((wire.ProtocolError, ConnectionResetError)):
            client.recv()
    srv.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):  # it stopped accepting
        socket.create_connection(address, timeout=WAIT).close()


def test_peer_closed_sees_a_hang_up_without_reading() -> None:
    waiting = threading.Event()
    result: list[bool] = []

    def handler(conn: wire.Connection) -> None:
        conn.recv()
        before = conn.peer_closed()
        waiting.set()
        _until(conn.peer_closed)
        result.extend([before, conn.peer_closed()])

    with wire.Server(token=TOKEN, handler=handler) as srv:
        client = _client(srv)
        client.send({"op": "next"})
        assert waiting.wait(WAIT)
        client.close()
        _until(lambda: len(result) == 2)
    assert result == [False, True]


# -------------------------------------------------------------------------------------- deliver
def _pair() -> tuple[wire.Connection, socket.socket]:
    """A connection and its peer's bare socket (a socketpair: small buffers, the same on every host)."""
    mine, theirs = socket.socketpair()
    return wire.Connection(mine, hello={}, peer="pair"), theirs


def test_deliver_gives_up_on_a_peer_that_reads_nothing() -> None:
    conn, peer = _pair()
    with conn, peer:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            wire.deliver(conn, {"op": "round"}, bytes(8 << 20), 0.5)
        assert time.monotonic() - started < WAIT


def test_deliver_waits_on_a_slow_peer_that_keeps_reading() -> None:
    # The peer pauses 0.15 s after each MB: 10 MB take it about 1.5 s, longer than the timeout, but it
    # is never silent for the timeout. A socket timeout on sendall is a deadline for the whole frame.
    conn, peer = _pair()
    payload = bytes(range(256)) * (10 << 12)
    received = bytearray()

    def read_slowly() -> None:
        peer.settimeout(WAIT)
        while chunk := peer.recv(1 << 20):
            if len(received) >> 20 != (len(received) + len(chunk)) >> 20:
                time.sleep(0.15)
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        with conn:
            sent = wire.deliver(conn, {"op": "round"}, payload, 1.0)
    finally:
        reader.join(WAIT)
        peer.close()
    assert len(received) == sent and received.endswith(payload)


def test_peer_closed_never_waits_for_data_the_connection_s_reader_took() -> None:
    """The coordinator checks a slot holder's connection (``peer_closed``) under its lock from another
    thread, while that connection's reader needs the lock to answer the frame it just read: a check that
    peeked with a blocking read after its reader took the data waited for the peer's next frame, which
    never came (a speculative copy's standby stalled the coordinator until the worker timed out)."""
    lock = threading.Lock()
    served: queue.Queue[wire.Connection] = queue.Queue()
    stop, answered = threading.Event(), threading.Event()
    closed_said: list[bool] = []

    def answer(conn: wire.Connection) -> None:
        served.put(conn)
        while True:
            try:
                header, _ = conn.recv()
            except (wire.ProtocolError, OSError):
                return
            with lock:  # as the coordinator answers a frame
                conn.send(header)

    def check(conn: wire.Connection) -> None:
        while not stop.is_set():
            with lock:  # as a standby copy checks the slot's holder
                if conn.peer_closed():
                    closed_said.append(True)

    def ping(client: wire.Connection) -> None:
        for i in range(3000):  # each answered at once, unless a check holds the lock waiting for data
            client.send({"op": "ping", "i": i})
            if client.recv()[0]["i"] != i:
                return
        answered.set()

    with wire.Server(token=TOKEN, handler=answer) as srv, _client(srv) as client:
        checker = threading.Thread(target=check, args=(served.get(timeout=WAIT),), daemon=True)
        pinger = threading.Thread(target=ping, args=(client,), daemon=True)
        checker.start()
        pinger.start()
        try:
            assert answered.wait(6 * WAIT), "a peer_closed() check waited for data its reader had taken"
        finally:
            stop.set()
            checker.join(WAIT)  # before the connections close
    assert not closed_said  # the peer was there all along
