# -*- test-case-name: tests.test_delivery -*-
"""Message bodies in flight: in memory while small, on disk once large.

A message is streamed here as it arrives so that a 50 MiB message costs a
50 MiB file, not 50 MiB of RAM.  Small messages (the vast majority) stay in
memory below ``SPILL_AT``: creating, writing and unlinking a spool file for
each 1 KiB message would cost more than the Maildir write itself.  Nothing in
the incoming spool is ever acknowledged: the ``250`` comes only after the
Maildir copies are fsynced, so leftovers after a crash are discarded at
start-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Bounded memory per session: with the default 1000 connections the worst
# case is 256 MiB of bodies in RAM; one message never holds more than this.
SPILL_AT = 256 * 1024
READ_CHUNK = 1024 * 1024


def _open_spool_file(path: Path) -> BinaryIO:
    """A new, private (0600 from the start) spool file, buffered for big writes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return open(os.open(path, flags, 0o600), "wb", buffering=READ_CHUNK)


class SpoolBuffer:
    """An append-only byte sink that moves to a file past ``SPILL_AT`` bytes.

    A write that fails (ENOSPC, EIO, EDQUOT) does not raise out of the
    session's data path: the file is dropped at once, the rest of the
    message is only counted, and ``error`` says why, so the end of data
    answers 451 4.3.0 (SPEC section 5) and the session goes on.  Before,
    closing the half-written file in the error handler raised ENOSPC a
    second time and dropped the session mid-DATA.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self._directory = directory
        self._name = name
        self._chunks: list[bytes] = []
        self._held = 0
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self.error: OSError | None = None
        self._discarded = False

    def write(self, data: bytes) -> None:
        """Append; runs on the reactor thread (a page-cache write, no fsync)."""
        self.size += len(data)
        if self.error is not None or self._discarded:
            return  # a write after discard() must not spill into a new file nobody removes
        try:
            if self._file is not None:
                self._file.write(data)
                return
            self._chunks.append(data)
            self._held += len(data)
            if self._held > SPILL_AT:
                self.path = self._directory / self._name
                self._file = _open_spool_file(self.path)
                self._file.writelines(self._chunks)
                self._chunks = []
                self._held = 0
        except OSError as e:
            self._failed(e)

    def finish(self) -> None:
        """No more data: flush what the file object buffers (a failure sets ``error``)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as e:
                self._failed(e)

    def _failed(self, error: OSError) -> None:
        self.error = error
        self.discard()

    def chunks(self) -> Iterator[bytes]:
        """The contents again, in pieces of bounded size (safe in a worker thread)."""
        if self.error is not None:
            raise OSError(self.error.errno, f"spool file lost: {self.error.strerror}")
        if self.path is None:
            yield from self._chunks
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk

    def contents(self) -> bytes:
        return b"".join(self.chunks())

    def discard(self) -> None:
        """Drop the contents for good (later writes are only counted); never raises
        (it runs in error handlers)."""
        self._discarded = True
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()  # flushing a full disk's buffer fails again: nothing to keep
            except OSError:
                pass
        self._chunks = []
        self._held = 0
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def clean_incoming(directory: Path) -> int:
    """Remove bodies of sessions that died before their ``250``; returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed += 1
    return removed
