"""Submission throughput: logged-in clients sending 1 KiB messages to a remote sink.

    python3 bench/submission.py                       # mailx, 500 messages, 10 sessions, once
    python3 bench/submission.py --kinds mailx,postfix --repeat 3 --messages 1000
    python3 bench/submission.py --kinds mailx,postfix,postfix-dkim   # Postfix + OpenDKIM too

Each session is smtplib over STARTTLS on the submission listener: one
AUTH PLAIN (Argon2id, doveadm's parameters), then message after message
from alice@bench.test to someone@sink.test.  mailx adds Date, Message-ID,
a Received and a DKIM signature (RSA-2048), queues the message and sends it
to the sink of bench/forwarding.py's helper (loopback DNS: sink.test
MX -> 127.0.0.1), run here (``serve_sink``) to count DKIM signatures too.
msg/s = messages / (the sink's last accepted message - first connect); CPU
is the server's process tree's.

``postfix`` (bench/peer_postfix.py, sasl-relay mode) is Postfix doing the
same in mailx's place: STARTTLS, AUTH PLAIN checked by a private Dovecot
auth service (``smtpd_sasl_type = dovecot``) against the same passwd-file,
the login's own sender only, relayed to the same kind of sink
(``relayhost``, no DNS).  It adds Date, Message-ID and Received but signs
nothing: mailx's RSA signature is work Postfix skips.  ``postfix-dkim``
is the stack mailx replaces: the same Postfix with an OpenDKIM milter
(``opendkim -f``, Debian's package, on a Unix socket as Debian configures
it, or a loopback port with ``--milter-socket inet``: bench/README on why
not by default) signing every message
as mailx does (RSA-2048, relaxed/relaxed, From oversigned, d=bench.test,
the same key and selector); the run fails unless every message reaches
the sink with a DKIM-Signature.  CPU and peak RSS are Postfix's tree's plus
Dovecot's (and OpenDKIM's). All use 20 connections per destination (each
one's default). Kinds alternate order between repeats, so a drift in the
machine's load hits all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
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
SELECTOR = "b1"  # mailx's and OpenDKIM's
OPENDKIM_INSTALL = "DEBIAN_FRONTEND=noninteractive apt-get install -y opendkim opendkim-tools"
# Debian's opendkim; what bench/README describes.  Key, socket and pid file
# are filled in per run.
OPENDKIM_CONF = """\
Mode s
Domain {domain}
Selector {selector}
KeyFile {key}
Canonicalization relaxed/relaxed
OversignHeaders From
SignatureAlgorithm rsa-sha256
# The key lies under /var/tmp, whose sticky, world-writable mode it dislikes.
RequireSafeKeys false
Socket {socket}
# A Unix socket's mode: Postfix's smtpd (the postfix user) connects to it.
UMask 000
PidFile {directory}/opendkim.pid
Syslog no
"""


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


def serve_sink(expected: int) -> None:
    """The helper process: bench/forwarding.py's (loopback DNS, sink.test MX -> the
    sink), whose sink keeps each message to count those with a DKIM-Signature.
    Prints its ports, then ``done TIME MESSAGES CONNECTIONS SIGNED``."""
    from twisted.internet import reactor

    from mailx.testing.dnsserver import start_dns_server
    from mailx.testing.sink import start_sink

    dns = start_dns_server(
        {
            forwarding.SINK_DOMAIN: {"MX": [(10, f"mx.{forwarding.SINK_DOMAIN}")]},
            f"mx.{forwarding.SINK_DOMAIN}": {"A": ["127.0.0.1"]},
        }
    )
    sink = start_sink()

    def done(messages: list) -> None:
        now = time.monotonic()
        signed = sum(dkim_signed(m.data) for m in messages)
        print(f"done {now} {len(messages)} {sink.connections} {signed}", flush=True)

    sink.wait_for(expected).addCallback(done)
    print(f"ready {dns.port} {sink.port}", flush=True)
    reactor.run()


def dkim_signed(data: bytes) -> bool:
    """Whether the message's header has a DKIM-Signature field."""
    header = data.split(b"\r\n\r\n", 1)[0]
    return any(line[:15].lower() == b"dkim-signature:" for line in header.split(b"\r\n"))


