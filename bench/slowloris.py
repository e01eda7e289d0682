"""Slowloris against mailx: do hundreds of trickling connections starve a real client?

    python3 bench/slowloris.py                          # 300 slow connections, both scenarios
    python3 bench/slowloris.py --connections 1000 --interval 5 --duration 60

A slow client connects from 127.0.0.1, waits for the banner, then sends one
byte of an SMTP dialogue every ``--interval`` seconds: each byte resets the
idle timer, so such a client is never idle and holds its session until the
session deadline (``limits.session_timeout``, 30 minutes by default).  While
``--connections`` of them are held, a normal client delivers a message
``--deliveries`` times, timed in two parts: connect to banner (which includes
``limits.greeting_delay``, the deliberate pause before the banner, 1 s by
default) and banner to the ``250`` after DATA.  That is what a real sender
would feel.

Two scenarios, each on a fresh ``twistd mailx`` child process:

- ``default caps``: ``limits.connections_per_ip`` as shipped (20).  The slow
  clients all come from one address, so all but 20 are refused with 421 at
  once; the normal client comes from another address (through a ``haproxy:``
  listener and a PROXY header naming 198.51.100.7) and is served.
- ``per-IP cap raised``: the cap raised above ``--connections``, so every slow
  client is admitted and held; the normal client (from 127.0.0.1 too) must
  still be served in milliseconds, since one event loop multiplexes them all.

Only 127.0.0.1 is used; counts and durations are bounded.  tests/test_slowloris.py
runs the same engine (``SlowClients``) briefly.
"""

from __future__ import annotations

import argparse
import random
import resource
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailx.testing.server import LineClient, ServerProcess, free_port, write_config

HOST = "127.0.0.1"  # loopback only, whatever the options say
MAX_CONNECTIONS = 5000
MAX_DURATION = 600.0
NORMAL_CLIENT_FROM = "198.51.100.7"  # TEST-NET-2 (RFC 5737), presented in a PROXY header
# What a slow client trickles, one byte at a time: a plausible start of a
# transaction, then a body that never ends.
SLOW_SCRIPT = (
    b"EHLO slow.test\r\nMAIL FROM:<slow@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
)
SLOW_BODY_BYTE = b"z"
# Connections opened and not yet answered (banner or 421), at most.  The
# listen backlog is 50 (Twisted's default); a burst past it overflows the
# accept queue, and with SYN cookies a client whose last handshake ACK was
# dropped believes it is connected while the server never heard of it: in a
# server-speaks-first protocol both then wait forever.  Pacing avoids
# measuring that (see docs/security.md, "listen backlog").
MAX_PENDING = 40


