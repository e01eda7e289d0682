"""Submission throughput: logged-in clients sending 1 KiB messages to a remote sink.

    python3 bench/submission.py                       # mailx, 500 messages, 10 sessions, once
    python3 bench/submission.py --kinds mailx,postfix --repeat 3 --messages 1000

Each session is smtplib over STARTTLS on the submission listener: one
AUTH PLAIN (Argon2id, doveadm's parameters), then message after message
from alice@bench.test to someone@sink.test.  mailx adds Date, Message-ID,
a Received and a DKIM signature (RSA-2048), queues the message and sends it
to the sink that bench/forwarding.py's helper runs (loopback DNS: sink.test
MX -> 127.0.0.1).  msg/s = messages / (the sink's last accepted message -
first connect); CPU is the server's process tree's.

``postfix`` (bench/peer_postfix.py, sasl-relay mode) is Postfix doing the
same in mailx's place: STARTTLS, AUTH PLAIN checked by a private Dovecot
auth service (``smtpd_sasl_type = dovecot``) against the same passwd-file,
the login's own sender only, relayed to the same kind of sink
(``relayhost``, no DNS).  It adds Date, Message-ID and Received but signs
nothing (no DKIM milter here): mailx's RSA signature is work Postfix skips.
Its CPU and peak RSS are Postfix's tree and Dovecot's together. Both use
20 connections per destination (each one's default). Kinds alternate
order between repeats, so a drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This checkout's mailx, as the server runs it (before run.py imports any).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forwarding  # noqa: E402
import peer_postfix  # noqa: E402
import run  # noqa: E402

from mailx.outbound import dkimkeys  # noqa: E402
from mailx.smtp.accounts import hash_password  # noqa: E402
from mailx.testing.tls import make_certificate  # noqa: E402

PASSWORD = "bench password"


def message(n: int) -> bytes:
    """About 1 KiB: a short header (mailx adds Date, Message-ID) and 13 lines."""
    head = f"From: alice@{run.DOMAIN}\r\nTo: someone@{forwarding.SINK_DOMAIN}\r\nSubject: bench {n}\r\n\r\n"
    return (head + ("x" * 70 + "\r\n") * 13).encode()


def load(port: int, cert: Path, messages: int, concurrency: int) -> tuple[float, int]:
    """(first connect, messages acknowledged) over ``concurrency`` sessions."""
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    counter = iter(range(messages))
    lock = threading.Lock()
    ok = [0]

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.starttls(context=context)
            c.login(f"alice@{run.DOMAIN}", PASSWORD)
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                c.sendmail(f"alice@{run.DOMAIN}", [f"someone@{forwarding.SINK_DOMAIN}"], message(n))
                with lock:
                    ok[0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=session) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return start, ok[0]


def start_postfix(run_dir: Path, port: int, sink_port: int, cert: Path, key: Path
                  ) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Dovecot's auth service, then Postfix submitting through it to the sink: (postfix, dovecot)."""
    auth_port = run.free_port()
    try:
        dovecot = peer_postfix.start_dovecot_auth(run_dir / "dovecot", run_dir / "passwd", auth_port)
    except (RuntimeError, OSError) as e:
        raise run.RunError(f"dovecot: {e}") from None
    inst = peer_postfix.Instance(run_dir / "postfix", port, "sasl-relay",
                                 relay=("127.0.0.1", sink_port), tls=(cert, key),
                                 sasl_path=f"inet:127.0.0.1:{auth_port}")
    try:
        return peer_postfix.start(inst), dovecot
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        run.stop(dovecot)
        raise run.RunError(f"postfix: {e}") from None


def measure(messages: int, concurrency: int, run_dir: Path, timeout: float,
            server: str = "mailx") -> dict:
    run_dir.mkdir(parents=True)
    cert, key = make_certificate(run_dir / "tls")
    (run_dir / "passwd").write_text(f"alice@{run.DOMAIN}:{hash_password(PASSWORD)}\n")
    dkimkeys.write_key(dkimkeys.generate_key("rsa"), run_dir / "dkim.key")
    helper = subprocess.Popen(
        [sys.executable, forwarding.__file__, "--serve-sink", str(messages)],
        stdout=subprocess.PIPE,
        stderr=open(run_dir / "sink.log", "wb"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(run.REPO), str(run.BENCH)])},
    )
    proc = dovecot = None
    try:
        ready = helper.stdout.readline().split()
        if not ready or ready[0] != b"ready":
            raise run.RunError(f"sink helper did not start: {(run_dir / 'sink.log').read_text()}")
        dns_port, sink_port = int(ready[1]), int(ready[2])
        smtp_port, port = run.free_port(), run.free_port()
        log = run_dir / "server.log"
        if server == "postfix":
            proc, dovecot = start_postfix(run_dir, port, sink_port, cert, key)
            log = run_dir / "postfix" / "postfix.log"
        else:
            proc = start_mailx(run_dir, smtp_port, port, dns_port, sink_port, cert, key, messages)
        cpu_before = run.cpu_seconds(proc.pid) + (run.cpu_seconds(dovecot.pid) if dovecot else 0)
        start, ok = load(port, cert, messages, concurrency)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = helper.stdout.readline()
            if line.startswith(b"done") or not line:
                break
        if not line.startswith(b"done"):
            raise run.RunError(f"the sink did not get {messages} messages\n{run.log_tail(log)}")
        last = float(line.split()[1])
        connections = int(line.split()[3])
        cpu = run.cpu_seconds(proc.pid) - cpu_before
        rss = run.tree_peak_rss(proc.pid)
        if dovecot is not None:
            cpu += run.cpu_seconds(dovecot.pid)
            rss += run.tree_peak_rss(dovecot.pid)
    finally:
        if proc is not None:
            (peer_postfix.stop if server == "postfix" else run.stop)(proc)
        if dovecot is not None:
            run.stop(dovecot)
        run.stop(helper)
    elapsed = last - start
    return {
        "server": server,
        "messages": messages,
        "acknowledged": ok,
        "msgs_per_s": messages / elapsed,
        "cpu_ms_per_msg": 1000 * cpu / messages,
        "peak_rss_mib": rss / 2**20,
        "sink_connections": connections,
    }


