# -*- test-case-name: tests.test_dsn -*-
"""Bounces and delay notices: RFC 3464 reports, and never one for a bounce or to <>."""

from __future__ import annotations

import email
import email.policy

from twisted.trial import unittest

from mailx.dsn import bounce_message, delay_message, is_report, wants_notice
from mailx.queue import FAILED, PENDING, Envelope, Recipient

HEADER = (
    b"Received: from mail.sender.test\r\n\tby mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"Subject: lunch?\r\n"
)


def failed_envelope(sender: str = "alice@sender.test", kind: str = "forward") -> Envelope:
    r = Recipient(
        address="someone@outside.test",
        original="boss@example.test",
        mail_from="SRS0=x@example.test",
        state=FAILED,
        attempts=1,
        last_attempt=1_700_000_100.0,
        last_reply="550 5.1.1 <someone@outside.test>: no such user",
        last_host="mx.outside.test[127.0.0.1]:25",
        remote_mta="mx.outside.test",
        status="5.1.1",
    )
    return Envelope(
        id="65F00000000001",
        sender=sender,
        created=1_700_000_000.0,
        kind=kind,
        client="mail.sender.test",
        recipients=[r],
    )


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


class BounceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.envelope = failed_envelope()
        self.data = bounce_message(
            "mx.example.test", self.envelope, self.envelope.recipients, HEADER, 1_700_000_200.0
        )
        self.message = parse(self.data)

    def test_is_a_multipart_report(self) -> None:
        self.assertEqual(self.message.get_content_type(), "multipart/report")
        self.assertEqual(self.message.get_param("report-type"), "delivery-status")
        types = [p.get_content_type() for p in self.message.get_payload()]
        self.assertEqual(types, ["text/plain", "message/delivery-status", "text/rfc822-headers"])

    def test_addressed_from_mailer_daemon_to_the_original_sender(self) -> None:
        self.assertEqual(
            self.message["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
        )
        self.assertEqual(self.message["To"], "<alice@sender.test>")
        self.assertEqual(self.message["Auto-Submitted"], "auto-replied")

    def test_delivery_status_fields(self) -> None:
        status = self.message.get_payload()[1]
        per_message, per_recipient = status.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns;mx.example.test")
        self.assertEqual(per_message["Received-From-MTA"], "dns;mail.sender.test")
        self.assertIn("Arrival-Date", per_message)
        self.assertEqual(per_recipient["Final-Recipient"], "rfc822;someone@outside.test")
        self.assertEqual(per_recipient["Original-Recipient"], "rfc822;boss@example.test")
        self.assertEqual(per_recipient["Action"], "failed")
        self.assertEqual(per_recipient["Status"], "5.1.1")
        self.assertEqual(per_recipient["Remote-MTA"], "dns;mx.outside.test")
        self.assertEqual(
            per_recipient["Diagnostic-Code"], "smtp;550 5.1.1 <someone@outside.test>: no such user"
        )

    def test_carries_the_original_header_section(self) -> None:
        headers = self.message.get_payload()[2].get_payload()
        self.assertIn("Subject: lunch?", headers)
        self.assertIn("From: Alice <alice@sender.test>", headers)

    def test_human_part_names_the_recipient_and_the_reply(self) -> None:
        text = self.message.get_payload()[0].get_payload()
        self.assertIn("<someone@outside.test> (sent to <boss@example.test>)", text)
        self.assertIn("550 5.1.1", text)

    def test_lines_are_crlf_and_short(self) -> None:
        self.assertNotIn(b"\n", self.data.replace(b"\r\n", b""))
        self.assertTrue(all(len(line) <= 998 for line in self.data.split(b"\r\n")))

    def test_is_itself_recognised_as_a_report(self) -> None:
        head = self.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        self.assertTrue(is_report(head))

    def test_unprintable_remote_text_is_made_safe(self) -> None:
        env = failed_envelope()
        env.recipients[0].last_reply = "550 5.1.1 bad\x00 \x1b[31m \u00e9" + "x" * 2000
        data = bounce_message("mx.example.test", env, env.recipients, HEADER, 0.0)
        data.decode("ascii")
        self.assertTrue(all(len(line) <= 998 for line in data.split(b"\r\n")))


class DelayTests(unittest.TestCase):
    def test_delay_notice(self) -> None:
        env = failed_envelope()
        env.recipients[0].state = PENDING
        env.recipients[0].status = "4.2.0"
        data = delay_message(
            "mx.example.test", env, env.recipients, HEADER, 1_700_014_400.0, 1_700_432_000.0
        )
        message = parse(data)
        self.assertIn("Delayed Mail", message["Subject"])
        per_recipient = message.get_payload()[1].get_payload()[1]
        self.assertEqual(per_recipient["Action"], "delayed")
        self.assertEqual(per_recipient["Status"], "4.2.0")
        self.assertIn("Will-Retry-Until", per_recipient)


class NoticeRuleTests(unittest.TestCase):
    def test_ordinary_forward_gets_a_notice(self) -> None:
        self.assertTrue(wants_notice(failed_envelope(), HEADER))

    def test_never_to_the_null_sender(self) -> None:
        self.assertFalse(wants_notice(failed_envelope(sender=""), HEADER))

    def test_never_for_our_own_notices(self) -> None:
        self.assertFalse(wants_notice(failed_envelope(kind="bounce"), HEADER))
        self.assertFalse(wants_notice(failed_envelope(kind="delay"), HEADER))

    def test_never_for_a_delivery_report_whatever_its_sender(self) -> None:
        header = (
            HEADER
            + b'Content-Type: multipart/report;\r\n\treport-type="delivery-status"; boundary=x\r\n'
        )
        self.assertFalse(wants_notice(failed_envelope(), header))

    def test_other_multiparts_are_not_reports(self) -> None:
        header = HEADER + b"Content-Type: multipart/mixed; boundary=x\r\n"
        self.assertFalse(is_report(header))
        self.assertTrue(wants_notice(failed_envelope(), header))
