# -*- test-case-name: tests.test_hostile_sessions -*-
"""Strangers' sessions against a running mailx: each bad input gets its reply,
costs bounded memory, and another client is served meanwhile.

Real sockets on 127.0.0.1 and an in-process server (``mailx.testing.server``);
the session logic line by line is in tests/test_smtp.py.
"""

from __future__ import annotations

import email
import email.policy
import os
import socket
import struct
import threading
import time
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailx.smtp.server import CLOSE_GRACE, MAX_EARLY_INPUT
from mailx.smtp.session import Hold
from mailx.testing.server import (
    LineClient,
    RunningServer,
    dialogue,
    in_thread,
    message,
    send_mail,
    start_server,
)

PROMPTLY = 5.0  # seconds another client's whole delivery may take meanwhile


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def assert_served_promptly(case: unittest.TestCase, server: RunningServer, port: int | None = None) -> Any:
    """A normal client delivers a message within PROMPTLY seconds, and it is stored."""
    before = len(server.messages("bob"))
    started = time.monotonic()
    refused = yield send_mail(port or server.port, "s@sender.test", ["bob@example.test"], message("other"))
    elapsed = time.monotonic() - started
    case.assertEqual(refused, {})
    case.assertLess(elapsed, PROMPTLY)
    case.assertEqual(len(server.messages("bob")), before + 1)


@defer.inlineCallbacks
def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield sleep(0.05)


