# -*- test-case-name: tests.test_bench_postfix -*-
"""bench/peer_postfix.py: the private Postfix starts on loopback, files into the Maildir, stops.

The benchmark's Postfix peer must deliver where run.py counts (``new/`` of
``mail/bench.test/alice/``) and leave no daemon behind; as the submission
bench's peer (sasl-relay) it must want TLS before AUTH, check passwords
with a private Dovecot reading mailx's passwd-file, and relay to the sink.
Skipped without Postfix or without root (its master must start as root).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import smtplib
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.internet import threads
from twisted.trial import unittest


def _load_peer() -> ModuleType:
    """bench/ is scripts, not a package: load the module by path, once."""
    name = "mailx_bench_peer_postfix"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "bench" / "peer_postfix.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


peer_postfix = _load_peer()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostfixPeerTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not peer_postfix.installed():
            raise unittest.SkipTest("Postfix not installed")
        if os.geteuid() != 0:
            raise unittest.SkipTest("Postfix's master starts as root")

    def test_maildir_delivery_and_stop(self) -> None:
        # Not under _trial_temp: Postfix's socket paths must stay under 108 bytes.
        directory = Path(tempfile.mkdtemp(prefix="mailx-pf-", dir="/var/tmp"))
        self.addCleanup(shutil.rmtree, directory, True)
        port = _free_port()
        inst = peer_postfix.Instance(directory / "postfix", port, "maildir",
                                     mail=directory / "mail")
        proc = peer_postfix.start(inst)
        self.addCleanup(peer_postfix.stop, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            refused = client.sendmail("x@client.test", ["alice@bench.test"],
                                      b"Subject: one\r\n\r\nbody\r\n")
        self.assertEqual(refused, {})
        new = directory / "mail" / "bench.test" / "alice" / "new"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (new.is_dir() and any(new.iterdir())):
            time.sleep(0.05)
        files = list(new.iterdir())
        self.assertEqual(len(files), 1)
        self.assertIn(b"Subject: one", files[0].read_bytes())
        # Not our domain: no relaying from the benchmark's peer either.
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("x@client.test")
            code, _ = client.rcpt("someone@elsewhere.test")
        self.assertEqual(code // 100, 5)
        peer_postfix.stop(proc)
        self.assertIsNotNone(proc.returncode)
        self.assertFalse(peer_postfix.group_alive(proc.pid), "a Postfix daemon outlived the stop")

    def test_sasl_relay_logs_in_through_dovecot_and_relays(self) -> Any:
        if not peer_postfix.dovecot_installed():
            raise unittest.SkipTest("Dovecot not installed")
        from mailx.smtp.accounts import hash_password
        from mailx.testing.sink import start_sink
        from mailx.testing.tls import make_certificate

        directory = Path(tempfile.mkdtemp(prefix="mailx-pf-", dir="/var/tmp"))
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = make_certificate(directory / "tls")
        passwd = directory / "passwd"
        passwd.write_text(f"alice@bench.test:{hash_password('right')}\n")
        sink = start_sink(keep_data=True)
        self.addCleanup(sink.stop)
        auth_port, port = _free_port(), _free_port()
        dovecot = peer_postfix.start_dovecot_auth(directory / "dovecot", passwd, auth_port)
        self.addCleanup(peer_postfix.stop, dovecot)
        inst = peer_postfix.Instance(directory / "postfix", port, "sasl-relay",
                                     relay=("127.0.0.1", sink.port), tls=(cert, key),
                                     sasl_path=f"inet:127.0.0.1:{auth_port}")

        def submit() -> dict:
            proc = peer_postfix.start(inst)
            self.addCleanup(peer_postfix.stop, proc)
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            seen = {}
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                seen["auth before TLS"] = client.has_extn("auth")
                client.starttls(context=context)
                client.ehlo()
                try:
                    client.login("alice@bench.test", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    seen["wrong password"] = e.smtp_code
                client.login("alice@bench.test", "right")
                # Another login's sender is refused (reject_sender_login_mismatch).
                try:
                    client.sendmail("bob@bench.test", ["someone@sink.test"], b"x\r\n")
                except smtplib.SMTPRecipientsRefused as e:
                    seen["other sender"] = e.recipients["someone@sink.test"][0]
            return seen

        def check(seen: dict) -> Any:
            self.assertFalse(seen["auth before TLS"])
            self.assertEqual(seen["wrong password"], 535)
            self.assertEqual(seen["other sender"], 553)
            return sink.wait_for(1)

        def relayed(messages: list) -> None:
            [message] = messages
            self.assertEqual((message.mail_from, message.recipients),
                             ("alice@bench.test", ["someone@sink.test"]))
            self.assertIn(b"Subject: relayed", message.data)

        def send_own() -> None:
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.starttls(context=context)
                client.login("alice@bench.test", "right")
                client.sendmail("alice@bench.test", ["someone@sink.test"],
                                b"From: alice@bench.test\r\nSubject: relayed\r\n\r\nbody\r\n")

        d = threads.deferToThread(submit)
        d.addCallback(lambda seen: threads.deferToThread(send_own).addCallback(lambda _: seen))
        d.addCallback(check)
        d.addCallback(relayed)
        return d
