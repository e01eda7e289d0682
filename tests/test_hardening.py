# -*- test-case-name: tests.test_hardening -*-
"""Hostile configuration, full disks, power loss, terminal escapes: the running server."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailx import service as service_module
from mailx.admin import cli
from mailx.inbound import spool
from mailx.smtp import server as server_module
from mailx.storage import maildir, writer
from mailx.storage.queue import Queue
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.server import (
    TWISTD,
    LineClient,
    bystander_seconds,
    capture_log,
    in_thread,
    message,
    send_mail,
    start_server,
    write_config,
)
from mailx.testing.sink import start_sink
from tests.test_config import BOMB
from tests.test_forwarding import ZONES, config_overrides, original, wait_until


def bombed(config_path: Path) -> None:
    """Put a YAML alias bomb at the top of a configuration file."""
    config_path.write_text(BOMB + config_path.read_text())


class ConfigBombTests(unittest.TestCase):
    """A 400-byte file that expands to 9^9 values: refused at once, everywhere it is read."""

    def test_startup_refuses_it_with_one_line(self) -> None:
        config = write_config(Path(self.mktemp()).absolute())
        bombed(config)
        start = time.monotonic()
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx", "--config", str(config)],
            capture_output=True, text=True, timeout=120, cwd=config.parent,
        )  # fmt: skip
        self.assertLess(time.monotonic() - start, 60)  # generous; 41 s of CPU before
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn(f"{config}: expands to more than 200000 values", output)
        self.assertNotIn("Traceback", output)

    def test_mailxctl_check_refuses_it(self) -> None:
        config = write_config(Path(self.mktemp()).absolute())
        bombed(config)
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "check", "-c", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"{config}: expands to more than 200000 values"
                         " (YAML aliases to aliases?)\n")  # fmt: skip

    @defer.inlineCallbacks
    def test_reload_refuses_it_and_keeps_serving(self) -> None:
        server = start_server(self)
        bombed(server.config.source)
        ok = yield server.service.reload_in_thread()
        self.assertFalse(ok)
        yield send_mail(server.port, "s@sender.test", ["bob@example.test"], message())
        self.assertEqual(len(server.messages("bob")), 1)

    @defer.inlineCallbacks
    def test_reload_that_cannot_make_a_maildir_is_refused(self) -> None:
        server = start_server(self)
        config = yaml.safe_load(server.config.source.read_text())
        config["domains"]["example.test"]["mailboxes"].append("carol")
        server.config.source.write_text(yaml.safe_dump(config))
        (server.config.paths.mail / "example.test" / "carol").write_text("in the way")
        self.assertFalse((yield server.service.reload_in_thread()))
        self.assertNotIn("carol", server.service.config.domains["example.test"].mailboxes)
        yield send_mail(server.port, "s@sender.test", ["bob@example.test"], message())
        self.assertEqual(len(server.messages("bob")), 1)

    @defer.inlineCallbacks
    def test_reload_parses_off_the_reactor_while_clients_are_served(self) -> None:
        # A parse that takes as long as the test wants: another client is
        # served from start to end while it runs (SIGHUP used to parse on the
        # reactor thread, so every session waited for the file).
        server = start_server(self)
        release = threading.Event()
        real = service_module.load_config

        def slow_load(path: object) -> object:
            release.wait(30)
            return real(path)

        self.patch(service_module, "load_config", slow_load)
        reloading = server.service.reload_in_thread()
        finished: list[object] = []
        reloading.addBoth(lambda result: finished.append(result) or result)
        try:
            yield send_mail(server.port, "s@sender.test", ["alice@example.test"], message())
            self.assertEqual(finished, [])  # served while the file was being read
        finally:
            release.set()
        ok = yield reloading
        self.assertTrue(ok)
        self.assertEqual(len(server.messages("alice")), 1)

    @defer.inlineCallbacks
    def test_reload_writes_its_verdict_off_the_reactor_while_clients_are_served(self) -> None:
        # The verdict file for `mailxctl reload`: a write on a stalled disk
        # must not hold up the sessions either.
        server = start_server(self)
        release = threading.Event()
        self.addCleanup(release.set)
        real = server.service._write_reload_status

        def slow_write(status: dict) -> None:
            release.wait(30)
            real(status)

        self.patch(server.service, "_write_reload_status", slow_write)
        reloading = server.service.reload_in_thread()
        finished: list[object] = []
        reloading.addBoth(lambda result: finished.append(result) or result)
        try:
            yield send_mail(server.port, "s@sender.test", ["alice@example.test"], message())
            self.assertEqual(finished, [])  # served while the verdict was being written
        finally:
            release.set()
        self.assertTrue((yield reloading))
        self.assertEqual(service_module.read_reload_status(server.config)["generation"], 1)



class _FullDisk(io.RawIOBase):
    """A spool file on a full disk: every write to the OS fails with ENOSPC.

    A mock at the OS boundary: a really full file system cannot be made
    safely (or unprivileged) in a test run, and this fails exactly where a
    full disk does, when the buffered file hands its bytes to the kernel.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class SpoolFullTests(unittest.TestCase):
    """ENOSPC in the incoming spool: 451 4.3.0, the session goes on, nothing is left."""

    def setUp(self) -> None:
        self.server = start_server(self)
        self.failing = 1  # spool files that land on the "full disk"
        real = spool._open_spool_file

        def open_spool_file(path: Path) -> Any:
            file = real(path)
            if self.failing <= 0:
                return file
            self.failing -= 1
            return io.BufferedWriter(_FullDisk(os.dup(file.fileno())), spool.READ_CHUNK)

        self.patch(spool, "_open_spool_file", open_spool_file)

    def session(self, size: int) -> list[tuple[int, bytes]]:
        """A message of ``size`` bytes that fails, then RSET and one that succeeds."""
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000) + b"."
        client = LineClient(self.server.port)
        try:
            out = [client.reply(), client.command(b"EHLO c.test")]
            for subject in (b"big", b"small"):
                out.append(client.command(b"MAIL FROM:<s@sender.test>"))
                out.append(client.command(b"RCPT TO:<bob@example.test>"))
                out.append(client.command(b"DATA"))
                out.append(client.command(body if subject == b"big" else message("small").rstrip(b"\r\n") + b"\r\n."))
                out.append(client.command(b"RSET"))
            out.append(client.command(b"QUIT"))
            return out
        finally:
            client.close()

    def left_over(self) -> list[str]:
        """Files anywhere in the incoming spool or a Maildir's tmp/."""
        roots = [self.server.config.paths.spool / "incoming", self.server.config.paths.mail]
        return [
            str(p) for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and (root.name == "incoming" or p.parent.name == "tmp")
        ]  # fmt: skip

    @defer.inlineCallbacks
    def check(self, size: int) -> Any:
        replies = yield in_thread(self.session, size)
        codes = [code for code, _ in replies]
        self.assertEqual(codes[:7], [220, 250, 250, 250, 354, 451, 250])
        self.assertIn(b"4.3.0", replies[5][1])
        self.assertEqual(codes[7:], [250, 250, 354, 250, 250, 221])
        self.assertEqual([m.split(b"Subject: ")[1][:5] for m in self.server.messages("bob")], [b"small"])
        # Another client, meanwhile and after: served.
        yield send_mail(self.server.port, "s@sender.test", ["alice@example.test"], message())
        self.assertEqual(len(self.server.messages("alice")), 1)
        self.assertEqual(self.left_over(), [])

    def test_enospc_while_writing_mid_data_is_451_and_the_session_goes_on(self) -> None:
        # 2 MiB: the file's 1 MiB buffer goes to the kernel during DATA.
        return self.check(2 * 1024 * 1024)

    def test_enospc_when_closing_the_spool_file_is_451_and_the_session_goes_on(self) -> None:
        # 600 KiB: spilled to a file, but its buffer meets the kernel only at close.
        return self.check(600 * 1024)


