# -*- test-case-name: tests.test_bodyhash -*-
"""DKIM body hashes (RFC 6376 3.4.3, 3.4.4, 3.7), streamed, one pass for all signatures.

Computed here rather than by dkimpy because dkimpy canonicalizes and hashes
the whole body again for every signature, from a copy of the body it holds
in memory: ten signatures with a bogus ``bh=`` over a 24 MiB body cost 52 s
of CPU and 1.5 GB of memory (security review, issue 9).  Here the body is
read once, in chunks, from the spool; each canonicalization runs once and
feeds one digest per distinct (hash, ``l=``) among the signatures.

The body is canonicalized in pieces of ``PIECE`` octets, with bytes methods
only (``translate``, ``replace``, ``in``), never a regular expression that
makes an object per match: ``re.sub(rb"[\t ]+", b" ")`` over a megabyte of
text makes one per space, 38 MiB of them, and holds the GIL all the while
(the reactor thread stalled 50-120 ms at a time for the dkim-bh attack of
bench/abuse.py).  Each piece's digest update is large enough for hashlib to
release the GIL, so the hashing itself runs beside the reactor.

The output is byte for byte what dkimpy's ``canonicalize_body`` gives
(tests.test_bodyhash compares them over random bodies and chunkings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["BodyHashKey", "BodyHashes", "BodyHashStopped", "body_hashes"]

# Octets canonicalized and hashed at a time: far above the 2 KiB from which
# hashlib releases the GIL, and small enough that a piece and its few
# transient copies stay below glibc's default mmap threshold (128 KiB), so
# they reuse the thread's heap instead of growing it.  Also how often the
# ``stop`` callback is asked.
PIECE = 64 * 1024
# RFC 6376 3.4.4 (relaxed): a TAB is WSP like SP; once each is an SP, runs
# of SP are halved until none is left and SP before CRLF dropped.
_TAB_TO_SP = bytes.maketrans(b"\t", b" ")
# Held-back empty lines are hashed in pieces of this many CRLFs.
_CRLF_PIECE = 32 * 1024
HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


class BodyHashStopped(Exception):
    """``stop()`` said nobody wants the hashes any more (deadline, hang-up)."""


@dataclass(frozen=True)
class BodyHashKey:
    """What a body hash depends on: c= (body part), the hash of a=, and l=."""

    relaxed: bool
    hash: str  # "sha1" | "sha256"
    length: int | None  # l=; None: the whole body


@dataclass(frozen=True)
class BodyHashes:
    """The digests of one body, and its canonical length per canonicalization."""

    digests: dict[BodyHashKey, bytes]
    canonical_length: dict[bool, int]  # relaxed -> octets of the canonical body
    truncated: bool  # the body was longer than ``limit``: digests cover a canonical prefix only


def _trailing_crlfs(piece: bytes) -> int:
    """How many CRLF pairs end ``piece``: the empty lines that may end the body."""
    if not piece.endswith(b"\r\n"):
        return 0
    # The run of CRs and LFs at the end, looked for in a growing window:
    # rstrip over the whole piece would copy all of it.
    window = 64
    while True:
        tail = piece[-window:]
        kept = len(tail.rstrip(b"\r\n"))
        if kept or window >= len(piece):
            break
        window *= 4
    tail = tail[kept:]  # CRs and LFs only
    # The CRLF pairs run back from the end to where two equal characters meet.
    start = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1
    return (len(tail) - start) // 2


class _Digest:
    """A hash of the first ``limit`` canonical octets (all without ``l=``)."""

    def __init__(self, algorithm: str, limit: int | None) -> None:
        self.hash = HASHES[algorithm]()
        self.room = limit

    def update(self, data: bytes | memoryview) -> None:
        if self.room is None:
            self.hash.update(data)
        elif self.room > 0:
            if len(data) > self.room:
                data = memoryview(data)[: self.room]
            self.hash.update(data)
            self.room -= len(data)


class _Canonicalizer:
    """One body canonicalization over a stream of chunks, feeding its digests.

    Chunks are cut only where the result cannot depend on what follows: not
    inside a run of WSP, not between CR and LF.  Empty lines are held back
    as a count (RFC 6376 3.4.3: empty lines at the end are ignored), so a
    body of nothing but CRLFs costs no memory.
    """

    def __init__(self, relaxed: bool, digests: list[_Digest]) -> None:
        self.relaxed = relaxed
        self.digests = digests
        self.length = 0  # canonical octets emitted
        self._carry = b""
        self._held = 0  # CRLFs not yet emitted: the body may end with them

    def update(self, data: bytes | memoryview) -> None:
        buf = self._carry + data if self._carry else bytes(data)
        end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        if self.relaxed:
            if b"\t" in buf:
                buf = buf.translate(_TAB_TO_SP)
            cut = len(buf[:end].rstrip(b" ")) if end else 0
            # A run of WSP anywhere becomes one SP or nothing: one SP stands for it.
            self._carry = (b" " if cut < end else b"") + buf[end:]
            piece = buf[:cut]
            # Most text has single spaces only, base64 none: nothing to change.
            # Each pass halves every run, so a piece of n spaces takes log2(n).
            while b"  " in piece:
                piece = piece.replace(b"  ", b" ")
            if b" \r\n" in piece:
                piece = piece.replace(b" \r\n", b"\r\n")
        else:
            self._carry = buf[end:]
            piece = buf[:end]
        self._emit(piece)

    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        crlfs = _trailing_crlfs(piece)
        if 2 * crlfs == len(piece):
            self._held += crlfs
            return
        self._flush_held()
        self._out(memoryview(piece)[: len(piece) - 2 * crlfs])
        self._held = crlfs

    def _flush_held(self) -> None:
        while self._held:
            n = min(self._held, _CRLF_PIECE)
            self._out(b"\r\n" * n)
            self._held -= n

    def _out(self, data: bytes | memoryview) -> None:
        self.length += len(data)
        for digest in self.digests:
            digest.update(data)

    def finish(self) -> None:
        # A CR or a run of WSP that nothing followed is body content after all
        # (dkimpy, like RFC 6376 3.4.4, only strips WSP before a CRLF).
        carry, self._carry = self._carry, b""
        self._emit(carry)
        # RFC 6376 3.4.3: one CRLF ends the body, added if it had none; the
        # empty body is a lone CRLF (simple) or nothing at all (relaxed, 3.4.4).
        self._held = 0
        if self.length or not self.relaxed:
            self._out(b"\r\n")


def body_hashes(
    chunks: Iterable[bytes],
    keys: Iterable[BodyHashKey],
    limit: int | None = None,
    stop: Callable[[], bool] | None = None,
    *,
    piece: int = PIECE,
) -> BodyHashes:
    """Hash the body given as ``chunks`` once for every key, reading at most ``limit`` octets.

    ``stop()`` is asked before each ``piece`` octets are hashed; once it is
    true, `BodyHashStopped` is raised: a check past its deadline, or whose
    client hung up, stops within a piece instead of hashing 25 MiB for nobody.
    """
    keys = set(keys)
    digests = {key: _Digest(key.hash, key.length) for key in keys}
    canonicalizers = [
        _Canonicalizer(relaxed, [d for k, d in digests.items() if k.relaxed == relaxed])
        for relaxed in sorted({k.relaxed for k in keys})
    ]
    seen = 0
    truncated = False
    if canonicalizers:
        for chunk in chunks:
            if limit is not None and seen + len(chunk) > limit:
                chunk = chunk[: limit - seen]
                truncated = True
            seen += len(chunk)
            view = memoryview(chunk)
            for start in range(0, len(view), piece):
                if stop is not None and stop():
                    raise BodyHashStopped()
                for c in canonicalizers:
                    c.update(view[start : start + piece])
            if truncated:
                break
        for c in canonicalizers:
            if not truncated:
                c.finish()
            # else: what was emitted is exactly a prefix of the canonical body,
            # good for an l= that ends within it; nothing is guessed at the cut.
    return BodyHashes(
        {key: d.hash.digest() for key, d in digests.items()},
        {c.relaxed: c.length for c in canonicalizers},
        truncated,
    )
