# -*- test-case-name: tests.test_dnsbl -*-
"""DNS blocklists (``checks.dnsbl``), as Postfix's reject_rbl_client does it.

A client listed in a zone (RFC 5782: an A record in 127.0.0.0/8 for the
reversed address under the zone) is refused at RCPT, except for mail to
postmaster (RFC 5321 4.5.1: a listed sender must still be able to reach a
human), or its message is filed into Junk, per zone.  Lookups start when
the client connects and run through the shared resolver, so they are
usually answered before the first RCPT.  A blocklist that does not answer
is skipped: a list's outage must not stop our mail.
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


def listed(answers: Sequence[str]) -> str | None:
    """The first answer that means "listed".

    RFC 5782 2.3: listings are 127.0.0.0/8.  Spamhaus answers 127.255.255.x
    when it refuses the query (an open resolver, over quota): that is an
    error, not a listing, and must not refuse mail.
    """
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            continue
        if address in ipaddress.ip_network("127.0.0.0/8") and not answer.startswith("127.255.255."):
            return answer
    return None


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
            code = listed(answers)
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
