"""Abuse: does the legitimate load keep its pace while a stranger attacks?

    python3 bench/abuse.py                         # every attack, 3 repetitions (10-12 min)
    python3 bench/abuse.py --quick                 # 1 repetition, short phases (~3 min)
    python3 bench/abuse.py --attack header-fold --attack dkim-bh --repeat 5

The security review's "Measured" requirement (issue 9, "Hostile input"):
the 1 KiB/10-session load runs while each attack that costs CPU or memory
runs beside it; the legitimate load's messages/second stays at 80 % or more
of the same run without the attack, and the server's RSS stays under
150 MiB.  For each attack and repetition, on a fresh ``twistd mailx`` (the
shipped configuration, checks on; see ``mailx_overrides``):

1. warm-up: the legitimate load for ``--warmup`` seconds (imports, first
   thread-pool use, first DNS lookups);
2. baseline: the legitimate load alone for ``--phase`` seconds;
3. attack: the attack starts, and after ``LEAD`` seconds the same load runs
   again for the same time beside it.  The attack repeats itself until the
   load is over (every loop bounded in count and time), then stops.

Hostile messages are paced (``message_loop(interval=...)``): what hostile
content costs is the question, not volume, which costs any server.  The
``none`` row is the same measurement without an attack: the ratio's noise.

The legitimate load is bench/loadgen.py (10 sessions, 1 KiB messages, to
alice@bench.test from 127.0.0.1 on the plain listener, SPF pass, DMARC
aligned), as a fixed-length offered load (``--duration``): msg/s = messages
answered 250 / (end of the load - first connection), where the end is when
the last session finished (so a freeze at the end counts), or the hard
deadline ``--phase`` + ``GRACE`` after which unanswered messages count as
lost time.  Every 250 is checked against the files in alice's ``new/``.
Attackers come through a ``haproxy:`` listener with PROXY headers that claim
TEST-NET addresses (RFC 5737), so the per-IP limits treat them as other
hosts; every packet goes to 127.0.0.1.  Their messages go to bob (or to the
forwarding alias), never to alice.

Peak RSS is the sum of VmHWM over the server's process tree (the server and
its Maildir writer) read at the end of the attack phase; VmHWM is a
high-water mark, so it covers the whole run.  "server cores" is the server
tree's CPU time per second of each phase.  "other load" is what other
processes of the machine took meanwhile (run.py's noise figure): above 0.2
cores, read the ratios with care.

A helper process (``--serve-helper``) plays the outside world: the loopback
DNS server (mailx.testing.dnsserver) behind a small UDP front that answers
the ``slow.attack.test`` zone itself, each answer held back just under the
resolver timeout (attack spf-slow; mailx.testing has no delay option), and
the SMTP sink (mailx.testing.sink) that answers 550 to the forwarding
alias's destination (attack report-ctype).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import resource
import secrets
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import run
from run import RunError, Scenario

HOST = "127.0.0.1"  # every packet, whatever the options say
KiB, MiB = run.KiB, run.MiB
LEGIT = Scenario("1KiB-c10", 1 * KiB, 10, 1_000_000)  # messages: a cap, the phase bounds it
ATTACK_MAILBOX = "bob"
FORWARD_ALIAS = "fwd"
SINK_DOMAIN = "sink.test"
SINK_RCPT = f"someone@{SINK_DOMAIN}"
SLOW_ZONE = "slow.attack.test"
DNS_TIMEOUT = 1.0  # dns.timeout of the bench server, seconds
# "Just under the DNS timeout", with room for a busy machine's scheduling.
SLOW_DELAY = 0.75 * DNS_TIMEOUT
SPF_INCLUDES = 9  # with the record itself, 10 slow lookups per check (RFC 7208 4.6.4: 10)
LEAD = 0.5  # seconds between the attack's start and the load's
GRACE = 5.0  # after the phase, unanswered legitimate messages wait this long at most
ATTACK_STOP = 15.0  # the attack's threads are given this long to stop
RATIO_GOAL = 0.80
RSS_GOAL = 150 * MiB
# Legitimate records live 1 s in mailx's cache: the sender's checks keep
# needing the resolver, as a stream of different senders would (a sender
# answered from the cache never waits for a worker thread).
LEGIT_TTL = 1


# --- the helper process: DNS and sink -------------------------------------------


def helper_zones(dkim_public_key: str) -> dict[str, dict[str, list[Any]]]:
    """The static zones: the legitimate sender's, the sink's, and the attackers' policies."""
    return {
        # As bench/dns_server.py: loadgen.SENDER is loadgen@client.bench.test from 127.0.0.1.
        "client.bench.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "_dmarc.client.bench.test": {"TXT": ["v=DMARC1; p=reject"]},
        SINK_DOMAIN: {"MX": [(10, f"mx.{SINK_DOMAIN}")]},
        f"mx.{SINK_DOMAIN}": {"A": ["127.0.0.1"]},
        "_dmarc.from.attack.test": {"TXT": ["v=DMARC1; p=reject"]},
        "_dmarc.dkim.attack.test": {"TXT": ["v=DMARC1; p=reject"]},
        "s1._domainkey.dkim.attack.test": {"TXT": [f"v=DKIM1; k=rsa; p={dkim_public_key}"]},
    }


