# -*- test-case-name: tests.test_hardening -*-
"""Hostile configuration, full disks, power loss, terminal escapes: the running server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailx import service as service_module
from mailx.testing.server import (
    TWISTD,
    message,
    send_mail,
    start_server,
    write_config,
)
from tests.test_config import BOMB


def bombed(config_path: Path) -> None:
    """Put a YAML alias bomb at the top of a configuration file."""
    config_path.write_text(BOMB + config_path.read_text())


class ConfigBombTests(unittest.TestCase):
    """A 400-byte file that expands to 9^9 values: refused at once, everywhere it is read."""

    def test_startup_refuses_it_with_one_line(self) -> None:
        config = write_config(Path(self.mktemp()).absolute())
        bombed(config)
        start = time.monotonic()
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx", "--config", str(config)],
            capture_output=True, text=True, timeout=120, cwd=config.parent,
        )  # fmt: skip
        self.assertLess(time.monotonic() - start, 60)  # generous; 41 s of CPU before
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn(f"{config}: expands to more than 200000 values", output)
        self.assertNotIn("Traceback", output)

    def test_mailxctl_check_refuses_it(self) -> None:
        config = write_config(Path(self.mktemp()).absolute())
        bombed(config)
        result = subprocess.run(
            [sys.executable, "-m", "mailx.cli", "check", "-c", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"{config}: expands to more than 200000 values"
                         " (YAML aliases to aliases?)\n")  # fmt: skip

    @defer.inlineCallbacks
    def test_reload_refuses_it_and_keeps_serving(self) -> None:
        server = start_server(self)
        bombed(server.config.source)
        ok = yield server.service.reload_in_thread()
        self.assertFalse(ok)
        yield send_mail(server.port, "s@sender.test", ["bob@example.test"], message())
        self.assertEqual(len(server.messages("bob")), 1)

    @defer.inlineCallbacks
    def test_reload_parses_off_the_reactor_while_clients_are_served(self) -> None:
        # A parse that takes as long as the test wants: another client is
        # served from start to end while it runs (SIGHUP used to parse on the
        # reactor thread, so every session waited for the file).
        server = start_server(self)
        release = threading.Event()
        real = service_module.load_config

        def slow_load(path: object) -> object:
            release.wait(30)
            return real(path)

        self.patch(service_module, "load_config", slow_load)
        reloading = server.service.reload_in_thread()
        finished: list[object] = []
        reloading.addBoth(lambda result: finished.append(result) or result)
        try:
            yield send_mail(server.port, "s@sender.test", ["alice@example.test"], message())
            self.assertEqual(finished, [])  # served while the file was being read
        finally:
            release.set()
        ok = yield reloading
        self.assertTrue(ok)
        self.assertEqual(len(server.messages("alice")), 1)

