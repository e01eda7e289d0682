# -*- test-case-name: tests.test_writer,tests.test_filing -*-
"""The filing engine's server side: one all-or-none request per message, filed by a child.

Why a process: filing is a run of blocking system calls (open, write,
fsync, rename, fsync of the directory).  In a thread of the server, every
one of them hands the GIL back and forth with the reactor thread; measured
on a 2-core machine that ping-pong (futex wake-ups and context switches)
cost more CPU than the writing itself and capped small-message throughput.
A child process has its own interpreter and GIL, so the reactor and the
disk really run in parallel, as Postfix's separate local(8) does.

Every durable write of mailx goes through here: a received message's
Maildir copies and queue entry, a submitted one's, and the bounces and
notices mailx originates (`mailx.outbound.relay`).  A `Filing` is one
message's whole request; it is filed whole or not at all.

This module is the server's side (Twisted); the child is
`mailx.storage.writer_child`, which imports only the standard library and
`mailx.storage.maildir`, and whose docstring describes the protocol.
`InlineFiler` runs the same engine in a thread, for tools and components
used without a server (``mailxctl``, tests of one part).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mailx.storage import writer_child
from mailx.storage.writer_child import commit, decode_all, encode, file_request, take_back
from mailx.text import Logger

__all__ = [
    "Filing",
    "InlineFiler",
    "MaildirCopy",
    "QueueCopy",
    "WriterClient",
    "WriterGone",
    "commit",
    "decode_all",
    "encode",
    "file_request",
]

log = Logger(namespace="mailx.writer")


class WriterGone(Exception):
    """The writer process ended while requests were in flight."""


@dataclass(frozen=True)
class MaildirCopy:
    """One copy in a Maildir: ``head`` (LF line ends) then, with ``body``, the body.

    ``folder`` is the Maildir++ directory (``.Junk``, ``.Work.Clients``) or
    None for INBOX; ``flags`` the Maildir info letters (``FS``).
    """

    maildir: Path
    name: str
    head: bytes
    folder: str | None = None
    flags: str = ""
    body: bool = True


@dataclass(frozen=True)
class QueueCopy:
    """One outbound queue entry: ``head`` (CRLF) then, with ``body``, the body.

    ``envelope`` is a `mailx.storage.queue.Envelope`; its ``size`` and
    ``eight_bit`` are filled in once it is filed.
    """

    queue: Path
    envelope: Any
    head: bytes
    body: bool = True


@dataclass(frozen=True)
class Filing:
    """One message's filing, all or none.  ``body`` is a
    `mailx.inbound.spool.SpoolBuffer` (sent inline while in memory, by path
    once spooled), bytes, or None when every part is whole in its head."""

    copies: Sequence[MaildirCopy] = ()
    entries: Sequence[QueueCopy] = ()
    body: Any = None

    def request(self, request_id: int) -> tuple[dict[str, Any], bytes]:
        """The request's frame header and payload (see `mailx.storage.writer_child`)."""
        request: dict[str, Any] = {
            "id": request_id,
            "copies": [
                {
                    "maildir": str(c.maildir),
                    "name": c.name,
                    "folder": c.folder,
                    "flags": c.flags,
                    "head": len(c.head),
                    "body": c.body,
                }
                for c in self.copies
            ],
            "entries": [
                {
                    "queue": str(e.queue),
                    "envelope": e.envelope.to_fields(),
                    "head": len(e.head),
                    "body": e.body,
                }
                for e in self.entries
            ],
        }
        payload = b"".join(c.head for c in self.copies) + b"".join(e.head for e in self.entries)
        body = self.body
        if isinstance(body, bytes):
            payload += body
        elif body is not None:
            if body.path is not None:
                request["body_path"] = str(body.path)
            else:
                payload += body.contents()
        return request, payload

    def entry_data(self, entry: QueueCopy, limit: int) -> bytes | None:
        """What ``entry``'s data file holds (once filed), if the body is still in
        memory and it is at most ``limit`` octets (None otherwise: reading a
        spilled body back is the disk pool's job)."""
        if entry.envelope.size > limit:
            return None
        if not entry.body:
            return entry.head
        body = self.body
        if isinstance(body, bytes):
            return entry.head + body
        if body is None or body.path is not None:
            return None
        contents: bytes = body.contents()
        return entry.head + contents

    def filed(self, answer: dict[str, Any]) -> list[Path]:
        """The paths of the copies; the entries' envelopes get their size and 8-bit flag."""
        for entry, written in zip(self.entries, answer.get("entries", ()), strict=True):
            entry.envelope.size, entry.envelope.eight_bit = written["size"], written["eight_bit"]
        return [Path(p) for p in answer["paths"]]


def _failure(answer: dict[str, Any]) -> Exception:
    if answer.get("kind") == "FileExistsError":
        return FileExistsError(answer["error"])
    return OSError(answer["error"])


