# -*- test-case-name: tests.test_ptr -*-
"""The client's forward-confirmed name in Received and the log (mailx.checks.ptr).

Clients claim their address through PROXY; the loopback DNS server serves
the in-addr.arpa and ip6.arpa zones.
"""

from __future__ import annotations

import time

from twisted.internet import defer, task
from twisted.trial import unittest

from mailx.checks.ptr import NameLookups, confirmed_name
from mailx.dns import Resolver
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import LineClient, capture_log, in_thread, start_server

V6 = "2001:db8::25"
V6_REVERSE = "5.2.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.ip6.arpa"

ZONES = {
    # Forward-confirmed.
    "9.113.0.203.in-addr.arpa": {"PTR": ["Mail.Sender.Test"]},
    "mail.sender.test": {"A": ["203.0.113.9"]},
    # A PTR that claims someone else's name: its A is elsewhere.
    "10.113.0.203.in-addr.arpa": {"PTR": ["mx.bigmail.test"]},
    "mx.bigmail.test": {"A": ["192.0.2.1"]},
    # The second of two names confirms.
    "13.113.0.203.in-addr.arpa": {"PTR": ["nowhere.test", "ok.sender.test"]},
    "ok.sender.test": {"A": ["203.0.113.13"]},
    V6_REVERSE: {"PTR": ["v6.sender.test"]},
    "v6.sender.test": {"AAAA": [V6]},
}


class ConfirmedNameTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = serve_for_test(self, ZONES)
        self.resolver = Resolver([("127.0.0.1", self.dns.port)], 2.0)

    @defer.inlineCallbacks
    def test_names(self) -> None:
        expected = {
            "203.0.113.9": "mail.sender.test",
            "203.0.113.10": None,  # not confirmed
            "203.0.113.11": None,  # no PTR
            "203.0.113.13": "ok.sender.test",
            V6: "v6.sender.test",
        }
        for ip, name in expected.items():
            found = yield in_thread(confirmed_name, self.resolver, ip)
            self.assertEqual(found, name, ip)


class _StuckResolver:
    """Every lookup hangs until the test fires it."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred] = []

    def call(self, func: object, *args: object) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append(d)
        return d


class InFlightTests(unittest.TestCase):
    def test_past_the_limit_clients_are_unknown_without_a_lookup(self) -> None:
        resolver, clock = _StuckResolver(), task.Clock()
        names = NameLookups(resolver, clock, limit=2)
        first, second = names.look_up("192.0.2.1"), names.look_up("192.0.2.2")
        third = names.look_up("192.0.2.3")
        self.assertEqual(len(resolver.calls), 2)
        self.assertIsNone(self.successResultOf(third))
        # Given up on after WAIT, but the thread still holds its slot...
        clock.advance(10)
        self.assertIsNone(self.successResultOf(first))
        names.look_up("192.0.2.4")
        self.assertEqual(len(resolver.calls), 2)
        # ...until its lookup really ends.
        resolver.calls[0].callback("late.example.test")
        resolver.calls[1].callback(None)
        self.assertIsNone(self.successResultOf(second))
        names.look_up("192.0.2.5")
        self.assertEqual(len(resolver.calls), 3)


class ReceivedTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = serve_for_test(self, ZONES)
        self.log = capture_log(self)
        self.server = start_server(
            self,
            {
                "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"]},
                "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "10s"},
                "checks": {"reverse_dns": True},
            },
        )

    def send(self, ip: str, wait_for_name: bool = True) -> defer.Deferred:
        """One message from ``ip``; waits (bounded) for the name to be logged first."""

        def run() -> tuple[list[tuple[int, bytes]], float]:
            started = time.monotonic()
            client = LineClient(self.server.port, proxy_from=ip)
            try:
                replies = [client.reply()]
                deadline = time.monotonic() + 10
                while wait_for_name and time.monotonic() < deadline:
                    if any(f"client {ip} is " in line for line in list(self.log)):
                        break
                    time.sleep(0.02)
                for line in (b"EHLO c.test", b"MAIL FROM:<s@sender.test>",
                             b"RCPT TO:<alice@example.test>", b"DATA",
                             b"Subject: ptr\r\n\r\nbody\r\n.", b"QUIT"):
                    replies.append(client.command(line))
                return replies, time.monotonic() - started
            finally:
                client.close()

        return in_thread(run)

    def received(self) -> bytes:
        [stored] = self.server.messages("alice")
        start = stored.index(b"Received: from ")
        return stored[start:stored.index(b";", start)]

    @defer.inlineCallbacks
    def test_confirmed_name_is_in_received_and_the_log(self) -> None:
        replies, _ = yield self.send("203.0.113.9")
        self.assertEqual(replies[5][0], 250)
        self.assertIn(b"from c.test (mail.sender.test [203.0.113.9])", self.received())
        self.assertTrue(any("client 203.0.113.9 is mail.sender.test" in x for x in self.log))
        self.assertTrue(any("client=mail.sender.test[203.0.113.9]" in x for x in self.log))

    @defer.inlineCallbacks
    def test_unconfirmed_name_is_unknown(self) -> None:
        replies, _ = yield self.send("203.0.113.10")
        self.assertEqual(replies[5][0], 250)
        self.assertIn(b"from c.test (unknown [203.0.113.10])", self.received())
        self.assertNotIn(b"bigmail", self.server.messages("alice")[0])

    @defer.inlineCallbacks
    def test_lookup_that_hangs_delays_nobody(self) -> None:
        # The PTR never answers (10 s DNS timeout): the message is taken at
        # once with "unknown", and another client is served meanwhile.
        self.dns.timeout("12.113.0.203.in-addr.arpa")
        hung = self.send("203.0.113.12", wait_for_name=False)
        other = self.send("203.0.113.9")
        (replies, elapsed), (other_replies, _) = yield defer.gatherResults([hung, other])
        self.assertEqual(replies[5][0], 250)
        self.assertEqual(other_replies[5][0], 250)
        self.assertLess(elapsed, 8)
        received = [m for m in self.server.messages("alice") if b"[203.0.113.12]" in m]
        self.assertIn(b"(unknown [203.0.113.12])", received[0])
