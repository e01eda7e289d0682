# -*- test-case-name: tests.test_sieve -*-
"""Sieve (RFC 5228) tokenizer and recursive-descent parser, with line numbers.

Hand-written rather than sievelib's: sievelib is a client-side library whose
regex lexer matches a ``text:`` block without undoing dot-stuffing
(RFC 5228 2.4.2), does not decode encoded-character (RFC 5228 2.4.2.4),
and keeps no line number on the nodes it builds, so run-time errors could
not name their line.  This one is linear in the script's size, bounded
(`MAX_SCRIPT_SIZE`, `MAX_NESTING`), and every node carries its line.

The result is a tree of `Command`/`Test` nodes; `mailx.filters.validate`
checks it against the extensions the script requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# SPEC 12: a script over 1 MiB, or nested deeper than 32, does not run.
MAX_SCRIPT_SIZE = 1 << 20
MAX_NESTING = 32


class SieveError(Exception):
    """A compile or run-time error, with the script line it comes from."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Tag:
    name: str  # without the colon, lower-cased
    line: int


@dataclass(frozen=True)
class Number:
    value: int
    line: int


@dataclass(frozen=True)
class StringList:
    values: tuple[str, ...]
    line: int
    is_list: bool  # written as [..] rather than a single string


Argument = Tag | Number | StringList


@dataclass
class Test:
    name: str
    arguments: list[Argument]
    tests: list[Test]
    line: int
    extra: dict = field(default_factory=dict)


