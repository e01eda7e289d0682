# -*- test-case-name: tests.test_auth_results -*-
"""The Authentication-Results header field (RFC 8601): built, folded, and
forged copies recognised."""

from __future__ import annotations

import re

import authres
import authres.dmarc
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.checks.dkim import DKIMResult
from mailx.checks.dmarc import DMARCRecord, DMARCResult
from mailx.checks.results import (
    authserv_id_of,
    build_header,
    fold,
    header_b,
    is_forged_results,
    strip_forged_results,
)
from mailx.checks.spf import SPFResult

HOST = "mx.example.test"
SPF_PASS = SPFResult(
    "pass",
    "mailfrom",
    "example.com",
    "alice@example.com",
    "192.0.2.1",
    "mail.example.com",
    "192.0.2.1 is permitted to send for alice@example.com",
)
DKIM_PASS = DKIMResult(
    "pass", "example.com", "sel1", "rsa-sha256", "AbCdEfGh1234567890+/==", "signature verified"
)
DKIM_FAIL = DKIMResult(
    "fail", "other.example", "s2", "ed25519-sha256", "ZyXwVuTs+/9", "body hash did not verify"
)
DMARC_PASS = DMARCResult(
    "pass",
    "example.com",
    "SPF aligned with example.com",
    policy="reject",
    disposition="none",
    record=DMARCRecord(p="reject"),
)


def unfold(header: str) -> str:
    return re.sub(r"\r\n[ \t]", " ", header)


def parse(header: str) -> authres.AuthenticationResultsHeader:
    return authres.FeatureContext(authres.dmarc).parse(unfold(header))


class BuildHeaderTests(unittest.SynchronousTestCase):
    def test_all_methods(self):
        header = build_header(HOST, SPF_PASS, (DKIM_PASS, DKIM_FAIL), DMARC_PASS)
        parsed = parse(header)
        self.assertEqual(parsed.authserv_id, HOST)
        by_method = [(r.method, r.result) for r in parsed.results]
        self.assertEqual(
            by_method, [("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass")]
        )
        flat = unfold(header)
        self.assertTrue(flat.startswith(f"Authentication-Results: {HOST};"))
        for fragment in (
            "smtp.mailfrom=alice@example.com",
            "header.d=example.com",
            "header.s=sel1",
            "header.b=AbCdEfGh ",
            "header.b=ZyXwVuTs ",
            "header.d=other.example",
            'reason="body hash did not verify"',
            "header.from=example.com",
            "policy.dmarc=none",
        ):
            self.assertIn(fragment, flat)

    def test_null_sender_reports_helo(self):
        spf = SPFResult(
            "fail",
            "helo",
            "mail.example.com",
            "postmaster@mail.example.com",
            "192.0.2.9",
            "mail.example.com",
            "no",
        )
        self.assertIn("smtp.helo=mail.example.com", unfold(build_header(HOST, spf, (), None)))

    def test_unsigned_is_dkim_none(self):
        self.assertIn("dkim=none", build_header(HOST, SPF_PASS, (), DMARC_PASS))

    def test_methods_switched_off_are_left_out(self):
        header = build_header(HOST, None, (DKIM_PASS,), None)
        self.assertNotIn("spf=", header)
        self.assertNotIn("dmarc=", header)
        self.assertEqual(
            build_header(HOST, None, None, None), f"Authentication-Results: {HOST}; none"
        )

    def test_dmarc_failure_with_policy(self):
        dmarc = DMARCResult(
            "fail",
            "example.com",
            "no aligned pass",
            policy="reject",
            disposition="quarantine",
            record=DMARCRecord(p="reject", pct=50),
        )
        flat = unfold(build_header(HOST, None, None, dmarc))
        self.assertIn("dmarc=fail (p=reject pct=50)", flat)
        self.assertIn("policy.dmarc=quarantine", flat)

    def test_monitor_notes_the_policy_was_not_enforced(self):
        dmarc = DMARCResult(
            "fail",
            "example.com",
            "x",
            policy="reject",
            disposition="reject",
            record=DMARCRecord(p="reject"),
        )
        self.assertIn("not enforced", unfold(build_header(HOST, None, None, dmarc, enforced=False)))

    def test_no_record_has_no_policy(self):
        dmarc = DMARCResult("none", "example.com", "no DMARC record for example.com")
        self.assertNotIn("policy.dmarc", build_header(HOST, None, None, dmarc))

    def test_sender_text_cannot_break_the_header(self):
        spf = SPFResult(
            "fail",
            "mailfrom",
            "evil.test",
            "x\r\nBcc: victim@example.com@evil.test",
            "192.0.2.1",
            None,
            "reason (with) \\ odd\r\nX-Injected: yes",
        )
        dkim = DKIMResult("fail", 'd"\r\nX-Evil: 1', "s;x", "rsa-sha256", "b", 'quote " here')
        header = build_header(HOST, spf, (dkim,), None)
        for line in header.split("\r\n")[1:]:
            self.assertTrue(line.startswith("\t"), repr(line))
        self.assertNotIn("\r\nX-", header)
        parse(header)  # still well-formed

    def test_long_address_stays_whole(self):
        local = "a" * 90
        spf = SPFResult(
            "pass", "mailfrom", "example.com", f"{local}@example.com", "192.0.2.1", None, "ok"
        )
        header = build_header(HOST, spf, None, None)
        self.assertIn(f"smtp.mailfrom={local}@example.com", header)


