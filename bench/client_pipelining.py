"""The outbound client alone, pipelined (RFC 2920) or lock-step, against the loopback sink.

    python3 bench/client_pipelining.py                     # 2000 messages, 3 rounds
    python3 bench/client_pipelining.py --messages 5000 --recipients 3 --rounds 5

The sink (`mailx.testing.sink`, envelopes only) runs in a child process,
once offering PIPELINING and once not; this process runs
`SMTPClientProtocol` over one reused connection, message after message
(1 KiB, ``--recipients`` each; a new one after MAX_TRANSACTIONS), and reads its own CPU time, so the sink's
work is not in it.  The modes alternate within each round, so the
machine's load drifts over both.  Per mode: messages/s and the client's
CPU ms a message (medians, with the range), and the commands per read
the sink saw.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402

from mailx.outbound.relay import (  # noqa: E402
    ClientSettings,
    SessionResult,
    SMTPClientProtocol,
    Timeouts,
    Transaction,
)
from mailx.testing import ENTRY_LINE  # noqa: E402


def serve_sink(pipelining: bool) -> None:
    """The child: a sink on 127.0.0.1; prints its port, then commands/read at EOF of stdin."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    from mailx.testing.sink import start_sink

    sink = start_sink(keep_data=False, pipelining=pipelining)

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            self.sendLine(f"ready {sink.port}".encode())

        def lineReceived(self, line: bytes) -> None:
            reads = sink.reads
            per_read = sum(len(r) for r in reads) / max(1, len(reads))
            self.sendLine(f"reads {len(reads)} {per_read:.2f} {len(sink.accepted)}".encode())
            reactor.callLater(0.1, reactor.stop)

    stdio.StandardIO(Control())
    reactor.run()


@defer.inlineCallbacks
def one_run(pipelining: bool, messages: int, recipients: int, data: Path):
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-sink", "1" if pipelining else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    port = int(child.stdout.readline().split()[1])
    rcpts = tuple(f"r{i}@sink.test" for i in range(recipients))
    transaction = Transaction("s@example.test", rcpts, b"", data, data.stat().st_size, False)
    settings = ClientSettings("bench.test", Timeouts(), reactor, idle=lambda _: True)
    client = None
    start_cpu, start = time.process_time(), time.monotonic()
    for _ in range(messages):
        if client is None or not client.idle:
            # A new connection at the start and after MAX_TRANSACTIONS on one.
            client = SMTPClientProtocol(transaction, settings, "sink")
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            result = yield client.done
        else:
            result = yield client.reuse(transaction)
        assert isinstance(result, SessionResult), result
        assert all(r.code == 250 for r in result.replies.values()), result
    elapsed, cpu = time.monotonic() - start, time.process_time() - start_cpu
    child.stdin.write(b"report\n")
    child.stdin.flush()
    _, reads, per_read, accepted = child.stdout.readline().split()
    client.transport.loseConnection()
    child.wait(10)
    assert int(accepted) == messages, accepted
    return messages / elapsed, 1000 * cpu / messages, float(per_read)


@defer.inlineCallbacks
def main(args: argparse.Namespace):
    data = Path(tempfile.mkdtemp()) / "message"
    data.write_bytes(ENTRY_LINE + b"From: a@example.test\r\nSubject: bench\r\n\r\n" + (b"x" * 70 + b"\r\n") * 13)
    results: dict[str, list[tuple[float, float, float]]] = {"pipelined": [], "lock-step": []}
    for round_ in range(args.rounds):
        modes = [True, False] if round_ % 2 == 0 else [False, True]
        for pipelining in modes:
            name = "pipelined" if pipelining else "lock-step"
            figures = yield one_run(pipelining, args.messages, args.recipients, data)
            results[name].append(figures)
            print(f"  {name:9} #{round_ + 1}: {figures[0]:7.0f} msg/s  client CPU "
                  f"{figures[1]:.3f} ms/msg  {figures[2]:.2f} commands/read", flush=True)
    print(f"\n{args.messages} messages x {args.rounds} rounds, {args.recipients} recipient(s) each\n")
    print("| mode | msg/s median (range) | client CPU ms/msg median (range) | commands per read |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        rates, cpus, per_read = zip(*runs, strict=True)
        print(f"| {name} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
              f"{statistics.median(cpus):.3f} ({min(cpus):.3f}-{max(cpus):.3f}) | "
              f"{statistics.median(per_read):.2f} |")
    yield task.deferLater(reactor, 0, lambda: None)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-sink":
        serve_sink(sys.argv[2] == "1")
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    task.react(lambda _reactor: main(parser.parse_args()))
