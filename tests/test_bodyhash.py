# -*- test-case-name: tests.test_bodyhash -*-
"""The streamed DKIM body hash (mailx.checks.bodyhash) against dkimpy's own.

dkimpy's ``canonicalize_body`` over the whole body is the reference; ours
must give the same octets however the body is cut into chunks: a CRLF or a
run of whitespace split across two reads, trailing empty lines, bodies
without a final CRLF.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.checks import bodyhash
from mailx.checks.bodyhash import BodyHashKey, BodyHashStopped, body_hashes

# Pieces that make the canonicalizations' corner cases likely.
PIECES = [
    b"a", b"b c", b" ", b"\t", b"  \t ", b" " * 9, b"\t\t \t", b"\r\n", b"\r\n\r\n", b"\r",
    b"\n", b".", b"\xff",
]
bodies = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    out, previous = [], 0
    for point in points + [len(body)]:
        out.append(body[previous:point])
        previous = point
    return out


def reference(body: bytes, relaxed: bool, length: int | None) -> tuple[bytes, int]:
    canonical = (Relaxed if relaxed else Simple).canonicalize_body(body)
    signed = canonical if length is None else canonical[:length]
    return hashlib.sha256(signed).digest(), len(canonical)


class StreamedBodyHashTests(unittest.TestCase):
    @settings(max_examples=500, deadline=None)
    @given(
        body=bodies,
        cuts=st.lists(st.integers(0, 200), max_size=6),
        relaxed=st.booleans(),
        length=st.none() | st.integers(0, 60),
        piece=st.integers(1, 70),
    )
    def test_same_as_dkimpy_however_the_body_is_cut(
        self, body, cuts, relaxed, length, piece
    ) -> None:
        """Cut by the reads (``cuts``) and again into the pieces hashed at a time."""
        key = BodyHashKey(relaxed, "sha256", length)
        got = body_hashes(chunked(body, cuts), [key], piece=piece)
        digest, canonical_length = reference(body, relaxed, length)
        self.assertEqual(got.digests[key], digest)
        self.assertEqual(got.canonical_length[relaxed], canonical_length)

    @settings(max_examples=200, deadline=None)
    @given(
        lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
        blank=st.integers(0, 5),
        cuts=st.lists(st.integers(0, 400), max_size=8),
    )
    def test_crlf_lines_as_smtp_delivers_them(self, lines, blank, cuts) -> None:
        body = b"".join(line + b"\r\n" for line in lines) + b"\r\n" * blank
        keys = [BodyHashKey(r, "sha256", None) for r in (False, True)]
        got = body_hashes(chunked(body, cuts), keys)
        for key in keys:
            self.assertEqual(got.digests[key], reference(body, key.relaxed, None)[0])

    @settings(max_examples=20, deadline=None)
    @given(
        lines=st.lists(st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join), min_size=1),
        seed=st.integers(0, 2**32),
    )
    def test_reads_larger_than_a_piece(self, lines, seed) -> None:
        """Spool-sized reads of a body of several pieces, cut at the default piece size."""
        seed = random.Random(seed)
        body = b"".join(seed.choice(lines) + b"\r\n" for _ in range(4 * bodyhash.PIECE // 20))
        reads = chunked(body, [seed.randrange(len(body) + 1) for _ in range(3)])
        keys = [BodyHashKey(r, "sha256", None) for r in (False, True)]
        got = body_hashes(reads, keys)
        for key in keys:
            digest, canonical_length = reference(body, key.relaxed, None)
            self.assertEqual(got.digests[key], digest)
            self.assertEqual(got.canonical_length[key.relaxed], canonical_length)

    def test_stop_ends_the_hashing_within_a_piece(self) -> None:
        """A check past its deadline stops hashing: one more piece at most, not the body."""
        key = BodyHashKey(True, "sha256", None)
        asked = []

        def stop() -> bool:
            asked.append(True)
            return len(asked) > 3

        chunk = b"x" * (4 * bodyhash.PIECE)
        with self.assertRaises(BodyHashStopped):
            body_hashes([chunk] * 100, [key], stop=stop)
        self.assertEqual(len(asked), 4)  # three pieces hashed, then stopped

    def test_runs_of_white_space_cost_no_object_per_run(self) -> None:
        """Relaxed canonicalization of a megabyte with a run of WSP every few octets
        holds about a piece in memory (a regular expression's substitution made
        an object per run: 38 MiB for the dkim-bh attack's body)."""
        line = b"The quick brown fox  jumps over\tthe lazy dog;  \r\n"
        body = line * (1024 * 1024 // len(line))
        key = BodyHashKey(True, "sha256", None)
        tracemalloc.start()
        try:
            got = body_hashes([body], [key])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(got.digests[key], reference(body, True, None)[0])
        self.assertLess(peak, 16 * bodyhash.PIECE)

    def test_every_key_from_one_pass(self) -> None:
        body = b"Hello  there \r\n\r\n\r\n"
        keys = [
            BodyHashKey(False, "sha256", None),
            BodyHashKey(True, "sha256", None),
            BodyHashKey(True, "sha1", 5),
        ]
        reads = []

        def chunks():
            for c in (body[:7], body[7:]):
                reads.append(c)
                yield c

        got = body_hashes(chunks(), keys)
        self.assertEqual(len(reads), 2)
        self.assertEqual(got.digests[keys[0]], hashlib.sha256(b"Hello  there \r\n").digest())
        self.assertEqual(got.digests[keys[1]], hashlib.sha256(b"Hello there\r\n").digest())
        self.assertEqual(got.digests[keys[2]], hashlib.sha1(b"Hello").digest())

    def test_empty_lines_are_counted_not_kept(self) -> None:
        """A body of 8 MiB of CRLFs then one line: hashed right, in pieces."""
        key = BodyHashKey(True, "sha256", None)
        blank = b"\r\n" * (512 * 1024)
        body = [blank] * 8 + [b"x\r\n"]
        got = body_hashes(iter(body), [key])
        self.assertEqual(got.digests[key], hashlib.sha256(b"".join(body)).digest())

    def test_limit_stops_reading(self) -> None:
        key = BodyHashKey(False, "sha256", None)
        got = body_hashes(iter([b"a" * 10, b"b" * 10, b"c" * 10]), [key], limit=15)
        self.assertTrue(got.truncated)
        self.assertEqual(got.digests[key], hashlib.sha256(b"a" * 10 + b"b" * 5).digest())

    def test_prefix_under_a_limit_is_the_canonical_prefix(self) -> None:
        """An l= within what was read verifies even when the body was cut."""
        body = b"a   b  \r\n\r\nc\r\n"
        full = Relaxed.canonicalize_body(body)
        for limit in range(len(body)):
            read = body_hashes([body], [BodyHashKey(True, "sha256", None)], limit)
            key = BodyHashKey(True, "sha256", read.canonical_length[True])
            got = body_hashes([body], [key], limit)
            self.assertEqual(got.digests[key], hashlib.sha256(full[: key.length]).digest())

    def test_no_keys_reads_nothing(self) -> None:
        def chunks():
            raise AssertionError("read")
            yield b""

        self.assertEqual(body_hashes(chunks(), []).digests, {})
