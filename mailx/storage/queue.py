# -*- test-case-name: tests.test_queue -*-
"""The outbound queue on disk: what is forwarded survives crashes and restarts.

One file per message under ``<paths.spool>/queue/``, named by its queue ID:

- its first line is the envelope (JSON on one line) as the message was
  accepted: the original sender, its SPF and DMARC results (whether it may
  get a bounce), and per recipient the address, the envelope sender to use
  (SRS-rewritten), the trace fields to prepend, and its state: ``pending``,
  ``delivered`` or ``failed``, attempts, next attempt, last reply, and its
  transport: none for MX delivery (or the smarthost), ``lmtp:<endpoint>``
  for a mailbox of an LMTP domain (SPEC 14, `mailx.outbound.lmtp`).
  Entries written before the field existed read as MX delivery, which is
  what they were.
- the rest is the message as received (header section and body, CRLF line
  ends, not dot-stuffed), byte for byte, so a DKIM signature still verifies
  where it arrives (issue 4.6).  Our trace header fields are not in it: they
  differ per recipient and live in the envelope.

Once an attempt changes the envelope, ``<id>.envelope`` holds it (the same
one line) and the first line is history.  The data is never rewritten.

Why one file, where the entry was a directory of two files before: a
forwarded message is filed, sent at once and removed, and each file and
directory it is made of costs a create, an fsync and an unlink; one file
is a third of the filing engine's disk work per message (bench/README.md,
session 8).  Entries in the old layout (a directory holding ``message`` and
``envelope.json``) are converted at start-up (`Queue.prepare`).

Durability (SPEC section 5: ``250`` means fsynced): a new entry is written
by the filing engine (`mailx.storage.writer_child`, with the message's
Maildir copies in one all-or-none request) in ``.tmp/<id>``, fsynced, linked
into place (link(2) fails where the name exists: never two writers of one
entry) and the queue directory fsynced; a crash at any point leaves either
no entry or a whole one, and ``.tmp/`` is emptied at start-up (nothing in
it was ever acknowledged).  A state change writes ``<id>.envelope`` the same
way (write in ``.tmp/``, fsync, rename, fsync the directory), so a reader
(``mailxctl queue``) never sees half a file.  Removal unlinks the entry,
then its envelope; an envelope whose entry is gone (a crash in between) is
removed at start-up.  The server's removals (the filing engine's) are not
fsynced on their own: the next entry's fsync of the directory covers them,
and a power cut before it brings a delivered entry back (sent again, as
below); `Queue.remove` here, for tools, fsyncs.

Delivery is at least once: a recipient is marked delivered only after the
remote ``250``, so a crash in between sends it again after the restart.

``mailxctl queue remove`` unlinks an entry; the running server, which
re-reads nothing but checks that the entry still exists before each retry
and before it trusts an envelope it wrote, simply forgets it.

Every function here blocks: callers run them in the disk thread pool.  The
`Envelope` objects are mutated by the scheduler on the reactor thread only;
`Envelope.to_json` snapshots one for a write in a worker thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

from mailx.storage import writer_child
from mailx.storage.maildir import fsync_directory, make_directories
from mailx.storage.writer_child import envelope_json, write_entry
from mailx.text import Logger

log = Logger(namespace="mailx.queue")

__all__ = [
    "DELIVERED",
    "FAILED",
    "PENDING",
    "Envelope",
    "Queue",
    "QueueError",
    "Recipient",
    "valid_id",
]

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)

KINDS = ("forward", "bounce", "delay", "notice")

# The names are the filing engine's, which writes new entries (see above).
ENVELOPE_SUFFIX = writer_child.ENVELOPE_SUFFIX
STAGING = writer_child.STAGING
# The layout before one file per entry: a directory of these two.
OLD_DATA_FILE = "message"
OLD_ENVELOPE_FILE = "envelope.json"
# Envelopes in lines that long or longer are not ours (a recipient list of a
# few thousand is some hundred KiB).
ENVELOPE_LIMIT = 64 * 1024 * 1024
FORMAT_VERSION = 1

_ID = re.compile(r"\A[0-9A-Za-z]{1,40}\Z")


def valid_id(queue_id: str) -> bool:
    """A queue ID as we make them: letters and digits only (never a path)."""
    return bool(_ID.match(queue_id))


class QueueError(Exception):
    """An entry that cannot be read (missing, corrupt, not ours)."""


@dataclass
class Recipient:
    """One outside recipient of a queued message, and how delivery went so far."""

    address: str  # where it goes, local@domain
    original: str  # the address the client sent it to (RCPT TO), for the DSN and logs
    mail_from: str  # the envelope sender for this recipient ("" for a bounce)
    trace: str = ""  # header fields we prepend, CRLF-terminated (Received, Delivered-To)
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_reply: str | None = None  # "451 4.7.1 Try again later", or our own explanation
    last_host: str | None = None  # "mx.example.net[192.0.2.1]:25"
    status: str | None = None  # RFC 3463 code for the DSN, e.g. "5.1.1"
    remote_mta: str | None = None  # the host that gave last_reply, for the DSN
    # None: the domain's MX (or the smarthost); "lmtp:unix:/run/dovecot/lmtp": that
    # LMTP server, as the domain's configuration said when the message came in.
    transport: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def destination(self) -> str:
        """What one delivery attempt goes to: the transport, else the recipient's domain."""
        return self.transport or self.domain


