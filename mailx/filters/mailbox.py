# -*- test-case-name: tests.test_filters_mailbox -*-
"""A mailbox's Sieve scripts, run on its copy of a message (SPEC 12).

The pipeline asks `MailboxFilters.outcome` what one mailbox's filters make
of a message and gets a `FilterOutcome` value; it files, forwards and
replies.  The scripts are where Pigeonhole keeps them (the home
``<mail>/<domain>/<mailbox>/``: ``sieve/*.sieve``, the active one the
relative symlink ``.dovecot.sieve``), so that Dovecot's ManageSieve manages
them.  ``domains.<d>.sieve_before`` runs first.

Everything here is blocking (stat, reading scripts, the vacation memory's
fsync): the pipeline calls it off the reactor thread.  Given the reactor,
`MailboxFilters` learns of changes to the scripts from inotify instead of
statting them for every message (a third of the filters' cost in
bench/filters.py, each syscall waiting for the busy reactor to hand the GIL
back), and `MailboxFilters.needs_thread` tells the reactor thread, from that
cache, which mailboxes have no script to run.  Nothing here raises
into the pipeline: any failure is `KEEP`, logged, and written to
``.dovecot.sieve.log`` in the home, as Pigeonhole does.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
)

from mailx.text import Logger

from .folders import FolderError, maildir_flags, maildir_folder
from .outcome import KEEP, Copy, FilterOutcome, VacationReply

if TYPE_CHECKING:
    from mailx.config import Config
    from mailx.inbound.routing import MailboxDestination

    from .interpreter import Action, Message
    from .parser import Command

# The Sieve parser, interpreter and vacation code are imported where a
# script is found: a server whose mailboxes have none never loads them.

log = Logger(namespace="mailx.filters")

ACTIVE_LINK = ".dovecot.sieve"
SCRIPT_DIRECTORY = "sieve"
USER_LOG = ".dovecot.sieve.log"
MAX_CACHED_HOMES = 100_000  # far more mailboxes than one server files for
# Pigeonhole rotates the user's log to .dovecot.sieve.log.0 past 10 kB.
MAX_USER_LOG = 10 * 1024
# Compiled scripts kept: each is a small tree; a server with more active
# mailboxes than this recompiles the least recently used.
MAX_CACHED_SCRIPTS = 4096


@dataclass(frozen=True)
class _Script:
    path: Path
    # Where errors go: the home's log for the user's script, None for the admin's.
    user_log: Path | None


@dataclass
class _Compiled:
    stamp: tuple[int, int, int, int]
    commands: list[Command] | None
    error: str
    needs_body: bool = False


@dataclass(frozen=True)
class _Resolved:
    """A home's active script as last found on disk, while inotify says it is unchanged."""

    script: _Script | None
    compiled: _Compiled | None


