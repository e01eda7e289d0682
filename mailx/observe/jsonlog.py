# -*- test-case-name: tests.test_jsonlog -*-
"""``logging.format: json``: one flat JSON object per log event, one per line.

Not `twisted.logger.eventAsJSON`: that is Twisted's own shape (``log_format``
with the fields still to substitute, ``log_level`` as a constant object),
made to be read back by Twisted.  Loki and ELK want what a person reads,
flat::

    {"time": "2026-01-01T00:00:00.123Z", "level": "info", "system": "mailx.smtp",
     "msg": "ABC123: to=<alice@example.test> accepted: mailbox example.test/alice",
     "qid": "ABC123", "rcpt": "alice@example.test", "event": "rcpt", ...}

``msg`` is the text log's line; the event's own fields follow (those not
starting ``log_``), so a query can select on ``qid`` or ``event`` without
parsing the text.  A traceback is one ``error`` string: the event stays one
line.  JSON escapes control characters itself; line and paragraph
separators and the other characters `mailx.text` escapes are written as
``\\uNNNN`` too, so no reader splits a line or a terminal obeys one.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

__all__ = ["event_as_line", "json_observer"]

# Keys of the core record; an event field of the same name gets a "_" suffix.
_CORE = ("time", "level", "system", "msg", "error")
# What twisted.python.log's legacy bridge adds: already in the core record.
_LEGACY = frozenset(("message", "format", "isError", "system", "time", "why", "failure", "printed"))
_UNSAFE_IN_JSON = re.compile(
    "[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def _value(value: Any) -> Any:
    """JSON-ready: plain values as they are, containers checked, anything else as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def event_as_line(event: LogEvent) -> str:
    """The event as one line of JSON, newline included."""
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
            if isinstance(when, int | float)
            else None
        ),
        "level": getattr(level, "name", None) or ("error" if event.get("isError") else "info"),
        "system": event.get("log_system") or event.get("log_namespace") or "-",
        "msg": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["error"] = failure.getTraceback()
        except Exception:
            record["error"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY:
            continue
        record[key + "_" if key in _CORE else key] = _value(value)
    text = json.dumps(record, ensure_ascii=False, default=str)
    if _UNSAFE_IN_JSON.search(text):
        # Only inside strings, where \\uNNNN means the same character.
        text = _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
    return text + "\n"


def json_observer(out: IO[str]) -> ILogObserver:
    """A `FileLogObserver` writing `event_as_line` to ``out``."""
    return FileLogObserver(out, event_as_line)
