"""A private Dovecot (LMTP and IMAP) for tests and benchmarks: its own directories, logs,
sockets and ports on 127.0.0.1, nothing of the system's, stopped by its PID.

Dovecot's master starts as root (as in production) and files mail as the
unprivileged ``vmail`` user, created if the machine has none.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mailx.testing.server import free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
PASSWORD = "imap-secret"

SETTINGS = """
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
postmaster_address = postmaster@example.test
mail_location = maildir:{base}/mail/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/users
  default_fields = uid={uid} gid={gid} home={base}/home/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  process_min_avail = {lmtp_processes}
}}
"""


def available() -> str | None:
    """Why a private Dovecot cannot run here (a reason to skip), or None."""
    if not os.path.exists(DOVECOT):
        return "Dovecot is not installed (apt-get install dovecot-lmtpd dovecot-imapd)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "Dovecot's master process starts as root, as in production"
    return None


def launch(config: Path, ports: Iterable[int] = (), timeout: float = 20.0,
           ready: Callable[[], bool] = lambda: True) -> subprocess.Popen[bytes]:
    """Dovecot in the foreground on ``config``, once each of ``ports`` accepts
    connections on 127.0.0.1 and ``ready()`` holds; RuntimeError (with what it
    printed) if it exits or is not listening within ``timeout``."""
    process = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    waiting = list(ports)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            why = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"dovecot exited: {why}")
        try:
            while waiting:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            if ready():
                return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"dovecot did not listen on {waiting} within {timeout:.0f} s")
        time.sleep(0.05)


def launch_for(testcase: Any, config: Path, ports: Iterable[int]) -> subprocess.Popen[bytes]:
    """`launch` for a trial test: its failure if Dovecot does not start, stopped
    at the test's clean-up."""
    try:
        process = launch(config, ports)
    except RuntimeError as e:
        testcase.fail(str(e))
    testcase.addCleanup(stop, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """By its own PID: the master takes its children along."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


def vmail_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("vmail")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "vmail"],
            capture_output=True,
        )  # another run may have created it meanwhile: look again
        return pwd.getpwnam("vmail")


class PrivateDovecot:
    """Dovecot with LMTP on a unix socket and on TCP, IMAP on TCP, for ``users``."""

    def __init__(self, users: Iterable[str], lmtp_processes: int = 1) -> None:
        # Under /tmp: a unix socket's path is at most 108 octets.
        self.base = Path(tempfile.mkdtemp(prefix="mailx-lmtp-"))
        self.base.chmod(0o755)
        self.users = list(users)
        self.lmtp_processes = lmtp_processes
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        vmail = vmail_user()
        (self.base / "users").write_text(
            "".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in self.users)
        )
        for name in ("mail", "home"):
            (self.base / name).mkdir()
            os.chown(self.base / name, vmail.pw_uid, vmail.pw_gid)
        (self.base / "state").mkdir()
        self.config = self.base / "dovecot.conf"
        self.config.write_text(
            SETTINGS.format(
                base=self.base,
                uid=vmail.pw_uid,
                gid=vmail.pw_gid,
                imap_port=self.imap_port,
                lmtp_port=self.lmtp_port,
                lmtp_processes=lmtp_processes,
            )
        )

    @property
    def lmtp_socket(self) -> Path:
        return self.base / "run" / "lmtp"

    @property
    def unix_endpoint(self) -> str:
        return f"unix:{self.lmtp_socket}"

    @property
    def tcp_endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.lmtp_port}"

    def start(self, timeout: float = 20.0) -> None:
        self.process = launch(
            self.config, (self.imap_port, self.lmtp_port), timeout, self.lmtp_socket.exists
        )

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.base / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    def messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Every message of ``user``'s ``mailbox``, read over IMAP (blocking)."""
        with imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30) as imap:
            imap.login(user, PASSWORD)
            imap.select(mailbox, readonly=True)
            _, data = imap.search(None, "ALL")
            found: list[bytes] = []
            for number in data[0].split():
                _, parts = imap.fetch(number, "(RFC822)")
                item = parts[0]
                assert isinstance(item, tuple)
                found.append(item[1])
        return found
