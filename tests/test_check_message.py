# -*- test-case-name: tests.test_check_message -*-
"""``mailxctl check-message``: the server's checks on a saved message, against loopback DNS."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailx.admin.cli import main
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import write_config


class CheckMessageTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = serve_for_test(
            self,
            {
                "bank.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
                "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
            },
        )
        directory = Path(self.mktemp()).absolute()
        self.config = write_config(
            directory,
            {
                "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "1s"},
                "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
            },
        )
        self.message = directory / "saved.eml"
        # As saved by a mail client: LF line ends.
        self.message.write_bytes(b"From: ceo@bank.test\nSubject: wire money\n\nNow.\n")

    def run_cli(self, *argv: str) -> defer.Deferred:
        def run() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["-c", str(self.config), *argv])
            return code, out.getvalue(), err.getvalue()

        return deferToThread(run)

    @defer.inlineCallbacks
    def test_forged_sender_would_be_rejected(self) -> None:
        code, out, _ = yield self.run_cli(
            "check-message", str(self.message), "--ip", "192.0.2.1", "--helo", "evil.test",
            "--mail-from", "ceo@bank.test",
        )
        self.assertEqual(code, 1)
        self.assertIn("spf=fail (mailfrom ceo@bank.test)", out)
        self.assertIn("dkim=none", out)
        self.assertIn("dmarc=fail (header.from=bank.test, policy=reject", out)
        self.assertIn("action=reject: 550 5.7.1", out)
        self.assertIn("Authentication-Results: mx.example.test;", out)

    @defer.inlineCallbacks
    def test_genuine_sender_would_be_accepted(self) -> None:
        code, out, _ = yield self.run_cli(
            "check-message", str(self.message), "--ip", "198.51.100.20", "--helo", "mx.bank.test",
            "--mail-from", "ceo@bank.test",
        )
        self.assertEqual(code, 0, out)
        self.assertIn("spf=pass", out)
        self.assertIn("dmarc=pass", out)
        self.assertIn("action=accept", out)

    @defer.inlineCallbacks
    def test_json_output(self) -> None:
        code, out, _ = yield self.run_cli(
            "check-message", str(self.message), "--ip", "192.0.2.1", "--helo", "evil.test",
            "--mail-from", "ceo@bank.test", "--json",
        )
        data = json.loads(out)
        self.assertEqual(code, 1)
        self.assertEqual(data["spf"]["result"], "fail")
        self.assertEqual(data["dmarc"]["result"], "fail")
        self.assertEqual(data["action"], "reject")

    @defer.inlineCallbacks
    def test_missing_file_exits_1(self) -> None:
        code, _, err = yield self.run_cli(
            "check-message", "/nonexistent.eml", "--ip", "192.0.2.1", "--helo", "h.test",
            "--mail-from", "a@b.test",
        )
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)

    @defer.inlineCallbacks
    def test_missing_options_are_usage_errors(self) -> None:
        code, _, _ = yield self.run_cli("check-message", str(self.message))
        self.assertEqual(code, 2)
