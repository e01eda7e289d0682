# -*- test-case-name: tests.test_slowloris -*-
"""Slowloris: hundreds of trickling connections do not keep a real sender out.

Each slow client connects from 127.0.0.1, waits for the banner and then sends
one byte a second, which keeps resetting the idle timer.  Two defences are
checked against a ``twistd mailx`` child process:

- with the shipped ``limits.connections_per_ip`` (20), one address gets 20
  sessions and every further connection a 421, while a client from another
  address (presented through a ``haproxy:`` listener) delivers;
- with the cap raised so that all 300 are admitted and held, a normal client
  still delivers within seconds: the sessions cost memory, not turns.

The engine is ``bench/slowloris.py`` (loaded from its path), which also
prints the figures for longer runs: ``python3 bench/slowloris.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

from twisted.trial import unittest

SLOW_CLIENTS = 300
INTERVAL = 1.0  # seconds between two bytes of one slow client
DEFAULT_PER_IP_CAP = 20  # limits.connections_per_ip as shipped (mailx/config.py)
DELIVERIES = 3
WITHIN = 5.0  # seconds a normal delivery may take while the slow clients are held


def _load_engine() -> ModuleType:
    """bench/ is scripts, not a package: load the engine by path, once."""
    name = "mailx_bench_slowloris"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "bench" / "slowloris.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


slowloris = _load_engine()


class SlowlorisTests(unittest.TestCase):
    timeout = 180

    def start(self, per_ip_cap: int | None) -> tuple[int, int, Path]:
        """A server with a plain and a PROXY listener; (plain port, proxied port, bob's new/)."""
        directory = Path(self.mktemp()).absolute()
        # No greeting pause (1 s by default): the slow clients are opened 40 at
        # a time, each batch waiting for its banners, and the pause would only
        # make the test slower; bench/slowloris.py measures with it.
        server, plain, proxied = slowloris.start_server(directory, per_ip_cap, greeting_delay="0s")
        self.addCleanup(server.kill)
        return plain, proxied, directory / "mail" / "example.test" / "bob" / "new"

    def hold(self, port: int) -> object:
        """Start the slow clients and wait until each has its banner or its 421."""
        slow = slowloris.SlowClients(port, SLOW_CLIENTS, INTERVAL, duration=120)
        slow.start()
        self.addCleanup(slow.stop)
        self.assertTrue(slow.wait_settled(60), f"slow clients not settled: {slow.result.line()}")
        time.sleep(1.5 * INTERVAL)  # every admitted client has trickled at least once
        return slow

    def deliver_while_held(self, port: int, proxy_from: str | None) -> list[float]:
        """Seconds from connect to the 250 after DATA, greeting pause included."""
        latencies = []
        for n in range(DELIVERIES):
            latencies.append(slowloris.deliver(port, proxy_from, f"normal-{n}").total)
            time.sleep(INTERVAL / 2)
        return latencies

    def test_default_per_ip_cap_refuses_the_rest_and_another_address_delivers(self) -> None:
        plain, proxied, bob = self.start(per_ip_cap=None)
        slow = self.hold(plain)
        latencies = self.deliver_while_held(proxied, slowloris.NORMAL_CLIENT_FROM)
        result = slow.stop()
        self.assertEqual(result.admitted, DEFAULT_PER_IP_CAP, result.line())
        self.assertEqual(result.refused, SLOW_CLIENTS - DEFAULT_PER_IP_CAP, result.line())
        self.assertEqual(result.held, DEFAULT_PER_IP_CAP, result.line())
        self.assertGreater(result.bytes_sent, 0)
        self.assertLess(max(latencies), WITHIN, latencies)
        self.assertEqual(len(list(bob.iterdir())), DELIVERIES)

    def test_all_slow_clients_admitted_and_a_normal_client_still_delivers(self) -> None:
        plain, _, bob = self.start(per_ip_cap=SLOW_CLIENTS + 50)
        slow = self.hold(plain)
        latencies = self.deliver_while_held(plain, None)
        result = slow.stop()
        self.assertEqual(result.admitted, SLOW_CLIENTS, result.line())
        self.assertEqual(result.held, SLOW_CLIENTS, result.line())
        self.assertEqual((result.refused, result.dropped, result.failed), (0, 0, 0), result.line())
        self.assertGreaterEqual(result.bytes_sent, SLOW_CLIENTS)
        self.assertLess(max(latencies), WITHIN, latencies)
        self.assertEqual(len(list(bob.iterdir())), DELIVERIES)
