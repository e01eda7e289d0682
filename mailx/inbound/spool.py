# -*- test-case-name: tests.test_smtp,tests.test_hardening -*-
"""Message bodies in flight: in memory while small, on disk once large.

A message is streamed here as it arrives so that a 50 MiB message costs a
50 MiB file, not 50 MiB of RAM.  Small messages (the vast majority) stay in
memory below ``SPILL_AT``: creating, writing and unlinking a spool file for
each 1 KiB message would cost more than the Maildir write itself.  Nothing in
the incoming spool is ever acknowledged: the ``250`` comes only after the
Maildir copies are fsynced, so leftovers after a crash are discarded at
start-up.

Once a body spills, every file operation (open, write, close, unlink) runs
through ``run_blocking``, in the server a worker thread of the disk pool: a
"page-cache write" blocks for as long as the kernel throttles dirty pages or
the file system stalls, and on the reactor thread that would stall every
session.  The operations of one buffer run one after another (each waits for
the one before), so the file has one user at a time.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.python.failure import Failure

# Bounded memory per session: with the default 1000 connections the worst
# case is 256 MiB of bodies in RAM; one message never holds more than this.
SPILL_AT = 256 * 1024
READ_CHUNK = 1024 * 1024
# Bytes of one spilled body waiting for the disk, at the most: the backstop
# that bounds memory if input outruns HIGH_WATER's pause (a session only
# pauses between input regions); the message then fails with 451 4.3.0
# (SPEC section 5) and the client retries later.
MAX_BACKLOG = 8 * 1024 * 1024
# Past this many bytes waiting for the disk, the session stops reading the
# client's socket (``on_backlog(True)``) until a write has caught up: TCP's
# window, not the 451 above, absorbs a disk that is only slow for a moment
# (a page-cache writeback, another process's fsync).
HIGH_WATER = 1024 * 1024

RunBlocking = Callable[..., "defer.Deferred[Any]"]


def run_inline(func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """``run_blocking`` for tools and tests that have no reactor thread to protect."""
    return defer.maybeDeferred(func, *args)


def _open_spool_file(path: Path) -> BinaryIO:
    """A new, private (0600 from the start) spool file, buffered for big writes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return open(os.open(path, flags, 0o600), "wb", buffering=READ_CHUNK)


