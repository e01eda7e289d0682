"""Forwarding throughput: mailx relaying to a loopback SMTP sink, beside its Maildir throughput.

    python3 bench/forwarding.py                     # both scenarios, 3 repeats
    python3 bench/forwarding.py --messages 500 --repeat 1 --concurrency 10
    python3 bench/forwarding.py --kinds forward,postfix-relay   # against Postfix relaying

A separate script (bench/run.py is another engineer's, and compares mailx
with an aiosmtpd peer); it reuses run.py's machinery: the same load
generator, server start-up and CPU/RSS readings.  For each repeat:

- ``maildir``: run.py's measure() of mailx with the default 1 KiB message;
  alice@bench.test is a mailbox (msg/s = last file in new/ - first connect).
- ``forward``: alice@bench.test is an alias of someone@sink.test; a helper
  process runs the loopback DNS server (sink.test MX -> 127.0.0.1) and the
  SMTP sink (``mailx.testing.sink``, envelopes only) that plays the outside
  MX.  msg/s = messages / (the sink's last accepted message - first connect):
  a message counts once the next hop has it, which includes mailx's queue
  write, the outbound session (SRS; connections to the sink are reused
  for the next message, as Postfix does) and the fsyncs of the envelope update and the
  queue entry's removal.
- ``postfix-relay`` (``--kinds maildir,forward,postfix-relay``): Postfix
  (bench/peer_postfix.py, relay mode) in mailx's place, rewriting
  alice@bench.test to someone@sink.test (virtual_alias_maps) and relaying
  to the same sink (``relayhost = [127.0.0.1]:port``: no DNS), measured the
  same way over its whole process tree. Postfix does no SRS, may reuse
  connections (its connection cache); both use 20 connections per
  destination (``peer_postfix.DESTINATION_CONCURRENCY``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import peer_postfix
import run
from run import RunError, Scenario

from mailx.testing import SRS_SECRET

SINK_DOMAIN = "sink.test"


def serve_sink(expected: int) -> None:
    """The helper process: DNS + sink; prints its ports, then when ``expected`` arrived."""
    from twisted.internet import reactor

    from mailx.testing.dnsserver import start_dns_server
    from mailx.testing.sink import start_sink

    dns = start_dns_server(
        {
            SINK_DOMAIN: {"MX": [(10, f"mx.{SINK_DOMAIN}")]},
            f"mx.{SINK_DOMAIN}": {"A": ["127.0.0.1"]},
        }
    )
    sink = start_sink(keep_data=False)

    def done(messages: list) -> None:
        print(f"done {time.monotonic()} {len(messages)} {sink.connections}", flush=True)

    sink.wait_for(expected).addCallback(done)
    print(f"ready {dns.port} {sink.port}", flush=True)
    reactor.run()


def forward_scenario(base: Scenario, dns_port: int, sink_port: int, concurrency: int) -> Scenario:
    config = {
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"]},
        "domains": {
            run.DOMAIN: {
                "mailboxes": ["pm"],
                "aliases": {"postmaster": "pm", run.MAILBOX: f"someone@{SINK_DOMAIN}"},
            }
        },
        "outbound": {
            "srs_secret": SRS_SECRET,
            "port": sink_port,
            "connections": 100,
            # As many as Postfix's default_destination_concurrency_limit (20,
            # mailx's default too): with 10, the queue grew behind the sink.
            "connections_per_domain": peer_postfix.DESTINATION_CONCURRENCY,
        },
    }
    return Scenario("forward", base.size, base.concurrency, base.messages, MappingProxyType(config))


def measure_forward(base: Scenario, messages: int, run_dir: Path, args: argparse.Namespace,
                    server: str = "mailx") -> dict:
    """mailx forwarding (alias, SRS) or Postfix relaying (virtual alias) to the sink."""
    run_dir.mkdir(parents=True)
    helper = subprocess.Popen(
        [sys.executable, __file__, "--serve-sink", str(messages)],
        stdout=subprocess.PIPE,
        stderr=open(run_dir / "sink.log", "wb"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(run.REPO), str(run.BENCH)])},
    )
    proc = None
    try:
        ready = helper.stdout.readline().split()
        if not ready or ready[0] != b"ready":
            raise RunError(f"sink helper did not start: {(run_dir / 'sink.log').read_text()}")
        dns_port, sink_port = int(ready[1]), int(ready[2])
        scenario = forward_scenario(base, dns_port, sink_port, args.concurrency)
        port = run.free_port()
        if server == "postfix":
            # The same sink as the next hop, by address (relayhost), not by MX.
            inst = peer_postfix.Instance(run_dir / "postfix", port, "relay",
                                         relay=("127.0.0.1", sink_port))
            try:
                peer_postfix.configure(inst)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                raise RunError(f"postfix: {e}") from None
            argv = peer_postfix.command(inst)
        else:
            argv = run.mailx_command(run_dir, port, scenario, args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(run.REPO), env.get("PYTHONPATH")]))
        log = run_dir / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                env=env,
                start_new_session=True,
            )
        run.wait_ready(proc, port, args.start_timeout)
        cpu_before = run.cpu_seconds(proc.pid)
        load = run.run_loadgen("python", port, scenario, messages, run_dir, args.timeout)
        deadline = time.monotonic() + run.DELIVERY_GRACE + args.timeout
        line = b""
        while time.monotonic() < deadline:
            line = helper.stdout.readline()
            if line.startswith(b"done") or not line:
                break
        if not line.startswith(b"done"):
            raise RunError(f"the sink did not get {messages} messages\n{run.log_tail(log)}")
        last = float(line.split()[1])
        connections = int(line.split()[3])
        cpu = run.cpu_seconds(proc.pid) - cpu_before
        peak_rss = run.tree_peak_rss(proc.pid)
    finally:
        if proc is not None:
            run.stop(proc)
        run.stop(helper)
    elapsed = last - load.start
    return {
        "scenario": "forward" if server == "mailx" else "postfix-relay",
        "messages": messages,
        "acknowledged": load.ok,
        "elapsed": elapsed,
        "msgs_per_s": messages / elapsed if load.ok == messages else None,
        "cpu_per_msg": cpu / messages,
        "peak_rss": peak_rss,
        "sink_connections": connections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mailx-command", default=run.TWISTD + " -n --pidfile= mailx")
    parser.add_argument("--kinds", default="maildir,forward",
                        help="comma-separated: maildir, forward (mailx), postfix-relay "
                             "(Postfix relaying to the same sink, bench/peer_postfix.py)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.serve_sink is not None:
        serve_sink(args.serve_sink)
        return 0
    args.loadgen = "python"  # run.measure's; smtp-source would need Postfix
    space = run.RunSpace(args.workdir, "mailx-bench-fwd-")
    workdir = space.root
    base = Scenario(f"{args.size}B-c{args.concurrency}", args.size, args.concurrency, args.messages)
    print(
        f"{args.messages} messages of {args.size} B over {args.concurrency} sessions; "
        f"filesystem {run.filesystem_of(workdir)} ({workdir})",
        flush=True,
    )
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("maildir", "forward", "postfix-relay")]
    if unknown or not kinds:
        parser.error(f"unknown or missing kind: {', '.join(unknown) or 'none'}")
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with space:
        for rep in range(args.repeat):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                run_dir = space.run_dir(f"{kind}-{rep + 1}")
                try:
                    if kind == "maildir":
                        result = run.measure("mailx", base, args.messages, run_dir, args)
                    elif kind == "forward":
                        result = measure_forward(base, args.messages, run_dir, args)
                    else:
                        result = measure_forward(base, args.messages, run_dir, args, "postfix")
                except RunError as e:
                    print(f"{kind} #{rep + 1}: {e}", file=sys.stderr)
                    return 1
                results[kind].append(result)
                rate = result["msgs_per_s"]
                print(
                    f"  {kind:<8} #{rep + 1}: "
                    + (f"{rate:7.0f} msg/s" if rate else "  FAILED   ")
                    + f"  CPU {result['cpu_per_msg'] * 1000:.2f} ms/msg,"
                    f" RSS {run.human_bytes(result['peak_rss'])},"
                    f" {result['sink_connections']} connections to the sink",
                    flush=True,
                )
    print()
    print("| scenario | msg/s median (range) | server CPU ms/msg | peak RSS (tree) |")
    print("|---|---|---|---|")
    for kind, runs in results.items():
        rates = [r["msgs_per_s"] for r in runs if r["msgs_per_s"]]
        cpus = [r["cpu_per_msg"] * 1000 for r in runs]
        print(
            f"| {kind} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
            f"{statistics.median(cpus):.2f} | "
            f"{run.human_bytes(max(r['peak_rss'] for r in runs))} |"
        )
    if "forward" in results and "postfix-relay" in results:
        print("\n" + run.paired_line(results, "forward", "postfix-relay", "goal >= 1x"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
