# -*- test-case-name: tests.test_dmarc -*-
"""DMARC (RFC 7489): the record parser and alignment (pure, with
hypothesis), then policy discovery and evaluation against the loopback DNS
server, with SPF and DKIM results given as values."""

from __future__ import annotations

import string

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from mailx.checks.dkim import DKIMResult
from mailx.checks.dmarc import (
    POLICIES,
    DMARCRecord,
    DMARCRecordError,
    aligned,
    author_domains,
    default_psl,
    evaluate_dmarc,
    organizational_domain,
    parse_record,
)
from mailx.checks.spf import SPFResult
from mailx.dns import Resolver
from mailx.testing.dnsserver import serve_for_test


def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result, "mailfrom", domain, f"bounce@{domain}", "192.0.2.1", "mx.test", "")


def dkim(result: str, domain: str) -> DKIMResult:
    return DKIMResult(result, domain, "sel", "rsa-sha256", "b" * 20, "")


def message(*from_values: str) -> bytes:
    fields = b"".join(b"From: " + v.encode() + b"\r\n" for v in from_values)
    return fields + b"To: bob@mx.test\r\nSubject: hi\r\n\r\nbody\r\n"


# -- the record parser --------------------------------------------------------


class ParseRecordTests(unittest.SynchronousTestCase):
    def test_full_record(self):
        r = parse_record(
            "v=DMARC1; p=reject; sp=quarantine; np=reject; pct=50; adkim=s; aspf=s; "
            "rua=mailto:agg@example.test,mailto:x@example.test!10m; ruf=mailto:f@example.test"
        )
        self.assertEqual(
            r,
            DMARCRecord(
                p="reject",
                sp="quarantine",
                np="reject",
                pct=50,
                adkim="s",
                aspf="s",
                rua=("mailto:agg@example.test", "mailto:x@example.test!10m"),
                ruf=("mailto:f@example.test",),
            ),
        )

    def test_defaults(self):
        # RFC 7489 6.3: pct 100, relaxed alignment, sp as p.
        self.assertEqual(parse_record("v=DMARC1; p=none"), DMARCRecord(p="none"))

    def test_whitespace_case_and_trailing_semicolon(self):
        r = parse_record("v = DMARC1 ;P=Reject;\tADKIM = S ;")
        self.assertEqual((r.p, r.adkim), ("reject", "s"))

    def test_version_must_come_first_and_match_exactly(self):
        for text in (
            "p=reject; v=DMARC1",
            "v=dmarc1; p=reject",
            "v=DMARC2; p=reject",
            "",
            "v=spf1 -all",
        ):
            with self.assertRaises(DMARCRecordError, msg=text):
                parse_record(text)

    def test_bad_optional_values_fall_back_to_defaults(self):
        r = parse_record("v=DMARC1; p=quarantine; pct=150; adkim=x; aspf=; unknown=tag")
        self.assertEqual((r.pct, r.adkim, r.aspf), (100, "r", "r"))

    def test_invalid_or_missing_p(self):
        self.assertIsNone(parse_record("v=DMARC1; p=block").p)
        self.assertIsNone(parse_record("v=DMARC1; rua=mailto:a@b.test").p)

    def test_invalid_sp_is_flagged(self):
        self.assertTrue(parse_record("v=DMARC1; p=none; sp=maybe").sp_invalid)
        self.assertFalse(parse_record("v=DMARC1; p=none; sp=none").sp_invalid)

    def test_first_of_repeated_tags_wins(self):
        self.assertEqual(parse_record("v=DMARC1; p=reject; p=none").p, "reject")

    @given(st.text())
    def test_arbitrary_text_parses_or_raises_the_documented_error(self, text):
        try:
            record = parse_record(text)
        except DMARCRecordError:
            return
        self.assertIn(record.p, (*POLICIES, None))
        self.assertTrue(0 <= record.pct <= 100)
        self.assertIn(record.adkim, ("r", "s"))

    @given(st.text(alphabet=string.printable))
    def test_arbitrary_record_bodies(self, text):
        record = parse_record("v=DMARC1; " + text)
        self.assertIn(record.sp, (*POLICIES, None))

    @given(
        st.builds(
            DMARCRecord,
            p=st.sampled_from(POLICIES),
            sp=st.sampled_from((*POLICIES, None)),
            np=st.sampled_from((*POLICIES, None)),
            pct=st.integers(0, 100),
            adkim=st.sampled_from("rs"),
            aspf=st.sampled_from("rs"),
            rua=st.lists(
                st.from_regex(r"mailto:[a-z]{1,8}@[a-z]{1,8}\.test", fullmatch=True), max_size=3
            ).map(tuple),
            ruf=st.lists(
                st.from_regex(r"mailto:[a-z]{1,8}@[a-z]{1,8}\.test", fullmatch=True), max_size=2
            ).map(tuple),
        )
    )
    def test_valid_records_round_trip(self, record):
        self.assertEqual(parse_record(record.to_text()), record)