class FoldTests(unittest.SynchronousTestCase):
    def test_lines_at_most_78_columns(self):
        header = build_header(HOST, SPF_PASS, (DKIM_PASS, DKIM_FAIL), DMARC_PASS)
        for line in header.split("\r\n"):
            self.assertLessEqual(len(line), 78, repr(line))
        self.assertFalse(header.endswith("\r\n"))

    def test_continuations_start_with_tab(self):
        header = build_header(HOST, SPF_PASS, (DKIM_PASS,), DMARC_PASS)
        lines = header.split("\r\n")
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(line.startswith("\t") for line in lines[1:]))

    def test_quoted_strings_are_not_folded(self):
        folded = fold(
            "Authentication-Results: x", ['dkim=fail reason="' + "word " * 30 + '" header.d=a.test']
        )
        self.assertIn('reason="' + "word " * 30 + '"', folded)

    @given(
        st.lists(st.text(alphabet="abcdefgh=.", min_size=1, max_size=30), min_size=1, max_size=40)
    )
    def test_folding_keeps_every_token(self, words):
        resinfo = " ".join(words)
        folded = fold("Authentication-Results: host", [resinfo])
        self.assertEqual(unfold(folded).split(), ["Authentication-Results:", "host;", *words])
        for line in folded.split("\r\n"):
            self.assertLessEqual(len(line), 78)


class HeaderBTests(unittest.SynchronousTestCase):
    def test_eight_characters(self):
        self.assertEqual(header_b("ABCDEFGHIJKL", ["ABCDEFGHIJKL", "ZZZZZZZZZ"]), "ABCDEFGH")

    def test_longer_when_not_unique(self):
        # RFC 6008 4.
        self.assertEqual(header_b("ABCDEFGHIJKL", ["ABCDEFGHIJKL", "ABCDEFGHIXXX"]), "ABCDEFGHIJ")


