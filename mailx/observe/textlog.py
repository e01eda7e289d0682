# -*- test-case-name: tests.test_textlog -*-
"""``logging.format: text`` (the default): twistd's own log lines, cheaper.

Twisted's `textFileLogObserver` formats each event's timestamp afresh
(``datetime`` and a time-zone lookup, about a quarter of a log line's cost,
and mailx writes four or more lines per message).  The stamp has whole
seconds, so it is formatted once a second here; the lines are otherwise
Twisted's, byte for byte (`formatEventAsClassicLogText`).
"""

from __future__ import annotations

from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

__all__ = ["text_observer"]


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
        return formatEventAsClassicLogText(event, formatTime=stamp)

    return FileLogObserver(out, format_event)