# -- organizational domains and alignment ----------------------------------------

SUFFIXES = ["com", "co.uk", "github.io", "test", "example", "s3.amazonaws.com", "jp", "kyoto.jp"]
LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
DOMAINS = st.builds(
    lambda labels, suffix: ".".join([*labels, suffix]),
    st.lists(LABELS, min_size=0, max_size=3),
    st.sampled_from(SUFFIXES),
)
MODES = st.sampled_from("rs")


class AlignmentTests(unittest.SynchronousTestCase):
    def test_organizational_domain(self):
        self.assertEqual(organizational_domain("mail.shop.example.co.uk"), "example.co.uk")
        self.assertEqual(organizational_domain("mail.shop.example.test"), "example.test")
        self.assertEqual(organizational_domain("Victim.GitHub.io."), "victim.github.io")
        self.assertEqual(organizational_domain("co.uk"), "co.uk")

    def test_relaxed_same_organization(self):
        self.assertTrue(aligned("bounce.example.co.uk", "news.example.co.uk", "r"))
        self.assertFalse(aligned("bounce.example.co.uk", "news.example.co.uk", "s"))

    def test_public_suffix_never_aligns_its_children(self):
        self.assertFalse(aligned("co.uk", "victim.co.uk", "r"))

    def test_private_suffix_separates_organizations(self):
        # The full list: github.io users are different organizations.
        self.assertFalse(aligned("attacker.github.io", "victim.github.io", "r"))
        self.assertTrue(aligned("www.victim.github.io", "victim.github.io", "r"))

    def test_empty_never_aligns(self):
        self.assertFalse(aligned("", "example.test", "r"))

    @given(DOMAINS, MODES)
    def test_reflexive(self, domain, mode):
        self.assertTrue(aligned(domain, domain, mode))

    @given(DOMAINS, DOMAINS)
    def test_strict_implies_relaxed(self, a, b):
        if aligned(a, b, "s"):
            self.assertTrue(aligned(a, b, "r"))

    @given(DOMAINS, DOMAINS, MODES)
    def test_symmetric(self, a, b, mode):
        self.assertEqual(aligned(a, b, mode), aligned(b, a, mode))

    @given(DOMAINS, LABELS)
    def test_subdomain_of_a_registered_domain_aligns_relaxed_only(self, domain, label):
        assume(default_psl().publicsuffix(domain) != domain)
        self.assertTrue(aligned(f"{label}.{domain}", domain, "r"))
        self.assertFalse(aligned(f"{label}.{domain}", domain, "s"))

    @given(st.sampled_from(SUFFIXES), LABELS, LABELS, MODES)
    def test_siblings_under_a_public_suffix_never_align(self, suffix, a, b, mode):
        assume(a != b)
        self.assertFalse(aligned(f"{a}.{suffix}", f"{b}.{suffix}", mode))


