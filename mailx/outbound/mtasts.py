# -*- test-case-name: tests.test_mtasts -*-
"""MTA-STS (RFC 8461): which MX hosts of a domain we may deliver to, and whether TLS must verify.

The decisions are plain functions over immutable values (`parse_record`,
`parse_policy`, `mx_matches`, `Policy.allows`); the I/O sits at the edge:

- `PolicyCache` keeps each domain's policy in ``<spool>/mta-sts/<domain>.json``
  (written aside, fsynced, renamed), so a restart keeps what we learnt: the
  cache is what stops an attacker who blocks the HTTPS fetch from
  downgrading us to clear text (RFC 8461 5.1);
- `PolicyFetcher` GETs ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
  with treq, the host name resolved through mailx's own `mailx.dns.Resolver`
  (``dns.nameservers``), never the system's, and its certificate verified
  against the system trust store (`twisted.internet.ssl.platformTrust`,
  OpenSSL's default paths, which honour ``SSL_CERT_FILE``/``SSL_CERT_DIR``);
- `MTASTS` ties them together for the outbound queue: `MTASTS.policy`
  fires with the `Policy` to apply to a domain, or None.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from mailx.dns import DNSError, DNSVoidError
from mailx.storage.maildir import fsync_directory, make_directories
from mailx.text import Logger

log = Logger(namespace="mailx.mtasts")

__all__ = [
    "ENFORCE",
    "NONE",
    "TESTING",
    "MTASTS",
    "Policy",
    "PolicyCache",
    "PolicyError",
    "PolicyFetcher",
    "mx_matches",
    "parse_policy",
    "parse_record",
]

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
# RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600
# RFC 8461 sets no size; a policy is a few lines, and the brief's bound
# (64 KiB) is generous.  Everything past it is a stranger's waste of memory.
MAX_POLICY_SIZE = 64 * 1024
# RFC 8461 3.3 asks for a timeout without a figure; the fetch holds a
# delivery attempt's connection slot, so keep it well under a minute.
FETCH_TIMEOUT = 20.0
# After a failed fetch the domain is not fetched again for this long (its
# mail is still tried, under the cached policy or none): a dead HTTPS host
# must not cost every delivery attempt a timeout.
FETCH_FAILURE_MEMORY = 300.0
# Domains with a cached policy; the ones fetched longest ago go first.
MAX_CACHED_POLICIES = 10000
# At most this many addresses of mta-sts.<domain> are tried per fetch.
MAX_ADDRESSES = 3
WELL_KNOWN = "/.well-known/mta-sts.txt"


class PolicyError(ValueError):
    """A TXT record or policy file that does not parse (RFC 8461 3.1, 3.2)."""


@dataclass(frozen=True)
class Policy:
    """One domain's parsed policy (RFC 8461 3.2)."""

    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # patterns, lower case, "*.example.net" allowed
    max_age: int  # seconds

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: the MX host name matches one of the policy's patterns."""
        return any(mx_matches(host, pattern) for pattern in self.mx)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "mx": list(self.mx), "max_age": self.max_age}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        mode, mx, max_age = data["mode"], data["mx"], data["max_age"]
        if mode not in (ENFORCE, TESTING, NONE) or not isinstance(max_age, int):
            raise PolicyError(f"bad cached policy {data!r}")
        if not isinstance(mx, list) or not all(isinstance(m, str) for m in mx):
            raise PolicyError(f"bad cached policy {data!r}")
        return cls(mode, tuple(mx), max_age)


# RFC 8461 3.1: sts-id = 1*32(ALPHA / DIGIT); extensions name=value.
_ID = re.compile(r"\A[A-Za-z0-9]{1,32}\Z")
_EXT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"\A[\x21-\x3a\x3c\x3e-\x7e]+\Z")
# A DNS name of letters, digits and hyphens (A-labels), as an MX pattern holds.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"\A{_LABEL}(?:\.{_LABEL})*\Z")