class ForgedResultsTests(unittest.SynchronousTestCase):
    def test_our_id(self):
        self.assertTrue(is_forged_results(" mx.example.test; spf=pass smtp.mailfrom=x@y", HOST))

    def test_case_and_trailing_dot(self):
        self.assertTrue(is_forged_results("MX.Example.TEST.; dkim=pass", HOST))

    def test_comments_version_and_folding(self):
        self.assertTrue(
            is_forged_results("(forged (nested)) \r\n\tmx.example.test (x) 1; none", HOST)
        )

    def test_quoted_string_id(self):
        self.assertTrue(is_forged_results('"mx.example.test"; none', HOST))

    def test_none_form(self):
        self.assertTrue(is_forged_results("mx.example.test; none", HOST))
        self.assertTrue(is_forged_results("mx.example.test", HOST))

    def test_whole_field_and_bytes(self):
        self.assertTrue(is_forged_results(b"Authentication-Results: mx.example.test; none", HOST))

    def test_other_servers_are_kept(self):
        for value in (
            "mx.example.org; spf=pass",
            "example.test; spf=pass",
            "mx.example.test.evil; none",
            "",
        ):
            self.assertFalse(is_forged_results(value, HOST), value)

    def test_authserv_id_of_our_own_header(self):
        header = build_header(HOST, SPF_PASS, (DKIM_PASS,), DMARC_PASS)
        self.assertEqual(authserv_id_of(header), HOST)

    def test_strip_forged_results(self):
        message = (
            b"Received: from a\r\n"
            b"Authentication-Results: mx.example.test;\r\n"
            b"\tspf=pass smtp.mailfrom=ceo@example.test\r\n"
            b"authentication-results : other.example; dkim=fail\r\n"
            b"Subject: hi\r\n"
            b"Authentication-Results: (c) MX.EXAMPLE.TEST; dmarc=pass\r\n"
            b"\r\n"
            b"Authentication-Results: mx.example.test; body text stays\r\n"
        )
        self.assertEqual(
            strip_forged_results(message, HOST),
            b"Received: from a\r\n"
            b"authentication-results : other.example; dkim=fail\r\n"
            b"Subject: hi\r\n"
            b"\r\n"
            b"Authentication-Results: mx.example.test; body text stays\r\n",
        )


class OurTextOnlyTests(unittest.SynchronousTestCase):
    """What the sender wrote never reads as a result in our header."""

    HOSTILE = '"; dkim=pass header.d=paypal.test; dmarc=pass"@evil.test'

    def test_quoted_local_part_is_left_out_of_smtp_mailfrom_and_the_comment(self):
        spf = SPFResult(
            "pass", "mailfrom", "evil.test", self.HOSTILE, "203.0.113.5", "evil.test",
            f"203.0.113.5 is permitted to send for {self.HOSTILE}",
        )
        header = build_header(HOST, spf, (), None)
        self.assertNotIn("paypal", header)
        parsed = parse(header)
        self.assertEqual([(r.method, r.result) for r in parsed.results], [("spf", "pass"), ("dkim", "none")])
        self.assertEqual(parsed.results[0].smtp_mailfrom, "evil.test")
        self.assertIn("(203.0.113.5 is permitted to send for evil.test)", unfold(header))

    def test_sender_values_cannot_spell_a_result(self):
        dkim = DKIMResult(
            "fail", "x;dmarc=pass", "s=1", "rsa-sha256", "dmarc=pass;", "bad; dmarc=pass"
        )
        header = build_header(HOST, None, (dkim,), None)
        self.assertNotIn("dmarc=pass", header)
        self.assertEqual([(r.method, r.result) for r in parse(header).results], [("dkim", "fail")])

    def test_undeterminable_author_is_a_well_formed_dmarc_fail(self):
        dmarc = DMARCResult(
            "fail",
            "paypal.test",
            "2 From header fields: the author cannot be determined (RFC 7489 6.6.1); "
            "paypal.test is named as an author; policy reject",
            policy="reject",
            disposition="reject",
            record=DMARCRecord(p="reject"),
        )
        header = build_header(HOST, None, None, dmarc)
        [result] = parse(header).results
        self.assertEqual((result.method, result.result, result.header_from), ("dmarc", "fail", "paypal.test"))
        self.assertNotIn(";", result.reason)
        self.assertIn("policy.dmarc=reject", unfold(header))
        no_author = DMARCResult("fail", None, "no From header field", disposition="quarantine")
        [result] = parse(build_header(HOST, None, None, no_author)).results
        self.assertEqual((result.method, result.result), ("dmarc", "fail"))