def opendkim_binary() -> str:
    path = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not os.access(path, os.X_OK):
        raise run.RunError(f"opendkim is not installed: {OPENDKIM_INSTALL}")
    return path


def start_opendkim(directory: Path, key: Path, unix: bool = False, timeout: float = 30.0
                   ) -> tuple[subprocess.Popen, str]:
    """OpenDKIM in the foreground (its own process group) signing with ``key`` for
    bench.test, on a free loopback port (or a Unix socket in ``directory``):
    (process, the milter in Postfix's form) once it accepts connections."""
    binary = opendkim_binary()
    directory.mkdir(parents=True)
    port = run.free_port()
    path = directory / "milter.sock"
    socket_spec = f"local:{path}" if unix else f"inet:{port}@127.0.0.1"
    conf = directory / "opendkim.conf"
    conf.write_text(OPENDKIM_CONF.format(domain=run.DOMAIN, selector=SELECTOR, key=key,
                                         socket=socket_spec, directory=directory))
    with open(directory / "opendkim.out", "wb") as out:
        proc = subprocess.Popen([binary, "-f", "-x", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise run.RunError(f"opendkim exited with status {proc.returncode}: "
                               f"{(directory / 'opendkim.out').read_text(errors='replace')}")
        try:
            with socket.socket(socket.AF_UNIX if unix else socket.AF_INET) as s:
                s.settimeout(5)
                s.connect(str(path) if unix else ("127.0.0.1", port))
            return proc, f"unix:{path}" if unix else f"inet:127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    run.stop(proc)
    raise run.RunError(f"opendkim not listening on {socket_spec} after {timeout:.0f} s")


def start_postfix(run_dir: Path, port: int, sink_port: int, cert: Path, key: Path,
                  milter: str | None = None) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Dovecot's auth service, then Postfix submitting through it (and ``milter``,
    if given) to the sink: (postfix, dovecot)."""
    auth_port = run.free_port()
    try:
        dovecot = peer_postfix.start_dovecot_auth(run_dir / "dovecot", run_dir / "passwd", auth_port)
    except (RuntimeError, OSError) as e:
        raise run.RunError(f"dovecot: {e}") from None
    inst = peer_postfix.Instance(run_dir / "postfix", port, "sasl-relay",
                                 relay=("127.0.0.1", sink_port), tls=(cert, key),
                                 sasl_path=f"inet:127.0.0.1:{auth_port}", milter=milter)
    try:
        return peer_postfix.start(inst), dovecot
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        run.stop(dovecot)
        raise run.RunError(f"postfix: {e}") from None


def measure(messages: int, concurrency: int, run_dir: Path, timeout: float,
            server: str = "mailx", milter_socket: str = "inet") -> dict:
    run_dir.mkdir(parents=True)
    cert, key = make_certificate(run_dir / "tls")
    (run_dir / "passwd").write_text(f"alice@{run.DOMAIN}:{hash_password(PASSWORD)}\n")
    dkimkeys.write_key(dkimkeys.generate_key("rsa"), run_dir / "dkim.key")
    helper = subprocess.Popen(
        [sys.executable, __file__, "--serve-sink", str(messages)],
        stdout=subprocess.PIPE,
        stderr=open(run_dir / "sink.log", "wb"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(run.REPO), str(run.BENCH)])},
    )
    proc = None
    others: list[subprocess.Popen] = []  # Dovecot, OpenDKIM: measured with Postfix
    try:
        ready = helper.stdout.readline().split()
        if not ready or ready[0] != b"ready":
            raise run.RunError(f"sink helper did not start: {(run_dir / 'sink.log').read_text()}")
        dns_port, sink_port = int(ready[1]), int(ready[2])
        smtp_port, port = run.free_port(), run.free_port()
        log = run_dir / "server.log"
        if server in ("postfix", "postfix-dkim"):
            milter = None
            if server == "postfix-dkim":
                # The key written above for mailx: both sign alike.
                opendkim, milter = start_opendkim(run_dir / "opendkim", run_dir / "dkim.key",
                                                  unix=milter_socket == "unix")
                others.append(opendkim)
            proc, dovecot = start_postfix(run_dir, port, sink_port, cert, key, milter)
            others.append(dovecot)
            log = run_dir / "postfix" / "postfix.log"
        else:
            proc = start_mailx(run_dir, smtp_port, port, dns_port, sink_port, cert, key, messages)
        cpu_before = sum(run.cpu_seconds(p.pid) for p in [proc, *others])
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
        connections, signed = int(line.split()[3]), int(line.split()[4])
        cpu = sum(run.cpu_seconds(p.pid) for p in [proc, *others]) - cpu_before
        rss = sum(run.tree_peak_rss(p.pid) for p in [proc, *others])
        if server == "postfix-dkim" and signed < messages:
            raise run.RunError(f"only {signed} of {messages} messages reached the sink with a"
                               f" DKIM-Signature\n{run.log_tail(log)}")
    finally:
        if proc is not None:
            (run.stop if server == "mailx" else peer_postfix.stop)(proc)
        for other in others:
            run.stop(other)
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
        "sink_dkim_signed": signed,
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
                    "dkim": {"selector": SELECTOR, "key": str(run_dir / "dkim.key")},
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
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--kinds", default="mailx",
                        help="comma-separated: mailx, postfix (Postfix with Dovecot SASL, "
                             "bench/peer_postfix.py), postfix-dkim (the same and OpenDKIM)")
    parser.add_argument("--milter-socket", choices=("inet", "unix"), default="unix",
                        help="postfix-dkim: OpenDKIM on a Unix socket (Debian's default) or a "
                             "loopback port")
    parser.add_argument("--json", type=Path, help="every run's figures")
    args = parser.parse_args(argv)
    if args.serve_sink is not None:
        serve_sink(args.serve_sink)
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ("mailx", "postfix", "postfix-dkim") for k in kinds):
        parser.error(f"unknown kind in {args.kinds!r}")
    if "postfix-dkim" in kinds:
        try:
            opendkim_binary()  # now, not after the other kinds' runs
        except run.RunError as e:
            print(f"postfix-dkim: {e}", file=sys.stderr)
            return 1
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    # Short: Postfix's sockets live under the run directory (108 bytes a path).
    with run.RunSpace(None, "mxs-") as space:
        for rep in range(args.repeat):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                run_dir = space.run_dir(f"{kind}{rep + 1}")
                try:
                    result = measure(args.messages, args.concurrency, run_dir, args.timeout, kind,
                                     args.milter_socket)
                except run.RunError as e:
                    print(f"{kind} #{rep + 1}: {e}", file=sys.stderr)
                    return 1
                results[kind].append(result)
                print(f"  {kind:<12} #{rep + 1}: {result['msgs_per_s']:7.1f} msg/s"
                      f"  CPU {result['cpu_ms_per_msg']:.2f} ms/msg,"
                      f" RSS {result['peak_rss_mib']:.1f} MiB,"
                      f" {result['sink_connections']} connections to the sink,"
                      f" {result['sink_dkim_signed']} signed", flush=True)
                if result["acknowledged"] != args.messages:
                    print(f"{kind} #{rep + 1}: {result['acknowledged']} of {args.messages}"
                          " acknowledged", file=sys.stderr)
                    return 1
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
    peers = [k for k in ("postfix", "postfix-dkim") if k in medians and "mailx" in medians]
    if peers:
        print()
    for peer in peers:
        print(run.paired_line(results, "mailx", peer))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
