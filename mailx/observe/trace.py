# -*- test-case-name: tests.test_trace -*-
"""The trace record: every message's events, kept on disk for `mailxctl trace`.

The same seam as `mailx.observe.metrics`: mailx already logs one
structured event per step of a message, each with its queue ID (``qid``)
or its session's ID (``session``); the line that links the two is the
sender's (``{qid}: session=... from=<...>``); the filters' ``queue_id`` counts
as ``qid``.  `TraceRecord` is a
`twisted.logger` observer that keeps those events, and only those, as
one JSON line each in ``trace-YYYY-MM-DD.jsonl`` (UTC) under
``logging.trace.path``.  A record is the event itself minus Twisted's
objects: ``log_time``, ``log_format``, ``log_namespace``, ``log_level``
(its name) and the event's own fields, so the reader formats the very
line the text log showed (`twisted.logger.formatEvent`) and a script can
select on ``qid``, ``event`` or ``rcpt`` with jq.

Cost on the reactor thread: each kept event becomes its JSON line where it
is logged (`as_record`, `as_line`: about 3 microseconds) and joins a deque.
A thread (``mailx-trace``) wakes every `FLUSH_SECONDS` (sooner when
`WAKE_AT` lines wait), appends them with one ``write`` per file, and
fdatasyncs every `SYNC_SECONDS`: work that releases the GIL, so the thread
does not compete with the reactor for it.  (Making the JSON in that thread
with the json module cost 8% of messages per second in paired
``bench/run.py --observe`` runs: in one process, work in another thread is
the reactor's work all the same.)

Durability: a kill -9 loses the events not yet handed to the kernel (at
most the last second), a power cut those not yet synced (at most the last
`SYNC_SECONDS`).  The record describes mail, it holds none, so it is
synced less often than it is written: a sync a second of its megabyte or
two waited in the disk's queue with the queue entries' fsyncs, which hold
up the ``250`` (bench/README.md, session 8).  Nothing is rewritten in
place, so a crash can leave at most one torn last line; the next start puts
a newline after it and the reader skips lines that are not JSON.  Memory is
bounded: past `MAX_PENDING` waiting events (a disk that stalls for minutes)
new ones are dropped and the drop is logged.

Bounded on disk too: one file per UTC day; at start-up and at each new
day, files older than ``keep_days`` days are removed.

Reading (`story`, `render`) is for ``mailxctl trace``, a separate process:
it finds the queue IDs (given, or logged with the Message-ID at the end of
DATA) and their sessions, then collects in file order every record of those
queue IDs, of the notices sent about them (``<qid>B`` bounce, ``<qid>D``
delay), and the session-only records (connect, TLS, disconnect) of their
sessions.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from mailx.observe.jsonlog import _value
from mailx.storage import maildir
from mailx.text import Logger

__all__ = ["TraceRecord", "file_name", "prune", "read_records", "render", "story"]

log = Logger(namespace="mailx.trace")

# How often the thread writes (the most a kill -9 can take), and how often it
# syncs what it wrote (the most a power cut can take).
FLUSH_SECONDS = 1.0
SYNC_SECONDS = 10.0
# Waiting events that wake the thread early (a burst), and the most kept.
WAKE_AT = 2000
MAX_PENDING = 50_000  # about 20 MiB of lines: a disk stalled for minutes
# Notices about a message are queued as <qid> plus one letter (outbound.relay).
NOTICE_SUFFIXES = ("B", "D")
_FILE = re.compile(r"trace-(\d{4}-\d{2}-\d{2})\.jsonl")


def file_name(day: date) -> str:
    return f"trace-{day.isoformat()}.jsonl"


def _day_of(seconds: float) -> date:
    return datetime.fromtimestamp(seconds, UTC).date()


def prune(directory: Path, keep_days: int, now: float) -> list[Path]:
    """Remove the day files older than ``keep_days`` days before ``now``'s (UTC) day."""
    oldest = _day_of(now) - timedelta(days=keep_days)
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        found = _FILE.fullmatch(name)
        if found is None:
            continue
        try:
            day = date.fromisoformat(found[1])
        except ValueError:
            continue
        if day < oldest:
            path = directory / name
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


_PLAIN = frozenset((str, int, float, type(None)))
# The rare event orjson refuses (a lone surrogate, an integer past 64 bits):
# ASCII, every other character as JSON escapes it, whatever a stranger sent.
_ENCODE = json.JSONEncoder(default=str, check_circular=False).encode
# Dataclasses and datetimes go to jsonlog's _value (their text), as jsonlog
# writes them, with bytes and any other type orjson does not know; dict keys as text.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def as_record(event: LogEvent) -> dict[str, Any]:
    """The event as it is stored: its own fields, then Twisted's keys that format it.

    Every field, even those jsonlog leaves to its core record ("why" is
    one): the reader formats the line from them.
    """
    record: dict[str, Any] = {k: v for k, v in event.items() if k[:4] != "log_"}
    level = event.get("log_level")
    record["log_level"] = getattr(level, "name", None)
    record["log_namespace"] = event.get("log_namespace")
    record["log_format"] = event.get("log_format")
    record["log_time"] = event.get("log_time")
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["log_error"] = failure.getErrorMessage()
        except Exception:
            record["log_error"] = repr(failure)
    if "qid" not in record and "queue_id" in record:
        record["qid"] = record["queue_id"]  # mailx.filters names it so
    return record


