"""mailx against an aiosmtpd peer or Postfix, on this machine, in one command.

    python3 bench/run.py                      # every scenario, mailx and the peer, 3 repeats
    python3 bench/run.py --servers peer --repeat 1 --scenarios 1KiB-c10
    python3 bench/run.py --servers mailx,postfix,peer   # Postfix too (bench/peer_postfix.py)

For each scenario and repeat, each server in turn (the order alternates from
one repeat to the next) is started on a fresh Maildir, driven by the load
generator, and measured:

- msg/s = messages / (last file in new/ - first connection attempt). The
  end is the moment the last message's file appeared in a Maildir ``new/``
  (that directory's mtime once all files are there), not the last 250: a
  message counts only once it is in a Maildir. The start is when the load
  generator began its first connection (the Python client reports it; for
  smtp-source, just before it is started).
- peak RSS: VmHWM summed over the server's process tree, read before it is stopped.
- CPU: the server tree's user+system time during the run, per message.

The table gives the median over the repeats, the range in brackets, the
paired ratio (mailx / peer: the median of each repeat's ratio, the two runs
back to back; `paired_ratio`) with the ratio of the medians in brackets, and
the largest peak RSS.  Each run also prints the cores the hypervisor stole.

Scenarios are data (``SCENARIOS``): a name, overrides deep-merged into mailx's
configuration, extra peer arguments, message size, concurrency and count.
"""

import argparse
import atexit
import compileall
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import loadgen
import peer_postfix

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DOMAIN = "bench.test"
MAILBOX = "alice"
KiB = 1024
MiB = 1024 * KiB
# How long acknowledged messages may take to appear in new/ after the load
# ends. SPEC section 5: a 250 means the file is already there, so this only
# bounds how long a broken server is waited for.
DELIVERY_GRACE = 30.0
# --observe: what the trace record and metrics may cost in msg/s (issue 14).
OBSERVE_BUDGET = 0.05
# Cores taken by other processes during a run above which the table is suspect.
NOISE_WARNING = 0.2


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int  # bytes per message, headers included
    concurrency: int  # sessions at once
    messages: int  # per run; --messages overrides
    config: Mapping = field(default_factory=lambda: MappingProxyType({}))  # mailx overrides
    peer_args: tuple[str, ...] = ()


DNS_PLACEHOLDER = "127.0.0.1:{dns_port}"  # replaced by the loopback DNS server's port

# Counts chosen so the default run (4 scenarios x 2 servers x 3 repeats)
# takes a few minutes on a 2-core machine and each run lasts seconds, well
# above the 20 ms polling and the few ms of start-up jitter.
SCENARIOS = (
    Scenario("1KiB-c1", 1 * KiB, 1, 2000),
    Scenario("1KiB-c10", 1 * KiB, 10, 5000),
    Scenario("1KiB-c50", 1 * KiB, 50, 5000),
    Scenario("100KiB-c10", 100 * KiB, 10, 2000),
    # SPF, DKIM and DMARC on, answered by a loopback DNS server (bench/dns_server.py)
    # and then from mailx's cache; compare with 1KiB-c10 (checks off).
    Scenario(
        "1KiB-c10-auth",
        1 * KiB,
        10,
        5000,
        config=MappingProxyType({
            "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
            "dns": {"nameservers": [DNS_PLACEHOLDER], "timeout": "2s"},
        }),
    ),
)


def mailx_config(run_dir: Path, port: int, overrides: Mapping) -> dict:
    """The benchmark's mailx configuration: one domain, one mailbox, no checks."""
    base = {
        "hostname": "mx.bench.test",
        "listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]},
        "paths": {"mail": str(run_dir / "mail"), "spool": str(run_dir / "spool")},
        "limits": {
            # The load generator is one IP with up to 50 sessions at once.
            "connections_per_ip": 1000,
            "connections": 2000,
            "connection_rate_per_ip": 0,
            # Off: the postscreen-like pause before the banner costs each
            # session a fixed wait, not work; it is latency, not throughput,
            # and the peer has none.
            "greeting_delay": "0s",
        },
        "authentication": {"spf": False, "dkim": False, "dmarc": "off"},
        "domains": {DOMAIN: {"mailboxes": [MAILBOX], "aliases": {"postmaster": MAILBOX}}},
    }
    return deep_merge(base, overrides)


def deep_merge(base: Mapping, overrides: Mapping) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# A server: given its run directory, port, the scenario and the options, the
# command that starts it in the foreground. Every server files into
# <run_dir>/mail/<domain>/<mailbox>/.


