# -*- test-case-name: tests.test_policy -*-
"""What the verdict does to the message: mailx.checks.policy.decide (pure),
then the whole `Authenticator` against the loopback DNS server."""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.trial import unittest

from mailx.checks import Authenticator, Verdict
from mailx.checks.dmarc import DMARCResult
from mailx.checks.policy import ACCEPT, JUNK, REJECT, TEMPFAIL, decide
from mailx.checks.results import is_forged_results
from mailx.config import AuthenticationConfig
from mailx.dns import Resolver
from mailx.smtp import replies
from mailx.testing.dnsserver import serve_for_test
from tests.test_dkim import ed25519_key, sign


def dmarc(
    result: str, disposition: str = "none", decided_by_temperror: bool = False
) -> DMARCResult:
    return DMARCResult(
        result,
        "example.test",
        "why",
        policy="reject",
        disposition=disposition,
        decided_by_temperror=decided_by_temperror,
    )


class DecideTests(unittest.SynchronousTestCase):
    def test_enforce_reject(self):
        d = decide(dmarc("fail", "reject"), "enforce")
        self.assertEqual((d.action, d.reply), (REJECT, replies.DMARC_REJECT))
        self.assertEqual((d.reply.code, d.reply.enhanced), (550, "5.7.1"))

    def test_enforce_quarantine_is_junk(self):
        self.assertEqual(decide(dmarc("fail", "quarantine"), "enforce").action, JUNK)

    def test_enforce_policy_none_accepts(self):
        self.assertEqual(decide(dmarc("fail", "none"), "enforce").action, ACCEPT)

    def test_enforce_decisive_temperror_defers(self):
        d = decide(dmarc("temperror", decided_by_temperror=True), "enforce")
        self.assertEqual((d.action, d.reply), (TEMPFAIL, replies.DNS_TEMPFAIL))
        self.assertTrue(d.reply.temporary)
        self.assertTrue(d.reply.enhanced.startswith("4.7."))

    def test_enforce_harmless_temperror_accepts(self):
        self.assertEqual(decide(dmarc("temperror"), "enforce").action, ACCEPT)

    def test_enforce_other_results_accept(self):
        for result in ("pass", "none"):
            self.assertEqual(decide(dmarc(result), "enforce").action, ACCEPT, result)

    def test_enforce_permerror_is_junk_not_inbox(self):
        self.assertEqual(decide(dmarc("permerror"), "enforce").action, JUNK)

    def test_monitor_always_accepts(self):
        for verdict in (
            dmarc("fail", "reject"),
            dmarc("fail", "quarantine"),
            dmarc("temperror", decided_by_temperror=True),
        ):
            d = decide(verdict, "monitor")
            self.assertEqual((d.action, d.reply), (ACCEPT, None))

    def test_off_and_unevaluated_accept(self):
        self.assertEqual(decide(dmarc("fail", "reject"), "off").action, ACCEPT)
        self.assertEqual(decide(None, "enforce").action, ACCEPT)

    def test_unknown_mode(self):
        with self.assertRaises(ValueError):
            decide(None, "strict")


ED_KEY, ED_TXT = ed25519_key()

ZONE = {
    "example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
    "ed._domainkey.example.test": {"TXT": [ED_TXT]},
    "quarantine.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "mail.example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
}

GOOD_IP, BAD_IP = "192.0.2.1", "203.0.113.1"


def message(author: str = "alice@example.test") -> bytes:
    return (
        f"From: Alice <{author}>\r\nTo: bob@mx.test\r\nSubject: hi\r\n"
        "Date: Mon, 06 Jan 2025 12:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nHello.\r\n"
    ).encode()


