"""Frames, magic and resume proofs of the resumable link: pure functions, fuzzed with hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.resume import crypto
from protheus_broker.resume.frames import (
    HEADER, HELLO, MAGIC, MAX_PAYLOAD, MAX_REASON, PROOF, RESUME, WELCOME, Frame, FrameError,
    FrameParser, Kind, MagicReader, count_frame, decode_count, encode, recognise, reason_frame,
)

_FIXED = {
    Kind.HELLO: HELLO.size, Kind.WELCOME: WELCOME.size, Kind.RESUME: RESUME.size,
    Kind.CHALLENGE: crypto.NONCE_SIZE, Kind.PROOF: PROOF.size, Kind.RESUMED: PROOF.size,
    Kind.EOF: 0, Kind.ACK: 8, Kind.PING: 8,
}


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(list(Kind)))
    if kind in _FIXED:
        size = _FIXED[kind]
        payload = draw(st.binary(min_size=size, max_size=size))
    elif kind in (Kind.REFUSE, Kind.CLOSE):
        payload = draw(st.binary(max_size=MAX_REASON))
    else:
        payload = draw(st.binary(max_size=3000))
    return Frame(kind, payload)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


class FrameParserTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(frames(), max_size=12), st.lists(st.integers(min_value=0), max_size=30))
    def test_any_split_of_the_stream_gives_the_same_frames(self, sent: list[Frame],
                                                           cuts: list[int]) -> None:
        """Frames encoded back to back and cut at any points come out whole, in order, once."""
        data = b"".join(encode(f.kind, f.payload) for f in sent)
        parser = FrameParser()
        got: list[Frame] = []
        for piece in split(data, cuts):
            got.extend(parser.feed(piece))
        self.assertEqual(got, sent)
        self.assertEqual(parser.pending, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames(), min_size=1, max_size=8), st.integers(min_value=0))
    def test_stream_cut_anywhere_keeps_only_whole_frames(self, sent: list[Frame], pick: int) -> None:
        """A link cut at any byte yields exactly the frames wholly before the cut, never a part."""
        wire = b"".join(encode(f.kind, f.payload) for f in sent)
        cut = pick % (len(wire) + 1)
        got = FrameParser().feed(wire[:cut])
        ends, total = [], 0
        for frame in sent:
            total += HEADER.size + len(frame.payload)
            ends.append(total)
        self.assertEqual(got, sent[:sum(1 for end in ends if end <= cut)])

    def test_unknown_kind_is_refused(self) -> None:
        """A kind byte we do not know is a protocol error naming it."""
        with self.assertRaisesRegex(FrameError, "unknown frame kind 99"):
            FrameParser().feed(HEADER.pack(99, 0))

    def test_wrong_fixed_size_is_refused(self) -> None:
        """A fixed-size frame of another size is refused before its payload arrives."""
        with self.assertRaisesRegex(FrameError, "ACK frame of 7 bytes"):
            FrameParser().feed(HEADER.pack(Kind.ACK, 7))

    def test_oversized_data_is_refused_from_the_header(self) -> None:
        """A DATA length over MAX_PAYLOAD is refused at once: nobody makes us buffer 4 GiB."""
        with self.assertRaisesRegex(FrameError, "at most"):
            FrameParser().feed(HEADER.pack(Kind.DATA, MAX_PAYLOAD + 1))
        with self.assertRaisesRegex(FrameError, "reason of"):
            FrameParser().feed(HEADER.pack(Kind.REFUSE, MAX_REASON + 1))

    def test_helpers_round_trip(self) -> None:
        """Counts and reasons encode and decode; long reasons are cut to MAX_REASON."""
        [ack] = FrameParser().feed(count_frame(Kind.ACK, 2**40 + 5))
        self.assertEqual(decode_count(ack.payload), 2**40 + 5)
        [refuse] = FrameParser().feed(reason_frame(Kind.REFUSE, "x" * 500))
        self.assertEqual(len(refuse.payload), MAX_REASON)


class MagicTests(SynchronousTestCase):
    @given(st.binary(max_size=40), st.lists(st.integers(min_value=0), max_size=6))
    def test_magic_in_any_split_then_the_rest(self, rest: bytes, cuts: list[int]) -> None:
        """The magic split anywhere is consumed; what follows comes out intact."""
        reader = MagicReader()
        out = b"".join(reader.feed(piece) for piece in split(MAGIC + rest, cuts))
        self.assertEqual(out, rest)
        self.assertTrue(reader.done)

    def test_wrong_magic_is_refused_at_the_first_wrong_byte(self) -> None:
        """A stream that is not ours fails as soon as it differs."""
        reader = MagicReader()
        self.assertEqual(reader.feed(MAGIC[:3]), b"")
        with self.assertRaisesRegex(FrameError, "bad magic"):
            reader.feed(b"X")

    def test_recognise_for_first_bytes(self) -> None:
        """True on the magic, None on a prefix of it, False otherwise (TLS, SmartClient)."""
        self.assertIs(recognise(MAGIC + b"\x01"), True)
        self.assertIsNone(recognise(MAGIC[:4]))
        self.assertIs(recognise(b"\x16\x03\x01"), False)


class CryptoTests(SynchronousTestCase):
    def test_both_sides_derive_the_same_secret(self) -> None:
        """X25519 + HKDF: the same 256-bit secret on both sides, different per session id."""
        connector, broker = crypto.KeyPair(), crypto.KeyPair()
        sid = crypto.new_session_id()
        secret = connector.secret(broker.public, sid)
        self.assertEqual(secret, broker.secret(connector.public, sid))
        self.assertEqual(len(secret) * 8, 256)
        self.assertNotEqual(secret, broker.secret(connector.public, crypto.new_session_id()))

    def test_unusable_public_key_is_a_value_error(self) -> None:
        """An all-zero (low-order) public key cannot be used."""
        with self.assertRaises(ValueError):
            crypto.KeyPair().secret(b"\0" * 32, b"s" * 16)

    def test_proof_binds_role_nonces_and_position(self) -> None:
        """Change any input and the proof changes: no reflection, replay or position edit."""
        args = (b"k" * 32, b"connector", b"i" * 16, b"c" * 16, b"b" * 16, 1000)
        base = crypto.proof(*args)
        for index, other in ((1, b"broker"), (3, b"C" * 16), (4, b"B" * 16), (5, 1001),
                             (0, b"K" * 32)):
            changed = list(args)
            changed[index] = other
            self.assertNotEqual(crypto.proof(*changed), base)  # type: ignore[arg-type]
        self.assertTrue(crypto.same(base, crypto.proof(*args)))
