# -*- test-case-name: tests.test_dnswatch -*-
"""The DNS watch (mailx.admin.dnswatch): the ``--check`` of every domain each ``dns.watch``.

Time is a `Clock` and the check a stub for the scheduling and logging
tests; one test runs the real check in a thread against the loopback
DNS server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from mailx.admin import dnswatch
from mailx.admin.dnssetup import Finding
from mailx.config import load_config
from mailx.testing.dnsserver import serve_for_test
from tests.test_dnssetup import CLITestCase, write_config, zone_from_json

HOUR = 3600.0


def finding(record: str, status: str, name: str = "example.test") -> Finding:
    return Finding(
        record,
        name,
        "TXT",
        status,
        True,
        "v=x",
        detail=f"{record} is {status}",
        fix=f"publish the {record} record",
    )


class FakeCheck:
    """Stands in for the DNS check: returns the findings it is told to."""

    def __init__(self) -> None:
        self.results: dict[str, list[Finding]] = {"example.test": [finding("SPF", "ok")]}
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self, config: Any) -> defer.Deferred:
        self.calls += 1
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(self.results)


class WatchTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.config = load_config(write_config(self.directory, extra=""))
        self.config = self.with_watch(HOUR)
        self.clock = Clock()
        self.check = FakeCheck()
        self.events: list[dict[str, Any]] = []
        self.patch(dnswatch, "log", Logger(namespace="test", observer=self.events.append))

    def with_watch(self, watch: float | None) -> Any:
        from dataclasses import replace

        return replace(self.config, dns=replace(self.config.dns, watch=watch))

    def watcher(self, config: Any = None) -> dnswatch.DNSWatchService:
        watcher = dnswatch.DNSWatchService(
            config or self.config, clock=self.clock, check=self.check
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        return watcher

    def warnings(self) -> list[str]:
        return [
            e["problem"] for e in self.events if e["log_level"].name == "warn" and "problem" in e
        ]

    def infos(self) -> list[str]:
        return [e["log_format"] for e in self.events if e["log_level"].name == "info"]


class ScheduleTests(WatchTestCase):
    def test_first_round_at_start(self) -> None:
        self.watcher()
        self.assertEqual(self.check.calls, 1)

    def test_a_round_each_period(self) -> None:
        self.watcher()
        self.clock.advance(HOUR - 1)
        self.assertEqual(self.check.calls, 1)
        self.clock.advance(1)
        self.assertEqual(self.check.calls, 2)
        self.clock.advance(HOUR)
        self.assertEqual(self.check.calls, 3)

    def test_stop_ends_the_rounds(self) -> None:
        watcher = self.watcher()
        watcher.stopService()
        self.clock.advance(10 * HOUR)
        self.assertEqual(self.check.calls, 1)

    def test_failed_round_is_logged_and_the_next_one_runs(self) -> None:
        self.check.error = RuntimeError("boom")
        self.watcher()
        self.assertTrue(any(e.get("log_failure") for e in self.events))
        self.check.error = None
        self.clock.advance(HOUR)
        self.assertEqual(self.check.calls, 2)

    def test_reload_changes_the_period(self) -> None:
        current = {"config": self.config}
        self.watcher(lambda: current["config"])
        current["config"] = self.with_watch(2 * HOUR)
        self.clock.advance(HOUR)  # this round still on the old period, then the new one
        self.assertEqual(self.check.calls, 2)
        self.clock.advance(HOUR)
        self.assertEqual(self.check.calls, 2)
        self.clock.advance(HOUR)
        self.assertEqual(self.check.calls, 3)

    def test_reload_to_null_stops_watching(self) -> None:
        current = {"config": self.config}
        self.watcher(lambda: current["config"])
        current["config"] = self.with_watch(None)
        self.clock.advance(HOUR)
        self.clock.advance(10 * HOUR)
        self.assertEqual(self.check.calls, 2)


class LogTests(WatchTestCase):
    def test_one_warning_per_drifted_record(self) -> None:
        self.check.results = {
            "example.test": [
                finding("MX", "ok"),
                finding("SPF", "wrong"),
                finding("DMARC", "missing", "_dmarc.example.test"),
            ]
        }
        self.watcher()
        warnings = self.warnings()
        self.assertEqual(len(warnings), 2)
        self.assertIn(
            "SPF example.test: wrong: SPF is wrong; fix: publish the SPF record", warnings[0]
        )
        self.assertIn("DMARC _dmarc.example.test: missing", warnings[1])
        self.assertEqual([e["domain"] for e in self.events if "problem" in e], ["example.test"] * 2)

    def test_warned_again_each_round_until_fixed_then_ok_again_once(self) -> None:
        self.check.results = {"example.test": [finding("SPF", "wrong")]}
        self.watcher()
        self.clock.advance(HOUR)
        self.assertEqual(len(self.warnings()), 2)
        self.check.results = {"example.test": [finding("SPF", "ok")]}
        self.clock.advance(HOUR)
        self.clock.advance(HOUR)
        again = [e for e in self.events if e["log_format"].endswith("is ok again")]
        self.assertEqual(len(again), 1)
        self.assertEqual(again[0]["record"], "SPF")

    def test_all_ok_is_one_info_line(self) -> None:
        self.watcher()
        self.assertEqual(self.warnings(), [])
        self.assertEqual(self.infos(), ["dns watch: {domain}: all {count} records ok"])


class AddTests(WatchTestCase):
    def test_not_added_without_watch(self) -> None:
        parent = service.MultiService()
        self.assertIsNone(dnswatch.add_dns_watch(parent, self.with_watch(None)))
        self.assertEqual(list(parent), [])

    def test_added_as_a_child(self) -> None:
        parent = service.MultiService()
        watcher = dnswatch.add_dns_watch(parent, self.config, clock=self.clock, check=self.check)
        self.assertEqual(list(parent), [watcher])
        parent.startService()
        self.addCleanup(parent.stopService)
        self.assertEqual(self.check.calls, 1)


class LiveTests(CLITestCase):
    """The real check, in a thread, against the loopback server."""

    @defer.inlineCallbacks
    def test_missing_dmarc_is_logged_with_its_fix(self) -> None:
        server = serve_for_test(self)
        path = write_config(self.directory, server.nameservers, extra="")
        status, out, _ = yield self.run_cli("dns", "example.test", "--json", "-c", str(path))
        server.load(zone_from_json(json.loads(out)))
        server.remove("_dmarc.example.test")
        events: list[dict[str, Any]] = []
        self.patch(dnswatch, "log", Logger(observer=events.append))
        watcher = dnswatch.DNSWatchService(load_config(path))
        yield watcher.check_once()
        problems = [e["problem"] for e in events if "problem" in e]
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("DMARC _dmarc.example.test: missing", problems[0])
        self.assertIn("fix: publish exactly one TXT record starting v=DMARC1", problems[0])