def mailx_command(run_dir: Path, port: int, scenario: Scenario, args) -> list[str]:
    path = run_dir / "mailx.yaml"
    # JSON is YAML; indented, so a configuration error's line number is useful.
    text = json.dumps(mailx_config(run_dir, port, scenario.config), indent=2)
    if DNS_PLACEHOLDER in text:
        text = text.replace(DNS_PLACEHOLDER, f"127.0.0.1:{loopback_dns_port()}")
    path.write_text(text)
    return [*shlex.split(args.mailx_command), "--config", str(path)]


def mailx_observed_command(run_dir: Path, port: int, scenario: Scenario, args,
                           json_logs: bool = False) -> list[str]:
    """mailx with listen.metrics on (and optionally logging.format: json), to
    compare with plain mailx in the same run: the cost of being watched."""
    overrides: dict = {"listen": {"metrics": [f"tcp:{free_port()}:interface=127.0.0.1"]}}
    if json_logs:
        overrides["logging"] = {"format": "json"}
    observed = replace(scenario, config=deep_merge(scenario.config, overrides))
    return mailx_command(run_dir, port, observed, args)


# --observe: the trace record (mailx.observe.trace) and the metrics listener
# both off, against both on; log observers count either way (metrics has no off).
UNOBSERVED = MappingProxyType({"logging": {"trace": {"keep_days": 0}}})


def mailx_unobserved_command(run_dir: Path, port: int, scenario: Scenario, args) -> list[str]:
    """mailx with no trace record and no metrics listener."""
    bare = replace(scenario, config=deep_merge(scenario.config, UNOBSERVED))
    return mailx_command(run_dir, port, bare, args)


def mailx_traced_command(run_dir: Path, port: int, scenario: Scenario, args) -> list[str]:
    """mailx with listen.metrics and the trace record (7 days, its default) on."""
    traced = replace(scenario, config=deep_merge(
        scenario.config, {"logging": {"trace": {"keep_days": 7}}}))
    return mailx_observed_command(run_dir, port, traced, args)


_dns_server: subprocess.Popen | None = None
_dns_port: int | None = None


def loopback_dns_port() -> int:
    """Start bench/dns_server.py once (stopped at exit); its port."""
    global _dns_server, _dns_port
    if _dns_port is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        _dns_server = subprocess.Popen(
            [sys.executable, str(BENCH / "dns_server.py")], stdout=subprocess.PIPE, env=env
        )
        _dns_port = int(_dns_server.stdout.readline())
        atexit.register(_dns_server.kill)
    return _dns_port


def peer_command(run_dir: Path, port: int, scenario: Scenario, args,
                 extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, str(BENCH / "peer_aiosmtpd.py"), "--port", str(port),
            "--maildir", str(run_dir / "mail" / DOMAIN / MAILBOX),
            "--domain", DOMAIN, "--mailbox", MAILBOX, *extra, *scenario.peer_args]


def postfix_command(run_dir: Path, port: int, scenario: Scenario, args) -> list[str]:
    """A private Postfix (bench/peer_postfix.py): virtual(8) into the run's Maildir.

    The master runs in the foreground, so the measured process tree is all of
    Postfix; scenario.config and peer_args are mailx's and the aiosmtpd peer's.
    """
    if not peer_postfix.installed():
        raise RunError("Postfix not installed (Debian: apt-get install postfix, "
                       "'No configuration')")
    inst = peer_postfix.Instance(run_dir / "postfix", port, "maildir", mail=run_dir / "mail")
    try:
        peer_postfix.configure(inst)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        raise RunError(f"postfix: {e}") from None
    return peer_postfix.command(inst)


# twistd of this interpreter. ("python3 -m twisted" is the newer "twist"
# runner: no -n, JSON logs when not on a terminal.)
TWISTD = shlex.join([sys.executable, "-c", "from twisted.scripts.twistd import run; run()"])


SERVERS: dict[str, Callable[..., list[str]]] = {
    "mailx": mailx_command,
    # Not in the default set: mailx with its metrics listener, and with JSON
    # logs too: --servers mailx,mailx-metrics,mailx-json gives the ratios.
    "mailx-metrics": mailx_observed_command,
    "mailx-json": lambda *a: mailx_observed_command(*a, json_logs=True),
    # --observe: trace record and metrics listener off, then both on.
    "mailx-unobserved": mailx_unobserved_command,
    "mailx-observed": mailx_traced_command,
    "peer": peer_command,
    # Not in the default set: the peer with its fsyncs in a thread pool.
    "peer-threads": lambda *a: peer_command(*a, extra=("--fsync-in-thread",)),
    # Not in the default set: Postfix, private instance on loopback (needs root).
    "postfix": postfix_command,
}


