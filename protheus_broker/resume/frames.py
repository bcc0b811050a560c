"""Frames of the resumable link between the connector and the broker: pure encoding and parsing.

A link starts with :data:`MAGIC` (sent by the connector, so the broker's first-bytes dispatcher can
tell it from a plain SmartClient), then both sides exchange frames::

    +--------+----------------------+-----------------+
    | kind 1 | payload length 4 (BE) | payload ...     |
    +--------+----------------------+-----------------+

No I/O here: :class:`FrameParser` takes bytes in any split and returns whole frames, so it can be
fuzzed.  The protocol is described in ``docs/resume-protocol.md``.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

#: First bytes of every connector link ("PRSM", protocol version 1).
MAGIC = b"PRSM/1\r\n"

HEADER = struct.Struct(">BI")
COUNT = struct.Struct(">Q")
HELLO = struct.Struct(">32sI")  # connector public key, connector buffer limit
WELCOME = struct.Struct(">16s32sII")  # session id, broker public key, window ms, buffer limit
RESUME = struct.Struct(">16s16s")  # session id, connector nonce
PROOF = struct.Struct(">32sQ")  # HMAC, bytes received

ID_SIZE = 16
NONCE_SIZE = 16
KEY_SIZE = 32
MAC_SIZE = 32

#: Largest payload a frame may carry (a DATA frame holds at most one socket read of 256 KiB).
MAX_PAYLOAD = 256 * 1024
#: Longest REFUSE/CLOSE reason accepted.
MAX_REASON = 200


class Kind(enum.IntEnum):
    """Frame kinds; the payload of each is in ``docs/resume-protocol.md``."""

    HELLO = 1  # connector -> broker: X25519 public key, buffer limit: open a new session
    WELCOME = 2  # broker -> connector: session id, broker public key, window ms, buffer limit
    RESUME = 3  # connector -> broker: session id, connector nonce
    CHALLENGE = 4  # broker -> connector: broker nonce
    PROOF = 5  # connector -> broker: HMAC, bytes received
    RESUMED = 6  # broker -> connector: HMAC, bytes received
    REFUSE = 7  # broker -> connector: reason (UTF-8); the link closes
    DATA = 8  # opaque stream bytes
    EOF = 9  # the sender's stream ends here (half-close); counts as one position
    ACK = 10  # u64: positions received so far
    PING = 11  # u64: positions received so far (keepalive and acknowledgement)
    CLOSE = 12  # reason (UTF-8): the session is over, both streams delivered as far as needed


class FrameError(Exception):
    """The peer sent something that is not a valid frame; the link must be dropped."""


class Frame(NamedTuple):
    kind: Kind
    payload: bytes


_FIXED_SIZES = {
    Kind.HELLO: HELLO.size,
    Kind.WELCOME: WELCOME.size,
    Kind.RESUME: RESUME.size,
    Kind.CHALLENGE: NONCE_SIZE,
    Kind.PROOF: PROOF.size,
    Kind.RESUMED: PROOF.size,
    Kind.EOF: 0,
    Kind.ACK: COUNT.size,
    Kind.PING: COUNT.size,
}
_KINDS = {int(k): k for k in Kind}


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(kind, len(payload)) + payload


def header(kind: Kind, length: int) -> bytes:
    """Just the header (DATA frames write it and the payload separately, saving a copy)."""
    return HEADER.pack(kind, length)


def count_frame(kind: Kind, position: int) -> bytes:
    return HEADER.pack(kind, COUNT.size) + COUNT.pack(position)


def reason_frame(kind: Kind, reason: str) -> bytes:
    return encode(kind, reason.encode("utf-8")[:MAX_REASON])


def decode_count(payload: bytes) -> int:
    return int(COUNT.unpack(payload)[0])


def decode_reason(payload: bytes) -> str:
    return payload.decode("utf-8", errors="replace")


class FrameParser:
    """Bytes in, whole frames out.  Raises :class:`FrameError` on the first invalid frame."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        size = len(buffer)
        while size - offset >= HEADER.size:
            code, length = HEADER.unpack_from(buffer, offset)
            kind = _KINDS.get(code)
            if kind is None:
                raise FrameError(f"unknown frame kind {code}")
            fixed = _FIXED_SIZES.get(kind)
            if fixed is not None and length != fixed:
                raise FrameError(f"{kind.name} frame of {length} bytes (must be {fixed})")
            if length > MAX_PAYLOAD:
                raise FrameError(f"{kind.name} frame of {length} bytes (at most {MAX_PAYLOAD})")
            if kind in (Kind.REFUSE, Kind.CLOSE) and length > MAX_REASON:
                raise FrameError(f"{kind.name} reason of {length} bytes (at most {MAX_REASON})")
            end = offset + HEADER.size + length
            if end > size:
                break
            frames.append(Frame(kind, bytes(buffer[offset + HEADER.size:end])))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


class MagicReader:
    """Checks the link's first bytes against :data:`MAGIC` before frames start."""

    __slots__ = ("_seen", "done")

    def __init__(self) -> None:
        self._seen = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Bytes after the magic (empty until it is complete); :class:`FrameError` if wrong."""
        if self.done:
            return data
        self._seen += data
        if len(self._seen) < len(MAGIC):
            if not MAGIC.startswith(self._seen):
                raise FrameError("not a resumable link (bad magic)")
            return b""
        if not self._seen.startswith(MAGIC):
            raise FrameError("not a resumable link (bad magic)")
        rest = self._seen[len(MAGIC):]
        self._seen = b""
        self.done = True
        return rest


def recognise(prefix: bytes) -> bool | None:
    """For the broker's first-bytes dispatcher: True if *prefix* opens a connector link."""
    if prefix.startswith(MAGIC):
        return True
    if MAGIC.startswith(prefix):
        return None
    return False