def log_lines(case: unittest.TestCase) -> list[str]:
    """mailx's log events from now on, formatted."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)

    class Lines(list):
        def __iter__(self) -> Any:
            return iter([formatEvent(e) or "" for e in events if e.get("log_namespace", "").startswith("mailx")])

    return Lines()


class UnreadRepliesTests(unittest.TestCase):
    """Issue 9 item 11: pipelined commands from a client that never reads."""

    timeout = 60

    @defer.inlineCallbacks
    def test_client_that_does_not_read_is_not_read_and_others_are_served(self) -> None:
        server = start_server(self, {"limits": {"junk_commands": 10**9}})
        flood = b"NOOP\r\n" * 100_000  # 600 KB a write

        stop = threading.Event()

        def run() -> int:
            sock = socket.socket()
            # A small receive window, so that the kernel does not absorb
            # tens of MiB of replies before the server's own buffer fills.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.settimeout(0.2)
            sent = 0
            deadline = time.monotonic() + 30
            try:
                while not stop.is_set() and time.monotonic() < deadline and sent < 50 * 2**20:
                    try:
                        sent += sock.send(flood)
                    except TimeoutError:
                        pass  # the server stopped reading: the kernel buffers are full
            finally:
                sock.close()  # with replies unread: the server must notice
            return sent

        flooding = in_thread(run)
        started = time.monotonic()
        self.addCleanup(stop.set)
        yield wait_until(lambda: server.service.factory.sessions, timeout=5)
        [session] = list(server.service.factory.sessions)
        # Once the kernel's buffers are full, our replies back up and the
        # session stops: it stays so while the client goes on sending.
        # (Replies go out through transport.write, so the hold is first taken
        # when Twisted's own buffer passes its mark within one reactor turn,
        # and released while the kernel's buffers still grow to take the
        # backlog; wait until they take no more, when the hold stays.)
        yield wait_until(lambda: Hold.BACKLOG in session.dialogue.holds, timeout=20)
        held_since = time.monotonic()
        while time.monotonic() - held_since < 2:
            if Hold.BACKLOG not in session.dialogue.holds:
                held_since = time.monotonic()
            self.assertLess(time.monotonic() - started, 25)
            yield sleep(0.05)
        yield sleep(1)
        self.assertIn(Hold.BACKLOG, session.dialogue.holds)
        self.assertLess(session.dialogue.buffered, 256 * 1024)
        written = session.transport.dataBuffer
        self.assertLess(len(written) + session.transport._tempDataLen, 2 * 2**20)
        yield assert_served_promptly(self, server)
        stop.set()
        sent = yield flooding
        self.assertLess(sent, 50 * 2**20)
        # It hung up while paused: the session ends and its slot is free.
        yield wait_until(lambda: not server.service.factory.sessions)
        self.assertEqual(server.service.factory.per_ip, {})

    @defer.inlineCallbacks
    def test_junk_commands_over_the_limit_are_421_and_close(self) -> None:
        server = start_server(self, {"limits": {"junk_commands": 5}})

        def run() -> tuple[list[tuple[int, bytes]], bool]:
            client = LineClient(server.port)
            try:
                client.reply()
                client.send(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
                return [client.reply() for _ in range(6)], client.closed()
            finally:
                client.close()

        got, closed = yield in_thread(run)
        self.assertEqual([code for code, _ in got], [250, 250, 252, 214, 250, 421])
        self.assertEqual(got[-1][1], b"4.7.0 Too many commands without mail, closing connection")
        self.assertTrue(closed)
        yield assert_served_promptly(self, server)


class HarvestingTests(unittest.TestCase):
    """Issue 9 item 13: refused recipients cost the error pause."""

    @defer.inlineCallbacks
    def test_refused_recipients_slow_down_then_421(self) -> None:
        server = start_server(self, {"limits": {"error_limit": 4}})
        guesses = b"".join(b"RCPT TO:<guess%d@example.test>\r\n" % i for i in range(6))

        def run() -> tuple[list[tuple[int, bytes]], float, bool]:
            client = LineClient(server.port)
            try:
                client.reply()
                client.command(b"EHLO harvester.test")
                client.command(b"MAIL FROM:<h@harvester.test>")
                started = time.monotonic()
                client.send(guesses)
                got = [client.reply() for _ in range(5)]
                return got, time.monotonic() - started, client.closed()
            finally:
                client.close()

        harvesting = in_thread(run)
        yield assert_served_promptly(self, server)
        got, elapsed, closed = yield harvesting
        self.assertEqual([code for code, _ in got], [550, 550, 550, 550, 421])
        self.assertEqual(got[-1][1], b"4.7.0 Too many errors, closing connection")
        # The third error (past half of error_limit) paused the next reply by 1 s.
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertTrue(closed)


class PipeliningTests(unittest.TestCase):
    """Issue 9 item 14: content sent after DATA before the 354 (RFC 2920 3.1)."""

    @defer.inlineCallbacks
    def test_content_before_354_is_554_closes_and_stores_nothing(self) -> None:
        server = start_server(self)

        def run() -> tuple[list[tuple[int, bytes]], bool]:
            client = LineClient(server.port)
            try:
                client.reply()
                client.command(b"EHLO eager.test")
                client.send(
                    b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                    b"Subject: early\r\n\r\nbody\r\n.\r\n"
                    b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
                )
                return [client.reply() for _ in range(3)], client.closed()
            finally:
                client.close()

        got, closed = yield in_thread(run)
        self.assertEqual(
            got,
            [
                (250, b"2.1.0 Sender OK"),
                (250, b"2.1.5 Recipient OK"),
                (554, b"5.5.0 Protocol error: message content sent before the 354 reply"),
            ],
        )
        self.assertTrue(closed)
        self.assertEqual(server.all_messages(), [])
        yield assert_served_promptly(self, server)

    @defer.inlineCallbacks
    def test_client_that_waits_for_354_may_pipeline_the_rest(self) -> None:
        server = start_server(self)

        def run() -> list[tuple[int, bytes]]:
            client = LineClient(server.port)
            try:
                client.reply()
                client.command(b"EHLO patient.test")
                client.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
                got = [client.reply() for _ in range(3)]
                client.send(b"Subject: ok\r\n\r\nbody\r\n.\r\nQUIT\r\n")
                return got + [client.reply(), client.reply()]
            finally:
                client.close()

        got = yield in_thread(run)
        self.assertEqual([code for code, _ in got], [250, 250, 354, 250, 221])
        self.assertEqual(len(server.messages("alice")), 1)


class EarlyTalkerTests(unittest.TestCase):
    """Issue 9 item 12: input before the banner is bounded."""

    @defer.inlineCallbacks
    def test_flood_before_the_banner_is_bounded_then_554(self) -> None:
        server = start_server(self, {"limits": {"greeting_delay": "1s"}})

        def run() -> tuple[int, tuple[int, bytes]]:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.settimeout(0.2)
            sent = 0
            try:
                for _ in range(20):
                    try:
                        sent += sock.send(b"EHLO spam\r\n" * 10_000)
                    except TimeoutError:
                        break
                client = LineClient.__new__(LineClient)
                client.sock, client.file = sock, sock.makefile("rb")
                sock.settimeout(30)
                return sent, client.reply()
            finally:
                sock.close()

        talking = in_thread(run)
        yield sleep(0.5)
        [session] = server.service.factory.sessions
        self.assertLessEqual(session.dialogue.buffered, MAX_EARLY_INPUT)
        yield assert_served_promptly(self, server)  # (its 1 s greeting pause included)
        sent, reply = yield talking
        self.assertEqual(reply, (554, b"5.5.0 Protocol error: you spoke before the greeting"))
        yield wait_until(lambda: not server.service.factory.sessions)

    @defer.inlineCallbacks
    def test_early_talker_that_hangs_up_frees_its_slot(self) -> None:
        server = start_server(self, {"limits": {"greeting_delay": "1s", "connections_per_ip": 1}})

        def run() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"EHLO spam\r\n")
            sock.close()

        yield in_thread(run)
        yield wait_until(lambda: not server.service.factory.sessions, timeout=5)
        yield assert_served_promptly(self, server)


def proxy_v2(family_proto: int, addresses: bytes) -> bytes:
    """A PROXY protocol v2 header: PROXY command, the given family/protocol byte."""
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family_proto]) + struct.pack("!H", len(addresses)) + addresses


class ProxyTrustTests(unittest.TestCase):
    """Issue 9 item 19: who may send a PROXY header, and what it may claim."""

    def start(self, trusted: list[str] | None = None) -> RunningServer:
        listen: dict[str, Any] = {
            "smtp": ["haproxy:tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
        }
        if trusted is not None:
            listen["haproxy_trusted_networks"] = trusted
        return start_server(self, {"listen": listen})

    def refused(self, port: int, header: bytes) -> defer.Deferred:
        def run() -> bytes:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(header + b"EHLO c.test\r\n")
                return sock.makefile("rb").read()
            except ConnectionResetError:
                return b""
            finally:
                sock.close()

        return in_thread(run)

    @defer.inlineCallbacks
    def test_untrusted_peer_is_disconnected_unheard(self) -> None:
        lines = log_lines(self)
        server = self.start(["192.0.2.0/24", "2001:db8::/32"])
        proxied, plain = server.ports
        got = yield self.refused(proxied, b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n")
        self.assertEqual(got, b"")  # no banner: never an SMTP session
        self.assertEqual(server.service.factory.per_ip, {})
        self.assertEqual(
            [line for line in lines if "haproxy_trusted_networks" in line],
            ["refused connection from 127.0.0.1: not in listen.haproxy_trusted_networks"],
        )
        yield assert_served_promptly(self, server, plain)

    @defer.inlineCallbacks
    def test_loopback_proxy_is_trusted_by_default(self) -> None:
        server = self.start()
        got = yield in_thread(dialogue, server.ports[0], [b"EHLO c.test"], "203.0.113.9")
        self.assertEqual(got[1][1].split(b"\n")[0], b"mx.example.test Hello 203.0.113.9")

    @defer.inlineCallbacks
    def test_proxy_v1_unknown_is_refused(self) -> None:
        server = self.start()
        # (Twisted refuses a bare "PROXY UNKNOWN"; with the optional fields it yields no source.)
        got = yield self.refused(server.ports[0], b"PROXY UNKNOWN ffff::1 ffff::1 40000 25\r\n")
        self.assertEqual(got, b"")
        yield assert_served_promptly(self, server, server.ports[1])

    @defer.inlineCallbacks
    def test_proxy_v2_unix_source_is_refused(self) -> None:
        server = self.start()
        paths = b"/run/client.sock".ljust(108, b"\0") + b"/run/mailx.sock".ljust(108, b"\0")
        got = yield self.refused(server.ports[0], proxy_v2(0x31, paths))
        self.assertEqual(got, b"")
        yield assert_served_promptly(self, server, server.ports[1])

    @defer.inlineCallbacks
    def test_header_in_pieces_then_silence_gets_the_banner(self) -> None:
        # Twisted's public proxyEndpoint says nothing when a header is done:
        # the session starts when getPeer() names the client (mailx.smtp.server._ProxyGate).
        server = self.start()

        def run() -> bytes:
            sock = socket.create_connection(("127.0.0.1", server.ports[0]), timeout=10)
            try:
                sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 4")
                time.sleep(0.2)
                sock.sendall(b"0000 25\r\n")
                return sock.makefile("rb").readline()
            finally:
                sock.close()

        banner = yield in_thread(run)
        self.assertTrue(banner.startswith(b"220 "), banner)

    @defer.inlineCallbacks
    def test_proxy_unknown_alone_is_refused_at_the_first_line(self) -> None:
        # A header that names no client changes no address: it is known to
        # be complete when input follows it, and refused then, unheard.
        server = self.start()

        def run() -> bytes:
            sock = socket.create_connection(("127.0.0.1", server.ports[0]), timeout=10)
            try:
                sock.sendall(b"PROXY UNKNOWN ffff::1 ffff::1 40000 25\r\n")
                time.sleep(0.3)
                sock.sendall(b"EHLO c.test\r\n")
                return sock.makefile("rb").read()
            except ConnectionResetError:
                return b""
            finally:
                sock.close()

        got = yield in_thread(run)
        self.assertEqual(got, b"")
        self.assertEqual(server.service.factory.per_ip, {})

    @defer.inlineCallbacks
    def test_proxy_v2_local_is_refused(self) -> None:
        server = self.start()
        local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
        got = yield self.refused(server.ports[0], local)
        self.assertEqual(got, b"")

    @defer.inlineCallbacks
    def test_proxy_v2_ipv4_source_is_taken(self) -> None:
        server = self.start()
        header = proxy_v2(0x11, bytes([198, 51, 100, 7, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 25))

        def run() -> tuple[int, bytes]:
            client = LineClient(server.ports[0])
            try:
                client.send(header)
                client.reply()
                return client.command(b"EHLO c.test")
            finally:
                client.close()

        code, text = yield in_thread(run)
        self.assertEqual(text.split(b"\n")[0], b"mx.example.test Hello 198.51.100.7")


class IPv6PrefixTests(unittest.TestCase):
    """Issue 9 item 20: one IPv6 /64 is one client for the per-IP limits."""

    def start(self, **limits: Any) -> RunningServer:
        return start_server(
            self,
            {
                "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]},
                "limits": {"connections_per_ip": 1, **limits},
            },
        )

    def banners(self, port: int, sources: list[str]) -> defer.Deferred:
        def run() -> list[int]:
            clients = [LineClient(port, proxy_from=source) for source in sources]
            try:
                return [client.reply()[0] for client in clients]
            finally:
                for client in clients:
                    client.close()

        return in_thread(run)

    @defer.inlineCallbacks
    def test_addresses_of_one_64_share_the_per_ip_cap(self) -> None:
        server = self.start()
        codes = yield self.banners(
            server.ports[0], ["2001:db8:0:1::1", "2001:db8:0:1:ffff:ffff:ffff:ffff", "2001:db8:0:2::1"]
        )
        self.assertEqual(codes, [220, 421, 220])
        yield assert_served_promptly(self, server, server.ports[1])

    @defer.inlineCallbacks
    def test_prefix_length_128_counts_single_addresses(self) -> None:
        server = self.start(ipv6_prefix_length=128)
        codes = yield self.banners(server.ports[0], ["2001:db8:0:1::1", "2001:db8:0:1::2"])
        self.assertEqual(codes, [220, 220])

    @defer.inlineCallbacks
    def test_ipv6_connection_rate_counts_the_64(self) -> None:
        server = self.start(connections_per_ip=10, connection_rate_per_ip=2)
        first = yield self.banners(server.ports[0], ["2001:db8:0:1::1"])
        second = yield self.banners(server.ports[0], ["2001:db8:0:1::2"])
        third = yield self.banners(server.ports[0], ["2001:db8:0:1::3", "2001:db8:0:9::3"])
        self.assertEqual(first + second + third, [220, 220, 421, 220])


class BareLineFeedTests(unittest.TestCase):
    """Issue 10 item 3: smtplib.sendmail(msg.as_bytes()) has LF line ends."""

    @defer.inlineCallbacks
    def test_lf_message_with_a_2_mib_attachment_is_accepted_whole(self) -> None:
        server = start_server(self)
        attachment = os.urandom(2 * 2**20)
        msg = EmailMessage()
        msg["From"] = "s@sender.test"
        msg["To"] = "alice@example.test"
        msg["Subject"] = "report"
        msg.set_content("See the attachment.\n")
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="r.bin")
        wire = msg.as_bytes()
        self.assertNotIn(b"\r\n", wire)
        refused = yield send_mail(server.port, "s@sender.test", ["alice@example.test"], wire)
        self.assertEqual(refused, {})
        [stored] = server.messages("alice")
        # Stored with LF line ends, as sent; smtplib added the final CRLF.
        self.assertTrue(stored.endswith(wire.split(b"\n\n", 1)[1] + b"\n"))
        parsed = email.message_from_bytes(stored, policy=email.policy.default)
        [part] = list(parsed.iter_attachments())
        self.assertEqual(part.get_content(), attachment)

    @defer.inlineCallbacks
    def test_70_kib_line_between_bare_lfs_is_still_refused(self) -> None:
        server = start_server(self)

        def run() -> tuple[tuple[int, bytes], bool]:
            client = LineClient(server.port)
            try:
                client.reply()
                for line in (b"EHLO c.test", b"MAIL FROM:<s@sender.test>",
                             b"RCPT TO:<alice@example.test>", b"DATA"):
                    client.command(line)
                client.send(b"Subject: long\n\n" + b"z" * 70_000 + b"\nend\r\n.\r\n")
                return client.reply(), client.closed()
            finally:
                client.close()

        reply, closed = yield in_thread(run)
        self.assertEqual(reply, (500, b"5.5.6 Line too long in message data, message refused"))
        self.assertTrue(closed)
        self.assertEqual(server.all_messages(), [])
        yield assert_served_promptly(self, server)

    @defer.inlineCallbacks
    def test_a_long_line_after_64_kib_of_short_ones_is_refused(self) -> None:
        # The 70,000-octet line starts past the first 64 KiB the session reads.
        server = start_server(self)

        def run() -> tuple[tuple[int, bytes], bool]:
            client = LineClient(server.port)
            try:
                client.reply()
                for line in (b"EHLO c.test", b"MAIL FROM:<s@sender.test>",
                             b"RCPT TO:<alice@example.test>", b"DATA"):
                    client.command(line)
                client.send(b"Subject: long\r\n\r\n" + b"short line\r\n" * 7000
                            + b"y" * 70_000 + b"\r\nend\r\n.\r\n")
                return client.reply(), client.closed()
            finally:
                client.close()

        reply, closed = yield in_thread(run)
        self.assertEqual(reply, (500, b"5.5.6 Line too long in message data, message refused"))
        self.assertTrue(closed)
        self.assertEqual(server.all_messages(), [])
        yield assert_served_promptly(self, server)


class HangUpWhileHeldTests(unittest.TestCase):
    """A client that hangs up while its session holds input is noticed, its slot freed."""

    @defer.inlineCallbacks
    def test_hang_up_during_the_checks_is_noticed_before_they_end(self) -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a DNS server that never answers
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        server = start_server(
            self,
            {
                "dns": {"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"], "timeout": "4s"},
                "authentication": {"spf": True},
            },
        )

        def run() -> None:
            client = LineClient(server.port)
            client.reply()
            for line in (b"EHLO c.test", b"MAIL FROM:<s@slow-dns.test>",
                         b"RCPT TO:<alice@example.test>", b"DATA"):
                client.command(line)
            client.send(b"Subject: checks\r\n\r\nbody\r\n.\r\n")
            time.sleep(0.3)  # the checks are waiting for DNS now
            client.close()

        started = time.monotonic()
        yield in_thread(run)
        yield wait_until(lambda: not server.service.factory.sessions, timeout=3)
        self.assertLess(time.monotonic() - started, 3)  # the DNS timeout is 4 s
        self.assertEqual(server.service.factory.per_ip, {})
        yield sleep(4.5)  # let the checks time out before the server stops


class HangUpMidDataTests(unittest.TestCase):
    """Hang-ups inside DATA after the body spilled to disk (h17)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_spilled_body_is_gone_when_the_session_ends_and_others_are_served(self) -> None:
        import random

        server = start_server(self)
        incoming = server.config.paths.spool / "incoming"
        factory = server.service.factory
        rng = random.Random(17)
        line = b"f" * 76 + b"\r\n"

        def hang_up(size: int, cut: int, long_line: bool) -> None:
            client = LineClient(server.port)
            try:
                client.reply()
                for command in (b"EHLO hangup.test", b"MAIL FROM:<s@sender.test>",
                                b"RCPT TO:<bob@example.test>", b"DATA"):
                    client.command(command)
                body = b"Subject: x\r\n\r\n" + line * (size // len(line))
                if long_line:
                    body += b"L" * (70 * 1024)  # refused, and the server hangs up
                try:
                    client.send(body[: len(body) - cut])
                except OSError:
                    pass  # the server hung up first
            finally:
                client.close()  # often before the server has read it all

        for n in range(12):
            before = len(server.messages("bob"))
            size, cut = rng.randint(300_000, 900_000), rng.randint(1, 100)
            hanging = in_thread(hang_up, size, cut, n % 4 == 3)
            yield assert_served_promptly(self, server)
            yield hanging
            # The session ends when the server reaches the hang-up, which
            # hands its spool file's removal to the disk pool: gone moments later.
            yield wait_until(lambda: not factory.sessions)
            yield wait_until(lambda: not list(incoming.iterdir()), timeout=5)
            self.assertEqual(list(incoming.iterdir()), [], (n, size, cut))
            self.assertEqual(len(server.messages("bob")), before + 1)  # only the bystander's

    @defer.inlineCallbacks
    def test_client_that_stops_reading_cannot_keep_a_closing_session_and_its_file(self) -> None:
        # (g): the server ends the session (idle timeout) while some replies
        # are still queued, below the mark at which it aborts at once; a
        # client that keeps its receive window shut kept the half-closed
        # session, its slot and its spool file for as long as it liked.
        server = start_server(self, {"limits": {"idle_timeout": "1s", "junk_commands": 10**9}})
        incoming = server.config.paths.spool / "incoming"
        factory = server.service.factory
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.addCleanup(sock.close)
        yield in_thread(sock.connect, ("127.0.0.1", server.port))
        yield wait_until(lambda: factory.sessions, timeout=5)
        [session] = list(factory.sessions)

        def queued() -> int:
            t = session.transport
            return len(t.dataBuffer) + t._tempDataLen

        # Unread replies until the kernel buffers are full and some wait in ours.
        # (Every reply goes through transport.write, so a batch's replies wait
        # in Twisted's buffer until the next reactor turn: batches of 100
        # (12 KB of replies) stay below the mark at which the session stops.)
        for _ in range(2000):
            if queued():
                yield sleep(0.05)
                if queued():  # not just this turn's writes: the kernel takes no more
                    break
            yield in_thread(sock.sendall, b"EHLO c.test\r\n" * 100)
            yield sleep(0.01)
        self.assertTrue(queued())
        self.assertNotIn(Hold.BACKLOG, session.dialogue.holds)
        yield in_thread(sock.sendall, b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<bob@example.test>\r\n")
        yield sleep(0.2)
        yield in_thread(sock.sendall, b"DATA\r\n")
        yield sleep(0.2)
        yield in_thread(sock.sendall, b"Subject: x\r\n\r\n" + (b"f" * 76 + b"\r\n") * 5000)
        yield wait_until(lambda: list(incoming.iterdir()), timeout=5)
        # The idle timeout closes the session; the client never reads again.
        yield wait_until(lambda: not factory.sessions, timeout=CLOSE_GRACE + 10)
        yield wait_until(lambda: not list(incoming.iterdir()), timeout=5)  # removed in the disk pool
        self.assertEqual(list(incoming.iterdir()), [])
        yield assert_served_promptly(self, server)
