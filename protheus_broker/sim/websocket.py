"""A minimal RFC 6455 WebSocket for the sample HTTP AppServer: the handshake key, frame parsing and
encoding (text/binary, fragmentation, masking, ping/pong, close) and an echo protocol.

Small on purpose: the sim's ``/ws`` echoes what it gets, so the broker's 101 relay can be tested
byte-exact and a browser can hold a WebSocket open through it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL = frozenset({CLOSE, PING, PONG})
DATA = frozenset({TEXT, BINARY})
#: Close codes used here (RFC 6455 section 7.4.1).
NORMAL, PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1000, 1002, 1007, 1009


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def valid_key(key: bytes | None) -> bool:
    """A ``Sec-WebSocket-Key`` is base64 of 16 bytes."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def mask_bytes(mask: bytes, payload: bytes) -> bytes:
    """XOR *payload* with the 4-byte *mask* (masking and unmasking are the same)."""
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; a client passes a 4-byte *mask* (``os.urandom(4)``), a server none."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    masked = 0x80 if mask is not None else 0
    if length < 126:
        header = struct.pack("!BB", first, masked | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, masked | 126, length)
    else:
        header = struct.pack("!BBQ", first, masked | 127, length)
    if mask is None:
        return header + payload
    return header + mask + mask_bytes(mask, payload)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked frame as a client sends it."""
    return encode_frame(opcode, payload, fin, mask=os.urandom(4))


def close_payload(code: int, reason: str = "") -> bytes:
    """The body of a close frame."""
    return struct.pack("!H", code) + reason.encode()[:120]


class WebSocketError(Exception):
    """The peer broke the protocol: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """One parsed (unmasked) frame."""

    fin: bool
    opcode: int
    payload: bytes


class FrameParser:
    """Bytes in, frames out; checks what RFC 6455 requires of the peer.

    *expect_masked*: a server gets masked frames only, a client unmasked ones."""

    def __init__(self, expect_masked: bool = True, max_payload: int = 1 << 24) -> None:
        self.expect_masked = expect_masked
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Every complete frame in what has arrived; raises WebSocketError on a bad one."""
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin, opcode, masked, length = bool(first & 0x80), first & 0x0F, bool(second & 0x80), second & 0x7F
        if first & 0x70:
            raise WebSocketError(PROTOCOL_ERROR, "reserved bits set without an extension")
        if opcode not in DATA | CONTROL | {CONTINUATION}:
            raise WebSocketError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if masked != self.expect_masked:
            raise WebSocketError(PROTOCOL_ERROR, "client frames must be masked" if self.expect_masked
                                 else "server frames must not be masked")
        if opcode in CONTROL and (length > 125 or not fin):
            raise WebSocketError(PROTOCOL_ERROR, "control frames are short and not fragmented")
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            offset = 10
        if length > self.max_payload:
            raise WebSocketError(TOO_BIG, f"frame of {length} bytes is over {self.max_payload}")
        mask = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            mask = bytes(buffer[offset:offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset:offset + length])
        del buffer[:offset + length]
        return Frame(fin, opcode, mask_bytes(mask, payload) if masked else payload)


class MessageAssembler:
    """Frames in, whole messages and control frames out (fragmented messages joined)."""

    def __init__(self, max_message: int = 1 << 24) -> None:
        self.max_message = max_message
        self._opcode: int | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, frame: Frame) -> tuple[int, bytes] | None:
        """``(opcode, payload)`` when a message or control frame is complete, else None."""
        if frame.opcode in CONTROL:
            return frame.opcode, frame.payload
        if frame.opcode == CONTINUATION:
            if self._opcode is None:
                raise WebSocketError(PROTOCOL_ERROR, "continuation frame without a message")
        elif self._opcode is not None:
            raise WebSocketError(PROTOCOL_ERROR, "new message inside a fragmented one")
        else:
            self._opcode = frame.opcode
        self._parts.append(frame.payload)
        self._size += len(frame.payload)
        if self._size > self.max_message:
            raise WebSocketError(TOO_BIG, f"message over {self.max_message} bytes")
        if not frame.fin:
            return None
        opcode, payload = self._opcode, b"".join(self._parts)
        self._opcode, self._parts, self._size = None, [], 0
        if opcode == TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError(INVALID_DATA, "text message is not UTF-8") from None
        return opcode, payload


class WebSocketEcho(Protocol):
    """Server side of ``/ws``: echoes each text/binary message with its type, answers pings,
    returns the peer's close and closes the connection."""

    transport: Any

    def __init__(self, name: str = "sim", max_message: int = 1 << 24) -> None:
        self.name = name
        self.parser = FrameParser(expect_masked=True, max_payload=max_message)
        self.messages = MessageAssembler(max_message)
        self.closing = False
        self.echoed = 0

    def connectionMade(self) -> None:
        # Echoes that back up pause reading from this client.
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            for frame in self.parser.feed(data):
                message = self.messages.add(frame)
                if message is not None:
                    self.handle(*message)
                    if self.closing:
                        return
        except WebSocketError as error:
            log.info("sim {name}: WebSocket closed: {reason}", name=self.name, reason=error.reason)
            self.close(error.code, error.reason)

    def handle(self, opcode: int, payload: bytes) -> None:
        """One message or control frame."""
        if opcode in DATA:
            self.echoed += 1
            self.transport.write(encode_frame(opcode, payload))
        elif opcode == PING:
            self.transport.write(encode_frame(PONG, payload))
        elif opcode == CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else NORMAL
            self.close(code if len(payload) >= 2 else None)

    def close(self, code: int | None, reason: str = "") -> None:
        """Send our close frame (echoing the peer's code) and close after it is flushed."""
        self.closing = True
        self.transport.write(encode_frame(CLOSE, close_payload(code, reason) if code is not None else b""))
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        self.closing = True
