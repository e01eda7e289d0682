# -*- test-case-name: tests.test_sieve -*-
"""Validate a parsed Sieve script and run it over a message: a pure function.

``run(script, message, envelope)`` returns a `Result`: the actions Pigeonhole
(Dovecot 2.3) would take, with the implicit keep resolved (RFC 5228 2.10.2),
and no I/O.  Filing, redirecting through the queue and vacation memory are
the caller's: they only read the `Result`.

Bounds (a stranger's message and a user's script meet here): script size and
nesting in `parser`; at most `MAX_ACTIONS` actions and `MAX_REDIRECTS`
redirects; variable values cut at `MAX_VARIABLE_SIZE`; header values and the
body are read through bounded prefixes; `:matches` and `:regex` run on RE2
(linear time, no catastrophic backtracking) rather than Python's `re`.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import email.utils
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import re2

from .parser import Command, Number, SieveError, StringList, Tag, Test, parse

# SPEC 12: a fifth redirect is a run-time error.
MAX_REDIRECTS = 4
# Pigeonhole's sieve_max_actions default is 32.
MAX_ACTIONS = 32
# Pigeonhole's sieve_variables_max_variable_size default is 4096 (bytes),
# and sieve_variables_max_scope_size 255.
MAX_VARIABLE_SIZE = 4096
MAX_VARIABLES = 255
# What of a header value and of the body the tests look at.
MAX_HEADER_VALUE = 64 * 1024
MAX_BODY = 1 << 20
# RE2 memory per compiled expression (its default is 8 MiB).
_RE2_MAX_MEM = 8 << 20
# A script with `while`-like length is impossible (Sieve has no loops); this
# bounds the work a script can do per message through its tests instead.
MAX_TEST_STEPS = 100_000
# Matching work per message, in (value length x key length) units: RE2 is
# linear in the value but falls back to an NFA whose cost grows with the
# pattern too once its DFA cache (max_mem) is full.  ~3e7 units a second
# measured on a 60 KB value against a 3000-character glob; this is a second
# or two at worst.
MAX_MATCH_WORK = 50_000_000
# RFC 5229 3.2 asks for ${0}..${9} at least; Pigeonhole offers exactly those.
MAX_MATCH_INDEX = 9

EXTENSIONS = frozenset(
    """fileinto reject envelope encoded-character subaddress copy imap4flags
    vacation vacation-seconds variables body relational
    comparator-i;ascii-numeric comparator-i;octet comparator-i;ascii-casemap
    mailbox regex""".split()
)
_CORE_COMPARATORS = {"i;octet", "i;ascii-casemap"}
_RELATIONAL = {"gt", "ge", "lt", "le", "eq", "ne"}


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: sender, and the recipient as the sender wrote it."""

    mail_from: str
    rcpt_to: str
    # The mailbox's own address (after subaddress stripping), for vacation.
    mailbox: str = ""


