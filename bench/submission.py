"""Submission throughput: logged-in clients sending 1 KiB messages to a remote sink.

    python3 bench/submission.py                       # 500 messages, 10 sessions
    python3 bench/submission.py --messages 1000 --concurrency 10

Each session is smtplib over STARTTLS on mailx's submission listener: one
AUTH PLAIN (Argon2id, doveadm's parameters), then message after message
from alice@bench.test to someone@sink.test.  mailx adds Date, Message-ID,
a Received and a DKIM signature (RSA-2048), queues the message and sends it
to the sink that bench/forwarding.py's helper runs (loopback DNS: sink.test
MX -> 127.0.0.1).  msg/s = messages / (the sink's last accepted message -
first connect); CPU is the mailx process tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This checkout's mailx, as the server runs it (before run.py imports any).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forwarding  # noqa: E402
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


def measure(messages: int, concurrency: int, run_dir: Path, timeout: float) -> dict:
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
    proc = None
    try:
        ready = helper.stdout.readline().split()
        if not ready or ready[0] != b"ready":
            raise run.RunError(f"sink helper did not start: {(run_dir / 'sink.log').read_text()}")
        dns_port, sink_port = int(ready[1]), int(ready[2])
        smtp_port, port = run.free_port(), run.free_port()
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
                "outbound": {"port": sink_port, "connections_per_domain": concurrency},
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
        run.wait_ready(proc, smtp_port, 60)
        cpu_before = run.cpu_seconds(proc.pid)
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
        cpu = run.cpu_seconds(proc.pid) - cpu_before
        rss = run.tree_peak_rss(proc.pid)
    finally:
        if proc is not None:
            run.stop(proc)
        run.stop(helper)
    elapsed = last - start
    return {
        "messages": messages,
        "acknowledged": ok,
        "msgs_per_s": messages / elapsed,
        "cpu_ms_per_msg": 1000 * cpu / messages,
        "peak_rss_mib": rss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        result = measure(args.messages, args.concurrency, Path(tmp) / "run", args.timeout)
    print(json.dumps(result, indent=2))
    return 0 if result["acknowledged"] == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