class RunError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Until the server answers a connection with its 220 banner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunError(f"exited with status {proc.returncode} before accepting connections")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                banner = s.makefile("rb").readline()
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RunError(f"not accepting connections on port {port} after {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        # What the server left behind in its group (measure() starts it as a
        # session leader; Postfix's master does not wait for its daemons).
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RunError(f"no {key} in /proc/{pid}/status")


def process_tree(pid: int) -> set[int]:
    """``pid`` and its live descendants (mailx files mail from a child process)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return tree


def tree_peak_rss(pid: int) -> int:
    """VmHWM summed over the process tree; a member that exits meanwhile (Postfix's
    daemons come and go) is left out."""
    total = 0
    for member in process_tree(pid):
        try:
            total += proc_status(member, "VmHWM")
        except (OSError, RunError):
            continue
    return total


def tree_pss(pid: int) -> int:
    """Pss summed over the process tree now (proc(5): smaps_rollup): shared pages
    (libraries, a forked parent's) counted once, split between their sharers.
    Postfix runs dozens of small processes; the VmHWM sum counts libc in each."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f
                              if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def tree_members(pid: int) -> list[dict[str, Any]]:
    """Each live member of the tree: its command line, VmHWM and Pss now, so the
    sum can be told apart (mailx: the server and its Maildir writer)."""
    members = []
    for member in sorted(process_tree(pid)):
        try:
            with open(f"/proc/{member}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{member}/smaps_rollup") as f:
                pss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            members.append({"command": " ".join(argv)[:200],
                            "peak_rss": proc_status(member, "VmHWM"), "pss": pss})
        except (OSError, RunError, StopIteration, ValueError):
            continue
    return members


def cpu_seconds(pid: int) -> float:
    """User + system time of the process tree, all threads, reaped children too (proc(5): 14-17)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # utime, stime, and cutime, cstime: the daemons a member reaped
        # meanwhile (Postfix's master restarts smtpd, cleanup, ... as they exit).
        total += sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")
    return total


PF_KTHREAD = 0x00200000  # include/linux/sched.h


@dataclass(frozen=True)
class CPUSnapshot:
    when: float  # monotonic
    machine: float  # CPU seconds of the whole machine, kernel threads included
    own: float  # this process's
    others: Mapping[int, float]  # every other user process's, by pid
    steal: float = 0.0  # CPU seconds the hypervisor gave other guests (proc(5) steal)


def cpu_snapshot(ours: set[int]) -> CPUSnapshot:
    """Where the machine's CPU time stands (proc(5): /proc/stat, /proc/PID/stat).

    ``others`` leaves out ``ours``, this process and kernel threads, and
    counts each process's reaped children (cutime, cstime) so that short
    test processes are seen.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    others = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in ours or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # Fields 9 (flags) and 14-17 (utime, stime, cutime, cstime).
        if not int(fields[6]) & PF_KTHREAD:
            others[int(entry.name)] = sum(map(int, fields[11:15])) / ticks
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return CPUSnapshot(time.monotonic(), (user + nice + system + irq + softirq + steal) / ticks,
                       usage.ru_utime + usage.ru_stime, MappingProxyType(others), steal / ticks)


def stolen(before: CPUSnapshot, after: CPUSnapshot) -> float:
    """Cores the hypervisor took for other guests between two snapshots: noise no
    process here shows, and the reason CPU time per message can double on a shared host."""
    return max(0.0, after.steal - before.steal) / (after.when - before.when)


def other_load(before: CPUSnapshot, after: CPUSnapshot, ours: float) -> float:
    """Cores other processes used between two snapshots; ``ours``: our children's CPU seconds.

    The smaller of two overestimates: the processes' own count (a child
    reaped meanwhile brings all its CPU time, even from before), and the
    machine's total minus ours (the kernel threads' work, some of it ours).
    """
    by_process = sum(t - before.others.get(pid, 0.0) for pid, t in after.others.items())
    by_machine = after.machine - before.machine - ours - (after.own - before.own)
    return max(0.0, min(by_process, by_machine)) / (after.when - before.when)


def others_load(seconds: float = 1.0) -> float:
    """Cores other processes use, sampled over ``seconds``."""
    before = cpu_snapshot(set())
    time.sleep(seconds)
    return other_load(before, cpu_snapshot(set()), 0.0)


def wait_quiet(limit: float) -> None:
    """Up to ``limit`` seconds, until other processes use less than NOISE_WARNING cores."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if others_load() < NOISE_WARNING:
            return
    print(f"  (the machine stayed busy for {limit:.0f} s; running anyway)", flush=True)


def maildir_new_dirs(mail_root: Path) -> list[Path]:
    """Every new/ under <mail>/<domain>/<mailbox>/, Maildir++ folders (.Junk) included."""
    found = []
    for domain in _subdirs(mail_root):
        for mailbox in _subdirs(domain):
            found.append(mailbox / "new")
            found.extend(folder / "new" for folder in _subdirs(mailbox)
                         if folder.name.startswith("."))
    return found


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def count_files(directories: list[Path]) -> int:
    total = 0
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                total += sum(1 for _ in entries)
        except FileNotFoundError:
            pass
    return total


def wait_delivered(mail_root: Path, expected: int, timeout: float) -> tuple[int, float]:
    """Poll (every 20 ms) until ``expected`` files are in new/; (count, when the last appeared).

    When the last appeared is the newest mtime of those new/ directories
    (a rename into a directory updates its mtime), on the monotonic clock.
    If the count never arrives, the time is when polling gave up.
    """
    deadline = time.monotonic() + timeout
    while True:
        directories = maildir_new_dirs(mail_root)
        count = count_files(directories)
        now = time.monotonic()
        if count >= expected or now > deadline:
            break
        time.sleep(0.02)
    if count < expected:
        return count, now
    newest = max((os.stat(d).st_mtime_ns for d in directories if d.exists()), default=None)
    if newest is None:
        return count, now
    wall_minus_mono = time.time_ns() - time.monotonic_ns()
    # The filesystem's clock ticks coarser than ours: never later than we saw it.
    return count, min((newest - wall_minus_mono) / 1e9, now)


@dataclass
class LoadResult:
    ok: int
    errors: int
    start: float  # monotonic: first connection attempt
    acked: float  # monotonic: last reply (Python) or exit (smtp-source)
    cpu: float  # the load generator's user+system seconds
    detail: str
    finished: float = 0.0  # monotonic: the load generator's end (all sessions done)


def run_loadgen(kind: str, port: int, scenario: Scenario, messages: int, run_dir: Path,
                timeout: float, extra: Sequence[str] = ()) -> LoadResult:
    """Run the load generator to its end; ``extra``: more loadgen.py options."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if kind == "smtp-source":
        message_file = run_dir / "message.txt"
        loadgen.write_message_file(message_file, scenario.size)
        argv = loadgen.smtp_source_command(loadgen.find_smtp_source(), "127.0.0.1", port,
                                           messages, scenario.concurrency, message_file)
    else:
        argv = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(port),
                "--messages", str(messages), "--concurrency", str(scenario.concurrency),
                "--size", str(scenario.size), *extra]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RunError(f"load generator still running after {timeout:.0f} s") from None
    acked = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    detail = (err.decode(errors="replace").strip() + " " + out.decode(errors="replace")).strip()
    if kind == "smtp-source":
        # It stops at the first unexpected reply: all or nothing we can count.
        ok = messages if proc.returncode == 0 else 0
        return LoadResult(ok, messages - ok, start, acked, cpu, detail)
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RunError(f"load generator failed: {detail[-500:]}") from None
    return LoadResult(report["ok"], report["errors"] + report["unsent"], report["first_connect"],
                      report["last_reply"] or acked, cpu, detail if report["errors"] else "",
                      report.get("finished") or acked)


def compile_bytecode(tree: Path) -> None:
    """``tree``'s mailx compiled to ``__pycache__``, as installing it does.

    With PYTHONDONTWRITEBYTECODE set (this development machine sets it) a
    checkout's modules are compiled from source at every start, and the
    compiler's memory stays in the server's heap: about 3.5 MiB of RSS that
    an installed mailx (pip writes the bytecode) does not have.
    """
    for package in (tree / "mailx", tree / "twisted" / "plugins"):
        if package.is_dir():
            compileall.compile_dir(package, quiet=1)


def launch(name: str, argv: list[str], run_dir: Path, port: int,
           start_timeout: float, tree: Path = REPO) -> subprocess.Popen:
    """Start a server in ``run_dir`` (log in server.log) and wait for its 220 on ``port``.

    ``tree``: whose mailx runs, first on its PYTHONPATH (default: this checkout),
    from bytecode (`compile_bytecode`).
    """
    log = run_dir / "server.log"
    compile_bytecode(tree)
    # The mailx of this checkout, installed or not (an editable install in
    # strict mode does not see modules added since).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir,
                                env=env, start_new_session=True)
    try:
        wait_ready(proc, port, start_timeout)
    except RunError as e:
        stop(proc)
        raise RunError(f"{name} did not start: {e}\n  {shlex.join(argv)}\n"
                       f"{log_tail(log)}") from None
    return proc


