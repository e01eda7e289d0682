# -*- test-case-name: tests.test_forwarding -*-
"""Forwarding end to end: mailx on 127.0.0.1, an SMTP sink as the outside world's MX.

The loopback DNS server gives outside.test and sender.test MX hosts that
resolve to 127.0.0.1, and ``outbound.port`` points at the sink, so every
packet stays on 127.0.0.1.  The sink records each envelope and the exact
bytes; the sender's MX is the same sink, so bounces land there too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dkim
import yaml
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailx.admin import cli
from mailx.checks.dkim import verify_dkim
from mailx.dns import Resolver
from mailx.outbound import dkimkeys
from mailx.outbound.relay import Timeouts
from mailx.outbound.srs import SRS
from mailx.testing import SRS_SECRET, SRS_SECRET_2
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.server import (
    LineClient,
    ServerProcess,
    dialogue,
    free_port,
    send_mail,
    start_server,
    write_config,
)
from mailx.testing.sink import start_sink

SECRET = SRS_SECRET
ZONES = {
    "outside.test": {"MX": [(10, "mx.outside.test")]},
    "mx.outside.test": {"A": ["127.0.0.1"]},
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    # Senders for the backscatter tests: one that authorizes 127.0.0.1 and
    # a third party whose address a forger uses (SPF -all).
    "good.test": {"MX": [(10, "mx.sender.test")], "TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "third.test": {"MX": [(10, "mx.sender.test")], "TXT": ["v=spf1 -all"]},
    "soft.test": {"MX": [(10, "mx.sender.test")], "TXT": ["v=spf1 ~all"]},
}


def original(
    subject: str = "hello", body: bytes = b"Hello.\r\n", sender: str = "alice@sender.test"
) -> bytes:
    return (
        f"From: Alice <{sender}>\r\n"
        "To: boss@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
        "\r\n"
    ).encode() + body


def wait_until(predicate: Any, timeout: float = 20.0) -> defer.Deferred:
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll() -> Any:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, 0.02, lambda: None)

    return poll()


def config_overrides(dns_port: int, sink_port: int, **outbound: Any) -> dict[str, Any]:
    return {
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
        "domains": {
            "example.test": {
                "mailboxes": ["alice", "bob"],
                "aliases": {
                    "postmaster": "alice",
                    "boss": "someone@outside.test",
                    "both": ["bob", "someone@outside.test"],
                    "void": "someone@nullmx.test",
                    "odd": '"john smith"@outside.test',
                },
            }
        },
        "outbound": {
            "srs_secret": [SECRET],
            "port": sink_port,
            "retry": ["1s"],
            "queue_lifetime": "1h",
            "delay_warning": None,
            **outbound,
        },
    }


class ForwardingCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.server = start_server(self, config_overrides(self.dns.port, self.sink.port))
        self.queue_dir = self.server.config.paths.spool / "queue"

    def queued(self) -> list[str]:
        return sorted(n for n in os.listdir(self.queue_dir) if not n.startswith("."))

    def bounces(self) -> list[Any]:
        return [m for m in self.sink.accepted if m.mail_from == ""]


class ForwardTests(ForwardingCase):
    @defer.inlineCallbacks
    def test_forwarded_with_srs_and_the_message_byte_for_byte(self) -> None:
        sent = original()
        refused = yield send_mail(
            self.server.port, "alice@sender.test", ["boss@example.test"], sent
        )
        self.assertEqual(refused, {})
        [message] = yield self.sink.wait_for(1)
        self.assertRegex(
            message.mail_from, r"^SRS0=[^=]{6}=[A-Z2-7]{2}=sender\.test=alice@example\.test$"
        )
        self.assertEqual(message.recipients, ["someone@outside.test"])
        trace, _, rest = message.data.partition(b"From: Alice")
        self.assertEqual(b"From: Alice" + rest, sent)
        self.assertTrue(trace.startswith(b"Delivered-To: boss@example.test\r\nReceived: from "))
        self.assertIn(b"by mx.example.test (mailx) with ESMTP id ", trace)
        self.assertIn(b"for <boss@example.test>;", trace)
        self.assertNotIn(b"Return-Path", trace)
        self.assertEqual(SRS((SECRET,)).reverse(message.mail_from), "alice@sender.test")
        yield wait_until(lambda: self.queued() == [])

    @defer.inlineCallbacks
    def test_local_and_outside_recipients_of_one_message(self) -> None:
        yield send_mail(self.server.port, "alice@sender.test", ["both@example.test"], original())
        yield self.sink.wait_for(1)
        [stored] = self.server.messages("bob")
        self.assertIn(b"Delivered-To: bob@example.test\n", stored)

    @defer.inlineCallbacks
    def test_dkim_signature_verifies_at_the_peer(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
        message = original(body=b"Some text.\r\n.\r\n..dots\r\n\r\nTrailing spaces  \r\n")
        signature = dkim.sign(
            message, b"sel", b"sender.test", private, include_headers=[b"from", b"to", b"subject"]
        )
        signed = signature + message

        def dnsfunc(name: bytes, timeout: Any = 5) -> bytes | None:
            return record if name.rstrip(b".") == b"sel._domainkey.sender.test" else None

        self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc))
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], signed)
        [received] = yield self.sink.wait_for(1)
        self.assertTrue(dkim.verify(received.data, dnsfunc=dnsfunc))

    @defer.inlineCallbacks
    def test_first_line_dot_and_dot_line_at_16384_arrive_intact(self) -> None:
        first = b".\r\n" + original("first")
        head = original("boundary", body=b"")
        filler = b"".join(b"x" * 70 + b"\r\n" for _ in range(400))
        second = head + filler[: 16384 - len(head) - 2] + b"\r\n.\r\nafter the dot line\r\n"
        self.assertEqual(second.index(b"\r\n.\r\n") + 2, 16384)
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], first)
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], second)
        received = yield self.sink.wait_for(2)
        by_subject = {b"boundary" in m.data: m.data for m in received}
        self.assertTrue(by_subject[False].endswith(b"\r\n" + first))
        self.assertTrue(by_subject[True].endswith(b"\r\n" + second))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.sink.messages), 2)  # nothing smuggled

    @defer.inlineCallbacks
    def test_451_then_250(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 Greylisted, come back later")
        started = time.monotonic()
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], original())
        [message] = yield self.sink.wait_for(1)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)  # retry: [1s]
        # Two attempts; the retry within the idle time rides the kept connection.
        self.assertEqual(len([c for c in self.sink.commands if c.startswith(b"RCPT")]), 2)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(message.recipients, ["someone@outside.test"])
        yield wait_until(lambda: self.queued() == [])

    @defer.inlineCallbacks
    def test_silent_peer_times_out_and_is_retried(self) -> None:
        self.server.service.outbound.timeouts = Timeouts(greeting=0.5)
        self.sink.silent = True
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], original())
        yield wait_until(lambda: self.sink.connections >= 1)
        yield task.deferLater(reactor, 0.7, lambda: None)
        self.sink.silent = False
        yield self.sink.wait_for(1)
        self.assertGreaterEqual(self.sink.connections, 2)


class QueueCommandTests(unittest.TestCase):
    """``mailxctl queue`` against a running server."""

    timeout = 60

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        overrides = config_overrides(self.dns.port, self.sink.port, retry=["1h"])
        self.server = start_server(self, overrides)

    def mailxctl(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = cli.main(["-c", str(self.server.config.source), *argv])
        return status, out.getvalue()

    @defer.inlineCallbacks
    def test_list_shows_the_deferred_message_and_flush_retries_it_now(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 Greylisted")
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], original())
        outbound = self.server.service.outbound
        yield wait_until(
            lambda: any(
                e.envelope.recipients[0].attempts == 1 and not e.busy
                for e in outbound._entries.values()
            )
        )
        status, text = self.mailxctl("queue", "list", "--json")
        [entry] = json.loads(text)["messages"]
        [recipient] = entry["recipients"]
        self.assertEqual(
            (recipient["address"], recipient["state"]), ("someone@outside.test", "pending")
        )
        self.assertEqual(recipient["last_reply"], "451 4.7.1 Greylisted")
        self.assertGreater(recipient["next_attempt"] - time.time(), 3000)
        status, text = self.mailxctl("queue", "flush")
        self.assertEqual(status, 0)
        self.assertIn(f"pid {os.getpid()}", text)
        yield self.sink.wait_for(1)
        yield wait_until(lambda: self.mailxctl("queue", "list")[1].strip() == "the queue is empty")


class ReloadTests(ForwardingCase):
    @defer.inlineCallbacks
    def test_reload_rotates_the_srs_secret(self) -> None:
        old_address = SRS((SECRET,)).forward("carol@sender.test", "example.test")
        settings = yaml.safe_load(self.server.config.source.read_text())
        settings["outbound"]["srs_secret"] = [SRS_SECRET_2, SECRET]
        self.server.config.source.write_text(yaml.safe_dump(settings))
        self.assertTrue(self.server.service.reload())
        yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], original())
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(SRS((SRS_SECRET_2,)).reverse(message.mail_from), "alice@sender.test")
        refused = yield send_mail(self.server.port, "", [old_address], original("bounce"))
        self.assertEqual(refused, {})  # the old secret still verifies
        yield self.sink.wait_for(2)


class BounceTests(ForwardingCase):
    @defer.inlineCallbacks
    def test_550_sends_a_dsn_to_the_senders_mx(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 <someone@outside.test>: Recipient address rejected")
        yield send_mail(
            self.server.port, "alice@sender.test", ["boss@example.test"], original("lost")
        )
        [dsn] = yield self.sink.wait_for(1)
        self.assertEqual((dsn.mail_from, dsn.recipients), ("", ["alice@sender.test"]))
        self.assertIn(b"Content-Type: multipart/report; report-type=delivery-status", dsn.data)
        self.assertIn(b"Final-Recipient: rfc822;someone@outside.test", dsn.data)
        self.assertIn(b"Original-Recipient: rfc822;boss@example.test", dsn.data)
        self.assertIn(b"Status: 5.1.1", dsn.data)
        self.assertIn(
            b"Diagnostic-Code: smtp;550 5.1.1 <someone@outside.test>: Recipient address rejected",
            dsn.data,
        )
        self.assertIn(b"Subject: lost", dsn.data)
        yield wait_until(lambda: self.queued() == [])

    @defer.inlineCallbacks
    def test_dsn_is_dkim_signed_by_our_domain(self) -> None:
        """Our own bounces pass DMARC at the receiver (issue 5: mailx signs what it originates)."""
        yield self.server.stop()
        key = dkimkeys.generate_key("rsa")
        key_path = dkimkeys.write_key(key, Path(self.mktemp()).absolute() / "example.test.key")
        self.dns.set("mx1._domainkey.example.test", "TXT", [dkimkeys.dns_record(key)])
        overrides = config_overrides(self.dns.port, self.sink.port)
        overrides["domains"]["example.test"]["dkim"] = {"selector": "mx1", "key": str(key_path)}
        server = start_server(self, overrides)
        self.sink.script("rcpt", "550 5.1.1 no such user")
        yield send_mail(server.port, "alice@sender.test", ["boss@example.test"], original("signed"))
        [dsn] = yield self.sink.wait_for(1)
        self.assertIn(b"DKIM-Signature:", dsn.data.split(b"\r\n\r\n", 1)[0])
        resolver = Resolver(self.dns.nameservers, 2.0)
        [result] = yield resolver.call(verify_dkim, resolver, dsn.data)
        self.assertEqual((result.result, result.domain), ("pass", "example.test"))

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self) -> None:
        yield send_mail(self.server.port, "alice@sender.test", ["void@example.test"], original())
        [dsn] = yield self.sink.wait_for(1)
        self.assertEqual(dsn.recipients, ["alice@sender.test"])
        self.assertIn(b"Status: 5.1.10", dsn.data)

    @defer.inlineCallbacks
    def test_no_bounce_for_a_bounce(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user")
        yield send_mail(self.server.port, "", ["boss@example.test"], original())
        yield wait_until(lambda: self.queued() == [])
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.sink.accepted, [])

    @defer.inlineCallbacks
    def test_bounce_to_our_srs_address_reaches_the_original_sender(self) -> None:
        srs_address = SRS((SECRET,)).forward("carol@sender.test", "example.test")
        bounce = (
            b"From: MAILER-DAEMON@outside.test\r\nSubject: Undelivered Mail\r\n"
            b"Message-ID: <b1@outside.test>\r\n\r\nsorry\r\n"
        )
        refused = yield send_mail(self.server.port, "", [srs_address], bounce)
        self.assertEqual(refused, {})
        [message] = yield self.sink.wait_for(1)
        self.assertEqual((message.mail_from, message.recipients), ("", ["carol@sender.test"]))
        self.assertTrue(message.data.endswith(bounce))
        self.assertIn(f"Delivered-To: {srs_address.lower()}".encode(), message.data)

    @defer.inlineCallbacks
    def test_forged_srs_address_is_refused_at_rcpt(self) -> None:
        def dialogue() -> list[tuple[int, bytes]]:
            client = LineClient(self.server.port)
            try:
                client.reply()
                client.command(b"EHLO outside.test")
                client.command(b"MAIL FROM:<>")
                return [
                    client.command(b"RCPT TO:<SRS0=AAAAAA=AB=victim.test=anyone@example.test>"),
                    client.command(b"RCPT TO:<SRS0=A=AB=victim.test=anyone@example.test>"),
                ]
            finally:
                client.close()

        replies = yield deferToThread(dialogue)
        for code, text in replies:
            self.assertEqual(code, 550)
            self.assertTrue(text.startswith(b"5.7.1"))


class LoopTests(ForwardingCase):
    def refused(self, message: bytes, recipient: bytes = b"boss@example.test") -> defer.Deferred:
        def send() -> tuple[int, bytes]:
            client = LineClient(self.server.port)
            try:
                client.reply()
                client.command(b"EHLO sender.test")
                client.command(b"MAIL FROM:<alice@sender.test>")
                client.command(b"RCPT TO:<" + recipient + b">")
                client.command(b"DATA")
                return client.command(message + b".")
            finally:
                client.close()

        return deferToThread(send)

    @defer.inlineCallbacks
    def test_our_delivered_to_for_the_same_address_is_a_loop(self) -> None:
        code, text = yield self.refused(b"Delivered-To: boss@example.test\r\n" + original())
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.4.6"))
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_delivered_to_of_another_address_is_not(self) -> None:
        code, _ = yield self.refused(b"Delivered-To: someone@outside.test\r\n" + original())
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_local_delivery_loops_too(self) -> None:
        code, text = yield self.refused(
            b"Delivered-To: alice@example.test\r\n" + original(), recipient=b"alice@example.test"
        )
        self.assertEqual((code, text[:5]), (554, b"5.4.6"))

    @defer.inlineCallbacks
    def test_only_the_looping_copy_is_dropped(self) -> None:
        code, _ = yield self.refused(
            b"Delivered-To: bob@example.test\r\n" + original(), recipient=b"both@example.test"
        )
        self.assertEqual(code, 250)
        [message] = yield self.sink.wait_for(1)
        self.assertEqual(message.recipients, ["someone@outside.test"])
        self.assertEqual(self.server.messages("bob"), [])

    @defer.inlineCallbacks
    def test_more_than_50_received_is_a_loop(self) -> None:
        received = b"Received: from a.test by b.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 51
        code, text = yield self.refused(received + original())
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.4.6"))

    @defer.inlineCallbacks
    def test_50_received_is_not(self) -> None:
        received = b"Received: from a.test by b.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 50
        code, _ = yield self.refused(received + original())
        self.assertEqual(code, 250)


class CrashTests(unittest.TestCase):
    """``twistd mailx`` as a child process: the queue survives kill -9 and restarts."""

    timeout = 120

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.directory = Path(self.mktemp()).absolute()
        self.port = free_port()
        overrides = config_overrides(self.dns.port, self.sink.port, retry=["1h"])
        overrides["listen"] = {"smtp": [f"tcp:{self.port}:interface=127.0.0.1"]}
        self.config = write_config(self.directory, overrides)
        self.process = ServerProcess(self.config, self.port)
        self.addCleanup(self.process.kill)
        self.queue_dir = self.directory / "spool" / "queue"

    def envelopes(self) -> list[dict[str, Any]]:
        """Each entry's envelope as on disk: a changed one, else the entry's first line."""
        found = []
        for name in sorted(os.listdir(self.queue_dir)):
            if name.startswith(".") or "." in name:
                continue
            changed = self.queue_dir / (name + ".envelope")
            if changed.exists():
                found.append(json.loads(changed.read_bytes()))
            else:
                with open(self.queue_dir / name, "rb") as f:
                    found.append(json.loads(f.readline()))
        return found

    @defer.inlineCallbacks
    def test_queue_survives_kill_9_and_is_delivered_after_restart(self) -> None:
        self.sink.script("rcpt", *["451 4.3.0 try later"] * 3)
        yield deferToThread(self.process.start)
        for n in range(3):
            refused = yield send_mail(
                self.port, "alice@sender.test", ["boss@example.test"], original(f"crash {n}")
            )
            self.assertEqual(refused, {})
        yield wait_until(
            lambda: (
                len(self.envelopes()) == 3
                and all(e["recipients"][0]["attempts"] == 1 for e in self.envelopes())
            )
        )
        self.process.kill()
        self.assertEqual(len(self.envelopes()), 3)
        self.assertEqual(self.sink.accepted, [])
        # retry is 1h: only start-up (and the flush it finds) can send them now.
        yield deferToThread(self.process.start)
        flag = self.queue_dir / ".flush"
        flag.touch()
        received = yield self.sink.wait_for(3)
        subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in received)
        self.assertEqual(subjects, [b"crash 0", b"crash 1", b"crash 2"])
        yield wait_until(lambda: self.envelopes() == [])
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(self.sink.accepted), 3)  # each exactly once

    @defer.inlineCallbacks
    def test_kill_9_right_after_250_loses_nothing(self) -> None:
        yield self.sink.stop()  # nothing answers: the message can only wait in the queue
        yield deferToThread(self.process.start)
        yield send_mail(self.port, "alice@sender.test", ["boss@example.test"], original("kept"))
        self.process.kill()
        [envelope] = self.envelopes()
        self.assertEqual(envelope["recipients"][0]["state"], "pending")
        # A new sink, on another port: point the configuration at it.
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        settings = yaml.safe_load(self.config.read_text())
        settings["outbound"]["port"] = self.sink.port
        self.config.write_text(yaml.safe_dump(settings))
        yield deferToThread(self.process.start)
        (self.queue_dir / ".flush").touch()  # the 1h retry, now
        [message] = yield self.sink.wait_for(1)
        self.assertIn(b"Subject: kept", message.data)


def hostile_content_type(size: int = 250 * 1024) -> bytes:
    """A folded Content-Type of ``multipart/report;`` repeated: issue 9, item 9."""
    line = b"\tmultipart/report;" * 50 + b"\r\n"
    return b"Content-Type: multipart/report;\r\n" + line * (size // len(line))


def timed_delivery_after(sink: Any, port: int, seen: bytes) -> float:
    """Once the sink has seen a command starting with ``seen``: seconds a whole
    delivery to alice takes (a client in this thread, the server on the reactor)."""
    import smtplib

    deadline = time.monotonic() + 20
    while not any(c.startswith(seen) for c in list(sink.commands)):
        if time.monotonic() > deadline:
            raise AssertionError(f"the sink never saw {seen!r}")
        time.sleep(0.005)
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.noop()
        client.sendmail("carol@good.test", ["alice@example.test"], original("meanwhile"))
    return time.monotonic() - start


class HostileHeaderTests(ForwardingCase):
    """Item 9: ``dsn.is_report`` was a backtracking regex; deciding on a bounce froze the server."""

    @defer.inlineCallbacks
    def test_repeated_multipart_report_bounces_and_another_client_is_served(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user")
        hostile = (
            b"From: Alice <alice@sender.test>\r\nSubject: hostile\r\n"
            + hostile_content_type()
            + b"\r\nHello.\r\n"
        )
        refused = yield send_mail(self.server.port, "alice@sender.test", ["boss@example.test"], hostile)
        self.assertEqual(refused, {})
        # The forward fails now and the bounce is decided on; meanwhile:
        elapsed = yield deferToThread(timed_delivery_after, self.sink, self.server.port, b"RCPT")
        self.assertLess(elapsed, 5.0)  # it froze the reactor for 15 s
        self.assertEqual(len(self.server.messages("alice")), 1)  # acknowledged, filed
        [bounce] = yield self.sink.wait_for(1)
        # Not a delivery report (no report-type): a bounce, and a small one.
        self.assertEqual((bounce.mail_from, bounce.recipients), ("", ["alice@sender.test"]))
        self.assertIn(b"Subject: hostile", bounce.data)
        self.assertLess(len(bounce.data), 24 * 1024)
        yield wait_until(lambda: self.queued() == [])


class BackscatterTests(ForwardingCase):
    """Item 16: no bounce to a sender that SPF or DMARC does not vouch for."""

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        overrides = config_overrides(self.dns.port, self.sink.port)
        overrides["authentication"] = {"spf": True, "dkim": True, "dmarc": "enforce"}
        self.server = start_server(self, overrides)
        self.queue_dir = self.server.config.paths.spool / "queue"
        self.events: list[str] = []
        observer = lambda event: self.events.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def forward_refused(self, sender: str, message: bytes) -> Any:
        """Send ``message`` from ``sender`` to the forward; the destination says 550."""
        self.sink.script("rcpt", "550 5.1.1 no such user")
        refused = yield send_mail(self.server.port, sender, ["boss@example.test"], message)
        self.assertEqual(refused, {})
        yield wait_until(lambda: self.queued() == [])
        yield task.deferLater(reactor, 0.3, lambda: None)

    @defer.inlineCallbacks
    def test_forged_sender_failing_spf_gets_no_bounce(self) -> None:
        padding = b"".join(b"X-Spam-%d: %s\r\n" % (n, b"buy now " * 100) for n in range(300))
        message = original("forged", sender="victim@third.test")
        message = message.replace(b"\r\n\r\n", b"\r\n" + padding + b"\r\n", 1)
        yield self.forward_refused("victim@third.test", message)
        self.assertEqual(self.sink.accepted, [])  # the forward was refused, no bounce sent
        [line] = [e for e in self.events if "no bounce to <victim@third.test>" in e]
        self.assertIn("spf=fail", line)
        qid = line.split(":", 1)[0]
        self.assertTrue(any(e.startswith(f"{qid}: ") and "spf=fail" in e for e in self.events))

    @defer.inlineCallbacks
    def test_softfail_gets_no_bounce(self) -> None:
        yield self.forward_refused("someone@soft.test", original(sender="someone@soft.test"))
        self.assertEqual(self.sink.accepted, [])
        self.assertTrue(any("no bounce to <someone@soft.test>" in e for e in self.events))

    @defer.inlineCallbacks
    def test_spf_pass_gets_a_bounce_with_the_headers_only_and_bounded(self) -> None:
        padding = b"".join(b"X-Spam-%d: %s\r\n" % (n, b"buy now " * 100) for n in range(300))
        message = original("big", body=b"body text\r\n" * 2000, sender="carol@good.test")
        message = message.replace(b"\r\n\r\n", b"\r\n" + padding + b"\r\n", 1)
        self.assertGreater(len(message), 260_000)
        yield self.forward_refused("carol@good.test", message)
        [bounce] = self.sink.accepted
        self.assertEqual((bounce.mail_from, bounce.recipients), ("", ["carol@good.test"]))
        self.assertIn(b"Content-Type: text/rfc822-headers", bounce.data)
        self.assertIn(b"Subject: big", bounce.data)
        self.assertNotIn(b"body text", bounce.data)
        self.assertLess(len(bounce.data), 16 * 1024 + 4096)


def raw_send(port: int, sender: bytes, recipient: bytes, message: bytes) -> list[int]:
    """One transaction with the paths exactly as given (smtplib rewrites quoted ones)."""
    replies = dialogue(
        port,
        [
            b"EHLO client.sender.test",
            b"MAIL FROM:<" + sender + b">",
            b"RCPT TO:<" + recipient + b">",
            b"DATA",
            message + b".",
        ],
    )
    return [code for code, _ in replies]


class QuotedLocalPartTests(ForwardingCase):
    """Item 17: RFC 5321 4.1.2 Quoted-string local parts stay quoted on the wire."""

    def sent(self, verb: bytes) -> list[bytes]:
        return [c for c in self.sink.commands if c.startswith(verb)]

    @defer.inlineCallbacks
    def test_sender_with_a_space_is_quoted_in_the_srs_mail_from(self) -> None:
        codes = yield deferToThread(
            raw_send, self.server.port, b'"john smith"@sender.test', b"boss@example.test", original()
        )
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250])
        [message] = yield self.sink.wait_for(1)
        [mail] = self.sent(b"MAIL FROM:")
        self.assertRegex(
            mail, rb'^MAIL FROM:<"SRS0=[^=]+=[^=]+=sender\.test=john smith"@example\.test> '
        )
        self.assertEqual(self.sent(b"RCPT TO:"), [b"RCPT TO:<someone@outside.test>"])

    @defer.inlineCallbacks
    def test_sender_with_an_at_sign_is_quoted_in_the_srs_mail_from(self) -> None:
        codes = yield deferToThread(
            raw_send, self.server.port, b'"a@b"@sender.test', b"boss@example.test", original()
        )
        self.assertEqual(codes[-1], 250)
        yield self.sink.wait_for(1)
        [mail] = self.sent(b"MAIL FROM:")
        self.assertRegex(mail, rb'^MAIL FROM:<"SRS0=[^=]+=[^=]+=sender\.test=a@b"@example\.test> ')

    @defer.inlineCallbacks
    def test_quoted_forward_target_is_quoted_in_rcpt_to(self) -> None:
        yield send_mail(self.server.port, "alice@sender.test", ["odd@example.test"], original())
        yield self.sink.wait_for(1)
        self.assertEqual(self.sent(b"RCPT TO:"), [b'RCPT TO:<"john smith"@outside.test>'])

    @defer.inlineCallbacks
    def test_bounce_goes_to_the_quoted_sender_and_srs_reverses_it(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user")
        codes = yield deferToThread(
            raw_send, self.server.port, b'"john smith"@sender.test', b"boss@example.test", original()
        )
        self.assertEqual(codes[-1], 250)
        [bounce] = yield self.sink.wait_for(1)
        self.assertEqual(self.sent(b"RCPT TO:")[-1], b'RCPT TO:<"john smith"@sender.test>')
        self.assertIn(b'To: <"john smith"@sender.test>', bounce.data)
        # The destination's own bounce to our SRS address comes back and goes on, quoted.
        [mail] = self.sent(b"MAIL FROM:<\"SRS0")
        srs_address = mail[len(b"MAIL FROM:<") :].split(b">")[0]
        codes = yield deferToThread(
            raw_send, self.server.port, b"", srs_address, b"Subject: bounce\r\n\r\nsorry\r\n"
        )
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250])
        yield self.sink.wait_for(2)
        self.assertEqual(self.sent(b"RCPT TO:")[-1], b'RCPT TO:<"john smith"@sender.test>')
