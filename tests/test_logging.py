# -*- test-case-name: tests.test_logging -*-
"""What the log says about a session: one line per event, IDs that join up."""

from __future__ import annotations

import re
import smtplib
import ssl
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailx.testing.server import capture_log, in_thread, message, start_server
from mailx.testing.tls import make_certificate


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SessionLogTests(unittest.TestCase):
    def setUp(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()).absolute())
        self.log = capture_log(self)
        self.server = start_server(self, {"tls": {"certificate": str(cert), "key": str(key)}})

    def send(self, tls: bool = False, size: bool = True) -> defer.Deferred:
        def run() -> None:
            with smtplib.SMTP("127.0.0.1", self.server.port, timeout=30) as client:
                if tls:
                    client.starttls(context=client_context())
                client.ehlo("c.test")
                if not size:
                    # smtplib adds SIZE= whenever the server offers it; speak plainly.
                    client.mail("s@sender.test")
                    client.rcpt("alice@example.test")
                    client.data(message())
                    return
                client.sendmail("s@sender.test", ["alice@example.test"], message())

        return in_thread(run)

    @defer.inlineCallbacks
    def test_queue_id_line_names_the_session(self) -> None:
        yield self.send()
        [connect] = [line for line in self.log if " connect from 127.0.0.1" in line]
        session = connect.split(":", 1)[0]
        [start] = [line for line in self.log if " from=<s@sender.test>" in line]
        self.assertIn(f" session={session} ", start)
        qid = start.split(":", 1)[0]
        self.assertTrue(any(line.startswith(f"{qid}: delivered") for line in self.log))

    @defer.inlineCallbacks
    def test_no_size_when_the_client_declared_none(self) -> None:
        yield self.send(size=False)
        [start] = [line for line in self.log if " from=<s@sender.test>" in line]
        self.assertNotIn("size=", start)

    @defer.inlineCallbacks
    def test_declared_size_is_logged(self) -> None:
        yield self.send()
        [start] = [line for line in self.log if " from=<s@sender.test>" in line]
        self.assertRegex(start, r" size=\d+ ")

    @defer.inlineCallbacks
    def test_tls_is_logged_once_with_version_and_cipher(self) -> None:
        yield self.send(tls=True)
        lines = [line for line in self.log if ": TLS " in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(re.search(r": TLS TLSv1\.[23]:[A-Z0-9_-]+ from 127\.0\.0\.1$", lines[0]))