def measure(server: str, scenario: Scenario, messages: int, run_dir: Path, args) -> dict:
    """One run: start the server on an empty Maildir, load it, count, stop it."""
    run_dir.mkdir(parents=True)
    port = free_port()
    argv = SERVERS[server](run_dir, port, scenario, args)
    log = run_dir / "server.log"
    proc = launch(server, argv, run_dir, port, args.start_timeout)
    try:
        cpu_before = cpu_seconds(proc.pid)
        snapshot_before = cpu_snapshot(process_tree(proc.pid))
        load = run_loadgen(args.loadgen, port, scenario, messages, run_dir, args.timeout)
        delivered, last_file = wait_delivered(run_dir / "mail", load.ok, DELIVERY_GRACE)
        if proc.poll() is not None:
            raise RunError(f"{server} exited during the run (status {proc.returncode})\n"
                           f"{log_tail(log)}")
        cpu = cpu_seconds(proc.pid) - cpu_before
        # What other processes took meanwhile: the noise in this run.
        snapshot_after = cpu_snapshot(process_tree(proc.pid))
        other = other_load(snapshot_before, snapshot_after, cpu + load.cpu)
        steal = stolen(snapshot_before, snapshot_after)
        # The whole tree: mailx's Maildir writer is a child process.
        peak_rss = tree_peak_rss(proc.pid)
        pss = tree_pss(proc.pid)
        members = tree_members(proc.pid)
    finally:
        status = stop(proc)
    elapsed = last_file - load.start
    problems = []
    if load.errors:
        problems.append(f"{load.errors} of {messages} not acknowledged: {load.detail[-300:]}")
    if delivered < load.ok:
        problems.append(f"only {delivered} of {load.ok} acknowledged messages in a Maildir "
                        f"{DELIVERY_GRACE:.0f} s after the last reply")
    return {
        "server": server,
        "scenario": scenario.name,
        "messages": messages,
        "acknowledged": load.ok,
        "delivered": delivered,
        "elapsed": elapsed,
        "elapsed_to_last_reply": load.acked - load.start,
        "msgs_per_s": delivered / elapsed if elapsed > 0 and not problems else None,
        "peak_rss": peak_rss,
        "pss_at_end": pss,
        "processes": members,
        "cpu_per_msg": cpu / delivered if delivered else None,
        "loadgen_cpu": load.cpu,
        "other_load": other,
        "steal": steal,
        "exit_status": status,
        "problems": problems,
    }


