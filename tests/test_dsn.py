# -*- test-case-name: tests.test_dsn -*-
"""Bounces and delay notices: RFC 3464 reports, and never one for a bounce or to <>."""

from __future__ import annotations

import email
import email.policy
import json
import time

from twisted.trial import unittest

from mailx.inbound.delivery import split_header
from mailx.outbound.dsn import (
    MAX_RETURNED_HEADER,
    bounce_message,
    delay_message,
    is_report,
    notice_refusal,
    returned_header,
    wants_notice,
)
from mailx.storage.queue import FAILED, PENDING, Envelope, Recipient

HEADER = (
    b"Received: from mail.sender.test\r\n\tby mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"Subject: lunch?\r\n"
)


def failed_envelope(
    sender: str = "alice@sender.test",
    kind: str = "forward",
    spf: str | None = None,
    dmarc: str | None = None,
) -> Envelope:
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
        spf=spf,
        dmarc=dmarc,
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

    def test_report_type_in_any_case_order_and_quoting(self) -> None:
        for value in (
            b'multipart/report; boundary="x"; report-type=delivery-status',
            b"MULTIPART/Report ;\r\n report-type = \"Delivery-Status\"",
            b"multipart/report;report-type=delivery-status",
        ):
            self.assertTrue(is_report(HEADER + b"Content-Type: " + value + b"\r\n"), value)

    def test_other_reports_and_other_fields_are_not_delivery_reports(self) -> None:
        for field in (
            b"Content-Type: multipart/report; report-type=disposition-notification\r\n",
            b"Content-Type: text/plain; report-type=delivery-status\r\n",
            b"X-Content-Type: multipart/report; report-type=delivery-status\r\n",
            b"Subject: multipart/report; report-type=delivery-status\r\n",
        ):
            self.assertFalse(is_report(HEADER + field), field)

    def test_only_the_first_content_type_counts(self) -> None:
        header = (
            HEADER
            + b"Content-Type: text/plain\r\n"
            + b"Content-Type: multipart/report; report-type=delivery-status\r\n"
        )
        self.assertFalse(is_report(header))


