# -*- test-case-name: tests.test_ptr -*-
"""The client's name, as Postfix's smtpd finds it: PTR, then forward-confirmed.

A PTR record is the address owner's claim; anyone can publish
``google.com`` for their own address.  Only a name whose A/AAAA records
include the client's address (forward-confirmed reverse DNS, FCrDNS) goes
into ``Received: from HELO (NAME [IP])`` (RFC 5321 4.4 TCP-info) and the
log; anything else is ``unknown``, as Postfix writes it.

The lookup starts at connect, in the DNS thread pool, and nothing waits for
it: if it has not answered by the time the Received field is written (or
within `WAIT`), the name is ``unknown``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailx.dns import DNSError

log = Logger(namespace="mailx.ptr")

# Like Postfix, only the first few PTR names are tried: each costs a lookup.
MAX_NAMES = 3
# How long a session listens for the answer at all; later answers are dropped.
WAIT = 5.0
# Lookups under way at once (the DNS pool has 32 threads; SPF needs most).
MAX_IN_FLIGHT = 16
# A host name as it may appear in a header (RFC 1123 2.1 labels, and the
# underscore some PTRs carry); anything else in a PTR is not a name for us.
_HOSTNAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)+\Z")


def confirmed_name(resolver: Any, ip: str) -> str | None:
    """The first PTR name of ``ip`` whose A/AAAA records include ``ip``; blocking."""
    address = ipaddress.ip_address(ip)
    try:
        names = resolver.ptr(ip)
    except DNSError:
        return None
    forward = resolver.a if address.version == 4 else resolver.aaaa
    for name in names[:MAX_NAMES]:
        if not _HOSTNAME.match(name):
            continue
        try:
            addresses = forward(name)
        except DNSError:
            continue
        if any(_same(address, a) for a in addresses):
            return name
    return None


def _same(address: Any, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


class NameLookups:
    """The clients' name lookups of one configuration, at most ``limit`` at a time.

    Each lookup holds a DNS thread for up to four queries; past the limit a
    client is simply ``unknown``, so a flood of connections from addresses
    with slow reverse DNS cannot take the threads SPF and DKIM need.
    """

    def __init__(self, resolver: Any, reactor: Any, limit: int = MAX_IN_FLIGHT) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.limit = limit
        self.in_flight = 0

    def look_up(self, ip: str, wait: float = WAIT) -> defer.Deferred:
        """Fires with the confirmed name or None, within ``wait`` seconds; never fails."""
        if self.in_flight >= self.limit:
            return defer.succeed(None)
        self.in_flight += 1
        d = self.resolver.call(confirmed_name, self.resolver, ip)

        def done(result: Any) -> Any:
            self.in_flight -= 1  # when the thread is free, not when we stop waiting
            return result

        d.addBoth(done)
        waited: defer.Deferred = defer.Deferred()
        d.chainDeferred(waited)
        waited.addTimeout(wait, self.reactor, onTimeoutCancel=lambda result, timeout: None)

        def failed(failure: Any) -> None:
            log.failure("reverse lookup of {ip} failed", failure, ip=ip)
            return None

        return waited.addErrback(failed)
