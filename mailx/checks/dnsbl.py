# -*- test-case-name: tests.test_dnsbl -*-
"""DNS blocklists (``checks.dnsbl``), as Postfix's reject_rbl_client does it.

A client listed in a zone (RFC 5782: an A record in 127.0.0.0/8 for the
reversed address under the zone) is refused at RCPT, except for mail to
postmaster (RFC 5321 4.5.1: a listed sender must still be able to reach a
human), or its message is filed into Junk, per zone.  Lookups start when
the client connects and run through the shared resolver, so they are
usually answered before the first RCPT.  A blocklist that does not answer
is skipped: a list's outage must not stop our mail, and so is one whose
answer is an error code (`classify`), logged once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailx.dns import DNSError, DNSVoidError
from mailx.text import Logger

log = Logger(namespace="mailx.dnsbl")


@dataclass(frozen=True)
class Listing:
    zone: str
    action: str  # "reject" | "junk"
    answer: str  # the 127.0.0.x code the list gave


def query_name(ip: str, zone: str) -> str:
    """``4.3.2.1.zone`` for IPv4, nibbles reversed for IPv6 (RFC 5782 2.1, 2.4)."""
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


# Answers that are the list talking about the query, not about the client.
# Spamhaus (https://docs.spamhaus.com/datasets/docs/source/40-real-world-usage/
# PublicMirrors/MTAs/020-Postfix.html): 127.255.255.252 typo in the zone name,
# .254 query through a public/open resolver, .255 excessive queries.  URIBL
# and others answer 127.0.0.1 to refuse a query; RFC 5782 2.1 says 127.0.0.1
# must never be a listing.  These mean "the list is unusable from here".
ERROR_CODES = {
    "127.0.0.1": "query refused (RFC 5782 2.1: 127.0.0.1 is never a listing)",
    "127.255.255.252": "typo in the blocklist zone name",
    "127.255.255.254": "query through a public or open resolver refused;"
    " use your own resolver (dns.nameservers)",
    "127.255.255.255": "excessive number of queries; the list wants a paid feed",
}
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERROR_NET = ipaddress.ip_network("127.255.255.0/24")


def classify(answers: Sequence[str]) -> tuple[str | None, str | None]:
    """``(listing, error)``: the first answer that means "listed", the first that is an error.

    RFC 5782 2.3: listings are 127.0.0.0/8.  An answer outside it (a
    resolver that rewrites NXDOMAIN to an ad server, say) or one of the
    `ERROR_CODES` is an error, never a listing: taking it for one would
    refuse every client.
    """
    code = error = None
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            error = error or answer
            continue
        if address not in _LOOPBACK or address in _ERROR_NET or answer in ERROR_CODES:
            error = error or answer
        elif code is None:
            code = answer
    return code, error


def error_meaning(code: str) -> str:
    """What an error answer means, for the log."""
    if code in ERROR_CODES:
        return ERROR_CODES[code]
    if code.startswith("127.255.255."):
        return "an error code of the list (127.255.255.0/24), not a listing"
    return "not in 127.0.0.0/8, so not a listing (RFC 5782 2.3); is the resolver rewriting answers?"


def exempt(ip: str) -> bool:
    """Loopback and unparseable peers (a UNIX socket) are never looked up."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return True


class Blocklists:
    """The configured zones over the shared resolver."""

    def __init__(self, resolver: Any, zones: Sequence[Any]) -> None:
        self.resolver = resolver
        self.zones = tuple(zones)
        # (zone, code) already logged: a list that refuses us says so on
        # every connection, and once per (re)load is enough to act on.
        self._reported: set[tuple[str, str]] = set()

    def check(self, ip: str) -> defer.Deferred:
        """Fires with the first `Listing` (in configuration order), or None."""
        if not self.zones or exempt(ip):
            return defer.succeed(None)
        lookups = [self._lookup(ip, zone) for zone in self.zones]
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(lambda results: next((r for r in results if r is not None), None))
        return d

    def _lookup(self, ip: str, zone: Any) -> defer.Deferred:
        def answered(answers: list[str]) -> Listing | None:
            code, error = classify(answers)
            if error is not None and code is None:
                self._report(zone.zone, error)
            return Listing(zone.zone, zone.action, code) if code else None

        def failed(failure: Any) -> None:
            if failure.check(DNSVoidError):
                return None  # NXDOMAIN or no A record: not listed
            if failure.check(DNSError):
                log.warn(
                    "dnsbl {zone} did not answer for {ip}: {error}",
                    zone=zone.zone,
                    ip=ip,
                    error=failure.getErrorMessage(),
                )
            else:
                log.failure("dnsbl lookup failed", failure)
            return None

        return self.resolver.lookup_a(query_name(ip, zone.zone)).addCallbacks(answered, failed)

    def _report(self, zone: str, code: str) -> None:
        if (zone, code) in self._reported:
            return
        self._reported.add((zone, code))
        log.error(
            "dnsbl {zone} answered {code}: {meaning}; treated as not listed"
            " (logged once per zone and code)",
            zone=zone,
            code=code,
            meaning=error_meaning(code),
        )
