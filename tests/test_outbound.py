# -*- test-case-name: tests.test_outbound -*-
"""The forwarding client and scheduler, against a real SMTP sink and DNS server on 127.0.0.1.

Time is a `task.Clock`: retries, timeouts and the queue lifetime advance
only when a test says so, while the sessions themselves run over real
sockets on the real reactor.
"""

from __future__ import annotations

import email
import email.policy
import ipaddress
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

import mailx.outbound.relay as outbound_module
from mailx.config import SmarthostAuth, load_config_text
from mailx.dns import Resolver
from mailx.outbound.relay import (
    IDLE_TIME,
    ClientSettings,
    DotStuffer,
    HostFailure,
    Outbound,
    SessionResult,
    SMTPClientProtocol,
    Timeouts,
    Transaction,
    destination_allowed,
    forward_path,
    parse_reply,
    retry_after,
    reverse_path,
)
from mailx.smtp.replies import Reply
from mailx.storage.queue import DELIVERED, FAILED, PENDING, Queue
from mailx.testing import ENTRY_LINE, SRS_SECRET
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.sink import CLOSE, self_signed_certificate, start_sink

NOW = 1_750_000_000.0
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: boss@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)
TRACE = b"Delivered-To: boss@example.test\r\nReceived: from mail.sender.test by mx.example.test; now\r\n"

CONFIG = """
hostname: mx.example.test
paths: {mail: mail, spool: spool}
domains:
  example.test:
    mailboxes: [alice]
    aliases: {postmaster: alice}
outbound:
  srs_secret: [SRS_SECRET]
""".replace("SRS_SECRET", SRS_SECRET)

ZONES = {
    "outside.test": {"MX": [(10, "mx.outside.test")]},
    "mx.outside.test": {"A": ["127.0.0.1"]},
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "implicit.test": {"A": ["127.0.0.1"]},
    "noaddress.test": {"TXT": ["v=spf1 -all"]},
    # Item 18: MX hosts inside private, link-local and reserved space.  DNS
    # data only: PrivateAddressTests' endpoint factory sends every attempt
    # to the sink on 127.0.0.1, so no packet ever goes to these addresses.
    "private.test": {"MX": [(10, "mx.private.test")]},
    "mx.private.test": {"A": ["10.0.0.1"]},
    "linklocal.test": {"MX": [(10, "mx.linklocal.test")]},
    "mx.linklocal.test": {"A": ["169.254.169.254"]},
    "ula.test": {"MX": [(10, "mx.ula.test")]},
    "mx.ula.test": {"AAAA": ["fd00::1"]},
    "shared.test": {"A": ["100.64.0.1"]},
    "mapped.test": {"AAAA": ["::ffff:10.0.0.1"], "A": ["0.0.0.0"]},
    "mixed.test": {"MX": [(10, "mx.private.test"), (20, "mx.outside.test")]},
}

FAST = Timeouts(
    connect=5,
    greeting=30,
    helo=30,
    starttls=30,
    auth=30,
    mail=30,
    rcpt=30,
    data_init=30,
    data_block=30,
    data_end=30,
    quit=5,
)


