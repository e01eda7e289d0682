# -*- test-case-name: tests.test_auth_server -*-
"""SPF, DKIM and DMARC through the running server, as a sender on the internet sees them.

Zone data comes from a loopback DNS server; the client's address comes from
a PROXY header on a ``haproxy:`` listener; the verdict is read from the
delivered message's Authentication-Results or from the SMTP reply.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import authres
import authres.dmarc
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.trial import unittest

from mailx.testing import rfc7208
from mailx.testing.dnsserver import serve_for_test, start_dns_server
from mailx.testing.server import dialogue, hostile_message, in_thread, start_server

AUTHSERV = "mx.example.test"


def auth_config(dns_port: int, **authentication: Any) -> dict[str, Any]:
    return {
        "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"]},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "1s"},
        "authentication": {"spf": True, "dkim": True, "dmarc": "enforce", **authentication},
    }


def transaction(helo: str, mail_from: str, body: bytes, rcpt: str = "alice@example.test") -> list[bytes]:
    return [
        b"EHLO " + helo.encode(),
        b"MAIL FROM:<" + mail_from.encode() + b">",
        b"RCPT TO:<" + rcpt.encode() + b">",
        b"DATA",
        body.rstrip(b"\r\n") + b"\r\n.",
        b"QUIT",
    ]


def results_header(stored: bytes) -> str:
    """Our Authentication-Results field, unfolded."""
    head = stored.split(b"\n\n", 1)[0].decode()
    match = re.search(rf"^Authentication-Results: {re.escape(AUTHSERV)};(.*(?:\n[ \t].*)*)", head, re.M)
    assert match, f"no Authentication-Results in:\n{head}"
    return " ".join(match.group(1).split())


class RFC7208OverTheWireTests(unittest.TestCase):
    """The openspf suite, each case as a real SMTP transaction.

    Cases whose MAIL FROM is not a valid RFC 5321 path (a 64-octet label, an
    empty label, no local part) cannot reach SPF over the wire: the server
    answers 501 at MAIL FROM, which these tests check instead.
    """

    REFUSED_AT_MAIL = {
        "toolonglabel": "a DNS label over 63 octets is not a valid domain (RFC 1035 2.3.4)",
        "emptylabel": "an empty label is not a valid domain (RFC 5321 4.1.2)",
        "nolocalpart": "an empty local part is not a valid path (RFC 5321 4.1.2)",
    }

    @defer.inlineCallbacks
    def check_case(self, case: rfc7208.SPFCase) -> Any:
        dns = rfc7208.serve(case.zone)
        self.addCleanup(dns.stop)
        config = auth_config(dns.port, dkim=False, dmarc="off")
        config["dns"]["timeout"] = "0.3s"
        server = start_server(self, config)
        mail_from = case.mail_from
        local, _, domain = mail_from.rpartition("@")
        if local and " " in local:
            mail_from = f'"{local}"@{domain}'
        body = b"Subject: " + case.name.encode() + b"\r\n\r\nRFC 7208 " + case.spec.encode() + b"\r\n"
        replies = yield in_thread(
            dialogue, server.port, transaction(case.helo, mail_from, body), case.client_ip
        )
        if case.name in self.REFUSED_AT_MAIL:
            self.assertEqual((replies[2][0], replies[2][1][:5]), (501, b"5.1.7"))
            return
        self.assertEqual([code for code, _ in replies], [220, 250, 250, 250, 354, 250, 221])
        [stored] = server.messages("alice")
        found = re.search(r"\bspf=(\w+)", results_header(stored)).group(1)
        self.assertIn(found, case.results, f"{case.name} (RFC 7208 {case.spec})")


rfc7208.install_cases(RFC7208OverTheWireTests)


def make_dkim_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


class PolicyThroughServerTests(unittest.TestCase):
    """Each DMARC policy action, and the header, end to end."""

    def setUp(self) -> None:
        self.private_key, record = make_dkim_key()
        self.dns = serve_for_test(
            self,
            {
                "good.test": {"TXT": ["v=spf1 ip4:203.0.113.0/24 -all"]},
                "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
                "sel._domainkey.good.test": {"TXT": [record]},
                "bank.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
                "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
                "shop.test": {"TXT": ["v=spf1 -all"]},
                "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
                "slow.test": {"TXT": ["v=spf1 -all"]},
            },
        )

    def start(self, **authentication: Any) -> Any:
        return start_server(self, auth_config(self.dns.port, **authentication))

    def message(self, author: str, subject: str = "test") -> bytes:
        return (
            f"From: {author}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@x.test>\r\n\r\nHello.\r\n"
        ).encode()

    def send(self, server: Any, ip: str, mail_from: str, body: bytes) -> defer.Deferred:
        return in_thread(dialogue, server.port, transaction("client.test", mail_from, body), ip)

    @defer.inlineCallbacks
    def test_spf_pass_and_dmarc_pass_are_recorded(self) -> None:
        server = self.start()
        replies = yield self.send(server, "203.0.113.5", "news@good.test", self.message("news@good.test"))
        self.assertEqual(replies[5][0], 250)
        header = results_header(server.messages("alice")[0])
        self.assertIn("spf=pass", header)
        self.assertIn("smtp.mailfrom=news@good.test", header)
        self.assertIn("dkim=none", header)
        self.assertIn("dmarc=pass", header)
        self.assertIn("header.from=good.test", header)

    @defer.inlineCallbacks
    def test_dmarc_reject_is_550_under_enforce(self) -> None:
        server = self.start()
        replies = yield self.send(server, "203.0.113.5", "ceo@bank.test", self.message("ceo@bank.test"))
        self.assertEqual(replies[5], (550, b"5.7.1 Rejected by DMARC policy of the sender's domain"))
        self.assertEqual(server.all_messages(), [])

    @defer.inlineCallbacks
    def test_dmarc_reject_is_only_recorded_under_monitor(self) -> None:
        server = self.start(dmarc="monitor")
        replies = yield self.send(server, "203.0.113.5", "ceo@bank.test", self.message("ceo@bank.test"))
        self.assertEqual(replies[5][0], 250)
        self.assertIn("dmarc=fail", results_header(server.messages("alice")[0]))

    @defer.inlineCallbacks
    def test_dmarc_quarantine_files_into_junk(self) -> None:
        server = self.start()
        replies = yield self.send(server, "203.0.113.5", "deals@shop.test", self.message("deals@shop.test"))
        self.assertEqual(replies[5][0], 250)
        self.assertEqual(server.messages("alice"), [])
        [junk] = server.messages("alice", folder=".Junk")
        self.assertIn("dmarc=fail", results_header(junk))
        self.assertTrue((server.maildir("alice") / ".Junk" / "maildirfolder").exists())

    @defer.inlineCallbacks
    def test_dmarc_off_skips_policy(self) -> None:
        server = self.start(dmarc="off")
        replies = yield self.send(server, "203.0.113.5", "ceo@bank.test", self.message("ceo@bank.test"))
        self.assertEqual(replies[5][0], 250)
        self.assertNotIn("dmarc=", results_header(server.messages("alice")[0]))

    @defer.inlineCallbacks
    def test_dns_timeout_deciding_the_outcome_is_451(self) -> None:
        self.dns.timeout("_dmarc.slow.test")
        server = self.start()
        replies = yield self.send(server, "203.0.113.5", "x@slow.test", self.message("x@slow.test"))
        self.assertEqual(replies[5][0], 451)
        self.assertTrue(replies[5][1].startswith(b"4.7."))
        self.assertEqual(server.all_messages(), [])

    @defer.inlineCallbacks
    def test_dkim_signature_passes_dmarc_when_spf_fails(self) -> None:
        """A forwarded message: SPF fails at our IP, the aligned DKIM signature carries DMARC."""
        server = self.start()
        message = self.message("news@good.test", "signed")
        signature = dkim.sign(
            message, b"sel", b"good.test", self.private_key, include_headers=[b"from", b"subject"]
        )
        replies = yield self.send(server, "192.0.2.99", "news@good.test", signature + message)
        self.assertEqual(replies[5][0], 250)
        header = results_header(server.messages("alice")[0])
        self.assertIn("spf=fail", header)
        self.assertIn("dkim=pass", header)
        self.assertIn("header.d=good.test", header)
        self.assertIn("header.s=sel", header)
        self.assertIn("header.b=", header)
        self.assertIn("dmarc=pass", header)

    @defer.inlineCallbacks
    def test_dkim_verifies_a_body_spooled_to_disk(self) -> None:
        """Past 256 KiB the body is on disk; the signature is still checked over all of it."""
        server = self.start()
        body = b"".join(b"line %06d of a long signed message\r\n" % n for n in range(9000))
        message = self.message("news@good.test", "big").replace(b"Hello.\r\n", body)
        self.assertGreater(len(message), 256 * 1024)
        signature = dkim.sign(
            message, b"sel", b"good.test", self.private_key, include_headers=[b"from", b"subject"]
        )
        replies = yield self.send(server, "192.0.2.99", "news@good.test", signature + message)
        self.assertEqual(replies[5][0], 250)
        header = results_header(server.messages("alice")[0])
        self.assertIn("dkim=pass", header)
        self.assertIn("dmarc=pass", header)

    FOLDED = b"X-Fold: x\r\n" + b" x\r\n" * ((996 * 1024 - 200) // 4)

    def start_for_bystanders(self) -> Any:
        """A server whose rate limit lets `hostile_message`'s bystanders come
        back to back (each NOOP is a new connection from one address)."""
        config = auth_config(self.dns.port)
        config["limits"] = {"connection_rate_per_ip": 0}
        return start_server(self, config)

    @defer.inlineCallbacks
    def test_unsigned_996_kib_folded_field_does_not_stall_other_clients(self) -> None:
        """Issue 9: dkimpy parsed the header of unsigned mail too, quadratically
        in a folded field's lines (17 s in a thread holding the GIL)."""
        server = self.start_for_bystanders()
        message = self.FOLDED + self.message("news@good.test", "folded")
        reply, waited = yield in_thread(
            hostile_message, server.port, message,
            mail_from="news@good.test", proxy_from="203.0.113.5",
        )
        self.assertEqual(reply[0], 250, reply)
        self.assertLess(waited, 5.0)
        [stored] = server.messages("alice")
        header = results_header(stored)
        self.assertIn("dkim=none", header)
        self.assertIn("dmarc=pass", header)

    @defer.inlineCallbacks
    def test_signed_996_kib_folded_field_does_not_stall_other_clients(self) -> None:
        """The same field below a valid signature (not signed itself): SPF fails,
        so only the DKIM pass can carry DMARC."""
        server = self.start_for_bystanders()
        message = self.message("news@good.test", "signed-folded")
        signature = dkim.sign(
            message, b"sel", b"good.test", self.private_key, include_headers=[b"from", b"subject"]
        )
        reply, waited = yield in_thread(
            hostile_message, server.port, signature + self.FOLDED + message,
            mail_from="news@good.test", proxy_from="192.0.2.99",
        )
        self.assertEqual(reply[0], 250, reply)
        self.assertLess(waited, 5.0)
        [stored] = server.messages("alice")
        header = results_header(stored)
        self.assertIn("spf=fail", header)
        self.assertIn("dkim=pass", header)
        self.assertIn("dmarc=pass", header)

    @defer.inlineCallbacks
    def test_forged_results_are_replaced_by_ours(self) -> None:
        server = self.start()
        forged = (
            f"Authentication-Results: {AUTHSERV.upper()}; spf=pass; dkim=pass; dmarc=pass\r\n"
        ).encode() + self.message("ceo@bank.test")
        replies = yield self.send(server, "198.51.100.7", "ceo@bank.test", forged)
        self.assertEqual(replies[5][0], 250)
        stored = server.messages("alice")[0]
        self.assertEqual(stored.count(b"Authentication-Results:"), 1)
        self.assertIn("spf=pass", results_header(stored))

    @defer.inlineCallbacks
    def test_header_is_folded_to_78_columns(self) -> None:
        server = self.start()
        yield self.send(server, "203.0.113.5", "news@good.test", self.message("news@good.test"))
        head = server.messages("alice")[0].split(b"\n\n", 1)[0]
        start = head.index(b"Authentication-Results:")
        field = head[start:].split(b"\nReceived:")[0].split(b"\n")
        self.assertTrue(all(len(line) <= 78 for line in field), field)


