# -*- test-case-name: tests.test_lifecycle -*-
"""Reload on SIGHUP, graceful stop on SIGTERM, and running as an unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.trial import unittest

from mailx.testing.server import (
    TWISTD,
    LineClient,
    ServerProcess,
    free_port,
    in_thread,
    message,
    send_mail,
    start_server,
    write_config,
)


def rewrite(server_config_path: Path, change: dict) -> None:
    data = yaml.safe_load(server_config_path.read_text())
    data["domains"]["example.test"].update(change)
    server_config_path.write_text(yaml.safe_dump(data))


class ReloadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = start_server(self)
        self.path = self.server.config.source

    @defer.inlineCallbacks
    def test_valid_reload_applies_to_new_sessions_not_to_open_ones(self) -> None:
        def begin() -> LineClient:
            client = LineClient(self.server.port)
            client.reply()
            client.command(b"EHLO c.test")
            client.command(b"MAIL FROM:<s@sender.test>")
            return client

        open_session = yield in_thread(begin)
        rewrite(self.path, {"mailboxes": ["alice", "carol"], "aliases": {"postmaster": "alice"}})
        self.assertTrue(self.server.service.reload())

        def finish_open_session() -> list[tuple[int, bytes]]:
            out = [open_session.command(b"RCPT TO:<bob@example.test>"),
                   open_session.command(b"DATA"),
                   open_session.command(b"Subject: old rules\r\n\r\nstill bob\r\n.")]
            open_session.close()
            return out

        rcpt, data, done = yield in_thread(finish_open_session)
        self.assertEqual((rcpt[0], data[0], done[0]), (250, 354, 250))
        self.assertEqual(len(self.server.messages("bob")), 1)

        yield send_mail(self.server.port, "s@sender.test", ["carol@example.test"], message("new"))
        self.assertEqual(len(self.server.messages("carol")), 1)
        try:
            yield send_mail(self.server.port, "s@sender.test", ["bob@example.test"], message())
        except smtplib.SMTPRecipientsRefused as e:
            self.assertEqual(e.recipients["bob@example.test"][0], 550)
        else:
            self.fail("bob was accepted after the reload removed him")

    def test_reload_gives_the_outbound_the_new_routing(self) -> None:
        """Notices to our own senders (bounces, DSNs) route as the sessions do:
        one Router per loaded configuration, owned by the delivery context."""
        service = self.server.service
        self.assertIs(service.outbound.router, service.context.router)
        self.assertEqual(service.outbound._notice_route("carol@example.test"), ([], []))
        rewrite(self.path, {"mailboxes": ["alice", "carol"], "aliases": {"postmaster": "alice"}})
        self.assertTrue(service.reload())
        self.assertIs(service.outbound.router, service.context.router)
        mailboxes, forwards = service.outbound._notice_route("carol@example.test")
        self.assertEqual(([m.address for m in mailboxes], forwards), (["carol@example.test"], []))

    @defer.inlineCallbacks
    def test_invalid_reload_keeps_the_old_configuration(self) -> None:
        self.path.write_text(self.path.read_text() + "\nbogus_key: 1\n")
        self.assertFalse(self.server.service.reload())
        yield send_mail(self.server.port, "s@sender.test", ["bob@example.test"], message())
        self.assertEqual(len(self.server.messages("bob")), 1)


    def test_reload_verdict_is_recorded_for_mailxctl(self) -> None:
        from mailx.service import read_reload_status

        start = read_reload_status(self.server.config)
        self.assertEqual((start["generation"], start["ok"]), (0, True))
        # A new domain whose Maildir cannot be made: refused, old configuration kept.
        (self.server.config.paths.mail / "new.test").write_text("a file, not a directory")
        data = yaml.safe_load(self.path.read_text())
        data["domains"]["new.test"] = {"mailboxes": ["x"], "aliases": {"postmaster": "x"}}
        self.path.write_text(yaml.safe_dump(data))
        self.assertFalse(self.server.service.reload())
        status = read_reload_status(self.server.config)
        self.assertEqual((status["generation"], status["ok"]), (1, False))
        self.assertIn("new.test", status["problems"][0])
        self.assertNotIn("new.test", self.server.service.config.domains)


class SignalTests(unittest.TestCase):
    timeout = 240

    def start(self, **overrides: object) -> tuple[ServerProcess, Path]:
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        config = write_config(
            directory, {"listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}, **overrides}
        )
        server = ServerProcess(config, port)
        server.start()
        self.addCleanup(server.kill)
        return server, directory

    def test_mailxctl_reload_sends_sighup(self) -> None:
        server, directory = self.start()
        rewrite(server.config_path, {"mailboxes": ["alice", "bob", "dave"]})
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "-c", str(server.config_path), "reload"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("reloaded", result.stdout)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with smtplib.SMTP("127.0.0.1", server.port) as client:
                client.ehlo("c.test")
                client.mail("s@sender.test")
                if client.rcpt("dave@example.test")[0] == 250:
                    return
            time.sleep(0.1)
        self.fail("the reloaded configuration never took effect")

    def test_mailxctl_reload_reports_the_servers_refusal(self) -> None:
        # A new mailbox whose Maildir the server cannot make: the file passes
        # mailxctl's own check (which cannot know), the server refuses it, and
        # mailxctl must say so.  (A mismatched TLS key, used here before, is
        # now refused by mailxctl's own check: tests.test_tls.)
        server, directory = self.start()
        (directory / "mail" / "example.test").mkdir(parents=True, exist_ok=True)
        (directory / "mail" / "example.test" / "carol").write_text("not a directory\n")
        rewrite(server.config_path, {"mailboxes": ["alice", "bob", "carol"]})
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "-c", str(server.config_path), "reload"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("refused the new configuration and keeps the old one", result.stdout)
        self.assertIn("carol", result.stdout)
        # And the server still serves, with the old configuration.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.ehlo("c.test")
            client.mail("s@sender.test")
            self.assertEqual(client.rcpt("carol@example.test")[0], 550)
            self.assertEqual(client.rcpt("alice@example.test")[0], 250)

    def test_mailxctl_reload_refuses_a_mismatched_tls_key_itself(self) -> None:
        from mailx.testing.tls import make_certificate

        server, directory = self.start()
        cert, _ = make_certificate(directory / "one")
        _, other_key = make_certificate(directory / "two")
        data = yaml.safe_load(server.config_path.read_text())
        data["tls"] = {"certificate": str(cert), "key": str(other_key)}
        server.config_path.write_text(yaml.safe_dump(data))
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "-c", str(server.config_path), "reload"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"tls.key: {other_key} does not match the certificate", result.stderr)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            self.assertEqual(client.ehlo("c.test")[0], 250)
            self.assertNotIn("starttls", client.esmtp_features)

    def test_mailxctl_reload_without_server_exits_1(self) -> None:
        directory = Path(self.mktemp()).absolute()
        config = write_config(directory)
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "-c", str(config), "reload"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("not running", result.stdout)

    def test_sigterm_during_load_loses_nothing_acknowledged(self) -> None:
        server, directory = self.start()
        acknowledged: list[str] = []
        lock = threading.Lock()

        def client(number: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                    for n in range(10_000):
                        tag = f"t{number}n{n}"
                        body = f"Subject: {tag}\r\n\r\nbegin {tag}\r\n" + "z" * 2000 + "\r\nend\r\n"
                        smtp.sendmail("s@sender.test", ["alice@example.test"], body.encode())
                        with lock:
                            acknowledged.append(tag)
            except (OSError, smtplib.SMTPException):
                return

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        while len(acknowledged) < 150:
            time.sleep(0.01)
        started = time.monotonic()
        code = server.terminate(timeout=60)
        stop_seconds = time.monotonic() - started
        for t in threads:
            t.join(30)
        # twistd re-raises SIGTERM on itself once the reactor has stopped.
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertIn("mailx stopped", server.log_path.read_text())
        self.assertLess(stop_seconds, 30)
        maildir = directory / "mail" / "example.test" / "alice"
        stored = {}
        for path in (maildir / "new").iterdir():
            body = path.read_bytes().split(b"\n\n", 1)[1]
            stored[body.split(b"\n", 1)[0].removeprefix(b"begin ").decode()] = body
        self.assertEqual([tag for tag in acknowledged if tag not in stored], [])
        for body in stored.values():
            self.assertTrue(body.endswith(b"\nend\n"))
        self.assertEqual(list((maildir / "tmp").iterdir()), [])
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()

    def test_sigterm_tells_idle_clients_421(self) -> None:
        server, _ = self.start()
        client = LineClient(server.port)
        client.reply()
        client.command(b"EHLO c.test")
        server.proc.send_signal(signal.SIGTERM)
        self.assertEqual(client.reply(), (421, b"4.3.2 Service shutting down, try again later"))
        self.assertIn(server.proc.wait(30), (0, -signal.SIGTERM))
        self.assertIn("mailx stopped", server.log_path.read_text())


def _unprivileged_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def _readable_by_others(path: Path) -> bool:
    """Can a user who is not root import this interpreter's packages?"""
    for parent in [path, *path.parents]:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return True


