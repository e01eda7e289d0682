# -*- test-case-name: tests.test_headers -*-
"""Header-field syntax (RFC 5322 2.2, 3.6.8, 4.5), one place for all of mailx.

Every module that recognises a field name, finds the end of a header section
or splits one into fields uses these functions, so that what we strip, count
or check is what a mail client (Dovecot, Thunderbird) will read: a forged
``Authentication-Results : ...`` with a space before the colon is
obsolete-syntax RFC 5322 that they accept, so we must too.

Everything here is linear in its input (lists of pieces joined once, never
``bytes +=`` in a loop) and standard library only: it runs on the reactor
thread over a stranger's bytes.  Input is bytes with CRLF or LF line ends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from email.utils import formatdate

__all__ = [
    "HeaderPool",
    "date_now",
    "end_of_header",
    "field_name",
    "field_value",
    "field_values",
    "fields_named",
    "has_field",
    "header_section",
    "is_field_start",
    "mailbox_domains",
    "split_fields",
    "unfold",
]

# RFC 5322 3.6.8: ftext is %d33-57 / %d59-126; 4.5.8 (obs-optional) allows
# WSP between the name and the colon, which mail clients strip.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WSP = (b" ", b"\t")


# (second, its date), replaced whole: more than one thread adds headers.
_last_date: tuple[int, str] = (-1, "")


def date_now() -> str:
    """``email.utils.formatdate(localtime=True)``, made once a second: a
    Received: or Date: field's date has whole seconds, and formatdate (a
    datetime and a time-zone lookup) was 4% of the reactor's time per message."""
    global _last_date
    second = int(time.time())
    cached, text = _last_date
    if cached != second:
        text = formatdate(second, localtime=True)
        _last_date = (second, text)
    return text


def field_name(line: bytes) -> bytes | None:
    """The lower-cased name of the field starting ``line``, None if it starts none."""
    m = _FIELD_NAME.match(line)
    return m.group(1).lower() if m else None


def is_field_start(line: bytes) -> bool:
    """Does ``line`` begin a header field (``Name:`` or obsolete ``Name :``)?"""
    return _FIELD_NAME.match(line) is not None


def field_value(field: bytes) -> bytes:
    """What follows the colon of a field (folding kept); b"" when it is no field."""
    m = _FIELD_NAME.match(field)
    return field[m.end() :] if m else b""


def unfold(value: bytes) -> bytes:
    """RFC 5322 2.2.3: remove each CRLF (or LF) that is followed by WSP; drop the final one."""
    return re.sub(rb"\r?\n(?=[ \t])", b"", value).rstrip(b"\r\n")


def end_of_header(data: bytes | bytearray, start: int = 0) -> int:
    """Offset of the empty line that ends the header section, searching from ``start``;
    -1 if it has not arrived.  A section that is empty (data starting with the
    empty line) ends at 0.  CRLF line ends (what the SMTP layer hands over)."""
    if start == 0 and data[:2] == b"\r\n":
        return 0
    at = data.find(b"\r\n\r\n", max(start - 3, 0))
    return at + 2 if at >= 0 else -1


def header_section(message: bytes) -> bytes:
    """The header section of a whole message (CRLF or LF), its last line end kept."""
    if message[:1] == b"\n" or message[:2] == b"\r\n":
        return b""
    m = re.search(rb"\n\r?\n", message)
    return message[: m.start() + 1] if m else message


_FIELD_BREAK = re.compile(rb"\n[^ \t]")


def split_fields(header: bytes) -> list[bytes]:
    """Header fields with their continuation lines, line ends kept (RFC 5322 2.2.3).

    ``b"".join(split_fields(h)) == h``.  Linear, and at C speed over the
    lines: one search for each line end not followed by WSP, one slice per
    field (appending bytes to bytes per folded line was quadratic: 9 s for
    996 KiB).  A continuation line before any field stands alone, as does
    any line that is no field (it is kept, not interpreted).
    """
    fields: list[bytes] = []
    start = 0
    for m in _FIELD_BREAK.finditer(header):
        fields.append(header[start : m.start() + 1])
        start = m.start() + 1
    if start < len(header):
        fields.append(header[start:])
    return fields


def fields_named(fields: Iterable[bytes], name: bytes) -> list[bytes]:
    """The fields called ``name`` (lower case), in order."""
    return [f for f in fields if field_name(f) == name]


_END_OF_FIELD = re.compile(rb"\n[^ \t]")


def field_values(header: bytes, name: bytes, limit: int | None = None) -> tuple[list[bytes], int]:
    """The values of the fields called ``name`` (lower case), folding kept, in
    order, at most ``limit`` of them; and how many such fields there are.

    Regular-expression searches at C speed and linear, so it may run on the
    reactor thread over a header section of any size, where `split_fields`
    is a Python loop per line.  The search runs over a lower-cased copy so
    the name is a literal prefix the engine finds fast.
    """
    lowered = b"\n" + header.lower()
    start = re.compile(rb"\n" + re.escape(name) + rb"[ \t]*:")
    values: list[bytes] = []
    count = 0
    for m in start.finditer(lowered):
        count += 1
        if limit is not None and count > limit:
            return values, count + len(start.findall(lowered, m.end()))
        at = m.end() - 1  # in header: lowered has one more octet in front
        end = _END_OF_FIELD.search(header, at)
        values.append(header[at : end.start() if end else len(header)])
    return values, count


def has_field(header: bytes, name: bytes) -> bool:
    """Whether the header section has a field called ``name`` (lower case); linear,
    C speed (a literal search in a lower-cased copy)."""
    return re.search(rb"\n" + re.escape(name) + rb"[ \t]*:", b"\n" + header.lower()) is not None


