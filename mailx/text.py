# -*- test-case-name: tests.test_text -*-
"""Strangers' text made safe for a terminal: logs, ``mailxctl`` output.

Header fields, remote servers' replies, DNS records and addresses are
written by strangers and end up in front of the owner, in a terminal that
obeys escape sequences: OSC 52 writes the clipboard, others retitle the
window, move the cursor to overwrite the lines above, or (in some
terminals) worse; a bare CR or LF forges a log line; a bidi override makes
``evil.example`` read as another name.  `printable` escapes every such
character as ``\\xNN`` or ``\\uNNNN``, and the `Logger` here escapes every
text field of every event, so no call site has to remember.

Why by hand: the standard library has no such function (``repr`` quotes
and escapes all non-ASCII, which would mangle ``bücher.example``), and
Twisted's log formatting writes fields as they are.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

__all__ = ["Logger", "printable", "printable_lines", "safe_json"]

# C0 controls, DEL, C1 controls (0x9b is CSI, 0x9d OSC in 8-bit terminals),
# the line and paragraph separators, the bidi embeddings, overrides and
# isolates (Trojan Source, CVE-2021-42574), zero-width marks that hide or
# join text, the BOM, and lone surrogates (undecodable bytes kept by
# surrogateescape).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_UNSAFE_KEEPING_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)

# What json.dumps leaves raw (it escapes C0 itself; the indentation's line
# feeds must stay).
_UNSAFE_IN_JSON = re.compile(
    "[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was there
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control, bidi and invisible formatting character
    escaped (``\\x1b``, ``\\u202e``): one line, shown as it is made of."""
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


def printable_lines(text: str) -> str:
    """`printable`, but keeping line feeds and tabs: for multi-line output."""
    if not _UNSAFE_KEEPING_LINES.search(text):
        return text
    return _UNSAFE_KEEPING_LINES.sub(_escape, text)


def safe_json(data: Any) -> str:
    """``json.dumps`` for a terminal: readable Unicode, no raw control characters.

    json escapes C0 controls itself; C1, bidi and the rest can only occur
    inside strings, where ``\\uNNNN`` means the same character: the output
    parses to the same data.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes):
        return printable(value.decode("utf-8", "surrogateescape"))
    return value


_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(_TwistedLogger):
    """`twisted.logger.Logger` whose events carry only printable text fields.

    Every text (and bytes) field is passed through `printable` before any
    observer sees it, so a stranger's HELO, address, header field or remote
    reply cannot split a log line or reach the terminal of whoever reads
    the log as an escape sequence.  Other values (numbers, failures,
    objects formatted later) are left alone.
    """

    def emit(self, level: Any, format: str | None = None, **kwargs: Any) -> None:
        # On every log call: exact type checks and one regex search per text
        # field (about 2 us an event); a field is rewritten only when unsafe.
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)  # Twisted reports the bad level
            return
        search = _UNSAFE.search
        for key, value in kwargs.items():
            kind = type(value)
            if (kind is str and search(value)) or kind is bytes:
                if not key.startswith("log_"):
                    kwargs[key] = _safe(value)
            elif kind is not str and isinstance(value, str | bytes):  # subclasses
                kwargs[key] = _safe(str(value) if isinstance(value, str) else bytes(value))
        # What twisted.logger.Logger.emit does next, but for its check of the
        # level, which sorts LogLevel's constants anew on every call (a
        # tenth of a log call's cost, four or more calls a message).
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)
