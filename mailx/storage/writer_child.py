# -*- test-case-name: tests.test_writer,tests.test_filing -*-
"""The filing engine: every durable write of mailx, in one process that imports only the standard library.

`mailx.storage.writer` explains why filing happens in a child process and starts
this file as ``python3 -I -S .../writer_child.py``.  The child imports no
third-party package (no Twisted, no cryptography): it starts in a few tens
of milliseconds and stays at about 12 MiB resident where a second copy of
the server's imports cost about 30 MiB.  ``-I`` keeps ``PYTHONPATH`` and the
user's site out, ``-S`` the site-packages; ``mailx.storage.maildir`` is found by
this file's own location, so the child runs the very code of the server
that started it, installed or not.  ``tests.test_writer`` checks that the
child's imports stay inside the standard library.

The protocol on the child's stdin/stdout is frames of ``>II`` (length of a
JSON header, length of a payload), then the header and the payload.  A
request is one message's whole filing, any mix of:

- ``copies``: Maildir copies (``maildir``, file ``name``, ``folder`` such as
  ``.Junk`` or ``.Work.Clients`` or none, Maildir info ``flags`` such as
  ``FS``, ``head``: the length of its own header block, LF line ends,
  ``body``: whether the body follows it, CRLF turned to LF);
- ``entries``: outbound queue entries (``queue`` directory, ``envelope``:
  `mailx.storage.queue.Envelope`'s JSON object, ``head`` and ``body`` as
  above, the data kept with CRLF), in the queue's on-disk format
  (see `mailx.storage.queue`, which reads them).

The payload holds the header blocks in that order, then the body unless a
``body_path`` names the spooled one.  The child answers each request with
the paths of its copies and each entry's size and 8-bit flag, or an error
(and ``kind``, the exception's name).  A request with ``remove`` instead
removes delivered queue entries (see `commit`): the other half of the
queue's life, so that the server's disk threads stay idle while mail flows.

Every file goes the same way: written in a ``tmp`` directory, fsynced,
renamed into place, and the directory renamed into fsynced.  A request is
all or none: every file of it is written and fsynced before the first
rename, and if anything fails, what was renamed is removed again; a child
killed between two renames leaves files whose names the parent chose, and
the parent removes them (`mailx.storage.writer`).  Everything readable at
once is one batch: each directory renamed into is fsynced once per batch
(group commit), before any answer of the batch is sent, so an answer always
means "on disk"; the batch's requests are filed at once by a few threads,
so that their fsyncs share the filesystem journal's commits.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a file under -I: the package is found by where this file is.
    # Appended, so nothing beside the package can shadow the standard library.
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from mailx.storage import maildir  # noqa: E402  (stdlib only: the Maildir primitive)

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


def _body_chunks(request: dict[str, Any], payload: bytes, heads_length: int) -> Iterator[bytes]:
    if "body_path" in request:
        with open(request["body_path"], "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
    else:
        yield payload[heads_length:]


# The outbound queue's on-disk names (`mailx.storage.queue` reads them): an
# entry is one file, ``<id>``; ``<id>.envelope`` is its envelope once changed.
ENVELOPE_SUFFIX = ".envelope"
STAGING = ".tmp"
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def envelope_json(envelope: dict[str, Any]) -> bytes:
    """An envelope as one line, exactly as `mailx.storage.queue.Envelope.to_json` writes it.

    Compact: the entry's first line ends at its first LF (JSON escapes every
    LF inside a string), and the C encoder serves it (``indent`` would not).
    ASCII: a trace field's undecodable octets (surrogate escapes) are escaped too.
    """
    return json.dumps(envelope, separators=(",", ":")).encode("ascii") + b"\n"


class _StagedEntry:
    """A queue entry whole in ``<queue>/.tmp/<id>``, fsynced, not yet in the queue."""

    def __init__(self, queue: Path, queue_id: str) -> None:
        self.queue = queue
        self.staging = queue / STAGING / queue_id
        self.final = queue / queue_id

    def discard(self) -> None:
        try:
            os.unlink(self.staging)
        except FileNotFoundError:
            pass


def write_file(path: Path, parts: Iterator[bytes] | list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _measure(parts: Iterator[bytes]) -> tuple[int, bool]:
    """The data's size and whether it has 8-bit octets: the envelope, which
    comes first in the entry, says both (a spooled body is read twice)."""
    size, eight_bit = 0, False
    for part in parts:
        size += len(part)
        eight_bit = eight_bit or bool(_EIGHT_BIT.search(part))
    return size, eight_bit


def stage_entry(
    queue: Path, envelope: dict[str, Any], parts: Callable[[], Iterator[bytes]]
) -> tuple[_StagedEntry, int, bool]:
    """Write a queue entry aside: the envelope with the data's size and 8-bit flag, then the data.

    ``parts`` makes the data's chunks, once to measure them and once to write
    them.  FileExistsError if an entry of that ID exists (a notice's ID
    derives from its message's, so a notice is never queued twice).
    """
    staged = _StagedEntry(queue, envelope["id"])
    if os.path.lexists(staged.final):
        raise FileExistsError(f"queue entry {envelope['id']} exists")
    maildir.make_directories(staged.staging.parent)
    staged.discard()  # a leftover of a request that failed
    size, eight_bit = _measure(parts())
    envelope = dict(envelope, size=size, eight_bit=eight_bit)
    try:
        write_file(staged.staging, _chain(envelope_json(envelope), parts()))
    except BaseException:
        staged.discard()
        raise
    return staged, size, eight_bit


def _publish_entry(staged: _StagedEntry, sync_later: Any) -> Path:
    # link(2), not rename(2): it fails where an entry of that ID exists, so
    # there are never two writers of one entry.
    os.link(staged.staging, staged.final)
    os.unlink(staged.staging)
    sync_later(staged.queue)
    return staged.final


def write_entry(
    queue: Path, envelope: dict[str, Any], parts: Callable[[], Iterator[bytes]], sync_later: Any = None
) -> tuple[Path, int, bool]:
    """One queue entry on its own, durably: its path, size and 8-bit flag (blocking)."""
    staged, size, eight_bit = stage_entry(queue, envelope, parts)
    try:
        path = _publish_entry(staged, sync_later or _sync_now)
    except BaseException:
        staged.discard()
        raise
    return path, size, eight_bit


def _unlink_entry(path: Path) -> bool:
    """Delete an entry (its file, then its changed envelope): False if there was none."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        shutil.rmtree(path)  # an older mailx's entry, a directory, not yet migrated
    try:
        os.unlink(path.with_name(path.name + ENVELOPE_SUFFIX))
    except FileNotFoundError:
        pass  # never changed; one a crash leaves behind, `Queue.prepare` removes
    return True


def _remove_entry(path: Path) -> None:
    if _unlink_entry(path):
        maildir.fsync_directory(path.parent)


def unlink_entries(queue: Path, queue_ids: Sequence[str]) -> list[Any]:
    """Delete each entry, the first half of a removal: each one's result
    (True, False if there was none, or the error's text).

    An unlink is whole at once, so a reader sees an entry or none; the caller
    fsyncs the queue directory before reporting them removed.
    """
    results: list[Any] = []
    for queue_id in queue_ids:
        if not queue_id or "/" in queue_id or queue_id.startswith("."):
            results.append(f"not a queue ID: {queue_id!r}")
            continue
        try:
            results.append(_unlink_entry(queue / queue_id))
        except OSError as e:
            results.append(f"{type(e).__name__}: {e}")
    return results


def remove_now(queue: Path, queue_ids: Sequence[str]) -> list[Any]:
    """`unlink_entries` and the fsync: a removal on its own (blocking)."""
    results = unlink_entries(queue, queue_ids)
    if any(r is True for r in results):
        try:
            maildir.fsync_directory(queue)
        except OSError as e:
            results = [f"fsync {queue}: {e}" if r is True else r for r in results]
    return results


def _sync_now(directory: Path) -> None:
    maildir.fsync_directory(directory)


def file_request(
    request: dict[str, Any], payload: bytes, sync_later: Any = _sync_now
) -> dict[str, Any]:
    """File one message's copies and queue entries; all or none.

    Returns the answer's fields: ``paths`` of the copies, ``entries`` with
    each entry's ``size`` and ``eight_bit``.
    """
    copies = request.get("copies", ())
    entries = request.get("entries", ())
    heads: list[bytes] = []
    offset = 0
    for part in (*copies, *entries):
        heads.append(payload[offset : offset + part["head"]])
        offset += part["head"]

    def parts(index: int, part: dict[str, Any]) -> Callable[[], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            yield heads[index]
            if part.get("body", True):
                yield from _body_chunks(request, payload, offset)

        return chunks

    staged: list[Any] = []
    published: list[Path] = []
    sizes: list[dict[str, Any]] = []
    try:
        for copy in copies:
            box = Path(copy["maildir"])
            if copy.get("folder"):
                box = maildir.ensure_folder(box, copy["folder"])
            body = _body_chunks(request, payload, offset) if copy.get("body", True) else iter(())
            chunks = _chain(heads[len(staged)], maildir.lf_chunks(body))
            staged.append(maildir.stage_message(box, copy["name"], chunks, copy.get("flags", "")))
        for entry in entries:
            made = parts(len(staged), entry)
            stage, size, eight_bit = stage_entry(Path(entry["queue"]), entry["envelope"], made)
            staged.append(stage)
            sizes.append({"size": size, "eight_bit": eight_bit})
        for stage in staged:
            if isinstance(stage, _StagedEntry):
                published.append(_publish_entry(stage, sync_later))
            else:
                published.append(maildir.publish(stage, sync_later))
    except BaseException:
        for stage in staged[len(published) :]:
            stage.discard()
        for path in published:
            remove(path)
        raise
    return {"paths": [str(p) for p in published[: len(copies)]], "entries": sizes}


def remove(path: Path) -> None:
    """Take back one file a request renamed into place: a Maildir copy or a queue entry."""
    if path.parent.name in maildir.SUBDIRS:
        maildir.remove_message(path)
    else:
        _remove_entry(path)


def take_back(request: dict[str, Any]) -> list[str]:
    """Remove whatever of ``request`` is in place: after its writer died mid-request.

    The copies' names and the entries' IDs were chosen by the parent, so
    what a killed child renamed is found without its answer.
    """
    removed = []
    for copy in request.get("copies", ()):
        box = Path(copy["maildir"])
        if copy.get("folder"):
            box = box / copy["folder"]
        for sub in ("new", "cur"):
            try:
                names = os.listdir(box / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(copy["name"] + ","):
                    maildir.remove_message(box / sub / name)
                    removed.append(str(box / sub / name))
    for entry in request.get("entries", ()):
        path = Path(entry["queue"]) / entry["envelope"]["id"]
        if _written_by(path, entry):
            _remove_entry(path)
            removed.append(str(path))
    return removed


def _written_by(path: Path, entry: dict[str, Any]) -> bool:
    """Is the entry at ``path`` this request's (not an older one of that ID)?"""
    try:
        with open(path, "rb") as f:
            found = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return bool(found.get("created") == entry["envelope"].get("created"))


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def commit(frames: Sequence[tuple[dict[str, Any], bytes]]) -> bytes:
    """File a batch; the answers, once every directory is fsynced.

    A request with ``remove`` (``queue``, ``ids``) removes queue entries
    instead: unlinked and answered ``removed`` (per ID: true, false if there
    was none, or an error's text), without an fsync of its own.  The next
    filing's fsync of the queue directory makes it durable; until then a
    power cut can bring a delivered entry back, to be sent again: at least
    once, as Postfix's qmgr unlinks.  Syncing every removal cost forwarding
    about 3% of its messages per second (paired runs, bench/README.md,
    session 9), to narrow a duplicate that a power cut makes possible anyway.

    The first filing's answer carries how many the batch filed (``batch``),
    for the metrics; a batch of removals only carries none.
    """
    directories: dict[Path, list[int]] = {}
    removals: dict[int, list[Any]] = {}
    for index, (request, _) in enumerate(frames):
        if "remove" in request:
            queue = Path(request["remove"]["queue"])
            # Not fsynced for its own sake: see the docstring.
            removals[index] = unlink_entries(queue, request["remove"]["ids"])

    def one(index: int) -> dict[str, Any]:
        request, payload = frames[index]
        try:
            done = file_request(
                # dict.setdefault and list.append are atomic under the GIL.
                request, payload, lambda d: directories.setdefault(d, []).append(index)
            )
            return {"id": request["id"], **done}
        except Exception as e:  # the parent answers 451 and logs it
            return _error(request, type(e).__name__, f"{type(e).__name__}: {e}")

    filings = [index for index in range(len(frames)) if index not in removals]
    answers: list[dict[str, Any]] = [
        {"id": request["id"], "removed": removals[index]} if index in removals else {}
        for index, (request, _) in enumerate(frames)
    ]
    if len(filings) == 1:
        answers[filings[0]] = one(filings[0])
    elif filings:
        # At once: their fsyncs wait together and share the journal's commits
        # (one after another, each waited for a commit of its own).
        for index, answer in zip(filings, _workers().map(one, filings), strict=True):
            answers[index] = answer
    for directory, members in directories.items():
        try:
            maildir.fsync_directory(directory)
        except OSError as e:
            why = f"fsync {directory}: {e}"
            for index in members:
                if "error" not in answers[index]:
                    _take_back_quietly(*frames[index])
                answers[index] = _error(frames[index][0], "OSError", why)
    if filings:
        # Messages filed, as the metric says: removals ride along uncounted.
        answers[filings[0]]["batch"] = len(filings)
    return b"".join(encode(answer) for answer in answers)


# A batch's requests are filed by this many threads at once.
WORKERS = 8
_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="filing")
    return _pool


def _error(request: dict[str, Any], kind: str, text: str) -> dict[str, Any]:
    return {"id": request["id"], "error": text, "kind": kind}


def _take_back_quietly(request: dict[str, Any], payload: bytes) -> None:
    try:
        take_back(request)
    except OSError:
        pass  # the answer is an error all the same; start-up cleans tmp/


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


if __name__ == "__main__":
    sys.exit(main())