class PrivilegeTests(unittest.TestCase):
    timeout = 120

    def test_uid_gid_drop_after_binding_a_privileged_port(self) -> None:
        user = _unprivileged_user()
        if os.getuid() != 0 or user is None:
            raise unittest.SkipTest("needs root and a 'nobody' user")
        site = Path(yaml.__file__).resolve().parent
        if not _readable_by_others(site) or not _readable_by_others(Path(sys.executable).resolve()):
            raise unittest.SkipTest(
                f"the Python installation ({site}) is not readable by an unprivileged user here"
            )
        # Not self.mktemp(): trial makes its parent 0700, which the dropped
        # user could not walk through.
        directory = Path(tempfile.mkdtemp(prefix="mailx-uid-"))
        directory.chmod(0o755)
        self.addCleanup(shutil.rmtree, directory, True)
        for port in range(900, 1000):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                    break
                except OSError:
                    continue
        config = write_config(directory, {"listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}})
        os.chown(directory, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            [*TWISTD, "--nodaemon", "--pidfile=", "--uid", str(user.pw_uid), "--gid",
             str(user.pw_gid), "mailx", "--config", str(config)],
            cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(proc.kill)
        deadline = time.monotonic() + 30
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("s@sender.test", ["alice@example.test"], message("uid"))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.fail(proc.stdout.read().decode() if proc.poll() is not None else "no server")
                time.sleep(0.1)
        written = [directory / "mail", directory / "spool", *(directory / "mail").rglob("*")]
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in written}
        self.assertEqual(owners, {(user.pw_uid, user.pw_gid)})
        self.assertEqual(int((directory / "spool" / "mailx.pid").read_text()), proc.pid)