@dataclass(frozen=True)
class Message:
    """What a script may look at: header fields in order, size, body prefix."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    size: int

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """Split a message into its unfolded header fields and body."""
        sep = data.find(b"\r\n\r\n")
        cut = 4
        lf = data.find(b"\n\n")
        if sep < 0 or (0 <= lf < sep):
            sep, cut = lf, 2
        if sep < 0:
            head, body = data, b""
        else:
            head, body = data[: sep + cut // 2], data[sep + cut :]
        fields: list[tuple[str, str]] = []
        for raw in head.split(b"\n"):
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                continue
            if line[0] in " \t" and fields:
                name, value = fields[-1]
                if len(value) < MAX_HEADER_VALUE:
                    fields[-1] = (name, value + line)
                continue
            name, colon, value = line.partition(":")
            if colon:
                fields.append((name.strip(), value))
        return cls(tuple(fields), body[:MAX_BODY], len(data))

    def values(self, name: str) -> list[str]:
        """The raw values of every field called *name*, trimmed (as Pigeonhole)."""
        return self._by_name.get(name.lower(), [])

    @functools.cached_property
    def _by_name(self) -> dict[str, list[str]]:
        # Built once per message: a script's tests ask for the same few fields again and again.
        index: dict[str, list[str]] = {}
        for n, v in self.headers:
            index.setdefault(n.lower(), []).append(v.strip(" \t")[:MAX_HEADER_VALUE])
        return index


@dataclass(frozen=True)
class Action:
    """One thing to do with the message.

    kind: keep, fileinto, redirect, reject, discard, vacation.
    """

    kind: str
    target: str = ""  # folder, address, or reason (reject, vacation's text)
    flags: tuple[str, ...] = ()
    copy: bool = False
    create: bool = False
    implicit: bool = False
    # vacation only
    seconds: int = 0
    subject: str | None = None
    from_: str | None = None
    addresses: tuple[str, ...] = ()
    mime: bool = False
    handle: str = ""
    # vacation: whom a reply would go to, or "" and why not (RFC 3834/5230).
    reply_to: str = ""
    skip_reason: str = ""


@dataclass(frozen=True)
class Result:
    actions: tuple[Action, ...]
    error: str = ""  # a run-time error: then actions is just the implicit keep
    # `stop` ran: with domains.<d>.sieve_before, no later script runs (SPEC 12).
    stopped: bool = False

    @property
    def implicit_keep(self) -> bool:
        return any(a.implicit for a in self.actions)


# ---------------------------------------------------------------- validation

_MATCH = {"is", "contains", "matches", "regex", "count", "value"}
_ADDRPART = {"all", "localpart", "domain", "user", "detail"}
_TAG_EXT = {
    "regex": "regex",
    "count": "relational",
    "value": "relational",
    "user": "subaddress",
    "detail": "subaddress",
}


@dataclass
class _Spec:
    extension: str | None
    tags: dict[str, str | None]  # tag -> its argument's kind, or None
    positional: list[str]  # "string" / "strings" / "number"
    match: bool = False  # :comparator and match types
    addrpart: bool = False
    tests: str = "none"  # none / one / list
    block: bool = False
    optional_first: bool = False  # imap4flags' optional variable name
    tag_ext: dict[str, str] = field(default_factory=dict)


_COMMANDS: dict[str, _Spec] = {
    "require": _Spec(None, {}, ["strings"]),
    "if": _Spec(None, {}, [], tests="one", block=True),
    "elsif": _Spec(None, {}, [], tests="one", block=True),
    "else": _Spec(None, {}, [], block=True),
    "stop": _Spec(None, {}, []),
    "keep": _Spec(None, {"flags": "strings"}, [], tag_ext={"flags": "imap4flags"}),
    "discard": _Spec(None, {}, []),
    "redirect": _Spec(None, {"copy": None}, ["string"], tag_ext={"copy": "copy"}),
    "fileinto": _Spec(
        "fileinto",
        {"copy": None, "flags": "strings", "create": None},
        ["string"],
        tag_ext={"copy": "copy", "flags": "imap4flags", "create": "mailbox"},
    ),
    "reject": _Spec("reject", {}, ["string"]),
    "vacation": _Spec(
        "vacation",
        {
            "days": "number",
            "seconds": "number",
            "subject": "string",
            "from": "string",
            "addresses": "strings",
            "mime": None,
            "handle": "string",
        },
        ["string"],
        tag_ext={"seconds": "vacation-seconds"},
    ),
    "set": _Spec(
        "variables",
        {m: None for m in ("lower", "upper", "lowerfirst", "upperfirst", "quotewildcard", "quoteregex", "length")},
        ["string", "string"],
        tag_ext={"quoteregex": "regex"},
    ),
    "setflag": _Spec("imap4flags", {}, ["strings"], optional_first=True),
    "addflag": _Spec("imap4flags", {}, ["strings"], optional_first=True),
    "removeflag": _Spec("imap4flags", {}, ["strings"], optional_first=True),
}
_TESTS: dict[str, _Spec] = {
    "address": _Spec(None, {}, ["strings", "strings"], match=True, addrpart=True),
    "envelope": _Spec("envelope", {}, ["strings", "strings"], match=True, addrpart=True),
    "header": _Spec(None, {}, ["strings", "strings"], match=True),
    "exists": _Spec(None, {}, ["strings"]),
    "size": _Spec(None, {"over": "number", "under": "number"}, []),
    "true": _Spec(None, {}, []),
    "false": _Spec(None, {}, []),
    "not": _Spec(None, {}, [], tests="one"),
    "allof": _Spec(None, {}, [], tests="list"),
    "anyof": _Spec(None, {}, [], tests="list"),
    "body": _Spec("body", {"raw": None, "content": "strings", "text": None}, ["strings"], match=True),
    "string": _Spec("variables", {}, ["strings", "strings"], match=True),
    "hasflag": _Spec("imap4flags", {}, ["strings"], match=True, optional_first=True),
    "mailboxexists": _Spec("mailbox", {}, ["strings"]),
}


class _Validator:
    def __init__(self) -> None:
        self.required: set[str] = set()
        self.encoded = False

    def need(self, ext: str | None, line: int, what: str) -> None:
        if ext and ext not in self.required:
            raise SieveError(line, f"{what} requires the {ext!r} extension (require \"{ext}\";)")

    def commands(self, commands: list[Command], top: bool) -> None:
        previous = ""
        seen_other = False
        for c in commands:
            if c.name == "require":
                if not top or seen_other:
                    raise SieveError(
                        c.line, "require command can only be placed at top level at the beginning of the file"
                    )
            else:
                seen_other = True
            if c.name in ("elsif", "else") and previous not in ("if", "elsif"):
                raise SieveError(c.line, f"{c.name} command must follow an if or elseif command")
            spec = _COMMANDS.get(c.name)
            if spec is None:
                raise SieveError(c.line, f"unknown command '{c.name}'")
            self.need(spec.extension, c.line, f"the {c.name} command")
            c.extra = self.arguments(c.name, "command", spec, c.arguments, c.tests, c.line)
            if c.name == "require":
                for ext in c.extra["pos"][0]:
                    if ext not in EXTENSIONS:
                        raise SieveError(c.line, f"require command: unknown Sieve capability '{ext}'")
                    self.required.add(ext)
                    if ext == "encoded-character":
                        self.encoded = True
            if spec.block:
                if c.block is None:
                    raise SieveError(c.line, f"the {c.name} command requires a block")
                self.commands(c.block, False)
            elif c.block is not None:
                raise SieveError(c.line, f"the {c.name} command does not take a block")
            previous = c.name

    def test(self, t: Test) -> None:
        spec = _TESTS.get(t.name)
        if spec is None:
            raise SieveError(t.line, f"unknown test '{t.name}'")
        self.need(spec.extension, t.line, f"the {t.name} test")
        t.extra = self.arguments(t.name, "test", spec, t.arguments, t.tests, t.line)

    def arguments(self, name: str, what: str, spec: _Spec, args: list, tests: list[Test], line: int) -> dict:
        out: dict = {"tags": {}, "pos": []}
        i = 0
        while i < len(args):
            a = args[i]
            if not isinstance(a, Tag):
                break
            tag = a.name
            if spec.match and tag == "comparator":
                i += 1
                if i >= len(args) or not isinstance(args[i], StringList) or args[i].is_list:
                    raise SieveError(a.line, f"the :comparator tag of the {name} {what} needs a string")
                comp = self.string(args[i].values[0])
                if comp not in _CORE_COMPARATORS and f"comparator-{comp}" not in self.required:
                    raise SieveError(a.line, f"unknown comparator '{comp}'")
                out["comparator"] = comp
            elif spec.match and tag in _MATCH:
                self.need(_TAG_EXT.get(tag), a.line, f":{tag}")
                if "match" in out:
                    raise SieveError(a.line, f"multiple match types specified for the {name} {what}")
                out["match"] = tag
                if tag in ("count", "value"):
                    i += 1
                    if i >= len(args) or not isinstance(args[i], StringList):
                        raise SieveError(a.line, f":{tag} needs a relational operator")
                    op = args[i].values[0].lower()
                    if op not in _RELATIONAL:
                        raise SieveError(a.line, f"invalid relational match type '{op}'")
                    out["relation"] = op
            elif spec.addrpart and tag in _ADDRPART:
                self.need(_TAG_EXT.get(tag), a.line, f":{tag}")
                if "addrpart" in out:
                    raise SieveError(a.line, f"multiple address parts specified for the {name} {what}")
                out["addrpart"] = tag
            elif tag in spec.tags:
                self.need(spec.tag_ext.get(tag), a.line, f":{tag}")
                kind = spec.tags[tag]
                if kind is None:
                    out["tags"][tag] = True
                else:
                    i += 1
                    if i >= len(args):
                        raise SieveError(a.line, f"the :{tag} tag of the {name} {what} needs an argument")
                    out["tags"][tag] = self.value(args[i], kind, name, what, a.line)
            else:
                raise SieveError(
                    a.line, f"unknown tagged argument ':{tag}' for the {name} {what}"
                )
            i += 1
        rest = args[i:]
        positional = list(spec.positional)
        if spec.optional_first and len(rest) == len(positional) + 1:
            positional = ["strings"] + positional
        if len(rest) != len(positional):
            raise SieveError(
                line, f"the {name} {what} expects {len(positional)} positional argument(s), got {len(rest)}"
            )
        for a, kind in zip(rest, positional, strict=True):
            if isinstance(a, Tag):
                raise SieveError(a.line, f"unexpected tagged argument ':{a.name}' for the {name} {what}")
            out["pos"].append(self.value(a, kind, name, what, a.line))
        if spec.tests == "none" and tests:
            raise SieveError(line, f"the {name} {what} accepts no tests")
        if spec.tests == "one" and len(tests) != 1:
            raise SieveError(line, f"the {name} {what} requires one test")
        if spec.tests == "list" and (not tests or len(tests) < 1):
            raise SieveError(line, f"the {name} {what} requires a list of tests")
        for t in tests:
            self.test(t)
        if name == "size" and len(out["tags"]) != 1:
            raise SieveError(line, "the size test requires either :over or :under")
        comp = out.get("comparator", "i;ascii-casemap")
        if comp == "i;ascii-numeric" and out.get("match") in ("contains", "matches", "regex"):
            raise SieveError(line, f"the comparator does not support :{out['match']}")
        if out.get("match") == "regex":
            self.check_regex(name, what, out, line)
        if name == "redirect" and "${" not in out["pos"][0] and not _valid_address(out["pos"][0]):
            raise SieveError(line, f"redirect command: invalid address '{out['pos'][0]}'")
        if name == "body" and len({"raw", "content", "text"} & set(out["tags"])) > 1:
            raise SieveError(line, "body test: multiple body transforms specified")
        if name == "vacation" and "${" not in out["tags"].get("from", "${"):
            _, address = email.utils.parseaddr(out["tags"]["from"])
            if not _valid_address(address):
                raise SieveError(line, f"vacation command: invalid :from address '{out['tags']['from']}'")
        if name == "set":
            for same in (("lower", "upper"), ("lowerfirst", "upperfirst"), ("quotewildcard", "quoteregex")):
                # RFC 5229 4.1: two modifiers of one precedence are an error.
                if all(m in out["tags"] for m in same):
                    raise SieveError(line, f"set command: :{same[0]} and :{same[1]} cannot be combined")
        if name == "set" and "${" not in out["pos"][0] and not _VARIABLE_NAME.fullmatch(out["pos"][0].lower()):
            raise SieveError(line, f"set command: invalid variable name '{out['pos'][0]}'")
        if name == "vacation" and "days" in out["tags"] and "seconds" in out["tags"]:
            raise SieveError(line, "vacation: :days and :seconds are exclusive")
        return out

    def check_regex(self, name: str, what: str, out: dict, line: int) -> None:
        """Pigeonhole compiles constant :regex keys with the script: a bad one does not compile."""
        keys = out["pos"][-1]
        for key in keys:
            if "variables" in self.required and "${" in key:
                continue
            try:
                _re2(_posix_brackets(key), False, True)
            except re2.error:
                raise SieveError(line, f"{name} {what}: invalid regular expression '{key}'") from None

    def value(self, a, kind: str, name: str, what: str, line: int):
        if kind == "number":
            if not isinstance(a, Number):
                raise SieveError(line, f"the {name} {what} expects a number")
            return a.value
        if not isinstance(a, StringList):
            raise SieveError(line, f"the {name} {what} expects a string")
        if kind == "string" and a.is_list:
            raise SieveError(line, f"the {name} {what} expects a string, not a list")
        values = tuple(self.string(v, line) for v in a.values)
        return values[0] if kind == "string" else values

    def string(self, s: str, line: int = 0) -> str:
        if self.encoded and "${" in s:
            return _decode_encoded(s, line)
        return s


_ENCODED = re2.compile(r"(?i)\$\{(hex|unicode):([ \t\r\n0-9a-fA-F]*)\}")


def _decode_encoded(s: str, line: int) -> str:
    """RFC 5228 2.4.2.4: ${hex:..} octets (UTF-8) and ${unicode:..} code points."""

    def one(m) -> str:
        digits = m.group(2).split()
        if m.group(1).lower() == "hex":
            try:
                return bytes(int(d, 16) for d in digits if len(d) <= 2).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return m.group(0)
        out = []
        for d in digits:
            cp = int(d, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise SieveError(line, f"invalid unicode character 0x{d} in encoded character")
            out.append(chr(cp))
        return "".join(out)

    return _ENCODED.sub(one, s)


def compile_script(script: str | bytes) -> list[Command]:
    """Parse and validate; `SieveError` with its line if the script is wrong."""
    commands = parse(script)
    _Validator().commands(commands, True)
    return commands


# ---------------------------------------------------------------- matching


def _casemap(s: str) -> str:
    # RFC 4790 9.2: i;ascii-casemap folds only A-Z.  On ASCII text that is
    # str.lower, several times faster than translate (bench/filters.py).
    if s.isascii():
        return s.lower()
    return s.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}


def _numeric(s: str) -> int | None:
    """RFC 4790 9.1: the leading digits' value; None (positive infinity) if none."""
    n = 0
    digits = 0
    for c in s:
        if not ("0" <= c <= "9"):
            break
        n = n * 10 + ord(c) - 48
        digits += 1
    return n if digits else None