# RFC 5322 3.2: the lexical tokens of an address list.  Each alternative is a
# single character class or an escape pair, so the engine never backtracks;
# unterminated quoted strings and literals run to the end of the value.
_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]+)
    |"(?P<q>(?:[^"\\]|\\.)*)"?
    |\[(?P<l>(?:[^\]\\]|\\.)*)\]?
    |(?P<c>\()
    |(?P<s>[<>,;:@])
    |(?P<a>[^ \t\r\n"\[(<>,;:@]+)""",
    re.VERBOSE | re.DOTALL,
)
_COMMENT_STOP = re.compile(r"[()\\]")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


# Tokens read of one address-list value; real From fields have a few dozen.
# Past it the rest is unusable (each token costs microseconds of Python).
MAX_TOKENS = 256


def _tokens(value: str) -> Iterator[tuple[str, str]]:
    """RFC 5322 3.2 lexical tokens of an address list, comments and folding dropped:
    ("q", quoted-string), ("l", domain-literal), ("a", atom or dot), (special, "").

    Linear, and at C speed but for nested comments (one step per parenthesis):
    the stdlib's parsers are super-linear (``email.headerregistry`` took 0.5 s
    on 4 KB of quotes) and ``email.utils.getaddresses`` recurses into comments
    until RecursionError.  A stray ")" is part of an atom, never parsed.
    """
    i, n = 0, len(value)
    while i < n:
        m = _TOKEN.match(value, i)
        if m is None:  # only a stray ")" starts no token
            yield ("a", value[i])
            i += 1
            continue
        kind = m.lastgroup
        i = m.end()
        if kind == "c":
            depth = 1
            while depth and i < n:
                stop = _COMMENT_STOP.search(value, i)
                if stop is None:
                    i = n
                    break
                c = stop.group(0)
                i = stop.end() + (1 if c == "\\" else 0)
                depth += {"(": 1, ")": -1}.get(c, 0)
        elif kind == "s":
            yield (m.group("s"), "")
        elif kind == "q" or kind == "l":
            text = m.group(kind)
            yield (kind, _UNESCAPE.sub(r"\1", text) if "\\" in text else text)
        elif kind == "a":
            yield ("a", m.group("a"))


def mailbox_domains(value: str) -> list[str | None]:
    """The domain of each mailbox in an address-list field value (RFC 5322 3.4),
    as written; None for a mailbox without a usable one (no "@", a domain
    literal, nothing after the "@").  Group names and route prefixes
    (obs-route, 4.4) are skipped; empty list elements (obs-mbox-list) too.
    Past `MAX_TOKENS` a final None stands for the rest.
    """
    domains: list[str | None] = []
    current: list[tuple[str, str]] = []
    angle: list[tuple[str, str]] | None = None
    in_angle = False

    def finish() -> None:
        nonlocal angle
        addr = angle if angle is not None else current
        if addr or angle is not None:
            domains.append(_domain_of(addr))
        current.clear()
        angle = None

    for count, (kind, text) in enumerate(_tokens(value)):
        if count == MAX_TOKENS:
            domains.append(None)  # the rest is not read: the author is undeterminable
            return domains
        if in_angle:
            if kind == ">":
                in_angle = False
            elif kind == ":":
                angle = []  # obs-route "@a,@b:" before the addr-spec
            else:
                angle.append((kind, text))  # type: ignore[union-attr]
            continue
        if kind == "<":
            in_angle, angle = True, []
        elif kind in (",", ";"):
            finish()
        elif kind == ":":
            current.clear()  # a group's display name
        elif angle is None:
            current.append((kind, text))
    if in_angle or current or angle is not None:
        finish()
    return domains


def _domain_of(addr: list[tuple[str, str]]) -> str | None:
    at = [i for i, (kind, _) in enumerate(addr) if kind == "@"]
    if len(at) != 1 or at[0] == 0:
        return None  # no "@", no local part, or two addresses run together
    rest = [text for kind, text in addr[at[0] + 1 :] if kind == "a"]
    if not rest or len(rest) != len(addr) - at[0] - 1:
        return None  # empty, a domain literal, or a quoted string: no domain to look up
    for before, after in zip(rest, rest[1:], strict=False):
        if not (before.endswith(".") or after.startswith(".")):
            return None  # "a@b.example c": words after the domain
    return "".join(rest)


class HeaderPool:
    """Bytes of header sections held in memory, server-wide (docs/security.md).

    Each session may hold ``reserved`` octets of header section without asking
    (real header sections are a few KiB; at 1000 connections 64 KiB each is
    64 MiB); beyond that it draws on one shared pool of ``shared`` octets, so a
    thousand clients sending 1 MiB headers cannot hold 1 GiB.  A session
    refused more must refuse the message temporarily.
    """

    def __init__(self, reserved: int = 64 * 1024, shared: int = 64 * 1024 * 1024) -> None:
        self.reserved = reserved
        self.shared = shared
        self.in_use = 0  # shared octets currently drawn

    def grow(self, held: int, wanted: int) -> bool:
        """A session holding ``held`` octets wants ``wanted`` in all: True if allowed
        (the shared part is then counted), False if the pool is exhausted."""
        extra = max(wanted, self.reserved) - max(held, self.reserved)
        if extra <= 0:
            return True
        if self.in_use + extra > self.shared:
            return False
        self.in_use += extra
        return True

    def release(self, held: int) -> None:
        """A session holding ``held`` octets lets them go."""
        self.in_use -= max(held - self.reserved, 0)