def stuff_reference(data: bytes) -> bytes:
    """RFC 5321 4.5.2 on a whole message at once: the obviously correct version."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return (
        b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        + b".\r\n"
    )


class DotStufferTests(unittest.TestCase):
    def stuff(self, *chunks: bytes) -> bytes:
        s = DotStuffer()
        return b"".join(s.feed(c) for c in chunks) + s.finish()

    def test_first_line_dot_is_stuffed(self) -> None:
        self.assertEqual(self.stuff(b".\r\nrest\r\n"), b"..\r\nrest\r\n.\r\n")

    def test_dot_line_at_a_chunk_boundary_is_stuffed(self) -> None:
        self.assertEqual(
            self.stuff(b"a" * 10 + b"\r\n", b".\r\nb\r\n"), b"a" * 10 + b"\r\n..\r\nb\r\n.\r\n"
        )

    def test_crlf_split_across_chunks(self) -> None:
        self.assertEqual(self.stuff(b"a\r", b"\n.b\r\n"), b"a\r\n..b\r\n.\r\n")

    def test_bare_lf_and_cr_become_crlf_and_are_stuffed_after(self) -> None:
        self.assertEqual(self.stuff(b"a\n.b\rc\r\n"), b"a\r\n..b\r\nc\r\n.\r\n")

    def test_missing_final_crlf_is_added(self) -> None:
        self.assertEqual(self.stuff(b"a\r\nlast"), b"a\r\nlast\r\n.\r\n")
        self.assertEqual(self.stuff(b"a\r"), b"a\r\n.\r\n")

    def test_empty_message(self) -> None:
        self.assertEqual(self.stuff(), b".\r\n")

    @settings(max_examples=300)
    @given(
        st.lists(st.sampled_from([b".", b"a", b"\r", b"\n", b"\r\n", b"..", b"x."]), max_size=40),
        st.lists(st.integers(0, 200), max_size=8),
    )
    def test_any_split_equals_whole_message_stuffing(
        self, pieces: list[bytes], cuts: list[int]
    ) -> None:
        data = b"".join(pieces)
        points = sorted({min(c, len(data)) for c in cuts})
        chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
        self.assertEqual(self.stuff(*chunks), stuff_reference(data))


class ReplyTests(unittest.TestCase):
    def test_enhanced_code_is_parsed(self) -> None:
        self.assertEqual(
            parse_reply([b"550 5.1.1 No such user"]), Reply(550, "5.1.1", "No such user")
        )

    def test_multi_line(self) -> None:
        reply = parse_reply([b"451-4.7.1 Greylisted", b"451 4.7.1 come back later"])
        self.assertEqual(reply, Reply(451, "4.7.1", "Greylisted come back later"))

    def test_enhanced_code_of_the_wrong_class_is_text(self) -> None:
        self.assertEqual(parse_reply([b"550 4.1.1 odd"]), Reply(550, "", "4.1.1 odd"))

    def test_no_text(self) -> None:
        self.assertEqual(parse_reply([b"250"]), Reply(250, "", ""))


class ClientDialogueTests(unittest.TestCase):
    """The client over a StringTransport: exact lines out, timeouts on a Clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        path = Path(self.mktemp())
        path.write_bytes(ENTRY_LINE + b"Subject: x\r\n\r\n.\r\n")
        self.transaction = Transaction(
            "SRS0=x@example.test", ("a@outside.test", "b@outside.test"), b"", path, 16, True
        )
        self.client = SMTPClientProtocol(
            self.transaction,
            ClientSettings("mx.example.test", FAST, self.clock),
            "mx[127.0.0.1]:25",
        )
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.results: list[Any] = []
        self.client.done.addBoth(self.results.append)

    def server(self, *lines: bytes) -> bytes:
        self.transport.clear()
        for line in lines:
            self.client.dataReceived(line + b"\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.transport.value()

    def test_full_dialogue(self) -> None:
        self.assertEqual(self.server(b"220 hi"), b"EHLO mx.example.test\r\n")
        sent = self.server(b"250-hi", b"250-SIZE 1000", b"250 8BITMIME")
        self.assertEqual(sent, b"MAIL FROM:<SRS0=x@example.test> SIZE=16 BODY=8BITMIME\r\n")
        self.assertEqual(self.server(b"250 ok"), b"RCPT TO:<a@outside.test>\r\n")
        self.assertEqual(self.server(b"250 ok"), b"RCPT TO:<b@outside.test>\r\n")
        self.assertEqual(self.server(b"550 5.1.1 no"), b"DATA\r\n")
        self.assertEqual(self.server(b"354 go"), b"Subject: x\r\n\r\n..\r\n.\r\n")
        self.assertEqual(self.server(b"250 2.0.0 queued"), b"QUIT\r\n")
        [result] = self.results
        self.assertEqual(
            result.replies,
            {
                "a@outside.test": Reply(250, "2.0.0", "queued"),
                "b@outside.test": Reply(550, "5.1.1", "no"),
            },
        )

    def test_an_unreadable_queued_message_is_451_and_the_data_is_cut_without_the_dot(self) -> None:
        self.server(b"220 hi")
        self.server(b"250 hi")
        self.server(b"250 ok")
        self.server(b"250 ok")
        self.assertEqual(self.server(b"250 ok"), b"DATA\r\n")
        self.transaction.data_path.unlink()
        sent = self.server(b"354 go")
        self.assertNotIn(b"\r\n.\r\n", sent)
        self.assertTrue(self.transport.disconnecting)
        [result] = self.results
        self.assertEqual({r.code for r in result.replies.values()}, {451})
        self.assertEqual(result.replies["a@outside.test"].enhanced, "4.3.0")

    def test_no_size_or_body_without_the_extensions(self) -> None:
        self.server(b"220 hi")
        self.assertEqual(self.server(b"250 hi"), b"MAIL FROM:<SRS0=x@example.test>\r\n")

    def test_helo_when_ehlo_is_refused(self) -> None:
        self.server(b"220 hi")
        self.assertEqual(self.server(b"502 what"), b"HELO mx.example.test\r\n")
        self.assertEqual(self.server(b"250 ok"), b"MAIL FROM:<SRS0=x@example.test>\r\n")

    def test_greeting_timeout_is_a_host_failure(self) -> None:
        self.clock.advance(FAST.greeting + 1)
        [failure] = self.results
        self.assertTrue(failure.check(HostFailure))
        self.assertEqual(failure.value.reply.enhanced, "4.4.2")
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def test_4xx_greeting_is_a_host_failure(self) -> None:
        self.assertEqual(self.server(b"421 busy"), b"QUIT\r\n")
        self.assertTrue(self.results[0].check(HostFailure))

    def test_5xx_to_mail_fails_every_recipient(self) -> None:
        self.server(b"220 hi", b"250 hi")
        self.assertEqual(self.server(b"553 5.7.1 sender refused"), b"QUIT\r\n")
        [result] = self.results
        self.assertIsInstance(result, SessionResult)
        self.assertEqual({r.code for r in result.replies.values()}, {553})

    def test_timeout_after_data_defers_accepted_recipients(self) -> None:
        self.server(b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"451 4.2.0 later", b"354 go")
        self.clock.advance(FAST.data_end + 1)
        [result] = self.results
        self.assertEqual(result.replies["a@outside.test"].enhanced, "4.4.2")
        self.assertEqual(result.replies["b@outside.test"], Reply(451, "4.2.0", "later"))

    def test_message_over_the_remote_size_limit_fails_permanently(self) -> None:
        self.server(b"220 hi")
        self.assertEqual(self.server(b"250-hi", b"250 SIZE 10"), b"QUIT\r\n")
        [result] = self.results
        self.assertEqual({r.enhanced for r in result.replies.values()}, {"5.3.4"})

    def test_garbage_reply_ends_the_session(self) -> None:
        self.server(b"hello there")
        self.assertTrue(self.results[0].check(HostFailure))
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)


