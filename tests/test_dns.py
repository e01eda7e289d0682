# -*- test-case-name: tests.test_dns -*-
"""mailx.dns.Resolver against a real DNS server on the loopback interface.

Lookups block, so each runs in a thread (``Resolver.call``) while the
reactor thread serves the zone; the tests wait on Deferreds.
"""

from __future__ import annotations

import time

import dns.message
import dns.query
import dns.resolver
import spf
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailx.dns import (
    MX,
    Deadline,
    DNSTemporaryError,
    DNSVoidError,
    NoDataError,
    NullMXError,
    NXDomainError,
    Resolver,
)
from mailx.testing.dnsserver import serve_for_test

ZONE = {
    "example.test": {
        "MX": [(20, "mx2.example.test"), (10, "mx1.example.test")],
        "TXT": ["v=spf1 -all", ("part one ", "part two")],
        "A": ["192.0.2.10"],
    },
    "mx1.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "mx2.example.test": {"A": ["192.0.2.2"]},
    "deep.sub.example.test": {"A": ["192.0.2.3"]},
    "alias.example.test": {"CNAME": ["example.test"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "noaddress.test": {"TXT": ["hello"]},
    "10.2.0.192.in-addr.arpa": {"PTR": ["example.test"]},
}


class FakeClock:
    """A monotonic clock the test moves by hand: cache expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ResolverTestCase(unittest.TestCase):
    timeout_seconds = 0.5

    def setUp(self) -> None:
        self.server = serve_for_test(self, ZONE)
        self.clock = FakeClock()
        self.resolver = Resolver(self.server.nameservers, self.timeout_seconds, clock=self.clock)

    def call(self, func, *args):
        return self.resolver.call(func, *args)

    @defer.inlineCallbacks
    def assertRaisesInThread(self, exc, func, *args):
        try:
            yield self.call(func, *args)
        except exc as e:
            return e
        self.fail(f"{func.__name__}{args} did not raise {exc.__name__}")


class LookupTests(ResolverTestCase):
    @defer.inlineCallbacks
    def test_txt_joins_the_strings_of_each_record(self):
        records = yield self.resolver.lookup_txt("example.test")
        self.assertEqual(sorted(records), ["part one part two", "v=spf1 -all"])

    @defer.inlineCallbacks
    def test_txt_longer_than_255_octets_arrives_whole(self):
        key = "p=" + "A" * 700
        self.server.set("sel._domainkey.example.test", "TXT", [key])
        self.assertEqual((yield self.resolver.lookup_txt("sel._domainkey.example.test")), [key])

    @defer.inlineCallbacks
    def test_addresses(self):
        self.assertEqual((yield self.resolver.lookup_a("mx1.example.test")), ["192.0.2.1"])
        self.assertEqual((yield self.resolver.lookup_aaaa("mx1.example.test")), ["2001:db8::1"])

    @defer.inlineCallbacks
    def test_mx_sorted_by_preference(self):
        records = yield self.resolver.call(self.resolver.mx, "example.test")
        self.assertEqual(records, [MX(10, "mx1.example.test"), MX(20, "mx2.example.test")])

    @defer.inlineCallbacks
    def test_ptr_of_an_address(self):
        self.assertEqual((yield self.resolver.call(self.resolver.ptr, "192.0.2.10")), ["example.test"])

    @defer.inlineCallbacks
    def test_names_are_case_insensitive_and_may_end_in_a_dot(self):
        self.assertEqual((yield self.resolver.lookup_a("MX1.Example.TEST.")), ["192.0.2.1"])

    @defer.inlineCallbacks
    def test_cname_to_data_the_server_did_not_include(self):
        records = yield self.resolver.lookup_txt("alias.example.test")
        self.assertIn("v=spf1 -all", records)
        answer = yield self.resolver.call(self.resolver.query, "alias.example.test", "TXT")
        self.assertEqual(answer.canonical_name, "example.test")

    def test_nxdomain_is_void(self):
        d = self.assertRaisesInThread(NXDomainError, self.resolver.a, "missing.example.test")
        return d.addCallback(lambda e: self.assertIsInstance(e, DNSVoidError))

    def test_nodata_is_void_but_not_nxdomain(self):
        d = self.assertRaisesInThread(NoDataError, self.resolver.aaaa, "mx2.example.test")
        return d.addCallback(lambda e: self.assertIsInstance(e, DNSVoidError))

    def test_empty_non_terminal_is_nodata(self):
        # RFC 8020: sub.example.test exists because deep.sub.example.test does.
        return self.assertRaisesInThread(NoDataError, self.resolver.a, "sub.example.test")

    def test_invalid_name_is_nxdomain(self):
        return self.assertRaisesInThread(NXDomainError, self.resolver.a, "a..example.test")

    def test_timeout_is_temporary(self):
        self.server.timeout("slow.test")
        started = time.monotonic()
        d = self.assertRaisesInThread(DNSTemporaryError, self.resolver.txt, "slow.test")

        def check(e):
            self.assertIn("timed out", str(e))
            self.assertLess(time.monotonic() - started, self.timeout_seconds + 1.5)

        return d.addCallback(check)

    def test_servfail_is_temporary(self):
        self.server.servfail("broken.test")
        d = self.assertRaisesInThread(DNSTemporaryError, self.resolver.txt, "broken.test")
        return d.addCallback(lambda e: self.assertIn("SERVFAIL", str(e)))

    @defer.inlineCallbacks
    def test_timeout_of_one_type_only(self):
        self.server.timeout("example.test", "TXT")
        self.assertEqual((yield self.resolver.lookup_a("example.test")), ["192.0.2.10"])
        yield self.assertRaisesInThread(DNSTemporaryError, self.resolver.txt, "example.test")

    @defer.inlineCallbacks
    def test_reactor_keeps_running_during_a_slow_lookup(self):
        self.server.timeout("slow.test")
        ticks = []
        loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        loop.start(0.05)
        try:
            yield self.assertRaisesInThread(DNSTemporaryError, self.resolver.txt, "slow.test")
        finally:
            loop.stop()
        self.assertGreater(len(ticks), 3)

    def test_tcp_is_served_on_the_same_port(self):
        query = dns.message.make_query("example.test", "A")

        def ask():
            return dns.query.tcp(query, "127.0.0.1", port=self.server.port, timeout=2)

        d = self.call(ask)
        return d.addCallback(lambda r: self.assertEqual(r.answer[0][0].address, "192.0.2.10"))


class MailExchangerTests(ResolverTestCase):
    @defer.inlineCallbacks
    def test_mx_records(self):
        hosts = yield self.resolver.lookup_mail_exchangers("example.test")
        self.assertEqual([h.exchange for h in hosts], ["mx1.example.test", "mx2.example.test"])

    @defer.inlineCallbacks
    def test_no_mx_means_the_domain_itself(self):
        # RFC 5321 5.1: the implicit MX.
        hosts = yield self.resolver.lookup_mail_exchangers("mx1.example.test")
        self.assertEqual(hosts, [MX(0, "mx1.example.test", implicit=True)])

    def test_null_mx_refuses(self):
        # RFC 7505.
        return self.assertRaisesInThread(NullMXError, self.resolver.mail_exchangers, "nullmx.test")

    @defer.inlineCallbacks
    def test_null_mx_among_real_ones_is_skipped(self):
        self.server.set("mixed.test", "MX", [(0, "."), (10, "mx1.example.test")])
        hosts = yield self.resolver.lookup_mail_exchangers("mixed.test")
        self.assertEqual(hosts, [MX(10, "mx1.example.test")])

    def test_nonexistent_domain(self):
        return self.assertRaisesInThread(
            NXDomainError, self.resolver.mail_exchangers, "missing.example.test"
        )


class CacheTests(ResolverTestCase):
    @defer.inlineCallbacks
    def test_answer_cached_for_its_ttl(self):
        self.server.set("ttl.test", "A", ["192.0.2.1"], ttl=60)
        self.assertEqual((yield self.resolver.lookup_a("ttl.test")), ["192.0.2.1"])
        self.server.set("ttl.test", "A", ["192.0.2.2"], ttl=60)
        self.clock.now += 59
        self.assertEqual((yield self.resolver.lookup_a("ttl.test")), ["192.0.2.1"])
        self.assertEqual(self.server.queries.count(("ttl.test", "A")), 1)
        self.clock.now += 2
        self.assertEqual((yield self.resolver.lookup_a("ttl.test")), ["192.0.2.2"])
        self.assertEqual(self.server.queries.count(("ttl.test", "A")), 2)

    @defer.inlineCallbacks
    def test_ttl_zero_is_not_cached(self):
        self.server.set("zero.test", "A", ["192.0.2.1"], ttl=0)
        yield self.resolver.lookup_a("zero.test")
        yield self.resolver.lookup_a("zero.test")
        self.assertEqual(self.server.queries.count(("zero.test", "A")), 2)

    @defer.inlineCallbacks
    def test_nxdomain_cached_for_the_soa_minimum(self):
        # The server's SOA MINIMUM is 60 s (RFC 2308 5).
        yield self.assertRaisesInThread(NXDomainError, self.resolver.a, "later.test")
        self.server.set("later.test", "A", ["192.0.2.9"])
        self.clock.now += 59
        yield self.assertRaisesInThread(NXDomainError, self.resolver.a, "later.test")
        self.clock.now += 2
        self.assertEqual((yield self.resolver.lookup_a("later.test")), ["192.0.2.9"])

    @defer.inlineCallbacks
    def test_nodata_cached_negatively(self):
        yield self.assertRaisesInThread(NoDataError, self.resolver.aaaa, "mx2.example.test")
        yield self.assertRaisesInThread(NoDataError, self.resolver.aaaa, "mx2.example.test")
        self.assertEqual(self.server.queries.count(("mx2.example.test", "AAAA")), 1)

    @defer.inlineCallbacks
    def test_temporary_failures_are_not_cached(self):
        self.server.servfail("flaky.test")
        yield self.assertRaisesInThread(DNSTemporaryError, self.resolver.a, "flaky.test")
        self.server.heal("flaky.test")
        self.server.set("flaky.test", "A", ["192.0.2.5"])
        self.assertEqual((yield self.resolver.lookup_a("flaky.test")), ["192.0.2.5"])

    def test_cached_answers_come_at_once_without_a_thread(self):
        first = self.resolver.lookup_a("example.test")
        self.assertNoResult(first)  # asked in a thread
        self.resolver.call = lambda *a: self.fail("a cached answer went to a thread")
        d = first.addCallback(lambda _: self.resolver.lookup_a("example.test"))
        d.addCallback(lambda _: self.assertEqual(
            self.successResultOf(self.resolver.lookup_a("example.test")), ["192.0.2.10"]))
        return d

    @defer.inlineCallbacks
    def test_cached_negative_answer_fails_at_once(self):
        yield self.assertFailure(self.resolver.lookup_aaaa("mx2.example.test"), NoDataError)
        d = self.resolver.lookup_aaaa("mx2.example.test")
        self.failureResultOf(d, NoDataError)
        self.assertEqual(self.server.queries.count(("mx2.example.test", "AAAA")), 1)

    @defer.inlineCallbacks
    def test_cache_is_per_resolver(self):
        yield self.resolver.lookup_a("example.test")
        other = Resolver(self.server.nameservers, self.timeout_seconds)
        yield other.lookup_a("example.test")
        self.assertEqual(self.server.queries.count(("example.test", "A")), 2)


class AdapterTests(ResolverTestCase):
    @defer.inlineCallbacks
    def test_spf_lookup_shapes(self):
        txt = yield self.call(self.resolver.spf_lookup, "example.test", "TXT")
        self.assertIn((("example.test", "TXT"), (b"part one ", b"part two")), txt)
        mx = yield self.call(self.resolver.spf_lookup, "example.test", "MX")
        self.assertIn((("example.test", "MX"), (10, "mx1.example.test")), mx)

    @defer.inlineCallbacks
    def test_spf_lookup_void_is_empty(self):
        self.assertEqual((yield self.call(self.resolver.spf_lookup, "missing.test", "A")), [])

    def test_spf_lookup_timeout_is_temperror(self):
        self.server.timeout("slow.test")
        return self.assertRaisesInThread(
            spf.TempError, self.resolver.spf_lookup, "slow.test", "TXT"
        )

    @defer.inlineCallbacks
    def test_dkim_dnsfunc(self):
        self.server.set("s._domainkey.example.test", "TXT", [("v=DKIM1; ", "p=abc")])
        found = yield self.call(self.resolver.dkim_dnsfunc, b"s._domainkey.example.test.")
        self.assertEqual(found, b"v=DKIM1; p=abc")
        self.assertIsNone((yield self.call(self.resolver.dkim_dnsfunc, b"x._domainkey.test.")))

    def test_dkim_dnsfunc_timeout_raises(self):
        self.server.timeout("slow.test")
        return self.assertRaisesInThread(
            DNSTemporaryError, self.resolver.dkim_dnsfunc, b"slow.test."
        )


class GlobalStateTests(unittest.SynchronousTestCase):
    def test_default_resolver_untouched(self):
        before = dns.resolver.default_resolver
        lookup = spf.DNSLookup
        resolver = Resolver([("127.0.0.1", 5353)], 1.0)
        self.assertIs(dns.resolver.default_resolver, before)
        self.assertIs(spf.DNSLookup, lookup)
        self.assertEqual(resolver.nameservers, (("127.0.0.1", 5353),))
        self.assertEqual(
            [(n.address, n.port) for n in resolver._resolver.nameservers], [("127.0.0.1", 5353)]
        )

    def test_system_configuration_when_no_nameservers(self):
        resolver = Resolver((), 1.0)
        self.assertIsNot(resolver._resolver, dns.resolver.default_resolver)
        self.assertTrue(resolver._resolver.nameservers)


class LoopbackServerTests(unittest.TestCase):
    def test_ports_match(self):
        server = serve_for_test(self, {})
        self.assertEqual(server.nameservers, (("127.0.0.1", server.port),))
        self.assertEqual(server._tcp.getHost().port, server.port)

    @defer.inlineCallbacks
    def test_records_change_during_a_test(self):
        server = serve_for_test(self, {"a.test": {"A": ["192.0.2.1"]}})
        resolver = Resolver(server.nameservers, 1.0)
        self.assertEqual((yield resolver.lookup_a("a.test")), ["192.0.2.1"])
        server.remove("a.test")
        resolver.clear_cache()
        try:
            yield resolver.lookup_a("a.test")
        except NXDomainError:
            pass
        else:
            self.fail("a removed name still resolves")

    def test_reactor_is_the_global_one(self):
        # Servers started by tests live in the reactor trial runs.
        server = serve_for_test(self, {}, reactor=reactor)
        self.assertTrue(server.port)


class DeadlineTests(unittest.TestCase):
    """Lookups under a `Deadline`: bounded by it, refused once it has passed."""

    def setUp(self) -> None:
        self.server = serve_for_test(self, ZONE)
        self.resolver = Resolver(self.server.nameservers, 5.0)

    @defer.inlineCallbacks
    def test_lookup_waits_only_until_the_deadline(self):
        self.server.timeout("slow.test")
        started = time.monotonic()
        try:
            yield self.resolver.call_within(Deadline(0.3), self.resolver.txt, "slow.test")
        except DNSTemporaryError:
            pass
        else:
            self.fail("no timeout")
        self.assertLess(time.monotonic() - started, 2.5)  # not the 5 s timeout

    @defer.inlineCallbacks
    def test_slow_answers_each_under_the_timeout_add_up_to_the_deadline_only(self):
        names = [f"n{i}.example.test" for i in range(6)]
        self.server.load({n: {"TXT": ["x"]} for n in names})
        for n in names:
            self.server.delay(n, 0.4)
        asked = []

        def lookups():
            for n in names:
                try:
                    asked.append(self.resolver.txt(n))
                except DNSTemporaryError as e:
                    asked.append(str(e))
            return asked

        started = time.monotonic()
        yield self.resolver.call_within(Deadline(1.0), lookups)
        self.assertLess(time.monotonic() - started, 2.0)  # not 6 x 0.4 s
        self.assertEqual(asked[0], ["x"])
        self.assertIn("not asked, the check is out of time", asked[-1])
        self.assertLess(len(self.server.queries), len(names))

    @defer.inlineCallbacks
    def test_cancelled_deadline_fails_the_next_lookup_at_once(self):
        deadline = Deadline(60)
        deadline.cancel()
        try:
            yield self.resolver.call_within(deadline, self.resolver.txt, "example.test")
        except DNSTemporaryError as e:
            self.assertIn("abandoned", str(e))
        else:
            self.fail("looked up")
        self.assertEqual(self.server.queries, [])

    @defer.inlineCallbacks
    def test_cached_answers_still_served_and_the_thread_forgets_the_deadline(self):
        yield self.resolver.lookup_txt("example.test")
        deadline = Deadline(60)
        deadline.cancel()
        records = yield self.resolver.call_within(deadline, self.resolver.txt, "example.test")
        self.assertEqual(len(records), 2)
        # A later lookup in the same pool is not bound by that deadline.
        yield self.resolver.lookup_a("mx2.example.test")
