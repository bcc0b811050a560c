"""The replay buffer: bytes sent on a resumable stream but not yet acknowledged by the peer.

Positions count the stream's bytes from 0; the end of the stream (EOF) takes one more position, so
"acknowledged up to N" also says whether the EOF arrived.  No I/O: the link code appends what it
sends, drops what the peer acknowledges and, on a resume, replays from the peer's position.
"""

from __future__ import annotations

from collections import deque


class ReplayError(Exception):
    """The peer named a position we cannot serve (beyond what was sent, or already freed): the
    session cannot continue without loss."""


class ReplayBuffer:
    """Unacknowledged bytes, addressed by stream position; ``full`` at *limit* bytes held."""

    __slots__ = ("limit", "base", "size", "eof", "eof_acknowledged", "_chunks")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.base = 0  # position of the first byte held
        self.size = 0  # bytes held
        self.eof = False  # the stream ends after the bytes held
        self.eof_acknowledged = False
        self._chunks: deque[bytes] = deque()

    @property
    def end(self) -> int:
        """Position after everything sent, the EOF included."""
        return self.base + self.size + (1 if self.eof else 0)

    @property
    def full(self) -> bool:
        """The source must stop reading until acknowledgements free space."""
        return self.size >= self.limit

    def append(self, data: bytes) -> None:
        if self.eof:
            raise ReplayError("data after the end of the stream")
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def close(self) -> None:
        """The stream ends after what was appended."""
        self.eof = True

    def ack(self, position: int) -> int:
        """The peer holds everything before *position*: free it; returns the bytes freed.

        An older acknowledgement than one already seen is harmless (it is ignored)."""
        if position > self.end:
            raise ReplayError(f"acknowledged position {position} is beyond what was sent ({self.end})")
        if position <= self.base:
            return 0
        if self.eof and position == self.end:
            self.eof_acknowledged = True
            position -= 1
        drop = position - self.base
        freed = drop
        chunks = self._chunks
        while drop:
            head = chunks[0]
            if len(head) <= drop:
                chunks.popleft()
                drop -= len(head)
            else:
                chunks[0] = head[drop:]
                drop = 0
        self.base = position
        self.size -= freed
        return freed

    def check(self, position: int) -> None:
        """:class:`ReplayError` unless a peer holding everything before *position* can be served."""
        if position > self.end:
            raise ReplayError(f"peer claims position {position}, beyond what was sent ({self.end})")
        if position < self.base:
            raise ReplayError(f"peer claims position {position}, but {self.base} was acknowledged")

    def since(self, position: int) -> tuple[list[bytes], bool]:
        """What to resend to a peer that holds everything before *position*: (chunks, eof)."""
        self.check(position)
        skip = position - self.base
        out: list[bytes] = []
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            out.append(chunk[skip:] if skip else chunk)
            skip = 0
        return out, self.eof and position < self.end
