# -*- test-case-name: tests.test_spf_memory -*-
"""The Authenticator remembers SPF results briefly, per client, HELO and sender."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailx.checks import SPF_MEMORY, Authenticator
from mailx.config import AuthenticationConfig
from mailx.dns import NotCached, Resolver
from mailx.testing.dnsserver import serve_for_test

MESSAGE = b"From: a@sender.test\r\nSubject: x\r\n\r\nbody\r\n"


class SPFMemoryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = serve_for_test(
            self, {"sender.test": {"TXT": ["v=spf1 ip4:203.0.113.0/24 -all"]}}
        )
        self.now = [1000.0]
        self.authenticator = Authenticator(
            Resolver(self.dns.nameservers, 0.5),
            AuthenticationConfig(spf=True, dkim=False, dmarc="off", timeout=30.0, concurrency_per_ip=2),
            "mx.test",
            clock=lambda: self.now[0],
        )

    def check(self, ip: str = "203.0.113.5", helo: str = "h.test") -> defer.Deferred:
        return self.authenticator.check(ip, helo, "a@sender.test", MESSAGE)

    def evaluations(self) -> int:
        """How many SPF evaluations reached the record (the resolver caches the rest)."""
        self.authenticator.resolver.clear_cache()
        return len(self.dns.queries)

    @defer.inlineCallbacks
    def test_same_client_and_sender_is_evaluated_once(self) -> None:
        first = yield self.check()
        queries = self.evaluations()
        second = yield self.check()
        self.assertEqual(self.evaluations(), queries)
        self.assertEqual((first.spf.result, second.spf.result), ("pass", "pass"))

    @defer.inlineCallbacks
    def test_another_client_is_evaluated_on_its_own(self) -> None:
        yield self.check()
        queries = self.evaluations()
        other = yield self.check(ip="192.0.2.1")
        self.assertGreater(self.evaluations(), queries)
        self.assertEqual(other.spf.result, "fail")

    @defer.inlineCallbacks
    def test_memory_expires(self) -> None:
        yield self.check()
        queries = self.evaluations()
        self.now[0] += SPF_MEMORY + 1
        yield self.check()
        self.assertGreater(self.evaluations(), queries)

    @defer.inlineCallbacks
    def test_temporary_errors_are_not_remembered(self) -> None:
        self.dns.timeout("sender.test")
        first = yield self.check()
        self.assertEqual(first.spf.result, "temperror")
        self.dns.heal("sender.test")
        self.authenticator.resolver.clear_cache()
        second = yield self.check()
        self.assertEqual(second.spf.result, "pass")


class FromCacheTests(unittest.TestCase):
    """Checks run on the reactor thread only when every answer is already cached."""

    def setUp(self) -> None:
        self.dns = serve_for_test(self, {"sender.test": {"TXT": ["v=spf1 -all"]}})
        self.resolver = Resolver(self.dns.nameservers, 0.5)

    @defer.inlineCallbacks
    def test_a_miss_raises_not_cached_and_sends_no_query(self) -> None:
        with self.assertRaises(NotCached):
            self.resolver.from_cache(self.resolver.txt, "sender.test")
        self.assertEqual(self.dns.queries, [])
        yield self.resolver.lookup_txt("sender.test")
        self.assertEqual(self.resolver.from_cache(self.resolver.txt, "sender.test"), ["v=spf1 -all"])

    def test_a_swallowed_miss_still_counts(self) -> None:
        def careless() -> str:
            try:
                self.resolver.txt("sender.test")
            except BaseException:  # as pyspf's bare except: clauses do
                pass
            return "result built on a missing answer"

        with self.assertRaises(NotCached):
            self.resolver.from_cache(careless)