@dataclass
class Envelope:
    """A queued message's envelope: see the module docstring."""

    id: str
    sender: str  # the original envelope sender: bounces go here ("" never gets one)
    created: float  # when we accepted it (epoch seconds)
    size: int = 0  # octets of the data file
    eight_bit: bool = False  # any octet over 127: BODY=8BITMIME (RFC 6152)
    kind: str = "forward"  # forward | bounce | delay | notice (our own, sent from <>: autoreplies, RFC 5429)
    client: str = ""  # "helo [ip]" of the client we received it from, for the DSN
    # SPF (on MAIL FROM) and DMARC results at reception, which decide whether
    # the sender may get a notice (dsn.notice_refusal: backscatter).  None:
    # not checked; entries written before these fields existed read as None
    # and keep the rules they were accepted under.
    spf: str | None = None
    dmarc: str | None = None
    delay_notified: bool = False
    bounce_queued: bool = False
    recipients: list[Recipient] = field(default_factory=list)

    def to_fields(self) -> dict[str, Any]:
        """What `dataclasses.asdict` gives, with the version first.  By hand:
        asdict deep-copies every value, 3% of the reactor's time per forwarded
        message, and every value here is a scalar but the recipients."""
        out: dict[str, Any] = {"version": FORMAT_VERSION}
        for name in _ENVELOPE_FIELDS:
            out[name] = getattr(self, name)
        out["recipients"] = [
            {name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients
        ]
        return out

    def to_json(self) -> bytes:
        return envelope_json(self.to_fields())

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
            if raw.pop("version", None) != FORMAT_VERSION:
                raise QueueError("unknown envelope format version")
            recipients = [Recipient(**r) for r in raw.pop("recipients")]
            envelope = cls(**raw, recipients=recipients)
        except QueueError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise QueueError(f"corrupt envelope: {e}") from None
        if envelope.kind not in KINDS or not valid_id(envelope.id):
            raise QueueError("corrupt envelope: bad kind or id")
        if any(r.state not in STATES for r in envelope.recipients):
            raise QueueError("corrupt envelope: bad recipient state")
        return envelope

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def complete(self) -> bool:
        return not self.pending


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope) if f.name != "recipients")
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))