class MailboxFilters:
    """Runs each mailbox's scripts; one instance for the server, thread-safe.

    ``clock`` gives the time in seconds since the epoch: `time.time`, or
    anything with Twisted's ``seconds()`` (a `twisted.internet.task.Clock`
    in tests).  With ``reactor`` (the server's) the scripts' changes come
    from inotify where it works; without it every message stats them.
    """

    def __init__(self, config: Config, clock: Any = time.time, reactor: Any = None) -> None:
        self.config = config
        self._now: Callable[[], float] = clock.seconds if hasattr(clock, "seconds") else clock
        self._cache: OrderedDict[str, _Compiled] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Each mailbox's home, built once: pathlib's joins were a tenth of a
        # 20-rule script's cost (bench/filters.py).  Bounded by the configured mailboxes.
        self._homes: dict[tuple[str, str], Path] = {}
        self._watcher = _ScriptWatcher(reactor) if reactor is not None else None

    def needs_thread(self, destination: MailboxDestination) -> bool:
        """Must this mailbox's filters run in a thread?  False only when the
        cache, kept by inotify, knows it has no script; for the reactor thread.

        Also sets up the watches (inotify_add_watch does not block), so that
        the resolution the thread then makes can be cached.
        """
        watcher = self._watcher
        if watcher is None:
            return True
        home = self.home(destination)
        before = self._sieve_before(destination)
        if before is not None and before not in watcher.compiled:
            watcher.watch_file(before)
        resolved = watcher.resolved.get(home)
        if resolved is None:
            watcher.watch_home(home)
            return True
        return before is not None or resolved.script is not None

    def close(self) -> None:
        """Stop watching (a reload builds new filters); later messages stat again."""
        if self._watcher is not None:
            self._watcher.close()

    # ------------------------------------------------------------ the seam

    def home(self, destination: MailboxDestination) -> Path:
        """The mailbox's home: its Maildir (SPEC 7), as Dovecot's mail_home."""
        key = (destination.domain, destination.mailbox)
        home = self._homes.get(key)
        if home is None:
            if len(self._homes) >= MAX_CACHED_HOMES:
                self._homes.clear()
            home = self._homes[key] = destination.maildir_path(self.config)
        return home

    def outcome(
        self,
        destination: MailboxDestination,
        sender: str,
        recipient_as_given: str,
        header: bytes,
        read_body: Callable[[int], bytes],
        *,
        size: int | None = None,
        queue_id: str = "",
    ) -> FilterOutcome:
        """What this mailbox's filters make of the message; blocking, never raises.

        ``read_body(n)`` gives at most n octets of the body and is called
        only when a script looks at the body; ``size`` (the whole message's)
        is for the ``size`` test, else the octets seen are counted.
        """
        try:
            return self._outcome(destination, sender, recipient_as_given, header, read_body, size, queue_id)
        except Exception as e:  # noqa: BLE001 - no filter outcome loses a message (SPEC 12)
            log.failure(
                "{queue_id} filters of {mailbox} failed; keeping in INBOX",
                queue_id=queue_id, mailbox=destination.address,
            )
            return FilterOutcome(notes=(f"filters failed: {type(e).__name__}: {e}",))

    def record_vacation(self, reply: VacationReply) -> None:
        """Remember a queued reply, so the sender gets no other this period; blocking."""
        local, _, domain = reply.mailbox.rpartition("@")
        if not local or not domain:
            raise ValueError(f"VacationReply without its mailbox: {reply.mailbox!r}")
        home = self.config.paths.mail / domain / local
        from .vacation import VacationMemory

        VacationMemory(home).record(reply.memory_key, reply.recipient, reply.seconds, self._now())

    # ------------------------------------------------------------ running

    def _outcome(
        self,
        destination: MailboxDestination,
        sender: str,
        recipient_as_given: str,
        header: bytes,
        read_body: Callable[[int], bytes],
        size: int | None,
        queue_id: str,
    ) -> FilterOutcome:
        home = self.home(destination)
        scripts = self._scripts(destination, home)
        if not scripts:
            return KEEP
        from .interpreter import MAX_BODY, MAX_REDIRECTS, Envelope, Message, run

        compiled: list[tuple[_Script, list[Command]]] = []
        needs_body = False
        for script, entry in scripts:
            if entry.commands is None:
                return self._failed(script, entry.error, destination, queue_id)
            compiled.append((script, entry.commands))
            needs_body |= entry.needs_body
        body = read_body(MAX_BODY) if needs_body else b""
        if not header.endswith((b"\r\n\r\n", b"\n\n")):
            header += b"\r\n"
        message = Message.from_bytes(header + body)
        if size is not None:
            message = Message(message.headers, message.body, size)
        envelope = Envelope(sender.strip("<>"), recipient_as_given.strip("<>"), destination.address)

        def mailbox_exists(name: str) -> bool:
            try:
                folder = maildir_folder(name)
            except FolderError:
                return False
            return folder == "" or (home / ("." + folder)).is_dir()

        actions: list[Action] = []
        for i, (script, commands) in enumerate(compiled):
            result = run(commands, message, envelope, mailbox_exists)
            if result.error:
                return self._failed(script, result.error, destination, queue_id)
            # SPEC 12: a stop in sieve_before ends the sequence; as in
            # Pigeonhole, so does a script that cancelled the implicit keep.
            # Otherwise only the last script's implicit keep counts.
            last = i == len(compiled) - 1
            ends = not last and (result.stopped or not result.implicit_keep)
            actions += [a for a in result.actions if last or ends or not a.implicit]
            if ends:
                break
        redirects = {a.target.lower() for a in actions if a.kind == "redirect"}
        if len(redirects) > MAX_REDIRECTS:
            error = f"number of redirect actions exceeds policy limit (> {MAX_REDIRECTS})"
            return self._failed(compiled[-1][0], error, destination, queue_id)
        return self._convert(actions, destination, home, sender, message, queue_id)

    def _sieve_before(self, destination: MailboxDestination) -> Path | None:
        before = getattr(self.config.domains.get(destination.domain), "sieve_before", None)
        return Path(before) if before is not None else None

    def _scripts(self, destination: MailboxDestination, home: Path) -> list[tuple[_Script, _Compiled]]:
        """The scripts to run with their compiled form: from the watched cache
        without a syscall, else from disk (and cached if watched meanwhile)."""
        scripts = []
        watcher = self._watcher
        before = self._sieve_before(destination)
        if before is not None:
            entry = watcher.compiled.get(before) if watcher is not None else None
            if entry is None:
                changes = watcher.changes if watcher is not None else 0
                entry = self._compiled(before)
                if watcher is not None:
                    watcher.keep_compiled(before, entry, changes)
            scripts.append((_Script(before, None), entry))
        resolved = watcher.resolved.get(home) if watcher is not None else None
        if resolved is None:
            # Read before looking at the disk: an event after this drops what
            # this finds (SPEC 12: a changed script applies to the next message).
            changes = watcher.changes if watcher is not None else 0
            active = self._active_script(home)
            script = _Script(active, home / USER_LOG) if active is not None else None
            resolved = _Resolved(script, self._compiled(active) if active is not None else None)
            if watcher is not None:
                watcher.keep_resolved(home, resolved, changes)
        if resolved.script is not None and resolved.compiled is not None:
            scripts.append((resolved.script, resolved.compiled))
        return scripts

    def _active_script(self, home: Path) -> Path | None:
        """``.dovecot.sieve``: a link into ``sieve/`` (Pigeonhole's layout) or a file.

        A link that leads out of ``sieve/`` is ignored, as Pigeonhole does: a
        user who can write the home must not make mailx read other files
        (their text would reach the error log).
        """
        # os.path on strings: this runs for every message, pathlib costs more.
        link = os.path.join(home, ACTIVE_LINK)
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError:
            return Path(link) if os.path.isfile(link) else None
        # Lexically, as Pigeonhole: "sieve/x.sieve" (or the same path made
        # absolute), no "..", and the script itself no further link.
        resolved = os.path.normpath(os.path.join(home, target))
        scripts = os.path.join(home, SCRIPT_DIRECTORY)
        if os.path.dirname(resolved) != scripts or not resolved.endswith(".sieve") or os.path.islink(resolved):
            log.warn("active Sieve script {link} points outside {scripts}; ignored", link=link, scripts=scripts)
            return None
        return Path(resolved)

    def _compiled(self, path: Path) -> _Compiled:
        """The compiled script, from the cache while the file is unchanged on disk."""
        try:
            st = os.stat(path)
        except OSError as e:
            return _Compiled((0, 0, 0, 0), None, f"cannot read the script: {e.strerror}")
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        key = str(path)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached.stamp == stamp:
                self._cache.move_to_end(key)
                return cached
        from .interpreter import compile_script
        from .parser import MAX_SCRIPT_SIZE, SieveError

        commands: list[Command] | None = None
        error = ""
        if st.st_size > MAX_SCRIPT_SIZE:
            error = f"the script is larger than {MAX_SCRIPT_SIZE} octets"
        else:
            try:
                with open(path, "rb") as f:
                    source = f.read(MAX_SCRIPT_SIZE + 1)
                commands = compile_script(source)
            except OSError as e:
                error = f"cannot read the script: {e.strerror}"
            except SieveError as e:
                error = f"line {e.line}: error: {e.message}"
            except RecursionError:
                error = "the script is nested too deeply"
        entry = _Compiled(stamp, commands, error, commands is not None and _needs_body(commands))
        with self._cache_lock:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED_SCRIPTS:
                self._cache.popitem(last=False)
        return entry

    def _failed(self, script: _Script, error: str, destination: MailboxDestination, queue_id: str) -> FilterOutcome:
        log.warn(
            "{queue_id} Sieve script {script} of {mailbox} failed: {error}; keeping in INBOX",
            queue_id=queue_id, script=str(script.path), mailbox=destination.address, error=error,
        )
        if script.user_log is not None:
            _append_user_log(script.user_log, script.path, error, self._now())
        return FilterOutcome(notes=(f"Sieve script {script.path.name} failed: {error}",))

    # ------------------------------------------------------------ converting

    def _convert(
        self,
        actions: list[Action],
        destination: MailboxDestination,
        home: Path,
        sender: str,
        message: Message,
        queue_id: str,
    ) -> FilterOutcome:
        """The interpreter's actions as the pipeline's value."""
        copies: dict[str, Copy] = {}
        redirects: list[str] = []
        notes: list[str] = []
        reject: str | None = None
        vacation: VacationReply | None = None
        for a in actions:
            if a.kind in ("keep", "fileinto"):
                try:
                    folder = maildir_folder(a.target)
                except FolderError as e:
                    notes.append(f"{e}: kept in INBOX")
                    folder = ""
                copies[folder] = Copy(folder, maildir_flags(a.flags))
            elif a.kind == "redirect":
                if a.target.lower() not in (r.lower() for r in redirects):
                    redirects.append(a.target)
            elif a.kind == "reject":
                reject = a.target
            elif a.kind == "discard":
                notes.append("discarded by a Sieve script")
            elif a.kind == "vacation":
                vacation = self._vacation(a, destination, home, sender, message, notes)
        for note in notes:
            log.info("{queue_id} {mailbox}: {note}", queue_id=queue_id, mailbox=destination.address, note=note)
        if reject is not None:
            copies.clear()
        return FilterOutcome(
            copies=tuple(copies.values()),
            redirects=tuple(redirects),
            reject=reject,
            vacation=vacation,
            notes=tuple(notes),
        )

    def _vacation(
        self, a: Action, destination: MailboxDestination, home: Path, sender: str, message: Message, notes: list[str]
    ) -> VacationReply | None:
        if not a.reply_to:
            notes.append(f"no vacation reply: {a.skip_reason}")
            return None
        mine = {destination.address.lower(), *(x.lower() for x in a.addresses)}
        if a.reply_to.lower() in mine:
            # RFC 3834 2: never to oneself (it would answer its own reply).
            notes.append("no vacation reply: the sender is this mailbox")
            return None
        from .vacation import VacationMemory, memory_key, reply_message

        key = memory_key(a.reply_to, a)
        now = self._now()
        if VacationMemory(home).replied(key, now):
            notes.append(f"no vacation reply: {a.reply_to} already got one this period")
            return None
        return VacationReply(
            recipient=a.reply_to,
            message=reply_message(a, destination.address, message, now),
            memory_key=key,
            seconds=a.seconds,
            mailbox=destination.address,
        )