class WirePathTests(unittest.TestCase):
    """Item 17: RFC 5321 4.1.2, a local part that is no Dot-string goes out as a Quoted-string."""

    def test_reverse_path_quotes_an_unquoted_sender(self) -> None:
        for sender, wire in (
            ("john smith@sender.test", '"john smith"@sender.test'),
            ("a@b@sender.test", '"a@b"@sender.test'),
            ('a"b\\c@sender.test', '"a\\"b\\\\c"@sender.test'),
            ("SRS0=h=TT=sender.test=john smith@example.test", '"SRS0=h=TT=sender.test=john smith"@example.test'),
            ("first.last+tag@sender.test", "first.last+tag@sender.test"),
            ("", ""),
        ):
            self.assertEqual(reverse_path(sender), wire)

    def test_forward_path_keeps_quoted_recipients_and_quotes_the_rest(self) -> None:
        for address, wire in (
            ('"john smith"@outside.test', '"john smith"@outside.test'),
            ('"a@b"@outside.test', '"a@b"@outside.test'),
            ("someone@outside.test", "someone@outside.test"),
            ("john smith@outside.test", '"john smith"@outside.test'),
            ('"a"b"@outside.test', '"\\"a\\"b\\""@outside.test'),
        ):
            self.assertEqual(forward_path(address), wire)

    def test_the_client_sends_them_quoted(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(ENTRY_LINE + b"Subject: x\r\n\r\nhi\r\n")
        transaction = Transaction(
            "a@b@sender.test", ('"john smith"@outside.test',), b"", path, 16, False
        )
        client = SMTPClientProtocol(
            transaction, ClientSettings("mx.example.test", FAST, task.Clock()), "mx"
        )
        transport = StringTransport()
        client.makeConnection(transport)
        for line in (b"220 hi", b"250 hi", b"250 ok"):
            client.dataReceived(line + b"\r\n")
        self.assertEqual(
            transport.value(),
            b'EHLO mx.example.test\r\nMAIL FROM:<"a@b"@sender.test>\r\n'
            b'RCPT TO:<"john smith"@outside.test>\r\n',
        )


def wait_until(predicate: Any, timeout: float = 15.0) -> defer.Deferred:
    """Poll on the real reactor until predicate() is true."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll() -> Any:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


class OutboundCase(unittest.TestCase):
    """An Outbound on a fake clock, delivering to a sink through a loopback DNS server."""

    timeout = 30
    sink_options: dict[str, Any] = {}
    settings_overrides: dict[str, Any] = {}

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink(**self.sink_options)
        self.addCleanup(self.sink.stop)
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()
        self.config = load_config_text(CONFIG, str(self.directory / "mailx.yaml"))
        self.queue = Queue(self.directory / "queue")
        self.queue.prepare()
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.outbound = self.make_outbound()
        self.outbound.startService()
        self.addCleanup(lambda: self.outbound.stopService() if self.outbound.running else None)

    endpoint_factory: Any = None

    def make_outbound(self, smarthost_tls: Any = None, **overrides: Any) -> Outbound:
        """An Outbound over ``self.config`` with these ``outbound:`` values (and hostname)."""
        options = {
            "hostname": "mx.example.test",
            "port": self.sink.port,
            "retry": (60.0, 120.0),
            "queue_lifetime": 1000.0,
            "delay_warning": None,
            **self.settings_overrides,
            **overrides,
        }
        hostname = options.pop("hostname")
        if options.get("smarthost_auth") is not None:
            options["smarthost_auth"] = SmarthostAuth(*options["smarthost_auth"])
        config = replace(
            self.config, hostname=hostname, outbound=replace(self.config.outbound, **options)
        )
        return Outbound(
            config,
            self.queue,
            Resolver(self.dns.nameservers, timeout=2.0),
            reactor=reactor,
            clock=self.clock,
            timeouts=FAST,
            rng=random.Random(1),
            smarthost_tls=smarthost_tls,
            endpoint_factory=self.endpoint_factory,
        )

    def submit(
        self,
        recipients: tuple[str, ...] = ("someone@outside.test",),
        sender: str = "alice@sender.test",
        message: bytes = MESSAGE,
        queue_id: str = "65F00000000001",
        data: bytes | None = None,
        **results: Any,
    ) -> Any:
        forwards = [("boss@example.test", r, TRACE) for r in recipients]
        envelope = self.outbound.envelope_for(
            queue_id, sender, "mail.sender.test", forwards, **results
        )
        self.queue.enqueue(envelope, [message])
        self.outbound.submitted(envelope, data)
        self.clock.advance(0)
        return envelope

    def settle(self, envelope: Any) -> defer.Deferred:
        """Wait until no recipient of ``envelope`` is being tried."""

        def settled() -> bool:
            entry = self.outbound._entries.get(envelope.id)
            if entry is None or not entry.envelope.pending:
                return True
            # Idle, and waiting for the fake clock (not for the next reactor turn).
            return (
                not entry.busy
                and not entry.in_flight
                and entry.timer in self.clock.getDelayedCalls()
            )

        return wait_until(settled)

    def gone(self, envelope: Any) -> defer.Deferred:
        return wait_until(
            lambda: envelope.id not in self.outbound._entries and not self.queue.exists(envelope.id)
        )


class DeliveryTests(OutboundCase):
    @defer.inlineCallbacks
    def test_delivers_with_srs_sender_and_our_trace_on_top(self) -> None:
        envelope = self.submit()
        [message] = yield self.sink.wait_for(1)
        self.assertRegex(message.mail_from, r"^SRS0=[^=]+=[^=]+=sender\.test=alice@example\.test$")
        self.assertEqual(message.recipients, ["someone@outside.test"])
        self.assertEqual(message.data, TRACE + MESSAGE)
        self.assertEqual(message.helo, "mx.example.test")
        self.assertIn(f"SIZE={len(TRACE) + len(MESSAGE)}", message.mail_params)
        yield self.gone(envelope)

    @defer.inlineCallbacks
    def test_a_message_many_chunks_long_arrives_whole_and_dot_stuffed(self) -> None:
        # Far more than the sockets buffer: the transport pauses the reads and resumes them.
        line = b".dotted line\r\n"
        body = MESSAGE + line * (4 * 1024 * 1024 // len(line))
        self.submit(message=body)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + body)

    @defer.inlineCallbacks
    def test_null_sender_is_forwarded_as_null(self) -> None:
        self.submit(sender="")
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.mail_from, "")

    @defer.inlineCallbacks
    def test_sender_at_our_own_domain_is_not_rewritten(self) -> None:
        self.submit(sender="alice@example.test")
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.mail_from, "alice@example.test")

    @defer.inlineCallbacks
    def test_dot_lines_arrive_intact(self) -> None:
        first_line_dot = b".\r\n" + MESSAGE
        body = MESSAGE + b"x" * (16384 - len(MESSAGE) - len(TRACE) - 2) + b"\r\n.\r\nafter\r\n"
        self.assertEqual(len(TRACE) + body.index(b"\r\n.\r\n") + 2, 16384)
        self.submit(message=first_line_dot, queue_id="65F00000000001")
        self.submit(message=body, queue_id="65F00000000002")
        received = yield self.sink.wait_for(2)
        self.assertEqual(
            sorted(m.data for m in received), sorted([TRACE + first_line_dot, TRACE + body])
        )

    @defer.inlineCallbacks
    def test_eight_bit_message_is_declared(self) -> None:
        self.submit(message=MESSAGE + "Grüße\r\n".encode())
        [message] = yield self.sink.wait_for(1)
        self.assertIn("BODY=8BITMIME", message.mail_params)

    @defer.inlineCallbacks
    def test_recipients_of_one_domain_share_a_session(self) -> None:
        self.submit(recipients=("a@outside.test", "b@outside.test"))
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.recipients, ["a@outside.test", "b@outside.test"])

    @defer.inlineCallbacks
    def test_same_address_twice_gets_one_copy(self) -> None:
        envelope = self.submit(recipients=("a@outside.test", "a@outside.test"))
        self.assertEqual(len(envelope.recipients), 1)
        yield self.sink.wait_for(1)

    @defer.inlineCallbacks
    def test_implicit_mx(self) -> None:
        self.submit(recipients=("someone@implicit.test",))
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.recipients, ["someone@implicit.test"])

    @defer.inlineCallbacks
    def test_next_host_after_a_refused_greeting(self) -> None:
        self.dns.set("outside.test", "MX", [(10, "mx1.outside.test"), (20, "mx2.outside.test")])
        self.dns.set("mx1.outside.test", "A", ["127.0.0.1"])
        self.dns.set("mx2.outside.test", "A", ["127.0.0.1"])
        self.sink.script("greeting", "421 4.3.2 busy")
        envelope = self.submit()
        [message] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(
            envelope.recipients[0].last_host, f"mx2.outside.test[127.0.0.1]:{self.sink.port}"
        )

    @defer.inlineCallbacks
    def test_failed_hosts_are_tried_last_and_aaaa_before_a(self) -> None:
        # DNS data only: nothing connects to these documentation addresses.
        self.dns.set("multi.test", "MX", [(10, "a.multi.test"), (20, "b.multi.test")])
        self.dns.set("a.multi.test", "AAAA", ["2001:db8::1"])
        self.dns.set("a.multi.test", "A", ["192.0.2.1"])
        self.dns.set("b.multi.test", "A", ["192.0.2.2"])
        hosts = yield self.outbound._hosts("multi.test")
        self.assertEqual(
            hosts,
            [
                ("a.multi.test", "2001:db8::1"),
                ("a.multi.test", "192.0.2.1"),
                ("b.multi.test", "192.0.2.2"),
            ],
        )
        self.outbound._failed_hosts["2001:db8::1"] = self.clock.seconds()
        hosts = yield self.outbound._hosts("multi.test")
        self.assertEqual(hosts[-1], ("a.multi.test", "2001:db8::1"))
        self.clock.advance(3600)
        hosts = yield self.outbound._hosts("multi.test")
        self.assertEqual(hosts[0], ("a.multi.test", "2001:db8::1"))


class FromMemoryTests(OutboundCase):
    """A message just filed goes out from the bytes its filing had in memory."""

    def count_reads(self) -> list[Path]:
        opened: list[Path] = []
        real = outbound_module._open_data

        def recording(path: Path) -> Any:
            opened.append(path)
            return real(path)

        self.patch(outbound_module, "_open_data", recording)
        return opened

    @defer.inlineCallbacks
    def test_the_first_attempt_sends_from_memory_and_lets_it_go(self) -> None:
        opened = self.count_reads()
        envelope = self.submit(data=MESSAGE)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + MESSAGE)
        yield self.gone(envelope)
        self.assertEqual(opened, [])
        self.assertEqual((self.outbound._in_memory, self.outbound._in_memory_size), ({}, 0))

    @defer.inlineCallbacks
    def test_a_retry_reads_the_queued_file(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        opened = self.count_reads()
        envelope = self.submit(data=MESSAGE)
        yield self.settle(envelope)
        self.assertEqual((self.outbound._in_memory, self.outbound._in_memory_size), ({}, 0))
        self.clock.advance(60)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + MESSAGE)
        self.assertEqual(opened, [self.queue.data_path(envelope.id)])

    @defer.inlineCallbacks
    def test_bytes_that_are_not_the_entry_are_not_sent(self) -> None:
        opened = self.count_reads()
        envelope = self.submit(data=MESSAGE + b"more")  # not the file's size
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + MESSAGE)
        self.assertEqual(opened, [self.queue.data_path(envelope.id)])

    @defer.inlineCallbacks
    def test_past_the_memory_budget_the_file_is_read(self) -> None:
        self.patch(outbound_module, "HELD_IN_MEMORY", len(MESSAGE) * 3 // 2)
        self.sink.script("rcpt", "451 4.7.1 later")
        first = self.submit(data=MESSAGE)
        second = self.submit(data=MESSAGE, queue_id="65F00000000002")
        self.assertEqual(list(self.outbound._in_memory), [first.id])
        yield self.settle(first)
        yield self.settle(second)
        self.assertEqual(self.outbound._in_memory_size, 0)

    @defer.inlineCallbacks
    def test_removals_in_one_reactor_turn_share_one_disk_trip(self) -> None:
        batches: list[list[str]] = []
        real = self.outbound.filer.remove_entries

        def recording(queue: Path, queue_ids: list[str]) -> defer.Deferred:
            batches.append(list(queue_ids))
            return real(queue, queue_ids)

        self.patch(self.outbound.filer, "remove_entries", recording)
        for n in (1, 2, 3):
            self.queue.enqueue(
                self.outbound.envelope_for(
                    f"65F0000000030{n}", "a@sender.test", "h", [("b@example.test", "x@out.test", TRACE)]
                ),
                [MESSAGE],
            )
        results = yield defer.gatherResults(
            [self.outbound._remove(f"65F0000000030{n}") for n in (1, 2, 3, 4)]
        )
        self.assertEqual(results, [True, True, True, False])
        self.assertEqual(batches, [[f"65F0000000030{n}" for n in (1, 2, 3, 4)]])


class StalledDiskTests(OutboundCase):
    """The scheduler's file work waits in a thread, not on the reactor.

    The stall is a blocking call at the file-system boundary (it waits for an
    event), as a disk busy with other writers would; on the reactor thread it
    would hold up every session and timer until released.
    """

    STALL = 10.0  # how long a stalled call waits if the test never releases it
    RESPONSIVE = 3.0  # generous: the reactor answers within this during the stall

    def stall(self, func: Any) -> Any:
        """``func``, made to wait for ``self.release`` (``self.entered`` says it is waiting)."""
        self.entered = threading.Event()
        self.release = threading.Event()
        self.addCleanup(self.release.set)

        def stalled(*args: Any) -> Any:
            self.entered.set()
            self.release.wait(self.STALL)
            return func(*args)

        return stalled

    @defer.inlineCallbacks
    def assert_reactor_responsive_while_stalled(self, started: float) -> Any:
        yield deferToThread(self.entered.wait, self.STALL)
        self.assertTrue(self.entered.is_set())
        yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertLess(time.monotonic() - started, self.RESPONSIVE)
        self.release.set()

    @defer.inlineCallbacks
    def test_a_stalled_queue_lookup_does_not_stall_the_reactor(self) -> None:
        # The lookup before a retry: is the entry still queued (mailxctl queue remove)?
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit()
        yield self.settle(envelope)
        self.patch(self.queue, "exists", self.stall(self.queue.exists))
        started = time.monotonic()
        self.clock.advance(60)  # the retry
        yield self.assert_reactor_responsive_while_stalled(started)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + MESSAGE)

    @defer.inlineCallbacks
    def test_a_stalled_read_of_the_queued_message_does_not_stall_the_reactor(self) -> None:
        self.patch(outbound_module, "_open_data", self.stall(outbound_module._open_data))
        started = time.monotonic()
        self.submit()
        yield self.assert_reactor_responsive_while_stalled(started)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.data, TRACE + MESSAGE)

    @defer.inlineCallbacks
    def test_a_stalled_flush_request_check_does_not_stall_the_reactor(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit()
        yield self.settle(envelope)
        self.patch(self.queue, "take_flush_request", self.stall(self.queue.take_flush_request))
        self.queue.request_flush()
        started = time.monotonic()
        self.clock.advance(1)  # the flush request poll
        yield self.assert_reactor_responsive_while_stalled(started)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)


class RetryTests(OutboundCase):
    @defer.inlineCallbacks
    def test_451_then_250(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 Greylisted, try later")
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual((r.state, r.attempts, r.next_attempt), (PENDING, 1, NOW + 60))
        self.assertEqual(r.last_reply, "451 4.7.1 Greylisted, try later")
        self.assertEqual(self.queue.load(envelope.id).recipients[0].attempts, 1)  # on disk
        self.assertEqual(self.sink.accepted, [])
        self.clock.advance(59)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.sink.connections, 1)
        self.clock.advance(1)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(r.state, DELIVERED)

    @defer.inlineCallbacks
    def test_retry_schedule_repeats_its_last_interval(self) -> None:
        self.sink.script("rcpt", *["451 4.3.0 later"] * 3)
        envelope = self.submit()
        [r] = envelope.recipients
        waits = []
        for _ in range(3):
            yield self.settle(envelope)
            waits.append(r.next_attempt - self.clock.seconds())
            self.clock.advance(r.next_attempt - self.clock.seconds())
        yield self.sink.wait_for(1)
        self.assertEqual(waits, [60.0, 120.0, 120.0])

    @defer.inlineCallbacks
    def test_silent_peer_times_out_and_is_retried(self) -> None:
        self.sink.silent = True
        envelope = self.submit()
        yield wait_until(lambda: self.sink.connections == 1 and self.sink.open)
        self.clock.advance(FAST.greeting)
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("4.4.2 timeout", r.last_reply)
        self.sink.silent = False
        self.clock.advance(60)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)

    @defer.inlineCallbacks
    def test_connection_refused_is_retried(self) -> None:
        yield self.sink.stop()
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("4.4.1", r.last_reply)

    @defer.inlineCallbacks
    def test_dns_failure_is_retried(self) -> None:
        self.dns.servfail("outside.test")
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertTrue(r.last_reply.startswith("451 4.4.3"))
        self.dns.heal("outside.test")
        self.outbound.resolver.clear_cache()
        self.clock.advance(60)
        yield self.sink.wait_for(1)

    @defer.inlineCallbacks
    def test_flush_retries_now(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit()
        yield self.settle(envelope)
        self.queue.request_flush()
        self.clock.advance(1)  # the flush request poll
        yield self.sink.wait_for(1)
        yield self.gone(envelope)

    @defer.inlineCallbacks
    def test_removed_entry_is_forgotten(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit()
        yield self.settle(envelope)
        self.queue.remove(envelope.id)
        self.clock.advance(60)
        yield wait_until(lambda: envelope.id not in self.outbound._entries)
        self.assertEqual(self.sink.accepted, [])


class BounceTests(OutboundCase):
    def bounces(self) -> list[Any]:
        return [m for m in self.sink.accepted if m.mail_from == ""]

    @defer.inlineCallbacks
    def test_550_bounces_to_the_original_sender(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 <someone@outside.test>: no such user")
        envelope = self.submit()
        [bounce] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(bounce.mail_from, "")
        self.assertEqual(bounce.recipients, ["alice@sender.test"])
        report = email.message_from_bytes(bounce.data, policy=email.policy.compat32)
        self.assertEqual(report.get_content_type(), "multipart/report")
        per_recipient = report.get_payload()[1].get_payload()[1]
        self.assertEqual(per_recipient["Status"], "5.1.1")
        self.assertIn("no such user", per_recipient["Diagnostic-Code"])
        self.assertIn("Subject: hello", report.get_payload()[2].get_payload())
        yield wait_until(lambda: not self.queue.exists(envelope.id + "B"))  # delivered and gone

    @defer.inlineCallbacks
    def test_one_bounce_for_several_failed_recipients(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no", "550 5.1.1 no")
        self.submit(recipients=("a@outside.test", "b@outside.test"))
        yield self.sink.wait_for(1)
        yield task.deferLater(reactor, 0.2, lambda: None)
        [bounce] = self.bounces()
        self.assertEqual(bounce.data.count(b"Final-Recipient:"), 2)

    @defer.inlineCallbacks
    def test_partial_failure_bounces_only_the_failed(self) -> None:
        self.sink.script("rcpt", "250 ok", "550 5.1.1 no")
        envelope = self.submit(recipients=("a@outside.test", "b@outside.test"))
        yield self.sink.wait_for(2)
        yield self.gone(envelope)
        [bounce] = self.bounces()
        self.assertIn(b"Final-Recipient: rfc822;b@outside.test", bounce.data)
        self.assertNotIn(b"Final-Recipient: rfc822;a@outside.test", bounce.data)

    @defer.inlineCallbacks
    def test_no_bounce_to_the_null_sender(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit(sender="")
        yield self.gone(envelope)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.sink.accepted, [])
        self.assertEqual(self.queue.ids(), [])

    @defer.inlineCallbacks
    def test_no_bounce_of_a_bounce(self) -> None:
        report = (
            b"From: MAILER-DAEMON@elsewhere.test\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n--b--\r\n'
        )
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit(message=report, sender="postmaster@sender.test")
        yield self.gone(envelope)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.sink.accepted, [])

    @defer.inlineCallbacks
    def test_null_mx_bounces_without_connecting(self) -> None:
        envelope = self.submit(recipients=("someone@nullmx.test",))
        [bounce] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(bounce.recipients, ["alice@sender.test"])
        self.assertIn(b"Status: 5.1.10", bounce.data)
        self.assertEqual(self.sink.connections, 1)  # the bounce's only

    @defer.inlineCallbacks
    def test_nonexistent_domain_bounces(self) -> None:
        envelope = self.submit(recipients=("someone@nowhere.test",))
        [bounce] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertIn(b"Status: 5.1.2", bounce.data)

    @defer.inlineCallbacks
    def test_expiry_bounces_with_the_last_temporary_reply(self) -> None:
        self.sink.script("rcpt", *["451 4.2.1 mailbox busy"] * 10)
        envelope = self.submit()
        [r] = envelope.recipients
        while r.state == PENDING:
            yield self.settle(envelope)
            if r.state == PENDING:
                self.clock.advance(r.next_attempt - self.clock.seconds())
        self.assertEqual(r.state, FAILED)
        self.assertLessEqual(r.next_attempt, NOW + 1000)
        [bounce] = yield self.sink.wait_for(1)
        self.assertIn(b"Status: 4.2.1", bounce.data)
        self.assertIn(b"Action: failed", bounce.data)
        self.assertIn(b"mailbox busy", bounce.data)

    @defer.inlineCallbacks
    def test_message_too_big_for_the_remote_bounces(self) -> None:
        self.sink.size_limit = 8000  # room for the bounce, not for the message
        envelope = self.submit(message=MESSAGE + (b"x" * 76 + b"\r\n") * 120)
        [bounce] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertIn(b"Status: 5.3.4", bounce.data)
        self.assertFalse(any(c.startswith(b"MAIL FROM:<SRS0") for c in self.sink.commands))

    @defer.inlineCallbacks
    def test_bounce_to_a_local_sender_is_filed_in_the_maildir(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit(sender="alice@example.test")
        yield self.gone(envelope)
        new = self.config.paths.mail / "example.test" / "alice" / "new"
        yield wait_until(lambda: new.is_dir() and any(new.iterdir()))
        [path] = list(new.iterdir())
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n"))
        self.assertIn(b"multipart/report", data)


class DelayNoticeTests(OutboundCase):
    settings_overrides = {"delay_warning": 100.0}

    @defer.inlineCallbacks
    def test_delay_notice_once_after_the_warning_time(self) -> None:
        self.sink.script("rcpt", "451 4.2.1 busy", "451 4.2.1 busy", "451 4.2.1 busy")
        envelope = self.submit()
        [r] = envelope.recipients
        yield self.settle(envelope)
        self.clock.advance(60)  # second attempt at +60: not yet
        yield self.settle(envelope)
        self.assertEqual(self.sink.accepted, [])
        self.clock.advance(120)  # third at +180: past the warning
        [notice] = yield self.sink.wait_for(1)
        self.assertEqual(notice.recipients, ["alice@sender.test"])
        self.assertIn(b"Action: delayed", notice.data)
        self.assertTrue(envelope.delay_notified)
        self.clock.advance(120)  # fourth: delivered, no second notice
        yield self.gone(envelope)
        self.assertEqual(r.state, DELIVERED)
        self.assertEqual(len([m for m in self.sink.accepted if m.mail_from == ""]), 1)


    @defer.inlineCallbacks
    def test_no_delay_notice_to_a_sender_that_failed_spf(self) -> None:
        self.sink.script("rcpt", "451 4.2.1 busy", "451 4.2.1 busy", "451 4.2.1 busy")
        envelope = self.submit(spf="fail", dmarc="none")
        yield self.settle(envelope)
        self.clock.advance(60)
        yield self.settle(envelope)
        self.clock.advance(120)  # third attempt, past the warning: no notice
        yield self.settle(envelope)
        self.assertTrue(envelope.delay_notified)  # decided once, not again each attempt
        self.clock.advance(120)
        yield self.gone(envelope)
        self.assertEqual([m for m in self.sink.accepted if m.mail_from == ""], [])


class BackscatterTests(OutboundCase):
    """Item 16 at the scheduler: the results recorded at reception decide the bounce."""

    @defer.inlineCallbacks
    def test_no_bounce_when_spf_failed(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit(spf="fail", dmarc="none")
        yield self.gone(envelope)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.sink.accepted, [])
        self.assertEqual(self.queue.ids(), [])

    @defer.inlineCallbacks
    def test_bounce_when_spf_passed(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit(spf="pass", dmarc="none")
        [bounce] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(bounce.recipients, ["alice@sender.test"])

    @defer.inlineCallbacks
    def test_results_survive_a_restart(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit(spf="fail", dmarc="none")
        yield self.settle(envelope)
        yield self.outbound.stopService()
        self.outbound = self.make_outbound()
        self.outbound.startService()
        [resumed] = self.outbound._entries.values()
        self.assertEqual((resumed.envelope.spf, resumed.envelope.dmarc), ("fail", "none"))


class TLSTests(OutboundCase):
    sink_options = {"tls": True}

    @defer.inlineCallbacks
    def test_starttls_when_offered(self) -> None:
        envelope = self.submit()
        [message] = yield self.sink.wait_for(1)
        self.assertTrue(message.tls)
        yield self.gone(envelope)


class BrokenTLSTests(OutboundCase):
    sink_options = {"broken_tls": True}

    @defer.inlineCallbacks
    def test_failed_handshake_falls_back_to_clear_text(self) -> None:
        envelope = self.submit()
        [message] = yield self.sink.wait_for(1)
        self.assertFalse(message.tls)
        self.assertEqual(self.sink.connections, 2)
        yield self.gone(envelope)


class SmarthostTests(OutboundCase):
    sink_options = {"tls": True, "auth": {"relayuser": "relaypass"}}

    def setUp(self) -> None:
        super().setUp()
        self.settings_overrides = {
            "smarthost": f"tcp:127.0.0.1:{self.sink.port}",
            "smarthost_auth": ("relayuser", "relaypass"),
        }
        self.restart(
            smarthost_tls=ssl.optionsForClientTLS(
                "mx.outside.test", trustRoot=ssl.Certificate.loadPEM(self_signed_certificate())
            )
        )

    def restart(self, **options: Any) -> None:
        self.outbound.stopService()
        self.outbound = self.make_outbound(**options)
        self.outbound.startService()

    @defer.inlineCallbacks
    def test_auth_over_verified_tls_without_mx_lookup(self) -> None:
        self.submit(recipients=("someone@nowhere-in-dns.test",))
        [message] = yield self.sink.wait_for(1)
        self.assertTrue(message.tls)
        self.assertEqual(message.auth, "relayuser (PLAIN)")
        self.assertEqual(message.recipients, ["someone@nowhere-in-dns.test"])

    @defer.inlineCallbacks
    def test_messages_to_any_domain_share_the_smarthost_connection(self) -> None:
        first = self.submit(recipients=("someone@nowhere-in-dns.test",))
        yield self.gone(first)
        yield wait_until(lambda: self.outbound._idle_count == 1)
        second = self.submit(recipients=("other@elsewhere.test",), queue_id="65F00000000002")
        messages = yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual([m.auth for m in messages], ["relayuser (PLAIN)"] * 2)
        self.assertEqual(len([c for c in self.sink.commands if c.startswith(b"AUTH")]), 1)

    @defer.inlineCallbacks
    def test_auth_login_when_plain_is_not_offered(self) -> None:
        self.sink.auth_mechanisms = "LOGIN"
        self.submit()
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.auth, "relayuser (LOGIN)")

    @defer.inlineCallbacks
    def test_remote_mta_is_the_smarthosts_host_not_its_endpoint(self) -> None:
        # RFC 3464 2.3.5: Remote-MTA names a host; the DSN says "dns;127.0.0.1".
        self.sink.script("rcpt", "550 5.1.1 no")
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.remote_mta, "127.0.0.1")

    @defer.inlineCallbacks
    def test_no_credentials_in_clear_text(self) -> None:
        self.sink.tls_options = None
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("not sending credentials", r.last_reply)
        self.assertFalse(any(c.startswith(b"AUTH") for c in self.sink.commands))

    @defer.inlineCallbacks
    def test_no_credentials_to_an_unverified_certificate(self) -> None:
        self.restart()  # the default: the platform's trust store, for 127.0.0.1
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("not sending credentials", r.last_reply)  # after the failed handshake
        self.assertEqual(self.sink.connections, 2)
        self.assertFalse(any(c.startswith(b"AUTH") for c in self.sink.commands))
        self.assertEqual(self.sink.accepted, [])


class ConcurrencyTests(OutboundCase):
    settings_overrides = {"connections_per_domain": 1}

    @defer.inlineCallbacks
    def test_one_connection_per_domain_at_a_time(self) -> None:
        for n in range(5):
            self.submit(queue_id=f"65F0000000000{n}")
        yield self.sink.wait_for(5)
        self.assertEqual(self.sink.max_open, 1)


class ReuseTests(OutboundCase):
    """Issue 12: several messages to one host share a connection (RSET between them)."""

    settings_overrides = {"connections_per_domain": 2}

    def submit_n(self, n: int, start: int = 0) -> list[Any]:
        return [self.submit(queue_id=f"65F00000000{start + i:03d}") for i in range(n)]

    def idle(self, count: int) -> defer.Deferred:
        return wait_until(lambda: self.outbound._idle_count == count)

    @defer.inlineCallbacks
    def test_a_backlog_to_one_host_shares_connections(self) -> None:
        envelopes = self.submit_n(12)
        messages = yield self.sink.wait_for(12)
        for envelope in envelopes:
            yield self.gone(envelope)
        self.assertEqual(len(self.sink.accepted), 12)  # each once
        self.assertLessEqual(self.sink.connections, 2)
        # RFC 5321 4.1.1.4: each transaction ended with the data; no RSET needed.
        self.assertEqual(self.sink.commands.count(b"RSET"), 0)
        per_connection = sorted({m.connection for m in messages})
        self.assertEqual(len(per_connection), self.sink.connections)
        self.assertTrue(all(r.attempts == 1 for e in envelopes for r in e.recipients))

    @defer.inlineCallbacks
    def test_kept_connection_closed_by_the_peer_is_no_failed_attempt(self) -> None:
        [first] = self.submit_n(1)
        yield self.sink.wait_for(1)
        yield self.gone(first)
        yield self.idle(1)
        # The peer hangs up just as the kept connection is used again.
        self.sink.script("mail", CLOSE)
        [second] = self.submit_n(1, start=1)
        yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual([m.connection for m in self.sink.accepted], [1, 2])
        self.assertEqual(second.recipients[0].attempts, 1)
        self.assertEqual(second.recipients[0].state, DELIVERED)
        self.assertEqual(len(self.sink.messages), 2)  # no notice to anyone

    @defer.inlineCallbacks
    def test_kept_connection_closed_while_idle_is_forgotten(self) -> None:
        [first] = self.submit_n(1)
        yield self.sink.wait_for(1)
        yield self.idle(1)
        for proto in list(self.sink.open):
            proto.transport.loseConnection()
        yield self.idle(0)
        [second] = self.submit_n(1, start=1)
        yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertEqual(second.recipients[0].attempts, 1)
        self.assertEqual(self.sink.connections, 2)

    @defer.inlineCallbacks
    def test_421_to_rset_opens_a_new_connection(self) -> None:
        # Every RCPT refused leaves a transaction open: RSET before the next.
        self.sink.script("rcpt", "550 5.1.1 no such user")
        first = self.submit(sender="")
        yield self.gone(first)
        yield self.idle(1)
        self.sink.script("rset", "421 4.3.2 closing")
        [second] = self.submit_n(1, start=1)
        yield self.sink.wait_for(1)
        yield self.gone(second)
        self.assertEqual(self.sink.commands.count(b"RSET"), 1)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(second.recipients[0].attempts, 1)

    @defer.inlineCallbacks
    def test_421_to_mail_on_a_kept_connection_opens_a_new_one(self) -> None:
        self.sink.script("mail", "250 2.1.0 ok", "421 4.3.2 closing")
        [first] = self.submit_n(1)
        yield self.sink.wait_for(1)
        yield self.idle(1)
        [second] = self.submit_n(1, start=1)
        yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(second.recipients[0].attempts, 1)

    @defer.inlineCallbacks
    def test_a_refused_recipient_leaves_the_connection_usable(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user")
        first = self.submit(sender="")  # a bounce: no notice of its own to deliver
        yield self.gone(first)
        yield self.idle(1)
        [second] = self.submit_n(1, start=1)
        yield self.sink.wait_for(1)
        yield self.gone(second)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.sink.accepted[0].connection, 1)
        self.assertEqual(self.sink.commands.count(b"RSET"), 1)

    @defer.inlineCallbacks
    def test_idle_connection_is_quit_after_the_idle_time(self) -> None:
        [first] = self.submit_n(1)
        yield self.sink.wait_for(1)
        yield self.idle(1)
        self.assertEqual(len(self.sink.open), 1)
        self.clock.advance(IDLE_TIME - 1)
        self.assertEqual(len(self.sink.open), 1)
        self.clock.advance(2)
        yield wait_until(lambda: not self.sink.open)
        self.assertEqual(self.sink.commands[-1], b"QUIT")
        # Our side learns of the close a moment after the sink's (a busy machine: later).
        yield wait_until(lambda: self.outbound._idle_count == 0, timeout=5)
        self.assertEqual(self.outbound._idle_count, 0)

    @defer.inlineCallbacks
    def test_stop_closes_idle_connections(self) -> None:
        self.submit_n(1)
        yield self.sink.wait_for(1)
        yield self.idle(1)
        yield self.outbound.stopService()
        yield wait_until(lambda: not self.sink.open)

    @defer.inlineCallbacks
    def test_at_most_max_transactions_per_connection(self) -> None:
        self.patch(outbound_module, "MAX_TRANSACTIONS", 3)
        self.outbound._slots.per_key = 1
        envelopes = self.submit_n(7)
        messages = yield self.sink.wait_for(7)
        for envelope in envelopes:
            yield self.gone(envelope)
        counts: dict[int, int] = {}
        for m in messages:
            counts[m.connection] = counts.get(m.connection, 0) + 1
        self.assertEqual(sorted(counts.values()), [1, 3, 3])


class ReuseTLSTests(OutboundCase):
    """A session is kept for messages with the same TLS demands only."""

    sink_options = {"tls": True}

    @defer.inlineCallbacks
    def test_no_message_requiring_tls_on_a_clear_text_connection(self) -> None:
        # A clear-text session to the host (opportunistic TLS that failed over).
        plain = self.outbound._session
        calls: list[Any] = []

        def session(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            if len(calls) == 1:
                kwargs["tls"] = None
            return plain(*args, **kwargs)

        self.outbound._session = session
        self.submit()
        [m1] = yield self.sink.wait_for(1)
        self.assertFalse(m1.tls)
        yield wait_until(lambda: self.outbound._idle_count == 1)
        # The next needs TLS (as MTA-STS enforce makes it): a new, TLS, connection.

        def session_tls(*args: Any, **kwargs: Any) -> Any:
            kwargs["require_tls"] = True
            return plain(*args, **kwargs)

        self.outbound._session = session_tls
        second = self.submit(queue_id="65F00000000002")
        messages = yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertTrue(messages[1].tls)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(self.sink.commands.count(b"RSET"), 0)


class ResumeTests(OutboundCase):
    @defer.inlineCallbacks
    def test_queue_is_resumed_by_a_new_scheduler(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 later")
        envelope = self.submit()
        yield self.settle(envelope)
        yield self.outbound.stopService()
        self.outbound = self.make_outbound()
        self.outbound.startService()
        [resumed] = self.outbound._entries.values()
        self.assertEqual(resumed.envelope.recipients[0].attempts, 1)
        self.clock.advance(60)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)

    @defer.inlineCallbacks
    def test_stop_mid_session_keeps_the_recipient_due(self) -> None:
        self.sink.silent = True
        envelope = self.submit()
        yield wait_until(lambda: self.sink.open)
        yield self.outbound.stopService()
        on_disk = self.queue.load(envelope.id).recipients[0]
        self.assertEqual((on_disk.state, on_disk.attempts), (PENDING, 0))


class DestinationAllowedTests(unittest.TestCase):
    """Item 18, the pure rule (SPEC 8)."""

    def test_public_and_loopback_addresses_are_allowed(self) -> None:
        for ip in ("8.8.8.8", "2607:f8b0::1", "127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(destination_allowed(ip), ip)

    def test_private_link_local_shared_and_reserved_are_not(self) -> None:
        for ip in (
            "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254",
            "fc00::1", "fd00::1", "fe80::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1",
            "240.0.0.1", "255.255.255.255", "192.0.2.1", "2001:db8::1",
            "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "not an address",
        ):  # fmt: skip
            self.assertFalse(destination_allowed(ip), ip)

    def test_embedded_public_ipv4_is_allowed(self) -> None:
        self.assertTrue(destination_allowed("64:ff9b::808:808"))  # NAT64 of 8.8.8.8
        self.assertTrue(destination_allowed("::ffff:8.8.8.8"))

    def test_allowed_networks_let_them_through(self) -> None:
        nets = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/8"))
        self.assertTrue(destination_allowed("10.0.0.1", nets))
        self.assertTrue(destination_allowed("::ffff:10.0.0.1", nets))
        self.assertTrue(destination_allowed("fd00::1", nets))
        self.assertFalse(destination_allowed("10.0.1.1", nets))
        self.assertFalse(destination_allowed("169.254.1.1", nets))

    def test_a_reloaded_configuration_reaches_the_scheduler(self) -> None:
        outbound = Outbound(
            load_config_text(CONFIG, "/nonexistent/mailx.yaml"),
            Queue(Path(self.mktemp())),
            None,
            mta_sts=None,
        )
        reloaded = load_config_text(
            CONFIG + "  allowed_networks: [10.0.0.0/8, 'fd00::/8']\n  connections: 7\n",
            "/nonexistent/mailx.yaml",
        )
        outbound.reconfigure(reloaded, None)
        self.assertEqual(outbound._slots.total, 7)
        self.assertEqual(
            outbound.config.outbound.allowed_networks,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
        )

    def test_the_last_retry_interval_repeats(self) -> None:
        retry = (300.0, 900.0, 3600.0)
        self.assertEqual([retry_after(retry, n) for n in range(1, 6)], [300.0, 900.0, 3600.0, 3600.0, 3600.0])


class PrivateAddressTests(OutboundCase):
    """Item 18: an MX or smarthost in private or reserved space is never connected to.

    The endpoint factory records every attempt and connects each one to the
    sink on 127.0.0.1 whatever address it was for: the test can see an
    attempt without a packet ever leaving loopback.
    """

    def setUp(self) -> None:
        self.attempts: list[tuple[str, str | None]] = []
        self.endpoint_factory = self.record_attempt
        super().setUp()

    def record_attempt(self, name: str, ip: str | None) -> Any:
        self.attempts.append((name, ip))
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.sink.port, timeout=5)

    def restart(self, **overrides: Any) -> None:
        self.outbound.stopService()
        self.outbound = self.make_outbound(**overrides)
        self.outbound.startService()

    @defer.inlineCallbacks
    def test_private_mx_addresses_are_never_connected_to(self) -> None:
        events: list[str] = []
        observer = lambda event: events.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        domains = ("private.test", "linklocal.test", "ula.test", "shared.test", "mapped.test")
        envelope = self.submit(recipients=tuple(f"someone@{d}" for d in domains))
        yield self.settle(envelope)
        self.assertEqual(self.attempts, [])
        self.assertEqual(self.sink.connections, 0)
        for r in envelope.recipients:
            self.assertEqual(r.state, PENDING, r.address)
            self.assertIn("private or reserved", r.last_reply)
            self.assertTrue(r.last_reply.startswith("451 4.4.4"))
        self.assertIn(
            f"{envelope.id}: not connecting to mx.linklocal.test[169.254.169.254] for"
            " linklocal.test: private or reserved address, not in outbound.allowed_networks",
            events,
        )

    @defer.inlineCallbacks
    def test_private_mx_is_retried_and_bounced_at_the_end_of_the_lifetime(self) -> None:
        envelope = self.submit(recipients=("someone@private.test",))
        [r] = envelope.recipients
        while r.state == PENDING:
            yield self.settle(envelope)
            if r.state == PENDING:
                self.clock.advance(r.next_attempt - self.clock.seconds())
        self.assertEqual(r.state, FAILED)
        self.assertGreater(r.attempts, 1)
        [bounce] = yield self.sink.wait_for(1)  # the bounce to alice@sender.test
        self.assertEqual(bounce.recipients, ["alice@sender.test"])
        self.assertIn(b"Status: 4.4.4", bounce.data)
        self.assertEqual(self.attempts, [("mx.sender.test", "127.0.0.1")])

    @defer.inlineCallbacks
    def test_only_the_public_hosts_of_a_mixed_mx_set_are_tried(self) -> None:
        envelope = self.submit(recipients=("someone@mixed.test",))
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.attempts, [("mx.outside.test", "127.0.0.1")])

    @defer.inlineCallbacks
    def test_allowed_networks_lets_the_connection_be_attempted(self) -> None:
        self.restart(
            allowed_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
        )
        envelope = self.submit(recipients=("someone@private.test", "someone@ula.test"))
        yield self.sink.wait_for(2)
        yield self.gone(envelope)
        self.assertEqual(
            sorted(self.attempts), [("mx.private.test", "10.0.0.1"), ("mx.ula.test", "fd00::1")]
        )

    @defer.inlineCallbacks
    def test_private_smarthost_is_never_connected_to(self) -> None:
        self.restart(smarthost="tcp:10.0.0.1:25")
        envelope = self.submit()
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("smarthost 10.0.0.1", r.last_reply)
        self.assertEqual(self.attempts, [])

    @defer.inlineCallbacks
    def test_allowed_private_smarthost_is_used(self) -> None:
        self.restart(smarthost="tcp:10.0.0.1:25", allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),))
        envelope = self.submit()
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.attempts, [("tcp:10.0.0.1:25", None)])

    @defer.inlineCallbacks
    def test_loopback_smarthost_is_always_allowed(self) -> None:
        self.restart(smarthost=f"tcp:localhost:{self.sink.port}")
        envelope = self.submit()
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.attempts, [(f"tcp:localhost:{self.sink.port}", None)])