class Queue:
    """The queue directory; every method blocks (disk thread pool)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / STAGING
        # Removals share the queue directory's fsync (`_sync_root_after`).
        self._renames = 0  # removals done so far
        self._synced = 0  # of which an fsync of the root has made durable
        self._counter_lock = threading.Lock()
        self._sync_lock = threading.Lock()

    def prepare(self) -> int:
        """Create the directories; remove what a crash left half-made and
        convert entries of the old layout. Returns how many were removed."""
        make_directories(self.tmp)
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        converted = 0
        for entry in os.scandir(self.root):
            name = entry.name
            if name.startswith(".removed-"):  # the old layout's removal, half done
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.startswith(_OLD_ASIDE):
                self._finish_conversion(name[len(_OLD_ASIDE) :])
            elif name.endswith(ENVELOPE_SUFFIX):
                queue_id = name[: -len(ENVELOPE_SUFFIX)]
                if valid_id(queue_id) and not os.path.lexists(self.root / queue_id):
                    os.unlink(entry.path)  # its entry was removed, then the crash came
        for entry in os.scandir(self.root):
            if valid_id(entry.name) and entry.is_dir(follow_symlinks=False):
                converted += self._convert(entry.name)
        if converted:
            fsync_directory(self.root)
            log.info("start-up: {n} queue entr(ies) converted to one file each", n=converted)
        return removed

    def _convert(self, queue_id: str) -> int:
        """Rewrite an entry of the old layout as one file (1), or leave it (0, logged)."""
        old = self.root / queue_id
        try:
            envelope = Envelope.from_json((old / OLD_ENVELOPE_FILE).read_bytes())
            staging = self.tmp / queue_id
            with open(old / OLD_DATA_FILE, "rb") as data:
                writer_child.write_file(staging, _chain_file(envelope.to_json(), data))
        except (QueueError, OSError) as e:
            log.error("{qid}: queue entry unreadable, left alone: {error}", qid=queue_id, error=e)
            return 0
        aside = self.root / (_OLD_ASIDE + queue_id)
        os.rename(old, aside)
        os.rename(staging, old)
        fsync_directory(self.root)
        shutil.rmtree(aside, ignore_errors=True)
        return 1

    def _finish_conversion(self, queue_id: str) -> None:
        """A conversion a crash cut short: the new file is in place, or the old directory goes back."""
        aside = self.root / (_OLD_ASIDE + queue_id)
        if os.path.isfile(self.root / queue_id):
            shutil.rmtree(aside, ignore_errors=True)
        elif valid_id(queue_id):
            os.rename(aside, self.root / queue_id)  # converted again below

    def path(self, queue_id: str) -> Path:
        """The entry's file (its envelope's first version, then the data)."""
        if not valid_id(queue_id):
            raise QueueError(f"not a queue ID: {queue_id!r}")
        return self.root / queue_id

    def data_path(self, queue_id: str) -> Path:
        """Where the data is: after the entry file's first line (`open_data`)."""
        return self.path(queue_id)

    def exists(self, queue_id: str) -> bool:
        return self.path(queue_id).is_file()

    def enqueue(
        self,
        envelope: Envelope,
        parts: Iterable[bytes],
        sync_directory: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a new entry durably and return its file (blocking).

        The filing engine's own entry write (`mailx.storage.writer_child`),
        for callers outside a message's filing (tools, tests).
        ``sync_directory``: a batch's, which fsyncs the queue directory once
        for every entry of the batch before any is acknowledged; without it,
        fsynced here.  Fills in ``envelope.size`` and ``envelope.eight_bit``
        from ``parts``.  Raises FileExistsError if an entry of that ID exists
        (bounce and delay notices have IDs derived from their message's, so
        a notice is never queued twice).
        """
        self.path(envelope.id)  # a valid ID, never a path
        chunks = list(parts)
        final, envelope.size, envelope.eight_bit = write_entry(
            self.root, envelope.to_fields(), lambda: iter(chunks), sync_directory
        )
        return final

    def save(self, queue_id: str, data: bytes) -> None:
        """Replace an entry's envelope atomically (``data`` is `Envelope.to_json`).

        FileNotFoundError when the entry is gone (removed with ``mailxctl``),
        before or while the envelope was written.
        """
        entry = self.path(queue_id)
        if not entry.is_file():
            raise FileNotFoundError(f"no queue entry {queue_id}")
        new = self.tmp / (queue_id + ENVELOPE_SUFFIX)
        fd = os.open(
            new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        envelope = self.root / (queue_id + ENVELOPE_SUFFIX)
        os.rename(new, envelope)
        fsync_directory(self.root)
        if not entry.is_file():
            # Removed meanwhile: this envelope belongs to nothing.
            envelope.unlink(missing_ok=True)
            raise FileNotFoundError(f"no queue entry {queue_id}")

    def load(self, queue_id: str) -> Envelope:
        path = self.path(queue_id)
        try:
            data: bytes | None = path.with_name(queue_id + ENVELOPE_SUFFIX).read_bytes()
        except FileNotFoundError:
            data = None  # never changed: the first line is the envelope
        try:
            with open(path, "rb") as f:
                first = f.readline(ENVELOPE_LIMIT)
        except FileNotFoundError:
            raise QueueError(f"no queue entry {queue_id}") from None
        except IsADirectoryError:
            # The old layout, until the server's start-up converts it
            # (``mailxctl queue`` beside a server not yet restarted).
            first = (path / OLD_ENVELOPE_FILE).read_bytes()
        if data is None:
            if not first.endswith(b"\n"):
                raise QueueError(f"entry {queue_id}: no whole envelope line")
            data = first
        envelope = Envelope.from_json(data)
        if envelope.id != queue_id:
            raise QueueError(f"entry {queue_id} holds the envelope of {envelope.id}")
        return envelope

    def ids(self) -> list[str]:
        """Every entry's ID, oldest first (IDs start with the time they were made)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            e.name
            for e in entries
            if valid_id(e.name) and (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False))
        )

    def scan(self) -> list[Envelope]:
        """Every readable entry; unreadable ones are logged and left alone (never deleted)."""
        envelopes = []
        for queue_id in self.ids():
            try:
                envelopes.append(self.load(queue_id))
            except (QueueError, OSError) as e:
                log.error(
                    "{qid}: queue entry unreadable, left alone: {error}", qid=queue_id, error=e
                )
        return envelopes

    def remove(self, queue_id: str) -> bool:
        """Delete an entry; False if there was none.  Safe while the server runs (see above)."""
        [result] = self.remove_many([self.path(queue_id).name])
        if isinstance(result, OSError):
            raise result
        return result

    def remove_many(self, queue_ids: Sequence[str]) -> list[bool | OSError]:
        """`remove` for several entries, with one fsync of the queue directory
        for all their unlinks: each one's result, True, False or its error."""
        results: list[bool | OSError] = [
            OSError(r) if isinstance(r, str) else r
            for r in writer_child.unlink_entries(self.root, queue_ids)
        ]
        if True in results:
            try:
                self._sync_root_after()
            except OSError as e:
                # Unlinked but perhaps not durably: report it, as remove would.
                results = [e if r is True else r for r in results]
        return results

    def _sync_root_after(self) -> None:
        """Make this thread's unlinks in the queue directory durable, sharing fsyncs.

        Removals finish in several disk threads at once; one fsync of the
        directory covers every unlink made before it started, so a thread
        whose unlink an fsync begun since has covered is done without one
        of its own (group commit; an fsync each cost the disk as much as
        the rest of the removal).
        """
        with self._counter_lock:
            self._renames += 1
            mine = self._renames
        with self._sync_lock:
            if self._synced >= mine:
                return
            with self._counter_lock:
                covered = self._renames
            fsync_directory(self.root)
            self._synced = covered

    def read_header(self, queue_id: str, limit: int = 256 * 1024) -> bytes:
        """The data's header section (up to the empty line), at most ``limit`` octets."""
        with open_data(self.data_path(queue_id)) as f:
            head = f.read(limit)
        if head.startswith(b"\r\n"):
            return b""
        end = head.find(b"\r\n\r\n")
        return head[: end + 2] if end >= 0 else head

    def request_flush(self) -> Path:
        """Ask the running server to retry everything now (``mailxctl queue flush``)."""
        flag = self.root / FLUSH_FILE
        fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return flag

    def take_flush_request(self) -> bool:
        """True once per ``request_flush``: the server's side of it."""
        try:
            os.unlink(self.root / FLUSH_FILE)
        except FileNotFoundError:
            return False
        return True