class _Child(ProcessProtocol):
    """One writer process: its requests in flight and its answers."""

    def __init__(self, owner: WriterClient) -> None:
        self.owner = owner
        self.pending: dict[int, tuple[defer.Deferred[list[Path]], Filing, dict[str, Any]]] = {}
        self.removals: dict[int, defer.Deferred[list[bool | OSError]]] = {}
        self.buffer = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        for answer, _ in decode_all(self.buffer):
            if "batch" in answer and self.owner.observe_batch is not None:
                self.owner.observe_batch(answer["batch"])
            if "removed" in answer:
                removal = self.removals.pop(answer["id"], None)
                if removal is not None:
                    removal.callback(
                        [OSError(r) if isinstance(r, str) else r for r in answer["removed"]]
                    )
                continue
            found = self.pending.pop(answer["id"], None)
            if found is None:
                continue
            d, filing, _ = found
            if "error" in answer:
                d.errback(_failure(answer))
            else:
                d.callback(filing.filed(answer))

    def processEnded(self, reason: Failure) -> None:
        # Forget this child first: an errback below may file the next message.
        self.owner._ended(self, reason)
        pending, self.pending = self.pending, {}
        why = f"the Maildir writer ended: {reason.getErrorMessage()}"
        removals, self.removals = self.removals, {}
        for removal in removals.values():
            # Nothing to take back: a removal is retried whole (an unlink is idempotent).
            removal.errback(WriterGone(why))
        gone = [self.owner._take_back(request, d, why) for d, _, request in pending.values()]
        defer.DeferredList(gone).addBoth(lambda _: self.ended.callback(None))


class WriterClient:
    """The server's side: requests out, Deferreds fired by the answers.

    If the child dies (killed, out of memory), what it renamed of the
    requests in flight is taken back, they fail (their senders get 451 and
    retry), and the next request starts a new child.
    """

    def __init__(self, reactor: Any, pool: Any = None) -> None:
        self.reactor = reactor
        self.pool = pool  # where the take-back after a death runs (default: the reactor's)
        self._child: _Child | None = None
        self._next_id = 0
        self._stopping = False
        # Called with the messages each batch filed (mailx.observe.metrics).
        self.observe_batch: Callable[[int], None] | None = None

    def start(self) -> None:
        self._stopping = False
        child = _Child(self)
        self.reactor.spawnProcess(
            child,
            sys.executable,
            # -I: no PYTHONPATH, no user site; -S: no site-packages.  The
            # child finds mailx.storage.maildir beside its own file (see writer_child).
            [sys.executable, "-I", "-S", writer_child.__file__],
            env=dict(os.environ),  # locale and TZ as the server's
            childFDs={0: "w", 1: "r", 2: 2},
        )
        self._child = child

    def _ended(self, child: _Child, reason: Failure) -> None:
        if child is self._child:
            self._child = None
            if not self._stopping:
                log.error("Maildir writer ended unexpectedly: {why}", why=reason.getErrorMessage())

    def _take_back(
        self, request: dict[str, Any], d: defer.Deferred[list[Path]], why: str
    ) -> defer.Deferred[None]:
        """A request the dead child may have half done: remove what it renamed, then fail it."""
        pool = self.pool if self.pool is not None else self.reactor.getThreadPool()
        undo = deferToThreadPool(self.reactor, pool, take_back, request)

        def report(result: Any) -> None:
            if isinstance(result, Failure):
                log.error("taking back a half-filed message failed: {e}", e=result.getErrorMessage())
            elif result:
                log.info("took back a half-filed message: {paths}", paths=", ".join(result))
            d.errback(WriterGone(why))

        return undo.addBoth(report)

    def file(self, filing: Filing) -> defer.Deferred[list[Path]]:
        """File one message whole; fires with the copies' paths once all is on disk."""
        if self._stopping:
            return defer.fail(WriterGone("the writer is stopping"))
        if self._child is None:
            self.start()
        child = self._child
        assert child is not None
        self._next_id += 1
        request, payload = filing.request(self._next_id)
        d: defer.Deferred[list[Path]] = defer.Deferred()
        child.pending[self._next_id] = (d, filing, request)
        assert child.transport is not None  # connected by spawnProcess in start()
        child.transport.write(encode(request, payload))
        return d

    def remove_entries(
        self, queue: Path, queue_ids: Sequence[str]
    ) -> defer.Deferred[list[bool | OSError]]:
        """`Queue.remove_many` done by the child: each entry's result, once the
        removals are durable (WriterGone if the child died meanwhile)."""
        if self._stopping:
            return defer.fail(WriterGone("the writer is stopping"))
        if self._child is None:
            self.start()
        child = self._child
        assert child is not None and child.transport is not None
        self._next_id += 1
        d: defer.Deferred[list[bool | OSError]] = defer.Deferred()
        child.removals[self._next_id] = d
        request = {"id": self._next_id, "remove": {"queue": str(queue), "ids": list(queue_ids)}}
        child.transport.write(encode(request))
        return d

    def stop(self) -> defer.Deferred[None]:
        """Let the child finish what it was sent, then end it."""
        self._stopping = True
        child, self._child = self._child, None
        if child is None:
            return defer.succeed(None)
        assert child.transport is not None  # connected by spawnProcess in start()
        child.transport.closeStdin()
        return child.ended


class InlineFiler:
    """The same engine in a worker thread, one directory fsync per message: for
    ``mailxctl``, tests and components run without a server's writer."""

    def __init__(self, reactor: Any, pool: Any = None) -> None:
        self.reactor = reactor
        self.pool = pool

    def file(self, filing: Filing) -> defer.Deferred[list[Path]]:
        pool = self.pool if self.pool is not None else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, file_now, filing)

    def remove_entries(
        self, queue: Path, queue_ids: Sequence[str]
    ) -> defer.Deferred[list[bool | OSError]]:
        pool = self.pool if self.pool is not None else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, remove_now, queue, queue_ids)


def file_now(filing: Filing) -> list[Path]:
    """File ``filing`` in this thread (blocking); raises what the child would answer."""
    request, payload = filing.request(0)
    return filing.filed(file_request(request, payload))


def remove_now(queue: Path, queue_ids: Sequence[str]) -> list[bool | OSError]:
    """The child's removal in this thread (blocking): each entry's result."""
    return [OSError(r) if isinstance(r, str) else r for r in writer_child.remove_now(queue, queue_ids)]