class _ScriptWatcher:
    """inotify on each home (and ``sieve/``) and each ``sieve_before``'s
    directory; an event drops what is cached for it.  Runs on the reactor
    thread; the filter threads only read the dicts and store under `lock`.

    A home that cannot be watched (no inotify, the watch limit, no such
    directory yet) is never cached: its messages stat as before.  inotify's
    queue overflow is not reported by Twisted's `INotify`; the queue holds
    16384 events by default, far more than script changes make.
    """

    HOME_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB
    SCRIPT_EVENTS = HOME_EVENTS | IN_MODIFY

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.lock = threading.Lock()
        # Bumped by every event: a resolution begun before one is not kept.
        self.changes = 0
        self.resolved: dict[Path, _Resolved] = {}
        self.compiled: dict[Path, _Compiled] = {}
        self._homes: set[Path] = set()  # watched, with their sieve/ if it exists
        self._directories: dict[Path, set[Path]] = {}  # sieve_before directory: files
        # Made at the first message (on the reactor thread), so that a
        # service built and never started leaves no reader behind.
        self._notifier: Any = None
        self._unavailable = False
        self._closed = False
        # For tests: called after each event is handled.
        self.on_event: Callable[[Path], None] | None = None

    def _started(self) -> Any:
        if self._notifier is None and not (self._closed or self._unavailable):
            try:
                from twisted.internet import inotify

                self._notifier = inotify.INotify(self.reactor)  # type: ignore[no-untyped-call]  # Twisted leaves INotify.__init__ unannotated
                self._notifier.startReading()
            except Exception as e:  # noqa: BLE001 - not Linux, no inotify, or no more instances
                log.info("no inotify ({error}): Sieve scripts are statted for every message", error=str(e))
                self._unavailable = True
                self._notifier = None
        return self._notifier

    def close(self) -> None:
        self._closed = True
        self._forget_all()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def watch_home(self, home: Path) -> None:
        if home in self._homes or self._started() is None:
            return
        if not self._watch(home, self.HOME_EVENTS, self._home_event):
            return
        # sieve/ may not exist yet: its creation is a home event, and the
        # next cold resolution watches it then.
        scripts = home / SCRIPT_DIRECTORY
        if os.path.isdir(scripts) and not self._watch(scripts, self.SCRIPT_EVENTS, self._scripts_event):
            return
        self._homes.add(home)

    def watch_file(self, path: Path) -> None:
        directory = path.parent
        files = self._directories.get(directory)
        if files is None:
            if self._started() is None or not self._watch(directory, self.SCRIPT_EVENTS, self._file_event):
                return
            files = self._directories[directory] = set()
        files.add(path)

    def keep_resolved(self, home: Path, resolved: _Resolved, changes: int) -> None:
        with self.lock:
            if changes == self.changes and home in self._homes:
                if len(self.resolved) >= MAX_CACHED_HOMES:
                    self.resolved.clear()
                self.resolved[home] = resolved

    def keep_compiled(self, path: Path, entry: _Compiled, changes: int) -> None:
        with self.lock:
            if changes == self.changes and path in self._directories.get(path.parent, ()):
                self.compiled[path] = entry

    def _watch(self, path: Path, mask: int, callback: Callable[[Path, Any, int], None]) -> bool:
        from twisted.python.filepath import FilePath

        try:
            self._notifier.watch(FilePath(str(path)), mask, callbacks=[lambda _, child, m: callback(path, child, m)])
        except Exception as e:  # noqa: BLE001 - INotifyError: no such directory, or the watch limit
            log.debug("cannot watch {path} ({error}): statting its scripts", path=str(path), error=str(e))
            return False
        return True

    def _home_event(self, home: Path, child: Any, mask: int) -> None:
        if child.basename() in (ACTIVE_LINK.encode(), SCRIPT_DIRECTORY.encode()) or mask & IN_DELETE_SELF:
            self._drop_home(home, mask)
        self._handled(home, mask)

    def _scripts_event(self, scripts: Path, child: Any, mask: int) -> None:
        self._drop_home(scripts.parent, mask)
        self._handled(scripts.parent, mask)

    def _file_event(self, directory: Path, child: Any, mask: int) -> None:
        with self.lock:
            self.changes += 1
            for path in self._directories.get(directory, ()):
                self.compiled.pop(path, None)
        if mask & IN_DELETE_SELF:
            self._lost()
        self._handled(directory, mask)

    def _drop_home(self, home: Path, mask: int) -> None:
        with self.lock:
            self.changes += 1
            self.resolved.pop(home, None)
            # Watched again (sieve/ made or replaced) at its next message.
            self._homes.discard(home)
        if mask & IN_DELETE_SELF:
            self._lost()

    def _lost(self) -> None:
        """Twisted's `INotify` stops altogether when a watched directory is
        deleted (IN_DELETE_SELF); start afresh, every home cold."""
        self._forget_all()
        # It closes itself after this callback; the next message makes another.
        self._notifier = None

    def _forget_all(self) -> None:
        with self.lock:
            self.changes += 1
            self.resolved.clear()
            self.compiled.clear()
            self._homes.clear()
            self._directories.clear()

    def _handled(self, path: Path, mask: int) -> None:
        if self.on_event is not None:
            self.on_event(path)


def _needs_body(commands: list[Command]) -> bool:
    """Does a script look at the body (``body``) or the size (``size``)?"""
    for c in commands:
        if any(_test_needs_body(t) for t in c.tests) or (c.block and _needs_body(c.block)):
            return True
    return False


def _test_needs_body(test: Any) -> bool:
    return test.name in ("body", "size") or any(_test_needs_body(t) for t in test.tests)


def _append_user_log(path: Path, script: Path, error: str, now: float) -> None:
    """Pigeonhole's user log: one line per error, rotated to ``.0`` past `MAX_USER_LOG`."""
    try:
        if path.stat().st_size > MAX_USER_LOG:
            os.replace(path, path.with_name(path.name + ".0"))
    except FileNotFoundError:
        pass
    stamp = datetime.fromtimestamp(now, UTC).strftime("%b %d %H:%M:%S")
    line = f"{stamp} {script.stem}: {error}"
    line = "".join(c if c.isprintable() else "?" for c in line)[:1000] + "\n"
    try:
        # O_NOFOLLOW: the home is the user's, and a link there must not make
        # the server append to one of its own files.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError as e:
        log.warn("cannot write {path}: {error}", path=str(path), error=e.strerror)


__all__ = ["MailboxFilters"]