class AuthenticatorTests(unittest.TestCase):
    timeout_seconds = 0.5

    def setUp(self) -> None:
        self.server = serve_for_test(self, ZONE)
        self.resolver = Resolver(self.server.nameservers, self.timeout_seconds)

    def authenticator(
        self, spf: bool = True, dkim: bool = True, mode: str = "enforce"
    ) -> Authenticator:
        return Authenticator(
            self.resolver,
            AuthenticationConfig(spf=spf, dkim=dkim, dmarc=mode, timeout=30.0, concurrency_per_ip=2),
            "mx.test",
        )

    def check(
        self, ip, mail_from, msg, helo="client.example.net", **config
    ) -> defer.Deferred[Verdict]:
        return self.authenticator(**config).check(ip, helo, mail_from, msg)

    @defer.inlineCallbacks
    def test_aligned_spf_pass_accepts(self):
        v = yield self.check(GOOD_IP, "alice@example.test", message())
        self.assertEqual((v.action, v.reply), ("accept", None))
        self.assertEqual((v.spf.result, v.dkim, v.dmarc.result), ("pass", (), "pass"))
        self.assertIn("spf=pass", v.header)
        self.assertIn("dkim=none", v.header)
        self.assertIn("dmarc=pass", v.header)
        self.assertEqual(
            v.log_fields(),
            {
                "spf": "pass:example.test",
                "dkim": "none",
                "dmarc": "pass:example.test",
                "action": "accept",
            },
        )

    @defer.inlineCallbacks
    def test_reject_policy_refuses(self):
        v = yield self.check(BAD_IP, "alice@example.test", message())
        self.assertEqual((v.action, v.reply), ("reject", replies.DMARC_REJECT))
        self.assertEqual(v.log_fields()["dmarc"], "fail:example.test:reject")

    @defer.inlineCallbacks
    def test_aligned_dkim_rescues_a_forwarded_message(self):
        signed = sign(message(), "ed", "example.test", ED_KEY)
        v = yield self.check(BAD_IP, "srs0=x@forwarder.test", signed)
        self.assertEqual(v.action, "accept")
        self.assertEqual([r.result for r in v.dkim], ["pass"])
        self.assertIn("header.d=example.test", v.header.replace("\r\n\t", " "))

    @defer.inlineCallbacks
    def test_quarantine_files_as_junk(self):
        v = yield self.check(BAD_IP, "alice@quarantine.test", message("alice@quarantine.test"))
        self.assertEqual((v.action, v.reply), ("junk", None))

    @defer.inlineCallbacks
    def test_monitor_records_but_accepts(self):
        v = yield self.check(BAD_IP, "alice@example.test", message(), mode="monitor")
        self.assertEqual(v.action, "accept")
        self.assertEqual(v.dmarc.result, "fail")
        self.assertIn("dmarc=fail", v.header)
        self.assertIn("not enforced", v.header)

    @defer.inlineCallbacks
    def test_off_skips_dmarc(self):
        v = yield self.check(BAD_IP, "alice@example.test", message(), mode="off")
        self.assertEqual(v.action, "accept")
        self.assertIsNone(v.dmarc)
        self.assertNotIn("dmarc=", v.header)
        self.assertNotIn(("_dmarc.example.test", "TXT"), self.server.queries)

    @defer.inlineCallbacks
    def test_spf_off_leaves_only_dkim_to_pass(self):
        v = yield self.check(GOOD_IP, "alice@example.test", message(), spf=False)
        self.assertIsNone(v.spf)
        self.assertNotIn("spf=", v.header)
        self.assertEqual(v.action, "reject")
        self.assertNotIn(("example.test", "TXT"), self.server.queries)

    @defer.inlineCallbacks
    def test_dkim_off_leaves_only_spf_to_pass(self):
        signed = sign(message(), "ed", "example.test", ED_KEY)
        v = yield self.check(BAD_IP, "alice@example.test", signed, dkim=False)
        self.assertIsNone(v.dkim)
        self.assertNotIn("dkim=", v.header)
        self.assertEqual(v.action, "reject")

    @defer.inlineCallbacks
    def test_dmarc_record_timeout_defers(self):
        self.server.timeout("_dmarc.example.test")
        v = yield self.check(BAD_IP, "alice@example.test", message())
        self.assertEqual((v.action, v.reply), ("tempfail", replies.DNS_TEMPFAIL))
        self.assertEqual(v.reply.code, 451)

    @defer.inlineCallbacks
    def test_spf_servfail_under_reject_defers(self):
        self.server.servfail("example.test")
        v = yield self.check(GOOD_IP, "alice@example.test", message())
        self.assertEqual(v.spf.result, "temperror")
        self.assertEqual(v.action, "tempfail")

    @defer.inlineCallbacks
    def test_timeout_that_cannot_change_the_outcome_does_not_defer(self):
        signed = sign(message(), "ed", "example.test", ED_KEY)
        self.server.timeout("example.test", "TXT")  # SPF times out, DKIM passes
        v = yield self.check(GOOD_IP, "alice@example.test", signed)
        self.assertEqual((v.spf.result, v.action), ("temperror", "accept"))

    @defer.inlineCallbacks
    def test_spf_and_dkim_run_at_the_same_time(self):
        self.server.timeout("example.test", "TXT")
        self.server.timeout("ed._domainkey.example.test")
        signed = sign(message(), "ed", "example.test", ED_KEY)
        wait = 1.0
        self.resolver = Resolver(self.server.nameservers, wait)
        started = time.monotonic()
        v = yield self.check(GOOD_IP, "alice@example.test", signed)
        elapsed = time.monotonic() - started
        self.assertEqual(
            (v.spf.result, v.dkim[0].result, v.action), ("temperror", "temperror", "tempfail")
        )
        # One timeout's worth, not two in a row.
        self.assertLess(elapsed, 1.8 * wait)

    @defer.inlineCallbacks
    def test_null_sender_uses_helo(self):
        v = yield self.check(GOOD_IP, "", message(), helo="mail.example.test")
        self.assertEqual((v.spf.identity, v.spf.result), ("helo", "pass"))
        self.assertIn("smtp.helo=mail.example.test", v.header)
        self.assertEqual(v.action, "accept")  # mail.example.test aligns relaxed

    @defer.inlineCallbacks
    def test_header_is_ours_and_folded(self):
        signed = sign(message(), "ed", "example.test", ED_KEY)
        v = yield self.check(GOOD_IP, "alice@example.test", signed)
        self.assertTrue(v.header.startswith("Authentication-Results: mx.test;"))
        self.assertTrue(is_forged_results(v.header, "mx.test"))
        self.assertTrue(all(len(line) <= 78 for line in v.header.split("\r\n")))

    @defer.inlineCallbacks
    def test_check_sync_agrees_with_check(self):
        signed = sign(message(), "ed", "example.test", ED_KEY)
        auth = self.authenticator()
        a = yield auth.check(BAD_IP, "x", "bounce@example.test", signed)
        b = yield self.resolver.call(auth.check_sync, BAD_IP, "x", "bounce@example.test", signed)
        self.assertEqual(a, b)

    @defer.inlineCallbacks
    def test_verdict_as_json(self):
        import json

        v = yield self.check(BAD_IP, "alice@example.test", message())
        data = json.loads(json.dumps(v.as_dict()))
        self.assertEqual(data["action"], "reject")
        self.assertEqual(data["spf"]["result"], "fail")
        self.assertEqual(data["dmarc"]["record"], "v=DMARC1; p=reject; pct=100; adkim=r; aspf=r")
        self.assertEqual(data["reply"], str(replies.DMARC_REJECT))


class InlineChecksTests(unittest.TestCase):
    """Which messages may be checked on the reactor thread from cached answers."""

    timeout_seconds = AuthenticatorTests.timeout_seconds
    setUp = AuthenticatorTests.setUp
    authenticator = AuthenticatorTests.authenticator

    @defer.inlineCallbacks
    def test_a_large_header_section_is_checked_in_a_worker_thread(self):
        import threading

        from mailx.checks import INLINE_CHECKS

        auth = self.authenticator()
        yield auth.check(GOOD_IP, "client.example.net", "alice@example.test", message())
        threads = []
        real = auth.check_sync

        def spy(*args):
            threads.append(threading.current_thread() is threading.main_thread())
            return real(*args)

        auth.check_sync = spy
        small = message()
        large = small.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * INLINE_CHECKS + b"\r\n\r\n", 1)
        yield auth.check(GOOD_IP, "client.example.net", "alice@example.test", small)
        v = yield auth.check(GOOD_IP, "client.example.net", "alice@example.test", large)
        self.assertEqual(threads, [True, False])
        self.assertEqual(v.dmarc.result, "pass")