def parse_record(records: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when there is no usable one.

    RFC 8461 3.1: records that do not begin with "v=STSv1;" are discarded;
    unless exactly one is left and it is valid, the domain has no
    available policy (a cached one still applies, 5.1).
    """
    candidates = [r for r in records if r.startswith("v=STSv1;") or r == "v=STSv1"]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # RFC 8461 3.1: an optional trailing ";"
    if not fields or fields[0] != "v=STSv1":
        return None
    policy_id = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq:
            return None
        if name == "id":
            if not _ID.match(value) or policy_id is not None:
                return None
            policy_id = value
        elif not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            return None
    return policy_id


def parse_policy(body: bytes) -> Policy:
    """A policy file's `Policy`; `PolicyError` when it is not one (RFC 8461 3.2).

    Lines end in CRLF or LF; ``key: value``; unknown keys are ignored; of a
    key other than ``mx`` given twice, the first counts.  ``version`` must
    be STSv1; ``mode`` and ``max_age`` are required, ``mx`` at least once
    unless the mode is ``none``.
    """
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("policy is not ASCII text") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r").strip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key or key != key.strip(" \t"):
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _DOMAIN.match(pattern.removeprefix("*.")):
                raise PolicyError(f"bad mx pattern {value[:80]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    # RFC 8461 3.2: 1*10(DIGIT), at most 31557600.
    if not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
        raise PolicyError(f"bad max_age {max_age[:20]!r}")
    if not mx and mode != NONE:
        raise PolicyError("no mx pattern")
    return Policy(mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT))


def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 4.1: RFC 6125 matching, "*" standing for exactly the whole left-most label.

    ``*.example.net`` matches ``mx.example.net``, not ``example.net`` nor
    ``a.b.example.net``.
    """
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def safe_domain(domain: str) -> bool:
    """Whether ``domain`` is a plain A-label name: it becomes a file name and a host name."""
    return len(domain) <= 253 and bool(_DOMAIN.match(domain)) and "." in domain


# ---------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class CachedPolicy:
    """RFC 8461 5.1: a policy, the id it was published under, and when we fetched it."""

    domain: str
    policy_id: str
    policy: Policy
    fetched: float  # seconds since the epoch, on the scheduler's clock

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.policy.max_age


class PolicyCache:
    """Policies by domain, in memory and in ``directory/<domain>.json``.

    The methods block (file I/O); call them from a worker thread.  The
    directory is read once, on first use.  A file that does not parse is
    ignored (and replaced at the next fetch).
    """

    def __init__(self, directory: Path, max_entries: int = MAX_CACHED_POLICIES) -> None:
        self.directory = Path(directory)
        self.max_entries = max_entries
        self._entries: dict[str, CachedPolicy] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, CachedPolicy]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, CachedPolicy] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.endswith(".json") or not safe_domain(name[:-5]):
                continue
            try:
                with open(self.directory / name, "rb") as f:
                    data = json.loads(f.read(MAX_POLICY_SIZE * 4))
                entry = CachedPolicy(
                    domain=name[:-5],
                    policy_id=str(data["id"]),
                    policy=Policy.from_json(data["policy"]),
                    fetched=float(data["fetched"]),
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn("MTA-STS cache: ignoring {name}: {e}", name=name, e=str(e))
                continue
            entries[entry.domain] = entry
        self._entries = entries
        return entries

    def get(self, domain: str) -> CachedPolicy | None:
        with self._lock:
            return self._load().get(domain)

    def peek(self, domain: str) -> tuple[bool, CachedPolicy | None]:
        """(True, `get`'s answer) when it needs no file and no wait for the lock,
        else (False, None): the reactor thread's way, without a thread hop per message."""
        if self._entries is None or not self._lock.acquire(blocking=False):
            return False, None
        try:
            return True, self._entries.get(domain)
        finally:
            self._lock.release()

    def put(self, entry: CachedPolicy) -> None:
        """Keep ``entry``, durably; the oldest entries go past ``max_entries``."""
        with self._lock:
            entries = self._load()
            make_directories(self.directory)
            path = self.directory / f"{entry.domain}.json"
            temporary = self.directory / f".{entry.domain}.tmp"
            data = {
                "domain": entry.domain,
                "id": entry.policy_id,
                "policy": entry.policy.to_json(),
                "fetched": entry.fetched,
            }
            with open(temporary, "w", encoding="ascii") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            entries[entry.domain] = entry
            for old in sorted(entries.values(), key=lambda e: e.fetched)[
                : max(0, len(entries) - self.max_entries)
            ]:
                del entries[old.domain]
                try:
                    os.unlink(self.directory / f"{old.domain}.json")
                except FileNotFoundError:
                    pass
            fsync_directory(self.directory)


# ---------------------------------------------------------------------------
# Fetching


class FetchError(Exception):
    """No policy could be fetched (HTTP, TLS, DNS, size, type or syntax)."""


@implementer(IAgentEndpointFactory)
class _FixedAddress:
    """Agent endpoints to one address we resolved ourselves, TLS verified for the URL's host.

    ``Agent.usingEndpointFactory`` is Twisted's public seam for choosing
    where a request connects; the name is resolved through mailx's own
    resolver (``dns.nameservers``) and checked against the address policy
    before we get here.
    """

    def __init__(self, reactor: Any, address: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.port = port
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet import ssl
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )

        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        kind = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        tcp = kind(self.reactor, self.address, self.port, timeout=self.timeout)
        # RFC 8461 3.3: the certificate must be valid for mta-sts.<domain> and
        # chain to a trusted root; platformTrust() is OpenSSL's default paths,
        # so SSL_CERT_FILE and SSL_CERT_DIR apply (pyOpenSSL checks them).
        return wrapClientTLS(ssl.optionsForClientTLS(host), tcp)


@implementer(IAgent)
class _IdentityOnly:
    """An agent that asks for and accepts only uncompressed bodies.

    treq always wraps its agent in ``ContentDecoderAgent`` (gzip); a small
    gzip bomb would then inflate a whole read at once before our size check
    saw it.  Below that wrapper we drop its Accept-Encoding and refuse any
    encoded response, so what we count is what came over the wire.
    """

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> defer.Deferred:
        headers = headers.copy() if headers is not None else Headers()
        headers.removeHeader(b"accept-encoding")

        def check(response: Any) -> Any:
            if response.headers.getRawHeaders(b"content-encoding"):
                response.deliverBody(_Discard())
                raise FetchError("the policy came with a Content-Encoding")
            return response

        return self._agent.request(method, uri, headers, bodyProducer).addCallback(check)


class _Discard:
    """Closes a response body we do not want."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


class PolicyFetcher:
    """GETs one domain's policy file (RFC 8461 3.3).

    ``allowed(ip)`` says whether we may connect to an address (outbound's
    private-address rule: whoever controls a domain's DNS must not make us
    talk to our own network).  ``port`` is 443; tests point it elsewhere.
    """

    def __init__(
        self,
        resolver: Any,
        *,
        reactor: Any = None,
        allowed: Callable[[str], bool] = lambda ip: True,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.resolver = resolver
        self.reactor = reactor
        self.allowed = allowed
        self.port = port
        self.timeout = timeout

    @defer.inlineCallbacks
    def fetch(self, domain: str) -> Any:
        """The domain's `Policy`; `FetchError` with the reason otherwise."""
        host = f"mta-sts.{domain}"
        addresses: list[str] = []
        temporary = None
        for lookup in (self.resolver.lookup_aaaa, self.resolver.lookup_a):
            try:
                found = yield lookup(host)
            except DNSVoidError:
                continue
            except DNSError as e:
                temporary = e
                continue
            addresses.extend(a for a in found if a not in addresses)
        if not addresses:
            raise FetchError(f"no address for {host}" + (f" ({temporary})" if temporary else ""))
        usable = [a for a in addresses if self.allowed(a)]
        if not usable:
            raise FetchError(f"{host} has only private or reserved addresses")
        last: Exception | None = None
        for address in usable[:MAX_ADDRESSES]:
            try:
                policy = yield self._get(host, address)
            except FetchError:
                raise
            except Exception as e:
                last = e
                continue
            return policy
        raise FetchError(f"https://{host}{WELL_KNOWN}: {_describe(last)}")

    @defer.inlineCallbacks
    def _get(self, host: str, address: str) -> Any:
        import treq
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(self.reactor, persistent=False)
        agent = Agent.usingEndpointFactory(
            self.reactor, _FixedAddress(self.reactor, address, self.port, self.timeout), pool
        )
        client = HTTPClient(_IdentityOnly(agent))
        url = f"https://{host}{WELL_KNOWN}"
        # RFC 8461 3.3: redirects must not be followed (allow_redirects=False,
        # so a 3xx is just not 200); HTTP caching must not be used (none here).
        response = yield client.get(
            url, allow_redirects=False, unbuffered=True, timeout=self.timeout, reactor=self.reactor
        )
        if response.code != 200:
            response.deliverBody(_Discard())
            raise FetchError(f"{url}: HTTP {response.code}")
        # RFC 8461 3.2: the media type is text/plain (a parameter such as charset may follow).
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        media = types[-1].split(b";")[0].strip().lower()
        if media != b"text/plain":
            response.deliverBody(_Discard())
            raise FetchError(f"{url}: Content-Type {media.decode('latin-1')!r}, not text/plain")
        if isinstance(response.length, int) and response.length > MAX_POLICY_SIZE:
            response.deliverBody(_Discard())
            raise FetchError(f"{url}: policy of {response.length} octets is too large")
        body = bytearray()

        def collect(data: bytes) -> None:
            body.extend(data)
            if len(body) > MAX_POLICY_SIZE:
                raise FetchError(f"{url}: policy larger than {MAX_POLICY_SIZE} octets")

        reading: defer.Deferred = treq.collect(response, collect)
        timer = self.reactor.callLater(self.timeout, reading.cancel)
        try:
            yield reading
        except defer.CancelledError:
            raise FetchError(f"{url}: timed out reading the policy") from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            return parse_policy(bytes(body))
        except PolicyError as e:
            raise FetchError(f"{url}: {e}") from None


def _describe(error: Exception | None) -> str:
    if error is None:
        return "failed"
    if isinstance(error, defer.CancelledError):
        return "timed out"
    # twisted.web wraps the cause (TLS verification, refused connection) in a list.
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(
            "timed out" if r.check(defer.CancelledError) else r.getErrorMessage() or r.type.__name__
            for r in reasons
        )
    return str(error) or type(error).__name__


# ---------------------------------------------------------------------------
# The policy in force


class MTASTS:
    """The policy to apply to a domain's MX hosts, per RFC 8461 5.1.

    ``run_blocking(func, *args)`` runs the cache's file I/O off the reactor
    thread (outbound's disk pool); ``clock`` is the scheduler's, so cache
    ages follow the same time as retries.
    """

    def __init__(
        self,
        resolver: Any,
        cache: PolicyCache,
        fetcher: PolicyFetcher,
        *,
        clock: Any,
        run_blocking: Callable[..., defer.Deferred],
    ) -> None:
        self.resolver = resolver
        self.cache = cache
        self.fetcher = fetcher
        self.clock = clock
        self.run_blocking = run_blocking
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> when the fetch failed
        self._fetching: dict[tuple[str, str], list[defer.Deferred]] = {}

    @defer.inlineCallbacks
    def policy(self, domain: str, qid: str = "-") -> Any:
        """The `Policy` for ``domain`` (mode none included), or None when it has none."""
        domain = domain.lower().rstrip(".")
        if not safe_domain(domain):
            return None
        known, cached = self.cache.peek(domain)
        if not known:
            cached = yield self.run_blocking(self.cache.get, domain)
        now = self.clock.seconds()
        if cached is not None and cached.expired(now):
            cached = None
        try:
            records = yield self.resolver.lookup_txt(f"_mta-sts.{domain}")
        except DNSError as e:
            # No record, or no answer: RFC 8461 3.1/5.1, the cached policy stands.
            if not isinstance(e, DNSVoidError):
                log.info("{qid}: MTA-STS record of {domain}: {e}", qid=qid, domain=domain, e=str(e))
            return cached.policy if cached is not None else None
        policy_id = parse_record(records)
        if policy_id is None:
            return cached.policy if cached is not None else None
        if cached is not None and cached.policy_id == policy_id:
            return cached.policy
        policy = yield self._fetch_once(domain, policy_id, qid)
        if policy is not None:
            return policy
        if cached is not None:
            log.info(
                "{qid}: MTA-STS: keeping the cached policy of {domain} (id {old}, mode {mode})",
                qid=qid,
                domain=domain,
                old=cached.policy_id,
                mode=cached.policy.mode,
            )
            return cached.policy
        return None

    def _fetch_once(self, domain: str, policy_id: str, qid: str) -> defer.Deferred:
        """One fetch per domain and id at a time; the others wait for its result."""
        key = (domain, policy_id)
        failed = self._failed.get(key)
        if failed is not None and self.clock.seconds() - failed < FETCH_FAILURE_MEMORY:
            return defer.succeed(None)
        waiting: defer.Deferred = defer.Deferred()
        if key in self._fetching:
            self._fetching[key].append(waiting)
            return waiting
        self._fetching[key] = [waiting]

        def done(result: Any) -> None:
            for d in self._fetching.pop(key, []):
                d.callback(result)

        self._fetch(domain, policy_id, qid).addBoth(done)
        return waiting

    @defer.inlineCallbacks
    def _fetch(self, domain: str, policy_id: str, qid: str) -> Any:
        try:
            policy = yield self.fetcher.fetch(domain)
        except Exception as e:
            self._failed[(domain, policy_id)] = self.clock.seconds()
            if len(self._failed) > MAX_CACHED_POLICIES:
                self._failed.pop(next(iter(self._failed)))
            log.info(
                "{qid}: MTA-STS policy of {domain} not fetched: {e}",
                qid=qid,
                domain=domain,
                e=str(e) if isinstance(e, FetchError) else _describe(e),
            )
            return None
        self._failed.pop((domain, policy_id), None)
        entry = CachedPolicy(domain, policy_id, policy, self.clock.seconds())
        try:
            yield self.run_blocking(self.cache.put, entry)
        except OSError as e:
            log.error(
                "{qid}: MTA-STS cache: cannot save {domain}: {e}", qid=qid, domain=domain, e=str(e)
            )
        log.info(
            "{qid}: MTA-STS policy of {domain} fetched: id {id}, mode {mode}, mx {mx},"
            " max_age {age}s",
            qid=qid,
            domain=domain,
            id=policy_id,
            mode=policy.mode,
            mx=", ".join(policy.mx) or "none",
            age=policy.max_age,
        )
        return policy
