# -*- test-case-name: tests.test_bodyhash -*-
"""DKIM body hashes (RFC 6376 3.4.3, 3.4.4, 3.7), streamed, one pass for all signatures.

Computed here rather than by dkimpy because dkimpy canonicalizes and hashes
the whole body again for every signature, from a copy of the body it holds
in memory: ten signatures with a bogus ``bh=`` over a 24 MiB body cost 52 s
of CPU and 1.5 GB of memory (security review, issue 9).  Here the body is
read once, in chunks, from the spool; each canonicalization runs once and
feeds one digest per distinct (hash, ``l=``) among the signatures.

The output is byte for byte what dkimpy's ``canonicalize_body`` gives
(tests.test_bodyhash compares them over random bodies and chunkings).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BodyHashKey", "BodyHashes", "body_hashes"]

# RFC 6376 3.4.4 (relaxed): WSP at the end of a line goes, other runs of WSP
# become one space; both are what dkimpy's canonicalization module does.
_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]+")
# Held-back empty lines are hashed in pieces of this many CRLFs.
_CRLF_PIECE = 32 * 1024
HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


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
    tail = piece[len(piece.rstrip(b"\r\n")) :]  # CRs and LFs only
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

    def update(self, data: bytes) -> None:
        buf = self._carry + data if self._carry else data
        end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        if self.relaxed:
            cut = len(buf[:end].rstrip(b" \t")) if end else 0
            # A run of WSP anywhere becomes one SP or nothing: one SP stands for it.
            self._carry = (b" " if cut < end else b"") + buf[end:]
            piece = buf[:cut]
            # Most text has single spaces only, base64 none: nothing to change.
            if b"\t" in piece or b"  " in piece or b" \r\n" in piece:
                piece = _WSP_RUN.sub(b" ", _WSP_BEFORE_CRLF.sub(b"\r\n", piece))
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
    chunks: Iterable[bytes], keys: Iterable[BodyHashKey], limit: int | None = None
) -> BodyHashes:
    """Hash the body given as ``chunks`` once for every key, reading at most ``limit`` octets."""
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
            for c in canonicalizers:
                c.update(chunk)
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
