"""The wire format between the driver's trial coordinator and trial workers in Spark tasks.

Length-prefixed JSON frames over TCP: 4 bytes big-endian length, then UTF-8 JSON. JSON, never pickle:
a message can only ever be data. Model files travel base64-encoded inside a frame.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["MAX_FRAME", "ProtocolError", "recv", "send"]

MAX_FRAME = 1 << 30
_HEADER = struct.Struct(">I")


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of ours, or closed the connection mid-frame."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":"), allow_nan=True).encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks += chunk
    return bytes(chunks)


def recv(sock: socket.socket) -> dict[str, Any]:
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    message = json.loads(_recv_exact(sock, length).decode("utf-8"))
    if not isinstance(message, dict):
        raise ProtocolError("expected a JSON object")
    return message