class SpoolStalledDiskTests(unittest.TestCase):
    """A spool disk that stalls holds up the message being spooled, not the server.

    The stall is a blocking call at the OS boundary (the spool file's open
    waits for an event): the test cannot make a real disk stall.  On the
    reactor thread it would freeze every session; in the disk pool only the
    one message waits.
    """

    BYSTANDER_SECONDS = 5.0  # generous: a frozen reactor waits out the whole stall

    def setUp(self) -> None:
        self.server = start_server(self)
        self.stalled = threading.Event()  # a spool file operation is waiting for the disk
        self.disk_back = threading.Event()
        self.sent = threading.Event()  # the whole message is with the server
        self.addCleanup(self.disk_back.set)
        real = spool._open_spool_file

        def open_spool_file(path: Path) -> Any:
            self.stalled.set()
            self.disk_back.wait(30)
            return real(path)

        self.patch(spool, "_open_spool_file", open_spool_file)

    def big_message(self, size: int) -> tuple[int, bytes]:
        """Send a message of about ``size`` octets to bob; the reply to its end of data."""
        client = LineClient(self.server.port)
        try:
            client.reply()
            for command in (b"EHLO big.test", b"MAIL FROM:<s@sender.test>", b"RCPT TO:<bob@example.test>", b"DATA"):
                client.command(command)
            client.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000))
            client.send(b".\r\n")
            self.sent.set()
            return client.reply()
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_other_sessions_are_served_while_the_spool_disk_stalls(self) -> None:
        reply = in_thread(self.big_message, 2 * spool.SPILL_AT)
        yield in_thread(self.stalled.wait, 10)
        self.assertTrue(self.stalled.is_set())
        waited = yield in_thread(bystander_seconds, self.server.port)
        self.assertLess(waited, self.BYSTANDER_SECONDS)
        refused = yield send_mail(self.server.port, "s@sender.test", ["alice@example.test"], message())
        self.assertEqual(refused, {})
        self.assertFalse(reply.called)  # the big one still waits for its disk
        self.disk_back.set()
        code, _ = yield reply
        self.assertEqual(code, 250)
        [stored] = self.server.messages("bob")
        self.assertEqual(stored.count(b"x" * 998), 2 * spool.SPILL_AT // 1000)
        incoming = self.server.config.paths.spool / "incoming"
        # The spool file is removed in the disk pool, after the reply.
        yield wait_until(lambda: not list(incoming.iterdir()), timeout=5)
        self.assertEqual(list(incoming.iterdir()), [])

    @defer.inlineCallbacks
    def test_a_disk_slow_for_a_moment_stops_the_reading_not_the_message(self) -> None:
        # Far more than MAX_BACKLOG arrives while the disk is away: the session
        # stops reading at HIGH_WATER (the rest waits in TCP's window) and
        # the message is whole once the disk is back.
        size = spool.MAX_BACKLOG + 4 * spool.SPILL_AT
        reply = in_thread(self.big_message, size)
        yield in_thread(self.stalled.wait, 10)
        sessions = self.server.service.factory.sessions

        def paused() -> list:
            return [s for s in sessions if s._reading_paused and s._message is not None]

        yield wait_until(paused, timeout=10)
        [session] = paused()
        body = session._message.body
        self.assertLessEqual(body._held, spool.HIGH_WATER + 4 * 1024 * 1024)
        waited = yield in_thread(bystander_seconds, self.server.port)
        self.assertLess(waited, self.BYSTANDER_SECONDS)
        self.disk_back.set()
        code, _ = yield reply
        self.assertEqual(code, 250)
        [stored] = self.server.messages("bob")
        self.assertEqual(stored.count(b"x" * 998), size // 1000)

    @defer.inlineCallbacks
    def test_a_disk_stalled_past_spool_stall_is_refused_with_451(self) -> None:
        self.patch(server_module, "SPOOL_STALL", 1.0)
        lines = capture_log(self)
        reply = in_thread(self.big_message, spool.MAX_BACKLOG + 2 * spool.SPILL_AT)
        yield in_thread(self.stalled.wait, 10)

        def refused_while_stalled() -> bool:
            sessions = self.server.service.factory.sessions
            bodies = [getattr(m, "body", None) for s in sessions for m in (s._message, s._finishing)]
            return any(body is not None and body.error is not None for body in bodies)

        # Decided while the disk is still stalled: memory is what bounds it.
        yield wait_until(refused_while_stalled, timeout=30)
        self.assertTrue(self.stalled.is_set() and not self.disk_back.is_set())
        self.disk_back.set()
        code, text = yield reply
        self.assertEqual((code, text[:5]), (451, b"4.3.0"))
        self.assertTrue(any("behind the client" in line for line in lines))
        self.assertEqual(self.server.messages("bob"), [])
        self.assertEqual(list((self.server.config.paths.spool / "incoming").iterdir()), [])


class FsyncRecorder:
    """``os.fsync`` that notes which directories it synced, in order, then syncs.

    A mock at the OS boundary: a power cut cannot be simulated in a test
    (a kill -9 keeps the page cache, so it cannot show a missing directory
    fsync); the call pattern is what can be checked.
    """

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.directories: list[Path] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                self.directories.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        testcase.patch(os, "fsync", fsync)


class DirectoryDurabilityTests(unittest.TestCase):
    """Every directory mailx makes has its parent fsynced before a message in it is answered."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.box = self.root / "example.test" / "alice"

    def request(self, number: int, folder: str | None) -> tuple[dict[str, Any], bytes]:
        head = b"Delivered-To: alice@example.test\n"
        copy = {"maildir": str(self.box), "name": f"m{number}", "folder": folder, "head": len(head)}
        return {"id": number, "copies": [copy]}, head + b"Subject: x\r\n\r\nbody\r\n"

    def test_new_mailbox_directories_are_synced_into_their_parents(self) -> None:
        fsyncs = FsyncRecorder(self)
        maildir.ensure_maildir(self.box)
        domain = self.box.parent
        # example.test into the root, alice into example.test, tmp/new/cur into alice.
        self.assertEqual(fsyncs.directories, [self.root, domain, self.box, self.box, self.box])

    def test_first_junk_message_syncs_the_new_folder_before_it_is_answered(self) -> None:
        maildir.ensure_maildir(self.box)
        fsyncs = FsyncRecorder(self)
        [(answer, _)] = writer.decode_all(bytearray(writer.commit([self.request(1, ".Junk")])))
        self.assertIn("paths", answer)
        junk = self.box / ".Junk"
        # .Junk into the mailbox; tmp, new, cur and the maildirfolder marker into
        # .Junk; then the message's rename into .Junk/new, the last before the answer.
        self.assertEqual(fsyncs.directories, [self.box, junk, junk, junk, junk, junk / "new"])

    def test_later_messages_sync_only_new(self) -> None:
        maildir.ensure_maildir(self.box)
        writer.commit([self.request(1, ".Junk")])
        fsyncs = FsyncRecorder(self)
        writer.commit([self.request(2, ".Junk"), self.request(3, None)])
        self.assertEqual(sorted(fsyncs.directories), sorted([self.box / ".Junk" / "new", self.box / "new"]))

    def test_a_mailbox_made_at_first_delivery_is_synced(self) -> None:
        # write_message makes a missing Maildir itself (a mailbox removed by hand).
        fsyncs = FsyncRecorder(self)
        maildir.write_message(self.box, "m1", [b"Subject: x\n\nbody\n"])
        self.assertEqual(fsyncs.directories[:3], [self.root, self.box.parent, self.box])
        self.assertEqual(fsyncs.directories[-1], self.box / "new")

    def test_spool_and_queue_directories_are_synced(self) -> None:
        fsyncs = FsyncRecorder(self)
        spool_root = self.root / "spool"
        Queue(spool_root / "queue").prepare()
        maildir.make_directories(spool_root / "incoming")
        self.assertEqual(
            fsyncs.directories,
            [self.root, spool_root, spool_root / "queue", spool_root],
        )

    @defer.inlineCallbacks
    def test_a_mailbox_added_by_reload_is_synced_before_it_is_used(self) -> None:
        server = start_server(self)
        config = yaml.safe_load(server.config.source.read_text())
        config["domains"]["example.test"]["mailboxes"].append("carol")
        server.config.source.write_text(yaml.safe_dump(config))
        fsyncs = FsyncRecorder(self)
        self.assertTrue((yield server.service.reload_in_thread()))
        carol = server.config.paths.mail / "example.test" / "carol"
        self.assertEqual(fsyncs.directories, [carol.parent, carol, carol, carol])
        yield send_mail(server.port, "s@sender.test", ["carol@example.test"], message())
        self.assertEqual(len(server.messages("carol")), 1)


OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # sets the reader's clipboard to "echo pwned"
OSC52_SHOWN = "\\x1b]52;c;ZWNobyBwd25lZA==\\x07"


class TerminalEscapeTests(unittest.TestCase):
    """A remote reply and a Subject carrying OSC 52: escaped in the log and in mailxctl."""

    timeout = 60

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.server = start_server(
            self, config_overrides(self.dns.port, self.sink.port, retry=["1h"])
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def mailxctl(self, *argv: str) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["-c", str(self.server.config.source), *argv]), 0)
        return out.getvalue()

    @defer.inlineCallbacks
    def test_remote_reply_and_subject_are_escaped_everywhere(self) -> None:
        self.sink.script("rcpt", f"451 4.7.1 Greylisted{OSC52}\x9b2J\u202e")
        yield send_mail(
            self.server.port, "alice@sender.test", ["boss@example.test"],
            original(subject=f"invoice{OSC52}"),
        )  # fmt: skip
        outbound = self.server.service.outbound
        yield wait_until(
            lambda: any(
                e.envelope.recipients[0].attempts == 1 and not e.busy
                for e in outbound._entries.values()
            )
        )
        [queue_id] = outbound._entries
        log = "\n".join(formatEvent(e) for e in self.events)
        self.assertIn(f"Greylisted{OSC52_SHOWN}\\x9b2J\\u202e", log)
        for shown in (log, self.mailxctl("queue", "list"), self.mailxctl("queue", "show", queue_id),
                      self.mailxctl("queue", "list", "--json")):  # fmt: skip
            with self.subTest(output=shown[:40]):
                self.assertFalse(any(c in shown for c in "\x1b\x07\x9b\u202e"))
        self.assertIn(f"Greylisted{OSC52_SHOWN}", self.mailxctl("queue", "list"))
        self.assertIn(f"Subject: invoice{OSC52_SHOWN}", self.mailxctl("queue", "show", queue_id))
        # Scripts get the same data back from --json.
        [entry] = json.loads(self.mailxctl("queue", "list", "--json"))["messages"]
        self.assertIn(OSC52, entry["recipients"][0]["last_reply"])
        # Meanwhile, another client is served.
        yield send_mail(self.server.port, "s@sender.test", ["bob@example.test"], message())
        self.assertEqual(len(self.server.messages("bob")), 1)