class SpoolBuffer:
    """An append-only byte sink that moves to a file past ``SPILL_AT`` bytes.

    `write`, `finish` and `discard` are called on the reactor thread and
    never block: the file is written by ``run_blocking`` (see the module
    docstring); `finish` fires once it is complete.

    A write that fails (ENOSPC, EIO, EDQUOT) does not raise out of the
    session's data path: the file is dropped at once, the rest of the
    message is only counted, and ``error`` says why, so the end of data
    answers 451 4.3.0 (SPEC section 5) and the session goes on.  Before,
    closing the half-written file in the error handler raised ENOSPC a
    second time and dropped the session mid-DATA.
    """

    def __init__(self, directory: Path, name: str, run_blocking: RunBlocking = run_inline) -> None:
        self._directory = directory
        self._name = name
        self._run_blocking = run_blocking
        self._chunks: list[bytes] = []  # in memory, or waiting for the disk once spilled
        self._held = 0
        self._file: BinaryIO | None = None  # touched only by the file operations
        self._spilled = False
        self._write_queued = False
        # The last file operation queued; the next one waits for it (never fails).
        self._last: defer.Deferred[None] = defer.succeed(None)
        self.path: Path | None = None
        self.size = 0
        self.error: OSError | None = None
        self._discarded = False
        # Told True when the disk falls HIGH_WATER behind, False once it caught up.
        self.on_backlog: Callable[[bool], None] | None = None
        self._behind = False

    def write(self, data: bytes) -> None:
        """Append (on the reactor thread; the file is written elsewhere)."""
        self.size += len(data)
        if self.error is not None or self._discarded:
            return  # a write after discard() must not spill into a new file nobody removes
        self._chunks.append(data)
        self._held += len(data)
        if not self._spilled:
            if self._held > SPILL_AT:
                self._spilled = True
                self.path = self._directory / self._name
                self._then(self._open_file, self.path)
                self._queue_write()
            return
        if self._held > MAX_BACKLOG:
            self._give_up("")
            return
        self._queue_write()
        if self._held > HIGH_WATER:
            self._backlog(True)

    def stalled(self, seconds: float) -> None:
        """The disk stayed HIGH_WATER behind for ``seconds``: give the message up
        (451 4.3.0 at its end; the session reads and drops the rest meanwhile)."""
        if self._behind and self.error is None and not self._discarded:
            self._give_up(f" after {seconds:g} s")

    def _give_up(self, detail: str) -> None:
        why = f"the spool disk is {self._held} octets behind the client{detail}"
        self._failed(OSError(errno.EAGAIN, why))

    def _backlog(self, behind: bool) -> None:
        if behind != self._behind:
            self._behind = behind
            if self.on_backlog is not None:
                self.on_backlog(behind)

    def _caught_up(self, result: object) -> object:
        if self._held <= HIGH_WATER:
            self._backlog(False)
        return result

    def finish(self) -> defer.Deferred[None]:
        """No more data: fires once the file is complete and closed (a failure sets
        ``error``; the Deferred itself never fails)."""
        if self._spilled and not self._discarded:
            self._then(self._close_file)
        return self._after_last()

    def _after_last(self) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        self._last.addCallback(lambda _: done.callback(None))
        return done

    def _queue_write(self) -> None:
        """One write operation at a time takes everything that arrived before it ran."""
        if self._write_queued:
            return
        self._write_queued = True

        def take(_: object) -> defer.Deferred[None] | None:
            self._write_queued = False
            chunks, self._chunks, self._held = self._chunks, [], 0
            if self._discarded or not chunks:
                return None
            return self._blocking(self._write_file, chunks).addBoth(self._caught_up)

        self._last = self._last.addCallback(take)

    def _then(self, operation: Callable[..., None], *args: Any) -> None:
        self._last = self._last.addCallback(
            lambda _: None if self._discarded else self._blocking(operation, *args)
        )

    def _blocking(self, operation: Callable[..., None], *args: Any) -> defer.Deferred[None]:
        d = self._run_blocking(operation, *args)
        d.addErrback(self._operation_failed)
        return d

    def _operation_failed(self, failure: Failure) -> defer.Deferred[None] | None:
        error = failure.value
        if not isinstance(error, OSError):
            error = OSError(errno.EIO, f"spool write failed: {error!r}")
        if self.error is None:
            self.error = error
        path = self._forget()
        # Returned, so that what waits for this operation (`finish`) waits for the removal.
        return self._blocking_drop(path) if path is not None else None

    # -- file operations (run_blocking: a worker thread, one at a time) ----------

    def _open_file(self, path: Path) -> None:
        self._file = _open_spool_file(path)

    def _write_file(self, chunks: list[bytes]) -> None:
        assert self._file is not None
        self._file.writelines(chunks)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _drop_file(self, path: Path) -> None:
        """Close and unlink; never raises (it runs after failures)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()  # flushing a full disk's buffer fails again: nothing to keep
            except OSError:
                pass
        try:
            os.unlink(path)
        except OSError:
            pass

    # -----------------------------------------------------------------------------

    def _failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = error
        self.discard()

    def chunks(self) -> Iterator[bytes]:
        """The contents again, in pieces of bounded size (safe in a worker thread,
        once `finish` has fired)."""
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
        (it runs in error handlers).  A spilled file is removed once the file
        operation under way, if any, is over."""
        path = self._forget()
        if path is not None:
            self._last.addCallback(lambda _: self._blocking_drop(path))

    def _forget(self) -> Path | None:
        """Mark the buffer discarded; the path of the file to remove, if any."""
        if self._discarded:
            return None
        self._discarded = True
        self._chunks = []
        self._held = 0
        self._backlog(False)
        path, self.path = self.path, None
        return path

    def _blocking_drop(self, path: Path) -> defer.Deferred[None]:
        d = self._run_blocking(self._drop_file, path)
        d.addErrback(lambda _: None)
        return d


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