def _compare(a: str, b: str, comparator: str) -> int:
    """-1, 0, 1 ordering of a and b under the comparator (RFC 5231 relational)."""
    if comparator == "i;ascii-numeric":
        x, y = _numeric(a), _numeric(b)
        if x is None or y is None:
            return 0 if x is y else (1 if x is None else -1)
        return (x > y) - (x < y)
    if comparator == "i;ascii-casemap":
        a, b = _casemap(a), _casemap(b)
        return (a > b) - (a < b)
    ab, bb = a.encode(), b.encode()
    return (ab > bb) - (ab < bb)


def _relation(cmp: int, op: str) -> bool:
    return {"gt": cmp > 0, "ge": cmp >= 0, "lt": cmp < 0, "le": cmp <= 0, "eq": cmp == 0, "ne": cmp != 0}[op]


# Compiled patterns and translated globs are shared by every run: the same
# script's keys come back with every message (a realistic script spent most
# of its time compiling them again).  RE2's matching is thread-safe.
@functools.lru_cache(maxsize=1024)
def _posix_brackets(pattern: str) -> str:
    """POSIX ERE bracket expressions in RE2's syntax.

    In POSIX a backslash inside [...] is a literal (``[\\]]`` is "\\" then
    "]"), and a "]" first in the brackets is a member; RE2 reads Perl's
    escapes there.  Outside brackets the two agree closely enough for Sieve.
    """
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c != "[":
            out.append(c)
            i += 1
            continue
        j = i + 1
        body = ["["]
        if j < n and pattern[j] == "^":
            body.append("^")
            j += 1
        if j < n and pattern[j] == "]":
            body.append("\\]")
            j += 1
        while j < n and pattern[j] != "]":
            if pattern[j] == "[" and j + 1 < n and pattern[j + 1] in ":.=":
                close = pattern.find(pattern[j + 1] + "]", j + 2)
                if close < 0:
                    break
                body.append(pattern[j : close + 2])
                j = close + 2
                continue
            body.append("\\\\" if pattern[j] == "\\" else ("\\[" if pattern[j] == "[" else pattern[j]))
            j += 1
        if j >= n:  # unterminated: leave it for RE2 to refuse
            out.append(pattern[i:])
            break
        out.append("".join(body) + "]")
        i = j + 1
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _re2(pattern: str, casefold: bool, longest: bool):
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    options.dot_nl = True
    options.longest_match = longest
    options.case_sensitive = not casefold
    return re2.compile(pattern, options)