class AuthorDomainTests(unittest.SynchronousTestCase):
    def test_one_from(self):
        self.assertEqual(
            author_domains(message("Alice <alice@Example.TEST>")), (("example.test",), 1, None)
        )

    def test_display_name_with_an_address_does_not_count(self):
        domains, _, _ = author_domains(message('"ceo@victim.test" <attacker@evil.test>'))
        self.assertEqual(domains, ("evil.test",))

    def test_folded_from(self):
        m = b"From: Alice\r\n <alice@example.test>\r\nTo: x@y.test\r\n\r\nFrom: not@a.header\r\n"
        self.assertEqual(author_domains(m)[0], ("example.test",))

    def test_several_addresses_and_fields(self):
        domains, count, problem = author_domains(
            message("a@one.test, b@two.test", "c@three.test", "d@one.test")
        )
        self.assertEqual(
            (domains, count, problem),
            (("one.test", "two.test", "three.test"), 3, "3 From header fields"),
        )

    def test_several_addresses_in_one_field_are_no_problem(self):
        self.assertEqual(
            author_domains(message("a@one.test, b@two.test")), (("one.test", "two.test"), 1, None)
        )

    def test_usable_domains_are_kept_beside_a_broken_address(self):
        for value in (
            "PayPal <ceo@paypal.test>, x@y",
            "PayPal <ceo@paypal.test>, <x@[192.0.2.1]>",
            "PayPal <ceo@paypal.test>, x@",
            "PayPal <ceo@paypal.test>, a@b.test c@d.test",
        ):
            domains, _, problem = author_domains(message(value))
            self.assertEqual(domains, ("paypal.test",), value)
            self.assertEqual(problem, "From address without a usable domain", value)

    def test_second_empty_or_addressless_from_is_a_problem(self):
        for second in ("", "nobody"):
            domains, count, problem = author_domains(message("ceo@paypal.test", second))
            self.assertEqual((domains, count, problem), (("paypal.test",), 2, "2 From header fields"))

    def test_obsolete_space_before_the_colon_is_a_from(self):
        # RFC 5322 4.5.8 obs-optional; mail clients read it as From.
        m = b"X-Note : hi\r\nFrom : ceo@paypal.test\r\n\r\nbody\r\n"
        self.assertEqual(author_domains(m), (("paypal.test",), 1, None))

    def test_oversized_from_is_not_parsed(self):
        value = "ceo@paypal.test " + '"' * 60_000
        domains, _, problem = author_domains(message(value))
        self.assertEqual((domains, problem), ((), "From header field over 4096 octets"))

    def test_problem_text_is_ours(self):
        _, _, problem = author_domains(message('"; dkim=pass; dmarc=pass" <x@[1.2.3.4]>'))
        self.assertNotIn("dkim", problem)

    def test_idna2008_not_idna2003(self):
        # IDNA2003 maps ß to "ss" (fass.de); IDNA2008 keeps it (xn--fa-hia.de).
        self.assertEqual(author_domains(message("ceo@faß.de"))[0], ("xn--fa-hia.de",))

    def test_no_from(self):
        self.assertEqual(
            author_domains(b"To: x@y.test\r\n\r\nFrom: a@b.test\r\n")[2], "no From header field"
        )

    def test_no_usable_domain(self):
        for value in ("undisclosed-recipients:;", "alice", "alice@[192.0.2.1]", ""):
            self.assertIsNotNone(author_domains(message(value))[2], value)

    def test_unicode_domain_becomes_a_label(self):
        self.assertEqual(author_domains(message("a@bücher.example"))[0], ("xn--bcher-kva.example",))


# -- evaluation against DNS ---------------------------------------------------------

ZONE = {
    "_dmarc.example.test": {
        "TXT": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.test"]
    },
    "mail.shop.example.test": {"A": ["192.0.2.1"]},
    "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.none.test": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.half.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.zero.test": {"TXT": ["v=DMARC1; p=quarantine; pct=0"]},
    "_dmarc.two.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "_dmarc.mixed.test": {"TXT": ["v=spf1 -all", "v=DMARC1; p=reject"]},
    "_dmarc.badp.test": {"TXT": ["v=DMARC1; p=bogus; rua=mailto:r@badp.test"]},
    "_dmarc.badp-norua.test": {"TXT": ["v=DMARC1; p=bogus"]},
    "_dmarc.badsp.test": {"TXT": ["v=DMARC1; p=reject; sp=bogus; rua=mailto:r@badsp.test"]},
    "_dmarc.np.test": {"TXT": ["v=DMARC1; p=none; sp=none; np=reject"]},
    "exists.np.test": {"A": ["192.0.2.1"]},
    "_dmarc.sub.own.test": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.own.test": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.example.co.uk": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.co.uk": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.victim.github.io": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.github.io": {"TXT": ["v=DMARC1; p=none"]},
}


