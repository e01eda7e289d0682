# -*- test-case-name: tests.test_lmtp -*-
"""LMTP delivery (SPEC 14), against a real Dovecot LMTP read back over IMAP.

The dialogue tests drive `LMTPClientProtocol` line by line; the rest start
a private Dovecot (`mailx.testing.dovecot`) and mailx in-process or, for
the crash test, two mailx hosts as subprocesses sharing one configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailx.admin import cli
from mailx.config import ConfigError, load_config
from mailx.inbound.routing import route
from mailx.outbound.lmtp import LMTPClientProtocol, endpoint_of, transport_for
from mailx.outbound.relay import ClientSettings, Timeouts, Transaction
from mailx.service import MailxService
from mailx.storage.queue import PENDING, Envelope, Queue
from mailx.testing import ENTRY_LINE, dovecot
from mailx.testing.server import (
    BASE_CONFIG,
    RunningServer,
    ServerProcess,
    free_port,
    in_thread,
    merge,
    send_mail,
    write_config,
)

SENDER = "bob@example.org"


def lmtp_domains(endpoint: str | None) -> dict[str, Any]:
    """example.test filed by ``endpoint`` (None: Maildir); example.org a Maildir domain
    with the sender's mailbox, where bounces land."""
    domain: dict[str, Any] = {
        "mailboxes": ["alice", "carol"],
        "aliases": {"postmaster": "alice", "team": ["alice", "carol"]},
    }
    if endpoint is not None:
        domain["delivery"] = {"lmtp": endpoint}
    return {
        "domains": {
            "example.test": domain,
            "example.org": {"mailboxes": ["bob"], "aliases": {"postmaster": "bob"}},
        },
        # Retries within the test's patience (a Dovecot that comes up later).
        "outbound": {"retry": ["1s"]},
    }