def as_line(record: dict[str, Any]) -> bytes:
    """``record`` as one line of JSON (UTF-8; newlines and control characters
    escaped), without its newline.

    This is the record's cost on the reactor thread, per event: orjson
    takes about a tenth of the standard library's time for these records
    (0.5 against 4-5 microseconds here).
    """
    try:
        return orjson.dumps(record, default=_value, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError
        plain = {k: v if type(v) in _PLAIN else _value(v) for k, v in record.items()}
        return _ENCODE(plain).encode("ascii")


@implementer(ILogObserver)
class TraceRecord:
    """The log observer that keeps each message's events, and its writing thread."""

    def __init__(
        self,
        directory: Path,
        keep_days: int,
        clock: Callable[[], float] = time.time,
        flush_seconds: float = FLUSH_SECONDS,
        sync_seconds: float = SYNC_SECONDS,
    ) -> None:
        self.directory = directory
        self.keep_days = keep_days
        self.clock = clock
        self.flush_seconds = flush_seconds
        self.sync_seconds = sync_seconds
        self._synced_at = time.monotonic()
        self._unsynced = False  # written since the last sync
        self._pending: deque[tuple[date, bytes]] = deque()
        self._today: tuple[float, float, date] = (0.0, 0.0, date.min)  # [start, end) of a UTC day
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._open_day: date | None = None
        self._fd: int | None = None
        self._dropped = 0
        self._failing = False

    # -- the observer (reactor thread, or whichever thread logs) ---------------

    def __call__(self, event: LogEvent) -> None:
        if "qid" not in event and "session" not in event and "queue_id" not in event:
            return
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self._dropped += 1
            return
        try:
            record = as_record(event)
            line = as_line(record)
        except Exception:  # a malformed event must not break logging
            return
        when = record.get("log_time")
        if not isinstance(when, int | float):
            when = self.clock()
        start, end, day = self._today
        if not start <= when < end:
            day = _day_of(when)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
            self._today = (start, start + 86400.0, day)
        pending.append((day, line))
        if len(pending) == WAKE_AT:
            self._wake.set()

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        """Make the directory (0700: it holds addresses), prune, start the thread, observe."""
        maildir.make_directories(self.directory)
        prune(self.directory, self.keep_days, self.clock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mailx-trace", daemon=True)
        self._thread.start()
        globalLogPublisher.addObserver(self)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop observing; write and fsync what is left (blocks up to ``timeout``)."""
        globalLogPublisher.removeObserver(self)
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout)

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self.flush_seconds)
                self._wake.clear()
                stopping = self._stopping
                try:
                    self._write_pending()
                    if stopping or time.monotonic() - self._synced_at >= self.sync_seconds:
                        self._sync()
                except Exception:
                    log.failure("trace: writing the record failed")
                if stopping:
                    break
        finally:
            self._close()

    def _write_pending(self) -> None:
        pending = self._pending
        lines: dict[date, list[bytes]] = {}
        while pending:
            day, line = pending.popleft()
            lines.setdefault(day, []).append(line)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            log.error("trace: {n} event(s) not recorded: the writer fell behind", n=dropped)
        for day in sorted(lines):
            self._append(day, b"\n".join(lines[day]) + b"\n")

    def _append(self, day: date, data: bytes) -> None:
        try:
            fd = self._file_for(day)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._unsynced = True
        except OSError as e:
            if not self._failing:
                log.error(
                    "trace: cannot write {path}: {error}; the trace record misses events",
                    path=str(self.directory / file_name(day)),
                    error=e.strerror or str(e),
                )
            self._failing = True
            self._close()
            return
        if self._failing:
            log.info("trace: writing {path} again", path=str(self.directory / file_name(day)))
            self._failing = False

    def _sync(self) -> None:
        self._synced_at = time.monotonic()
        if self._fd is None or not self._unsynced:
            return
        self._unsynced = False
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            log.error("trace: cannot sync {path}: {error}", path=str(self.directory), error=e)

    def _file_for(self, day: date) -> int:
        if self._fd is not None and self._open_day is not None and day <= self._open_day:
            # Events of an earlier day that arrive after midnight stay in today's file.
            return self._fd
        self._sync()  # the day that ends, before its file is closed
        self._close()
        path = self.directory / file_name(day)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if created:
                maildir.fsync_directory(self.directory)
            elif _torn(fd):
                os.write(fd, b"\n")  # after a crash mid-line: the next record on its own line
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._open_day = fd, day
        prune(self.directory, self.keep_days, self.clock())
        return fd

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        self._open_day = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _torn(fd: int) -> bool:
    """Whether the file does not end with a newline (a write cut short by a crash)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


# ---------------------------------------------------------------------------
# Reading: mailxctl trace


def _written(text: str) -> set[bytes]:
    """How ``text`` appears inside a line: as orjson writes it (UTF-8), and as
    the fallback encoder does (ASCII escapes, see `as_line`)."""
    forms = {json.dumps(text)[1:-1].encode("ascii")}
    try:
        forms.add(orjson.dumps(text)[1:-1])
    except TypeError:
        pass  # a lone surrogate: only the fallback could have written it
    return forms


def day_files(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names) if _FILE.fullmatch(n)]


def read_records(
    directory: Path, contains: Iterable[str] = ()
) -> Iterator[dict[str, Any]]:
    """Every record in order, oldest file first; torn or foreign lines are skipped.

    ``contains``: only lines with one of these strings in them (a cheap
    search before the JSON is parsed; callers still check the fields).
    """
    wanted = [form for w in contains for form in _written(w)]
    for path in day_files(directory):
        try:
            handle = open(path, "rb")  # noqa: SIM115 (closed below, generator)
        except FileNotFoundError:
            continue  # pruned meanwhile
        with handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    continue  # being written, or torn
                if wanted and not any(w in line for w in wanted):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record


def _bare(message_id: str) -> str:
    return message_id.strip().strip("<>").strip()


def story(directory: Path, wanted: str) -> list[dict[str, Any]]:
    """The messages ``wanted`` names (a queue ID, or a Message-ID with or without
    its angle brackets), each ``{queue_id, message_id, sessions, records}``."""
    key = _bare(wanted)
    if not key:
        return []
    qids: dict[str, dict[str, Any]] = {}
    # First pass: which queue IDs, and which sessions they came in.
    for record in read_records(directory, [key]):
        qid = record.get("qid")
        if not isinstance(qid, str):
            continue
        message_id = record.get("message_id")
        named = qid == key or (
            isinstance(message_id, str) and message_id and _bare(message_id) == key
        )
        if not named and qid not in qids:
            continue
        found = qids.setdefault(qid, {"queue_id": qid, "message_id": None, "sessions": []})
        if isinstance(message_id, str) and message_id:
            found["message_id"] = message_id
    if not qids:
        return []
    for record in read_records(directory, list(qids)):
        qid, session = record.get("qid"), record.get("session")
        if qid in qids and isinstance(session, str) and session not in qids[qid]["sessions"]:
            qids[qid]["sessions"].append(session)
        if qid in qids and isinstance(record.get("message_id"), str):
            qids[qid]["message_id"] = qids[qid]["message_id"] or record["message_id"]
    owners: dict[str, str] = {}
    for qid, found in qids.items():
        found["records"] = []
        for session in found["sessions"]:
            owners.setdefault(session, qid)
        for suffix in NOTICE_SUFFIXES:
            owners.setdefault(qid + suffix, qid)
        owners.setdefault(qid, qid)
    # Second pass: everything of those queue IDs, their notices and sessions.
    for record in read_records(directory, list(owners)):
        qid, session = record.get("qid"), record.get("session")
        if isinstance(qid, str) and qid in owners and (qid in qids or qid[:-1] in qids):
            qids[owners[qid]]["records"].append(record)
        elif qid is None and isinstance(session, str) and session in owners:
            qids[owners[session]]["records"].append(record)
    return list(qids.values())


# Fields the trace shows though the text log line does not.
_SHOWN_TOO = ("message_id", "path")


def text_of(record: dict[str, Any]) -> str:
    """The record's log line, without the ``ID: `` it starts with."""
    text = formatEvent(record).rstrip()
    for key in ("qid", "session"):
        prefix = f"{record.get(key)}: "
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    fmt = record.get("log_format") or ""
    for key in _SHOWN_TOO:
        value = record.get(key)
        if value and "{" + key not in fmt:
            text += f" {key}={value}"
    if record.get("log_error"):
        text += f" ({record['log_error']})"
    return text


def _time(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def as_json(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """``mailxctl trace --json``: each message with its steps, text and fields."""
    out = []
    for found in messages:
        steps = []
        for record in found["records"]:
            fields = {k: v for k, v in record.items() if not k.startswith("log_")}
            steps.append(
                {
                    "time": _time(record.get("log_time")) + "Z",
                    "epoch": record.get("log_time"),
                    "id": record.get("qid") or record.get("session"),
                    "event": record.get("event"),
                    "text": text_of(record),
                    "fields": fields,
                }
            )
        out.append(
            {
                "queue_id": found["queue_id"],
                "message_id": found["message_id"],
                "sessions": found["sessions"],
                "steps": steps,
            }
        )
    return {"messages": out}


def render(messages: list[dict[str, Any]]) -> str:
    """For people: a heading per message, then one line per step, times aligned (UTC)."""
    blocks = []
    for found in messages:
        heading = f"message {found['queue_id']}"
        if found["message_id"]:
            heading += f", Message-ID {found['message_id']}"
        if found["sessions"]:
            heading += f", session {', '.join(found['sessions'])}"
        records = found["records"]
        width = max((len(str(r.get("qid") or r.get("session") or "-")) for r in records), default=1)
        lines = [heading + " (times UTC)"]
        for record in records:
            ident = str(record.get("qid") or record.get("session") or "-")
            lines.append(f"  {_time(record.get('log_time'))}  {ident:<{width}}  {text_of(record)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