class Sequence:
    """An injected pct draw: returns the values given, in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


class EvaluateTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = serve_for_test(self, ZONE)
        self.resolver = Resolver(self.server.nameservers, 0.5)

    def evaluate(self, from_value, spf_result=None, dkim_results=(), rng=lambda: 0.0):
        """``from_value``: one From field's value, or a tuple of several fields."""
        msg = message(*from_value) if isinstance(from_value, tuple) else message(from_value)
        return self.resolver.call(
            evaluate_dmarc, self.resolver, msg, spf_result, list(dkim_results), rng=rng
        )

    @defer.inlineCallbacks
    def assertDMARC(self, expected, from_value, spf_result=None, dkim_results=(), **kw):
        r = yield self.evaluate(from_value, spf_result, dkim_results, **kw)
        self.assertEqual(r.result, expected, r.reason)
        return r

    # pass and fail
    @defer.inlineCallbacks
    def test_pass_through_spf_relaxed(self):
        r = yield self.assertDMARC("pass", "a@example.test", spf("pass", "bounce.example.test"))
        self.assertTrue(r.spf_aligned)
        self.assertFalse(r.dkim_aligned)
        self.assertEqual((r.policy, r.disposition), ("reject", "none"))

    @defer.inlineCallbacks
    def test_pass_through_dkim_relaxed(self):
        r = yield self.assertDMARC(
            "pass",
            "a@example.test",
            spf("fail", "example.test"),
            [dkim("pass", "mail.example.test")],
        )
        self.assertTrue(r.dkim_aligned)

    @defer.inlineCallbacks
    def test_fail_with_reject(self):
        r = yield self.assertDMARC(
            "fail", "a@example.test", spf("pass", "other.test"), [dkim("pass", "other.test")]
        )
        self.assertEqual((r.policy, r.disposition), ("reject", "reject"))
        self.assertEqual(r.record_domain, "example.test")

    @defer.inlineCallbacks
    def test_unaligned_failing_dkim_does_not_help(self):
        yield self.assertDMARC("fail", "a@example.test", None, [dkim("fail", "example.test")])

    def test_quarantine(self):
        d = self.assertDMARC("fail", "a@quarantine.test", spf("softfail", "quarantine.test"))
        return d.addCallback(lambda r: self.assertEqual(r.disposition, "quarantine"))

    def test_policy_none_fails_without_disposition(self):
        d = self.assertDMARC("fail", "a@none.test")
        return d.addCallback(lambda r: self.assertEqual(r.disposition, "none"))

    # strict alignment
    def test_strict_spf_needs_the_exact_domain(self):
        return defer.gatherResults(
            [
                self.assertDMARC("fail", "a@strict.test", spf("pass", "bounce.strict.test")),
                self.assertDMARC("pass", "a@strict.test", spf("pass", "strict.test")),
            ]
        )

    def test_strict_dkim_needs_the_exact_domain(self):
        return defer.gatherResults(
            [
                self.assertDMARC("fail", "a@strict.test", None, [dkim("pass", "mail.strict.test")]),
                self.assertDMARC("pass", "a@strict.test", None, [dkim("pass", "Strict.Test")]),
            ]
        )

    # discovery
    @defer.inlineCallbacks
    def test_subdomain_falls_back_to_the_organizational_domain_with_sp(self):
        r = yield self.assertDMARC("fail", "a@mail.shop.example.test")
        self.assertEqual((r.record_domain, r.org_domain), ("example.test", "example.test"))
        self.assertEqual((r.policy, r.disposition), ("quarantine", "quarantine"))

    @defer.inlineCallbacks
    def test_subdomain_fallback_under_a_multi_label_suffix(self):
        r = yield self.assertDMARC("fail", "a@mail.shop.example.co.uk")
        self.assertEqual(r.record_domain, "example.co.uk")
        self.assertEqual(r.disposition, "reject")
        self.assertNotIn(("_dmarc.co.uk", "TXT"), self.server.queries)

    @defer.inlineCallbacks
    def test_subdomain_with_its_own_record_uses_it(self):
        r = yield self.assertDMARC("fail", "a@sub.own.test")
        self.assertEqual((r.record_domain, r.policy), ("sub.own.test", "none"))

    @defer.inlineCallbacks
    def test_private_suffix_user_is_its_own_organization(self):
        # attacker.github.io cannot sign for victim.github.io ...
        r = yield self.assertDMARC(
            "fail", "ceo@victim.github.io", None, [dkim("pass", "attacker.github.io")]
        )
        self.assertEqual(r.disposition, "reject")
        # ... and a user without a record does not inherit github.io's.
        r = yield self.assertDMARC("none", "someone@other.github.io")
        self.assertNotIn(("_dmarc.github.io", "TXT"), self.server.queries)

    @defer.inlineCallbacks
    def test_no_record(self):
        r = yield self.assertDMARC("none", "a@norecord.test")
        self.assertIsNone(r.policy)

    def test_several_records_mean_no_policy(self):
        # RFC 7489 6.6.3 step 5.
        return self.assertDMARC("none", "a@two.test")

    def test_non_dmarc_records_are_ignored(self):
        return self.assertDMARC("fail", "a@mixed.test")

    @defer.inlineCallbacks
    def test_invalid_p_with_rua_acts_as_p_none(self):
        # RFC 7489 6.6.3 step 6.1.
        r = yield self.assertDMARC("fail", "a@badp.test")
        self.assertEqual((r.policy, r.disposition), ("none", "none"))

    def test_invalid_p_without_rua_means_no_dmarc(self):
        return self.assertDMARC("none", "a@badp-norua.test")

    @defer.inlineCallbacks
    def test_invalid_sp_with_rua_acts_as_p_none(self):
        r = yield self.assertDMARC("fail", "a@badsp.test")
        self.assertEqual(r.policy, "none")

    @defer.inlineCallbacks
    def test_np_for_a_subdomain_that_does_not_exist(self):
        # RFC 9091.
        r = yield self.assertDMARC("fail", "a@ghost.np.test")
        self.assertEqual(r.disposition, "reject")
        r = yield self.assertDMARC("fail", "a@exists.np.test")
        self.assertEqual(r.disposition, "none")

    # pct, RFC 7489 6.6.4
    @defer.inlineCallbacks
    def test_pct_sample(self):
        inside = yield self.assertDMARC("fail", "a@half.test", rng=Sequence(0.49))
        self.assertEqual(inside.disposition, "reject")
        outside = yield self.assertDMARC("fail", "a@half.test", rng=Sequence(0.5))
        self.assertEqual(outside.disposition, "quarantine")
        self.assertEqual(outside.policy, "reject")

    @defer.inlineCallbacks
    def test_pct_zero_lowers_quarantine_to_none(self):
        r = yield self.assertDMARC("fail", "a@zero.test", rng=Sequence(0.0))
        self.assertEqual(r.disposition, "none")

    @defer.inlineCallbacks
    def test_pct_not_drawn_for_a_pass(self):
        yield self.assertDMARC("pass", "a@half.test", spf("pass", "half.test"), rng=Sequence())

    # From header fields
    def test_no_from_fails_with_quarantine(self):
        d = self.resolver.call(
            evaluate_dmarc, self.resolver, b"To: x@y.test\r\n\r\n", spf("pass", "example.test"), []
        )
        return d.addCallback(
            lambda r: self.assertEqual(
                (r.result, r.from_domain, r.disposition), ("fail", None, "quarantine")
            )
        )

    @defer.inlineCallbacks
    def test_second_from_field_cannot_hide_a_failing_domain(self):
        r = yield self.assertDMARC(
            "fail", ("me@attacker.test", "boss@example.test"), spf("pass", "attacker.test")
        )
        self.assertEqual((r.from_domain, r.disposition), ("example.test", "reject"))
        self.assertEqual(r.author_domains, ("attacker.test", "example.test"))
        self.assertIn("2 From fields", r.reason)

    @defer.inlineCallbacks
    def test_several_addresses_strictest_failure_decides(self):
        r = yield self.assertDMARC("fail", "a@quarantine.test, b@example.test")
        self.assertEqual((r.from_domain, r.disposition), ("example.test", "reject"))

    @defer.inlineCallbacks
    def test_several_from_fields_fail_even_when_each_passes(self):
        """RFC 7489 6.6.1: a From field added above a signed one keeps the DKIM pass."""
        r = yield self.assertDMARC(
            "fail",
            ("a@example.test", "b@none.test"),
            None,
            [dkim("pass", "example.test"), dkim("pass", "none.test")],
        )
        self.assertEqual((r.from_domain, r.disposition), ("example.test", "reject"))

    @defer.inlineCallbacks
    def test_broken_from_under_policy_none_is_quarantined(self):
        r = yield self.assertDMARC("fail", "a@none.test, x@y", spf("pass", "none.test"))
        self.assertEqual((r.from_domain, r.disposition), ("none.test", "quarantine"))

    @defer.inlineCallbacks
    def test_broken_from_cannot_escape_a_reject_policy(self):
        for value in ("a@example.test, x@y", "a@example.test, <x@[192.0.2.1]>", "a@example.test, x@"):
            r = yield self.assertDMARC("fail", value)
            self.assertEqual((r.from_domain, r.disposition), ("example.test", "reject"), value)
        r = yield self.assertDMARC("fail", ("a@example.test", ""))
        self.assertEqual(r.disposition, "reject")

    @defer.inlineCallbacks
    def test_unicode_author_is_looked_up_in_idna2008(self):
        self.server.set("_dmarc.xn--fa-hia.de", "TXT", ["v=DMARC1; p=reject"])
        self.server.set("_dmarc.fass.de", "TXT", ["v=DMARC1; p=none"])
        r = yield self.assertDMARC("fail", "ceo@faß.de")
        self.assertEqual((r.from_domain, r.disposition), ("xn--fa-hia.de", "reject"))

    # temporary DNS failures
    @defer.inlineCallbacks
    def test_record_lookup_timeout_decides(self):
        self.server.timeout("_dmarc.example.test")
        r = yield self.assertDMARC("temperror", "a@example.test", spf("fail", "example.test"))
        self.assertTrue(r.decided_by_temperror)

    @defer.inlineCallbacks
    def test_record_lookup_timeout_with_strict_alignment_does_not_decide(self):
        self.server.timeout("_dmarc.example.test")
        r = yield self.assertDMARC("temperror", "a@example.test", spf("pass", "example.test"))
        self.assertFalse(r.decided_by_temperror)

    @defer.inlineCallbacks
    def test_org_lookup_servfail_decides(self):
        self.server.servfail("_dmarc.example.test")
        r = yield self.assertDMARC("temperror", "a@mail.shop.example.test")
        self.assertTrue(r.decided_by_temperror)

    @defer.inlineCallbacks
    def test_aligned_spf_temperror_under_reject_decides(self):
        r = yield self.assertDMARC("temperror", "a@example.test", spf("temperror", "example.test"))
        self.assertTrue(r.decided_by_temperror)

    @defer.inlineCallbacks
    def test_aligned_dkim_temperror_under_reject_decides(self):
        r = yield self.assertDMARC(
            "temperror", "a@example.test", None, [dkim("temperror", "example.test")]
        )
        self.assertTrue(r.decided_by_temperror)

    @defer.inlineCallbacks
    def test_temperror_under_p_none_does_not_decide(self):
        r = yield self.assertDMARC("temperror", "a@none.test", spf("temperror", "none.test"))
        self.assertFalse(r.decided_by_temperror)

    def test_unaligned_temperror_is_a_plain_failure(self):
        return self.assertDMARC("fail", "a@example.test", spf("temperror", "elsewhere.test"))
