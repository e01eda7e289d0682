# -*- test-case-name: tests.test_tls -*-
"""STARTTLS and implicit TLS with a certificate the test generates."""

from __future__ import annotations

import datetime
import smtplib
import ssl
import subprocess
from pathlib import Path

from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
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


def write_tls_config(directory: Path, cert: Path, key: Path) -> Path:
    """A mailx.yaml whose tls: block is on lines 2-4 (certificate 3, key 4)."""
    path = directory / "mailx.yaml"
    path.write_text(
        "hostname: mx.example.test\n"
        "tls:\n"
        f"  certificate: {cert}\n"
        f"  key: {key}\n"
        "listen: {smtp: ['tcp:0:interface=127.0.0.1']}\n"
        "paths: {mail: mail, spool: spool}\n"
        "domains:\n  example.test:\n    mailboxes: [postmaster]\n"
    )
    return path


def mailxctl_check(config: Path) -> tuple[int, str, str]:
    """``mailxctl check -c config`` in-process: (status, stdout, stderr)."""
    import contextlib
    import io

    from mailx.admin import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["check", "-c", str(config)])
    return status, out.getvalue(), err.getvalue()


class CertificateCheckTests(unittest.TestCase):
    """``mailxctl check`` and start-up check the tls: pair, in words (mailx.tlsfiles)."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()

    def check(self, cert: Path, key: Path) -> tuple[int, str, str, Path]:
        config = write_tls_config(self.directory, cert, key)
        return (*mailxctl_check(config), config)

    def test_mismatched_key_is_an_error_in_words(self) -> None:
        cert, _ = make_certificate(self.directory / "one")
        _, other_key = make_certificate(self.directory / "two")
        status, out, err, config = self.check(cert, other_key)
        self.assertEqual(status, 1)
        self.assertEqual(
            err,
            f"{config}:4: tls.key: {other_key} does not match the certificate; the certificate"
            f" in {cert} was issued for another key: install the key made with this"
            " certificate, or the certificate issued for this key\n",
        )
        self.assertNotIn("OK", out)

    def test_key_of_a_later_certificate_in_the_chain(self) -> None:
        leaf, _ = make_certificate(self.directory / "leaf")
        other, other_key = make_certificate(self.directory / "other")
        chain = self.directory / "chain.pem"
        chain.write_bytes(leaf.read_bytes() + other.read_bytes())
        status, _, err, _ = self.check(chain, other_key)
        self.assertEqual(status, 1)
        self.assertIn(
            f"it belongs to certificate 2 of 2 in {chain}: the server's own certificate must"
            " come first, then the chain",
            err,
        )

    def test_swapped_files(self) -> None:
        cert, key = make_certificate(self.directory)
        status, _, err, _ = self.check(key, cert)
        self.assertEqual(status, 1)
        self.assertIn(
            f"tls.certificate: no PEM certificate in {key} (it holds a private key: are"
            " certificate and key swapped?)",
            err,
        )

    def test_key_with_a_passphrase(self) -> None:
        cert, key = make_certificate(self.directory, passphrase=b"secret")
        status, _, err, _ = self.check(cert, key)
        self.assertEqual(status, 1)
        self.assertIn(f"tls.key: {key} is protected by a passphrase", err)

    def test_expired_certificate_is_a_warning(self) -> None:
        cert, key = make_certificate(self.directory, valid_for=datetime.timedelta(days=-3))
        status, out, err, config = self.check(cert, key)
        self.assertEqual((status, err), (0, ""))
        [warning] = [line for line in out.splitlines() if line.startswith("warning:")]
        self.assertTrue(warning.startswith(f"warning: {config}:3: tls.certificate: {cert}"))
        self.assertIn("expired on", warning)

    def test_certificate_about_to_expire_is_a_warning(self) -> None:
        cert, key = make_certificate(self.directory, valid_for=datetime.timedelta(days=5, hours=1))
        status, out, _, _ = self.check(cert, key)
        self.assertEqual(status, 0)
        self.assertIn("in 5 days: renew it", out)

    def test_good_pair_has_no_warning(self) -> None:
        cert, key = make_certificate(self.directory)
        status, out, err, _ = self.check(cert, key)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([x for x in out.splitlines() if x.startswith("warning:")], [])

    def test_certificate_for_another_name_is_a_warning(self) -> None:
        cert, key = make_certificate(self.directory, hostname="www.example.test")
        _, out, _, _ = self.check(cert, key)
        self.assertIn(
            f"{cert} is for www.example.test, not for the hostname mx.example.test", out
        )

    def test_world_readable_key_is_an_error_as_for_dkim_keys(self) -> None:
        cert, key = make_certificate(self.directory)
        key.chmod(0o644)
        status, _, err, config = self.check(cert, key)
        self.assertEqual(status, 1)
        self.assertEqual(
            err,
            f"{config}:4: tls.key: every user of this machine can use {key} (mode 0644):"
            f" chmod 600 {key}\n",
        )

    def test_group_readable_key_is_fine(self) -> None:
        """0640 with a group such as Debian's ssl-cert."""
        cert, key = make_certificate(self.directory)
        key.chmod(0o640)
        status, _, err, _ = self.check(cert, key)
        self.assertEqual((status, err), (0, ""))


class CertificateWarningAtStartUpTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_start_up_logs_an_expiring_certificate_and_serves_starttls(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        cert, key = make_certificate(
            Path(self.mktemp()).absolute(), valid_for=datetime.timedelta(days=3, hours=1)
        )
        server = start_server(self, {"tls": {"certificate": str(cert), "key": str(key)}})
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertTrue(
            any(f"tls.certificate: {cert}" in w and "in 3 days: renew it" in w for w in warnings),
            warnings,
        )

        def run() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.starttls(context=client_context())
                client.sendmail("s@sender.test", ["alice@example.test"], message("soon"))

        yield in_thread(run)
        self.assertEqual(len(server.messages("alice")), 1)


class BadCertificateTests(unittest.TestCase):
    def test_mismatched_key_stops_start_up_with_the_words_of_check(self) -> None:
        directory = Path(self.mktemp()).absolute()
        cert, _ = make_certificate(directory / "one")
        _, other_key = make_certificate(directory / "two")
        config = write_tls_config(directory, cert, other_key)
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        _, _, check_says = mailxctl_check(config)
        self.assertEqual(result.stderr.replace(str(config), "mailx.yaml"),
                         check_says.replace(str(config), "mailx.yaml"))
        self.assertIn("does not match the certificate", result.stderr)
        self.assertNotIn("key values mismatch", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