def message(subject: str, size: int = 0) -> bytes:
    body = ("x" * 70 + "\r\n") * (size // 72) if size else "Hello.\r\n"
    return (
        f"From: {SENDER}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.org>\r\n\r\n{body}"
    ).encode()


def message_ids(messages: list[bytes]) -> list[str]:
    found = []
    for m in messages:
        match = re.search(rb"^Message-ID: <([^@>]+)@", m, re.M | re.I)
        found.append(match.group(1).decode() if match else "")
    return found


# ---------------------------------------------------------------------------
# The dialogue (RFC 2033), line by line


class LMTPDialogueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        data = Path(self.mktemp())
        data.write_bytes(ENTRY_LINE + b"Subject: hi\r\n\r\n.leading dot\r\n")
        transaction = Transaction(
            mail_from="bob@example.org",
            recipients=("alice@example.test", "carol@example.test"),
            prefix=b"X-Original-To: team@example.test\r\n",
            data_path=data,
            size=50,
            eight_bit=False,
        )
        settings = ClientSettings(helo="mx.example.test", timeouts=Timeouts(), clock=self.clock)
        self.client = LMTPClientProtocol(transaction, settings, "unix:/run/lmtp")
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.results: list[Any] = []
        self.client.done.addBoth(self.results.append)

    def server_says(self, *lines: bytes) -> bytes:
        """Feed reply lines; return what the client wrote meanwhile."""
        self.transport.clear()
        for line in lines:
            self.client.dataReceived(line + b"\r\n")
        return self.transport.value()

    def until_data_sent(self) -> None:
        self.assertEqual(self.server_says(b"220 lmtp ready"), b"LHLO mx.example.test\r\n")
        sent = self.server_says(b"250-vm", b"250 8BITMIME")
        self.assertEqual(sent, b"MAIL FROM:<bob@example.org>\r\n")
        self.assertEqual(self.server_says(b"250 2.1.0 OK"), b"RCPT TO:<alice@example.test>\r\n")
        self.assertEqual(self.server_says(b"250 2.1.5 OK"), b"RCPT TO:<carol@example.test>\r\n")
        self.assertEqual(self.server_says(b"250 2.1.5 OK"), b"DATA\r\n")
        self.transport.clear()
        self.client.dataReceived(b"354 OK\r\n")
        # The producer streams the file, dot-stuffed, then the end of data.
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertEqual(
            self.transport.value(),
            b"X-Original-To: team@example.test\r\nSubject: hi\r\n\r\n..leading dot\r\n.\r\n",
        )

    def test_greets_with_lhlo_and_never_falls_back_to_helo(self) -> None:
        self.server_says(b"220 lmtp ready")
        self.assertEqual(self.server_says(b"500 5.5.1 unknown command"), b"QUIT\r\n")
        self.assertIsInstance(self.results[0], Failure)

    def test_one_reply_per_recipient_after_the_data(self) -> None:
        self.until_data_sent()
        self.server_says(b"250 2.0.0 <alice@example.test> Saved")
        self.assertEqual(self.results, [], "done before every recipient's reply")
        self.server_says(b"552 5.2.2 <carol@example.test> Quota exceeded")
        replies = self.results[0].replies
        self.assertEqual(replies["alice@example.test"].code, 250)
        self.assertEqual(replies["carol@example.test"].code, 552)

    def test_a_break_after_one_reply_keeps_that_recipient_delivered(self) -> None:
        self.until_data_sent()
        self.server_says(b"250 2.0.0 <alice@example.test> Saved")
        self.client.connectionLost(Failure(ConnectionError("gone")))
        replies = self.results[0].replies
        self.assertEqual(replies["alice@example.test"].code, 250)
        self.assertEqual(replies["carol@example.test"].code // 100, 4)

    def test_a_silent_server_times_out_per_reply(self) -> None:
        self.until_data_sent()
        self.server_says(b"250 2.0.0 <alice@example.test> Saved")
        self.clock.advance(Timeouts().data_end + 1)
        replies = self.results[0].replies
        self.assertEqual(replies["alice@example.test"].code, 250)
        self.assertEqual(replies["carol@example.test"].enhanced, "4.4.2")


# ---------------------------------------------------------------------------
# Configuration, routing, the queue format


class LMTPConfigurationTests(unittest.TestCase):
    def load(self, endpoint: Any) -> Any:
        directory = Path(self.mktemp())
        return load_config(write_config(directory, lmtp_domains(endpoint)))

    def test_a_unix_endpoint_is_the_domains_delivery(self) -> None:
        config = self.load("unix:/run/dovecot/lmtp")
        self.assertEqual(config.domains["example.test"].lmtp, "unix:/run/dovecot/lmtp")
        self.assertIsNone(config.domains["example.org"].lmtp)

    def test_a_tcp_endpoint_is_accepted(self) -> None:
        config = self.load("tcp:127.0.0.1:24")
        self.assertEqual(config.domains["example.test"].lmtp, "tcp:127.0.0.1:24")

    def test_other_endpoint_kinds_are_refused_at_load(self) -> None:
        for endpoint in ("tls:mail.example.net:24", "ssl:host=x:port=1", "/run/dovecot/lmtp"):
            with self.assertRaises(ConfigError) as caught:
                self.load(endpoint)
            self.assertIn("domains.example.test.delivery.lmtp", str(caught.exception.problems[0]))

    def test_a_malformed_endpoint_is_refused_at_load(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load("tcp:127.0.0.1:notaport")
        self.assertIn("not a Twisted client endpoint", str(caught.exception.problems[0]))

    def test_an_alias_domain_has_no_delivery_of_its_own(self) -> None:
        overrides = lmtp_domains(None)
        overrides["domains"]["example.net"] = {
            "alias_of": "example.test",
            "delivery": {"lmtp": "unix:/run/lmtp"},
        }
        with self.assertRaises(ConfigError):
            load_config(write_config(Path(self.mktemp()), overrides))

    def test_sieve_before_is_refused_for_an_lmtp_domain(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "before.sieve").write_text('require "fileinto"; fileinto "Junk";\n')
        overrides = lmtp_domains("unix:/run/dovecot/lmtp")
        overrides["domains"]["example.test"]["sieve_before"] = "before.sieve"
        with self.assertRaises(ConfigError) as caught:
            load_config(write_config(directory, overrides))
        self.assertIn("its filters are the LMTP server's", str(caught.exception.problems[0]))

    def test_routing_names_the_lmtp_step_after_alias_expansion(self) -> None:
        config = self.load("unix:/run/dovecot/lmtp")
        decision = route(config, "team+news@example.test")
        self.assertEqual(
            [(d.address, d.lmtp) for d in decision.destinations],
            [("alice@example.test", "unix:/run/dovecot/lmtp"),
             ("carol@example.test", "unix:/run/dovecot/lmtp")],
        )
        self.assertTrue(any("LMTP unix:/run/dovecot/lmtp" in step for step in decision.trace))

    def test_mailxctl_route_shows_the_lmtp_step(self) -> None:
        path = write_config(Path(self.mktemp()), lmtp_domains("unix:/run/dovecot/lmtp"))
        output = self.run_cli(["--config", str(path), "route", "alice+x@example.test"])
        self.assertIn("mailbox alice@example.test: LMTP unix:/run/dovecot/lmtp", output)

    def test_mailxctl_check_says_whether_the_socket_exists(self) -> None:
        import socket
        import tempfile

        # Under /tmp: a unix socket's path is at most 108 octets.
        sockets = Path(tempfile.mkdtemp(prefix="mailx-check-"))
        self.addCleanup(shutil.rmtree, sockets, True)
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(str(sockets / "lmtp"))
        path = write_config(Path(self.mktemp()), lmtp_domains(f"unix:{sockets / 'lmtp'}"))
        self.assertIn("delivery: LMTP unix:", self.run_cli(["--config", str(path), "check"]))
        self.assertIn("(socket present)", self.run_cli(["--config", str(path), "check"]))
        os.unlink(sockets / "lmtp")
        self.assertIn("(socket missing", self.run_cli(["--config", str(path), "check"]))

    def run_cli(self, argv: list[str]) -> str:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            cli.main(argv)
        return out.getvalue()

    def test_queue_files_without_a_transport_read_as_mx_delivery(self) -> None:
        old = {
            "version": 1, "id": "Q1", "sender": "a@b.test", "created": 1.0,
            "recipients": [{"address": "x@y.test", "original": "x@y.test", "mail_from": ""}],
        }
        envelope = Envelope.from_json(json.dumps(old).encode())
        self.assertIsNone(envelope.recipients[0].transport)
        self.assertEqual(envelope.recipients[0].destination, "y.test")

    def test_transport_round_trips(self) -> None:
        self.assertEqual(endpoint_of(transport_for("unix:/run/lmtp")), "unix:/run/lmtp")
        self.assertIsNone(endpoint_of(None))


# ---------------------------------------------------------------------------
# Against a real Dovecot


class DovecotCase(unittest.TestCase):
    timeout = 120
    USERS = ("alice@example.test", "carol@example.test")  # Dovecot's userdb

    def setUp(self) -> None:
        why = dovecot.available()
        if why:
            raise unittest.SkipTest(why)
        self.dovecot = dovecot.PrivateDovecot(self.USERS)
        self.addCleanup(self.dovecot.remove)
        self.directory = Path(self.mktemp()).absolute()
        self.servers: list[RunningServer] = []

    def start_mailx(self, endpoint: str | None) -> RunningServer:
        """mailx in-process on ``self.directory`` (a restart keeps its spool and queue)."""
        path = write_config(self.directory, lmtp_domains(endpoint))
        service = MailxService(load_config(path))
        service.startService()
        server = RunningServer(service, service.config)
        self.servers.append(server)
        self.addCleanup(self.stop_mailx, server)
        return server

    def stop_mailx(self, server: RunningServer) -> defer.Deferred:
        if server not in self.servers:
            return defer.succeed(None)
        self.servers.remove(server)
        return server.stop()

    def reconfigure(self, server: RunningServer, endpoint: str | None) -> None:
        write_config(self.directory, lmtp_domains(endpoint))
        self.assertTrue(server.service.reload())

    def imap(self, user: str = "alice@example.test") -> defer.Deferred:
        return in_thread(self.dovecot.messages, user)

    @defer.inlineCallbacks
    def eventually(self, check: Any, timeout: float = 30.0) -> Any:
        """Poll ``check`` (blocking, run in a thread) until it returns something true."""
        deadline = time.monotonic() + timeout
        while True:
            result = yield in_thread(check)
            if result or time.monotonic() > deadline:
                return result
            yield task.deferLater(reactor, 0.2, lambda: None)

    def queue_empty(self, server: RunningServer) -> bool:
        return not Queue(server.config.paths.spool / "queue").ids()


class DovecotLMTPTests(DovecotCase):
    @defer.inlineCallbacks
    def test_delivered_over_a_unix_socket_and_read_over_imap(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        refused = yield send_mail(server.port, SENDER, ["alice+news@example.test"], message("m1"))
        self.assertEqual(refused, {})
        found = yield self.eventually(lambda: self.dovecot.messages("alice@example.test"))
        self.assertEqual(message_ids(found), ["m1"])
        header = found[0].split(b"\r\n\r\n", 1)[0]
        # Dovecot writes Return-Path and Delivered-To; ours are not there twice.
        self.assertEqual(header.count(b"Return-Path:"), 1)
        self.assertIn(b"Return-Path: <bob@example.org>", header)
        self.assertIn(b"Delivered-To: alice@example.test", header)
        self.assertIn(b"X-Original-To: alice+news@example.test", header)
        self.assertIn(b"by mx.example.test (mailx)", header)
        # Nothing in our Maildirs, nothing left in the queue.
        self.assertEqual(server.all_messages(), [])
        done = yield self.eventually(lambda: self.queue_empty(server))
        self.assertTrue(done)

    @defer.inlineCallbacks
    def test_one_lmtp_connection_carries_message_after_message(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        for n in range(5):
            yield send_mail(server.port, SENDER, ["alice@example.test"], message(f"r{n}"))
            yield self.eventually(lambda: self.queue_empty(server))
        found = yield self.imap()
        self.assertEqual(sorted(message_ids(found)), [f"r{n}" for n in range(5)])
        # Dovecot logs each connection; mailx keeps one idle between messages
        # (up to relay.IDLE_TIME: a second one only if the machine stalls that long).
        connects = self.dovecot.log().count("Connect from local")
        self.assertLessEqual(connects, 2, self.dovecot.log())

    @defer.inlineCallbacks
    def test_mailxctl_trace_shows_the_lmtp_step(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("traced"))
        yield self.eventually(lambda: self.dovecot.messages("alice@example.test"))
        endpoint = self.dovecot.unix_endpoint

        def story() -> str:
            import contextlib
            import io

            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                cli.main(["-c", str(server.config.source), "trace", "<traced@example.org>"])
            text = out.getvalue()
            return text if f"relay={endpoint}" in text else ""

        text = yield self.eventually(story)
        self.assertIn(f"via LMTP {endpoint}", text)
        self.assertIn(f"via lmtp:{endpoint}", text)
        self.assertRegex(text, rf"relay={re.escape(endpoint)} .* status=sent \(250 ")

    @defer.inlineCallbacks
    def test_an_alias_delivers_one_copy_to_each_final_mailbox_over_tcp(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.tcp_endpoint)
        yield send_mail(server.port, SENDER, ["team@example.test", "alice@example.test"],
                        message("m2"))
        alice = yield self.eventually(lambda: self.dovecot.messages("alice@example.test"))
        carol = yield self.eventually(lambda: self.dovecot.messages("carol@example.test"))
        self.assertEqual((message_ids(alice), message_ids(carol)), (["m2"], ["m2"]))

    @defer.inlineCallbacks
    def test_dovecot_down_queues_then_delivers_once_it_starts(self) -> None:
        server = self.start_mailx(self.dovecot.unix_endpoint)
        refused = yield send_mail(server.port, SENDER, ["alice@example.test"], message("m4"))
        self.assertEqual(refused, {}, "accepted while the LMTP server is down")
        queue = Queue(server.config.paths.spool / "queue")
        tried = yield self.eventually(
            lambda: any(r.attempts for e in queue.scan() for r in e.recipients)
        )
        self.assertTrue(tried)
        [entry] = queue.scan()
        self.assertEqual(entry.recipients[0].state, PENDING)
        self.assertEqual(entry.recipients[0].transport, "lmtp:" + self.dovecot.unix_endpoint)
        yield in_thread(self.dovecot.start)
        found = yield self.eventually(self.imap_ids)
        self.assertEqual(found, ["m4"])

    def imap_ids(self) -> list[str]:
        try:
            return message_ids(self.dovecot.messages("alice@example.test"))
        except OSError:
            return []

    @defer.inlineCallbacks
    def test_reload_switches_a_domain_between_maildir_and_lmtp(self) -> None:
        server = self.start_mailx(None)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("maildir1"))
        self.assertEqual(message_ids(server.messages("alice")), ["maildir1"])
        # To LMTP, with Dovecot down: the message waits in the queue.
        self.reconfigure(server, self.dovecot.unix_endpoint)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("lmtp1"))
        # And back to Maildir before Dovecot comes up: new mail follows the new
        # configuration, the queued entry still goes to the LMTP server.
        self.reconfigure(server, None)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("maildir2"))
        self.assertEqual(message_ids(server.messages("alice")), ["maildir1", "maildir2"])
        yield in_thread(self.dovecot.start)
        found = yield self.eventually(self.imap_ids)
        self.assertEqual(found, ["lmtp1"])


class SubmissionToLMTPTests(DovecotCase):
    @defer.inlineCallbacks
    def test_a_submitted_message_to_an_lmtp_mailbox_reaches_dovecot(self) -> None:
        import smtplib
        import ssl

        from mailx.smtp.accounts import hash_password
        from mailx.testing.server import start_server
        from mailx.testing.tls import make_certificate

        self.dovecot.start()
        cert, key = make_certificate(self.directory / "tls")
        passwd = self.directory / "passwd"
        passwd.write_text(f"{SENDER}:{hash_password('bobs')}\n")
        overrides = merge(lmtp_domains(self.dovecot.unix_endpoint), {
            "listen": {"submission": ["tcp:0:interface=127.0.0.1"]},
            "tls": {"certificate": str(cert), "key": str(key)},
            "accounts": {"passwords": str(passwd)},
        })
        server = start_server(self, overrides)

        def submit() -> None:
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            with smtplib.SMTP("127.0.0.1", server.ports[1], timeout=20) as client:
                client.starttls(context=context)
                client.login(SENDER, "bobs")
                client.sendmail(SENDER, ["alice@example.test"], message("submitted"))

        yield in_thread(submit)
        found = yield self.eventually(lambda: self.dovecot.messages("alice@example.test"))
        self.assertEqual(message_ids(found), ["submitted"])
        self.assertEqual(found[0].count(b"Return-Path:"), 1)
        self.assertEqual(server.all_messages(), [])


class UnknownToDovecotTests(DovecotCase):
    USERS = ("alice@example.test",)  # carol is ours, but Dovecot does not know her

    @defer.inlineCallbacks
    def test_a_recipient_dovecot_does_not_know_is_bounced_with_a_dsn(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        yield send_mail(server.port, SENDER, ["alice@example.test", "carol@example.test"],
                        message("m3"))
        bounces = yield self.eventually(lambda: server.messages("bob", "example.org"))
        self.assertEqual(len(bounces), 1)
        report = bounces[0].replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        self.assertIn(b"Final-Recipient: rfc822;carol@example.test\r\nAction: failed", report)
        self.assertIn(b"Status: 5.1.1", report)
        self.assertNotIn(b"rfc822;alice@example.test", report)
        alice = yield self.imap()
        self.assertEqual(message_ids(alice), ["m3"])


class DeliveryGuaranteeTests(DovecotCase):
    """At least once: a duplicate comes only from a crash between the LMTP 250 and
    the queue's record of it."""

    @defer.inlineCallbacks
    def test_a_restart_after_a_recorded_delivery_delivers_nothing_again(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("once"))
        yield self.eventually(lambda: self.queue_empty(server))
        yield self.stop_mailx(server)
        self.start_mailx(self.dovecot.unix_endpoint)
        yield task.deferLater(reactor, 2.0, lambda: None)  # a retry interval and more
        found = yield self.imap()
        self.assertEqual(message_ids(found), ["once"])

    @defer.inlineCallbacks
    def test_a_crash_before_the_lmtp_reply_neither_loses_nor_duplicates(self) -> None:
        # Dovecot down: every attempt fails before any data; then mailx "crashes"
        # (stops with the entry pending) and the restarted one delivers it.
        server = self.start_mailx(self.dovecot.unix_endpoint)
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("before"))
        yield self.stop_mailx(server)
        yield in_thread(self.dovecot.start)
        server = self.start_mailx(self.dovecot.unix_endpoint)
        found = yield self.eventually(self.imap_ids)
        yield self.eventually(lambda: self.queue_empty(server))
        found = yield self.imap()
        self.assertEqual(message_ids(found), ["before"])

    def imap_ids(self) -> list[str]:
        return message_ids(self.dovecot.messages("alice@example.test"))

    @defer.inlineCallbacks
    def test_a_crash_between_the_lmtp_250_and_the_queue_record_redelivers(self) -> None:
        self.dovecot.start()
        server = self.start_mailx(self.dovecot.unix_endpoint)
        filer = server.service.outbound.filer
        crashed = defer.Deferred()

        def crash(queue: Path, queue_ids: list[str]) -> defer.Deferred:
            # The process dies here: Dovecot said 250, the entry still says pending.
            reactor.callLater(0, crashed.callback, queue_ids[0])
            return defer.fail(SystemError("crash after the LMTP 250"))

        filer.remove_entries = crash
        yield send_mail(server.port, SENDER, ["alice@example.test"], message("twice"))
        queue_id = yield crashed
        yield self.stop_mailx(server)
        on_disk = Queue(self.directory / "spool" / "queue").load(queue_id)
        self.assertEqual(on_disk.recipients[0].state, PENDING)
        server = self.start_mailx(self.dovecot.unix_endpoint)
        yield self.eventually(lambda: self.queue_empty(server))
        found = yield self.imap()
        self.assertEqual(message_ids(found), ["twice", "twice"])
        self.flushLoggedErrors(SystemError)


# ---------------------------------------------------------------------------
# Two mailx hosts, one configuration, one Dovecot; kill -9 the primary


class TwoHostsTests(DovecotCase):
    timeout = 300
    SENDERS_PER_HOST = 3
    MESSAGES_PER_SENDER = 40
    KILL_AFTER = 30  # messages acknowledged by the primary

    def host(self, name: str, port: int) -> ServerProcess:
        """One YAML for both hosts (only the port differs on this one machine); relative
        paths, so each host has its own spool and queue beside its copy."""
        directory = self.directory / name
        directory.mkdir(parents=True)
        settings = merge(BASE_CONFIG, lmtp_domains(self.dovecot.unix_endpoint))
        settings["listen"] = {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}
        path = directory / "mailx.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        process = ServerProcess(path, port)
        self.addCleanup(process.kill)
        return process

    def send_load(
        self, ports: list[int], tag: str, acked: dict[str, str], lock: threading.Lock,
        primary_acked: threading.Event,
    ) -> None:
        """One sender: each message to the first host that takes it (MX 10, then 20)."""
        import smtplib

        for n in range(self.MESSAGES_PER_SENDER):
            subject = f"{tag}-{n}"
            for port in ports:
                client = None
                try:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                    client.sendmail(SENDER, ["alice@example.test"], message(subject, 1024))
                except (OSError, smtplib.SMTPException):
                    continue
                finally:
                    if client is not None:
                        # The 250 is the acknowledgement; a QUIT that fails
                        # because the host was just killed does not undo it
                        # (a sender that resent here would make a duplicate
                        # the guarantee does not cover).
                        try:
                            client.quit()
                        except (OSError, smtplib.SMTPException):
                            client.close()
                with lock:
                    acked[subject] = str(port)
                    if sum(1 for p in acked.values() if p == self.primary) >= self.KILL_AFTER:
                        primary_acked.set()
                break

    @defer.inlineCallbacks
    def test_every_acknowledged_message_reaches_dovecot_after_a_kill_9(self) -> None:
        self.dovecot.start()
        primary_port, secondary_port = free_port(), free_port()
        self.primary = str(primary_port)
        primary = self.host("primary", primary_port)
        secondary = self.host("secondary", secondary_port)
        yield in_thread(primary.start)
        yield in_thread(secondary.start)
        acked: dict[str, str] = {}
        lock = threading.Lock()
        primary_acked = threading.Event()
        senders = [
            threading.Thread(
                target=self.send_load,
                args=([primary_port, secondary_port], f"p{i}", acked, lock, primary_acked),
            )
            for i in range(self.SENDERS_PER_HOST)
        ] + [
            threading.Thread(
                target=self.send_load,
                args=([secondary_port, primary_port], f"s{i}", acked, lock, primary_acked),
            )
            for i in range(self.SENDERS_PER_HOST)
        ]
        for sender in senders:
            sender.start()
        yield in_thread(primary_acked.wait, 120)
        primary.kill()  # SIGKILL, by its PID
        # What the primary held when it died: the only messages that may arrive twice.
        queue = Queue(self.directory / "primary" / "spool" / "queue")
        window = set()
        for queue_id in queue.ids():
            window.update(message_ids([queue.data_path(queue_id).read_bytes()]))
        yield in_thread(lambda: [s.join(300) for s in senders])
        yield in_thread(primary.start)

        def settled() -> bool:
            queues = [Queue(self.directory / h / "spool" / "queue") for h in ("primary", "secondary")]
            return not any(q.ids() for q in queues)

        self.assertTrue((yield self.eventually(settled, timeout=120)))
        found = message_ids((yield self.imap()))
        counts = {subject: found.count(subject) for subject in set(found)}
        lost = sorted(set(acked) - set(counts))
        duplicates = sorted(s for s, n in counts.items() if n > 1)
        # Of those, acknowledged by the primary: its LMTP 250 came before its queue
        # recorded it; by the secondary: the primary died before its own 250 reached
        # the sender, who sent it again to the secondary (RFC 1047).
        lmtp_window = [s for s in duplicates if acked.get(s) == self.primary]
        print(
            f"\n  two hosts: {len(acked)} acknowledged"
            f" ({sum(p == self.primary for p in acked.values())} by the primary),"
            f" {len(window)} in the primary's queue at the kill, {len(found)} in Dovecot,"
            f" {len(lost)} lost, {len(duplicates)} duplicated ({len(lmtp_window)} after"
            f" the primary's LMTP 250, {len(duplicates) - len(lmtp_window)} resent by the"
            " sender after no 250 from the primary)"
        )
        self.assertEqual(lost, [], "acknowledged but never delivered")
        self.assertEqual(
            sorted(set(duplicates) - window), [], "duplicated outside the crash window"
        )
        self.assertTrue(set(counts) <= set(acked) | window, "delivered but never accepted")
        # Both hosts came back clean and served mail: the primary after its restart.
        yield send_mail(primary_port, SENDER, ["alice@example.test"], message("after"))
        self.assertIn("after", message_ids((yield self.eventually(self.after_delivered))) )
        secondary.terminate()
        primary.terminate()

    def after_delivered(self) -> list[bytes]:
        found = self.dovecot.messages("alice@example.test")
        return found if "after" in message_ids(found) else []