class NoDNSTests(unittest.TestCase):
    """A DNS server that never answers: temporary failures, never a silent pass."""

    @defer.inlineCallbacks
    def test_unreachable_dns_never_gives_permanent_refusal(self) -> None:
        dns = start_dns_server({})
        dns.timeout("anything.test")
        self.addCleanup(dns.stop)
        dns.timeout("_dmarc.anything.test")
        server = start_server(self, auth_config(dns.port))
        body = b"From: a@anything.test\r\nSubject: x\r\n\r\nbody\r\n"
        replies = yield in_thread(
            dialogue, server.port, transaction("c.test", "a@anything.test", body), "203.0.113.77"
        )
        self.assertIn(replies[5][0], (250, 451))
        self.assertNotEqual(replies[5][0] // 100, 5)


class HostileFromTests(unittest.TestCase):
    """From fields made to hide the author from DMARC, or to stall the parser.

    paypal.test publishes p=reject; the forger sends from its own address,
    whose SPF passes but does not align with paypal.test.
    """

    FORGER_IP = "203.0.113.66"

    def setUp(self) -> None:
        self.dns = serve_for_test(
            self,
            {
                "paypal.test": {"TXT": ["v=spf1 -all"]},
                "_dmarc.paypal.test": {"TXT": ["v=DMARC1; p=reject"]},
                "evil.test": {"TXT": ["v=spf1 ip4:203.0.113.0/24 -all"]},
                # IDNA2008 keeps the sharp s; IDNA2003 (Python's codec) made it fass.de.
                "_dmarc.xn--fa-hia.de": {"TXT": ["v=DMARC1; p=reject"]},
                "_dmarc.fass.de": {"TXT": ["v=DMARC1; p=none"]},
                "xn--fa-hia.de": {"TXT": ["v=spf1 -all"]},
            },
        )
        self.server = start_server(self, auth_config(self.dns.port))

    def send(self, header: bytes, mail_from: str = "x@evil.test") -> defer.Deferred:
        body = header + b"To: alice@example.test\r\nSubject: urgent\r\n\r\nPay now.\r\n"
        d = in_thread(
            dialogue, self.server.port, transaction("evil.test", mail_from, body), self.FORGER_IP
        )
        return d.addCallback(lambda replies: replies[5])

    @defer.inlineCallbacks
    def assertRefused(self, header: bytes) -> Any:
        reply = yield self.send(header)
        self.assertEqual(
            reply, (550, b"5.7.1 Rejected by DMARC policy of the sender's domain"), header
        )
        self.assertEqual(self.server.all_messages(), [])

    def test_single_forged_from_is_refused(self) -> Any:
        return self.assertRefused(b"From: PayPal <ceo@paypal.test>\r\n")

    @defer.inlineCallbacks
    def test_a_second_broken_from_cannot_turn_reject_into_inbox(self) -> Any:
        # Each was dmarc=permerror and filed into the inbox.
        for extra in (
            b"From:\r\n",
            b"From: nobody\r\n",
            b"From: PayPal <ceo@paypal.test>\r\n",
        ):
            yield self.assertRefused(b"From: PayPal <ceo@paypal.test>\r\n" + extra)

    @defer.inlineCallbacks
    def test_a_broken_address_beside_the_author_cannot_turn_reject_into_inbox(self) -> Any:
        for extra in (b", x@y", b", <x@[192.0.2.1]>", b", x@"):
            yield self.assertRefused(b"From: PayPal <ceo@paypal.test>" + extra + b"\r\n")

    def test_space_before_the_colon_of_the_first_field_cannot_hide_the_from(self) -> Any:
        return self.assertRefused(b"X-Note : hi\r\nFrom: PayPal <ceo@paypal.test>\r\n")

    def test_obsolete_from_name_is_the_author(self) -> Any:
        return self.assertRefused(b"From : PayPal <ceo@paypal.test>\r\n")

    def test_unicode_author_domain_is_looked_up_as_idna2008(self) -> Any:
        return self.assertRefused("From: CEO <ceo@faß.de>\r\n".encode())

    @defer.inlineCallbacks
    def test_no_from_at_all_goes_to_junk(self) -> Any:
        reply = yield self.send(b"")
        self.assertEqual(reply[0], 250)
        self.assertEqual(self.server.messages("alice"), [])
        [junk] = self.server.messages("alice", folder=".Junk")
        self.assertIn("dmarc=fail", results_header(junk))

    @defer.inlineCallbacks
    def test_sender_text_never_reaches_our_results_as_results(self) -> Any:
        local = '"; dkim=pass header.d=paypal.test; dmarc=pass"'
        reply = yield self.send(b"From: x@evil.test\r\n", mail_from=f"{local}@evil.test")
        self.assertEqual(reply[0], 250)
        [stored] = self.server.messages("alice")
        head = stored.split(b"\n\n", 1)[0].decode()
        ours = re.search(
            rf"^Authentication-Results: {re.escape(AUTHSERV)};.*(?:\n[ \t].*)*", head, re.M
        ).group(0)
        self.assertNotIn("paypal", ours)
        self.assertEqual(ours.count("dkim="), 1)
        self.assertEqual(ours.count("dmarc="), 1)
        parsed = authres.FeatureContext(authres.dmarc).parse(re.sub(r"\n[ \t]", " ", ours))
        self.assertEqual(
            [(r.method, r.result) for r in parsed.results],
            [("spf", "pass"), ("dkim", "none"), ("dmarc", "none")],
        )
        [spf_result] = [r for r in parsed.results if r.method == "spf"]
        self.assertEqual(spf_result.smtp_mailfrom, "evil.test")

    @defer.inlineCallbacks
    def test_two_60_kb_from_fields_do_not_stall_other_clients(self) -> Any:
        # The stdlib parser took 33 s for each on the reactor thread (answers
        # cached by a first message, so the checks ran inline).
        yield self.send(b"From: x@evil.test\r\n")
        hostile = (
            b"From: " + b'"' * 60_000 + b"\r\n" + b"From: " + b"(" * 60_000 + b"\r\n"
            b"To: alice@example.test\r\nSubject: slow\r\n\r\nbody\r\n"
        )
        reply, waited = yield in_thread(
            hostile_message, self.server.port, hostile,
            mail_from="x@evil.test", proxy_from=self.FORGER_IP,
        )
        self.assertEqual(reply[0], 250, reply)
        self.assertLess(waited, 5.0)
        [junk] = self.server.messages("alice", folder=".Junk")
        self.assertIn("dmarc=fail", results_header(junk))
