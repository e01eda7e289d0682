# -*- test-case-name: tests.test_smtp -*-
"""The SMTP dialogue, line by line, over StringTransport with a controllable clock.

These pin down the protocol layer alone (replies, ordering, limits, framing);
tests/test_server.py proves the same things over real sockets end to end.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailx.inbound.spool import SPILL_AT, SpoolBuffer
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError
from mailx.smtp.server import CLOSE_GRACE, MAX_DATA_LINE, MailxSMTPFactory


def make_config(**limits: object) -> SimpleNamespace:
    base = dict(
        message_size=10_000,
        recipients=3,
        connections=2,
        connections_per_ip=1,
        idle_timeout=60.0,
        session_timeout=600.0,
        error_limit=20,
        connection_rate_per_ip=0,
        greeting_delay=0.0,
        junk_commands=100,
        ipv6_prefix_length=64,
    )
    base.update(limits)
    return SimpleNamespace(
        hostname="mx.example.test",
        limits=SimpleNamespace(**base),
        haproxy_trusted_networks=("127.0.0.0/8", "::1/128"),
    )


class RecordingMessage:
    def __init__(self, owner: FakeDelivery) -> None:
        self.owner = owner
        self.data = b""
        self.lost = False

    def dataReceived(self, chunk: bytes) -> None:
        self.data += chunk

    def eomReceived(self) -> object:
        self.owner.delivered.append(self.data)
        return self.owner.eom_result

    def connectionLost(self) -> None:
        self.lost = True


class FakeDelivery:
    """Accepts example.test recipients; optionally answers through Deferreds."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.pending: list[defer.Deferred] = []
        self.slow = False
        self.eom_result: object = None
        self.messages: list[RecordingMessage] = []

    def _maybe_slow(self, value: object) -> object:
        if not self.slow:
            return value
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, value))
        return d

    def release(self) -> None:
        """Fire the oldest pending check (as a slow DNS answer would)."""
        d, value = self.pending.pop(0)
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)

    def mail(self, qid: str, sender: str, size: int) -> object:
        return self._maybe_slow(None)

    def rcpt(self, qid: str, recipient: str) -> object:
        if not recipient.endswith("@example.test"):
            error = SMTPReplyError(replies.RELAY_DENIED)
            if self.slow:
                return self._maybe_slow(error)
            raise error
        return self._maybe_slow(recipient)

    def data(self, qid: str, sender: str, routes: list) -> RecordingMessage:
        message = RecordingMessage(self)
        self.messages.append(message)
        return message

    def disconnected(self) -> None:
        pass


class Dialogue:
    """One protocol instance on a StringTransport; ``send`` returns the new replies."""

    def __init__(self, factory: MailxSMTPFactory, peer: str = "192.0.2.1") -> None:
        self.clock = Clock()
        self.proto = factory.buildProtocol(None)
        self.proto.callLater = self.clock.callLater
        self.transport = StringTransport(peerAddress=SimpleNamespace(host=peer, port=4000))
        self.proto.makeConnection(self.transport)

    def output(self) -> list[bytes]:
        value = self.transport.value()
        self.transport.clear()
        return [line for line in value.split(b"\r\n") if line]

    def send(self, data: bytes) -> list[bytes]:
        self.proto.dataReceived(data)
        return self.output()

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.send(data) if line[3:4] == b" "]


class SMTPDialogueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.delivery = FakeDelivery()
        self.factory = MailxSMTPFactory(make_config(), lambda session: self.delivery)
        self.d = Dialogue(self.factory)
        self.banner = self.d.output()

    def ehlo(self) -> list[bytes]:
        return self.d.send(b"EHLO client.test\r\n")

    def test_banner_names_host(self) -> None:
        self.assertEqual(self.banner, [b"220 mx.example.test ESMTP mailx"])

    def test_ehlo_advertises_extensions(self) -> None:
        lines = self.ehlo()
        self.assertEqual(
            lines,
            [
                b"250-mx.example.test Hello 192.0.2.1",
                b"250-PIPELINING",
                b"250-SIZE 10000",
                b"250-8BITMIME",
                b"250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_ehlo_without_name_is_501(self) -> None:
        self.assertEqual(self.d.send(b"EHLO\r\n"), [b"501 5.5.4 HELO/EHLO needs a domain or address"])

    def test_mail_before_helo_is_503(self) -> None:
        self.assertEqual(self.d.codes(b"MAIL FROM:<a@b.test>\r\n"), [503])

    def test_full_transaction(self) -> None:
        self.ehlo()
        replies_ = self.d.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        )
        self.assertEqual(
            replies_,
            [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK",
             b"354 Start mail input; end with <CRLF>.<CRLF>"],
        )
        self.assertEqual(self.d.codes(b"Subject: x\r\n\r\nbody\r\n.\r\n"), [250])
        self.assertEqual(self.delivery.delivered, [b"Subject: x\r\n\r\nbody\r\n"])

    def test_dot_unstuffing(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n")
        self.assertEqual(self.delivery.delivered, [b".first\r\nmid\r\n.\r\n..x\r\n"])

    def test_end_of_data_split_across_reads(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        for piece in (b"line one\r", b"\n", b".", b"\r", b"\n"):
            self.d.send(piece)
        self.assertEqual(self.delivery.delivered, [b"line one\r\n"])

    def test_relay_denied(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        self.assertEqual(
            self.d.send(b"RCPT TO:<x@elsewhere.test>\r\n"), [b"550 5.7.1 Relaying denied"]
        )

    def test_recipient_limit_is_452(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        for i in range(3):
            self.assertEqual(self.d.codes(b"RCPT TO:<r%d@example.test>\r\n" % i), [250])
        self.assertEqual(
            self.d.send(b"RCPT TO:<r9@example.test>\r\n"), [b"452 4.5.3 Too many recipients"]
        )

    def test_declared_size_too_large_is_552(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.d.send(b"MAIL FROM:<a@sender.test> SIZE=10001\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(self.d.codes(b"MAIL FROM:<a@sender.test> SIZE=10000\r\n"), [250])

    def test_counted_size_too_large_is_552_and_nothing_delivered(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.codes((b"x" * 998 + b"\r\n") * 11 + b".\r\n"), [552])
        self.assertEqual(self.delivery.delivered, [])
        self.assertTrue(self.delivery.messages[0].lost)
        self.assertEqual(self.d.codes(b"NOOP\r\n"), [250])

    def test_unknown_parameter_is_555(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.codes(b"MAIL FROM:<a@b.test> FOO=BAR\r\n"), [555])

    def test_bad_sender_syntax_is_501(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.send(b"MAIL FROM:<a b@c>\r\n")[0][:9], b"501 5.1.7")

    def test_bad_recipient_syntax_is_501(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\n")
        self.assertEqual(self.d.send(b"RCPT TO:<@@>\r\n")[0][:9], b"501 5.1.3")

    def test_command_line_over_512_octets_is_500(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.d.send(b"NOOP " + b"x" * 506 + b"\r\n"), [b"500 5.5.2 Line too long"]
        )
        self.assertEqual(self.d.codes(b"NOOP " + b"x" * 505 + b"\r\n"), [250])

    def test_command_line_over_4k_closes_however_it_arrives(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.send(b"NOOP " + b"x" * 5000 + b"\r\n"), [b"500 5.5.2 Line too long"])
        self.assertTrue(self.d.transport.disconnecting)

    def test_nul_in_command_is_500(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.send(b"NOOP\0\r\n"), [b"500 5.5.2 NUL character in command"])

    def test_unterminated_command_flood_closes(self) -> None:
        self.d.send(b"A" * 5000)
        self.assertTrue(self.d.transport.disconnecting)

    def test_data_line_up_to_64k_is_accepted(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 1_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.codes(b"y" * MAX_DATA_LINE + b"\r\n.\r\n"), [250])

    def test_data_line_over_64k_refuses_and_closes(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 1_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        out = self.d.send(
            b"y" * (MAX_DATA_LINE + 1) + b"\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<bob@example.test>\r\n"
        )
        self.assertEqual(out, [b"500 5.5.6 Line too long in message data, message refused"])
        self.assertTrue(self.d.transport.disconnecting)
        self.assertEqual(self.delivery.delivered, [])

    def test_data_partial_line_over_64k_closes(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"z" * (MAX_DATA_LINE + 10))
        self.assertTrue(self.d.transport.disconnecting)

    def test_longest_data_line_with_crlf_split_across_reads(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 1_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"y" * MAX_DATA_LINE + b"\r")
        self.assertEqual(self.d.codes(b"\n.\r\n"), [250])

    def test_helo_with_control_characters_is_501(self) -> None:
        self.assertEqual(
            self.d.send(b"EHLO a\nforged log line\r\n"),
            [b"501 5.5.4 Control characters in HELO/EHLO"],
        )

    def test_bare_lf_and_cr_are_normalised(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"a\nb\rc\r\n.\r\n")
        self.assertEqual(self.delivery.delivered, [b"a\r\nb\r\nc\r\n"])

    def test_hang_up_during_end_of_data_abandons_the_message(self) -> None:
        abandoned = []
        self.delivery.eom_result = defer.Deferred()
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.delivery.messages[-1].abandon = lambda: abandoned.append(True)
        self.d.proto.connectionLost(None)
        self.assertEqual(abandoned, [True])
        self.delivery.eom_result.errback(defer.CancelledError())  # nothing logged, no reply
        self.assertEqual(self.d.output(), [])

    def test_pipelined_burst_with_slow_checks_replies_in_order(self) -> None:
        self.delivery.slow = True
        self.ehlo()
        burst = (
            b"MAIL FROM:<a@sender.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<x@elsewhere.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n"
        )
        self.assertEqual(self.d.send(burst), [])
        # Still read while a check runs, so that a hang-up is noticed.
        self.assertEqual(self.d.transport.producerState, "producing")
        seen = []
        while self.delivery.pending:
            self.delivery.release()
            seen.extend(self.d.output())
        self.assertEqual(self.d.transport.producerState, "producing")
        seen += self.d.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(
            seen,
            [
                b"250 2.1.0 Sender OK",
                b"250 2.1.5 Recipient OK",
                b"550 5.7.1 Relaying denied",
                b"250 2.1.5 Recipient OK",
                b"354 Start mail input; end with <CRLF>.<CRLF>",
                b"250 2.0.0 OK",
                b"221 2.0.0 Bye",
            ],
        )
        self.assertEqual(self.delivery.delivered, [b"Subject: pipelined\r\n\r\nbody\r\n"])

    def test_input_piling_up_behind_a_check_stops_reading(self) -> None:
        self.delivery.slow = True
        self.factory.limits.junk_commands = 10**9
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n" + b"NOOP\r\n" * 20_000)
        self.assertEqual(self.d.transport.producerState, "paused")
        self.delivery.release()
        self.assertEqual(len(self.d.output()), 20_001)
        self.assertEqual(self.d.transport.producerState, "producing")

    def test_content_pipelined_after_data_is_554_and_closes(self) -> None:
        self.delivery.slow = True
        self.ehlo()
        self.d.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            b"Subject: early\r\n\r\nbody\r\n.\r\n"
        )
        seen = []
        while self.delivery.pending:
            self.delivery.release()
            seen.extend(self.d.output())
        self.assertEqual(
            seen,
            [
                b"250 2.1.0 Sender OK",
                b"250 2.1.5 Recipient OK",
                b"554 5.5.0 Protocol error: message content sent before the 354 reply",
            ],
        )
        self.assertTrue(self.d.transport.disconnecting)
        self.assertEqual(self.delivery.messages, [])

    def test_data_alone_in_its_read_gets_354(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.d.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"),
            [250, 250, 354],
        )
        self.assertEqual(self.d.codes(b"x\r\n.\r\n"), [250])

    def test_eom_tempfail_is_451_not_550(self) -> None:
        self.delivery.eom_result = defer.fail(SMTPReplyError(replies.LOCAL_ERROR))
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(
            self.d.send(b"x\r\n.\r\n"), [b"451 4.3.0 Local error in processing, try again later"]
        )

    def test_unexpected_eom_error_is_451(self) -> None:
        self.delivery.eom_result = defer.fail(OSError("disk gone"))
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.codes(b"x\r\n.\r\n"), [451])
        self.flushLoggedErrors(OSError)

    def test_rset_noop_vrfy_help(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.send(b"RSET\r\n"), [b"250 2.0.0 Reset OK"])
        self.assertEqual(self.d.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])
        self.assertEqual(self.d.codes(b"VRFY alice\r\n"), [252])
        self.assertEqual(self.d.codes(b"HELP\r\n"), [214])
        self.assertEqual(self.d.codes(b"EXPN team\r\n"), [502])
        self.assertEqual(self.d.codes(b"FOO\r\n"), [500])

    def test_rset_forgets_the_transaction(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\n")
        self.assertEqual(self.d.codes(b"DATA\r\n"), [503])

    def test_data_needs_recipients(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\n")
        self.assertEqual(self.d.send(b"DATA\r\n"), [b"503 5.5.1 Need RCPT before DATA"])

    def test_starttls_unavailable_without_certificate(self) -> None:
        self.ehlo()
        self.assertEqual(self.d.send(b"STARTTLS\r\n"), [b"454 4.7.0 TLS not available"])

    def test_idle_timeout_closes_with_421(self) -> None:
        self.d.clock.advance(59)
        self.assertFalse(self.d.transport.disconnecting)
        self.d.send(b"NOOP\r\n")
        self.d.clock.advance(59)
        self.assertFalse(self.d.transport.disconnecting)
        self.d.clock.advance(2)
        self.assertEqual(self.d.output(), [b"421 4.4.2 Idle timeout, closing connection"])
        self.assertTrue(self.d.transport.disconnecting)

    def test_session_deadline_closes_even_when_busy(self) -> None:
        for _ in range(19):
            self.d.clock.advance(30)
            self.assertEqual(self.d.codes(b"NOOP\r\n"), [250])
        self.d.clock.advance(31)
        self.assertIn(b"421 4.4.2 Session too long, closing connection", self.d.output())
        self.assertTrue(self.d.transport.disconnecting)

    def test_error_limit_closes_session(self) -> None:
        self.factory.limits.error_limit = 3
        self.d.send(b"BAD\r\n")
        self.assertEqual(self.d.codes(b"BAD\r\n"), [500])
        self.d.clock.advance(1)
        self.assertFalse(self.d.transport.disconnecting)
        self.assertEqual(
            self.d.send(b"BAD\r\nNOOP\r\n")[-1], b"421 4.7.0 Too many errors, closing connection"
        )
        self.assertTrue(self.d.transport.disconnecting)

    def test_errors_past_half_the_limit_slow_the_session_down(self) -> None:
        self.factory.limits.error_limit = 4
        self.assertEqual(self.d.codes(b"BAD\r\nBAD\r\nBAD\r\nNOOP\r\n"), [500, 500, 500])
        self.assertEqual(self.d.transport.producerState, "paused")
        self.d.clock.advance(0.9)
        self.assertEqual(self.d.output(), [])
        self.d.clock.advance(0.1)
        self.assertEqual(self.d.output(), [b"250 2.0.0 OK"])

    def test_shutdown_closes_idle_session_with_421(self) -> None:
        self.ehlo()
        self.factory.shutdown()
        self.assertEqual(self.d.output(), [b"421 4.3.2 Service shutting down, try again later"])
        self.assertTrue(self.d.transport.disconnecting)

    def test_shutdown_lets_a_message_in_data_finish(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.d.send(b"Subject: x\r\n")
        self.factory.shutdown()
        self.assertFalse(self.d.transport.disconnecting)
        self.assertEqual(
            self.d.codes(b"\r\nbody\r\n.\r\nMAIL FROM:<>\r\n"), [250, 421]
        )
        self.assertEqual(self.delivery.delivered, [b"Subject: x\r\n\r\nbody\r\n"])
        self.assertTrue(self.d.transport.disconnecting)

    def test_quit_ignores_what_follows(self) -> None:
        self.assertEqual(self.d.codes(b"QUIT\r\nNOOP\r\n"), [221])


    def test_junk_commands_over_the_limit_are_421_and_close(self) -> None:
        self.factory.limits.junk_commands = 3
        self.assertEqual(self.d.codes(b"NOOP\r\nRSET\r\nHELP\r\n"), [250, 250, 214])
        self.assertEqual(
            self.d.send(b"VRFY alice\r\nNOOP\r\n"),
            [b"421 4.7.0 Too many commands without mail, closing connection"],
        )
        self.assertTrue(self.d.transport.disconnecting)

    def test_a_delivered_message_restarts_the_junk_count(self) -> None:
        self.factory.limits.junk_commands = 2
        self.ehlo()
        self.assertEqual(self.d.codes(b"NOOP\r\nRSET\r\n"), [250, 250])
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.codes(b"x\r\n.\r\n"), [250])
        self.assertEqual(self.d.codes(b"RSET\r\nNOOP\r\nNOOP\r\n"), [250, 250, 421])

    def test_refused_recipients_get_the_error_pause(self) -> None:
        self.factory.limits.error_limit = 4
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        out = self.d.send(b"RCPT TO:<x@elsewhere.test>\r\n" * 3 + b"RCPT TO:<alice@example.test>\r\n")
        self.assertEqual(out, [b"550 5.7.1 Relaying denied"] * 3)
        self.assertEqual(self.d.transport.producerState, "paused")
        self.d.clock.advance(0.9)
        self.assertEqual(self.d.output(), [])
        self.d.clock.advance(0.1)
        self.assertEqual(self.d.output(), [b"250 2.1.5 Recipient OK"])
        self.assertEqual(self.d.transport.producerState, "producing")

    def test_refused_recipients_reach_the_error_limit(self) -> None:
        self.factory.limits.error_limit = 3
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        self.d.send(b"RCPT TO:<x@elsewhere.test>\r\n" * 2)
        self.d.clock.advance(1)
        self.assertEqual(
            self.d.send(b"RCPT TO:<y@elsewhere.test>\r\n"),
            [b"550 5.7.1 Relaying denied", b"421 4.7.0 Too many errors, closing connection"],
        )
        self.assertTrue(self.d.transport.disconnecting)

    def test_slow_refusal_pauses_after_its_reply_in_order(self) -> None:
        self.factory.limits.error_limit = 4
        self.delivery.slow = True
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        self.delivery.release()
        self.d.output()
        self.d.send(b"RCPT TO:<x@elsewhere.test>\r\n" * 3 + b"NOOP\r\n")
        seen = []
        while self.delivery.pending:
            self.delivery.release()
            seen += self.d.output()
        self.assertEqual(seen, [b"550 5.7.1 Relaying denied"] * 3)
        self.d.clock.advance(1)
        self.assertEqual(self.d.output(), [b"250 2.0.0 OK"])

    def test_unread_replies_stop_processing_and_reading(self) -> None:
        self.ehlo()
        self.d.proto.pauseProducing()  # what the transport does at its high-water mark
        self.assertEqual(self.d.send(b"NOOP\r\nNOOP\r\n"), [])
        self.assertEqual(self.d.transport.producerState, "paused")
        self.d.proto.resumeProducing()
        self.assertEqual(self.d.output(), [b"250 2.0.0 OK", b"250 2.0.0 OK"])
        self.assertEqual(self.d.transport.producerState, "producing")

    def test_backlog_cleared_during_a_check_reads_again(self) -> None:
        self.delivery.slow = True
        self.ehlo()
        self.d.send(b"MAIL FROM:<a@sender.test>\r\n")
        self.d.proto.pauseProducing()
        self.d.send(b"NOOP\r\n")
        self.assertEqual(self.d.transport.producerState, "paused")
        self.d.proto.resumeProducing()
        self.assertEqual(self.d.transport.producerState, "producing")
        self.delivery.release()
        self.assertEqual(self.d.output(), [b"250 2.1.0 Sender OK", b"250 2.0.0 OK"])

    def test_session_is_the_transports_producer(self) -> None:
        self.assertIs(self.d.transport.producer, self.d.proto)
        self.assertTrue(self.d.transport.streaming)

    def test_close_unregisters_the_producer(self) -> None:
        # A registered producer would keep a Twisted transport open after loseConnection.
        self.d.send(b"QUIT\r\n")
        self.assertIsNone(self.d.transport.producer)
        self.assertTrue(self.d.transport.disconnecting)

    def test_close_while_replies_are_unread_aborts(self) -> None:
        self.d.proto.pauseProducing()
        self.d.clock.advance(60)  # idle timeout
        self.assertTrue(self.d.transport.disconnecting)
        self.assertIsNone(self.d.transport.producer)

    def test_many_pipelined_commands_in_one_read(self) -> None:
        self.factory.limits.junk_commands = 10**9
        out = self.d.send(b"NOOP\r\n" * 20_000)
        self.assertEqual(len(out), 20_000)
        self.assertEqual(self.d.proto.dialogue.buffered, 0)

    def test_bare_lf_lines_are_measured_as_normalised(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 10_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        body = b"Subject: lf\n\n" + (b"b" * 76 + b"\n") * 30_000  # 2.3 MB, no CRLF
        for i in range(0, len(body), 65536):
            self.assertEqual(self.d.send(body[i : i + 65536]), [])
            self.assertLess(self.d.proto.dialogue.buffered, 65536)
        self.assertEqual(self.d.codes(b"\r\n.\r\n"), [250])
        self.assertEqual(self.delivery.delivered, [body.replace(b"\n", b"\r\n") + b"\r\n"])

    def test_line_over_64k_between_bare_lfs_is_refused(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 10_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        out = self.d.send(b"a\n" + b"y" * (MAX_DATA_LINE + 1) + b"\nz\r\n.\r\n")
        self.assertEqual(out, [b"500 5.5.6 Line too long in message data, message refused"])
        self.assertEqual(self.delivery.delivered, [])

    def test_bare_cr_ends_a_line_for_the_length_too(self) -> None:
        self.ehlo()
        self.factory.limits.message_size = 10_000_000
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.codes((b"c" * 60_000 + b"\r") * 3 + b"\r\n.\r\n"), [250])

    def test_dot_after_a_bare_lf_cut_is_not_the_end_of_data(self) -> None:
        self.ehlo()
        self.d.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.d.send(b"one\n"), [])
        self.assertEqual(self.d.send(b".\r\nMAIL FROM:<x@y.test>\r\n"), [])
        self.assertEqual(self.d.codes(b"two\r\n.\r\n"), [250])
        self.assertEqual(
            self.delivery.delivered, [b"one\r\n.\r\nMAIL FROM:<x@y.test>\r\ntwo\r\n"]
        )


class ConnectionLimitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.factory = MailxSMTPFactory(make_config(), lambda session: FakeDelivery())

    def test_early_talker_is_refused(self) -> None:
        self.factory.limits.greeting_delay = 1.0
        talker = Dialogue(self.factory)
        self.assertEqual(talker.send(b"EHLO spam.test\r\nMAIL FROM:<x@y.test>\r\n"), [])
        talker.clock.advance(1)
        self.assertEqual(talker.output(), [b"554 5.5.0 Protocol error: you spoke before the greeting"])
        self.assertTrue(talker.transport.disconnecting)

    def test_input_before_the_banner_is_bounded_and_not_read(self) -> None:
        self.factory.limits.greeting_delay = 1.0
        talker = Dialogue(self.factory)
        for _ in range(10):
            talker.send(b"x" * 65536)
        self.assertLessEqual(talker.proto.dialogue.buffered, 4096)
        self.assertEqual(talker.transport.producerState, "paused")
        talker.clock.advance(1)
        self.assertEqual(talker.output(), [b"554 5.5.0 Protocol error: you spoke before the greeting"])

    def test_early_talker_that_hangs_up_frees_its_slot(self) -> None:
        self.factory.limits.greeting_delay = 1.0
        talker = Dialogue(self.factory)
        talker.send(b"EHLO x\r\n")
        talker.proto.connectionLost(None)
        self.assertEqual(self.factory.per_ip, {})
        self.assertEqual(talker.clock.getDelayedCalls(), [])

    def test_patient_client_gets_banner_after_pause(self) -> None:
        self.factory.limits.greeting_delay = 1.0
        patient = Dialogue(self.factory)
        self.assertEqual(patient.output(), [])
        patient.clock.advance(1)
        self.assertEqual(patient.output(), [b"220 mx.example.test ESMTP mailx"])
        self.assertEqual(patient.codes(b"EHLO ok.test\r\n"), [250])

    def test_connection_rate_per_ip(self) -> None:
        self.factory.limits.connection_rate_per_ip = 2
        clock = [1000.0]
        self.factory.clock = lambda: clock[0]
        for _ in range(2):
            Dialogue(self.factory, peer="192.0.2.1").proto.connectionLost(None)
        third = Dialogue(self.factory, peer="192.0.2.1")
        self.assertEqual(third.output()[0][:9], b"421 4.7.0")
        self.assertEqual(Dialogue(self.factory, peer="192.0.2.9").output()[0][:3], b"220")
        clock[0] += 61
        self.assertEqual(Dialogue(self.factory, peer="192.0.2.1").output()[0][:3], b"220")

    def test_loopback_is_exempt_from_the_rate(self) -> None:
        self.factory.limits.connection_rate_per_ip = 1
        for _ in range(3):
            d = Dialogue(self.factory, peer="127.0.0.1")
            self.assertEqual(d.output()[0][:3], b"220")
            d.proto.connectionLost(None)

    def test_per_ip_limit_is_421(self) -> None:
        first = Dialogue(self.factory, peer="192.0.2.1")
        second = Dialogue(self.factory, peer="192.0.2.1")
        self.assertEqual(first.output()[0][:3], b"220")
        self.assertEqual(
            second.output(), [b"421 4.7.0 Too many connections from your address, try again later"]
        )
        self.assertTrue(second.transport.disconnecting)

    def test_total_limit_is_421(self) -> None:
        Dialogue(self.factory, peer="192.0.2.1")
        Dialogue(self.factory, peer="192.0.2.2")
        third = Dialogue(self.factory, peer="192.0.2.3")
        self.assertEqual(third.output(), [b"421 4.7.0 Too many connections, try again later"])

    def test_ipv6_clients_count_per_64(self) -> None:
        first = Dialogue(self.factory, peer="2001:db8:1:2::1")
        same_64 = Dialogue(self.factory, peer="2001:db8:1:2:ffff::9")
        self.assertEqual(first.output()[0][:3], b"220")
        self.assertEqual(same_64.output()[0][:9], b"421 4.7.0")
        self.assertEqual(self.factory.per_ip, {"2001:db8:1:2::/64": 1})
        first.proto.connectionLost(None)
        self.assertEqual(self.factory.per_ip, {})

    def test_ipv6_prefix_length_is_configurable(self) -> None:
        self.factory.limits.ipv6_prefix_length = 128
        first = Dialogue(self.factory, peer="2001:db8:1:2::1")
        other = Dialogue(self.factory, peer="2001:db8:1:2::2")
        self.assertEqual([first.output()[0][:3], other.output()[0][:3]], [b"220", b"220"])

    def test_ipv4_mapped_address_counts_as_ipv4(self) -> None:
        self.factory.limits.connections = 5
        Dialogue(self.factory, peer="192.0.2.1")
        mapped = Dialogue(self.factory, peer="::ffff:192.0.2.1")
        self.assertEqual(mapped.output()[0][:9], b"421 4.7.0")

    def test_ipv6_connection_rate_counts_per_64(self) -> None:
        self.factory.limits.connection_rate_per_ip = 2
        self.factory.limits.connections_per_ip = 10
        self.factory.limits.connections = 10
        for host in ("2001:db8::1", "2001:db8::2"):
            Dialogue(self.factory, peer=host).proto.connectionLost(None)
        third = Dialogue(self.factory, peer="2001:db8::3")
        self.assertEqual(third.output()[0][:9], b"421 4.7.0")

    def test_slot_is_released_on_disconnect(self) -> None:
        first = Dialogue(self.factory, peer="192.0.2.1")
        first.proto.connectionLost(None)
        again = Dialogue(self.factory, peer="192.0.2.1")
        self.assertEqual(again.output()[0][:3], b"220")


_commands = st.sampled_from(
    [
        b"EHLO c.test", b"HELO c.test", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<>",
        b"RCPT TO:<alice@example.test>", b"RCPT TO:<x@other.test>", b"DATA", b"RSET",
        b"NOOP", b"VRFY x", b"QUIT", b"STARTTLS", b"\0", b"", b"MAIL FROM:<a@b.test> SIZE=99999",
    ]
)


class DialoguePropertyTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(_commands, st.binary(max_size=40)), max_size=25), st.data())
    def test_every_complete_command_gets_exactly_one_reply(self, lines: list, data: st.DataObject) -> None:
        """Whatever arrives, and however it is split into reads, replies stay one per line."""
        delivery = FakeDelivery()
        factory = MailxSMTPFactory(make_config(error_limit=1000), lambda s: delivery)
        dialogue = Dialogue(factory)
        dialogue.output()
        stream = b"".join(line.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n" for line in lines)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        out = b""
        for piece in pieces:
            dialogue.proto.dataReceived(piece)
            out += dialogue.transport.value()
            dialogue.transport.clear()
        codes = [int(line[:3]) for line in out.split(b"\r\n") if line and line[3:4] == b" "]
        # Walk the input as the server must: one reply per command line, none
        # for message lines, one for the terminating "." line.
        mode = "command"
        for line in stream.split(b"\r\n")[:-1]:
            if mode == "data":
                if line == b".":
                    self.assertTrue(codes, "no reply to the end of data")
                    codes.pop(0)
                    mode = "command"
                continue
            self.assertTrue(codes, f"no reply to {line!r}")
            code = codes.pop(0)
            if code in (221, 421):
                break
            if code == 354:
                mode = "data"
        self.assertEqual(codes, [])


class _SpoolContext:
    """What `mailx.inbound.delivery.IncomingMessage` needs of a DeliveryContext."""

    def __init__(self, incoming: Path) -> None:
        from mailx import headers
        from mailx.inbound.spool import run_inline

        self.incoming = incoming
        self.header_pool = headers.HeaderPool()
        self.in_disk_pool = run_inline  # the spool files appear as the test sends


class SpoolingDelivery(FakeDelivery):
    """FakeDelivery whose messages are the real IncomingMessage, spooling to disk."""

    def __init__(self, incoming: Path) -> None:
        super().__init__()
        self.context = _SpoolContext(incoming)

    def data(self, qid: str, sender: str, routes: list) -> Any:
        from mailx.inbound.delivery import IncomingMessage

        message = IncomingMessage(self, qid, sender, routes)
        self.messages.append(message)
        return message


class SpoolLifetimeTests(unittest.TestCase):
    """The session drops a spilled body's file on every way a DATA can end early.

    A fuzz run once reported a spool file left after a hang-up mid-DATA (h17):
    the server had not yet read up to the hang-up, and removed the file when
    it did.  These pin each ending in order, with the file already on disk.
    """

    LINE = b"f" * 76 + b"\r\n"

    def setUp(self) -> None:
        self.incoming = Path(self.mktemp())
        self.incoming.mkdir(parents=True)
        self.delivery = SpoolingDelivery(self.incoming)
        self.factory = MailxSMTPFactory(make_config(message_size=SPILL_AT * 3), lambda s: self.delivery)
        self.d = Dialogue(self.factory)
        self.d.send(b"EHLO client.test\r\n")
        codes = self.d.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(codes, [250, 250, 354])

    def files(self) -> list[str]:
        return sorted(os.listdir(self.incoming))

    def spill(self) -> None:
        """Past SPILL_AT: the body is now a file."""
        self.d.send(b"Subject: x\r\n\r\n" + self.LINE * (SPILL_AT // len(self.LINE) + 1))
        self.assertEqual(len(self.files()), 1)

    def test_hang_up_after_the_spill_removes_the_file(self) -> None:
        self.spill()
        self.d.proto.connectionLost(None)
        self.assertEqual(self.files(), [])

    def test_hang_up_in_the_read_that_spills_removes_the_file(self) -> None:
        # (c): the last bytes and the hang-up arrive together.
        self.d.send(b"Subject: x\r\n\r\n" + self.LINE * (SPILL_AT // len(self.LINE) + 1) + b"par")
        self.d.proto.connectionLost(None)
        self.assertEqual(self.files(), [])

    def test_too_big_removes_the_file_at_once_and_more_data_makes_none(self) -> None:
        # (e): after _data_failed, the rest of the message is only counted.
        self.spill()
        self.d.send(self.LINE * (2 * SPILL_AT // len(self.LINE) + 10))
        self.assertEqual(self.files(), [])
        self.d.send(self.LINE * (SPILL_AT // len(self.LINE) + 10))
        self.assertEqual(self.files(), [])
        self.assertEqual(self.d.codes(b".\r\n"), [552])
        self.d.proto.connectionLost(None)
        self.assertEqual(self.files(), [])

    def test_line_over_64_kib_after_the_spill_removes_the_file(self) -> None:
        # (d): refused and closed before any hang-up.
        self.spill()
        self.assertEqual(self.d.codes(b"L" * (MAX_DATA_LINE + 10)), [500])
        self.assertTrue(self.d.transport.disconnecting)
        self.assertEqual(self.files(), [])
        self.d.proto.connectionLost(None)
        self.assertEqual(self.files(), [])

    def test_idle_timeout_in_data_after_the_spill_removes_the_file(self) -> None:
        # (g): the server ends the session itself; the file goes at connectionLost.
        self.spill()
        self.d.clock.advance(61)
        self.assertTrue(self.d.transport.disconnecting)
        self.d.proto.connectionLost(None)
        self.assertEqual(self.files(), [])

    def test_input_after_the_hang_up_makes_no_new_file(self) -> None:
        self.spill()
        self.d.proto.connectionLost(None)
        self.d.proto.dataReceived(self.LINE * (SPILL_AT // len(self.LINE) + 10))
        self.assertEqual(self.files(), [])

    def test_a_discarded_buffer_never_spills_again(self) -> None:
        # The spool file has one owner: once discard() ran, no write makes a new one.
        buffer = SpoolBuffer(self.incoming, "Q1")
        buffer.write(b"x" * (SPILL_AT + 1))
        self.assertEqual(self.files(), ["Q1"])
        buffer.discard()
        buffer.write(b"x" * (SPILL_AT + 1))
        self.assertEqual(self.files(), [])
        self.assertEqual(buffer.size, 2 * (SPILL_AT + 1))


class _HeldDisk:
    """A ``run_blocking`` that runs nothing until told: each file operation is
    "in a worker thread" for as long as the test likes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, func: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((func, args, d))
        return d

    def run_all(self) -> None:
        while self.calls:
            func, args, d = self.calls.pop(0)
            try:
                result = func(*args)
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)


class SpoolOffTheReactorTests(unittest.TestCase):
    """A spilled body's file is only touched by ``run_blocking``, one operation at a time."""

    def setUp(self) -> None:
        self.incoming = Path(self.mktemp())
        self.incoming.mkdir(parents=True)
        self.disk = _HeldDisk()
        self.buffer = SpoolBuffer(self.incoming, "Q1", self.disk)

    def test_writes_past_the_spill_touch_no_file_until_the_disk_runs_them(self) -> None:
        data = [b"a" * (SPILL_AT + 1), b"b" * 1000, b"c" * 1000]
        for chunk in data:
            self.buffer.write(chunk)
        self.assertEqual(os.listdir(self.incoming), [])
        done = self.buffer.finish()
        self.assertFalse(done.called)
        self.disk.run_all()
        self.assertTrue(done.called)
        self.assertEqual((self.incoming / "Q1").read_bytes(), b"".join(data))
        self.assertEqual(self.buffer.contents(), b"".join(data))

    def test_discard_while_an_operation_runs_removes_the_file_after_it(self) -> None:
        self.buffer.write(b"a" * (SPILL_AT + 1))
        func, args, d = self.disk.calls.pop(0)
        func(*args)  # the open is under way in its thread: the file exists
        self.buffer.write(b"b" * 1000)
        self.buffer.discard()
        self.assertEqual(os.listdir(self.incoming), ["Q1"])
        d.callback(None)  # the open returns
        self.disk.run_all()
        self.assertEqual(os.listdir(self.incoming), [])
        self.assertTrue(self.buffer.finish().called)

    def test_a_failed_write_is_an_error_and_finish_waits_for_the_removal(self) -> None:
        self.buffer.write(b"a" * (SPILL_AT + 1))
        self.disk.run_all()
        self.buffer._file.close()  # the next write fails as a broken disk would
        self.buffer.write(b"b" * 1000)
        done = self.buffer.finish()
        self.disk.run_all()
        self.assertTrue(done.called)
        self.assertIsNotNone(self.buffer.error)
        self.assertEqual(os.listdir(self.incoming), [])


class _HeldPool:
    """A thread pool that runs nothing until told: the split is "in a thread" for as long as we like."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(lambda: on_result(True, func(*args, **kwargs)))


class _PoolReactor:
    def __init__(self, pool: _HeldPool) -> None:
        self.pool = pool

    def getThreadPool(self) -> _HeldPool:
        return self.pool

    def seconds(self) -> float:
        return 0.0

    def callFromThread(self, func: Any, *args: Any) -> None:
        func(*args)


class HangUpDuringHeaderSplitTests(unittest.TestCase):
    """(f) A hang-up while a header section over 64 KiB is split off the reactor."""

    def test_no_checks_and_no_filing_after_the_split(self) -> None:
        from mailx.inbound.delivery import INLINE_HEADER, IncomingMessage

        incoming = Path(self.mktemp())
        incoming.mkdir(parents=True)
        pool = _HeldPool()
        checked: list[Any] = []
        context = _SpoolContext(incoming)
        context.reactor = _PoolReactor(pool)
        context.config = SimpleNamespace(hostname="mx.example.test")
        context.authenticator = SimpleNamespace(check=lambda *a, **k: checked.append(a) or defer.Deferred())
        delivery = SimpleNamespace(
            context=context, junk=False, session=SimpleNamespace(client_ip="192.0.2.1", helo="c.test")
        )
        message = IncomingMessage(delivery, "Q1", "s@sender.test", [])
        message.dataReceived(b"From: a@sender.test\r\n" + b"X-Pad: p\r\n" * (INLINE_HEADER // 10 + 1))
        message.dataReceived(b"\r\n" + b"b" * 76 + b"\r\n" * (SPILL_AT // 78 + 1))
        message.dataReceived((b"b" * 76 + b"\r\n") * (SPILL_AT // 78 + 1))
        self.assertEqual(os.listdir(incoming), ["Q1"])
        result = message.eomReceived()
        self.assertEqual(len(pool.calls), 1)  # the split is under way
        message.abandon()  # the session's connectionLost
        pool.calls.pop()()
        self.failureResultOf(result, defer.CancelledError)
        self.assertEqual(checked, [])
        self.assertEqual(os.listdir(incoming), [])


class CloseGraceTests(unittest.TestCase):
    """(g) A closing session whose last replies are never read is aborted after CLOSE_GRACE."""

    def setUp(self) -> None:
        self.factory = MailxSMTPFactory(make_config(), lambda s: FakeDelivery())
        self.d = Dialogue(self.factory)
        self.aborted: list[bool] = []
        self.d.transport.abortConnection = lambda: self.aborted.append(True)
        self.d.output()

    def test_unread_close_is_aborted_after_the_grace(self) -> None:
        self.d.clock.advance(61)  # idle timeout: 421 and loseConnection
        self.assertTrue(self.d.transport.disconnecting)
        self.d.clock.advance(CLOSE_GRACE - 0.5)
        self.assertEqual(self.aborted, [])
        self.d.clock.advance(1)
        self.assertEqual(self.aborted, [True])

    def test_a_close_that_completes_cancels_the_abort(self) -> None:
        self.assertEqual(self.d.codes(b"QUIT\r\n"), [221])
        self.d.proto.connectionLost(None)
        self.assertEqual(self.d.clock.getDelayedCalls(), [])
        self.d.clock.advance(CLOSE_GRACE + 1)
        self.assertEqual(self.aborted, [])
