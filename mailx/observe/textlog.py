# -*- test-case-name: tests.test_textlog -*-
"""``logging.format: text`` (the default): twistd's own log lines, cheaper.

Twisted's `textFileLogObserver` formats each event's timestamp afresh
(``datetime`` and a time-zone lookup, about a quarter of a log line's cost,
and mailx writes four or more lines per message).  The stamp has whole
seconds, so it is formatted once a second here.  And Twisted fills in the
event's format with `string.Formatter`, in Python, so that ``{name()}``
calls ``name``; mailx's formats never call, and `str.format_map` does the
same work in C, several times faster (`classic_line`).  The lines are
Twisted's, byte for byte (`formatEventAsClassicLogText`): any event the
fast path is not sure of (a call, a failure, a legacy ``log_system``, a
format that does not fill in) goes to Twisted's own function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

__all__ = ["classic_line", "text_observer"]


def classic_line(event: LogEvent, stamp: Callable[[float | None], str]) -> str | None:
    """``formatEventAsClassicLogText(event, formatTime=stamp)``, the common case in C."""
    fmt = event.get("log_format")
    if (
        type(fmt) is not str
        or "()" in fmt
        or "log_failure" in event
        or "log_flattened" in event
        or event.get("log_system") is not None
    ):
        return formatEventAsClassicLogText(event, formatTime=stamp)
    try:
        text = fmt.format_map(event)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    except Exception:  # Twisted words the failure ("Unable to format event ...")
        return formatEventAsClassicLogText(event, formatTime=stamp)
    if not text:
        return None
    return f"{stamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def text_observer(out: IO[Any], time_format: str = timeFormatRFC3339) -> ILogObserver:
    """A `FileLogObserver` writing what ``textFileLogObserver(out)`` writes."""
    # (second, its stamp), replaced whole: events come from several threads.
    last: list[tuple[int, str]] = [(-1, "")]

    def stamp(when: float | None) -> str:
        if when is None:
            return formatTime(when, time_format)
        second = int(when // 1)
        cached_second, text = last[0]
        if cached_second != second:
            text = formatTime(second, time_format)
            last[0] = (second, text)
        return text

    def format_event(event: LogEvent) -> str | None:
        return classic_line(event, stamp)

    return FileLogObserver(out, format_event)