@dataclass
class Command:
    name: str
    arguments: list[Argument]
    tests: list[Test]
    block: list[Command] | None
    line: int
    # Filled in by validation: tag name -> value, and the positional rest.
    extra: dict = field(default_factory=dict)


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t]+)
  | (?P<nl>\r?\n)
  | (?P<hash>\#[^\r\n]*)
  | (?P<bracket>/\*)
  | (?P<text>text:[ \t]*(?:\#[^\r\n]*)?\r?\n)
  | (?P<quoted>")
  | (?P<tag>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+[KkMmGg]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<special>[\[\](),;{}])
    """,
    re.VERBOSE,
)
_MULTIPLIER = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# RFC 5228 2.4.1: numbers are unsigned 31 bits... Pigeonhole stores them in
# sieve_number_t (64 bits) but a script's number above 2^63 is an error.
_MAX_NUMBER = (1 << 63) - 1


def tokenize(text: str) -> list[tuple[str, object, int]]:
    """(kind, value, line) tokens; comments and whitespace dropped."""
    tokens: list[tuple[str, object, int]] = []
    pos, line, end = 0, 1, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise SieveError(line, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind == "ws" or kind == "hash":
            pos = m.end()
        elif kind == "nl":
            line += 1
            pos = m.end()
        elif kind == "bracket":
            close = text.find("*/", m.end())
            if close < 0:
                raise SieveError(line, "unterminated comment")
            line += text.count("\n", pos, close)
            pos = close + 2
        elif kind == "text":
            # RFC 5228 2.4.2: lines up to one holding only ".", dot-stuffed.
            start, first = m.end(), line
            line += 1
            lines = []
            p = start
            while True:
                nl = text.find("\n", p)
                if nl < 0:
                    if text[p:].rstrip("\r") == ".":  # the last line, unterminated
                        p = end
                        break
                    raise SieveError(first, "unterminated multi-line string")
                raw = text[p:nl].removesuffix("\r")
                p = nl + 1
                line += 1
                if raw == ".":
                    break
                lines.append(raw[1:] if raw.startswith("..") else raw)
            tokens.append(("string", "".join(s + "\r\n" for s in lines), first))
            pos = p
        elif kind == "quoted":
            first = line
            out = []
            p = m.end()
            while True:
                if p >= end:
                    raise SieveError(first, "unterminated string")
                c = text[p]
                if c == '"':
                    p += 1
                    break
                if c == "\\" and p + 1 < end:
                    # RFC 5228 2.4.2: an undefined escape is the character.
                    c = text[p + 1]
                    p += 1
                if c == "\n":
                    line += 1
                out.append(c)
                p += 1
            tokens.append(("string", "".join(out), first))
            pos = p
        elif kind == "number":
            s = m.group()
            mult = _MULTIPLIER.get(s[-1].lower(), 1)
            value = int(s.rstrip("KkMmGg")) * mult
            if value > _MAX_NUMBER:
                raise SieveError(line, f"number {s} is too large")
            tokens.append(("number", value, line))
            pos = m.end()
        elif kind == "tag":
            tokens.append(("tag", m.group()[1:].lower(), line))
            pos = m.end()
        elif kind == "ident":
            tokens.append(("ident", m.group().lower(), line))
            pos = m.end()
        else:
            tokens.append((m.group(), m.group(), line))
            pos = m.end()
    tokens.append(("eof", None, line))
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, object, int]]) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, object, int]:
        return self.tokens[self.i]

    def take(self, kind: str) -> tuple[str, object, int]:
        tok = self.tokens[self.i]
        if tok[0] != kind:
            raise SieveError(tok[2], f"expected {kind!r} but found {_describe(tok)}")
        self.i += 1
        return tok

    def nest(self, line: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise SieveError(line, f"nested deeper than {MAX_NESTING} levels")

    def commands(self, until: str) -> list[Command]:
        out = []
        while self.peek()[0] != until:
            out.append(self.command())
        return out

    def command(self) -> Command:
        _, name, line = self.take("ident")
        arguments, tests = self.arguments()
        kind = self.peek()[0]
        block = None
        if kind == "{":
            self.nest(line)
            self.i += 1
            block = self.commands("}")
            self.take("}")
            self.depth -= 1
        else:
            self.take(";")
        return Command(str(name), arguments, tests, block, line)

    def arguments(self) -> tuple[list[Argument], list[Test]]:
        arguments: list[Argument] = []
        while True:
            kind, value, line = self.peek()
            if kind == "tag":
                arguments.append(Tag(str(value), line))
            elif kind == "number":
                arguments.append(Number(int(value), line))  # type: ignore[call-overload]
            elif kind == "string":
                arguments.append(StringList((str(value),), line, False))
            elif kind == "[":
                self.i += 1
                values = [str(self.take("string")[1])]
                while self.peek()[0] == ",":
                    self.i += 1
                    values.append(str(self.take("string")[1]))
                self.take("]")
                arguments.append(StringList(tuple(values), line, True))
                continue
            else:
                break
            self.i += 1
        tests: list[Test] = []
        kind, _, line = self.peek()
        if kind == "ident":
            tests.append(self.test())
        elif kind == "(":
            tests = self.test_list()
        return arguments, tests

    def test(self) -> Test:
        _, name, line = self.take("ident")
        self.nest(line)
        arguments, tests = self.arguments()
        self.depth -= 1
        return Test(str(name), arguments, tests, line)

    def test_list(self) -> list[Test]:
        _, _, line = self.take("(")
        self.nest(line)
        tests = [self.test()]
        while self.peek()[0] == ",":
            self.i += 1
            tests.append(self.test())
        self.take(")")
        self.depth -= 1
        return tests


def _describe(tok: tuple[str, object, int]) -> str:
    kind, value, _ = tok
    if kind == "eof":
        return "end of script"
    if kind in ("ident", "tag", "number"):
        return f"{kind} {':' if kind == 'tag' else ''}{value}"
    if kind == "string":
        return "string"
    return f"{kind!r}"


def parse(script: str | bytes) -> list[Command]:
    """The script's commands; `SieveError` naming the line if it is malformed."""
    if len(script) > MAX_SCRIPT_SIZE:
        raise SieveError(1, f"script is larger than {MAX_SCRIPT_SIZE} bytes")
    if isinstance(script, bytes):
        try:
            script = script.decode("utf-8")
        except UnicodeDecodeError as e:
            line = e.object.count(b"\n", 0, e.start) + 1
            raise SieveError(line, "script is not valid UTF-8") from None
    parser = _Parser(tokenize(script))
    commands = parser.commands("eof")
    return commands
