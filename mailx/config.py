# -*- test-case-name: tests.test_config -*-
"""The configuration file (SPEC section 3): YAML in, an immutable, validated `Config` out.

Every problem is collected and reported at once, each with file, line and key
(``mailx.yaml:14: domains.example.test.aliases.sales: unknown mailbox
'bobb'``): fixing a file one error per restart is miserable.  Line numbers
come from walking the node tree `yaml.compose` builds, not the bare data.

Defaults live in `DEFAULTS` and `BLOCK_DEFAULTS` and nowhere else; the
repository's ``mailx.yaml`` mirrors them with comments.  Decisions worth
knowing:

- Sizes: a plain integer is bytes; ``B``, ``KiB``, ``MiB``, ``GiB`` are powers
  of 1024 and ``KB``, ``MB``, ``GB`` powers of 1000, as the units say.
  Units are case-sensitive (``Mb`` would be megabits).
- Durations: a plain number is seconds; ``s``, ``m``, ``h``, ``d`` may be
  combined (``1h30m``).
- ``hostname`` defaults to the system's fully qualified name
  (`socket.getfqdn`): an MX must greet with its own name.  Whichever way it
  is set, it must be a dotted FQDN: "localhost" or a bare "myhost" would be
  wrong everywhere, and is an error rather than a silent default.
- Domains, mailboxes and alias names are folded (IDNA A-labels, lower
  case); two keys that fold to the same thing are an error.  IDNA uses the
  ``idna`` package (IDNA2008 with UTS #46) when installed, which it is with
  twisted[tls]; otherwise Python's own codec (IDNA2003).
- ``subaddress_delimiter``: each character is a delimiter, as Postfix's
  recipient_delimiter; null or "" disables subaddressing.
- Mailbox names and alias keys are ASCII dot-atoms (SMTPUTF8 is not
  supported); a mailbox name may not contain "/" since it names a directory.
- An alias target must name a mailbox or alias explicitly (optionally with
  a subaddress): the catch-all never catches a target, so a typo is caught
  here and not silently delivered to the catch-all.
- A DKIM key file is not read at load: ``mailxctl dkim keygen`` creates it
  from this very configuration.  TLS files must be readable.  A DKIM key
  that exists must not be open to every user of the machine (`private_key`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

import yaml

from mailx import yamlerrors
from mailx.address import AddressError, is_dot_atom, normalize_domain, parse_address
from mailx.inbound.routing import Finding, audit_domains


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
"""Marks a key without a default, inside an optional block (``tls``, ``dkim``)."""


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


# ---------------------------------------------------------------------------
# Defaults: the one place.  Values are written as they would be in YAML and go
# through the same parsers as the file's.

DEFAULTS: Mapping[str, Any] = _frozen(
    {
        "hostname": None,  # None: the system's FQDN, socket.getfqdn()
        "public_addresses": [],
        # Receives DMARC aggregate (rua, RFC 7489 7.2) and TLS-RPT (RFC 8460)
        # reports; `mailxctl dns` puts it in the records it prints.
        "reports": None,
        # Where our users read their mail (IMAP over TLS, RFC 8314): mailx
        # serves no IMAP, so only the owner knows.  "host" or "host:port"
        # (port 993 by default); `mailxctl dns` prints its RFC 6186 SRV record
        # and the Thunderbird autoconfig file from it.
        "imap": None,
        "listen": {
            # Unprivileged and local until the owner says otherwise (SPEC section 2).
            "smtp": ["tcp:2525:interface=127.0.0.1"],
            # SPEC 11: authenticated submission, off by default.  "submission"
            # (RFC 6409, port 587) offers STARTTLS and takes AUTH and MAIL only
            # after it; "submissions" (RFC 8314, port 465) is TLS from the first
            # byte with tls:'s certificate.  Both need tls: and accounts.
            "submission": [],
            "submissions": [],
            # Who may send a PROXY header on a haproxy: listener (Dovecot's
            # haproxy_trusted_networks); from anyone else the header is a lie.
            "haproxy_trusted_networks": ["127.0.0.0/8", "::1"],
            # HTTP GET /metrics (Prometheus text format); none by default.
            "metrics": [],
        },
        # text: twistd's lines; json: one JSON object per line (Loki, ELK).
        "logging": {
            "format": "text",
            # SPEC 13: every message's events, one JSON line each, for
            # `mailxctl trace`: one file a day in path (null: <spool>/trace),
            # files older than keep_days removed; keep_days 0: no record.
            "trace": {"path": None, "keep_days": 7},
        },
        "tls": None,  # {certificate, key}; STARTTLS is offered only when set
        "limits": {
            "message_size": "25MiB",  # Gmail's 25 MB; Postfix's default is 10240000
            "recipients": 100,  # RFC 5321 4.5.3.1.8: at least 100 must be accepted
            "connections": 1000,
            "connections_per_ip": 20,
            "connection_rate_per_ip": 60,  # new connections per minute; 0: off
            "idle_timeout": "5m",  # RFC 5321 4.5.3.2.7: server timeout at least 5 minutes
            "session_timeout": "30m",
            "error_limit": 20,  # bad commands and refused recipients per session; Postfix: 20
            # NOOP, RSET, VRFY, EXPN, HELP without a delivered message; Postfix's
            # smtpd_junk_command_limit is 100.
            "junk_commands": 100,
            # IPv6 clients count per network of this length for the per-IP
            # limits: one host gets a /64.  Postfix 3.8's
            # smtpd_client_ipv6_prefix_length is 84 (anvil rates only).
            "ipv6_prefix_length": 64,
            # Pause before the banner; a client that talks first is refused
            # (RFC 5321 4.3.1).  Postfix's postscreen_greet_wait is 6s; real
            # MTAs wait 5 minutes for a banner (RFC 5321 4.5.3.2.1); 0: off.
            "greeting_delay": "1s",
            # SPEC 11 (submission): failed AUTH per client IP per 10 minutes,
            # then 454 4.7.0 (Dovecot's penalty starts at the second failure).
            # Recipients per account per hour.
            "auth_failures": 5,
            "send_per_hour": 200,
        },
        # SPEC 11: who may authenticate for submission, and as what they send.
        "accounts": {
            "passwords": None,  # a Dovecot passwd-file (mailxctl passwd writes it)
            "dovecot": None,  # or Dovecot's auth-client socket, a Twisted client endpoint
            "send_as": {},  # account address -> extra addresses in our domains
        },
        "paths": {"mail": "var/mail", "spool": "var/spool"},
        "dns": {
            "nameservers": [],  # empty: the system's resolvers
            "timeout": "5s",
            "watch": None,  # e.g. "6h": re-check our own published records
        },
        "authentication": {
            "spf": True,
            "dkim": True,
            "dmarc": "enforce",
            # All the checks of one message; then 451 4.7.5.  RFC 7208 4.6.4:
            # SPF's own limit "SHOULD allow at least 20 seconds".
            "timeout": "30s",
            # Messages of one client (IPv6: one /64) checked at once; more wait.
            "concurrency_per_ip": 2,
        },
        "checks": {"dnsbl": [], "reverse_dns": True},
        "domains": {},  # see BLOCK_DEFAULTS["domain"]; at least one is required
        "outbound": {
            "srs_secret": None,
            "smarthost": None,  # null: straight to the recipient's MX
            "port": 25,
            # RFC 5321 4.5.4.1: retry interval at least 30 minutes is the
            # classic advice; the first tries come sooner, as Postfix's do.
            "retry": ["5m", "15m", "30m", "1h", "2h", "4h"],
            "queue_lifetime": "5d",  # RFC 5321 4.5.4.1: give up after 4-5 days; Postfix: 5d
            # {username, password}: AUTH PLAIN or LOGIN at the smarthost, over TLS only.
            "smarthost_auth": None,
            # A "still trying" notice to the sender; Sendmail's queuewarn is 4h, null: none.
            "delay_warning": "4h",
            # Connections at once; Postfix: 100 processes, 20 per destination.
            "connections": 100,
            "connections_per_domain": 20,
            # SPEC 8: private/reserved MX or smarthost addresses we may connect to
            # anyway (CIDR); loopback always may.  Exim's ignore_target_hosts in reverse.
            "allowed_networks": [],
            # RFC 8461: honour recipient domains' MTA-STS policies (direct MX delivery).
            "mta_sts": True,
        },
    }
)

# Defaults inside blocks that are optional or repeated.
BLOCK_DEFAULTS: Mapping[str, Mapping[str, Any]] = _frozen(
    {
        "tls": {"certificate": REQUIRED, "key": REQUIRED},
        "dkim": {"selector": REQUIRED, "key": REQUIRED},
        "dnsbl": {"zone": REQUIRED, "action": "reject"},
        "smarthost_auth": {"username": REQUIRED, "password": REQUIRED},
        "domain": {
            "mailboxes": [],
            "aliases": {},
            "subaddress_delimiter": "+",
            "dkim": None,
            "alias_of": None,
            "sieve_before": None,
            "delivery": None,  # {lmtp: ENDPOINT}; null: our Maildirs (SPEC 14)
        },
        "delivery": {"lmtp": REQUIRED},
    }
)

DMARC_MODES = ("enforce", "monitor", "off")
# The punctuation a local part may contain (RFC 5322 3.2.3 atext, and "."):
# letters and digits as delimiters would split ordinary names.
_DELIMITERS = frozenset("!#$%&'*+-/=?^_`{|}~.")
DNSBL_ACTIONS = ("reject", "junk")
LOG_FORMATS = ("text", "json")
CATCH_ALL = "*"

_HOSTNAME_HINT = "to the name your MX record points at, e.g. mx.example.test"


def is_fqdn(name: str) -> bool:
    """A dotted name whose top label is not numeric (RFC 3696 2: no all-numeric TLD).

    ``localhost``, ``mx`` and ``192.0.2.1`` are not names an MX record can
    point at (RFC 5321 5.1; RFC 7505's null MX aside).
    """
    labels = name.rstrip(".").split(".")
    return len(labels) >= 2 and all(labels) and not labels[-1].isdigit()


# ---------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Limits:
    message_size: int  # bytes
    recipients: int
    connections: int
    connections_per_ip: int
    idle_timeout: float  # seconds
    session_timeout: float  # seconds
    error_limit: int
    connection_rate_per_ip: int  # per minute; 0: off
    greeting_delay: float  # seconds; 0: off
    junk_commands: int
    ipv6_prefix_length: int  # per-IP limits group IPv6 clients by this prefix
    auth_failures: int  # per client IP per 10 minutes (SPEC 11)
    send_per_hour: int  # recipients per account per hour (SPEC 11)


@dataclass(frozen=True)
class AccountsConfig:
    """Accounts for submission (SPEC 11): at most one of passwords and dovecot."""

    passwords: Path | None = None
    dovecot: str | None = None  # a Twisted client endpoint string
    send_as: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Paths:
    mail: Path
    spool: Path


@dataclass(frozen=True)
class TraceConfig:
    """logging.trace: where `mailx.observe.trace` writes, and for how many days."""

    path: Path | None  # None: <paths.spool>/trace
    keep_days: int = 7  # 0: no trace record

    def directory(self, spool: Path) -> Path:
        return self.path if self.path is not None else spool / "trace"


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...]
    timeout: float
    watch: float | None


@dataclass(frozen=True)
class AuthenticationConfig:
    spf: bool
    dkim: bool
    dmarc: str  # "enforce" | "monitor" | "off"
    timeout: float  # seconds for all the checks of one message
    concurrency_per_ip: int


@dataclass(frozen=True)
class DNSBLZone:
    zone: str
    action: str  # "reject" | "junk"


@dataclass(frozen=True)
class ChecksConfig:
    dnsbl: tuple[DNSBLZone, ...]
    reverse_dns: bool  # look up the client's PTR at connect, for Received and the log


@dataclass(frozen=True)
class DKIMConfig:
    selector: str
    key: Path


@dataclass(frozen=True)
class DomainConfig:
    """One domain.  An ``alias_of`` domain has no mailboxes or aliases of its own
    and shares its target's subaddress_delimiter."""

    name: str
    mailboxes: frozenset[str]
    aliases: Mapping[str, tuple[str, ...]]  # targets: "name", "name@our.domain", "x@elsewhere"
    subaddress_delimiter: str | None
    dkim: DKIMConfig | None
    alias_of: str | None
    # An administrator's Sieve script run before each mailbox's own (SPEC 12).
    sieve_before: Path | None = None
    # SPEC 14: the LMTP server (a Twisted client endpoint) that files this
    # domain's mail; None: our Maildirs.
    lmtp: str | None = None


@dataclass(frozen=True)
class SmarthostAuth:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"SmarthostAuth(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class OutboundConfig:
    """``outbound:`` (SPEC section 3), read by `mailx.outbound.relay.Outbound`;
    the defaults are ``DEFAULTS["outbound"]``."""

    srs_secrets: tuple[str, ...]  # the first signs; all are accepted
    smarthost: str | None
    port: int
    retry: tuple[float, ...]  # seconds; see `mailx.outbound.relay.retry_after`
    queue_lifetime: float
    smarthost_auth: SmarthostAuth | None
    delay_warning: float | None  # seconds; None: no delay notice
    connections: int
    connections_per_domain: int
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    mta_sts: bool


@dataclass(frozen=True)
class Config:
    source: Path
    hostname: str
    public_addresses: tuple[str, ...]
    listen: tuple[str, ...]
    tls: TLSConfig | None
    limits: Limits
    paths: Paths
    dns: DNSConfig
    authentication: AuthenticationConfig
    checks: ChecksConfig
    domains: Mapping[str, DomainConfig]
    outbound: OutboundConfig
    # Networks allowed to send a PROXY header on haproxy: listeners.
    haproxy_trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    log_format: str  # logging.format: "text" | "json"
    reports: str | None = None  # address for DMARC and TLS-RPT reports
    # listen.metrics: where GET /metrics is served (SPEC section 13).
    metrics_listen: tuple[str, ...] = ()
    trace: TraceConfig = field(default_factory=lambda: TraceConfig(None))  # logging.trace
    # Worth saying, not stopping for (a certificate about to expire): printed
    # by `mailxctl check`, logged at start-up.
    warnings: tuple[Problem, ...] = ()
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    # SPEC 11: the submission listeners (STARTTLS; implicit TLS).
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    # imap: the IMAPS server our users read mail from, (host, port); for `mailxctl dns`.
    imap: tuple[str, int] | None = None

    @property
    def first_domain(self) -> str:
        """The domain whose postmaster a bare ``<postmaster>`` reaches (RFC 5321 4.5.1)."""
        return next(iter(self.domains))


# ---------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file, located."""

    file: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))

    def __str__(self) -> str:
        return "\n".join(map(str, self.problems))


