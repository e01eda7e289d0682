# -*- test-case-name: tests.test_tls -*-
"""STARTTLS and implicit TLS with a certificate the test generates."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailx.testing.server import TWISTD, LineClient, in_thread, message, start_server
from mailx.testing.tls import make_certificate


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


class STARTTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()).absolute())
        self.server = start_server(self, {"tls": {"certificate": str(cert), "key": str(key)}})

    @defer.inlineCallbacks
    def test_ehlo_offers_starttls_until_it_is_used(self) -> None:
        def run() -> tuple[bytes, bytes]:
            with smtplib.SMTP("127.0.0.1", self.server.port) as client:
                before = client.ehlo("c.test")[1]
                client.starttls(context=client_context())
                after = client.ehlo("c.test")[1]
                return before, after

        before, after = yield in_thread(run)
        self.assertIn(b"STARTTLS", before)
        self.assertNotIn(b"STARTTLS", after)

    @defer.inlineCallbacks
    def test_message_over_starttls_records_tls_in_received(self) -> None:
        def run() -> None:
            with smtplib.SMTP("127.0.0.1", self.server.port) as client:
                client.starttls(context=client_context())
                client.sendmail("s@sender.test", ["alice@example.test"], message("secret"))

        yield in_thread(run)
        [stored] = self.server.messages("alice")
        self.assertIn(b"with ESMTPS id", stored)
        self.assertRegex(stored.decode(), r"\(using TLSv1\.[23]:[A-Z0-9_-]+\)")

    @defer.inlineCallbacks
    def test_commands_pipelined_after_starttls_are_discarded(self) -> None:
        """CVE-2011-0411: cleartext sent with STARTTLS must not run inside TLS."""

        def run() -> list[tuple[int, bytes]]:
            client = LineClient(self.server.port)
            client.reply()
            client.command(b"EHLO c.test")
            client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
            go_ahead = client.reply()
            tls = client_context().wrap_socket(client.sock, server_hostname="mx.example.test")
            reader = tls.makefile("rb")

            def command(line: bytes) -> tuple[int, bytes]:
                tls.sendall(line + b"\r\n")
                reply = reader.readline()
                while reply[3:4] == b"-":
                    reply = reader.readline()
                return int(reply[:3]), reply[4:].strip()

            out = [go_ahead, command(b"EHLO c.test"), command(b"RCPT TO:<alice@example.test>")]
            tls.close()
            return out

        go_ahead, ehlo, rcpt = yield in_thread(run)
        self.assertEqual(go_ahead, (220, b"2.0.0 Ready to start TLS"))
        self.assertEqual(ehlo[0], 250)
        self.assertEqual(rcpt, (503, b"5.5.1 Need MAIL before RCPT"))

    @defer.inlineCallbacks
    def test_transaction_state_is_reset_by_starttls(self) -> None:
        """RFC 3207 4.2: MAIL given before STARTTLS is forgotten."""

        def run() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.server.port) as client:
                client.ehlo("c.test")
                client.mail("s@sender.test")
                client.starttls(context=client_context())
                client.ehlo("c.test")
                return client.rcpt("alice@example.test")

        code, _ = yield in_thread(run)
        self.assertEqual(code, 503)

    @defer.inlineCallbacks
    def test_second_starttls_is_503(self) -> None:
        def run() -> int:
            with smtplib.SMTP("127.0.0.1", self.server.port) as client:
                client.starttls(context=client_context())
                client.ehlo("c.test")
                return client.docmd("STARTTLS")[0]

        self.assertEqual((yield in_thread(run)), 503)

    @defer.inlineCallbacks
    def test_tls_below_1_2_is_refused(self) -> None:
        def run() -> None:
            with smtplib.SMTP("127.0.0.1", self.server.port) as client:
                client.starttls(context=client_context(maximum=ssl.TLSVersion.TLSv1_1))

        try:
            yield in_thread(run)
        except (ssl.SSLError, smtplib.SMTPException, OSError):
            pass
        else:
            self.fail("a TLS 1.1 handshake succeeded")
        yield in_thread(run_plain_noop, self.server.port)


def run_plain_noop(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.noop()[0] == 250


class ImplicitTLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ssl_endpoint_serves_smtps(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()).absolute())
        server = start_server(
            self,
            {
                "tls": {"certificate": str(cert), "key": str(key)},
                "listen": {
                    "smtp": [
                        "tcp:0:interface=127.0.0.1",
                        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                    ]
                },
            },
        )

        def run() -> None:
            with smtplib.SMTP_SSL("127.0.0.1", server.ports[1], context=client_context()) as client:
                client.sendmail("s@sender.test", ["alice@example.test"], message("smtps"))

        yield in_thread(run)
        self.assertIn(b"with ESMTPS id", server.messages("alice")[0])


class BadCertificateTests(unittest.TestCase):
    def test_mismatched_key_stops_start_up(self) -> None:
        directory = Path(self.mktemp()).absolute()
        cert, _ = make_certificate(directory / "one")
        _, other_key = make_certificate(directory / "two")
        (directory / "mailx.yaml").write_text(
            f"tls: {{certificate: {cert}, key: {other_key}}}\n"
            "domains:\n  example.test:\n    mailboxes: [postmaster]\n"
        )
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("mailx.yaml: tls: cannot use", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