def _mount_of(path: Path) -> tuple[str, str]:
    """The filesystem type holding ``path`` and its device number, from
    /proc/self/mountinfo (proc(5))."""
    best, found = "", ("unknown", "")
    path_str = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mount_point = fields[4]
                after = fields[fields.index("-") + 1]
                inside = path_str == mount_point or path_str.startswith(
                    mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, found = mount_point, (after, fields[2])
    except OSError:
        pass
    return found


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path``."""
    return _mount_of(path)[0]


def journal_less_ext4(path: Path) -> bool:
    """Whether ``path`` is on ext4 without a journal: jbd2 lists none for its device."""
    fstype, device = _mount_of(path)
    if fstype != "ext4" or not device:
        return False
    name = Path(os.path.realpath(f"/sys/dev/block/{device}")).name
    try:
        return not any(e.startswith(name + "-") for e in os.listdir("/proc/fs/jbd2"))
    except OSError:
        return True  # no jbd2 at all: no journal anywhere


def forget_deletions(path: Path) -> str:
    """Keep earlier deletions on ``path``'s filesystem from slowing the next
    run down; say what was done, or why it could not be.

    ext4 without a journal (this development machine's root) will not reuse an
    inode freed in the last minute, six while its inode table block is dirty,
    and looks up every candidate's table block to know (fs/ext4/ialloc.c,
    ``recently_deleted``).  Measured here: right after a run's 10,000 files
    were deleted, the next run's creations cost mailx a third of its CPU
    (perf: recently_deleted, find_get_block_common and the directory lock
    spinning behind them), and its rate fell from 1,080 to 580 msg/s.  The
    check trusts a table block that is not cached, so syncing the deletions
    and dropping the clean page cache ends the penalty at once.
    """
    os.sync()
    if not journal_less_ext4(path):
        return ""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError as e:
        return (f"warning: {path} is on ext4 without a journal, where files deleted in the last"
                f" minutes slow down creating new ones, and the page cache could not be"
                f" dropped ({e.strerror}): run as root, or wait six minutes after deleting")
    return (f"{path} is on ext4 without a journal: deletions synced and the page cache"
            " dropped, so inodes freed earlier do not slow these runs down")


class RunSpace:
    """Where the runs' files go: each run's directory stays until the end.

    Deleting one run's files before the next would slow the next one down on
    some filesystems (`forget_deletions`), and more for the server that
    creates files from several threads, biasing the comparison; so they are
    all deleted at the end, and the deletions forgotten then.
    """

    def __init__(self, workdir: Path | None, prefix: str, keep: bool = False) -> None:
        self.keep = keep
        self.made_root = workdir is None
        self.root = workdir or Path(tempfile.mkdtemp(
            prefix=prefix, dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
        self.root.mkdir(parents=True, exist_ok=True)
        self.runs: list[Path] = []

    def __enter__(self) -> "RunSpace":
        note = forget_deletions(self.root)
        if note:
            print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.keep:
            return
        for run_dir in self.runs:
            shutil.rmtree(run_dir, ignore_errors=True)
        if self.made_root:
            shutil.rmtree(self.root, ignore_errors=True)
        forget_deletions(self.root.parent)

    def run_dir(self, name: str) -> Path:
        """A run's directory (made by the run itself), deleted at the end."""
        path = self.root / name
        self.runs.append(path)
        return path


def human_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f} MiB"


