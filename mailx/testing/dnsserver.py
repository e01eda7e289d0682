# -*- test-case-name: tests.test_dns -*-
"""A real DNS server on 127.0.0.1 for tests, with zone data per test.

The resolver under test talks to it over UDP and TCP exactly as it would
to a production server, so caching, timeouts, SERVFAIL, NXDOMAIN versus
NODATA and long TXT records are exercised for real::

    server = start_dns_server({
        "example.test": {"MX": [(10, "mx.example.test")], "TXT": ["v=spf1 -all"]},
        "mx.example.test": {"A": ["127.0.0.1"]},
    })
    resolver = Resolver(server.nameservers, timeout=0.5)
    ...
    yield server.stop()

It is a twisted.names server in the reactor thread; the resolver must run
in another thread (``Resolver.lookup_*``, ``deferToThread``), never
blocking the reactor that has to answer it.

Zone data: ``{name: {type: [values]}}`` with types A, AAAA (address
strings), MX (``(preference, exchange)``), PTR, NS, CNAME (names), TXT and
SPF (each value a str, bytes or a tuple of strings for a record of several
strings; a str over 255 octets is split into strings as DNS requires) and
SRV (``(priority, weight, port, target)``, target "." for "not offered").
The server is authoritative for the root zone: a name absent from the data
answers NXDOMAIN, a present name without the type asked answers NODATA,
both with an SOA whose MINIMUM is ``negative_ttl`` (RFC 2308).
``timeout()``, ``servfail()`` and ``delay()`` make a name misbehave.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, error, server
from twisted.names.authority import FileAuthority

__all__ = ["LoopbackDNS", "serve_for_test", "start_dns_server"]

Zones = Mapping[str, Mapping[str, Sequence[Any]]]

_TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "PTR": dns.PTR,
    "NS": dns.NS,
    "CNAME": dns.CNAME,
    "TXT": dns.TXT,
    "SPF": dns.SPF,
    "SOA": dns.SOA,
    "SRV": dns.SRV,
}
ALL = None  # every type of a name, for timeout() and servfail()


def _wire(name: str) -> bytes:
    """A name as twisted.names wants it; ASCII as is, so odd test names survive."""
    name = name.rstrip(".")
    return name.encode("ascii") if name.isascii() else name.encode("idna")


def _name(name: str) -> bytes:
    return _wire(name).lower()


def _strings(value: Any) -> tuple[bytes, ...]:
    """The character-strings of one TXT record (RFC 1035 3.3.14)."""
    if isinstance(value, (tuple, list)):
        return tuple(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value)
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not data:
        return (b"",)
    return tuple(data[i : i + 255] for i in range(0, len(data), 255))


def _record(rtype: str, value: Any, ttl: int) -> Any:
    if rtype == "A":
        return dns.Record_A(value, ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(value, ttl=ttl)
    if rtype == "MX":
        preference, exchange = value
        return dns.Record_MX(int(preference), _wire(exchange), ttl=ttl)
    if rtype in ("PTR", "NS", "CNAME"):
        named: Any = {"PTR": dns.Record_PTR, "NS": dns.Record_NS, "CNAME": dns.Record_CNAME}[rtype]
        return named(_wire(value), ttl=ttl)
    if rtype in ("TXT", "SPF"):
        cls: Any = dns.Record_TXT if rtype == "TXT" else dns.Record_SPF
        return cls(*_strings(value), ttl=ttl)
    if rtype == "SRV":
        priority, weight, port, target = value
        return dns.Record_SRV(int(priority), int(weight), int(port), _wire(target), ttl=ttl)
    raise ValueError(f"unsupported record type {rtype!r}")


class _Silence(Exception):
    """Never answer this query: the client sees a timeout."""


class _ServerFailure(Exception):
    """Answer SERVFAIL."""


class _Authority(FileAuthority):
    """Records from a mapping, plus per-name timeouts and failures."""

    # FileAuthority's stubs type both None: loadFile fills them.
    soa: tuple[bytes, dns.Record_SOA]  # type: ignore[assignment]
    records: dict[bytes, list[Any]]  # type: ignore[assignment]

    def __init__(self, ttl: int, negative_ttl: int) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.faults: dict[tuple[bytes, int | None], type[Exception]] = {}
        self.delays: dict[tuple[bytes, int | None], float] = {}
        self.reactor: Any = None
        self.pending: set[Any] = set()  # delayed answers, dropped at stop()
        self.queries: list[tuple[str, str]] = []
        super().__init__(None)

    def loadFile(self, filename: object) -> None:
        soa = dns.Record_SOA(
            mname=b"ns.loopback.test",
            rname=b"hostmaster.loopback.test",
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=self.negative_ttl,
            ttl=self.negative_ttl,
        )
        self.soa = (b"", soa)
        self.records = {}

    def set(self, name: str, rtype: str, values: Iterable[Any], ttl: int | None) -> None:
        key = _name(name)
        code = _TYPES[rtype.upper()]
        kept = [r for r in self.records.get(key, []) if r.TYPE != code]
        new = [_record(rtype.upper(), v, self.ttl if ttl is None else ttl) for v in values]
        if kept or new:
            self.records[key] = kept + new
        else:
            self.records.pop(key, None)

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred:
        name = query.name.name.lower()
        self.queries.append(
            (name.decode("ascii", "replace"), dns.QUERY_TYPES.get(query.type, str(query.type)))
        )
        fault = self.faults.get((name, query.type)) or self.faults.get((name, ALL))
        if fault is _Silence:
            return defer.Deferred()  # never fires: no reply is sent
        if fault is not None:
            return defer.fail(fault(name))
        delay = self.delays.get((name, query.type), self.delays.get((name, ALL)))
        if delay:
            late: defer.Deferred = defer.Deferred()

            def answer() -> None:
                self.pending.discard(call)
                defer.maybeDeferred(self._lookup, name, dns.IN, query.type, timeout).chainDeferred(
                    late
                )

            call = self.reactor.callLater(delay, answer)
            self.pending.add(call)
            return late
        return defer.maybeDeferred(self._lookup, name, dns.IN, query.type, timeout)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> defer.Deferred:
        if name not in self.records:
            suffix = b"." + name
            if name == b"" or any(n.endswith(suffix) for n in self.records):
                # An empty non-terminal exists: NODATA, not NXDOMAIN (RFC 8020).
                soa = dns.RRHeader(b"", dns.SOA, dns.IN, self.negative_ttl, self.soa[1], auth=True)
                return defer.succeed(([], [soa], []))
        return super()._lookup(name, cls, type, timeout)


class _ServerFactory(server.DNSServerFactory):
    """Authoritative answers: AA set, SOA beside NXDOMAIN, quiet SERVFAIL."""

    def __init__(self, authority: _Authority) -> None:
        super().__init__()
        self.resolver = authority
        self.authority = authority

    def gotResolverResponse(self, response: Any, protocol: Any, message: Any, address: Any) -> None:
        ans, auth, add = response
        reply = self._responseFromMessage(
            message=message, rCode=dns.OK, answers=ans, authority=auth, additional=add
        )
        reply.auth = True
        self.sendReply(protocol, reply, address)

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(error.DomainError, dns.AuthoritativeDomainError):
            soa = dns.RRHeader(
                b"", dns.SOA, dns.IN, self.authority.negative_ttl, self.authority.soa[1], auth=True
            )
            reply = self._responseFromMessage(message=message, rCode=dns.ENAME, authority=[soa])
            reply.auth = True
        else:
            # A deliberate servfail() or a bug; either way the client sees
            # SERVFAIL and the test decides, rather than trial's log check.
            reply = self._responseFromMessage(message=message, rCode=dns.ESERVER)
        self.sendReply(protocol, reply, address)


class LoopbackDNS:
    """A running loopback DNS server; see the module docstring."""

    def __init__(self, factory: _ServerFactory, udp: Any, tcp: Any) -> None:
        self._factory = factory
        self._authority = factory.authority
        self._udp = udp
        self._tcp = tcp
        self.port: int = udp.getHost().port

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        """What `mailx.dns.Resolver` and ``dns.nameservers`` take."""
        return (("127.0.0.1", self.port),)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, type) asked so far, in order: to see what was cached."""
        return self._authority.queries

    def set(self, name: str, rtype: str, values: Iterable[Any], ttl: int | None = None) -> None:
        """Replace the ``rtype`` records of ``name`` (empty: remove them)."""
        self._authority.set(name, rtype, values, ttl)

    def load(self, zones: Zones, ttl: int | None = None) -> None:
        """Add the records of ``zones`` (replacing those types it names)."""
        for name, types in zones.items():
            for rtype, values in types.items():
                self.set(name, rtype, values, ttl)

    def remove(self, name: str) -> None:
        """Forget every record of ``name``: it answers NXDOMAIN."""
        self._authority.records.pop(_name(name), None)

    def timeout(self, name: str, rtype: str | None = ALL) -> None:
        """Never answer queries for ``name`` (of type ``rtype``, or any)."""
        self._fault(name, rtype, _Silence)

    def servfail(self, name: str, rtype: str | None = ALL) -> None:
        """Answer SERVFAIL to queries for ``name`` (of ``rtype``, or any)."""
        self._fault(name, rtype, _ServerFailure)

    def delay(self, name: str, seconds: float, rtype: str | None = ALL) -> None:
        """Answer queries for ``name`` (of ``rtype``, or any) only after ``seconds``."""
        code = None if rtype is None else _TYPES[rtype.upper()]
        self._authority.delays[(_name(name), code)] = seconds

    def heal(self, name: str) -> None:
        """Undo timeout(), servfail() and delay() for ``name``."""
        key = _name(name)
        for fault in [f for f in self._authority.faults if f[0] == key]:
            del self._authority.faults[fault]
        for fault in [f for f in self._authority.delays if f[0] == key]:
            del self._authority.delays[fault]

    def _fault(self, name: str, rtype: str | None, kind: type[Exception]) -> None:
        code = None if rtype is None else _TYPES[rtype.upper()]
        self._authority.faults[(_name(name), code)] = kind

    def stop(self) -> defer.Deferred:
        """Close both sockets; delayed answers are never sent."""
        for call in self._authority.pending:
            call.cancel()
        self._authority.pending.clear()
        return defer.gatherResults(
            [
                defer.maybeDeferred(self._udp.stopListening),
                defer.maybeDeferred(self._tcp.stopListening),
            ]
        )


def start_dns_server(
    zones: Zones | None = None,
    *,
    ttl: int = 300,
    negative_ttl: int = 60,
    reactor: Any = None,
    attempts: int = 20,
) -> LoopbackDNS:
    """Listen on 127.0.0.1, UDP and TCP on one ephemeral port, and serve ``zones``.

    UDP is bound first on port 0, then TCP on the same number; if another
    process holds that TCP port, both are released and another is tried.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    authority = _Authority(ttl, negative_ttl)
    authority.reactor = reactor
    factory = _ServerFactory(authority)
    for _ in range(attempts):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        running = LoopbackDNS(factory, udp, tcp)
        running.load(zones or {})
        return running
    raise CannotListenError("127.0.0.1", 0, OSError("no port free for both UDP and TCP"))


def serve_for_test(testcase: Any, zones: Zones | None = None, **kwargs: Any) -> LoopbackDNS:
    """`start_dns_server`, stopped when the trial test case ends."""
    running = start_dns_server(zones, **kwargs)
    testcase.addCleanup(running.stop)
    return running