def hostile_content_type(size: int = 250 * 1024) -> bytes:
    """A folded Content-Type of ``multipart/report;`` repeated (issue 9, item 9)."""
    line = b"\tmultipart/report;" * 50 + b"\r\n"
    return b"Content-Type: multipart/report;\r\n" + line * (size // len(line))


class HostileHeaderTests(unittest.TestCase):
    """is_report ran a backtracking regex: 250 KiB of ``multipart/report;`` took 15 s."""

    def test_repeated_multipart_report_is_linear(self) -> None:
        header = HEADER + hostile_content_type()
        start = time.perf_counter()
        self.assertFalse(is_report(header))
        # Generous: linear is about a millisecond; the old regex took seconds.
        self.assertLess(time.perf_counter() - start, 1.0)

    def test_many_continuation_lines_are_linear(self) -> None:
        header = b"Content-Type: multipart/report;\r\n" + b" x;\r\n" * 60_000
        start = time.perf_counter()
        self.assertFalse(is_report(header))
        self.assertLess(time.perf_counter() - start, 1.0)


class ReturnedHeaderTests(unittest.TestCase):
    def test_small_header_is_returned_whole(self) -> None:
        self.assertEqual(returned_header(HEADER), (HEADER, False))

    def test_big_header_is_cut_at_a_field_boundary(self) -> None:
        header = HEADER + b"X-Pad: " + b"y" * 900 + b"\r\n\t" + b"z" * 900 + b"\r\n"
        header = header * 40
        cut, was_cut = returned_header(header)
        self.assertTrue(was_cut)
        self.assertLessEqual(len(cut), MAX_RETURNED_HEADER)
        self.assertGreater(len(cut), MAX_RETURNED_HEADER - 2000)
        # Whole fields of the original, in order: a subsequence of its fields.
        fields = iter(split_header(header))
        self.assertTrue(all(field in fields for field in split_header(cut)))
        self.assertEqual(b"".join(split_header(cut)), cut)

    def test_a_field_with_an_over_long_line_is_left_out(self) -> None:
        header = b"Subject: hi\r\nX-Long: " + b"y" * 2000 + b"\r\nFrom: a@sender.test\r\n"
        self.assertEqual(
            returned_header(header), (b"Subject: hi\r\nFrom: a@sender.test\r\n", True)
        )

    def test_eight_bit_header_is_declared(self) -> None:
        env = failed_envelope()
        header = HEADER + "Subject: caf\u00e9\r\n".encode()
        data = bounce_message("mx.example.test", env, env.recipients, header, 0.0)
        self.assertIn(b"Content-Transfer-Encoding: 8bit", data)
        data = bounce_message("mx.example.test", env, env.recipients, HEADER, 0.0)
        self.assertIn(b"Content-Transfer-Encoding: 7bit", data)

    def test_one_huge_field_is_left_out_and_the_later_ones_kept(self) -> None:
        header = b"Subject: hi\r\n" + hostile_content_type() + b"Message-ID: <1@x>\r\n"
        self.assertEqual(
            returned_header(header), (b"Subject: hi\r\nMessage-ID: <1@x>\r\n", True)
        )

    def test_many_continuation_lines_are_linear(self) -> None:
        header = b"Content-Type: multipart/report;\r\n" + b" x;\r\n" * 60_000
        start = time.perf_counter()
        self.assertEqual(returned_header(header + b"Subject: a\r\n"), (b"Subject: a\r\n", True))
        self.assertLess(time.perf_counter() - start, 1.0)

    def test_bounce_of_a_huge_header_is_small_and_says_so(self) -> None:
        env = failed_envelope()
        data = bounce_message(
            "mx.example.test", env, env.recipients, HEADER + hostile_content_type(), 0.0
        )
        self.assertLess(len(data), MAX_RETURNED_HEADER + 4096)
        self.assertIn(b"Subject: lunch?", data)
        self.assertIn(b"only its first fields are returned", data)
        self.assertNotIn(b"\tmultipart/report;", data)


class BackscatterRuleTests(unittest.TestCase):
    """Item 16: a notice only to a sender the checks at reception authenticated."""

    def test_spf_pass_gets_a_notice(self) -> None:
        self.assertTrue(wants_notice(failed_envelope(spf="pass", dmarc="none"), HEADER))

    def test_dmarc_pass_gets_a_notice(self) -> None:
        # DMARC passed through an aligned DKIM signature; SPF said nothing.
        self.assertTrue(wants_notice(failed_envelope(spf="none", dmarc="pass"), HEADER))
        self.assertTrue(wants_notice(failed_envelope(spf="softfail", dmarc="pass"), HEADER))

    def test_never_when_spf_failed(self) -> None:
        for dmarc in ("pass", "none", "fail", None):
            env = failed_envelope(spf="fail", dmarc=dmarc)
            self.assertFalse(wants_notice(env, HEADER), dmarc)
            self.assertIn("spf=fail", notice_refusal(env, HEADER))

    def test_never_when_dmarc_failed(self) -> None:
        for spf in ("pass", "none", None):
            self.assertFalse(wants_notice(failed_envelope(spf=spf, dmarc="fail"), HEADER), spf)

    def test_nothing_authenticated_gets_no_notice(self) -> None:
        for spf in ("none", "neutral", "softfail", "temperror", "permerror"):
            for dmarc in ("none", "temperror", "permerror", None):
                env = failed_envelope(spf=spf, dmarc=dmarc)
                self.assertFalse(wants_notice(env, HEADER), (spf, dmarc))

    def test_checks_off_keeps_the_old_rule(self) -> None:
        self.assertTrue(wants_notice(failed_envelope(spf=None, dmarc=None), HEADER))

    def test_entry_queued_before_the_results_were_recorded_still_bounces(self) -> None:
        raw = json.loads(failed_envelope(spf="fail").to_json())
        del raw["spf"], raw["dmarc"]
        old = Envelope.from_json(json.dumps(raw).encode())
        self.assertEqual((old.spf, old.dmarc), (None, None))
        self.assertTrue(wants_notice(old, HEADER))

    def test_results_survive_the_queue(self) -> None:
        env = Envelope.from_json(failed_envelope(spf="fail", dmarc="none").to_json())
        self.assertEqual((env.spf, env.dmarc), ("fail", "none"))


class QuotedSenderTests(unittest.TestCase):
    def test_to_field_quotes_a_local_part_that_needs_it(self) -> None:
        for sender, to in (
            ("john smith@sender.test", '<"john smith"@sender.test>'),
            ("a@b@sender.test", '<"a@b"@sender.test>'),
            ('a"b\\c@sender.test', '<"a\\"b\\\\c"@sender.test>'),
            ("plain.name@sender.test", "<plain.name@sender.test>"),
        ):
            env = failed_envelope(sender=sender)
            message = parse(bounce_message("mx.example.test", env, env.recipients, HEADER, 0.0))
            self.assertEqual(message["To"], to)
