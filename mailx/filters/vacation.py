# -*- test-case-name: tests.test_vacation -*-
"""Vacation replies (RFC 5230, RFC 6131, RFC 3834): the memory and the message.

The interpreter decides from the message whether a reply may go at all
(`Action.reply_to` / `skip_reason`); this module adds what needs the
mailbox's state: one reply per sender and handle per period, remembered in
a file in the mailbox's home that survives restarts and kill -9 (written
whole to a temporary file, fsynced, renamed over the old one) and stays
small (expired entries pruned on every write, at most `MAX_ENTRIES`).
"""

from __future__ import annotations

import contextlib
import email.policy
import email.utils
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

from .interpreter import Action, Message, _decode_2047

# In the home beside Pigeonhole's files; Dovecot (maildir_stat_dirs) does
# not take a dot-named file for a folder.
MEMORY_FILE = ".mailx.vacation"
# The memory of one mailbox: the oldest entries go first beyond this.
MAX_ENTRIES = 10_000
# RFC 5230 4.7: a subject is cut, not refused; keep a reply's header sane.
MAX_SUBJECT = 200

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Replied:
    """One remembered reply: to ``sender``, not again before ``until``."""

    until: int
    key: str
    sender: str


def memory_key(sender: str, action: Action) -> str:
    """RFC 5230 4.2: per sender and handle; the default handle is the arguments'."""
    handle = action.handle or "\0".join(
        [action.target, action.subject or "", action.from_ or "", *action.addresses]
    )
    return hashlib.sha256(f"{sender.lower()}\0{handle}".encode()).hexdigest()[:32]


class VacationMemory:
    """The "already replied" memory of one mailbox's home."""

    def __init__(self, home: Path) -> None:
        self.path = home / MEMORY_FILE

    def entries(self, now: float | None = None) -> list[Replied]:
        """The entries, without those expired by ``now`` if it is given."""
        try:
            text = self.path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            until, _, rest = line.partition(" ")
            key, _, sender = rest.partition(" ")
            if not until.isdigit() or not key:
                continue  # a line of a format we no longer write
            if now is None or int(until) > now:
                found.append(Replied(int(until), key, sender))
        return found

    def replied(self, key: str, now: float) -> bool:
        return any(e.key == key for e in self.entries(now))

    def record(self, key: str, sender: str, seconds: int, now: float) -> None:
        """Remember a reply, durably; blocking (fsync)."""
        with self._locked():
            entries = [e for e in self.entries(now) if e.key != key]
            entries.append(Replied(int(now) + seconds, key, _one_line(sender)))
            self._write(entries[-MAX_ENTRIES:])

    def clear(self) -> None:
        with self._locked():
            self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Threads of this process, then other processes (mailxctl vacation off)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        with _lock(self.path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _write(self, entries: list[Replied]) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = "".join(f"{e.until} {e.key} {e.sender}\n" for e in entries).encode()
        # The home is the user's: never write through a link planted at our name.
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


def _one_line(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and not c.isspace())[:320]


def reply_message(action: Action, mailbox: str, original: Message, now: float) -> bytes:
    """The RFC 5230 5 / RFC 3834 3 reply to ``original``, as bytes to queue.

    From the mailbox (or ``:from``), To the sender, Subject ``:subject`` or
    "Auto: " and the original's, ``Auto-Submitted: auto-replied``, and the
    threading fields; the body text/plain UTF-8, or the ``:mime`` entity
    as the script gave it.
    """
    headers = EmailMessage(policy=email.policy.SMTP)
    headers["From"] = action.from_ or mailbox
    headers["To"] = action.reply_to
    subject = action.subject
    if subject is None:
        originals = original.values("subject")
        # RFC 5230 5.5 / Pigeonhole: "Auto: " and the original subject.
        subject = "Auto: " + _decode_2047(originals[0]) if originals else "Automated reply"
    headers["Subject"] = _one_line_text(subject)[:MAX_SUBJECT]
    headers["Date"] = email.utils.format_datetime(datetime.fromtimestamp(now, UTC))
    domain = mailbox.rpartition("@")[2] or None
    headers["Message-ID"] = email.utils.make_msgid(domain=domain)
    message_ids = original.values("message-id")
    if message_ids:
        # RFC 3834 3.1.5: In-Reply-To the original, References its chain.
        headers["In-Reply-To"] = message_ids[0]
        references = original.values("references")
        headers["References"] = " ".join([*references[:1], message_ids[0]])
    headers["Auto-Submitted"] = "auto-replied"  # RFC 3834 5
    headers["Precedence"] = "bulk"  # what Pigeonhole adds, for older filters
    if action.mime:
        # RFC 5230 4.4: the reason is a MIME part, headers included.
        headers["MIME-Version"] = "1.0"
        entity = action.target.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
        return headers.as_bytes().removesuffix(b"\r\n") + entity
    # Quoted-printable, not 8bit: the relay may not offer 8BITMIME.
    headers.set_content(action.target, charset="utf-8", cte=None if action.target.isascii() else "quoted-printable")
    return headers.as_bytes()


def _one_line_text(text: str) -> str:
    return " ".join(text.split())
