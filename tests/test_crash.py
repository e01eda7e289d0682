# -*- test-case-name: tests.test_crash -*-
"""kill -9 under load: every message that got 250 is in a Maildir, whole.

The server runs as a real ``twistd mailx`` child process; several client
threads send uniquely numbered messages over their own connections, the
server is killed with SIGKILL mid-stream, restarted, and the Maildir is
compared with the list of acknowledged messages.
"""

from __future__ import annotations

import smtplib
import threading
import time
from pathlib import Path

from twisted.trial import unittest

from mailx.testing.server import ServerProcess, free_port, write_config

CONNECTIONS = 8
KILL_AFTER = 300  # acknowledged messages before the kill
BODY_LINES = 60  # ~4.5 KiB per message: large enough to be mid-write at the kill


def numbered_message(tag: str) -> bytes:
    lines = [f"Subject: {tag}", f"Message-ID: <{tag}@crash.test>", "", f"begin {tag}"]
    lines += [f"{tag} line {n:03d} " + "x" * 60 for n in range(BODY_LINES)]
    lines.append(f"end {tag}")
    return ("\r\n".join(lines) + "\r\n").encode()


def expected_body(tag: str) -> bytes:
    message = numbered_message(tag).replace(b"\r\n", b"\n")
    return message.split(b"\n\n", 1)[1]


class CrashTests(unittest.TestCase):
    timeout = 300

    def test_kill_9_under_load_loses_no_acknowledged_message(self) -> None:
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        config = write_config(directory, {"listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}})
        server = ServerProcess(config, port)
        server.start()
        self.addCleanup(server.kill)

        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(number: int) -> None:
            sent = 0
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    while not stop.is_set():
                        tag = f"c{number}m{sent}"
                        smtp.sendmail("load@sender.test", ["alice@example.test"], numbered_message(tag))
                        with lock:
                            acknowledged.append(tag)
                        sent += 1
            except (OSError, smtplib.SMTPException):
                return  # the kill

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CONNECTIONS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acknowledged) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        with lock:
            survivors = list(acknowledged)
        self.assertGreaterEqual(len(survivors), KILL_AFTER)

        server.start()
        server.terminate()

        maildir = directory / "mail" / "example.test" / "alice"
        stored: dict[str, bytes] = {}
        for path in (maildir / "new").iterdir():
            body = path.read_bytes().split(b"\n\n", 1)[1]
            tag = body.split(b"\n", 1)[0].removeprefix(b"begin ").decode()
            stored[tag] = body
        missing = [tag for tag in survivors if tag not in stored]
        self.assertEqual(missing, [])
        for tag, body in stored.items():
            self.assertEqual(body, expected_body(tag), f"{tag} is not whole")
        self.assertEqual(list((maildir / "tmp").iterdir()), [])
        self.assertEqual(list((directory / "spool" / "incoming").iterdir()), [])