def summarize(runs: list[dict], scenarios: Sequence[Scenario], servers: Sequence[str]) -> list:
    summary = []
    for scenario in scenarios:
        row = {"scenario": scenario.name, "size": scenario.size,
               "concurrency": scenario.concurrency, "servers": {}}
        for server in servers:
            mine = [r for r in runs if r["scenario"] == scenario.name and r["server"] == server]
            rates = [r["msgs_per_s"] for r in mine if r["msgs_per_s"] is not None]
            cpus = [r["cpu_per_msg"] for r in mine if r["cpu_per_msg"] is not None]
            row["servers"][server] = {
                "runs": len(mine),
                "failed": len(mine) - len(rates),
                "median": statistics.median(rates) if rates else None,
                "min": min(rates, default=None),
                "max": max(rates, default=None),
                "peak_rss": max((r["peak_rss"] for r in mine), default=None),
                "cpu_ms_per_msg": statistics.median(cpus) * 1000 if cpus else None,
            }
        row["other_load"] = max((r["other_load"] for r in runs
                                 if r["scenario"] == scenario.name), default=0.0)
        row["paired"] = {o: paired_ratio(runs, scenario.name, servers[0], o) for o in servers[1:]}
        summary.append(row)
    return summary


def paired_ratios(runs: list[dict], scenario: str, a: str, b: str) -> list[float]:
    """msg/s(a) / msg/s(b) for each repeat where both delivered, in repeat order.

    The servers of a repeat run back to back, so each pair shares the
    machine's state of the moment; on a shared host the CPU time per
    message can double from one minute to the next, which moves both
    servers of a pair together and a ratio of medians not at all.
    """
    rates: dict[str, dict[int, float]] = {a: {}, b: {}}
    for r in runs:
        if r["scenario"] == scenario and r["server"] in rates and r["msgs_per_s"]:
            rates[r["server"]][r["repeat"]] = r["msgs_per_s"]
    return [rates[a][rep] / rates[b][rep] for rep in sorted(rates[a]) if rep in rates[b]]


def paired_ratio(runs: list[dict], scenario: str, a: str, b: str) -> float | None:
    """The median of `paired_ratios`, None when no repeat has both."""
    pairs = paired_ratios(runs, scenario, a, b)
    return statistics.median(pairs) if pairs else None


