"""LMTP into Dovecot: mailx (SPEC 14) against Postfix's lmtp(8), side by side in one run.

    python3 bench/lmtp.py                              # 1 KiB, 10 sessions, 1000 messages, 3 repeats
    python3 bench/lmtp.py --messages 2000 --repeat 1

Each run gets a fresh private Dovecot (`mailx.testing.dovecot`: LMTP on a
unix socket, mail as ``vmail`` in its own directory) and one server in
front of it, started as run.py starts its servers:

- ``mailx``: run.py's configuration with ``bench.test`` at
  ``delivery: {lmtp: unix:<dovecot>/run/lmtp}``: each message is queued
  (fsynced) before the 250, then handed over LMTP; the queue entry is
  removed (fsync) after Dovecot's 250.
- ``postfix``: bench/peer_postfix.py's ``lmtp`` mode: ``virtual_transport =
  lmtp:unix:<same socket>``; its queue file is fsynced before the 250, as
  ours.  Postfix's defaults otherwise (20 deliveries at once per
  destination, connection caching).

msg/s = N / (the last file in Dovecot's ``new/`` − the first connection):
a message counts once Dovecot has filed it, which is where both servers'
work ends.  Dovecot's own CPU is not in the servers' CPU figure (it is the
same work for both).  Needs root (Dovecot's master, Postfix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import peer_postfix
import run
from run import RunError, Scenario

from mailx.testing import dovecot

KINDS = ("mailx", "postfix")


def measure(kind: str, base: Scenario, messages: int, run_dir: Path, args: argparse.Namespace) -> dict:
    run_dir.mkdir(parents=True)
    store = dovecot.PrivateDovecot([f"{run.MAILBOX}@{run.DOMAIN}"], lmtp_processes=4)
    proc = None
    try:
        store.start()
        port = run.free_port()
        if kind == "postfix":
            inst = peer_postfix.Instance(run_dir / "postfix", port, "lmtp",
                                         lmtp=f"unix:{store.lmtp_socket}")
            try:
                peer_postfix.configure(inst)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                raise RunError(f"postfix: {e}") from None
            argv = peer_postfix.command(inst)
        else:
            config = {"domains": {run.DOMAIN: {"delivery": {"lmtp": store.unix_endpoint}}}}
            scenario = Scenario("lmtp", base.size, base.concurrency, messages,
                                MappingProxyType(config))
            argv = run.mailx_command(run_dir, port, scenario, args)
        proc = run.launch(kind, argv, run_dir, port, args.start_timeout)
        cpu_before = run.cpu_seconds(proc.pid)
        load = run.run_loadgen("python", port, base, messages, run_dir, args.timeout)
        count, last = run.wait_delivered(store.base / "mail", messages,
                                         run.DELIVERY_GRACE + args.timeout)
        cpu = run.cpu_seconds(proc.pid) - cpu_before
        peak_rss = run.tree_peak_rss(proc.pid)
        if count < messages:
            raise RunError(f"{kind}: {count} of {messages} in Dovecot\n"
                           f"{run.log_tail(run_dir / 'server.log')}\n{store.log()[-1500:]}")
    finally:
        if proc is not None:
            run.stop(proc)
        store.remove()
    elapsed = last - load.start
    return {
        "server": kind,
        "messages": messages,
        "acknowledged": load.ok,
        "elapsed": elapsed,
        "elapsed_to_last_reply": load.acked - load.start,
        "msgs_per_s": messages / elapsed if load.ok == messages else None,
        "cpu_per_msg": cpu / messages,
        "peak_rss": peak_rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep it short: Postfix's socket paths")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mailx-command", default=run.TWISTD + " -n --pidfile= mailx")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    why = dovecot.available()
    if why or not peer_postfix.installed():
        print(f"cannot run: {why or 'Postfix is not installed'}", file=sys.stderr)
        return 2
    space = run.RunSpace(args.workdir, "mx-lmtp-")
    workdir = space.root
    base = Scenario(f"{args.size}B-c{args.concurrency}", args.size, args.concurrency, args.messages)
    print(f"{args.messages} messages of {args.size} B over {args.concurrency} sessions into"
          f" Dovecot over LMTP; filesystem {run.filesystem_of(workdir)} ({workdir})", flush=True)
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    started = time.monotonic()
    with space:
        for rep in range(args.repeat):
            for kind in KINDS if rep % 2 == 0 else KINDS[::-1]:
                run_dir = space.run_dir(f"{kind}-{rep + 1}")
                try:
                    result = measure(kind, base, args.messages, run_dir, args)
                except RunError as e:
                    print(f"{kind} #{rep + 1}: {e}", file=sys.stderr)
                    return 1
                results[kind].append(result)
                rate = result["msgs_per_s"]
                print(f"  {kind:<8} #{rep + 1}: "
                      + (f"{rate:7.0f} msg/s" if rate else "  FAILED   ")
                      + f"  CPU {result['cpu_per_msg'] * 1000:.2f} ms/msg,"
                      f" RSS {run.human_bytes(result['peak_rss'])}", flush=True)
    print(f"\n{time.monotonic() - started:.0f} s in all\n")
    print("| server | msg/s median (range) | server CPU ms/msg | peak RSS (tree) |")
    print("|---|---|---|---|")
    medians = {}
    for kind, runs in results.items():
        rates = [r["msgs_per_s"] for r in runs if r["msgs_per_s"]]
        medians[kind] = statistics.median(rates)
        cpus = [r["cpu_per_msg"] * 1000 for r in runs]
        print(f"| {kind} | {medians[kind]:.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
              f"{statistics.median(cpus):.2f} | "
              f"{run.human_bytes(max(r['peak_rss'] for r in runs))} |")
    # Paired: each repeat's two runs are back to back (see run.paired_ratios).
    print("\n" + run.paired_line(results, "mailx", "postfix", "goal >= 1x"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
