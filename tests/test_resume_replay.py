"""The replay buffer: positions, acknowledgements, replay and its bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.resume.replay import ReplayBuffer, ReplayError


class ReplayBufferTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=50),
                              st.integers(min_value=0, max_value=100)), max_size=40),
           st.booleans(), st.integers(min_value=0))
    def test_replay_from_any_held_position_is_exactly_the_rest(self, steps: list, eof: bool,
                                                              pick: int) -> None:
        """After any sends and acknowledgements, replay from any position the peer may claim is
        the stream from there, the EOF included; the bytes held are only the unacknowledged."""
        buffer = ReplayBuffer(limit=10**6)
        stream = b""
        acked = 0
        for send, data, forward in steps:
            if send:
                buffer.append(data)
                stream += data
            else:
                position = min(acked + forward, len(stream))
                buffer.ack(position)
                acked = max(acked, position)
        if eof:
            buffer.close()
        end = len(stream) + (1 if eof else 0)
        self.assertEqual((buffer.base, buffer.size, buffer.end), (acked, len(stream) - acked, end))
        position = acked + pick % (end - acked + 1)
        chunks, replay_eof = buffer.since(position)
        self.assertEqual(b"".join(chunks), stream[position:])
        self.assertEqual(replay_eof, eof and position < end)

    def test_full_at_the_limit_and_freed_by_acks(self) -> None:
        """`full` says when the source must stop; acknowledgements free space."""
        buffer = ReplayBuffer(limit=100)
        buffer.append(b"a" * 60)
        self.assertFalse(buffer.full)
        buffer.append(b"b" * 40)
        self.assertTrue(buffer.full)
        self.assertEqual(buffer.ack(30), 30)
        self.assertFalse(buffer.full)
        self.assertEqual(buffer.ack(10), 0)  # an older acknowledgement is harmless
        self.assertEqual((buffer.base, buffer.size), (30, 70))

    def test_eof_takes_one_position(self) -> None:
        """Acknowledging the position after the last byte says the EOF arrived."""
        buffer = ReplayBuffer(limit=100)
        buffer.append(b"abc")
        buffer.close()
        self.assertEqual(buffer.end, 4)
        buffer.ack(3)
        self.assertFalse(buffer.eof_acknowledged)
        self.assertEqual(buffer.since(3), ([], True))
        buffer.ack(4)
        self.assertTrue(buffer.eof_acknowledged)
        self.assertEqual((buffer.size, buffer.since(4)), (0, ([], False)))
        with self.assertRaises(ReplayError):
            buffer.append(b"late")

    def test_positions_that_cannot_be_served_are_errors(self) -> None:
        """A peer claiming more than was sent, or less than it acknowledged, is refused."""
        buffer = ReplayBuffer(limit=100)
        buffer.append(b"0123456789")
        buffer.ack(5)
        with self.assertRaisesRegex(ReplayError, "beyond what was sent"):
            buffer.ack(11)
        with self.assertRaisesRegex(ReplayError, "beyond what was sent"):
            buffer.since(11)
        with self.assertRaisesRegex(ReplayError, "5 was acknowledged"):
            buffer.since(4)
