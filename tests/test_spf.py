# -*- test-case-name: tests.test_spf -*-
"""SPF (RFC 7208) through mailx.checks.spf, against the loopback DNS server."""

from __future__ import annotations

import spf
from twisted.internet import defer
from twisted.trial import unittest

from mailx.checks.spf import check_spf
from mailx.dns import Resolver
from mailx.testing.dnsserver import serve_for_test

ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "fail.test": {"TXT": ["v=spf1 -all"]},
    "softfail.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "nospf.test": {"TXT": ["some other record"]},
    "syntax.test": {"TXT": ["v=spf1 ip4:192.0.2.0/33 -all"]},
    "two.test": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
    "include.test": {"TXT": ["v=spf1 include:pass.test -all"]},
    "mx.test": {"TXT": ["v=spf1 mx -all"], "MX": [(10, "mail.mx.test")]},
    "mail.mx.test": {"A": ["198.51.100.7"], "AAAA": ["2001:db8::7"]},
    "helo.example.test": {"TXT": ["v=spf1 a -all"], "A": ["203.0.113.5"]},
    # RFC 7208 4.6.4: 11 lookups, one too many (each include is one).
    "limit.test": {
        "TXT": ["v=spf1 " + " ".join(f"include:l{i}.test" for i in range(11)) + " -all"]
    },
    # Three void lookups, one over the limit of two.
    "void.test": {"TXT": ["v=spf1 a:v1.test a:v2.test a:v3.test ip4:192.0.2.1 -all"]},
    "twovoid.test": {"TXT": ["v=spf1 a:v1.test a:v2.test ip4:192.0.2.1 -all"]},
    "exp.test": {"TXT": ["v=spf1 -all exp=why.exp.test"]},
    "why.exp.test": {"TXT": ["%{i} may not send for %{d}"]},
    "dnsinclude.test": {"TXT": ["v=spf1 include:slow.test -all"]},
}
for _i in range(11):
    ZONE[f"l{_i}.test"] = {"TXT": ["v=spf1 ?all" if _i < 10 else "v=spf1 ip4:192.0.2.1 ?all"]}


class SPFTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = serve_for_test(self, ZONE)
        self.resolver = Resolver(self.server.nameservers, 0.5)

    def check(self, ip, mail_from, helo="client.example.net", **kwargs):
        return self.resolver.call(check_spf, self.resolver, ip, helo, mail_from, **kwargs)

    @defer.inlineCallbacks
    def assertResult(self, expected, ip, mail_from, helo="client.example.net"):
        result = yield self.check(ip, mail_from, helo)
        self.assertEqual(result.result, expected, result.reason)
        return result

    def test_pass(self):
        return self.assertResult("pass", "192.0.2.1", "alice@pass.test")

    def test_fail(self):
        return self.assertResult("fail", "192.0.2.1", "alice@fail.test")

    def test_softfail(self):
        return self.assertResult("softfail", "192.0.2.1", "alice@softfail.test")

    def test_neutral(self):
        return self.assertResult("neutral", "192.0.2.1", "alice@neutral.test")

    def test_none_without_record(self):
        return self.assertResult("none", "192.0.2.1", "alice@nospf.test")

    def test_none_for_nonexistent_domain(self):
        return self.assertResult("none", "192.0.2.1", "alice@missing.test")

    def test_permerror_on_syntax(self):
        return self.assertResult("permerror", "192.0.2.1", "alice@syntax.test")

    def test_permerror_on_two_records(self):
        # RFC 7208 4.5.
        return self.assertResult("permerror", "192.0.2.1", "alice@two.test")

    @defer.inlineCallbacks
    def test_permerror_past_ten_lookups(self):
        result = yield self.assertResult("permerror", "192.0.2.1", "alice@limit.test")
        self.assertIn("DNS lookups", result.reason)

    @defer.inlineCallbacks
    def test_permerror_past_two_void_lookups(self):
        result = yield self.assertResult("permerror", "192.0.2.1", "alice@void.test")
        self.assertIn("Void lookup limit", result.reason)

    def test_two_void_lookups_are_allowed(self):
        return self.assertResult("pass", "192.0.2.1", "alice@twovoid.test")

    @defer.inlineCallbacks
    def test_temperror_on_timeout(self):
        self.server.timeout("slow.test")
        result = yield self.assertResult("temperror", "192.0.2.1", "alice@slow.test")
        self.assertIn("timed out", result.reason)

    def test_temperror_on_timeout_inside_include(self):
        self.server.timeout("slow.test")
        return self.assertResult("temperror", "192.0.2.1", "alice@dnsinclude.test")

    def test_temperror_on_servfail(self):
        self.server.servfail("pass.test")
        return self.assertResult("temperror", "192.0.2.1", "alice@pass.test")

    def test_include(self):
        return self.assertResult("pass", "192.0.2.77", "bob@include.test")

    def test_mx_mechanism_ipv4_and_ipv6(self):
        return defer.gatherResults(
            [
                self.assertResult("pass", "198.51.100.7", "bob@mx.test"),
                self.assertResult("pass", "2001:db8::7", "bob@mx.test"),
                self.assertResult("fail", "2001:db8::8", "bob@mx.test"),
            ]
        )

    @defer.inlineCallbacks
    def test_mail_from_identity(self):
        result = yield self.assertResult("pass", "192.0.2.1", "Alice@PASS.test")
        self.assertEqual((result.identity, result.domain), ("mailfrom", "pass.test"))
        self.assertEqual(result.sender, "Alice@PASS.test")

    @defer.inlineCallbacks
    def test_null_sender_checks_helo(self):
        # RFC 7208 2.4: postmaster@<HELO> for the null reverse-path.
        result = yield self.assertResult("pass", "203.0.113.5", "", helo="helo.example.test")
        self.assertEqual(result.identity, "helo")
        self.assertEqual(result.domain, "helo.example.test")
        self.assertEqual(result.sender, "postmaster@helo.example.test")

    @defer.inlineCallbacks
    def test_null_sender_helo_fail(self):
        yield self.assertResult("fail", "203.0.113.6", "", helo="helo.example.test")

    @defer.inlineCallbacks
    def test_null_sender_without_helo(self):
        result = yield self.assertResult("none", "203.0.113.5", "", helo=None)
        self.assertEqual(result.domain, "")

    @defer.inlineCallbacks
    def test_explanation_on_fail(self):
        # RFC 7208 6.2: the exp= text, macros expanded.
        result = yield self.check("192.0.2.9", "x@exp.test")
        self.assertEqual(result.result, "fail")
        self.assertEqual(result.explanation, "192.0.2.9 may not send for exp.test")

    @defer.inlineCallbacks
    def test_pass_has_no_explanation(self):
        result = yield self.check("192.0.2.1", "x@pass.test")
        self.assertIsNone(result.explanation)

    @defer.inlineCallbacks
    def test_invalid_client_address(self):
        result = yield self.check("not-an-ip", "x@pass.test")
        self.assertEqual(result.result, "permerror")

    @defer.inlineCallbacks
    def test_lookups_use_our_server_and_cache(self):
        yield self.check("192.0.2.1", "x@pass.test")
        yield self.check("192.0.2.2", "x@pass.test")
        self.assertEqual(self.server.queries.count(("pass.test", "TXT")), 1)

    @defer.inlineCallbacks
    def test_pyspf_global_lookup_untouched(self):
        before = spf.DNSLookup
        yield self.check("192.0.2.1", "x@pass.test")
        self.assertIs(spf.DNSLookup, before)
