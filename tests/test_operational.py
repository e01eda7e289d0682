# -*- test-case-name: tests.test_operational -*-
"""Operational errors are one clear line with the fix, not a traceback.

A port already in use, a spool or Maildir that cannot be written: what a
new owner meets first.  Start-up errors are checked with a real
``twistd -n mailx`` subprocess, delivery errors with a running server.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailx.testing.server import (
    TWISTD,
    capture_log,
    dialogue,
    free_port,
    in_thread,
    send_mail,
    start_server,
    write_config,
)


def run_twistd(config: Path, *extra: str, daemon: bool = False) -> subprocess.CompletedProcess:
    """``twistd [-n] mailx --config FILE``: its exit status and output."""
    mode = [] if daemon else ["--nodaemon", "--pidfile="]
    if daemon:
        mode = [f"--pidfile={config.parent / 'twistd.pid'}", f"--logfile={config.parent / 'log'}"]
    return subprocess.run(
        [*TWISTD, *mode, "mailx", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        cwd=config.parent,
        timeout=60,
    )


class PortInUseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.busy = socket.socket()
        self.busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen()
        self.addCleanup(self.busy.close)
        port = self.busy.getsockname()[1]
        self.listen = f"tcp:{port}:interface=127.0.0.1"
        self.config = write_config(
            Path(self.mktemp()).absolute(), {"listen": {"smtp": [self.listen]}}
        )

    def check(self, result: subprocess.CompletedProcess) -> None:
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertIn(
            f"mailx: cannot listen on {self.listen}: address already in use"
            " (another mail server running? change listen.smtp)",
            output,
        )
        self.assertEqual(len(output.strip().splitlines()), 1, output)

    def test_foreground_says_so_in_one_line(self) -> None:
        self.check(run_twistd(self.config))

    def test_daemon_says_so_in_one_line(self) -> None:
        self.check(run_twistd(self.config, daemon=True))


class SpoolNotWritableTests(unittest.TestCase):
    def test_spool_that_is_a_file_is_one_line_with_the_path(self) -> None:
        directory = Path(self.mktemp()).absolute()
        config = write_config(
            directory, {"listen": {"smtp": [f"tcp:{free_port()}:interface=127.0.0.1"]}}
        )
        (directory / "spool").write_text("not a directory")
        result = run_twistd(config)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertIn(f"paths.spool: {directory / 'spool'}", output)
        self.assertEqual(len(output.strip().splitlines()), 1, output)


class MissingConfigTests(unittest.TestCase):
    def test_missing_file_is_named_in_full_with_how_to_choose_one(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        result = run_twistd(directory / "mailx.yaml")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"mailx: {directory / 'mailx.yaml'}: no configuration file here", output)
        self.assertIn("--config FILE or $MAILX_CONFIG", output)
        self.assertEqual(len(output.strip().splitlines()), 1, output)


class MaildirNotWritableTests(unittest.TestCase):
    def setUp(self) -> None:
        self.log = capture_log(self)
        self.server = start_server(self)
        # Tests run as root, which ignores modes: a file where tmp/ should be
        # fails every write, as a directory owned by root does for mailx.
        tmp = self.server.maildir("alice") / "tmp"
        os.rmdir(tmp)
        tmp.write_text("")

    @defer.inlineCallbacks
    def test_451_and_one_log_line_and_others_still_served(self) -> None:
        replies = yield in_thread(
            dialogue,
            self.server.port,
            [b"EHLO c.test", b"MAIL FROM:<s@sender.test>", b"RCPT TO:<alice@example.test>",
             b"DATA", b"Subject: x\r\n\r\nbody\r\n."],
        )
        self.assertEqual(replies[5][0], 451)
        self.assertTrue(replies[5][1].startswith(b"4.3.0 "))
        lines = [line for line in self.log if "cannot file the message" in line]
        self.assertEqual(len(lines), 1, self.log)
        self.assertEqual(len(lines[0].splitlines()), 1, lines[0])
        self.assertIn(str(self.server.config.paths.mail), lines[0])
        self.assertFalse(any("Traceback" in line for line in self.log))
        refused = yield send_mail(self.server.port, "s@sender.test", ["bob@example.test"], b"x\r\n")
        self.assertEqual(refused, {})
        self.assertEqual(len(self.server.messages("bob")), 1)