def paired_line(results: Mapping[str, Sequence[dict]], a: str, b: str, goal: str = "") -> str:
    """``a / b: 0.78x paired (0.72x of medians); per repeat ...`` for a bench
    that keeps each kind's runs in repeat order (lmtp, forwarding, submission)."""
    flat = [dict(r, scenario="-", server=kind, repeat=rep)
            for kind in (a, b) for rep, r in enumerate(results[kind])]
    pairs = paired_ratios(flat, "-", a, b)
    if not pairs:
        return f"{a} / {b}: no repeat where both delivered"
    medians = {kind: statistics.median(r["msgs_per_s"] for r in results[kind] if r["msgs_per_s"])
               for kind in (a, b)}
    return (f"{a} / {b}: {statistics.median(pairs):.2f}x paired"
            f" ({medians[a] / medians[b]:.2f}x of medians{'; ' + goal if goal else ''});"
            f" per repeat {' '.join(f'{p:.2f}' for p in pairs)}")


def table(summary: list, servers: Sequence[str]) -> str:
    base = servers[0]
    others = servers[1:]
    head = (["scenario"] + [f"{s} msg/s" for s in servers]
            + [f"{base}/{o} paired (of medians)" for o in others]
            + [f"{s} peak RSS" for s in servers]
            + [f"{s} CPU ms/msg" for s in servers] + ["other load"])
    rows = []
    for row in summary:
        cells = [row["scenario"]]
        stats = row["servers"]
        for s in servers:
            st = stats[s]
            if st["median"] is None:
                cells.append("failed")
            else:
                cell = f"{st['median']:.0f} ({st['min']:.0f}-{st['max']:.0f})"
                if st["failed"]:
                    cell += f" {st['failed']} failed"
                cells.append(cell)
        for o in others:
            a, b = stats[base]["median"], stats[o]["median"]
            paired = row["paired"][o]
            cells.append((f"{paired:.2f}" if paired else "-")
                         + (f" ({a / b:.2f})" if a and b else ""))
        cells += [human_bytes(stats[s]["peak_rss"]) for s in servers]
        cells += ["-" if stats[s]["cpu_ms_per_msg"] is None else f"{stats[s]['cpu_ms_per_msg']:.2f}"
                  for s in servers]
        cells.append(f"{row['other_load']:.2f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in [head, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="scenarios: " + ", ".join(
            f"{s.name} ({s.size} B, concurrency {s.concurrency}, {s.messages} messages)"
            for s in SCENARIOS))
    parser.add_argument("--messages", type=int, help="messages per run, for every scenario")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario and server")
    parser.add_argument("--scenarios", default=",".join(names),
                        help="comma-separated names (default: all)")
    parser.add_argument("--servers", default="mailx,peer",
                        help=f"comma-separated, the first is compared with the others; "
                             f"known: {', '.join(SERVERS)}")
    parser.add_argument("--loadgen", choices=["auto", "python", "smtp-source"], default="auto",
                        help="auto: smtp-source when installed, else the Python client")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--workdir", type=Path,
                        help="where the Maildirs go (default: a new directory in /var/tmp; "
                             "it must be a real disk, or fsync costs nothing)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument("--mailx-command", default=TWISTD + " -n --pidfile= mailx",
                        help="how to start mailx; --config FILE is appended "
                             "(default: this interpreter's twistd)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one load may take")
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes "
                             f"to use less than {NOISE_WARNING} cores")
    parser.add_argument("--observe", action="store_true",
                        help="the cost of being watched: mailx with the trace record and "
                             "metrics off against both on, 1KiB-c10 unless --scenarios; "
                             f"fails if on loses more than {OBSERVE_BUDGET * 100:.0f}%% of msg/s")
    args = parser.parse_args(argv)
    if args.observe:
        args.servers = "mailx-unobserved,mailx-observed"
        if args.scenarios == ",".join(names):
            args.scenarios = "1KiB-c10"
    wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown += [s for s in args.servers if s not in SERVERS]
    if unknown or not wanted or not args.servers:
        parser.error(f"unknown or missing scenario or server: {', '.join(unknown) or 'none'}")
    args.scenarios = [s for s in SCENARIOS if s.name in wanted]
    if args.loadgen == "auto":
        args.loadgen = "smtp-source" if loadgen.find_smtp_source() else "python"
    elif args.loadgen == "smtp-source" and not loadgen.find_smtp_source():
        parser.error("smtp-source not found (Debian: apt-get install postfix, 'No configuration')")
    return args