class _Invalid(ValueError):
    """A value's problem, raised by a parser and recorded at the value's node."""


# ---------------------------------------------------------------------------
# YAML nodes with their lines


@dataclass
class _Node:
    kind: str  # "map" | "seq" | "scalar"
    line: int
    key: str  # dotted path, for messages: domains.example.test.aliases.team[1]
    value: Any  # dict[str, _Node] | list[_Node] | the constructed scalar
    raw: str | None = None  # a scalar as written: "off" stays "off", not False

    @property
    def null(self) -> bool:
        return self.kind == "scalar" and self.value is None

    def describe(self) -> str:
        if self.kind == "map":
            return "a mapping"
        if self.kind == "seq":
            return "a list"
        if self.value is None:
            return "null"
        if isinstance(self.value, bool):
            return f"the boolean {self.raw}"
        raw = _shown(self.raw)
        if isinstance(self.value, int | float):
            return f"the number {raw}"
        return f"'{raw}'"


def _shown(raw: str | None) -> str:
    """A value as written, cut short for messages (a 400-digit number is one line)."""
    raw = raw or ""
    return raw if len(raw) <= 40 else f"{raw[:37]}..."


def _child_key(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _default_node(value: Any, key: str, line: int) -> _Node:
    """A node for a default value, located at the block that omitted it."""
    if isinstance(value, Mapping):
        return _Node(
            "map",
            line,
            key,
            {k: _default_node(v, _child_key(key, k), line) for k, v in value.items()},
        )
    if isinstance(value, tuple):
        return _Node(
            "seq", line, key, [_default_node(v, f"{key}[{i}]", line) for i, v in enumerate(value)]
        )
    raw = None if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return _Node("scalar", line, key, value, raw)


class _Tree:
    """Turns `yaml.compose` output into `_Node`s, noting duplicate keys on the way."""

    def __init__(self, loader: yaml.SafeLoader, report: Callable[[int, str, str], None]) -> None:
        self._loader = loader
        self._report = report
        self._active: set[int] = set()

    def build(self, node: yaml.Node, key: str, line: int) -> _Node:
        if id(node) in self._active:
            raise _Invalid("a YAML alias refers to itself")
        self._active.add(id(node))
        try:
            return self._build(node, key, line)
        finally:
            self._active.discard(id(node))

    def _build(self, node: yaml.Node, key: str, line: int) -> _Node:
        if isinstance(node, yaml.MappingNode):
            self._loader.flatten_mapping(node)  # "<<" merge keys
            items: dict[str, _Node] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self._report(key_line, key, "keys must be plain names")
                    continue
                path = _child_key(key, key_node.value)
                if key_node.value in items:
                    first = items[key_node.value].line
                    self._report(key_line, path, f"duplicate key (first on line {first})")
                    continue
                items[key_node.value] = self.build(value_node, path, key_line)
            return _Node("map", line, key, items)
        if isinstance(node, yaml.SequenceNode):
            return _Node(
                "seq",
                line,
                key,
                [
                    self.build(item, f"{key}[{i}]", item.start_mark.line + 1)
                    for i, item in enumerate(node.value)
                ],
            )
        try:
            value = self._loader.construct_object(node, deep=True)
        except ValueError:  # an integer over Python's 4300 digits: left as text, refused later
            value = node.value
        return _Node("scalar", line, key, value, node.value)


def _yaml_problem(error: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """The line and words for a YAML error: the author's mistake (`mailx.yamlerrors`)."""
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        return line, f"YAML syntax error: {error.reason}"
    return yamlerrors.explain(error, text)


# ---------------------------------------------------------------------------
# Value parsers: a node in, a value out, or _Invalid.

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)\Z")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Upper bounds, so a number of 400 digits is a clear problem and not an
# OverflowError (or a timer no reactor can schedule).  A terabyte is far
# beyond any mail message; ten years is beyond any timeout or queue life.
MAX_SIZE = 1024**4  # 1 TiB
MAX_DURATION = 10 * 365 * 86400.0  # 10 years, in seconds
MAX_COUNT = 2**31 - 1  # what a C int (listen backlogs, ports, counters) holds


def _exact(digits: str) -> Fraction:
    """``12.5`` as an exact number; over 40 digits, a number larger than any bound
    (Python refuses to convert integers of more than 4300 digits at all)."""
    if len(digits) > 40:
        return Fraction(10**40)
    return Fraction(digits)


_T = TypeVar("_T")


def _partial(part: _T | None) -> _T:
    """A part that failed to build (None, its problem recorded), let into a Config
    all the same so that the rest is still checked: with problems recorded,
    `validate` raises and that Config is never handed out."""
    return cast(_T, part)


def _is_number(node: _Node) -> bool:
    return isinstance(node.value, int | float) and not isinstance(node.value, bool)


def parse_size(value: str | int | float) -> int:
    """Bytes from ``25MiB``, ``10MB``, ``512`` (units: see the module docstring); ValueError if not a size."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} is not a size")
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        size: int | float | Fraction = value
    else:
        match = _SIZE.match(value.strip()) if isinstance(value, str) else None
        if match is None or match[2] not in _SIZE_UNITS:
            shown = f"'{value}'" if isinstance(value, str) else repr(value)
            raise ValueError(
                f"{shown} is not a size: use bytes, or a number with B, KiB, MiB, GiB"
                " (or KB, MB, GB for powers of 1000)"
            )
        # Exact arithmetic: float() of 400 digits is inf, and int(inf) raises.
        size = _exact(match[1]) * _SIZE_UNITS[match[2]]
    if size > MAX_SIZE:
        raise ValueError("a size is at most 1TiB")
    return int(size)


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``5m``, ``1h30m``, ``2.5`` (plain numbers are seconds); ValueError if not a duration."""
    seconds: Fraction | int | float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} is not a duration")
        if value < 0:
            raise ValueError(f"a duration cannot be negative ({value})")
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        # Exact arithmetic, as in parse_size: no float() of a 400-digit number.
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = _exact(text)
        elif text and re.fullmatch(rf"(?:{_DURATION.pattern}\s*)+", text):
            seconds = sum(_exact(n) * _DURATION_UNITS[unit] for n, unit in _DURATION.findall(text))
    if seconds is not None:
        if seconds > MAX_DURATION:
            raise ValueError("a duration is at most 10 years (3650d)")
        return float(seconds)
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    raise ValueError(
        f"{shown} is not a duration: use seconds, or s, m, h, d (e.g. 30s, 5m, 1h30m, 5d)"
    )