@functools.lru_cache(maxsize=1024)
def _glob(key: str) -> str:
    """RFC 5228 2.7.1 :matches: '*' any run, '?' one character, '\\' escapes.

    Only the first nine wildcards capture (${1}..${9}): captures make RE2's
    submatch pass slower, and no variable can name a tenth.
    """
    out = []
    groups = 0
    i = 0
    while i < len(key):
        c = key[i]
        if c == "\\" and i + 1 < len(key):
            i += 1
            out.append(re2.escape(key[i]))
        elif c in "*?":
            groups += 1
            body = ".*?" if c == "*" else "."
            out.append(f"({body})" if groups <= MAX_MATCH_INDEX else f"(?:{body})")
        else:
            out.append(re2.escape(c))
        i += 1
    return "".join(out)


class _Run:
    def __init__(self, message: Message, envelope: Envelope, mailboxes: Callable[[str], bool]) -> None:
        self.message = message
        self.envelope = envelope
        self.mailboxes = mailboxes
        self.actions: list[Action] = []
        self.implicit_keep = True
        self.flags: list[str] = []
        self.variables: dict[str, str] = {}
        self.matches: list[str] = []
        self.redirects = 0
        self.steps = 0
        self.work = 0
        self.bodies: dict[object, str] = {}
        self.uses_variables = False
        self.regex_cache: dict[tuple[str, bool, bool], object] = {}
        # Per field name; a run sees at most the message's fields plus the script's names.
        self.decoded_fields: dict[str, list[str]] = {}
        self.address_fields: dict[str, list[str]] = {}

    # -- strings

    def expand(self, s: str) -> str:
        """RFC 5229 3: ${name} and ${N}, when "variables" is required."""
        if not self.uses_variables or "${" not in s:
            return s
        # Built piece by piece under a budget: "${a}" repeated through a 1 MiB
        # script would otherwise expand to a gigabyte before any cut.
        out, size, pos = [], 0, 0
        limit = MAX_VARIABLE_SIZE * 4
        for m in _VARIABLE.finditer(s):
            for piece in (s[pos : m.start()], self._lookup(m)):
                out.append(piece[: limit - size])
                size += len(out[-1])
            pos = m.end()
            if size >= limit:
                return "".join(out)
        out.append(s[pos:][: limit - size])
        return "".join(out)

    def _lookup(self, m) -> str:
        name = m.group(1)
        if name.isdigit():
            n = int(name)
            return self.matches[n] if n < len(self.matches) else ""
        return self.variables.get(name.lower(), "")

    def expand_all(self, values: Iterable[str]) -> list[str]:
        return [self.expand(v) for v in values]

    # -- commands

    def block(self, commands: list[Command]) -> bool:
        """Run commands; False when `stop` ran."""
        condition_done = False
        for c in commands:
            name = c.name
            x = c.extra
            if name == "require":
                continue
            if name == "if":
                condition_done = False
            if name in ("if", "elsif"):
                if condition_done:
                    continue
                if self.test(c.tests[0]):
                    condition_done = True
                    if not self.block(c.block or []):
                        return False
                continue
            if name == "else":
                if not condition_done:
                    condition_done = True
                    if not self.block(c.block or []):
                        return False
                continue
            if name == "stop":
                return False
            self.command(c, x)
        return True

    def command(self, c: Command, x: dict) -> None:
        name, tags, pos = c.name, x["tags"], x["pos"]
        if name == "keep":
            flags = self.flag_list(tags["flags"]) if "flags" in tags else tuple(self.flags)
            if self.add(c, Action("keep", "INBOX", flags=flags)):
                self.implicit_keep = False
        elif name == "discard":
            self.implicit_keep = False
            self.add(c, Action("discard"))
        elif name == "fileinto":
            flags = self.flag_list(tags["flags"]) if "flags" in tags else tuple(self.flags)
            copy = bool(tags.get("copy"))
            folder = self.expand(pos[0])
            new = self.add(c, Action("fileinto", folder, flags=flags, copy=copy, create=bool(tags.get("create"))))
            if new and not copy:
                self.implicit_keep = False
        elif name == "redirect":
            address = self.expand(pos[0])
            if not _valid_address(address):
                raise SieveError(c.line, f"redirect: invalid address '{address}'")
            copy = bool(tags.get("copy"))
            action = Action("redirect", address, copy=copy)
            if not any(a.kind == "redirect" and _same_address(a.target, address) for a in self.actions):
                # SPEC 12 / Pigeonhole's sieve_max_redirects: distinct addresses count.
                self.redirects += 1
                if self.redirects > MAX_REDIRECTS:
                    raise SieveError(c.line, f"number of redirect actions exceeds policy limit (> {MAX_REDIRECTS})")
            new = self.add(c, action)
            if new and not copy:
                self.implicit_keep = False
        elif name == "reject":
            self.add(c, Action("reject", self.expand(pos[0])))
            self.implicit_keep = False
        elif name == "vacation":
            self.vacation(c, tags, pos)
        elif name == "set":
            self.set(c, tags, pos)
        elif name in ("setflag", "addflag", "removeflag"):
            flags = self.flag_list(pos[-1])
            var = self.expand(pos[0][0]).lower() if len(pos) == 2 else None
            current = self.flag_list([self.variables.get(var, "")]) if var else tuple(self.flags)
            if name == "setflag":
                updated = list(flags)
            elif name == "addflag":
                updated = list(current) + [f for f in flags if f.lower() not in {g.lower() for g in current}]
            else:
                drop = {f.lower() for f in flags}
                updated = [f for f in current if f.lower() not in drop]
            if var:
                self.variables[var] = " ".join(updated)[:MAX_VARIABLE_SIZE]
            else:
                self.flags = updated

    def add(self, c: Command, action: Action) -> bool:
        """Add an action; False when it merged into an equal earlier one.

        A merged duplicate leaves the implicit keep as the first one left it
        (Pigeonhole: `fileinto :copy "A"; fileinto "A";` still keeps).
        """
        kinds = {a.kind for a in self.actions}
        # RFC 5429 2.1: reject cannot go with an action that delivers or replies.
        if action.kind == "reject" and kinds & {"keep", "fileinto", "redirect", "vacation", "reject"}:
            raise SieveError(c.line, "reject action conflicts with other action")
        if "reject" in kinds and action.kind in ("keep", "fileinto", "redirect", "vacation"):
            raise SieveError(c.line, f"{action.kind} action conflicts with reject action")
        if action.kind == "vacation" and "vacation" in kinds:
            raise SieveError(c.line, "duplicate vacation action not allowed")
        for i, a in enumerate(self.actions):
            # RFC 5228 4.2/2.10.3: the same folder or address twice is one action.
            if a.kind in ("keep", "fileinto") and action.kind in ("keep", "fileinto") and _same_folder(a, action):
                self.actions[i] = replace(a, flags=action.flags)
                return False
            if a.kind == action.kind == "redirect" and _same_address(a.target, action.target):
                return False
            if a.kind == action.kind == "discard":
                return False
        if len(self.actions) >= MAX_ACTIONS:
            raise SieveError(c.line, f"total number of actions exceeds policy limit ({MAX_ACTIONS})")
        self.actions.append(action)
        return True

    def flag_list(self, values: Iterable[str]) -> tuple[str, ...]:
        """RFC 5232 3: space-separated flags, case-insensitively unique."""
        seen: dict[str, str] = {}
        for v in self.expand_all(values):
            for f in v.split():
                seen.setdefault(f.lower(), f)
        return tuple(seen.values())

    def set(self, c: Command, tags: dict, pos: list) -> None:
        name = self.expand(pos[0]).lower()
        if not _VARIABLE_NAME.fullmatch(name):
            raise SieveError(c.line, f"set: invalid variable name '{name}'")
        value = self.expand(pos[1])
        # RFC 5229 4.1: lower/upper (40), then lowerfirst/upperfirst (30),
        # quotewildcard/quoteregex (20), length (10).
        if "lower" in tags:
            value = value.lower()
        if "upper" in tags:
            value = value.upper()
        if "lowerfirst" in tags and value:
            value = value[0].lower() + value[1:]
        if "upperfirst" in tags and value:
            value = value[0].upper() + value[1:]
        if "quotewildcard" in tags:
            value = "".join("\\" + ch if ch in "*?\\" else ch for ch in value)
        if "quoteregex" in tags:
            value = "".join("\\" + ch if ch in "\\^$.[]|()?*+{}" else ch for ch in value)
        if "length" in tags:
            value = str(len(value))
        if name not in self.variables and len(self.variables) >= MAX_VARIABLES:
            raise SieveError(c.line, f"set: more than {MAX_VARIABLES} variables")
        self.variables[name] = _cut_utf8(value, MAX_VARIABLE_SIZE)

    def vacation(self, c: Command, tags: dict, pos: list) -> None:
        if "seconds" in tags:
            # Pigeonhole's sieve_vacation_min_period: 1 day (SPEC 12).
            seconds = max(int(tags["seconds"]), 86400)
        else:
            days = int(tags.get("days", 7))
            seconds = max(days, 1) * 86400
        addresses = tuple(self.expand_all(tags.get("addresses", ())))
        reply_to, reason = self.vacation_decision(addresses)
        self.add(
            c,
            Action(
                "vacation",
                self.expand(pos[0]),
                seconds=seconds,
                subject=self.expand(tags["subject"]) if "subject" in tags else None,
                from_=self.expand(tags["from"]) if "from" in tags else None,
                addresses=addresses,
                mime=bool(tags.get("mime")),
                handle=self.expand(tags["handle"]) if "handle" in tags else "",
                reply_to=reply_to,
                skip_reason=reason,
            ),
        )

    def vacation_decision(self, addresses: tuple[str, ...]) -> tuple[str, str]:
        """Whom RFC 5230 4.5 / RFC 3834 2 let a reply go to, or why not."""
        sender = self.envelope.mail_from
        if not sender or sender == "<>":
            return "", "null sender"  # RFC 5230 4.5: never to the null reverse-path
        local = sender.rpartition("@")[0].lower()
        # Pigeonhole (and RFC 3834 2): not to daemons and list owners.
        if local in ("mailer-daemon", "listserv", "majordomo") or local.startswith("owner-") or local.endswith("-request"):
            return "", "sender is a system address"
        m = self.message
        for v in m.values("auto-submitted"):
            if v.split(";")[0].strip().lower() != "no":
                return "", "Auto-Submitted message"  # RFC 3834 2
        for v in m.values("precedence"):
            if v.strip().lower() in ("bulk", "list", "junk"):
                return "", f"Precedence: {v.strip()}"
        for n, _ in m.headers:
            if n.lower() == "list-id" or n.lower().startswith("list-"):
                return "", f"mailing list ({n})"
        mine = {a.lower() for a in (self.envelope.mailbox, self.envelope.rcpt_to, *addresses) if a}
        recipients = set()
        for name in ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"):
            for addr in _addresses(m.values(name)):
                recipients.add(addr.lower())
        if not mine & recipients:
            return "", "my address is not in To/Cc"  # RFC 5230 4.5
        return sender, ""

    # -- tests

    def test(self, t: Test) -> bool:
        self.steps += 1
        if self.steps > MAX_TEST_STEPS:
            raise SieveError(t.line, "the script does too much work")
        x = t.extra
        name = t.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(t.tests[0])
        if name == "allof":
            return all(self.test(s) for s in t.tests)
        if name == "anyof":
            return any(self.test(s) for s in t.tests)
        if name == "size":
            if "over" in x["tags"]:
                return self.message.size > x["tags"]["over"]
            return self.message.size < x["tags"]["under"]
        if name == "exists":
            return all(self.message.values(h) for h in self.expand_all(x["pos"][0]))
        if name == "header":
            values = []
            for h in self.expand_all(x["pos"][0]):
                values.extend(self.decoded(h))
            return self.match(t, x, values, x["pos"][1])
        if name == "address":
            values = []
            for h in self.expand_all(x["pos"][0]):
                values.extend(self.addresses(h))
            return self.match(t, x, self.parts(values, x), x["pos"][1])
        if name == "envelope":
            values = []
            for part in self.expand_all(x["pos"][0]):
                part = part.lower()
                if part == "from":
                    values.append(self.envelope.mail_from.strip("<>"))
                elif part == "to":
                    values.append(self.envelope.rcpt_to.strip("<>"))
            return self.match(t, x, self.parts(values, x, envelope=True), x["pos"][1])
        if name == "string":
            return self.match(t, x, self.expand_all(x["pos"][0]), x["pos"][1], strings=True)
        if name == "body":
            return self.match(t, x, [self.body(x["tags"])], x["pos"][0])
        if name == "hasflag":
            pos = x["pos"]
            if len(pos) == 2:
                flags = [f for v in pos[0] for f in self.variables.get(self.expand(v).lower(), "").split()]
            else:
                flags = list(self.flags)
            return self.match(t, x, flags, pos[-1])
        if name == "mailboxexists":
            return all(self.mailboxes(m) for m in self.expand_all(x["pos"][0]))
        raise SieveError(t.line, f"unknown test '{name}'")  # pragma: no cover (validated)

    def decoded(self, name: str) -> list[str]:
        """A field's values, RFC 2047-decoded, once per run."""
        key = name.lower()
        found = self.decoded_fields.get(key)
        if found is None:
            found = self.decoded_fields[key] = [_decode_2047(v) for v in self.message.values(key)]
        return found

    def addresses(self, name: str) -> list[str]:
        """A field's addresses, once per run."""
        key = name.lower()
        found = self.address_fields.get(key)
        if found is None:
            found = self.address_fields[key] = [a for v in self.message.values(key) for a in _addresses([v])]
        return found

    def parts(self, addresses: list[str], x: dict, envelope: bool = False) -> list[str]:
        """RFC 5228 2.7.4 and RFC 5233 4: the chosen part of each address."""
        part = x.get("addrpart", "all")
        out = []
        for a in addresses:
            if not a:
                if envelope:
                    out.append("")  # the null reverse-path
                continue
            local, at, domain = a.rpartition("@")
            if not at:
                local, domain = a, ""
            if part == "all":
                out.append(a)
            elif part == "localpart":
                out.append(local)
            elif part == "domain":
                out.append(domain)
            elif part == "user":
                out.append(local.partition("+")[0])
            elif part == "detail":
                user, plus, detail = local.partition("+")
                if plus:
                    out.append(detail)
        return out

    def body(self, tags: dict) -> str:
        """RFC 5173 5: the raw body, or its decoded text parts (once per transform)."""
        key = "raw" if "raw" in tags else tuple(tags.get("content", ("text",)))
        if key not in self.bodies:
            if len(self.bodies) >= 8:
                self.bodies.clear()
            self.bodies[key] = self._body(tags)
        return self.bodies[key]

    def _body(self, tags: dict) -> str:
        raw = self.message.body
        if "raw" in tags:
            return raw.decode("utf-8", "replace")
        types = [t.lower() for t in tags.get("content", ("text",))]
        single = self._single_part()
        if single is not None:
            # Most mail is one part with no transfer encoding: the body is the
            # text, without the cost of parsing the message again.
            if not any(t == "" or single.get_content_type() == t or single.get_content_maintype() == t for t in types):
                return ""
            try:
                return raw.decode(single.get_content_charset() or "us-ascii", "replace")
            except LookupError:
                return raw.decode("utf-8", "replace")
        head = "".join(f"{n}:{v}\r\n" for n, v in self.message.headers)
        msg = email.message_from_bytes(head.encode("utf-8", "replace") + b"\r\n" + raw, policy=email.policy.compat32)
        texts = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            if not any(t == "" or ctype == t or ctype.split("/")[0] == t for t in types):
                continue
            payload = part.get_payload(decode=True)  # bytes or None for a leaf part
            if not isinstance(payload, bytes):
                payload = b""
            charset = part.get_content_charset() or "us-ascii"
            try:
                texts.append(payload.decode(charset, "replace"))
            except LookupError:
                texts.append(payload.decode("utf-8", "replace"))
        return "\r\n".join(texts)

    def _single_part(self) -> email.message.Message | None:
        """The Content-Type of a one-part message the body is taken as is from, else None."""
        types = self.message.values("content-type")
        encodings = self.message.values("content-transfer-encoding")
        if len(types) > 1 or any(e.lower() not in ("7bit", "8bit", "binary") for e in encodings):
            return None
        part = email.message.Message()
        if types:
            part["Content-Type"] = types[0]
        if part.get_content_maintype() in ("multipart", "message"):
            return None
        return part

    def match(self, t: Test, x: dict, values: list[str], keys: Iterable[str], strings: bool = False) -> bool:
        mtype = x.get("match", "is")
        comp = x.get("comparator", "i;ascii-casemap")
        keys = self.expand_all(keys)
        if mtype == "count":
            if strings:
                values = [v for v in values if v != ""]
            count = str(len(values))
            return any(_relation(_compare(count, k, comp), x["relation"]) for k in keys)
        for v in values:
            for k in keys:
                self.steps += 1
                if self.steps > MAX_TEST_STEPS:
                    raise SieveError(t.line, "the script does too much work")
                if self.match_one(t, mtype, comp, x, v, k):
                    return True
        return False

    def match_one(self, t: Test, mtype: str, comp: str, x: dict, v: str, k: str) -> bool:
        self.work += len(v) * max(len(k), 1) if mtype in ("matches", "regex") else len(v) + len(k)
        if self.work > MAX_MATCH_WORK:
            raise SieveError(t.line, "the script does too much work (matching)")
        if mtype == "value":
            return _relation(_compare(v, k, comp), x["relation"])
        if mtype == "is":
            return _compare(v, k, comp) == 0
        fold = comp == "i;ascii-casemap"
        if mtype == "contains":
            return (_casemap(k) in _casemap(v)) if fold else (k in v)
        if mtype == "matches":
            rx = self.compiled(_glob(_casemap(k) if fold else k), False, False, t)
            m = rx.fullmatch(_casemap(v) if fold else v)
            if m is None:
                return False
            if self.uses_variables:
                # RFC 5229 3.2: ${0} the whole value, ${1}.. each wildcard.
                self.matches = [v] + [v[slice(*m.span(i))] for i in range(1, min(m.re.groups, MAX_MATCH_INDEX) + 1)]
            return True
        if mtype == "regex":
            rx = self.compiled(_posix_brackets(k), fold, True, t)
            m = rx.search(v)
            if m is None:
                return False
            if self.uses_variables:
                self.matches = [m.group(0)] + [m.group(i) or "" for i in range(1, min(m.re.groups, MAX_MATCH_INDEX) + 1)]
            return True
        raise SieveError(t.line, f"unknown match type :{mtype}")  # pragma: no cover

    def compiled(self, pattern: str, fold: bool, longest: bool, t: Test):
        key = (pattern, fold, longest)
        rx = self.regex_cache.get(key)
        if rx is None:
            try:
                rx = _re2(pattern, fold, longest)
            except re2.error as e:
                raise SieveError(t.line, f"invalid regular expression '{pattern}': {e}") from None
            if len(self.regex_cache) < 64:
                self.regex_cache[key] = rx
        return rx