def dkim_public_key() -> str:
    """A fresh RSA key's public half, for the DKIM record (the signatures are bogus anyway:
    dkimpy fetches the key before it hashes the body, so a key must be found)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def slow_txt(name: str) -> str | None:
    """The synthesized SPF records of the slow zone, unique per message so no cache helps.

    ``m<k>.slow.attack.test`` includes ``i1.m<k>`` .. ``i9.m<k>``, each ``?all``.
    """
    labels = name.lower().rstrip(".").split(".")
    if len(labels) == 4 and labels[0].startswith("m"):
        includes = " ".join(f"include:i{j}.{name}" for j in range(1, SPF_INCLUDES + 1))
        return f"v=spf1 {includes} ?all"
    if len(labels) == 5 and labels[0].startswith("i") and labels[1].startswith("m"):
        return "v=spf1 ?all"
    return None


def serve_helper() -> None:
    """The helper process: prints ``ready <dns port> <sink port>``, then serves until killed."""
    from twisted.internet import protocol, reactor
    from twisted.names import dns

    from mailx.testing.dnsserver import start_dns_server
    from mailx.testing.sink import start_sink

    static = start_dns_server(helper_zones(dkim_public_key()), ttl=LEGIT_TTL)
    sink = start_sink(keep_data=False)
    # Every forward to the alias is refused for good, so each one ends in a
    # bounce decision (dsn.is_report). Scripted replies are used once each.
    sink.script("rcpt", *(["550 5.1.1 No such user"] * 100_000), address=SINK_RCPT)

    class Front(protocol.DatagramProtocol):
        """UDP DNS: the slow zone answered here, late; anything else relayed to ``static``."""

        def __init__(self) -> None:
            self.waiting: dict[int, tuple[int, Any]] = {}  # our id -> (client's id, address)
            self.ids = itertools.count(1)

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            try:
                message = dns.Message()
                message.fromStr(data)
            except Exception:  # noqa: BLE001 - a bench helper drops what it cannot parse
                return
            if addr == (HOST, static.port):
                client = self.waiting.pop(message.id, None)
                if client is not None:
                    message.id = client[0]
                    self.transport.write(message.toStr(), client[1])
                return
            name = message.queries[0].name.name.decode("ascii", "replace") if message.queries else ""
            if name.lower().endswith(SLOW_ZONE):
                reactor.callLater(SLOW_DELAY, self.answer_slow, message, addr)
                return
            ours = next(self.ids) % 65536
            self.waiting[ours] = (message.id, addr)
            message.id = ours
            self.transport.write(message.toStr(), (HOST, static.port))

        def answer_slow(self, query: Any, addr: Any) -> None:
            reply = dns.Message(id=query.id, answer=1, auth=1, rCode=dns.OK)
            reply.queries = query.queries
            q = query.queries[0]
            text = slow_txt(q.name.name.decode("ascii", "replace"))
            if q.type == dns.TXT and text is not None:
                data = text.encode()  # RFC 1035 3.3.14: strings of at most 255 octets
                strings = [data[i:i + 255] for i in range(0, len(data), 255)]
                reply.answers = [dns.RRHeader(q.name.name, dns.TXT, dns.IN, 60,
                                              dns.Record_TXT(*strings, ttl=60))]
            self.transport.write(reply.toStr(), addr)

    front = reactor.listenUDP(0, Front(), interface=HOST)
    print(f"ready {front.getHost().port} {sink.port}", flush=True)
    reactor.run()


class Helper:
    """The helper process, started once for the whole bench."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(run.REPO), str(run.BENCH), os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve-helper"],
                                         stdout=subprocess.PIPE, stderr=err, env=env)
        ready = self.proc.stdout.readline().split()
        if len(ready) != 3 or ready[0] != b"ready":
            run.stop(self.proc)
            raise RunError(f"DNS/sink helper did not start:\n{run.log_tail(log)}")
        self.dns_port, self.sink_port = int(ready[1]), int(ready[2])

    def stop(self) -> None:
        run.stop(self.proc, grace=5)


# --- the server ------------------------------------------------------------------


SRS_SECRET = secrets.token_urlsafe(32)


# run.py raises these for its load generator, one address with many sessions;
# here they stay as the server under test ships them.
RAISED_BY_RUN = ("connections", "connections_per_ip", "connection_rate_per_ip")