def observe_verdict(runs: list[dict]) -> bool:
    """Print the on/off ratio per scenario; True when over budget.

    The verdict is the median of the paired ratios (`paired_ratios`); the
    ratio of the medians is printed beside it.
    """
    over = False
    on, off = "mailx-observed", "mailx-unobserved"
    for name in sorted({r["scenario"] for r in runs}):
        pairs = paired_ratios(runs, name, on, off)
        if not pairs:
            print(f"--observe {name}: no repeat where both servers delivered; no ratio")
            over = True
            continue
        medians = {s: statistics.median(r["msgs_per_s"] for r in runs
                                        if r["scenario"] == name and r["server"] == s
                                        and r["msgs_per_s"])
                   for s in (on, off)}
        ratio = statistics.median(pairs)
        verdict = "within" if ratio >= 1 - OBSERVE_BUDGET else "OVER"
        over = over or verdict == "OVER"
        print(f"--observe {name}: off {medians[off]:.0f} msg/s,"
              f" on (trace + metrics) {medians[on]:.0f} msg/s;"
              f" on/off per repeat {', '.join(f'{p:.2f}' for p in pairs)};"
              f" median {ratio:.3f} (of the medians {medians[on] / medians[off]:.3f}):"
              f" {verdict} the {OBSERVE_BUDGET:.0%} budget")
    return over


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    space = RunSpace(args.workdir, "mailx-bench-", args.keep)
    workdir = space.root
    fstype = filesystem_of(workdir)
    lg = (f"smtp-source ({loadgen.find_smtp_source()})" if args.loadgen == "smtp-source"
          else "Python asyncio client (bench/loadgen.py)")
    machine = {
        "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "workdir": str(workdir), "filesystem": fstype,
    }
    print(f"load generator: {lg}", flush=True)
    print(f"machine: {machine['cpus']} CPUs, Linux {machine['kernel']}, "
          f"Python {machine['python']}, Maildirs on {fstype} ({workdir})", flush=True)
    if fstype in ("tmpfs", "ramfs", "overlay"):
        print(f"warning: {fstype} makes fsync nearly free; use --workdir on a disk",
              file=sys.stderr)

    runs = []
    failed = False
    with space:
        for scenario in args.scenarios:
            messages = args.messages or scenario.messages
            for rep in range(args.repeat):
                # Alternate the order so drift (page cache, journal, a noisy
                # neighbour) does not always favour the same server.
                order = args.servers if rep % 2 == 0 else args.servers[::-1]
                for server in order:
                    run_dir = space.run_dir(f"{scenario.name}-{server}-{rep + 1}")
                    if args.quiet_wait:
                        wait_quiet(args.quiet_wait)
                    try:
                        result = measure(server, scenario, messages, run_dir, args)
                    except RunError as e:
                        print(f"{scenario.name} {server} #{rep + 1}: {e}", file=sys.stderr)
                        return 1
                    result["repeat"] = rep + 1
                    runs.append(result)
                    rate = result["msgs_per_s"]
                    cpu = result["cpu_per_msg"]
                    print(f"  {scenario.name:<12} {server:<12} #{rep + 1}: "
                          + (f"{rate:7.0f} msg/s" if rate else "  FAILED   ")
                          + f"  {result['delivered']}/{messages} in {result['elapsed']:.2f} s,"
                          f" RSS {human_bytes(result['peak_rss'])}"
                          f" (PSS {human_bytes(result['pss_at_end'])} at the end),"
                          f" CPU {cpu * 1000 if cpu else 0:.2f} ms/msg,"
                          f" load generator CPU {result['loadgen_cpu']:.1f} s,"
                          f" other load {result['other_load']:.2f} cores,"
                          f" steal {result['steal']:.2f} cores",
                          flush=True)
                    for problem in result["problems"]:
                        failed = True
                        print(f"    {problem}", file=sys.stderr)

    summary = summarize(runs, args.scenarios, args.servers)
    print()
    print(f"messages per second: median of {args.repeat} (range); "
          f"load generator: {lg}; {machine['cpus']} CPUs")
    print(table(summary, args.servers))
    if args.observe:
        failed = observe_verdict(runs) or failed
    noisy = max((row["other_load"] for row in summary), default=0.0)
    if noisy > NOISE_WARNING:
        print(f"warning: other processes took up to {noisy:.2f} cores during the runs; "
              "these figures measure the machine as much as the servers", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "loadgen": args.loadgen, "machine": machine, "repeat": args.repeat,
            "scenarios": [{"name": s.name, "size": s.size, "concurrency": s.concurrency,
                           "messages": args.messages or s.messages, "config": dict(s.config),
                           "peer_args": list(s.peer_args)} for s in args.scenarios],
            "runs": runs, "summary": summary,
        }, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

