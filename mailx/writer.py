# -*- test-case-name: tests.test_writer -*-
"""The Maildir writer: a child process that files messages durably, in batches.

Why a process: filing is a run of blocking system calls (open, write,
fsync, rename, fsync of the directory).  In a thread of the server, every
one of them hands the GIL back and forth with the reactor thread; measured
on a 2-core machine that ping-pong (futex wake-ups and context switches)
cost more CPU than the writing itself and capped small-message throughput.
A child process has its own interpreter and GIL, so the reactor and the
disk really run in parallel, as Postfix's separate local(8) does.

The protocol on the child's stdin/stdout is frames of ``>II`` (length of a
JSON header, length of a payload), then the header and the payload.  A
request names the copies to write (Maildir, file name, length of its own
header block) and carries those header blocks and the body, or the path of
a spooled body.  The child answers each request with the paths it wrote or
an error.  Everything readable at once is one batch: each directory renamed
into is fsynced once per batch, before any answer of the batch is sent, so
an answer always means "on disk".  A request that fails takes its own
copies back; nothing half-written is ever visible in ``new/``.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mailx.text import Logger

log = Logger(namespace="mailx.writer")

FRAME = struct.Struct(">II")
READ_CHUNK = 1024 * 1024


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    meta = json.dumps(header, separators=(",", ":")).encode()
    return FRAME.pack(len(meta), len(payload)) + meta + payload


def decode_all(buffer: bytearray) -> list[tuple[dict[str, Any], bytes]]:
    """Remove and return every complete frame at the start of ``buffer``."""
    frames = []
    offset = 0
    while len(buffer) - offset >= FRAME.size:
        meta_len, payload_len = FRAME.unpack_from(buffer, offset)
        end = offset + FRAME.size + meta_len + payload_len
        if len(buffer) < end:
            break
        start = offset + FRAME.size
        header = json.loads(bytes(buffer[start : start + meta_len]))
        frames.append((header, bytes(buffer[start + meta_len : end])))
        offset = end
    del buffer[:offset]
    return frames


# --- the child --------------------------------------------------------------


def _body_chunks(request: dict[str, Any], payload: bytes, heads_length: int) -> Iterator[bytes]:
    if "body_path" in request:
        with open(request["body_path"], "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
    else:
        yield payload[heads_length:]


def file_request(request: dict[str, Any], payload: bytes, sync_later: Any) -> list[str]:
    """Write every copy of one message; all or none."""
    from mailx import maildir

    written: list[Path] = []
    heads_length = sum(copy["head"] for copy in request["copies"])
    offset = 0
    try:
        for copy in request["copies"]:
            head = payload[offset : offset + copy["head"]]
            offset += copy["head"]
            box = Path(copy["maildir"])
            if copy.get("folder"):
                box = maildir.ensure_folder(box, copy["folder"])
            parts = _chain(head, maildir.lf_chunks(_body_chunks(request, payload, heads_length)))
            written.append(maildir.write_message(box, copy["name"], parts, sync_later))
    except BaseException:
        for path in written:
            maildir.remove_message(path)
        raise
    return [str(p) for p in written]


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def commit(frames: Sequence[tuple[dict[str, Any], bytes]]) -> bytes:
    """File a batch; the answers, once every directory is fsynced."""
    from mailx import maildir

    directories: dict[Path, list[int]] = {}
    answers: list[dict[str, Any]] = []
    for index, (request, payload) in enumerate(frames):
        try:
            paths = file_request(
                request, payload, lambda d, i=index: directories.setdefault(d, []).append(i)
            )
            answers.append({"id": request["id"], "paths": paths})
        except Exception as e:  # the parent answers 451 and logs it
            answers.append({"id": request["id"], "error": f"{type(e).__name__}: {e}"})
    for directory, members in directories.items():
        try:
            maildir.fsync_directory(directory)
        except OSError as e:
            for index in members:
                answers[index] = {"id": answers[index]["id"], "error": f"fsync {directory}: {e}"}
    return b"".join(encode(answer) for answer in answers)


def main() -> int:
    """Serve requests on stdin until it closes."""
    buffer = bytearray()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    eof = False
    while True:
        frames = decode_all(buffer)
        if not frames:
            if eof:
                return 0
            data = os.read(stdin, READ_CHUNK)
            if not data:
                eof = True
            buffer += data
            continue
        # Whatever else has arrived joins this batch (group commit).
        while not eof and select.select([stdin], [], [], 0)[0]:
            data = os.read(stdin, READ_CHUNK)
            if not data:
                eof = True
            buffer += data
        frames += decode_all(buffer)
        answer = memoryview(commit(frames))
        while answer:
            answer = answer[os.write(stdout, answer) :]


# --- the parent ------------------------------------------------------------


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


def _child_environment() -> dict[str, str]:
    """Our environment, with this very mailx first on the child's path.

    The child must run the same code as the server even when mailx is used
    from a checkout that is not installed (or installed elsewhere).
    """
    env = os.environ.copy()
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    return env


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
            [sys.executable, "-m", "mailx.writer"],
            env=_child_environment(),
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

        ``body`` is a `mailx.spool.SpoolBuffer`: sent inline while in memory,
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

if __name__ == "__main__":
    sys.exit(main())