def mailx_overrides(plain: int, proxied: int, helper: Helper, extra: dict) -> dict:
    """What the bench changes in mailx's shipped configuration (deep-merged into run.mailx_config).

    - ``greeting_delay`` 0: the pause costs each of the load's sessions a
      fixed wait, not work (attack pre-banner turns it back on);
    - checks on (SPF, DKIM, DMARC enforce) against the helper's DNS, with a
      1 s timeout (5 s shipped) so that one of attack spf-slow's checks lasts
      8 s, not 40;
    - two listeners: the plain one for the load, a ``haproxy:`` one for the attackers;
    - bob receives the attacks; ``fwd`` forwards to the sink, which refuses it.
    """
    base = {
        "listen": {"smtp": [f"tcp:{plain}:interface={HOST}",
                            f"haproxy:tcp:{proxied}:interface={HOST}"]},
        "limits": {"greeting_delay": "0s"},
        "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
        "dns": {"nameservers": [f"{HOST}:{helper.dns_port}"], "timeout": f"{DNS_TIMEOUT:g}s"},
        "domains": {run.DOMAIN: {
            "mailboxes": [run.MAILBOX, ATTACK_MAILBOX],
            "aliases": {"postmaster": run.MAILBOX, FORWARD_ALIAS: SINK_RCPT},
        }},
        "outbound": {"srs_secret": SRS_SECRET, "port": helper.sink_port},
    }
    return run.deep_merge(base, extra)


def mailx_argv(run_dir: Path, plain: int, overrides: dict, args: argparse.Namespace) -> list[str]:
    """Write the configuration (JSON is YAML), with the shipped per-client limits; the command."""
    config = run.mailx_config(run_dir, plain, overrides)
    for key in RAISED_BY_RUN:
        config["limits"].pop(key, None)
    path = run_dir / "mailx.yaml"
    path.write_text(json.dumps(config, indent=2))
    return [*shlex.split(args.mailx_command), "--config", str(path)]


# --- attack plumbing -----------------------------------------------------------


class Stopped(Exception):
    """The phase is over: give up what was waiting."""


@dataclass
class Target:
    """Where and until when an attack runs; what it saw."""

    port: int  # the haproxy: listener
    mail: Path  # the server's Maildir root
    stop: threading.Event
    deadline: float  # monotonic: nothing runs past it, stop or not
    seen: Counter = field(default_factory=Counter)  # reply codes and events
    notes: dict[str, float] = field(default_factory=dict)  # attack-specific figures
    lock: threading.Lock = field(default_factory=threading.Lock)

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def saw(self, what: str | int, n: int = 1) -> None:
        with self.lock:
            self.seen[str(what)] += n

    def add(self, note: str, value: float) -> None:
        with self.lock:
            self.notes[note] = self.notes.get(note, 0) + value


def addresses(block: str) -> Iterator[str]:
    """Claimed client addresses: ``block`` is a TEST-NET /24 prefix (RFC 5737), e.g. "198.51.100"."""
    return (f"{block}.{n}" for n in itertools.cycle(range(1, 255)))