def raise_fd_limit(needed: int) -> None:
    """Lift the soft RLIMIT_NOFILE to ``needed`` plus headroom, within the hard limit.

    The child server inherits it, so both sides can hold every connection.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is below the {want} needed")


@dataclass
class SlowResult:
    """What happened to the slow connections."""

    attempted: int = 0  # connections opened
    failed: int = 0  # connect() itself failed
    admitted: int = 0  # got the 220 banner
    refused: int = 0  # got 421 instead of a banner
    dropped: int = 0  # admitted, then closed by the server before the end
    held: int = 0  # admitted and still open when stopped
    bytes_sent: int = 0

    def line(self) -> str:
        return (
            f"opened {self.attempted}, admitted {self.admitted}, refused {self.refused}, "
            f"failed {self.failed}, dropped {self.dropped}, held at the end {self.held}"
        )


class _Slow:
    __slots__ = ("sock", "state", "inbox", "sent", "next_send")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = "connecting"  # connecting -> waiting (banner) -> admitted | refused | closed
        self.inbox = b""
        self.sent = 0
        self.next_send = 0.0


class SlowClients:
    """``count`` slow connections to 127.0.0.1:``port``, driven by one thread.

    Non-blocking sockets and a selector: hundreds of clients cost one thread.
    ``start()`` returns at once; ``wait_settled()`` waits until every
    connection has its banner or its refusal; ``stop()`` closes every socket
    and returns the figures.  Also usable as a context manager.
    """

    def __init__(self, port: int, count: int, interval: float, duration: float) -> None:
        if not 0 < count <= MAX_CONNECTIONS:
            raise ValueError(f"count must be 1..{MAX_CONNECTIONS}")
        if not 0 < duration <= MAX_DURATION:
            raise ValueError(f"duration must be at most {MAX_DURATION} s")
        self.port = port
        self.count = count
        self.interval = interval
        self.deadline = time.monotonic() + duration
        self.result = SlowResult()
        self._clients: list[_Slow] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._settled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> SlowClients:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        raise_fd_limit(self.count)
        self._thread.start()

    def wait_settled(self, timeout: float) -> bool:
        """True once every connection was opened and answered (banner, 421 or close)."""
        return self._settled.wait(timeout)

    def stop(self) -> SlowResult:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for client in self._clients:
            if client.state == "admitted":
                self.result.held += 1
            try:
                client.sock.close()
            except OSError:
                pass
        self._clients.clear()
        self._selector.close()
        if self._error is not None:
            raise RuntimeError("slow client thread failed") from self._error
        return self.result

    # --- the thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                self._open_more()
                for key, _ in self._selector.select(timeout=0.05):
                    self._readable(key.data)
                self._trickle()
                if self.result.attempted == self.count and not any(
                    c.state in ("connecting", "waiting") for c in self._clients
                ):
                    self._settled.set()
        except BaseException as e:  # reported by stop()
            self._error = e

    def _open_more(self) -> None:
        pending = sum(1 for c in self._clients if c.state in ("connecting", "waiting"))
        while self.result.attempted < self.count and pending < MAX_PENDING:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            self.result.attempted += 1
            try:
                sock.connect_ex((HOST, self.port))
            except OSError:
                self.result.failed += 1
                sock.close()
                continue
            client = _Slow(sock)
            client.state = "waiting"
            self._clients.append(client)
            self._selector.register(sock, selectors.EVENT_READ, client)
            pending += 1

    def _readable(self, client: _Slow) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(client)
            return
        if client.state != "waiting":
            return  # replies to what was trickled: not needed
        client.inbox += data
        if b"\r\n" not in client.inbox:
            return
        if client.inbox.startswith(b"220"):
            client.state = "admitted"
            self.result.admitted += 1
            # Spread the clients over the interval, as independent bots would be.
            client.next_send = time.monotonic() + random.uniform(0, self.interval)
        else:
            client.state = "refused"
            self.result.refused += 1

    def _closed(self, client: _Slow) -> None:
        if client.state == "admitted":
            self.result.dropped += 1
            client.state = "closed"
        elif client.state == "waiting":
            # Closed without a line: the connect failed or the server hung up.
            self.result.failed += 1
            client.state = "closed"
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _trickle(self) -> None:
        now = time.monotonic()
        for client in self._clients:
            if client.state != "admitted" or client.next_send > now:
                continue
            byte = SLOW_SCRIPT[client.sent : client.sent + 1] or SLOW_BODY_BYTE
            try:
                client.sock.send(byte)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self._closed(client)
                continue
            client.sent += 1
            self.result.bytes_sent += 1
            client.next_send = now + self.interval


# --- the normal client --------------------------------------------------------


@dataclass
class Delivery:
    """One normal session: the wait for the banner, then the transaction."""

    banner: float  # connect to the 220 (includes limits.greeting_delay, 1 s by default)
    transaction: float  # the 220 to the 250 after DATA

    @property
    def total(self) -> float:
        return self.banner + self.transaction


def deliver(port: int, proxy_from: str | None = None, tag: str = "normal") -> Delivery:
    """One whole session that delivers a message to bob, timed."""
    started = time.monotonic()
    client = LineClient(port, host=HOST, proxy_from=proxy_from)
    try:
        code, text = client.reply()
        if code != 220:
            raise RuntimeError(f"normal client not greeted: {code} {text!r}")
        greeted = time.monotonic()
        for line, want in (
            (b"EHLO normal.test", 250),
            (b"MAIL FROM:<normal@sender.test>", 250),
            (b"RCPT TO:<bob@example.test>", 250),
            (b"DATA", 354),
        ):
            code, text = client.command(line)
            if code != want:
                raise RuntimeError(f"{line!r}: {code} {text!r}")
        code, text = client.command(
            f"Subject: {tag}\r\nMessage-ID: <{tag}@sender.test>\r\n\r\nNot slow.\r\n.".encode()
        )
        if code != 250:
            raise RuntimeError(f"end of data: {code} {text!r}")
        done = time.monotonic()
        client.command(b"QUIT")
        return Delivery(greeted - started, done - greeted)
    finally:
        client.close()


# --- the server ---------------------------------------------------------------


def start_server(
    directory: Path, per_ip_cap: int | None, greeting_delay: str | None = None
) -> tuple[ServerProcess, int, int]:
    """``twistd mailx`` with a plain and a ``haproxy:`` listener; returns (process, plain, proxied).

    ``per_ip_cap`` and ``greeting_delay``: None keeps the shipped default.
    """
    plain, proxied = free_port(), free_port()
    overrides: dict[str, Any] = {
        "listen": {
            "smtp": [
                f"tcp:{plain}:interface={HOST}",
                f"haproxy:tcp:{proxied}:interface={HOST}",
            ]
        },
    }
    # The shipped limits (mailx/config.py), not the test fixture's: its
    # BASE_CONFIG turns the greeting pause off, and None deletes a key.
    overrides["limits"] = {"greeting_delay": greeting_delay}
    if per_ip_cap is not None:
        overrides["limits"].update(
            connections_per_ip=per_ip_cap, connections=max(1000, per_ip_cap + 50)
        )
    server = ServerProcess(write_config(directory, overrides), plain)
    server.start()
    # ServerProcess.start() saw the port open with a connection it closed at
    # once; a whole session after it guarantees the server has released that
    # one, so that it cannot take one of the 20 slots the figures count.
    client = LineClient(plain, host=HOST)
    try:
        client.reply()
        client.command(b"QUIT")
        client.closed()
    finally:
        client.close()
    return server, plain, proxied


def _ms(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{statistics.median(ms):.1f} [{ms[0]:.1f}-{ms[-1]:.1f}]"


@dataclass
class Figures:
    scenario: str
    slow: SlowResult | None
    deliveries: list[Delivery]

    def row(self) -> str:
        slow = self.slow
        counts = (
            f"{slow.attempted} | {slow.admitted} | {slow.refused} | {slow.held}"
            if slow is not None
            else "0 | - | - | -"
        )
        return (
            f"| {self.scenario} | {counts} | {len(self.deliveries)} "
            f"| {_ms([d.banner for d in self.deliveries])} "
            f"| {_ms([d.transaction for d in self.deliveries])} |"
        )


def run_scenario(
    name: str,
    directory: Path,
    per_ip_cap: int | None,
    connections: int,
    interval: float,
    duration: float,
    deliveries: int,
) -> Figures:
    """Hold ``connections`` slow clients for ``duration`` seconds; time normal deliveries meanwhile."""
    server, plain, proxied = start_server(directory, per_ip_cap)
    try:
        slow = SlowClients(plain, connections, interval, duration + 120)
        with slow:
            if not slow.wait_settled(120):
                raise RuntimeError(f"slow connections did not settle: {slow.result.line()}")
            started = time.monotonic()
            # Let every admitted client trickle a while before measuring.
            time.sleep(min(duration / 2, 2 * interval))
            proxy = NORMAL_CLIENT_FROM if per_ip_cap is None else None
            port = proxied if proxy else plain
            timings = []
            for n in range(deliveries):
                timings.append(deliver(port, proxy, f"{name.replace(' ', '-')}-{n}"))
                left = duration - (time.monotonic() - started)
                time.sleep(max(0.0, min(interval, left / max(1, deliveries - n))))
            time.sleep(max(0.0, duration - (time.monotonic() - started)))
        return Figures(name, slow.result, timings)
    finally:
        server.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300, help="slow connections (at most 5000)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between two bytes of one slow client")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of trickling per scenario (at most 600)")
    parser.add_argument("--deliveries", type=int, default=7, help="normal deliveries per scenario")
    parser.add_argument("--workdir", type=Path, default=None, help="where the servers' directories go")
    parser.add_argument("--keep", action="store_true", help="keep the servers' directories (logs, Maildirs)")
    args = parser.parse_args(argv)
    if not 0 < args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be 1..{MAX_CONNECTIONS}")
    if not 0 < args.duration <= MAX_DURATION or args.interval <= 0:
        parser.error(f"--duration must be in (0, {MAX_DURATION}] and --interval positive")
    if not 0 < args.deliveries <= 100:
        parser.error("--deliveries must be 1..100")
    raise_fd_limit(args.connections)
    workdir = Path(tempfile.mkdtemp(prefix="mailx-slowloris-", dir=args.workdir))
    print(
        f"{args.connections} slow connections from {HOST}, one byte every {args.interval:g} s, "
        f"{args.duration:g} s per scenario; server directories under {workdir}"
        + ("" if args.keep else " (removed at the end)"),
        flush=True,
    )
    try:
        baseline_server, port, _ = start_server(workdir / "baseline", None)
        try:
            baseline = Figures(
                "no slow clients", None,
                [deliver(port, tag=f"baseline-{n}") for n in range(args.deliveries)],
            )
        finally:
            baseline_server.terminate()
        results = [
            baseline,
            run_scenario("default caps", workdir / "default", None, args.connections,
                         args.interval, args.duration, args.deliveries),
            run_scenario("per-IP cap raised", workdir / "raised", args.connections + 50,
                         args.connections, args.interval, args.duration, args.deliveries),
        ]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| scenario | slow opened | admitted | refused 421 | held at end | deliveries "
          "| connect to banner, ms: median [range] | banner to 250 after DATA, ms: median [range] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for figures in results:
        print(figures.row())
    print()
    for figures in results[1:]:
        assert figures.slow is not None
        print(f"{figures.scenario}: {figures.slow.line()}, {figures.slow.bytes_sent} bytes trickled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
