"""Postfix as a benchmark peer: a private instance on loopback, started and stopped here.

    python3 bench/peer_postfix.py --dir /var/tmp/pf --port 2526            # virtual(8) into Maildir
    python3 bench/peer_postfix.py --dir /var/tmp/pf --port 2526 --relay 127.0.0.1:2600
    python3 bench/peer_postfix.py --dir /var/tmp/pf --port 2526 --relay 127.0.0.1:2600 \
        --sasl PASSWD-FILE --tls CERT KEY          # submission: STARTTLS, AUTH via Dovecot

Debian's ``postfix`` package, never its system instance: everything lives in
one directory of its own (``main.cf``, ``master.cf`` and maps in ``conf/``,
the queue in ``queue/``, ``data/``, the log in ``postfix.log``), the master runs in the
foreground (``master -c DIR -s``, as ``postfix start-fg`` runs it), so the
caller's process tree is the whole of Postfix (master, smtpd, cleanup, qmgr,
trivial-rewrite, virtual, smtp, ...) and SIGTERM to the master stops it all.

A mode is a function from the instance to its main.cf parameters and extra
master.cf lines (``MODES``); today:

- ``maildir``: mail for ``bench.test`` delivered by virtual(8) into
  ``<mail>/bench.test/<mailbox>/`` (Maildir, like run.py's servers).
- ``relay``: mail for ``bench.test`` rewritten to ``someone@sink.test``
  (virtual_alias_maps) and relayed by smtp(8) to ``relayhost`` (a sink on
  loopback). Postfix has no SRS of its own; the envelope sender is kept.
- ``lmtp``: mail for ``alice@bench.test`` handed by lmtp(8) to an LMTP
  server (``virtual_transport = lmtp:unix:PATH``), Dovecot in bench/lmtp.py.
- ``sasl-relay``: submission. smtpd offers STARTTLS (``tls``: certificate
  and key) and, only after it, AUTH (``smtpd_sasl_type = dovecot``) checked
  by a private Dovecot auth service (`start_dovecot_auth`) that reads the
  same passwd-file as mailx; authenticated clients may send as
  ``alice@bench.test`` only (``reject_sender_login_mismatch``) and relay
  anywhere, through ``relayhost``. No DKIM signing unless a milter is given.

Any mode takes a milter (``milter``, e.g. ``inet:127.0.0.1:PORT``: OpenDKIM
in bench/submission.py's ``postfix-dkim``): ``smtpd_milters`` and
``non_smtpd_milters``, and a message is refused with a temporary error
(``milter_default_action = tempfail``) when the milter cannot be reached.

Durability, for the comparison: cleanup(8) fsyncs the queue file before
smtpd says 250, and virtual(8) fsyncs each Maildir file before renaming it
into ``new/`` (it does not fsync ``new/`` itself). A 250 from Postfix means
"in the queue", and delivery follows; run.py counts a message once it is in
``new/``.

No packet leaves 127.0.0.1: ``inet_interfaces = 127.0.0.1``,
``inet_protocols = ipv4``, DNS off for smtp(8) and lmtp(8)
(``smtp_dns_support_level = disabled``, numeric ``[127.0.0.1]:port`` next
hops), no client name lookups in smtpd, ``myhostname`` given.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "bench.test"
MAILBOX = "alice"
SINK_RECIPIENT = "someone@sink.test"
# The queue and the daemons run as these (Debian's package creates them).
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
# virtual(8) writes the Maildir as this user (any unprivileged uid >= virtual_minimum_uid).
MAILDIR_USER = "nobody"
# Deliveries at once to one next hop (Postfix's default; the benches give mailx the same).
DESTINATION_CONCURRENCY = 20


def postconf(name: str) -> str:
    """A parameter of the installed Postfix's defaults (``postconf -dh``)."""
    return subprocess.run(["postconf", "-dh", name], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def installed() -> bool:
    return shutil.which("postconf") is not None and shutil.which("postfix") is not None


@dataclass
class Instance:
    """One private Postfix: its directory, the port smtpd listens on, and its mode's settings."""

    directory: Path
    port: int
    mode: str = "maildir"
    mail: Path | None = None  # Maildir root (maildir mode); default <directory>/mail
    relay: tuple[str, int] | None = None  # next hop (relay and sasl-relay modes)
    lmtp: str | None = None  # the LMTP server in Postfix's form, unix:PATH (lmtp mode)
    tls: tuple[Path, Path] | None = None  # smtpd's certificate and key (sasl-relay mode)
    sasl_path: str | None = None  # Dovecot's auth service, "inet:127.0.0.1:PORT" (sasl-relay)
    milter: str | None = None  # a milter for every message, "inet:127.0.0.1:PORT" (any mode)
    extra: Mapping[str, str] = field(default_factory=dict)  # more main.cf parameters

    @property
    def config(self) -> Path:
        # Apart from the queue: postfix check wants every file under
        # config_directory owned by root, the queue's by the postfix user.
        return self.directory / "conf"

    @property
    def queue(self) -> Path:
        return self.directory / "queue"

    @property
    def log(self) -> Path:
        return self.directory / "postfix.log"


def _maildir_mode(inst: Instance) -> tuple[dict[str, str], list[str]]:
    mail = inst.mail or inst.directory / "mail"
    user = pwd.getpwnam(MAILDIR_USER)
    mail.mkdir(parents=True, exist_ok=True)
    os.chown(mail, user.pw_uid, user.pw_gid)  # virtual(8) creates the rest as that user
    # texthash: needs no postmap. A result ending in "/" is a Maildir (virtual(8)).
    (inst.config / "vmailbox").write_text(f"{MAILBOX}@{DOMAIN} {DOMAIN}/{MAILBOX}/\n")
    return {
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_base": str(mail),
        "virtual_mailbox_maps": f"texthash:{inst.config / 'vmailbox'}",
        "virtual_uid_maps": f"static:{user.pw_uid}",
        "virtual_gid_maps": f"static:{user.pw_gid}",
    }, [service("virtual", "unix", "-", "n", "n", "-", "-", "virtual")]


def _relay_mode(inst: Instance) -> tuple[dict[str, str], list[str]]:
    if inst.relay is None:
        raise ValueError("relay mode needs a next hop")
    host, port = inst.relay
    (inst.config / "valias").write_text(f"{MAILBOX}@{DOMAIN} {SINK_RECIPIENT}\n")
    return {
        "virtual_alias_domains": DOMAIN,
        "virtual_alias_maps": f"texthash:{inst.config / 'valias'}",
        # Brackets: no MX lookup; numeric: no address lookup either.
        "relayhost": f"[{host}]:{port}",
    }, [service("smtp", "unix", "-", "-", "n", "-", "-", "smtp")]


def _lmtp_mode(inst: Instance) -> tuple[dict[str, str], list[str]]:
    if inst.lmtp is None:
        raise ValueError("lmtp mode needs an LMTP server")
    (inst.config / "vmailbox").write_text(f"{MAILBOX}@{DOMAIN} OK\n")
    return {
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_maps": f"texthash:{inst.config / 'vmailbox'}",
        "virtual_transport": f"lmtp:{inst.lmtp}",
    }, [service("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp")]


def _sasl_relay_mode(inst: Instance) -> tuple[dict[str, str], list[str]]:
    if inst.relay is None or inst.tls is None or inst.sasl_path is None:
        raise ValueError("sasl-relay mode needs a next hop, a certificate and key, and a sasl_path")
    host, port = inst.relay
    certificate, key = inst.tls
    login = f"{MAILBOX}@{DOMAIN}"
    (inst.config / "senders").write_text(f"{login} {login}\n")
    return {
        "relayhost": f"[{host}]:{port}",
        # The submission service as Debian's master.cf comments it: TLS
        # before AUTH, AUTH before relaying, the login's own sender only.
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(certificate),
        "smtpd_tls_key_file": str(key),
        "smtpd_tls_auth_only": "yes",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": inst.sasl_path,
        "smtpd_sender_login_maps": f"texthash:{inst.config / 'senders'}",
        "smtpd_sender_restrictions": "reject_sender_login_mismatch",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
    }, [service("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
        service("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr")]


MODES: dict[str, Callable[[Instance], tuple[dict[str, str], list[str]]]] = {
    "maildir": _maildir_mode,
    "relay": _relay_mode,
    "lmtp": _lmtp_mode,
    "sasl-relay": _sasl_relay_mode,
}


# Dovecot's auth service alone (no IMAP, no LMTP), for smtpd_sasl_type = dovecot:
# its own base_dir, state and log under the directory, an inet listener on loopback.
DOVECOT_AUTH_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""


def start_dovecot_auth(directory: Path, passwd: Path, port: int,
                       timeout: float = 30.0) -> subprocess.Popen:
    """A private Dovecot (``dovecot -F``, its own process group) whose auth service
    checks logins against ``passwd`` on 127.0.0.1:``port``; wait until it listens."""
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "state"):
        (directory / sub).mkdir(exist_ok=True)
    _traversable(directory)
    # The auth service runs as the dovecot user: it must reach ``passwd``
    # (its directories searchable, the file readable by others or its group).
    conf = directory / "dovecot.conf"
    conf.write_text(DOVECOT_AUTH_CONF.format(d=directory, passwd=passwd, port=port))
    with open(directory / "dovecot.out", "wb") as out:
        proc = subprocess.Popen([shutil.which("dovecot") or "/usr/sbin/dovecot", "-F", "-c", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = directory / "dovecot.log"
            raise RuntimeError(f"Dovecot exited with status {proc.returncode}: "
                               f"{(directory / 'dovecot.out').read_text(errors='replace')}"
                               f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return proc
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"Dovecot's auth service not listening on port {port} after {timeout:.0f} s")


def dovecot_installed() -> bool:
    return shutil.which("dovecot") is not None or os.path.exists("/usr/sbin/dovecot")


def service(*columns: str) -> str:
    """One master.cf line (master(5): service type private unpriv chroot wakeup maxproc command)."""
    return " ".join(columns)


def main_cf(inst: Instance, mode_params: Mapping[str, str]) -> dict[str, str]:
    params = {
        "compatibility_level": "3.6",
        "config_directory": str(inst.config),
        "queue_directory": str(inst.queue),
        "data_directory": str(inst.directory / "data"),
        "mail_owner": MAIL_OWNER,
        "setgid_group": SETGID_GROUP,
        # Postfix 3.4: log to a file through postlogd, no syslog.
        "maillog_file": str(inst.log),
        "maillog_file_prefixes": str(inst.directory),
        "myhostname": "postfix.bench.test",
        "mydomain": "bench.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "relay_domains": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        # Only bench.test (a virtual mailbox or alias domain) is accepted, from
        # anyone: the peer relays nothing else, loopback clients included.
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        # Nothing leaves 127.0.0.1: no DNS for outbound next hops, no client
        # name lookup, no ETRN flush service, no biff.
        "smtp_dns_support_level": "disabled",
        "lmtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "fast_flush_domains": "",
        "biff": "no",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "message_size_limit": str(10 * 1024 * 1024),
        # Mail that cannot go on fails at once rather than waiting in the queue.
        "maximal_queue_lifetime": "0",
        "bounce_queue_lifetime": "0",
        "notify_classes": "",
        "default_destination_concurrency_limit": str(DESTINATION_CONCURRENCY),
    }
    params.update(mode_params)
    if inst.milter is not None:
        params.update({
            "smtpd_milters": inst.milter,
            "non_smtpd_milters": inst.milter,
            # Unreachable milter: 4xx, never a message passed on unsigned.
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
        })
    params.update(inst.extra)
    return params


def master_cf(inst: Instance, mode_lines: list[str]) -> list[str]:
    # chroot "n" everywhere: the queue is not where Debian's chroot files are.
    return [
        service(f"127.0.0.1:{inst.port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
        service("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
        service("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
        service("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
        service("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
        service("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
        service("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
        service("verify", "unix", "-", "-", "n", "-", "1", "verify"),
        service("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
        service("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
        service("showq", "unix", "n", "-", "n", "-", "-", "showq"),
        service("error", "unix", "-", "-", "n", "-", "-", "error"),
        service("retry", "unix", "-", "-", "n", "-", "-", "error"),
        service("discard", "unix", "-", "-", "n", "-", "-", "discard"),
        service("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
        service("scache", "unix", "-", "-", "n", "-", "1", "scache"),
        service("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        *mode_lines,
    ]


def configure(inst: Instance) -> None:
    """Write main.cf and master.cf for the instance's mode, and make its queue directories."""
    # Postfix's daemons talk over Unix sockets in the queue (public/postlog,
    # private/proxymap, ...): unix(7) allows 108 bytes a path, and
    # postfix(1) reports the failure only to syslog.
    longest = inst.queue.resolve() / "private" / "proxymap"
    if len(os.fsencode(longest)) >= 108:
        raise RuntimeError(f"{inst.directory} is too deep for Postfix's sockets "
                           f"({longest} is over 107 bytes); use a shorter --workdir")
    inst.directory.mkdir(parents=True, exist_ok=True)
    _traversable(inst.directory)
    inst.config.mkdir(exist_ok=True)
    mode_params, mode_lines = MODES[inst.mode](inst)
    (inst.config / "main.cf").write_text(
        "".join(f"{k} = {v}\n" for k, v in main_cf(inst, mode_params).items()))
    (inst.config / "master.cf").write_text("\n".join(master_cf(inst, mode_lines)) + "\n")
    inst.queue.mkdir(mode=0o755, exist_ok=True)  # postfix(1) starts with chdir() into it
    # postfix check: creates the missing queue directories with their owners
    # and modes (post-install create-missing, as "postfix start" would) and
    # rejects a broken configuration now rather than at the first message.
    check = subprocess.run(["postfix", "-c", str(inst.config), "check"],
                           capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        log = inst.log.read_text(errors="replace") if inst.log.exists() else ""
        raise RuntimeError(f"postfix check failed (status {check.returncode}): {check.stdout}{check.stderr}{log[-2000:]}")


def _traversable(directory: Path) -> None:
    """Let the postfix user reach the directory: add o+x where our own ancestors lack it.

    A run directory under mkdtemp() is 0700; Postfix's daemons run as
    ``postfix`` and must reach the queue, virtual(8) as MAILDIR_USER the Maildir.
    """
    for parent in [directory, *directory.resolve().parents]:
        st = parent.stat()
        if st.st_mode & 0o001:
            continue
        if st.st_uid != os.geteuid():
            raise RuntimeError(f"{parent} is not searchable by the postfix user")
        parent.chmod(st.st_mode | 0o011)


def command(inst: Instance) -> list[str]:
    """The foreground master (what ``postfix start-fg`` runs), its stdout kept."""
    return [str(Path(postconf("daemon_directory")) / "master"), "-c", str(inst.config), "-s"]


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Until smtpd answers with its 220 banner, or the master exits, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Postfix master exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.makefile("rb").readline().startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Postfix not answering on port {port} after {timeout:.0f} s")


def start(inst: Instance, timeout: float = 30.0) -> subprocess.Popen:
    """Configure, start the master in its own process group, wait for the banner."""
    configure(inst)
    with open(inst.directory / "master.out", "wb") as out:
        proc = subprocess.Popen(command(inst), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(proc, inst.port, timeout)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM the master (it passes the signal on to its children); SIGKILL its group after ``grace``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(grace)
    # The master passes SIGTERM on to its daemons and exits without waiting
    # for them; it led its own process group, so what is left of it goes now.
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.05)
    return proc.returncode


def group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies awaiting their reaper do not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # proc(5): field 3 state, field 5 pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="the instance's own directory")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relay", metavar="HOST:PORT", help="relay mode: the next hop")
    parser.add_argument("--sasl", metavar="PASSWD-FILE", type=Path,
                        help="sasl-relay mode (with --relay, --tls): logins checked by a private Dovecot")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), type=Path)
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    args = parser.parse_args(argv)
    relay = None
    if args.relay:
        host, _, port = args.relay.rpartition(":")
        relay = (host, int(port))
    dovecot = None
    if args.sasl:
        if relay is None or args.tls is None:
            parser.error("--sasl needs --relay and --tls")
        auth_port = _free_port()
        dovecot = start_dovecot_auth(args.dir.resolve() / "dovecot", args.sasl.resolve(), auth_port)
        inst = Instance(args.dir.resolve(), args.port, "sasl-relay", relay=relay,
                        tls=(args.tls[0].resolve(), args.tls[1].resolve()),
                        sasl_path=f"inet:127.0.0.1:{auth_port}")
    else:
        inst = Instance(args.dir.resolve(), args.port, "relay" if relay else "maildir", relay=relay)
    try:
        proc = start(inst)
        print(f"Postfix on 127.0.0.1:{args.port}, log {inst.log}; Ctrl-C stops it", flush=True)
        try:
            proc.wait(args.seconds)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            pass
        finally:
            stop(proc)
    finally:
        if dovecot is not None:
            stop(dovecot)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