def start_mailx(run_dir: Path, smtp_port: int, port: int, dns_port: int, sink_port: int,
                cert: Path, key: Path, messages: int) -> subprocess.Popen:
    """mailx with a submission listener on ``port``, delivering to the sink by MX."""
    config = run.mailx_config(
        run_dir,
        smtp_port,
        {
            "listen": {"submission": [f"tcp:{port}:interface=127.0.0.1"]},
            "tls": {"certificate": str(cert), "key": str(key)},
            "accounts": {"passwords": str(run_dir / "passwd")},
            "limits": {"send_per_hour": messages + 1},
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"]},
            "domains": {
                run.DOMAIN: {
                    "mailboxes": [run.MAILBOX],
                    "aliases": {"postmaster": run.MAILBOX},
                    "dkim": {"selector": "b1", "key": str(run_dir / "dkim.key")},
                }
            },
            # As Postfix's default_destination_concurrency_limit (and mailx's default).
            "outbound": {"port": sink_port,
                         "connections_per_domain": peer_postfix.DESTINATION_CONCURRENCY},
        },
    )
    config["domains"] = {run.DOMAIN: config["domains"][run.DOMAIN]}
    path = run_dir / "mailx.yaml"
    path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(run.REPO), env.get("PYTHONPATH")]))
    log = run_dir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "mailx", "--config", str(path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, env=env, start_new_session=True,
        )
    try:
        run.wait_ready(proc, smtp_port, 60)
    except BaseException:
        run.stop(proc)
        raise
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--kinds", default="mailx",
                        help="comma-separated: mailx, postfix (Postfix with Dovecot SASL, "
                             "bench/peer_postfix.py)")
    parser.add_argument("--json", type=Path, help="every run's figures")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ("mailx", "postfix") for k in kinds):
        parser.error(f"unknown kind in {args.kinds!r}")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    # Short: Postfix's sockets live under the run directory (108 bytes a path).
    tmp = Path(tempfile.mkdtemp(prefix="mxs-", dir="/var/tmp"))
    try:
        for rep in range(args.repeat):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                run_dir = tmp / f"{kind}{rep + 1}"
                try:
                    result = measure(args.messages, args.concurrency, run_dir, args.timeout, kind)
                except run.RunError as e:
                    print(f"{kind} #{rep + 1}: {e}", file=sys.stderr)
                    return 1
                finally:
                    shutil.rmtree(run_dir, ignore_errors=True)
                    os.sync()
                results[kind].append(result)
                print(f"  {kind:<8} #{rep + 1}: {result['msgs_per_s']:7.1f} msg/s"
                      f"  CPU {result['cpu_ms_per_msg']:.2f} ms/msg,"
                      f" RSS {result['peak_rss_mib']:.1f} MiB,"
                      f" {result['sink_connections']} connections to the sink", flush=True)
                if result["acknowledged"] != args.messages:
                    print(f"{kind} #{rep + 1}: {result['acknowledged']} of {args.messages}"
                          " acknowledged", file=sys.stderr)
                    return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| kind | msg/s median (range) | CPU ms/msg | peak RSS (tree) |")
    print("|---|---|---|---|")
    medians = {}
    for kind, runs in results.items():
        rates = [r["msgs_per_s"] for r in runs]
        medians[kind] = statistics.median(rates)
        print(f"| {kind} | {medians[kind]:.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
              f"{statistics.median(r['cpu_ms_per_msg'] for r in runs):.2f} | "
              f"{max(r['peak_rss_mib'] for r in runs):.1f} MiB |")
    if "mailx" in medians and "postfix" in medians:
        ratios = [m["msgs_per_s"] / p["msgs_per_s"]
                  for m, p in zip(results["mailx"], results["postfix"], strict=True)]
        print(f"\nmailx/postfix: {medians['mailx'] / medians['postfix']:.2f} (ratio of medians);"
              f" per repeat {', '.join(f'{r:.2f}' for r in ratios)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
