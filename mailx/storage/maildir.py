# -*- test-case-name: tests.test_writer,tests.test_hardening -*-
"""Durable Maildir delivery, as Dovecot reads it.

Twisted's maildir code never fsyncs (research notes section 6), so this is
the whole sequence by hand: create in ``tmp/`` with O_EXCL, write, fsync the
file, rename into ``new/``, fsync ``new/``.  After the last fsync the message
survives a power cut; before the rename it is invisible to readers.  All of
it blocks, so callers run it in a worker thread or the writer child.

Standard library only: `mailx.storage.writer_child` runs it without site-packages.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

SUBDIRS = ("tmp", "new", "cur")
JUNK_FOLDER = ".Junk"  # Maildir++ folder name Dovecot shows as "Junk"
# A dot, then names separated by dots: no slash, no empty level, no control character.
_FOLDER = re.compile(r"\A(\.[^./\x00-\x1f\x7f]+)+\Z")

_pid = os.getpid()


def _safe_host(hostname: str) -> str:
    # maildir(5): "/" and ":" in the host part are written as \057 and \072.
    return hostname.replace("/", r"\057").replace(":", r"\072")


def make_directories(path: Path, mode: int = 0o700) -> None:
    """``os.makedirs`` that makes each new directory durable: its parent is fsynced.

    A directory's entry lives in its parent; until the parent is fsynced a
    power cut can take the new directory away, and with it a message fsynced
    inside it and already acknowledged (a kill -9 cannot show this: the page
    cache survives a process).  The fsyncs happen once, when a directory is
    created; an existing one costs a stat.
    """
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass  # made meanwhile by another writer, perhaps not yet synced: sync it too
        fsync_directory(directory.parent)


def ensure_maildir(path: Path) -> None:
    """Create ``path/{tmp,new,cur}`` (mode 0700) if missing, durably."""
    for sub in SUBDIRS:
        make_directories(path / sub)


def ensure_folder(maildir: Path, folder: str = JUNK_FOLDER) -> Path:
    """A Maildir++ subfolder such as ``.Junk`` or ``.Work.Clients``, with its
    ``maildirfolder`` marker: Dovecot's layout, every level one flat directory
    under the mailbox, made on first use."""
    if not _FOLDER.match(folder) or ".." in folder:
        raise ValueError(f"not a Maildir++ folder name: {folder!r}")
    path = maildir / folder
    ensure_maildir(path)
    marker = path / "maildirfolder"
    if not marker.exists():
        marker.touch(mode=0o600)
        fsync_directory(path)
    return path


def unique_name(queue_id: str, copy: int, hostname: str) -> str:
    """``<sec>.M<usec>P<pid>Q<queue id>R<copy>.<host>`` (maildir(5)); unique by the queue ID."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{_pid}Q{queue_id}R{copy}.{_safe_host(hostname)}"


_OUR_NAME = re.compile(r"^\d+\.M\d+P\d+Q[0-9A-F]+R\d+\.")


def write_message(
    maildir: Path,
    name: str,
    parts: Iterable[bytes],
    sync_directory: Callable[[Path], None] | None = None,
    flags: str = "",
) -> Path:
    """Write one message durably into ``maildir/new/name,S=<size>``; blocking.

    The size suffix is Dovecot's (it spares Dovecot a stat for quota).
    ``sync_directory`` makes the rename durable; by default the directory is
    fsynced at once, a group commit passes its own to fsync once per batch.
    With ``flags`` the message goes to ``cur/`` with the Maildir info
    ``:2,<flags>`` (maildir(5): files in ``new/`` carry no info).

    On any error the partial ``tmp/`` file is removed and the error raised:
    nothing half-written is ever visible in ``new/``.
    """
    return publish(stage_message(maildir, name, parts, flags), sync_directory)


class Staged:
    """A message written and fsynced in ``tmp/``, not yet visible: `publish` renames it."""

    __slots__ = ("final", "tmp")

    def __init__(self, tmp: Path, final: Path) -> None:
        self.tmp, self.final = tmp, final

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def stage_message(maildir: Path, name: str, parts: Iterable[bytes], flags: str = "") -> Staged:
    """The first half of `write_message`: the file in ``tmp/``, fsynced (blocking)."""
    tmp = maildir / "tmp" / name
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        ensure_maildir(maildir)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            for part in parts:
                size += len(part)
                view = memoryview(part)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        Staged(tmp, tmp).discard()
        raise
    if flags:
        return Staged(tmp, maildir / "cur" / f"{name},S={size}:2,{flags}")
    return Staged(tmp, maildir / "new" / f"{name},S={size}")


def publish(staged: Staged, sync_directory: Callable[[Path], None] | None = None) -> Path:
    """The second half of `write_message`: rename into place, then make the rename durable."""
    try:
        os.rename(staged.tmp, staged.final)
    except BaseException:
        staged.discard()
        raise
    (sync_directory or fsync_directory)(staged.final.parent)
    return staged.final


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_message(path: Path) -> None:
    """Take back a delivered copy (used when a later copy of the same message failed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_directory(path.parent)


def clean_tmp(maildir: Path) -> int:
    """Remove our own leftovers in ``tmp/`` (a crash mid-write); returns how many.

    Only files named by ``unique_name`` are touched: another delivery agent
    (Dovecot's LDA) may be writing its own files there.
    """
    removed = 0
    try:
        folders = [maildir] + [
            Path(e.path) for e in os.scandir(maildir) if e.name.startswith(".") and e.is_dir()
        ]
    except FileNotFoundError:
        return 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder / "tmp"))
        except FileNotFoundError:
            continue
        for entry in entries:
            if _OUR_NAME.match(entry.name):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def lf_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF to LF, as Maildir files conventionally are, across chunk boundaries."""
    carry = b""
    for chunk in chunks:
        chunk = carry + chunk
        if chunk.endswith(b"\r"):
            chunk, carry = chunk[:-1], b"\r"
        else:
            carry = b""
        yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry
