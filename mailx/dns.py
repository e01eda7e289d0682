# -*- test-case-name: tests.test_dns -*-
"""The one DNS resolver of the process: dnspython, a TTL cache, worker threads.

SPF, DKIM, DMARC and the outbound queue all resolve through a `Resolver`
built from the ``dns:`` section of the configuration.  It owns a private
``dns.resolver.Resolver`` (never ``dns.resolver.default_resolver``, which
other code in the process may rely on), so ``dns.nameservers`` such as
``127.0.0.1:5353`` apply to mailx alone.

The lookup methods block; call them from a worker thread.  The ``lookup_*``
twins return Deferreds and run the same lookups in a thread pool, so the
reactor thread never waits for the network.

Outcomes are three, because SPF (RFC 7208 4.6.4, 5) and DMARC (RFC 7489
6.6.3) treat them differently:

- records: a value is returned;
- nothing there (NXDOMAIN or NODATA, a "void lookup"): `DNSVoidError`;
- no answer for now (timeout, SERVFAIL, REFUSED, network error):
  `DNSTemporaryError`, never cached, so a retry asks again.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool

__all__ = [
    "MX",
    "Answer",
    "Deadline",
    "DNSError",
    "DNSTemporaryError",
    "DNSVoidError",
    "NoDataError",
    "NullMXError",
    "NXDomainError",
    "Resolver",
]

T = TypeVar("T")

# RFC 2308 5: negative answers are cached for min(SOA TTL, SOA MINIMUM).
# Without an SOA there is no negative TTL; like Unbound we keep it short.
DEFAULT_NEGATIVE_TTL = 60
# RFC 2308 5 suggests 1 to 3 hours as the upper bound of negative caching.
MAX_NEGATIVE_TTL = 3 * 3600
# Unbound's cache-max-ttl default: a day, whatever a zone asks for.
MAX_TTL = 86400
# A stub resolver restarts at the target of a CNAME whose data the server
# did not include (an authoritative server answers for its zone only).
MAX_CNAME_RESTARTS = 8
# dnspython retries a silent server within the lifetime; one attempt waits
# at most this long (its own default), so a lost UDP packet is not fatal.
MAX_ATTEMPT_TIMEOUT = 2.0
# RFC 6891 and the 2020 DNS flag day: 1232 octets avoids IP fragmentation.
EDNS_PAYLOAD = 1232


class DNSError(Exception):
    """A lookup gave no usable records."""


class DNSVoidError(DNSError):
    """The name has no records of this type: a "void lookup" (RFC 7208 4.6.4)."""

    # How long the answer may be cached (the SOA minimum, RFC 2308 5).
    ttl: float = 0.0


class NXDomainError(DNSVoidError):
    """The name does not exist (RCODE 3), or cannot be a DNS name at all."""


class NoDataError(DNSVoidError):
    """The name exists but has no records of the type asked (NODATA)."""


class NotCached(BaseException):  # noqa: N818 - a signal, not an error
    """A lookup outside the cache during `Resolver.from_cache`.

    A BaseException so that libraries' ``except Exception`` handlers (which
    would turn it into a DNS error result) let it through.
    """


class DNSTemporaryError(DNSError):
    """Timeout, SERVFAIL or a network error: asking again later may succeed."""


class NullMXError(DNSError):
    """The domain publishes a null MX: it accepts no mail (RFC 7505)."""


class Deadline:
    """When the lookups of one piece of work (the checks of a message) must end.

    dnspython's blocking calls cannot be interrupted, so instead each lookup
    made under a deadline (`Resolver.call_within`) waits at most until it,
    and once it has passed, or the work was `cancel`-led because nobody
    wants the result any more, the next lookup fails at once as a
    temporary error.  An SPF record whose every include answers just under
    the timeout then holds its thread until the deadline, not for minutes.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.expires = clock() + seconds
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def remaining(self) -> float:
        """Seconds left; 0 once expired or cancelled."""
        if self.cancelled:
            return 0.0
        return max(0.0, self.expires - self._clock())


@dataclass(frozen=True)
class Answer:
    """The records of one name and type, after following CNAMEs."""

    name: str
    rdtype: str
    canonical_name: str
    records: tuple[Any, ...]  # dnspython rdata objects (immutable)
    ttl: int


@dataclass(frozen=True, order=True)
class MX:
    """One mail exchanger, as the forwarding queue will try it."""

    preference: int
    exchange: str
    # RFC 5321 5.1: with no MX records the domain itself is the one host.
    implicit: bool = False


class _Cache:
    """A bounded, thread-safe map whose entries expire after their TTL."""

    def __init__(self, clock: Callable[[], float], max_entries: int) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, value = entry
            if self._clock() >= expires:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _normalize(name: str | bytes | dns.name.Name) -> str:
    """Lower-case A-label text without the final dot; NXDomainError if invalid.

    A name that cannot be put in a query (empty label, label over 63
    octets, name over 255) can have no records: treat it as non-existent,
    as RFC 7208 4.3 does for the SPF check.
    """
    if isinstance(name, dns.name.Name):
        return name.to_text(omit_final_dot=True).lower()
    if isinstance(name, bytes):
        name = name.decode("ascii", "surrogateescape")
    return _normalized_text(name)


@functools.lru_cache(maxsize=4096)
def _normalized_text(name: str) -> str:
    """`_normalize` of a text name, kept: every lookup, cached or not, starts
    here, and dnspython's parse and print were 3% of the reactor's time per
    forwarded message.  Names that raise are parsed again each time."""
    text = name.rstrip(".")
    if not text:
        raise NXDomainError("empty domain name")
    try:
        parsed = dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise NXDomainError(f"invalid domain name {text!r}: {e}") from None
    return parsed.to_text(omit_final_dot=True).lower()


def _negative_ttl(response: Any) -> int:
    """RFC 2308 5: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL)
    return DEFAULT_NEGATIVE_TTL


class Resolver:
    """DNS lookups with a TTL cache, safe to call from many threads at once.

    ``nameservers`` are ``(host, port)`` pairs; empty means the system's
    configuration (``/etc/resolv.conf``), read into this instance only.
    ``timeout`` bounds each lookup, all retries included.  ``threadpool``
    and ``reactor`` choose where the ``lookup_*`` and `call` methods run:
    by default the reactor's own thread pool.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 5.0,
        *,
        reactor: Any = None,
        threadpool: Any = None,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10000,
        observe: Callable[[str, float, str | None], None] | None = None,
    ) -> None:
        if nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, int(port)) for host, port in nameservers
            ]
        else:
            try:
                resolver = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                # resolv.conf(5): with no nameserver line, the local host.
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, MAX_ATTEMPT_TIMEOUT)
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.cache = None  # ours below knows void from temporary
        self._resolver = resolver
        self.timeout = timeout
        self.nameservers = tuple((h, int(p)) for h, p in nameservers)
        self._cache = _Cache(clock, max_entries)
        self._reactor = reactor
        self._threadpool = threadpool
        self._local = threading.local()
        # observe(rdtype, seconds, error or None): each lookup that went to
        # the network (mailx.observe.metrics), called in the worker thread.
        self._observe = observe

    # -- blocking lookups (worker threads only) ---------------------------

    def query(self, name: str | bytes, rdtype: str) -> Answer:
        """The records of ``name`` of type ``rdtype`` ("TXT", "MX", ...).

        Raises `NXDomainError`, `NoDataError` or `DNSTemporaryError`.
        """
        qname = _normalize(name)
        rdtype = rdtype.upper()
        key = (qname, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if isinstance(cached, tuple):  # (exception class, message)
                raise cached[0](cached[1])
            return cached
        if getattr(self._local, "cache_only", False):
            self._local.missed = True
            raise NotCached(f"{qname} {rdtype}")
        lifetime = self.timeout
        deadline: Deadline | None = getattr(self._local, "deadline", None)
        if deadline is not None:
            left = deadline.remaining()
            if left <= 0:
                why = "abandoned" if deadline.cancelled else "out of time"
                raise DNSTemporaryError(f"{qname} {rdtype}: not asked, the check is {why}")
            lifetime = min(lifetime, left)
        started = time.monotonic()
        try:
            answer = self._resolve(qname, rdtype, lifetime)
        except DNSVoidError as e:
            self._observed(rdtype, started, None)  # NXDOMAIN and NODATA are answers
            self._cache.put(key, (type(e), str(e)), getattr(e, "ttl", DEFAULT_NEGATIVE_TTL))
            raise
        except DNSTemporaryError as e:
            self._observed(rdtype, started, "timeout" if "timed out" in str(e) else "failure")
            raise
        self._observed(rdtype, started, None)
        self._cache.put(key, answer, answer.ttl)
        return answer

    def _observed(self, rdtype: str, started: float, error: str | None) -> None:
        if self._observe is not None:
            self._observe(rdtype, time.monotonic() - started, error)

    def _resolve(self, qname: str, rdtype: str, lifetime: float) -> Answer:
        target = qname
        ttl = MAX_TTL
        end = time.monotonic() + lifetime  # CNAME restarts included
        for _ in range(MAX_CNAME_RESTARTS + 1):
            try:
                result = self._resolver.resolve(
                    target,
                    rdtype,
                    raise_on_no_answer=False,
                    search=False,
                    lifetime=max(0.001, end - time.monotonic()),
                )
            except dns.resolver.NXDOMAIN as e:
                responses = list(e.responses().values())
                error: DNSVoidError = NXDomainError(f"{qname}: no such domain")
                error.ttl = _negative_ttl(responses[0] if responses else None)
                raise error from None
            except dns.resolver.NoNameservers as e:
                # Every server answered SERVFAIL, REFUSED or garbage.
                raise DNSTemporaryError(f"{qname} {rdtype}: server failure ({e})") from None
            except dns.exception.Timeout:
                raise DNSTemporaryError(
                    f"{qname} {rdtype}: timed out after {lifetime:g}s"
                ) from None
            except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel) as e:
                raise NXDomainError(f"{qname}: invalid name ({e})") from None
            except dns.exception.DNSException as e:
                raise DNSTemporaryError(f"{qname} {rdtype}: {e}") from None
            ttl = min(ttl, result.chaining_result.minimum_ttl)
            canonical = result.canonical_name.to_text(omit_final_dot=True).lower()
            if result.rrset is not None:
                return Answer(qname, rdtype, canonical, tuple(result.rrset), min(ttl, MAX_TTL))
            if canonical == target:
                error = NoDataError(f"{qname}: no {rdtype} records")
                error.ttl = min(ttl, _negative_ttl(result.response))
                raise error
            target = canonical  # a CNAME whose target's data was not included
        raise DNSTemporaryError(f"{qname}: CNAME chain longer than {MAX_CNAME_RESTARTS}")

    def txt(self, name: str | bytes) -> list[str]:
        """Each TXT record, its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2).

        Octets that are not UTF-8 become U+FFFD: none of our records may
        contain them, and a parser then rejects the record as it should.
        """
        return [b.decode("utf-8", "replace") for b in self.txt_bytes(name)]

    def txt_bytes(self, name: str | bytes) -> list[bytes]:
        """Each TXT record as the octets of its strings joined."""
        return [b"".join(r.strings) for r in self.query(name, "TXT").records]

    def a(self, name: str | bytes) -> list[str]:
        return [r.address for r in self.query(name, "A").records]

    def aaaa(self, name: str | bytes) -> list[str]:
        return [r.address for r in self.query(name, "AAAA").records]

    def ptr(self, address: str) -> list[str]:
        """The names of an IP address (its in-addr.arpa or ip6.arpa PTRs)."""
        reverse = dns.reversename.from_address(str(ipaddress.ip_address(address)))
        return [
            r.target.to_text(omit_final_dot=True).lower()
            for r in self.query(reverse.to_text(), "PTR").records
        ]

    def mx(self, name: str | bytes) -> list[MX]:
        """The MX records as published, sorted by preference."""
        return sorted(
            MX(r.preference, r.exchange.to_text(omit_final_dot=True).lower())
            for r in self.query(name, "MX").records
        )

    def mail_exchangers(self, domain: str) -> list[MX]:
        """The hosts to try for mail to ``domain``, best first.

        RFC 5321 5.1: no MX records (NODATA) means the domain's own address
        is the implicit MX; NXDOMAIN raises.  RFC 7505: a lone MX of "." is
        a null MX and raises `NullMXError`; a "." among real MX records is
        unusable and skipped.
        """
        try:
            records = self.mx(domain)
        except NoDataError:
            return [MX(0, _normalize(domain), implicit=True)]
        real = [m for m in records if m.exchange not in ("", ".")]
        if not real:
            raise NullMXError(f"{domain} accepts no mail (null MX, RFC 7505)")
        return real

    # -- adapters for the authentication libraries -------------------------

    def spf_lookup(
        self, name: str, qtype: str, strict: Any = True, timeout: Any = None
    ) -> list[tuple[tuple[str, str], Any]]:
        """Answers in the shape of pyspf's ``DNSLookup``.

        Void lookups return ``[]`` so pyspf counts them (RFC 7208 4.6.4);
        temporary failures raise ``spf.TempError`` so the result becomes
        temperror (RFC 7208 5).
        """
        import spf  # pyspf; imported here so mailx.dns needs it only for SPF

        try:
            answer = self.query(name, qtype)
        except DNSVoidError:
            return []
        except DNSTemporaryError as e:
            raise spf.TempError(f"DNS {e}") from None
        key = (name.rstrip(".").lower(), qtype)
        out: list[tuple[tuple[str, str], Any]] = []
        for r in answer.records:
            if qtype in ("A", "AAAA"):
                out.append((key, r.address))
            elif qtype == "MX":
                out.append((key, (r.preference, r.exchange.to_text(omit_final_dot=True))))
            elif qtype == "PTR":
                out.append((key, r.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                out.append((key, tuple(r.strings)))
        return out

    def dkim_dnsfunc(self, name: bytes | str, timeout: Any = None) -> bytes | None:
        """A dkimpy ``dnsfunc``: the first TXT record joined, or None.

        Temporary failures raise `DNSTemporaryError` rather than dkimpy's
        ``DnsTimeoutError``, which dkimpy turns into a plain failed
        verification; the caller must see them to report temperror.
        """
        try:
            records = self.txt_bytes(name)
        except DNSVoidError:
            return None
        return records[0] if records else None

    # -- answering from the cache alone (any thread) -------------------------

    def from_cache(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func`` allowing only cached answers: it never waits for the network.

        Raises `NotCached` if ``func`` needed anything else, even when
        ``func`` swallowed the exception on the way (pyspf has bare
        ``except:`` clauses): then its result cannot be trusted.
        """
        self._local.cache_only, self._local.missed = True, False
        try:
            result = func(*args)
        finally:
            self._local.cache_only = False
        if self._local.missed:
            raise NotCached("a lookup was not in the cache")
        return result

    def cache_only_missed(self) -> bool:
        """In a `from_cache` run, whether a lookup has missed the cache so far."""
        return bool(getattr(self._local, "cache_only", False) and self._local.missed)

    # -- Deferred wrappers (reactor thread) ---------------------------------

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run a blocking function (one that resolves) in the thread pool."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        pool = self._threadpool if self._threadpool is not None else reactor.getThreadPool()
        return deferToThreadPool(reactor, pool, func, *args, **kwargs)

    def call_within(
        self, deadline: Deadline, func: Callable[..., T], *args: Any
    ) -> Deferred[T]:
        """`call`, every lookup ``func`` makes bounded by ``deadline``."""
        return self.call(self._within, deadline, func, *args)

    def _within(self, deadline: Deadline, func: Callable[..., T], *args: Any) -> T:
        self._local.deadline = deadline
        try:
            return func(*args)
        finally:
            self._local.deadline = None

    def cached_or_call(self, func: Callable[..., T], *args: Any) -> Deferred[T]:
        """``func``'s result at once when the cache holds every answer it needs, else `call`.

        Outbound asks the same few names for each message (MX, AAAA, A,
        the ``_mta-sts`` TXT): a thread round trip each, with its GIL
        hand-offs, cost more than the answers already in memory (and held
        the connection slot meanwhile).  Reactor thread only.
        """
        try:
            return succeed(self.from_cache(func, *args))
        except NotCached:
            return self.call(func, *args)
        except DNSError as e:  # a cached negative answer is an answer
            return fail(e)

    def lookup_txt(self, name: str) -> Deferred[list[str]]:
        return self.cached_or_call(self.txt, name)

    def lookup_a(self, name: str) -> Deferred[list[str]]:
        return self.cached_or_call(self.a, name)

    def lookup_aaaa(self, name: str) -> Deferred[list[str]]:
        return self.cached_or_call(self.aaaa, name)

    def lookup_mail_exchangers(self, domain: str) -> Deferred[list[MX]]:
        return self.cached_or_call(self.mail_exchangers, domain)

    def clear_cache(self) -> None:
        self._cache.clear()
