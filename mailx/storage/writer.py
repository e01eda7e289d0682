# -*- test-case-name: tests.test_writer -*-
"""The Maildir writer: a child process that files messages durably, in batches.

Why a process: filing is a run of blocking system calls (open, write,
fsync, rename, fsync of the directory).  In a thread of the server, every
one of them hands the GIL back and forth with the reactor thread; measured
on a 2-core machine that ping-pong (futex wake-ups and context switches)
cost more CPU than the writing itself and capped small-message throughput.
A child process has its own interpreter and GIL, so the reactor and the
disk really run in parallel, as Postfix's separate local(8) does.

This module is the server's side (Twisted); the child is
`mailx.storage.writer_child`, which imports only the standard library and
`mailx.storage.maildir` (the one durable-write primitive, shared with the
server's own threads), and whose docstring describes the protocol.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mailx.storage import writer_child
from mailx.storage.writer_child import commit, decode_all, encode, file_request
from mailx.text import Logger

__all__ = ["WriterClient", "WriterGone", "commit", "decode_all", "encode", "file_request"]

log = Logger(namespace="mailx.writer")


class WriterGone(Exception):
    """The writer process ended while requests were in flight."""


class _Child(ProcessProtocol):
    """One writer process: its requests in flight and its answers."""

    def __init__(self, owner: WriterClient) -> None:
        self.owner = owner
        self.pending: dict[int, defer.Deferred] = {}
        self.buffer = bytearray()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        for answer, _ in decode_all(self.buffer):
            d = self.pending.pop(answer["id"], None)
            if d is None:
                continue
            if "error" in answer:
                d.errback(OSError(answer["error"]))
            else:
                d.callback([Path(p) for p in answer["paths"]])

    def processEnded(self, reason: Failure) -> None:
        # Forget this child first: an errback below may file the next message.
        self.owner._ended(self, reason)
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(WriterGone(f"the Maildir writer ended: {reason.getErrorMessage()}"))
        self.ended.callback(None)


class WriterClient:
    """The server's side: requests out, Deferreds fired by the answers.

    If the child dies (killed, out of memory), the requests in flight fail
    (their senders get 451 and retry) and the next request starts a new one.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._child: _Child | None = None
        self._next_id = 0
        self._stopping = False

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

    def file(
        self, copies: Sequence[dict[str, Any]], heads: Sequence[bytes], body: Any
    ) -> defer.Deferred:
        """File ``copies`` (maildir, name, folder) with their header blocks and the body.

        ``body`` is a `mailx.inbound.spool.SpoolBuffer`: sent inline while in memory,
        by path once spooled to disk.  Fires with the paths written.
        """
        if self._stopping:
            return defer.fail(WriterGone("the writer is stopping"))
        if self._child is None:
            self.start()
        child = self._child
        self._next_id += 1
        request: dict[str, Any] = {
            "id": self._next_id,
            "copies": [dict(copy, head=len(head)) for copy, head in zip(copies, heads, strict=True)],
        }
        payload = b"".join(heads)
        if body.path is not None:
            request["body_path"] = str(body.path)
        else:
            payload += body.contents()
        d: defer.Deferred = defer.Deferred()
        child.pending[self._next_id] = d
        child.transport.write(encode(request, payload))
        return d

    def stop(self) -> defer.Deferred:
        """Let the child finish what it was sent, then end it."""
        self._stopping = True
        child, self._child = self._child, None
        if child is None:
            return defer.succeed(None)
        child.transport.closeStdin()
        return child.ended