_VARIABLE = re2.compile(r"\$\{([0-9]+|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_VARIABLE_NAME = re2.compile(r"[a-z_][a-z0-9_]*")
_ADDRESS = re2.compile(r"[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+")


def _strip_comments(value: str) -> str:
    """RFC 5322 3.2.2 comments removed in one linear pass.

    email.utils.getaddresses recurses once per nested "(": a From of 3000
    "(" raises RecursionError.  Comments never take part in an address test.
    """
    if "(" not in value:
        return value
    out = []
    depth = 0
    quoted = False
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\" and i + 1 < n:
            if depth == 0:
                out.append(value[i : i + 2])
            i += 2
            continue
        if quoted:
            quoted = c != '"'
            out.append(c)
        elif c == '"' and depth == 0:
            quoted = True
            out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(" ")
        elif depth == 0:
            out.append(c)
        i += 1
    return "".join(out)


# One mailbox as most fields are written, "addr@example" or "Name <addr@example>"
# (ASCII atoms and dots, no quotes, comments or lists): its address is what
# email.utils.getaddresses gives (a property test holds them to it), without its
# tokenizer, a sixth of a 20-rule script's interpreter time (bench/filters.py).
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_SIMPLE_MAILBOX = re2.compile(
    rf"[ \t]*(?:({_ATOMS}@{_ATOMS})|[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~. \t-]*<({_ATOMS}@{_ATOMS})>)[ \t]*"
)


def _addresses(values: list[str]) -> list[str]:
    """The addr-specs in address header values (RFC 5228 2.7.4)."""
    simple = []
    for v in values:
        m = _SIMPLE_MAILBOX.fullmatch(v)
        if m is None:
            # getaddresses joins the values: one odd value can swallow the next.
            return [addr for _, addr in email.utils.getaddresses([_strip_comments(v) for v in values])]
        simple.append(m.group(1) or m.group(2))
    return simple


def _valid_address(a: str) -> bool:
    return _ADDRESS.fullmatch(a) is not None


def _same_address(a: str, b: str) -> bool:
    """RFC 5321 2.4: the local part is case-sensitive, the domain is not."""
    la, _, da = a.rpartition("@")
    lb, _, db = b.rpartition("@")
    return la == lb and da.lower() == db.lower()


def _same_folder(a: Action, b: Action) -> bool:
    fa = "INBOX" if a.kind == "keep" or a.target.upper() == "INBOX" else a.target
    fb = "INBOX" if b.kind == "keep" or b.target.upper() == "INBOX" else b.target
    return fa == fb


def _cut_utf8(s: str, limit: int) -> str:
    b = s.encode("utf-8")
    if len(b) <= limit:
        return s
    return b[:limit].decode("utf-8", "ignore")


def _decode_2047(value: str) -> str:
    """RFC 2047 encoded words to text (bounded by MAX_HEADER_VALUE upstream)."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value


def run(
    script: str | bytes | list[Command],
    message: Message,
    envelope: Envelope,
    mailboxes: Callable[[str], bool] = lambda name: name.upper() == "INBOX",
) -> Result:
    """The actions the script takes on the message; implicit keep resolved.

    Never raises: a script that does not compile, one that fails while
    running (RFC 5228 2.10.6), and any failure of ours give a `Result` that
    holds only the implicit keep and the error, so that no filter outcome
    can lose a message (SPEC 12).  `compile_script` first to tell a compile
    error apart.
    """
    keep_only = (Action("keep", "INBOX", implicit=True),)
    try:
        commands = compile_script(script) if not isinstance(script, list) else script
    except SieveError as e:
        return Result(keep_only, error=f"compile: {e}")
    state = _Run(message, envelope, mailboxes)
    state.uses_variables = any(
        c.name == "require" and "variables" in c.extra["pos"][0] for c in commands
    )
    try:
        stopped = not state.block(commands)
    except SieveError as e:
        return Result(keep_only, error=str(e))
    except Exception as e:  # noqa: BLE001 - a bug of ours must not lose the message
        return Result(keep_only, error=f"internal error: {type(e).__name__}: {e}")
    actions = list(state.actions)
    if state.implicit_keep:
        actions.append(Action("keep", "INBOX", flags=tuple(state.flags), implicit=True))
    return Result(tuple(actions), stopped=stopped)