class Conn:
    """A raw SMTP connection through the haproxy listener, claiming ``ip``; reads stop with the phase."""

    def __init__(self, target: Target, ip: str) -> None:
        self.target = target
        self.sock = socket.create_connection((HOST, target.port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(0.25)
        self.buffer = b""
        self.send(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n".encode())

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self.target.running():
                raise Stopped
            try:
                view = view[self.sock.send(view[:256 * KiB]):]
            except TimeoutError:
                continue

    def reply(self) -> int:
        """The code of the next whole reply (RFC 5321 4.2.1: "-" continues)."""
        while True:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                if line[3:4] != b"-":
                    return int(line[:3])
            if not self.target.running():
                raise Stopped
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("closed by the server")
            self.buffer += data

    def command(self, line: bytes) -> int:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def greet(target: Target, ip: str) -> Conn:
    conn = Conn(target, ip)
    try:
        banner = conn.reply()
        if banner != 220:
            raise ConnectionError(f"banner {banner}")
        if conn.command(b"EHLO attacker.attack.test") != 250:
            raise ConnectionError("EHLO refused")
    except BaseException:
        conn.close()
        raise
    return conn


def transaction(conn: Conn, sender: str, rcpt: str, data: bytes | Callable[[Conn], None]) -> int:
    """MAIL, RCPT, DATA, the message (bytes ending in CRLF, or a function that sends it); the code."""
    for line, want in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
        code = conn.command(line.encode())
        if code != want:
            if code < 400 or code >= 600 or line != "DATA":
                conn.command(b"RSET")
            return code
    if callable(data):
        data(conn)
    else:
        conn.send(data)
    conn.send(b".\r\n")
    return conn.reply()


def in_threads(target: Target, count: int, worker: Callable[[int], None]) -> None:
    """``worker(0..count-1)`` in threads, joined by the deadline."""
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, target.deadline - time.monotonic()) + 1)


def message_loop(target: Target, connections: int, ips: Iterator[str],
                 make: Callable[[int], tuple[str, str, Any]], *, interval: float = 0.0,
                 max_messages: int = 10_000) -> None:
    """``connections`` sessions send ``make(n)`` messages one after another until the phase ends.

    ``interval``: a session starts a message at most that often. Hostile
    content is the point, not volume: a flood of big messages costs any
    server, and would say nothing about the parsers. A session the server
    closes is opened again from the next claimed address.
    """
    counter = itertools.count()
    lock = threading.Lock()

    def worker(_: int) -> None:
        conn = None
        next_start = 0.0
        try:
            while target.running():
                with lock:
                    n = next(counter)
                    ip = next(ips)
                if n >= max_messages:
                    return
                try:
                    if conn is None:
                        conn = greet(target, ip)
                    sender, rcpt, data = make(n)
                    started = time.monotonic()
                    next_start = started + interval
                    code = transaction(conn, sender, rcpt, data)
                    target.saw(code)
                    target.add("seconds to reply", time.monotonic() - started)
                    target.add("replies", 1)
                except Stopped:
                    target.saw("pending at the end")
                    return
                except (OSError, ConnectionError, ValueError):
                    target.saw("closed")
                    if conn is not None:
                        conn.close()
                    conn = None
                if interval:
                    target.stop.wait(max(0.0, next_start - time.monotonic()))
        finally:
            if conn is not None:
                conn.close()

    in_threads(target, connections, worker)


def header_block(name: str, line: bytes, size: int) -> bytes:
    """A field ``name`` of continuation lines ``line`` (each ending CRLF), about ``size`` bytes."""
    return name.encode() + b": start\r\n" + line * (size // len(line))


def simple_header(sender: str, subject: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{ATTACK_MAILBOX}@{run.DOMAIN}>\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{secrets.token_hex(8)}@attack.test>\r\n").encode()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def codes_verdict(target: Target, expected: set[str], extra: str = "") -> Verdict:
    """As expected when at least one reply came and every reply is in ``expected``."""
    replies = {k: v for k, v in target.seen.items() if k.isdigit()}
    ok = bool(replies) and set(replies) <= expected
    seen = ", ".join(f"{k} x{v}" for k, v in sorted(target.seen.items()))
    answered = target.notes.get("replies", 0)
    mean = target.notes.get("seconds to reply", 0) / answered if answered else None
    timing = f"; {mean:.2f} s per reply" if mean is not None else ""
    return Verdict(ok, f"{seen or 'nothing'}{timing}{extra}")


# --- the attacks (issue 9's numbering) ----------------------------------------------


def control(t: Target) -> Verdict:
    """No attack: the two phases' ratio on an undisturbed server, the noise floor of the others."""
    t.stop.wait(max(0.0, t.deadline - time.monotonic()))
    return Verdict(True, "nothing sent")


def header_fold(t: Target) -> Verdict:
    """5: a 996 KiB header made of continuation lines (quadratic header split)."""
    sender = "fold@fold.attack.test"
    data = (header_block("X-Fold", b" x\r\n", 996 * KiB - 200) + simple_header(sender, "fold")
            + b"\r\nbody\r\n")
    message_loop(t, 1, addresses("198.51.100"),
                 lambda n: (sender, f"{ATTACK_MAILBOX}@{run.DOMAIN}", data), interval=1.0)
    return codes_verdict(t, {"250", "552", "554"})


def from_fields(t: Target) -> Verdict:
    """6: two 60 KB From fields (the stdlib email parser is super-linear on them)."""
    sender = "ceo@from.attack.test"
    words = b" a" * 38 + b"\r\n"  # folded at 78 octets; unfolded, 30 000 words before the address
    field_ = b"From: a\r\n" + words * (60_000 // len(words)) + f" <{sender}>\r\n".encode()
    data = (field_ + field_ + f"To: <{ATTACK_MAILBOX}@{run.DOMAIN}>\r\nSubject: from\r\n".encode()
            + b"Message-ID: <from@attack.test>\r\n\r\nbody\r\n")
    message_loop(t, 1, addresses("198.51.100"),
                 lambda n: (sender, f"{ATTACK_MAILBOX}@{run.DOMAIN}", data), interval=0.5)
    # _dmarc.from.attack.test says p=reject: an author that cannot be
    # determined must not escape it (RFC 7489 6.6.1): 550 under enforce, or
    # at least quarantine (250, filed into Junk), never the inbox.
    inbox = run.count_files([t.mail / run.DOMAIN / ATTACK_MAILBOX / "new"])
    junk = run.count_files([t.mail / run.DOMAIN / ATTACK_MAILBOX / ".Junk" / "new"])
    verdict = codes_verdict(t, {"550", "250"}, f"; {inbox} in bob's inbox, {junk} in Junk")
    return Verdict(verdict.ok and inbox == 0, verdict.detail)


def dkim_body(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; body hashing is linear work.  \r\n"
    return line * (size // len(line))


def dkim_bh(t: Target, body_size: int = 24 * MiB) -> Verdict:
    """7: 10 DKIM signatures with bogus bh= over a 24 MiB body (limits.message_size is 25 MiB)."""
    sender = "signer@dkim.attack.test"
    signatures = b""
    for n in range(10):
        body_c = "relaxed" if n % 2 == 0 else "simple"
        bh = base64.b64encode(secrets.token_bytes(32)).decode()
        b = base64.b64encode(secrets.token_bytes(128)).decode()
        signatures += (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/{body_c};\r\n"
                       f" d=dkim.attack.test; s=s1; h=from:to:subject;\r\n bh={bh};\r\n"
                       f" b={b}\r\n").encode()
    data = signatures + simple_header(sender, "dkim") + b"\r\n" + dkim_body(body_size)
    message_loop(t, 1, addresses("198.51.100"),
                 lambda n: (sender, f"{ATTACK_MAILBOX}@{run.DOMAIN}", data), interval=5.0)
    # dkim=fail, no SPF: DMARC fails and _dmarc.dkim.attack.test says p=reject.
    return codes_verdict(t, {"550"})


def spf_slow(t: Target) -> Verdict:
    """8: SPF whose every lookup answers just under the DNS timeout; 40 messages from two IPs."""
    first, second = ("192.0.2.81",), ("192.0.2.82",)
    ips = itertools.cycle(first * 20 + second * 20)  # 20 sessions each: connections_per_ip

    def make(n: int) -> tuple[str, str, bytes]:
        sender = f"slow@m{n}.{SLOW_ZONE}"
        return sender, f"{ATTACK_MAILBOX}@{run.DOMAIN}", simple_header(sender, "slow") + b"\r\nx\r\n"

    message_loop(t, 40, ips, make)
    # Accepted once the slow check ends (spf=neutral), or 451 4.7.x at the
    # checks' deadline or the per-client bound; never left unanswered.
    return codes_verdict(t, {"250", "451"})


def report_ctype(t: Target) -> Verdict:
    """9: a forward that fails, with a Content-Type of repeated ``multipart/report;``."""
    sender = "report@report.attack.test"
    line = b" multipart/report; multipart/report; multipart/report; multipart/report;\r\n"
    data = (b"Content-Type: multipart/report;\r\n" + line * (100 * KiB // len(line))
            + f"From: <{sender}>\r\nTo: <{FORWARD_ALIAS}@{run.DOMAIN}>\r\n".encode()
            + b"Subject: report\r\nMessage-ID: <report@attack.test>\r\n\r\nbody\r\n")
    # One message a second: each forward is refused by the sink, and each
    # refusal runs the bounce decision (dsn.is_report).
    message_loop(t, 1, addresses("198.51.100"),
                 lambda n: (sender, f"{FORWARD_ALIAS}@{run.DOMAIN}", data), interval=1.0,
                 max_messages=100)
    return codes_verdict(t, {"250"})


SEGMENT = 99  # octets, CRLF included
SEGMENT_PAUSE = 0.0001  # seconds between two segments: each a read of its own on the server


def header_segments(t: Target) -> Verdict:
    """10: a 1 MiB header sent in 99-byte segments (one copy of the header per segment)."""
    sender = "seg@seg.attack.test"
    segment = b" " + b"y" * (SEGMENT - 3) + b"\r\n"
    count = (1 * MiB - 4 * KiB) // SEGMENT  # under the 1 MiB header section cap

    def send(conn: Conn) -> None:
        conn.send(b"X-Segments: start\r\n")
        for _ in range(count):
            conn.send(segment)
            t.add("segments sent", 1)
            time.sleep(SEGMENT_PAUSE)
        conn.send(simple_header(sender, "segments") + b"\r\nbody\r\n")

    message_loop(t, 1, addresses("198.51.100"),
                 lambda n: (sender, f"{ATTACK_MAILBOX}@{run.DOMAIN}", send))
    return codes_verdict(t, {"250", "552", "554"},
                         f"; {t.notes.get('segments sent', 0):.0f} segments sent")


NOOP_CAP = 50 * MiB  # per connection
RECONNECT = 0.5  # seconds before a closed flooder connects again
STALL = 2.0  # seconds without progress: the server stopped reading


def noop_flood(t: Target) -> Verdict:
    """11: a client that pipelines NOOPs and never reads its replies."""
    ips = addresses("198.51.100")
    chunk = b"NOOP\r\n" * (64 * KiB // 6)
    outcomes: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        for _attempt in range(300):  # connections per worker, at most
            if not t.running():
                return
            with lock:
                ip = next(ips)
            try:
                conn = Conn(t, ip)
            except OSError:
                t.saw("connect failed")
                continue
            sent, last_progress, outcome = 0, time.monotonic(), "held to the end"
            try:
                while t.running() and sent < NOOP_CAP:
                    try:
                        sent += conn.sock.send(chunk)
                        last_progress = time.monotonic()
                    except TimeoutError:
                        if time.monotonic() - last_progress > STALL:
                            outcome = "server stopped reading"
                            break
                if sent >= NOOP_CAP:
                    outcome = "all sent"
                if outcome == "server stopped reading":
                    t.stop.wait(max(0.0, t.deadline - time.monotonic()))  # hold it
            except OSError:
                outcome = "closed by the server"
            finally:
                conn.close()
            t.saw(outcome)
            with lock:
                outcomes.append((outcome, sent))
            if outcome != "closed by the server":
                return
            t.stop.wait(RECONNECT)  # a flood of connections is another attack

    in_threads(t, 2, worker)
    most = max((s for _, s in outcomes), default=0)
    # The server must close the session (limits.junk_commands) or stop
    # reading (its write backlog); taking the whole 50 MiB is the bug.
    ok = bool(outcomes) and all(o != "all sent" and s < NOOP_CAP for o, s in outcomes) and any(
        o in ("closed by the server", "server stopped reading") for o, _ in outcomes)
    seen = ", ".join(f"{k} x{v}" for k, v in sorted(t.seen.items()))
    return Verdict(ok, f"{seen}; at most {most / MiB:.1f} MiB sent on one connection")


EARLY_CAP = 8 * MiB  # bytes one early talker sends, at most


def pre_banner(t: Target) -> Verdict:
    """12: 20 connections sending input before the banner during greeting_delay."""
    ips = addresses("203.0.113")
    lock = threading.Lock()
    junk = b"EHLO early.attack.test\r\n" * (64 * KiB // 24)
    most = [0]

    def worker(_: int) -> None:
        for _attempt in range(100):
            if not t.running():
                return
            with lock:
                ip = next(ips)
            try:
                conn = Conn(t, ip)
            except OSError:
                t.saw("connect failed")
                continue
            sent, got = 0, b""
            sel = selectors.DefaultSelector()
            sel.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            try:
                while t.running() and b"\r\n" not in got:
                    for _key, events in sel.select(0.25):
                        if events & selectors.EVENT_READ:
                            data = conn.sock.recv(4096)
                            if not data:
                                raise ConnectionError
                            got += data
                        elif events & selectors.EVENT_WRITE and sent < EARLY_CAP:
                            sent += conn.sock.send(junk)
                    if sent >= EARLY_CAP:
                        sel.modify(conn.sock, selectors.EVENT_READ)
                if b"\r\n" in got:
                    t.saw(int(got[:3]))
            except (OSError, ConnectionError, ValueError):
                t.saw("closed")
            finally:
                sel.close()
                conn.close()
            with lock:
                most[0] = max(most[0], sent)

    in_threads(t, 20, worker)
    # RFC 5321 4.3.1 (the client waits for the greeting): 554, then close.
    return codes_verdict(t, {"554"},
                         f"; at most {most[0] / MiB:.1f} MiB sent before the reply")


HARVEST_RATE = 10.0  # unknown recipients answered per second per session, at most


def harvest(t: Target) -> Verdict:
    """13: directory harvesting: many unknown RCPTs, fast."""
    ips = addresses("203.0.113")
    lock = threading.Lock()
    guesses = itertools.count()
    started = time.monotonic()

    def worker(_: int) -> None:
        conn = None
        for _attempt in range(1000):
            if not t.running():
                break
            with lock:
                ip = next(ips)
            try:
                conn = greet(t, ip)
                if conn.command(b"MAIL FROM:<harvester@harvest.attack.test>") != 250:
                    raise ConnectionError
                while True:
                    code = conn.command(f"RCPT TO:<guess{next(guesses)}@{run.DOMAIN}>".encode())
                    t.saw(code)
                    if code == 421:
                        break
            except Stopped:
                break
            except (OSError, ConnectionError, ValueError):
                t.saw("closed")
            finally:
                if conn is not None:
                    conn.close()
                    conn = None

    sessions = 4
    in_threads(t, sessions, worker)
    refused = sum(v for k, v in t.seen.items() if k.startswith("5"))
    rate = refused / max(0.001, time.monotonic() - started) / sessions
    seen = ", ".join(f"{k} x{v}" for k, v in sorted(t.seen.items()))
    # Unknown recipients count as errors (SPEC 3, error_limit) and get the
    # error pause: a guess costs about a second, and 421 at error_limit.
    return Verdict(refused > 0 and rate <= HARVEST_RATE,
                   f"{seen}; {rate:.1f} unknown recipients/s per session")


@dataclass(frozen=True)
class Attack:
    name: str
    number: int  # in issue 9
    run: Callable[[Target], Verdict]
    expect: str  # what a sound server answers
    config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    min_phase: float = 0.0  # seconds: phases at least this long (one slow check must fit)


ATTACKS = (
    Attack("none", 0, control, "-"),
    Attack("header-fold", 5, header_fold, "250 (or 552)"),
    Attack("from-fields", 6, from_fields, "550, or 250 into Junk (DMARC p=reject)"),
    Attack("dkim-bh", 7, dkim_bh, "550 (DMARC p=reject)"),
    Attack("spf-slow", 8, spf_slow, "250 or 451 4.7.x", min_phase=10.0),
    Attack("report-ctype", 9, report_ctype, "250 (the bounce decision stays cheap)"),
    Attack("header-segments", 10, header_segments, "250 (or 552)"),
    Attack("noop-flood", 11, noop_flood, "server closes or stops reading"),
    Attack("pre-banner", 12, pre_banner, "554, little buffered",
           MappingProxyType({"limits": {"greeting_delay": "1s"}})),
    Attack("harvest", 13, harvest, f"550 then 421, <= {HARVEST_RATE:g} guesses/s per session"),
)


# --- one run -----------------------------------------------------------------------


def mailbox_count(run_dir: Path) -> int:
    return run.count_files([run_dir / "mail" / run.DOMAIN / run.MAILBOX / "new"])


def legit_load(port: int, seconds: float, run_dir: Path) -> run.LoadResult:
    return run.run_loadgen("python", port, LEGIT, LEGIT.messages, run_dir, seconds + GRACE + 30,
                           extra=("--duration", f"{seconds:g}", "--deadline", f"{seconds + GRACE:g}"))


def rate(load: run.LoadResult) -> float:
    elapsed = load.finished - load.start
    return load.ok / elapsed if elapsed > 0 else 0.0


def tree_rss(pid: int) -> int:
    total = 0
    for member in run.process_tree(pid):
        try:
            total += run.proc_status(member, "VmHWM")
        except (OSError, RunError):
            pass
    return total


def measure(attack: Attack, helper: Helper, run_dir: Path, args: argparse.Namespace) -> dict:
    """Fresh server; warm-up, baseline, then the load beside the attack."""
    run_dir.mkdir(parents=True)
    phase = max(args.phase, attack.min_phase)
    plain, proxied = run.free_port(), run.free_port()
    argv = mailx_argv(run_dir, plain, mailx_overrides(plain, proxied, helper, dict(attack.config)),
                      args)
    proc = run.launch("mailx", argv, run_dir, plain, args.start_timeout, args.mailx_tree)
    verdict = None
    try:
        helper_cpu = run.cpu_seconds(helper.proc.pid)
        snapshot = run.cpu_snapshot(run.process_tree(proc.pid) | {helper.proc.pid})
        loadgen_cpu = 0.0
        warm = legit_load(plain, args.warmup, run_dir)
        cpu0, t0 = run.cpu_seconds(proc.pid), time.monotonic()
        base = legit_load(plain, phase, run_dir)
        cpu1, t1 = run.cpu_seconds(proc.pid), time.monotonic()
        target = Target(proxied, run_dir / "mail", threading.Event(), t1 + LEAD + phase + GRACE + ATTACK_STOP)
        result: list[Verdict] = []
        errors: list[BaseException] = []

        def attacker() -> None:
            try:
                result.append(attack.run(target))
            except BaseException as e:  # reported below
                errors.append(e)

        thread = threading.Thread(target=attacker, name=attack.name, daemon=True)
        own0 = resource.getrusage(resource.RUSAGE_SELF)
        thread.start()
        target.stop.wait(LEAD)
        under = legit_load(plain, phase, run_dir)
        cpu2, t2 = run.cpu_seconds(proc.pid), time.monotonic()
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        peak_rss = tree_rss(proc.pid)
        target.stop.set()
        thread.join(ATTACK_STOP + 5)
        if errors:
            raise RunError(f"attack {attack.name} failed: {errors[0]!r}") from errors[0]
        verdict = result[0] if result else Verdict(False, "the attack did not stop in time")
        peak_rss = max(peak_rss, tree_rss(proc.pid))
        loadgen_cpu = warm.cpu + base.cpu + under.cpu
        ours = (run.cpu_seconds(proc.pid) + run.cpu_seconds(helper.proc.pid) - helper_cpu
                + loadgen_cpu)
        other = run.other_load(snapshot, run.cpu_snapshot(run.process_tree(proc.pid)
                                                          | {helper.proc.pid}), ours)
        acknowledged = warm.ok + base.ok + under.ok
        deadline = time.monotonic() + run.DELIVERY_GRACE
        while mailbox_count(run_dir) < acknowledged and time.monotonic() < deadline:
            time.sleep(0.05)
        delivered = mailbox_count(run_dir)
        alive = proc.poll() is None
    finally:
        status = run.stop(proc, grace=5)
    problems = []
    if delivered < acknowledged:
        problems.append(f"only {delivered} of {acknowledged} acknowledged messages in alice's new/")
    if not alive:
        problems.append(f"the server exited during the run (status {status})")
    for name, load in (("baseline", base), ("under attack", under)):
        if load.errors:
            problems.append(f"{name}: {load.errors} legitimate messages not acknowledged: "
                            f"{load.detail[-200:]}")
    baseline, attacked = rate(base), rate(under)
    return {
        "attack": attack.name, "number": attack.number,
        "baseline": baseline, "under_attack": attacked,
        "ratio": attacked / baseline if baseline else None,
        "peak_rss": peak_rss,
        "cores_baseline": (cpu1 - cpu0) / (t1 - t0), "cores_attack": (cpu2 - cpu1) / (t2 - t1),
        # The attackers' threads (this process) during the attack phase: same cores.
        "cores_attacker": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime)
        / (t2 - t1),
        "expected": verdict.ok, "detail": verdict.detail,
        "legit_ok": [warm.ok, base.ok, under.ok], "legit_errors": [base.errors, under.errors],
        "other_load": other, "problems": problems,
    }


# --- the table ---------------------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for attack in ATTACKS:
        mine = [r for r in runs if r["attack"] == attack.name]
        if not mine:
            continue
        ratios = [r["ratio"] or 0.0 for r in mine]
        rows.append({
            "attack": attack.name, "number": attack.number, "expect": attack.expect,
            "runs": len(mine),
            "baseline": statistics.median(r["baseline"] for r in mine),
            "under_attack": statistics.median(r["under_attack"] for r in mine),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "peak_rss": max(r["peak_rss"] for r in mine),
            "expected": sum(r["expected"] for r in mine),
            "cores": (statistics.median(r["cores_baseline"] for r in mine),
                      statistics.median(r["cores_attack"] for r in mine),
                      statistics.median(r["cores_attacker"] for r in mine)),
            "other_load": max(r["other_load"] for r in mine),
            "detail": mine[-1]["detail"],
            "problems": sum(bool(r["problems"]) for r in mine),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ["#", "attack", "baseline msg/s", "with attack msg/s", f"ratio (>= {RATIO_GOAL:.2f})",
            "peak RSS (< 150 MiB)", "reply as expected", "server cores base/attack",
            "attacker cores", "other load"]
    lines = []
    for row in rows:
        ratio_ok = row["ratio"] >= RATIO_GOAL
        rss_ok = row["peak_rss"] < RSS_GOAL
        lines.append([
            str(row["number"]), row["attack"], f"{row['baseline']:.0f}",
            f"{row['under_attack']:.0f}",
            f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) "
            + ("ok" if ratio_ok else "FAIL"),
            f"{run.human_bytes(row['peak_rss'])} " + ("ok" if rss_ok else "FAIL"),
            f"{'yes' if row['expected'] == row['runs'] else 'NO'} ({row['expected']}/{row['runs']})",
            f"{row['cores'][0]:.2f}/{row['cores'][1]:.2f}", f"{row['cores'][2]:.2f}",
            f"{row['other_load']:.2f}",
        ])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
           for r in [head, *lines]]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.append("")
    out.append("What the attacker saw (last repetition), against what a sound server answers:")
    out.extend(f"- {row['attack']}: {row['detail']} (expected: {row['expect']})" for row in rows)
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [a.name for a in ATTACKS]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="attacks: " + ", ".join(f"{a.name} ({a.number})" for a in ATTACKS))
    parser.add_argument("--attack", action="append", choices=names,
                        help="run only this attack (repeatable; default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per attack (medians)")
    parser.add_argument("--phase", type=float, default=5.0,
                        help="seconds of legitimate load in each phase (baseline, attack)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load")
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition, 2 s phases, 0.5 s warm-up")
    parser.add_argument("--workdir", type=Path,
                        help="where the servers' directories go (default: a new one in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--mailx-command", default=run.TWISTD + " -n --pidfile= mailx",
                        help="how to start mailx; --config FILE is appended")
    parser.add_argument("--mailx-tree", type=Path, default=run.REPO,
                        help="the checkout whose mailx runs (first on the server's PYTHONPATH; "
                             "default: this one), to measure another commit's server")
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes "
                             f"to use less than {run.NOISE_WARNING} cores")
    parser.add_argument("--serve-helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.phase, args.warmup = 1, 2.0, 0.5
    if not 1 <= args.repeat <= 20 or not 0.5 <= args.phase <= 60 or not 0 < args.warmup <= 30:
        parser.error("--repeat 1..20, --phase 0.5..60 s, --warmup up to 30 s")
    args.attacks = [a for a in ATTACKS if not args.attack or a.name in args.attack]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_helper:
        serve_helper()
        return 0
    space = run.RunSpace(args.workdir, "mailx-abuse-", args.keep)
    workdir = space.root
    print(f"{len(args.attacks)} attacks x {args.repeat}; phases {args.phase:g} s "
          f"(warm-up {args.warmup:g} s); {os.cpu_count()} CPUs; Maildirs on "
          f"{run.filesystem_of(workdir)} ({workdir})", flush=True)
    helper = Helper(workdir / "helper.log")
    runs: list[dict] = []
    failed = False
    with space:
        try:
            for rep in range(args.repeat):
                for attack in args.attacks:
                    run_dir = space.run_dir(f"{attack.name}-{rep + 1}")
                    if args.quiet_wait:
                        run.wait_quiet(args.quiet_wait)
                    try:
                        result = measure(attack, helper, run_dir, args)
                    except RunError as e:
                        print(f"{attack.name} #{rep + 1}: {e}", file=sys.stderr)
                        failed = True
                        continue
                    result["repeat"] = rep + 1
                    runs.append(result)
                    print(f"  {attack.name:<16} #{rep + 1}: {result['baseline']:6.0f} -> "
                          f"{result['under_attack']:6.0f} msg/s (x{result['ratio'] or 0:.2f}), "
                          f"RSS {run.human_bytes(result['peak_rss'])}, "
                          f"expected {'yes' if result['expected'] else 'NO'}, "
                          f"other load {result['other_load']:.2f}; {result['detail']}", flush=True)
                    for problem in result["problems"]:
                        failed = True
                        print(f"    {problem}", file=sys.stderr)
        finally:
            helper.stop()
    rows = summarize(runs)
    print()
    print(f"legitimate load: {LEGIT.concurrency} sessions of {LEGIT.size} B messages, "
          f"{args.phase:g} s per phase; medians of {args.repeat} (ratio range)")
    print(table(rows))
    if any(row["other_load"] > run.NOISE_WARNING for row in rows):
        print(f"warning: other processes took over {run.NOISE_WARNING} cores during some runs",
              file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "summary": rows, "phase": args.phase,
                                         "repeat": args.repeat}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
