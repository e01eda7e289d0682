# -*- test-case-name: tests.test_check_limits -*-
"""Hostile DNS and hostile signatures against a running server (security review, issue 9).

A sender controls how slowly its DNS answers and how many DKIM signatures
it adds.  These tests play such senders from pretended addresses (PROXY
headers on a ``haproxy:`` listener) and check that the checks of a message
end by ``authentication.timeout`` with 451 4.7.5, that no client holds more
than its share of the DNS threads, that a client who hangs up is let go at
once, and that an honest client is served meanwhile.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailx.checks import Authenticator, CheckLimiter, client_key
from mailx.dns import Resolver
from mailx.smtp import replies
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import LineClient, in_thread, start_server

HONEST_IP = "203.0.113.5"
HOSTILE_IPS = ("192.0.2.1", "192.0.2.2")
# Each include answered just under the resolver's timeout of 1 s.
INCLUDES = 9
DELAY = 0.9


def slow_zone(count: int) -> dict[str, Any]:
    """SPF records for sender domains s0.slow.test ...: every include is slow."""
    zone: dict[str, Any] = {
        "honest.test": {"TXT": [f"v=spf1 ip4:{HONEST_IP} -all"]},
    }
    for n in range(count):
        includes = " ".join(f"include:i{k}.s{n}.slow.test" for k in range(INCLUDES))
        zone[f"s{n}.slow.test"] = {"TXT": [f"v=spf1 {includes} -all"]}
        for k in range(INCLUDES):
            zone[f"i{k}.s{n}.slow.test"] = {"TXT": ["v=spf1 -all"]}
    return zone


def submit(port: int, ip: str, mail_from: str, body: bytes = b"Hello.\r\n") -> LineClient:
    """Open a session from ``ip`` and send one message up to its final dot (blocking)."""
    client = LineClient(port, proxy_from=ip)
    assert client.reply()[0] == 220
    for line in (b"EHLO client.test", b"MAIL FROM:<" + mail_from.encode() + b">",
                 b"RCPT TO:<alice@example.test>", b"DATA"):
        code, text = client.command(line)
        assert code in (250, 354), (line, code, text)
    client.send(
        b"From: " + mail_from.encode() + b"\r\nSubject: t\r\n\r\n" + body + b".\r\n"
    )
    return client


def final_reply(client: LineClient) -> tuple[int, bytes, float]:
    """The reply to the end of data, and when it came (monotonic)."""
    try:
        code, text = client.reply()
    finally:
        client.close()
    return code, text, time.monotonic()


def wait_for(predicate: Any, timeout: float) -> defer.Deferred:
    """Poll ``predicate`` on the reactor until true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    def poll() -> Any:
        if predicate():
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        return task.deferLater(reactor, 0.05, poll)

    return defer.maybeDeferred(poll)


