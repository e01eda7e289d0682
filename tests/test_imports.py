# -*- test-case-name: tests.test_imports -*-
"""What the server imports, by configuration (issue 11: memory).

Most of the server's resident memory is the code it imports, so a feature
that is off must cost nothing: each case builds the service the way twistd
does (`mailx.service.makeService`) in a fresh interpreter and reads its
``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from mailx.testing.server import write_config

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import json, sys
from mailx import service
options = service.Options()
options.parseOptions(["--config", sys.argv[1]])
service.makeService(options)
print(json.dumps(sorted(sys.modules)))
"""

# Never in the server: the command line's own code and the reports.
ADMIN_ONLY = ("mailx.admin.cli", "mailx.admin.reports", "mailx.admin.dnssetup")
# Only with authentication checks on.
CHECKS = ("dkim", "spf", "publicsuffixlist", "mailx.checks.dkim", "mailx.checks.spf",
          "mailx.checks.dmarc")
# Only with listen.metrics.
METRICS = ("prometheus_client", "mailx.observe.metrics")
# Never at start-up: twisted.web's server and client (metrics listener,
# MTA-STS fetches) load when first used.
WEB = ("twisted.web.server", "twisted.web.client", "treq")
# Sieve: when a script is run.
SIEVE = ("mailx.filters.parser", "mailx.filters.interpreter")


def imported(testcase: unittest.TestCase, overrides: dict[str, Any]) -> set[str]:
    directory = Path(testcase.mktemp()).absolute()
    config = write_config(directory, overrides)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(config)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    testcase.assertEqual(result.returncode, 0, result.stderr)
    modules = set(json.loads(result.stdout.splitlines()[-1]))
    # The child ran this checkout's mailx, not the installed one.
    testcase.assertIn("mailx.service", modules)
    return modules


class ServerImportsTests(unittest.TestCase):
    def assertNoneImported(self, modules: set[str], names: tuple[str, ...]) -> None:
        self.assertEqual(sorted(n for n in names if n in modules), [])

    def test_checks_off(self) -> None:
        """The bench's configuration: no checks, no metrics, no TLS."""
        modules = imported(self, {})
        self.assertNoneImported(modules, ADMIN_ONLY + CHECKS + METRICS + WEB + SIEVE)

    def test_shipped_defaults(self) -> None:
        """SPF, DKIM and DMARC on (the shipped defaults): their modules, nothing more."""
        modules = imported(
            self, {"authentication": {"spf": True, "dkim": True, "dmarc": "enforce"}}
        )
        self.assertEqual([n for n in CHECKS if n not in modules], [])
        self.assertNoneImported(modules, ADMIN_ONLY + METRICS + WEB + SIEVE)

    def test_metrics_listener(self) -> None:
        modules = imported(self, {"listen": {"metrics": ["tcp:0:interface=127.0.0.1"]}})
        self.assertIn("prometheus_client", modules)
        self.assertNoneImported(modules, ADMIN_ONLY + CHECKS)


FREEZE = """
import gc, sys
from mailx import service
options = service.Options()
options.parseOptions(["--config", sys.argv[1]])
built = service.makeService(options)
assert built.freeze_heap
assert gc.get_freeze_count() == 0
service.freeze_heap()
print(gc.get_freeze_count())
"""


class FrozenHeapTests(unittest.TestCase):
    """twistd's server takes its start-up heap out of the collector's sight."""

    def test_make_service_asks_for_it_and_freeze_heap_freezes(self) -> None:
        directory = Path(self.mktemp()).absolute()
        config = write_config(directory, {})
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        result = subprocess.run(
            [sys.executable, "-c", FREEZE, str(config)],
            cwd=directory,
            env=dict(os.environ, PYTHONPATH=path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertGreater(int(result.stdout.splitlines()[-1]), 10_000)
