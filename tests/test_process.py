# -*- test-case-name: tests.test_process -*-
"""``twistd mailx`` as users run it: start-up errors and memory under a 50 MiB message."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from mailx.testing.server import TWISTD, LineClient, ServerProcess, free_port, write_config

MiB = 1024 * 1024


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class StartupErrorTests(unittest.TestCase):
    def run_twistd(self, config_text: str) -> subprocess.CompletedProcess[str]:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "mailx.yaml").write_text(config_text)
        return subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx", "--config", "mailx.yaml"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_bad_config_exits_1_with_one_line_per_problem(self) -> None:
        result = self.run_twistd(
            "hostname: mx.example.test\n"
            "limits:\n"
            "  message_sise: 10MiB\n"
            "domains:\n"
            "  example.test:\n"
            "    mailboxes: [alice]\n"
            "    aliases:\n"
            "      postmaster: alice\n"
            "      sales: bobb\n"
        )
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertIn("mailx.yaml:3: limits.message_sise", result.stderr)
        self.assertIn("mailx.yaml:9: domains.example.test.aliases.sales", result.stderr)

    def test_port_in_use_fails_start_up(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        result = self.run_twistd(
            "hostname: mx.example.test\n"
            f"listen:\n  smtp: ['tcp:{port}:interface=127.0.0.1']\n"
            "domains:\n  example.test:\n    mailboxes: [postmaster]\n"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"cannot listen on tcp:{port}", result.stdout + result.stderr)


class MemoryTests(unittest.TestCase):
    timeout = 300

    def test_50_mib_message_grows_memory_by_less_than_10_mib(self) -> None:
        self.check_memory_growth()

    def test_50_mib_signed_message_grows_memory_by_less_than_10_mib(self) -> None:
        """DKIM hashes the spooled body as it reads it (security review, issue 9)."""
        signatures = b"".join(
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test;"
            b" s=s%d; h=from:subject; bh=%s; b=AAAA\r\n" % (n, b"A" * 43 + b"=")
            for n in range(3)
        )
        self.check_memory_growth(
            {"authentication": {"spf": False, "dkim": True, "dmarc": "off"}},
            header=signatures + b"From: big@sender.test\r\n",
        )

    def check_memory_growth(self, overrides: dict | None = None, header: bytes = b"") -> None:
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        config = write_config(
            directory,
            {
                "listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]},
                "limits": {"message_size": "60MiB"},
                **(overrides or {}),
            },
        )
        server = ServerProcess(config, port)
        server.start()
        self.addCleanup(server.kill)
        line = b"M" * 76 + b"\r\n"
        lines_per_chunk = 8192
        chunk = line * lines_per_chunk
        chunks = (50 * MiB) // len(chunk) + 1

        def send(message_chunks: int) -> tuple[int, bytes]:
            client = LineClient(port)
            try:
                client.reply()
                for command in (b"EHLO c.test", b"MAIL FROM:<big@sender.test>",
                                b"RCPT TO:<alice@example.test>", b"DATA"):
                    client.command(command)
                client.send(header + b"Subject: big\r\n\r\n")
                for _ in range(message_chunks):
                    client.send(chunk)
                client.send(b".\r\n")
                return client.reply()
            finally:
                client.close()

        self.assertEqual(send(1)[0], 250)  # warm up: thread pool, imports, buffers
        before = memory_kib(server.proc.pid, "VmRSS")
        code, _ = send(chunks)
        self.assertEqual(code, 250)
        peak = memory_kib(server.proc.pid, "VmHWM")
        growth_mib = (peak - before) / 1024
        self.assertLess(growth_mib, 10, f"peak RSS grew by {growth_mib:.1f} MiB")
        biggest = max((directory / "mail/example.test/alice/new").iterdir(), key=lambda p: p.stat().st_size)
        with biggest.open("rb") as stored:
            body_lines = sum(1 for stored_line in stored if stored_line == b"M" * 76 + b"\n")
        self.assertEqual(body_lines, chunks * lines_per_chunk)

    def test_50_mib_of_unread_noops_grow_memory_by_less_than_20_mib(self) -> None:
        """Issue 9 item 11: a client pipelines NOOPs and never reads a reply.

        Without flow control the replies piled up in the server (RSS 56 ->
        494 MiB); the session now stops reading while its replies are unread.
        The junk-command limit, which would end this at the 101st NOOP, is
        raised so that it is the flow control that is measured.
        """
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        config = write_config(
            directory,
            {
                "listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]},
                "limits": {"junk_commands": 10**9},
            },
        )
        server = ServerProcess(config, port)
        server.start()
        self.addCleanup(server.kill)
        warm = LineClient(port)
        warm.reply()
        self.assertEqual(warm.command(b"NOOP")[0], 250)
        warm.close()
        before = memory_kib(server.proc.pid, "VmRSS")
        flood = b"NOOP\r\n" * (MiB // 6)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(1)
        sent = 0
        deadline = time.monotonic() + 20
        try:
            while sent < 50 * MiB and time.monotonic() < deadline:
                try:
                    sent += sock.send(flood)
                except TimeoutError:
                    pass  # the server stopped reading
            peak = memory_kib(server.proc.pid, "VmHWM")
            # Meanwhile another client is served.
            other = LineClient(port)
            started = time.monotonic()
            other.reply()
            self.assertEqual(other.command(b"NOOP")[0], 250)
            self.assertLess(time.monotonic() - started, 5)
            other.close()
        finally:
            sock.close()
        growth_mib = (peak - before) / 1024
        self.assertLess(growth_mib, 20, f"peak RSS grew by {growth_mib:.1f} MiB ({sent / MiB:.0f} MiB sent)")