class SlowDNSTests(unittest.TestCase):
    """SPF whose every lookup answers just under the timeout."""

    def start(self, timeout: str, hostile_messages: int) -> Any:
        self.dns = serve_for_test(self, ttl=0)  # nothing cached: every message asks again
        self.dns.load(slow_zone(hostile_messages), ttl=0)
        for n in range(hostile_messages):
            self.dns.delay(f"s{n}.slow.test", DELAY)
            for k in range(INCLUDES):
                self.dns.delay(f"i{k}.s{n}.slow.test", DELAY)
        return start_server(
            self,
            {
                "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"]},
                "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "1s"},
                "authentication": {
                    "spf": True, "dkim": True, "dmarc": "enforce", "timeout": timeout
                },
            },
        )

    @defer.inlineCallbacks
    def test_hostile_senders_get_451_and_an_honest_one_is_served(self) -> None:
        # 2 addresses x 20 sessions: more than the 32 DNS threads, if they got them.
        count = 40
        server = self.start("8s", count)  # the includes would take 9 s
        limiter = server.service.context.authenticator.limiter

        def flood() -> list[LineClient]:
            return [
                submit(server.port, HOSTILE_IPS[n % 2], f"m{n}@s{n}.slow.test")
                for n in range(count)
            ]

        hostile = yield in_thread(flood)
        self.assertLessEqual(max(limiter.running.values()), 2)  # per client
        started = time.monotonic()
        honest = yield in_thread(submit, server.port, HONEST_IP, "alice@honest.test")
        code, _, answered = yield in_thread(final_reply, honest)
        self.assertEqual(code, 250)
        # Promptly: without the bounds it waits for the hostile checks' deadline.
        self.assertLess(answered - started, 4.0)
        self.assertEqual(len(server.messages("alice")), 1)

        outcomes = yield defer.gatherResults([in_thread(final_reply, c) for c in hostile])
        self.assertEqual({(code, text[:5]) for code, text, _ in outcomes}, {(451, b"4.7.5")})
        self.assertEqual(len(server.messages("alice")), 1)  # nothing hostile delivered
        # The threads come back: their lookups stopped at the deadline.
        yield wait_for(lambda: limiter.in_use == 0, 5)

    @defer.inlineCallbacks
    def test_client_that_hangs_up_during_checks_frees_its_slots(self) -> None:
        server = self.start("30s", 2)
        factory = server.service.factory
        limiter = server.service.context.authenticator.limiter
        clients = yield in_thread(
            lambda: [submit(server.port, HOSTILE_IPS[0], f"m{n}@s{n}.slow.test") for n in range(2)]
        )
        yield wait_for(lambda: limiter.in_use == 2, 5)
        self.assertEqual(len(factory.sessions), 2)
        hung_up = time.monotonic()
        for c in clients:
            c.close()
        # Seen at once though the checks wait on DNS (30 s deadline, 8 s of includes).
        yield wait_for(lambda: not factory.sessions, 3)
        # The lookups in flight end (1 s at most), the next ones are not asked.
        yield wait_for(lambda: limiter.in_use == 0, 4)
        self.assertLess(time.monotonic() - hung_up, 5)
        # And another message from that address is checked and delivered.
        self.dns.load({"ok.test": {"TXT": [f"v=spf1 ip4:{HOSTILE_IPS[0]} -all"]}})
        honest = yield in_thread(submit, server.port, HOSTILE_IPS[0], "bob@ok.test")
        code, _, _ = yield in_thread(final_reply, honest)
        self.assertEqual(code, 250)


class BogusSignaturesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ten_bogus_signatures_over_8_mib_while_another_client_is_served(self) -> None:
        dns = serve_for_test(self, {"honest.test": {"TXT": [f"v=spf1 ip4:{HONEST_IP} -all"]}})
        server = start_server(
            self,
            {
                "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"]},
                "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "1s"},
                "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
            },
        )
        signatures = b"".join(
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=signer.test;"
            b" s=s%d; h=from:subject; bh=%s; b=AAAA\r\n" % (n, b"A" * 43 + b"=")
            for n in range(10)
        )
        line = b"bogus  body \t line with  runs of   whitespace \r\n"
        body = line * (8 * 1024 * 1024 // len(line))

        def send_signed() -> tuple[int, bytes, float]:
            client = LineClient(server.port, proxy_from=HOSTILE_IPS[0])
            client.reply()
            for cmd in (b"EHLO c.test", b"MAIL FROM:<x@signer.test>",
                        b"RCPT TO:<alice@example.test>", b"DATA"):
                client.command(cmd)
            client.send(signatures + b"From: x@signer.test\r\nSubject: s\r\n\r\n")
            client.send(body + b".\r\n")
            return final_reply(client)

        started = time.monotonic()
        signed = in_thread(send_signed)
        honest = yield in_thread(submit, server.port, HONEST_IP, "alice@honest.test")
        code, _, answered = yield in_thread(final_reply, honest)
        self.assertEqual(code, 250)
        self.assertLess(answered - started, 10)
        code, _, done = yield signed
        self.assertEqual(code, 250)
        self.assertLess(done - started, 30)
        [stored] = [m for m in server.messages("alice") if b"signer.test" in m[:2000]]
        header = stored.split(b"\n\n", 1)[0].decode()
        self.assertEqual(header.count("dkim=fail"), 5)
        self.assertEqual(header.count("dkim=policy"), 5)
        self.assertFalse([q for q in dns.queries if "_domainkey" in q[0]])


class AuthenticatorDeadlineTests(unittest.TestCase):
    """`Authenticator.check` itself: the deadline, cancel(), the slots."""

    def setUp(self) -> None:
        self.dns = serve_for_test(self, slow_zone(1), ttl=0)
        for k in range(INCLUDES):
            self.dns.delay(f"i{k}.s0.slow.test", DELAY)
        resolver = Resolver(self.dns.nameservers, 1.0)
        config = SimpleNamespace(
            spf=True, dkim=True, dmarc="enforce", timeout=1.5, concurrency_per_ip=1
        )
        self.auth = Authenticator(resolver, config, "mx.example.test")

    def check(self, ip: str = HOSTILE_IPS[0]) -> defer.Deferred:
        message = b"From: m@s0.slow.test\r\nSubject: t\r\n\r\n"
        return self.auth.check(ip, "c.test", "m@s0.slow.test", message)

    @defer.inlineCallbacks
    def test_out_of_time_is_a_tempfail_with_451_4_7_5(self) -> None:
        started = time.monotonic()
        verdict = yield self.check()
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual((verdict.action, verdict.reply), ("tempfail", replies.DNS_TEMPFAIL))
        self.assertIn("did not finish within 1.5s", verdict.reason)
        yield wait_for(lambda: self.auth.limiter.in_use == 0, 2)

    @defer.inlineCallbacks
    def test_waiting_for_a_slot_counts_against_the_deadline(self) -> None:
        first, second = self.check(), self.check()  # one slot per client here
        self.assertEqual(self.auth.limiter.in_use, 1)
        verdicts = yield defer.gatherResults([first, second])
        self.assertEqual([v.action for v in verdicts], ["tempfail", "tempfail"])
        yield wait_for(lambda: self.auth.limiter.in_use == 0, 2)

    @defer.inlineCallbacks
    def test_cancel_drops_the_result_and_frees_the_slot(self) -> None:
        running, waiting = self.check(), self.check()
        for d in (running, waiting):
            d.addErrback(lambda f: f.trap(defer.CancelledError) and "cancelled")
        yield task.deferLater(reactor, 0.2, lambda: None)
        running.cancel()
        waiting.cancel()
        self.assertEqual(((yield running), (yield waiting)), ("cancelled", "cancelled"))
        # The lookup in flight ends (0.9 s), the next ones are not asked.
        yield wait_for(lambda: self.auth.limiter.in_use == 0, 1.4)


class CheckLimiterTests(unittest.TestCase):
    """The slots alone: bounds, turns, withdrawal."""

    def test_per_client_and_total_bounds(self) -> None:
        limiter = CheckLimiter(total=3, per_client=2)
        a = [limiter.acquire("a") for _ in range(3)]
        b = [limiter.acquire("b") for _ in range(2)]
        self.assertEqual([d.called for d in a], [True, True, False])
        self.assertEqual([d.called for d in b], [True, False])
        self.assertEqual((limiter.in_use, limiter.running), (3, {"a": 2, "b": 1}))
        limiter.release("a")
        self.assertTrue(a[2].called)  # a tie: who waited longest
        limiter.release("b")
        self.assertTrue(b[1].called)

    def test_freed_slot_goes_to_the_client_with_fewest_running(self) -> None:
        limiter = CheckLimiter(total=2, per_client=2)
        a = [limiter.acquire("a") for _ in range(4)]
        c = limiter.acquire("c")
        limiter.release("a")
        self.assertTrue(c.called)
        self.assertEqual([d.called for d in a], [True, True, False, False])

    def test_cancelled_wait_gives_up_its_place(self) -> None:
        limiter = CheckLimiter(total=1, per_client=1)
        limiter.acquire("a")
        waiting = limiter.acquire("b")
        waiting.addErrback(lambda f: f.trap(defer.CancelledError))
        waiting.cancel()
        then = limiter.acquire("c")
        limiter.release("a")
        self.assertTrue(then.called)
        self.assertEqual(limiter.in_use, 1)

    def test_ipv6_clients_share_their_64(self) -> None:
        self.assertEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:2:ffff::9"))
        self.assertNotEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"))
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")