# SRS secrets: RFC 2104 section 3 asks for a key at least as long as the
# hash output (HMAC-SHA1: 20 bytes); 32 characters of random text carry more.
SECRET_MIN_LENGTH = 32
_SECRET_MIN_BITS = 88  # estimated from character frequencies; a random hex 32 has ~112
# Values that appear as examples (this repository, its tests, common habit):
# refused whatever their length.
_SAMPLE_SECRETS = frozenset(
    {
        "change-me", "changeme", "change_me", "changethis", "secret", "s3cret", "example",
        "password", "test-secret", "fuzz-secret", "bench-secret", "rotated-secret",
        "srs-secret", "srs_secret", "mysecret", "your-secret-here", "null", "none",
    }
)  # fmt: skip


def new_secret() -> str:
    """A fresh SRS secret to paste into the configuration (256 random bits)."""
    import secrets

    return secrets.token_urlsafe(32)


def secret_weakness(secret: str) -> str | None:
    """Why ``secret`` is guessable (a sample value, short, repetitive), or None."""
    import math
    from collections import Counter

    if secret.strip().lower() in _SAMPLE_SECRETS:
        return f"'{secret}' is a sample value"
    if len(secret) < SECRET_MIN_LENGTH:
        return f"too short ({len(secret)} characters, at least {SECRET_MIN_LENGTH})"
    period = next((p for p in range(1, len(secret) // 2 + 1) if secret[p:] == secret[:-p]), None)
    if period is not None:
        return f"'{secret[:period]}' repeated is not random"
    counts = Counter(secret)
    bits = -sum(n * math.log2(n / len(secret)) for n in counts.values())
    if bits < _SECRET_MIN_BITS:
        return f"too repetitive to be random ({len(counts)} different characters)"
    return None


class _Loader:
    """One load: the file's name and directory, and the problems found so far."""

    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        # Alias targets that forward outside (SPEC section 8): they need outbound.srs_secret.
        self.forwards: list[_Node] = []
        # Where alias keys and targets were written: (domain, alias[, index]) -> node.
        self.alias_nodes: dict[tuple, _Node] = {}

    # -- recording --------------------------------------------------------

    def problem(self, line: int | None, key: str | None, message: str) -> None:
        self.problems.append(Problem(self.file, line, key, message))

    def at(self, node: _Node, message: str) -> None:
        self.problem(node.line, node.key, message)

    def value(self, node: _Node, parse: Callable[..., Any], *args: Any) -> Any:
        """parse(node, *args), or None with the problem recorded."""
        try:
            return parse(node, *args)
        except _Invalid as e:
            self.at(node, str(e))
            return None

    # -- structure --------------------------------------------------------

    def block(self, node: _Node, defaults: Mapping[str, Any]) -> dict[str, _Node] | None:
        """A mapping's entries, defaults filled in, unknown keys reported."""
        if node.null:
            given: dict[str, _Node] = {}
        elif node.kind != "map":
            self.at(node, f"expected a mapping, got {node.describe()}")
            return None
        else:
            given = node.value
        for name, child in given.items():
            if name not in defaults:
                import difflib  # only a wrong configuration needs a suggestion

                close = difflib.get_close_matches(name, list(defaults), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.problem(child.line, child.key, f"unknown key{hint}")
        result = {}
        for name, default in defaults.items():
            if name in given:
                result[name] = given[name]
            elif default is REQUIRED:
                self.problem(node.line, _child_key(node.key, name), "required")
            else:
                result[name] = _default_node(default, _child_key(node.key, name), node.line)
        return result

    def items(
        self, node: _Node, parse: Callable[..., Any], *args: Any, single: bool = False
    ) -> tuple:
        """A list's parsed items, the bad ones reported and dropped.

        single: a lone scalar counts as a one-item list.
        """
        if node.null:
            return ()
        if node.kind == "scalar" and single:
            nodes = [node]
        elif node.kind != "seq":
            self.at(node, f"expected a list, got {node.describe()}")
            return ()
        else:
            nodes = node.value
        parsed = (self.value(item, parse, *args) for item in nodes)
        return tuple(v for v in parsed if v is not None)

    # -- scalars ----------------------------------------------------------

    @staticmethod
    def text(node: _Node) -> str:
        if node.kind != "scalar" or node.null:
            raise _Invalid(f"expected a string, got {node.describe()}")
        if not node.raw:
            raise _Invalid("must not be empty")
        return node.raw

    @staticmethod
    def boolean(node: _Node) -> bool:
        if not isinstance(node.value, bool):
            raise _Invalid(f"expected true or false, got {node.describe()}")
        return node.value

    @staticmethod
    def count(node: _Node, minimum: int = 0, maximum: int | None = None) -> int:
        if isinstance(node.value, str) and node.value.isdigit():  # over 4300 digits
            raise _Invalid(f"must be at most {maximum or MAX_COUNT}")
        if not isinstance(node.value, int) or isinstance(node.value, bool):
            raise _Invalid(f"expected a whole number, got {node.describe()}")
        if node.value < minimum or (maximum is not None and node.value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise _Invalid(f"must be at least {minimum}{upper}, got {_shown(node.raw)}")
        if node.value > MAX_COUNT:
            raise _Invalid(f"must be at most {MAX_COUNT}, got {_shown(node.raw)}")
        return node.value

    def size(self, node: _Node) -> int:
        if node.kind != "scalar" or node.null:
            raise _Invalid(f"expected a size such as 25MiB, got {node.describe()}")
        assert node.raw is not None  # a scalar that is not null keeps its text
        try:
            size = parse_size(node.value if _is_number(node) else node.raw)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if size < 1:
            raise _Invalid("must be at least 1 byte")
        return size

    def duration(self, node: _Node, optional: bool = False, zero: bool = False) -> float | None:
        """Seconds; null only if optional, 0 only if zero (meaning off)."""
        if optional and node.null:
            return None
        if node.kind != "scalar" or node.null:
            raise _Invalid(f"expected a duration such as 5m, got {node.describe()}")
        assert node.raw is not None  # a scalar that is not null keeps its text
        try:
            seconds = parse_duration(node.value if _is_number(node) else node.raw)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if seconds <= 0 and not (zero and seconds == 0):
            raise _Invalid("must be longer than zero")
        return seconds

    def choice(self, node: _Node, choices: tuple[str, ...]) -> str:
        if node.kind != "scalar" or node.raw not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {node.describe()}")
        return node.raw

    def domain(self, node: _Node) -> str:
        try:
            return normalize_domain(self.text(node))
        except AddressError as e:
            raise _Invalid(str(e)) from None

    def path(self, node: _Node) -> Path:
        """Relative paths are relative to the configuration file's directory (SPEC section 3)."""
        return Path(os.path.normpath(self.base / os.path.expanduser(self.text(node))))

    def readable_file(self, node: _Node) -> Path:
        path = self.path(node)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise _Invalid(f"cannot read {path}: {e.strerror}") from None
        return path

    def private_key(self, node: _Node, must_exist: bool) -> Path:
        """A private key's path (DKIM): readable if ``must_exist``, and not open to
        every user of the machine (whoever reads a DKIM key signs as our domain).

        The rule of the TLS key check: group access is allowed, as with
        Debian's ``ssl-cert`` group; any permission for others is refused.
        """
        path = self.readable_file(node) if must_exist else self.path(node)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            return path  # a DKIM key that `mailxctl dkim keygen` is about to write
        except OSError as e:
            raise _Invalid(f"cannot read {path}: {e.strerror}") from None
        if mode & 0o007:
            raise _Invalid(
                f"every user of this machine can use {path} (mode {mode:04o}): chmod 600 {path}"
            )
        return path

    def ip(self, node: _Node) -> str:
        text = self.text(node)
        try:
            return ipaddress.ip_address(text).compressed
        except ValueError:
            raise _Invalid(f"'{text}' is not an IP address") from None

    def network(self, node: _Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """A CIDR network (``10.0.0.0/8``, ``fd00::/8``; a bare address is one host)."""
        text = self.text(node)
        try:
            return ipaddress.ip_network(text)
        except ValueError as e:
            raise _Invalid(f"'{text}' is not a network such as 10.0.0.0/8 or fd00::/8: {e}") from None

    def nameserver(self, node: _Node) -> tuple[str, int]:
        """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; port 53 by default."""
        text = self.text(node)
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if bracketed:
            host, port = bracketed[1], bracketed[2]
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid(
                f"'{text}': a nameserver must be an IP address, optionally with :port"
            ) from None
        if bracketed and address.version != 6:
            raise _Invalid(f"'{text}': brackets are for IPv6 addresses")
        if port is None:
            return address.compressed, 53
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _Invalid(f"'{text}': bad port '{port}'")
        return address.compressed, int(port)

    def server_endpoint(self, node: _Node) -> str:
        """A Twisted server endpoint string, checked by building (not listening on) it."""
        from twisted.internet.endpoints import serverFromString

        text = self.text(node)
        try:
            serverFromString(_NO_REACTOR, text)
        except Exception as e:  # the parsers raise ValueError, TypeError, OSError...
            raise _Invalid(f"'{text}' is not a Twisted endpoint: {e}") from None
        port = _endpoint_port(text)
        if port is not None and not 0 <= port <= 65535:
            raise _Invalid(f"'{text}': port {port} out of range")
        return text

    def client_endpoint(self, node: _Node) -> str | None:
        from twisted.internet.endpoints import clientFromString

        if node.null:
            return None
        text = self.text(node)
        try:
            clientFromString(_NO_REACTOR, text)
        except Exception as e:
            raise _Invalid(
                f"'{text}' is not a Twisted client endpoint (e.g. tcp:relay.example.net:587): {e}"
            ) from None
        return text

    def local_name(self, node: _Node, what: str) -> str:
        """A mailbox or alias name: an ASCII dot-atom, up to 64 octets (RFC 5321 4.5.3.1.1)."""
        name = self.text(node)
        if not name.isascii() or not is_dot_atom(name):
            raise _Invalid(
                f"'{name}' is not a valid {what} name (letters, digits, . and !#$%&'*+-/=?^_`{{|}}~)"
            )
        if len(name) > 64:
            raise _Invalid(f"'{name}' is longer than 64 characters")
        return name.lower()

    # -- sections ---------------------------------------------------------

    def hostname(self, node: _Node) -> str | None:
        """Our name: a dotted FQDN, since MX records, HELO and PTR checks need one.

        The system's name is only a default: on many machines it is
        ``localhost`` or a bare ``myhost``, which would put ``MX 10 localhost.``
        in ``mailxctl dns`` and a name no one can resolve in our banner.
        """
        if node.null:
            fqdn = socket.getfqdn()
            try:
                name = normalize_domain(fqdn)
            except AddressError:
                self.at(node, f"the system's host name '{fqdn}' is not a domain name: set hostname")
                return None
            if not is_fqdn(name):
                self.at(
                    node,
                    f"the system's host name '{fqdn}' is not a fully qualified domain name: "
                    f"set hostname {_HOSTNAME_HINT}",
                )
                return None
            return name
        name = self.value(node, self.domain)
        if name is not None and not is_fqdn(name):
            self.at(
                node,
                f"'{node.raw}' is not a fully qualified domain name: set it {_HOSTNAME_HINT}",
            )
            return None
        return name

    def imap_server(self, node: _Node) -> tuple[str, int] | None:
        """``host`` or ``host:port``: the IMAPS server (RFC 8314: port 993, TLS first)."""
        if node.null:
            return None
        text = self.text(node).strip()
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "993")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _Invalid(
                f"'{text}': bad port '{port}' (host or host:port, e.g. imap.example.test)"
            )
        try:
            name = normalize_domain(host)
        except AddressError as e:
            raise _Invalid(f"'{text}': {e}") from None
        if not is_fqdn(name):
            raise _Invalid(f"'{text}': the IMAP server needs a fully qualified name")
        return name, int(port)

    def report_address(self, node: _Node) -> str | None:
        if node.null:
            return None
        text = self.text(node)
        try:
            return str(parse_address(text))
        except AddressError as e:
            raise _Invalid(f"bad address '{text}': {e}") from None

    def limits(self, node: _Node) -> Limits | None:
        fields = self.block(node, DEFAULTS["limits"])
        if fields is None:
            return None
        values = {
            "message_size": self.value(fields["message_size"], self.size),
            "recipients": self.value(fields["recipients"], self.count, 1),
            "connections": self.value(fields["connections"], self.count, 1),
            "connections_per_ip": self.value(fields["connections_per_ip"], self.count, 1),
            "connection_rate_per_ip": self.value(fields["connection_rate_per_ip"], self.count, 0),
            "idle_timeout": self.value(fields["idle_timeout"], self.duration),
            "session_timeout": self.value(fields["session_timeout"], self.duration),
            "error_limit": self.value(fields["error_limit"], self.count, 1),
            "greeting_delay": self.value(fields["greeting_delay"], self.duration, False, True),
            "junk_commands": self.value(fields["junk_commands"], self.count, 1),
            "ipv6_prefix_length": self.value(fields["ipv6_prefix_length"], self.count, 1, 128),
            "auth_failures": self.value(fields["auth_failures"], self.count, 1),
            "send_per_hour": self.value(fields["send_per_hour"], self.count, 1),
        }
        return Limits(**values)

    def tls(self, node: _Node) -> TLSConfig | None:
        if node.null:
            return None
        fields = self.block(node, BLOCK_DEFAULTS["tls"])
        if fields is None:
            return None
        certificate = (
            self.value(fields["certificate"], self.readable_file)
            if "certificate" in fields
            else None
        )
        key = self.value(fields["key"], self.readable_file) if "key" in fields else None
        return TLSConfig(_partial(certificate), _partial(key))

    def tls_pair(self, node: _Node, tls: TLSConfig | None, hostname: str | None) -> None:
        """The certificate and key must be a pair (`mailx.tlsfiles`): said here, in words,
        so that `mailxctl check`, start-up and reload refuse it alike."""
        if tls is None or tls.certificate is None or tls.key is None:
            return
        if any(p.key and p.key.startswith("tls.") for p in self.problems):
            return  # the block's own problems first
        from mailx import tlsfiles

        try:
            findings = tlsfiles.check_pair(tls.certificate, tls.key, hostname)
        except OSError as e:  # checked readable a moment ago; raced
            self.at(node, f"cannot read the certificate or key: {e.strerror}")
            return
        for finding in findings:
            where = node.value.get(finding.key.split(".")[1], node)
            problem = Problem(self.file, where.line, finding.key, finding.message)
            (self.problems if finding.level == "error" else self.warnings).append(problem)

    def paths(self, node: _Node) -> Paths | None:
        fields = self.block(node, DEFAULTS["paths"])
        if fields is None:
            return None
        return Paths(self.value(fields["mail"], self.path), self.value(fields["spool"], self.path))

    def dns(self, node: _Node) -> DNSConfig | None:
        fields = self.block(node, DEFAULTS["dns"])
        if fields is None:
            return None
        return DNSConfig(
            nameservers=self.items(fields["nameservers"], self.nameserver),
            timeout=self.value(fields["timeout"], self.duration),
            watch=self.value(fields["watch"], self.duration, True),
        )

    def authentication(self, node: _Node) -> AuthenticationConfig | None:
        fields = self.block(node, DEFAULTS["authentication"])
        if fields is None:
            return None
        return AuthenticationConfig(
            spf=self.value(fields["spf"], self.boolean),
            dkim=self.value(fields["dkim"], self.boolean),
            dmarc=self.value(fields["dmarc"], self.choice, DMARC_MODES),
            timeout=self.value(fields["timeout"], self.duration),
            concurrency_per_ip=self.value(fields["concurrency_per_ip"], self.count, 1),
        )

    def dnsbl_zone(self, node: _Node) -> DNSBLZone | None:
        if node.kind == "scalar":  # a bare zone name: the default action
            return DNSBLZone(self.domain(node), BLOCK_DEFAULTS["dnsbl"]["action"])
        fields = self.block(node, BLOCK_DEFAULTS["dnsbl"])
        if fields is None or "zone" not in fields:
            return None
        zone = self.value(fields["zone"], self.domain)
        action = self.value(fields["action"], self.choice, DNSBL_ACTIONS)
        return None if zone is None or action is None else DNSBLZone(zone, action)

    def checks(self, node: _Node) -> ChecksConfig | None:
        fields = self.block(node, DEFAULTS["checks"])
        if fields is None:
            return None
        return ChecksConfig(
            dnsbl=self.items(fields["dnsbl"], self.dnsbl_zone),
            reverse_dns=self.value(fields["reverse_dns"], self.boolean),
        )

    def srs_secret(self, node: _Node) -> tuple[str, ...]:
        return self.items(node, self.strong_secret, single=True)

    def strong_secret(self, node: _Node) -> str:
        """An SRS secret no one can guess: whoever knows it mints addresses we relay for."""
        secret = self.text(node)
        weakness = secret_weakness(secret)
        if weakness:
            raise _Invalid(
                f"{weakness}: anyone who guesses it can relay through us (SRS);"
                f" use 32+ random characters, e.g. {new_secret()}"
            )
        return secret

    def outbound(self, node: _Node) -> OutboundConfig | None:
        fields = self.block(node, DEFAULTS["outbound"])
        if fields is None:
            return None
        retry_node = fields["retry"]
        retry = self.items(retry_node, self.duration)
        if retry_node.kind == "seq" and not retry_node.value:
            self.at(retry_node, "needs at least one interval")
        smarthost = self.value(fields["smarthost"], self.client_endpoint)
        auth = self.smarthost_auth(fields["smarthost_auth"])
        if auth is not None and smarthost is None:
            self.at(fields["smarthost_auth"], "credentials are only used with outbound.smarthost")
        return OutboundConfig(
            srs_secrets=self.srs_secret(fields["srs_secret"]),
            smarthost=smarthost,
            port=self.value(fields["port"], self.count, 1, 65535),
            retry=retry,
            queue_lifetime=self.value(fields["queue_lifetime"], self.duration),
            smarthost_auth=auth,
            delay_warning=self.value(fields["delay_warning"], self.duration, True),
            connections=self.value(fields["connections"], self.count, 1),
            connections_per_domain=self.value(fields["connections_per_domain"], self.count, 1),
            allowed_networks=self.items(fields["allowed_networks"], self.network),
            mta_sts=self.value(fields["mta_sts"], self.boolean),
        )

    def accounts(self, node: _Node, domains: Mapping[str, DomainConfig]) -> AccountsConfig | None:
        """SPEC 11: ``passwords`` or ``dovecot`` (not both); ``send_as`` keys are
        mailboxes, values addresses in our domains."""
        fields = self.block(node, DEFAULTS["accounts"])
        if fields is None:
            return None
        passwords = None if fields["passwords"].null else self.value(fields["passwords"], self.path)
        dovecot = self.value(fields["dovecot"], self.client_endpoint)
        if passwords is not None and dovecot is not None:
            self.at(fields["dovecot"], "accounts.passwords and accounts.dovecot exclude each other")
        send_as: dict[str, tuple[str, ...]] = {}
        given = fields["send_as"]
        if given.kind == "map":
            for key, child in given.value.items():
                key_node = _Node("scalar", child.line, child.key, key, key)
                account = self.value(key_node, self.our_address, domains, True)
                extra = self.items(child, self.our_address, domains, False, single=True)
                if account is not None:
                    send_as[account] = tuple(dict.fromkeys(send_as.get(account, ()) + extra))
        elif not given.null:
            self.at(given, f"expected a mapping of accounts to addresses, got {given.describe()}")
        return AccountsConfig(passwords, dovecot, MappingProxyType(send_as))

    def our_address(self, node: _Node, domains: Mapping[str, DomainConfig], mailbox: bool) -> str:
        """An address in one of our domains; with ``mailbox``, a mailbox's own address."""
        text = self.text(node)
        try:
            address = parse_address(text)
        except AddressError as e:
            raise _Invalid(f"bad address '{text}': {e}") from None
        domain = domains.get(address.domain)
        if domain is None:
            raise _Invalid(f"{address.domain} is not one of our domains")
        if mailbox and (domain.alias_of is not None or address.local not in domain.mailboxes):
            where = domain.alias_of or address.domain
            raise _Invalid(f"'{text}' is not a mailbox of {where}: an account is a mailbox's address")
        return str(address)

    def smarthost_auth(self, node: _Node) -> SmarthostAuth | None:
        if node.null:
            return None
        fields = self.block(node, BLOCK_DEFAULTS["smarthost_auth"])
        if fields is None or "username" not in fields or "password" not in fields:
            return None
        username = self.value(fields["username"], self.text)
        password = self.value(fields["password"], self.text)
        return None if username is None or password is None else SmarthostAuth(username, password)

    # -- domains ----------------------------------------------------------

    def domains(self, node: _Node) -> dict[str, DomainConfig]:
        """Each domain on its own, then what spans domains: alias_of, alias targets, postmaster."""
        if node.null or (node.kind == "map" and not node.value):
            self.at(node, "no domains configured")
            return {}
        if node.kind != "map":
            self.at(node, f"expected a mapping of domain names, got {node.describe()}")
            return {}
        parsed: dict[str, DomainConfig] = {}
        nodes: dict[str, _Node] = {}
        for key, child in node.value.items():
            try:
                name = normalize_domain(key)
            except AddressError as e:
                self.at(child, f"not a valid domain name: {e}")
                continue
            if name in nodes:
                first = nodes[name]
                self.at(
                    child, f"same domain as '{first.key.split('.', 1)[1]}' on line {first.line}"
                )
                continue
            nodes[name] = child
            domain = self.domain_block(name, child)
            if domain is not None:
                parsed[name] = domain
        return self.link_domains(parsed, nodes)

    def domain_block(self, name: str, node: _Node) -> DomainConfig | None:
        fields = self.block(node, BLOCK_DEFAULTS["domain"])
        if fields is None:
            return None
        alias_of = None if fields["alias_of"].null else self.value(fields["alias_of"], self.domain)
        if not fields["alias_of"].null:
            for key in ("mailboxes", "aliases", "subaddress_delimiter", "sieve_before", "delivery"):
                if node.kind == "map" and key in node.value:
                    self.at(
                        node.value[key],
                        f"{name} is an alias of another domain (alias_of) and has no {key} of its own",
                    )
        mailboxes = self.mailboxes(fields["mailboxes"])
        aliases = self.aliases(name, fields["aliases"], mailboxes)
        delimiter = self.value(fields["subaddress_delimiter"], self.delimiter)
        dkim = self.dkim(fields["dkim"])
        sieve_before = None
        if not fields["sieve_before"].null:
            sieve_before = self.value(fields["sieve_before"], self.sieve_script)
        lmtp = self.delivery(fields["delivery"])
        if lmtp is not None and not fields["sieve_before"].null:
            self.at(
                fields["sieve_before"],
                f"{name} is delivered over LMTP: its filters are the LMTP server's"
                " (Dovecot's sieve_before), mailx runs none for it (SPEC 14)",
            )
        return DomainConfig(
            name=name,
            mailboxes=frozenset(mailboxes),
            aliases=MappingProxyType(aliases),
            subaddress_delimiter=delimiter or None,
            dkim=dkim,
            alias_of=alias_of,
            sieve_before=sieve_before,
            lmtp=lmtp,
        )

    def sieve_script(self, node: _Node) -> Path:
        """A Sieve script that compiles: refused here, not on the first message."""
        from mailx.filters import SieveError, compile_script

        path = self.readable_file(node)
        try:
            compile_script(path.read_bytes())
        except SieveError as e:
            raise _Invalid(f"{path}:{e.line}: {e.message}") from None
        except OSError as e:
            raise _Invalid(f"cannot read {path}: {e.strerror}") from None
        return path

    def delivery(self, node: _Node) -> str | None:
        """``{lmtp: ENDPOINT}`` (SPEC 14), or None for our Maildirs."""
        if node.null:
            return None
        fields = self.block(node, BLOCK_DEFAULTS["delivery"])
        if fields is None or "lmtp" not in fields:
            return None
        return self.value(fields["lmtp"], self.lmtp_endpoint)

    def lmtp_endpoint(self, node: _Node) -> str:
        """A ``unix:`` or ``tcp:`` client endpoint string, checked by building it."""
        if node.kind != "scalar" or node.null:
            raise _Invalid(f"expected an endpoint such as unix:/run/dovecot/lmtp, got {node.describe()}")
        text = self.text(node)
        problem = lmtp_endpoint_problem(text)
        if problem is not None:
            raise _Invalid(problem)
        return text

    def mailboxes(self, node: _Node) -> dict[str, _Node]:
        found: dict[str, _Node] = {}
        for item_node in self.items(node, lambda n: n):
            name = self.value(item_node, self.local_name, "mailbox")
            if name is None:
                continue
            if name == CATCH_ALL:
                self.at(item_node, "'*' is the catch-all alias key, not a mailbox name")
            elif "/" in name:
                self.at(
                    item_node, f"'{name}' names a directory: '/' is not allowed in a mailbox name"
                )
            elif name in found:
                self.at(item_node, f"duplicate mailbox '{name}' (also on line {found[name].line})")
            else:
                found[name] = item_node
        return found

    def aliases(
        self, domain: str, node: _Node, mailboxes: Mapping[str, _Node]
    ) -> dict[str, tuple[str, ...]]:
        if node.null:
            return {}
        if node.kind != "map":
            self.at(node, f"expected a mapping of alias names to targets, got {node.describe()}")
            return {}
        aliases: dict[str, tuple[str, ...]] = {}
        seen: dict[str, _Node] = {}
        for key, child in node.value.items():
            if key == CATCH_ALL:
                name = CATCH_ALL
            else:
                name = self.value(
                    _Node("scalar", child.line, child.key, key, key), self.local_name, "alias"
                )
                if name is None:
                    continue
            if name in seen:
                self.at(child, f"duplicate alias '{name}' (also on line {seen[name].line})")
                continue
            seen[name] = child
            if name in mailboxes:
                self.at(child, f"'{name}' is both a mailbox and an alias")
                continue
            if child.kind == "scalar" and not child.null:
                target_nodes = [child]
            elif child.kind == "seq":
                target_nodes = child.value
            else:
                target_nodes = []
            if not target_nodes:
                self.at(child, f"an alias needs at least one target, got {child.describe()}")
                continue
            targets: list[str] = []
            for item in target_nodes:
                target = self.value(item, self.alias_target)
                if target is not None:
                    self.alias_nodes[(domain, name, len(targets))] = item
                    targets.append(target)
            self.alias_nodes[(domain, name)] = child
            if targets:
                aliases[name] = tuple(targets)
        return aliases

    def alias_target(self, node: _Node) -> str:
        """``name`` (this domain), ``name@domain`` (ours, or outside: forwarding)."""
        if node.kind != "scalar":
            raise _Invalid(f"an alias target must be a name or an address, got {node.describe()}")
        text = self.text(node)
        if "@" in text:
            try:
                return str(parse_address(text))
            except AddressError as e:
                raise _Invalid(f"bad address '{text}': {e}") from None
        if text == CATCH_ALL:
            raise _Invalid("'*' is the catch-all key, not a target")
        return self.local_name(node, "mailbox or alias")

    @staticmethod
    def delimiter(node: _Node) -> str | None:
        if node.null:
            return None
        if node.kind != "scalar":
            raise _Invalid(f"expected a string such as '+', got {node.describe()}")
        text = node.raw or ""
        if any(c not in _DELIMITERS for c in text):
            raise _Invalid(
                f"'{text}': delimiters must be punctuation allowed in a local part, such as + or -"
            )
        return text

    def dkim(self, node: _Node) -> DKIMConfig | None:
        if node.null:
            return None
        fields = self.block(node, BLOCK_DEFAULTS["dkim"])
        if fields is None or "selector" not in fields or "key" not in fields:
            return None
        # RFC 6376 3.1: selector = sub-domain *( "." sub-domain )
        selector = self.value(fields["selector"], self.domain)
        key = self.value(fields["key"], self.private_key, False)
        return None if selector is None or key is None else DKIMConfig(selector, key)

    def link_domains(
        self, parsed: dict[str, DomainConfig], nodes: dict[str, _Node]
    ) -> dict[str, DomainConfig]:
        """Resolve alias_of, then audit aliases and postmasters across domains."""
        usable = dict(parsed)
        for name, domain in parsed.items():
            if domain.alias_of is None:
                continue
            where = nodes[name].value["alias_of"]
            target = parsed.get(domain.alias_of)
            if domain.alias_of == name:
                self.at(where, "a domain cannot be an alias of itself")
            elif domain.alias_of not in nodes:
                import difflib  # only a wrong configuration needs a suggestion

                close = difflib.get_close_matches(domain.alias_of, list(nodes), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.at(where, f"'{domain.alias_of}' is not a configured domain{hint}")
            elif target is None:
                pass  # the target's own problems are reported already
            elif target.alias_of is not None:
                self.at(
                    where,
                    f"{domain.alias_of} is itself an alias of {target.alias_of}: use alias_of: {target.alias_of}",
                )
            else:
                usable[name] = replace(domain, subaddress_delimiter=target.subaddress_delimiter)
                continue
            del usable[name]
        for finding in audit_domains(usable):
            self.report_finding(finding, nodes)
        return usable

    def report_finding(self, finding: Finding, nodes: dict[str, _Node]) -> None:
        """Locate what `audit_domains` found; outside targets are kept for `require_srs_secret`."""
        if finding.kind == "postmaster":
            self.at(nodes[finding.domain], finding.message)
            return
        node = self.alias_nodes[(finding.domain, finding.alias, finding.index)]
        if finding.kind != "forward":
            self.at(node, finding.message)
        else:
            self.forwards.append(node)

    def require_srs_secret(self, outbound: OutboundConfig | None) -> None:
        """Forwarding rewrites the envelope sender with SRS (SPEC section 8), which needs a secret."""
        if not self.forwards or outbound is None:
            return
        if not outbound.srs_secrets:
            first = self.forwards[0]
            self.problem(
                first.line,
                "outbound.srs_secret",
                f"required: {first.key} forwards to an outside address (SRS, SPEC section 8)",
            )


def _endpoint_port(description: str) -> int | None:
    """The port a ``tcp:``, ``tcp6:`` or ``ssl:`` description (``haproxy:`` or not) names.

    Twisted keeps it in the endpoint's private ``_port`` and parses
    descriptions with a private function (``endpoints._parse``), so this
    reads the small grammar itself: fields split at colons, a backslash
    escapes the next character, ``key=value`` or positional.
    """
    fields: list[str] = []
    current: list[str] = []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current.append(next(characters, ""))
        elif character == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(character)
    fields.append("".join(current))
    while fields and fields[0] == "haproxy":
        fields = fields[1:]
    if not fields or fields[0] not in ("tcp", "tcp6", "ssl"):
        return None
    arguments = fields[1:]
    named = dict(a.split("=", 1) for a in arguments if "=" in a)
    positional = [a for a in arguments if "=" not in a]
    port = named.get("port", positional[0] if positional else None)
    try:
        return int(port) if port is not None else None
    except ValueError:
        return None


class _NoReactor:
    """Endpoint strings are parsed with this, so checking one never touches the network."""


_NO_REACTOR = _NoReactor()

# RFC 2033: LMTP is for a client and server of one administration, a local
# (unix:) or nearby (tcp:) mailbox store; TLS and the rest are not offered.
LMTP_ENDPOINT_KINDS = ("unix", "tcp")


def lmtp_endpoint_problem(text: str) -> str | None:
    """Why ``text`` is no LMTP endpoint (``unix:PATH``, ``tcp:HOST:PORT``), None if it is one."""
    from twisted.internet.endpoints import clientFromString

    kind = text.partition(":")[0]
    if kind not in LMTP_ENDPOINT_KINDS:
        return f"'{text}': an LMTP endpoint is unix:/run/dovecot/lmtp or tcp:HOST:PORT"
    try:
        clientFromString(_NO_REACTOR, text)
    except Exception as e:  # the parsers raise ValueError, TypeError, KeyError...
        return f"'{text}' is not a Twisted client endpoint: {e}"
    return None


# ---------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the configuration at ``path``; `ConfigError` if unusable."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # not all of a runaway file
    except OSError as e:
        raise ConfigError(
            [Problem(file, None, None, f"cannot read configuration: {e.strerror}")]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([Problem(file, None, None, _TOO_BIG)])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([Problem(file, line, None, "not valid UTF-8")]) from None
    return load_config_text(text, file)


def load_config_text(text: str, path: str | os.PathLike[str]) -> Config:
    """Validate configuration ``text`` as if read from ``path`` (for messages and relative paths)."""
    file = os.fspath(path)
    source = Path(os.path.abspath(file))
    loader = _Loader(file, source.parent)
    try:
        root = _parse_yaml(text, loader)
    except yaml.YAMLError as e:
        line, message = _yaml_problem(e, text)
        raise ConfigError([Problem(file, line, None, message)]) from None
    except (_Invalid, _TooLarge) as e:
        raise ConfigError([Problem(file, None, None, str(e))]) from None
    if root is None:
        raise ConfigError([Problem(file, 1, "domains", "no domains configured")])
    config = _build(loader, root, source)
    if loader.problems:
        # Top to bottom, as a person reads the file.
        raise ConfigError(sorted(loader.problems, key=lambda p: p.line or 0))
    assert config is not None  # None only after a problem with the top level
    return config


# A configuration file is hand-written: mailx.yaml is 7 KB, and a thousand
# domains with their aliases fit in a few hundred.  The bounds stop a "billion
# laughs" file (a few hundred bytes of YAML aliases to aliases that expand to
# 10^9 nodes: 41 s and 1.4 GB before) and a deeply nested one (PyYAML's
# composer recurses) with one clear line, before any expansion.  Aliases
# themselves stay allowed: a shared alias list is a fair use.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 200_000  # after alias expansion; a 1 MiB file without aliases has fewer
MAX_CONFIG_DEPTH = 50  # mailx.yaml nests 4 deep


_TOO_BIG = f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a hand-written configuration"


class _TooLarge(Exception):
    """The document is beyond the bounds above; the message says which."""


def _expanded_size(document: yaml.Node) -> int:
    """Nodes the document has once every alias is expanded, counted without
    expanding (each distinct node once, memoized): linear in the file."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise _TooLarge(f"nested more than {MAX_CONFIG_DEPTH} levels deep")
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in active:
            raise _Invalid("a YAML alias refers to itself")
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item, depth + 1) for item in node.value)
        else:
            total = 1
        active.discard(id(node))
        if total > MAX_CONFIG_NODES:
            raise _TooLarge(
                f"expands to more than {MAX_CONFIG_NODES} values (YAML aliases to aliases?)"
            )
        sizes[id(node)] = total
        return total

    return size(document, 0)


def _parse_yaml(text: str, loader: _Loader) -> _Node | None:
    """The document as located nodes; None when it is empty."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise _TooLarge(_TOO_BIG)
    yaml_loader = yaml.SafeLoader(text)  # raises ReaderError on control characters
    try:
        try:
            document = yaml_loader.get_single_node()
        except RecursionError:
            raise _TooLarge(f"nested more than {MAX_CONFIG_DEPTH} levels deep") from None
        if document is None:
            return None
        _expanded_size(document)
        return _Tree(yaml_loader, loader.problem).build(document, "", 1)
    finally:
        yaml_loader.dispose()


# A year of trace files at most: the record is for "where did that message go?".
MAX_TRACE_DAYS = 366


def _logging(loader: _Loader, node: _Node) -> tuple[str, TraceConfig]:
    """logging.format and logging.trace."""
    defaults = DEFAULTS["logging"]
    trace = TraceConfig(None, defaults["trace"]["keep_days"])
    fields = loader.block(node, defaults)
    if fields is None:
        return defaults["format"], trace
    log_format = loader.value(fields["format"], loader.choice, LOG_FORMATS) or "text"
    given = loader.block(fields["trace"], defaults["trace"])
    if given is not None:
        path = None if given["path"].null else loader.value(given["path"], loader.path)
        keep = loader.value(given["keep_days"], loader.count, 0, MAX_TRACE_DAYS)
        trace = TraceConfig(path, trace.keep_days if keep is None else keep)
    return log_format, trace


def _submission_listeners(loader: _Loader, listen: dict[str, _Node], config: Config) -> Config:
    """SPEC 11: submission listeners need a certificate (RFC 8314 3: no
    password in cleartext) and somewhere to check passwords."""
    found = {}
    for kind in ("submission", "submissions"):
        node = listen[kind]
        found[kind] = loader.items(node, loader.server_endpoint, single=True)
        if not found[kind]:
            continue
        if config.tls is None:
            loader.at(node, "needs tls: (a certificate and key): passwords never travel in cleartext")
        if config.accounts.passwords is None and config.accounts.dovecot is None:
            loader.at(node, "needs accounts.passwords or accounts.dovecot to check logins against")
    config = replace(config, submission=found["submission"], submissions=found["submissions"])
    from mailx.smtp.submission import unsigned_domains

    unsigned = [
        Problem(
            loader.file,
            None,
            f"domains.{name}.dkim",
            "users can send from this domain (listen.submission) but it has no DKIM key:"
            " their mail goes out unsigned (mailxctl dkim keygen DOMAIN)",
        )
        for name in unsigned_domains(config)
    ]
    if unsigned:
        config = replace(config, warnings=(*config.warnings, *unsigned))
    return config


def _build(loader: _Loader, root: _Node, source: Path) -> Config | None:
    fields = loader.block(root, DEFAULTS)
    if fields is None:
        return None
    listen = loader.block(fields["listen"], DEFAULTS["listen"])
    endpoints: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    if listen is not None:
        trusted_proxies = loader.items(listen["haproxy_trusted_networks"], loader.network)
        smtp = listen["smtp"]
        endpoints = loader.items(smtp, loader.server_endpoint, single=True)
        metrics = loader.items(listen["metrics"], loader.server_endpoint, single=True)
        if smtp.null or (smtp.kind == "seq" and not smtp.value):
            loader.at(smtp, "needs at least one endpoint to listen on")
    outbound = loader.outbound(fields["outbound"])
    hostname = loader.hostname(fields["hostname"])
    tls = loader.tls(fields["tls"])
    loader.tls_pair(fields["tls"], tls, hostname)
    log_format, trace = _logging(loader, fields["logging"])
    config = Config(
        source=source,
        hostname=_partial(hostname),
        public_addresses=loader.items(fields["public_addresses"], loader.ip),
        listen=endpoints,
        tls=tls,
        limits=_partial(loader.limits(fields["limits"])),
        paths=_partial(loader.paths(fields["paths"])),
        dns=_partial(loader.dns(fields["dns"])),
        authentication=_partial(loader.authentication(fields["authentication"])),
        checks=_partial(loader.checks(fields["checks"])),
        domains=MappingProxyType(loader.domains(fields["domains"])),
        outbound=_partial(outbound),
        reports=loader.value(fields["reports"], loader.report_address),
        imap=loader.value(fields["imap"], loader.imap_server),
        haproxy_trusted_networks=trusted_proxies,
        metrics_listen=metrics,
        log_format=log_format,
        trace=trace,
        warnings=tuple(loader.warnings),
    )
    accounts = loader.accounts(fields["accounts"], config.domains)
    if accounts is not None:
        config = replace(config, accounts=accounts)
    if listen is not None:
        config = _submission_listeners(loader, listen, config)
    loader.require_srs_secret(outbound)
    return config