FLUSH_FILE = ".flush"
# An old-layout entry's directory, renamed while its one file takes its name.
_OLD_ASIDE = ".converting-"


def open_data(path: Path) -> BinaryIO:
    """An entry's file, for reading its data: past the envelope line (blocking).

    An entry of the old layout (a directory) opens its data file.
    """
    if path.is_dir():
        return open(path / OLD_DATA_FILE, "rb")  # noqa: SIM115 - the caller closes it
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        line = f.readline(ENVELOPE_LIMIT)
        if not line.endswith(b"\n"):
            raise QueueError(f"{path}: no envelope line")
    except BaseException:
        f.close()
        raise
    return f


def _chain_file(first: bytes, f: BinaryIO) -> Iterator[bytes]:
    yield first
    while chunk := f.read(1024 * 1024):
        yield chunk


def envelope_summary(envelope: Envelope, now: float) -> dict[str, Any]:
    """The fields ``mailxctl queue list`` shows, as JSON-ready values."""
    pending = envelope.pending
    next_attempt = min((r.next_attempt for r in pending), default=None)
    return {
        "id": envelope.id,
        "kind": envelope.kind,
        "age": max(0.0, now - envelope.created),
        "created": envelope.created,
        "size": envelope.size,
        "sender": envelope.sender,
        # None: not checked (the sender may get a bounce, as before); see dsn.notice_refusal.
        "spf": envelope.spf,
        "dmarc": envelope.dmarc,
        "next_attempt": next_attempt,
        "recipients": [
            {
                "address": r.address,
                "original": r.original,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt if r.state == PENDING else None,
                "last_reply": r.last_reply,
                "last_host": r.last_host,
                "transport": r.transport,
            }
            for r in envelope.recipients
        ],
    }
