"""A running mailx for tests: in-process on the real reactor, or as a subprocess.

Shipped in the package (like ``treq.testing``) so every test module, the
benchmarks and users' own tests start servers the same way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer
from twisted.internet.threads import deferToThread

BASE_CONFIG: dict[str, Any] = {
    "hostname": "mx.example.test",
    "listen": {"smtp": ["tcp:0:interface=127.0.0.1"]},
    "paths": {"mail": "mail", "spool": "spool"},
    "limits": {"greeting_delay": "0s"},
    "authentication": {"spf": False, "dkim": False, "dmarc": "off"},
    # No lookups a test did not ask for: a PROXY-claimed client address would
    # otherwise be looked up through the system's resolver.
    "checks": {"reverse_dns": False},
    "domains": {
        "example.test": {
            "mailboxes": ["alice", "bob"],
            "aliases": {"postmaster": "alice", "team": ["alice", "bob"]},
        }
    },
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (a value of None deletes)."""
    result = dict(base)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def write_config(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A mailx.yaml in ``directory`` from BASE_CONFIG plus ``overrides``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mailx.yaml"
    path.write_text(yaml.safe_dump(merge(BASE_CONFIG, overrides or {}), sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """mailx started in this process, listening on 127.0.0.1 on an ephemeral port."""

    def __init__(self, service: Any, config: Any) -> None:
        self.service = service
        self.config = config

    @property
    def port(self) -> int:
        return self.service.ports[0].getHost().port

    @property
    def ports(self) -> list[int]:
        return [p.getHost().port for p in self.service.ports]

    def maildir(self, mailbox: str, domain: str = "example.test") -> Path:
        return self.config.paths.mail / domain / mailbox

    def messages(self, mailbox: str, domain: str = "example.test", folder: str = "") -> list[bytes]:
        """Contents of ``new/`` (of a Maildir++ folder like ``.Junk`` if given), oldest first."""
        new = self.maildir(mailbox, domain) / folder / "new"
        if not new.is_dir():
            return []
        names = sorted(os.listdir(new), key=_delivery_order)
        return [(new / n).read_bytes() for n in names]

    def all_messages(self) -> list[Path]:
        root = self.config.paths.mail
        return sorted(p for p in root.rglob("*") if p.parent.name == "new" and p.is_file())

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.service.stopService)


def start_server(testcase: Any, overrides: dict[str, Any] | None = None) -> RunningServer:
    """Start mailx in-process for ``testcase`` (a trial TestCase); stopped at cleanup."""
    from mailx.config import load_config
    from mailx.service import MailxService

    directory = Path(testcase.mktemp()).absolute()
    config = load_config(write_config(directory, overrides))
    service = MailxService(config)
    service.startService()
    server = RunningServer(service, config)
    testcase.addCleanup(server.stop)
    return server


def send_mail(
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    host: str = "127.0.0.1",
) -> defer.Deferred:
    """smtplib in a thread (it blocks); fires with sendmail()'s refused dict."""
    import smtplib

    def send() -> dict[str, Any]:
        with smtplib.SMTP(host, port, timeout=30) as client:
            return client.sendmail(sender, list(recipients), message)

    return deferToThread(send)


class LineClient:
    """A raw, blocking SMTP client for dialogue tests: exact bytes out, replies in."""

    def __init__(self, port: int, host: str = "127.0.0.1", proxy_from: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        if proxy_from is not None:
            family = "TCP6" if ":" in proxy_from else "TCP4"
            local = "::1" if family == "TCP6" else "127.0.0.1"
            self.sock.sendall(f"PROXY {family} {proxy_from} {local} 40000 25\r\n".encode())
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        """One whole (possibly multi-line) reply: its code and the text of its lines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed while waiting for a reply")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def command(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        return self.file.read() == b""

    def close(self) -> None:
        """Hang up (the file from makefile() would otherwise keep the socket open)."""
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def dialogue(
    port: int, script: Sequence[bytes], proxy_from: str | None = None
) -> list[tuple[int, bytes]]:
    """The banner, then one reply per line of ``script``; blocking (run it in a thread).

    A script line may hold a whole message ending in "." (its lines joined
    by CRLF): it is one write and gets one reply.
    """
    client = LineClient(port, proxy_from=proxy_from)
    try:
        out = [client.reply()]
        for line in script:
            out.append(client.command(line))
        return out
    finally:
        client.close()


def capture_log(testcase: Any) -> list[str]:
    """The formatted text of every log event from now to the end of ``testcase``."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        lines.append(text)

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]  # a plain callable is an observer
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def bystander_seconds(port: int, proxy_from: str | None = None) -> float:
    """How long another client waits for the banner and a NOOP (blocking): the
    oracle that a hostile session is not stalling the server."""
    start = time.monotonic()
    client = LineClient(port, proxy_from=proxy_from)
    try:
        client.reply()
        code, _ = client.command(b"NOOP")
        if code != 250:
            raise AssertionError(f"NOOP answered {code}")
    finally:
        client.close()
    return time.monotonic() - start


def hostile_message(
    port: int,
    content: bytes,
    *,
    mail_from: str = "someone@sender.test",
    rcpt: str = "alice@example.test",
    proxy_from: str | None = None,
    chunk: int | None = None,
) -> tuple[tuple[int, bytes], float]:
    """Send ``content`` as one message (blocking), in writes of ``chunk`` octets if
    given; until its reply comes, bystanders come one after another and are
    timed.  Returns the reply to the final dot and the longest bystander wait."""
    client = LineClient(port, proxy_from=proxy_from)
    try:
        client.reply()
        for line in (b"EHLO hostile.test", f"MAIL FROM:<{mail_from}>".encode(),
                     f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            client.command(line)
        data = content.rstrip(b"\r\n") + b"\r\n.\r\n"
        if chunk is None:
            client.send(data)
        else:
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for at in range(0, len(data), chunk):
                client.send(data[at : at + chunk])
        import threading

        answer: list[Any] = []
        reader = threading.Thread(target=lambda: answer.append(client.reply()), daemon=True)
        reader.start()
        other = "198.51.100.200" if proxy_from else None
        waits = [bystander_seconds(port, other)]
        while reader.is_alive():
            waits.append(bystander_seconds(port, other))
        reader.join()
        if not answer:
            raise ConnectionError("no reply to the message")
        return answer[0], max(waits)
    finally:
        client.close()


def in_thread(func: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
    return deferToThread(func, *args, **kwargs)


def message(subject: str = "test", body: str = "Hello.\r\n", sender: str = "someone@sender.test") -> bytes:
    return textwrap.dedent(
        f"""\
        From: {sender}\r
        To: alice@example.test\r
        Subject: {subject}\r
        Message-ID: <{subject.replace(' ', '.')}@sender.test>\r
        \r
        """
    ).encode() + body.encode()


# twistd of this interpreter, whatever PATH says (``python -m twisted`` is ``twist``).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ServerProcess:
    """``twistd -n mailx`` as a child process, for crash and start-up tests."""

    def __init__(self, config_path: Path, port: int, twistd_args: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.port = port
        self.twistd_args = tuple(twistd_args)  # before "mailx": --uid, --gid
        self.log_path = config_path.parent / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*TWISTD, "--nodaemon", "--pidfile=", *self.twistd_args, "mailx",
             "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailx exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mailx did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def _delivery_order(name: str) -> tuple[int, int, str]:
    """Maildir names ``<sec>.M<usec>…`` in time order: the microseconds are
    not zero-padded (neither are Dovecot's), so plain sorting misorders them."""
    sec, _, rest = name.partition(".")
    usec = rest[1:].split("P", 1)[0] if rest.startswith("M") else ""
    return (int(sec) if sec.isdigit() else 0, int(usec) if usec.isdigit() else 0, name)

