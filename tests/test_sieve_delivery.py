# -*- test-case-name: tests.test_sieve_delivery -*-
"""Sieve scripts end to end over SMTP: a running mailx files what the script says (SPEC 12).

The outside world is tests.test_forwarding's: the loopback DNS server gives
sender.test and outside.test MX hosts on 127.0.0.1 and the SMTP sink is
both, so redirects, notices and vacation replies are seen as a peer sees
them.  Scripts are real files in Pigeonhole's layout (``sieve/NAME.sieve``
and the ``.dovecot.sieve`` link), written by the test or uploaded through a
private Dovecot's ManageSieve; Dovecot's IMAP then reads what mailx filed.
Vacation memory across ``kill -9`` runs mailx as a twistd subprocess.
"""

from __future__ import annotations

import imaplib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailx.outbound import dkimkeys
from mailx.testing import dovecot
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.server import (
    ServerProcess,
    capture_log,
    free_port,
    send_mail,
    start_server,
    write_config,
)
from mailx.testing.sink import start_sink
from tests.test_forwarding import ZONES, ForwardingCase, config_overrides, original, wait_until


def to_alice(subject: str = "hello", *extra: str, message_id: str | None = None) -> bytes:
    """A message addressed to alice in its header (vacation answers only those, RFC 5230 4.5)."""
    return (
        "From: Carol <carol@sender.test>\r\n"
        "To: alice@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id or subject.replace(' ', '.')}@sender.test>\r\n"
        + "".join(f"{line}\r\n" for line in extra)
        + "\r\nHello Alice.\r\n"
    ).encode()


def activate(home: Path, script: str, name: str = "main") -> Path:
    """The script active in ``home`` as ManageSieve leaves it."""
    (home / "sieve").mkdir(parents=True, exist_ok=True)
    path = home / "sieve" / f"{name}.sieve"
    path.write_text(script)
    link = home / ".dovecot.sieve"
    if not link.is_symlink():
        os.symlink(f"sieve/{name}.sieve", link)
    return path


def filter_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if ": filter of " in line]


VACATION = 'require "vacation";\nvacation :days 1 :subject "Away" "I am away until Monday.";\n'


class SieveOverSMTPTests(ForwardingCase):
    def setUp(self) -> None:
        super().setUp()
        self.lines = capture_log(self)

    def activate(self, mailbox: str, script: str) -> Path:
        return activate(self.server.maildir(mailbox), script)

    @defer.inlineCallbacks
    def test_fileinto_a_nested_folder_with_flags(self) -> None:
        self.activate("alice", 'require ["fileinto", "imap4flags"];\n'
                      'fileinto :flags ["\\\\Seen", "\\\\Flagged"] "A/B";\n')
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], to_alice("sorted"))
        folder = self.server.maildir("alice") / ".A.B"
        self.assertTrue((folder / "maildirfolder").is_file())
        [name] = os.listdir(folder / "cur")
        self.assertTrue(name.endswith(":2,FS"), name)
        self.assertIn(b"Subject: sorted\n", (folder / "cur" / name).read_bytes())
        self.assertEqual(self.server.messages("alice"), [])
        [line] = filter_lines(self.lines)
        self.assertRegex(line, r"^\S+: filter of alice@example\.test: fileinto A\.B flags=FS$")

    @defer.inlineCallbacks
    def test_redirect_goes_through_the_queue_with_srs_and_copy_keeps_one(self) -> None:
        self.activate("alice", 'require "copy";\nredirect :copy "r1@outside.test";\n')
        self.activate("bob", 'redirect "r2@outside.test";\n')
        yield send_mail(self.server.port, "carol@sender.test", ["team@example.test"], original("redirected"))
        yield wait_until(lambda: sum(len(m.recipients) for m in self.sink.accepted) == 2)
        self.assertEqual(
            sorted(r for m in self.sink.accepted for r in m.recipients), ["r1@outside.test", "r2@outside.test"]
        )
        for redirect in self.sink.accepted:
            self.assertRegex(redirect.mail_from, r"^SRS0=[^=]+=[^=]+=sender\.test=carol@example\.test$")
            self.assertIn(b"Subject: redirected\r\n", redirect.data)
        self.assertEqual(len(self.server.messages("alice")), 1)  # :copy
        self.assertEqual(self.server.messages("bob"), [])
        self.assertEqual(
            sorted(re.sub(r"^\S+: ", "", line) for line in filter_lines(self.lines)),
            ["filter of alice@example.test: keep INBOX",
             "filter of alice@example.test: redirect r1@outside.test",
             "filter of bob@example.test: redirect r2@outside.test"],
        )

    @defer.inlineCallbacks
    def test_a_message_that_was_here_before_is_not_redirected_again(self) -> None:
        self.activate("alice", 'redirect "r1@outside.test";\n')
        looped = b"Delivered-To: alice@example.test\r\n" + original("again")
        # Alone: refused as a loop (RFC 5321 6.3), nothing redirected.
        with self.assertRaises(Exception) as caught:
            yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], looped)
        self.assertEqual(caught.exception.smtp_code, 554)
        self.assertIn(b"5.4.6", caught.exception.smtp_error)
        # With another recipient: bob gets it, alice's script does not run.
        yield send_mail(self.server.port, "carol@sender.test", ["team@example.test"], looped)
        self.assertEqual(len(self.server.messages("bob")), 1)
        self.assertEqual(self.queued(), [])
        self.assertEqual(filter_lines(self.lines), [])
        self.assertEqual(self.sink.accepted, [])

    @defer.inlineCallbacks
    def test_reject_by_the_only_recipient_is_550_at_end_of_data(self) -> None:
        self.activate("bob", 'require "reject";\nreject "Bob does not want this";\n')
        with self.assertRaises(Exception) as caught:
            yield send_mail(self.server.port, "carol@sender.test", ["bob@example.test"], original())
        self.assertEqual((caught.exception.smtp_code, caught.exception.smtp_error),
                         (550, b"5.7.1 Bob does not want this"))
        self.assertEqual(self.server.all_messages(), [])
        self.assertEqual(self.queued(), [])
        [line] = filter_lines(self.lines)
        self.assertTrue(line.endswith("filter of bob@example.test: reject Bob does not want this"), line)

    @defer.inlineCallbacks
    def test_reject_by_one_of_two_is_one_notice_and_none_to_the_null_sender(self) -> None:
        self.activate("bob", 'require "reject";\nreject "not for me";\n')
        yield send_mail(self.server.port, "carol@sender.test", ["team@example.test"], original("first"))
        self.assertEqual(len(self.server.messages("alice")), 1)
        self.assertEqual(self.server.messages("bob"), [])
        [notice] = yield self.sink.wait_for(1)
        self.assertEqual((notice.mail_from, notice.recipients), ("", ["carol@sender.test"]))
        self.assertIn(b"report-type=disposition-notification", notice.data)
        self.assertIn(b"not for me", notice.data)
        yield wait_until(lambda: self.queued() == [])
        # From <>: filed for alice, no notice queued at all.
        yield send_mail(self.server.port, "", ["team@example.test"], original("bounce"))
        self.assertEqual(len(self.server.messages("alice")), 2)
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(self.sink.accepted), 1)

    @defer.inlineCallbacks
    def test_discard_is_logged_and_files_nothing(self) -> None:
        self.activate("alice", "discard;\n")
        refused = yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original())
        self.assertEqual(refused, {})
        self.assertEqual(self.server.all_messages(), [])
        [line] = filter_lines(self.lines)
        self.assertTrue(line.endswith("filter of alice@example.test: discard"), line)

    @defer.inlineCallbacks
    def test_a_script_changed_on_disk_applies_to_the_next_message(self) -> None:
        script = self.activate("alice", 'require "fileinto";\nfileinto "First";\n')
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original("one"))
        # The same size and inode: only the modification time tells them apart.
        script.write_text('require "fileinto";\nfileinto "Other";\n')
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original("two"))
        self.assertEqual(len(self.server.messages("alice", folder=".First")), 1)
        [second] = self.server.messages("alice", folder=".Other")
        self.assertIn(b"Subject: two\n", second)


class VacationOverSMTPTests(ForwardingCase):
    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        key = dkimkeys.generate_key("rsa")
        key_path = dkimkeys.write_key(key, Path(self.mktemp()).absolute() / "example.test.key")
        self.dns.set("mx1._domainkey.example.test", "TXT", [dkimkeys.dns_record(key)])
        overrides = config_overrides(self.dns.port, self.sink.port)
        overrides["domains"]["example.test"]["dkim"] = {"selector": "mx1", "key": str(key_path)}
        self.server = start_server(self, overrides)
        self.queue_dir = self.server.config.paths.spool / "queue"
        self.lines = capture_log(self)
        activate(self.server.maildir("alice"), VACATION)

    def verify_dkim(self, message: bytes) -> bool:
        """dkimpy, its key looked up in the loopback DNS (blocking)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], self.dns.port

        def txt(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
            return b"".join(b"".join(r.strings) for r in answer)

        return dkim.verify(message, dnsfunc=txt)

    @defer.inlineCallbacks
    def test_one_signed_reply_from_the_null_sender_per_period(self) -> None:
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], to_alice("lunch", message_id="m1"))
        [reply] = yield self.sink.wait_for(1)
        self.assertEqual((reply.mail_from, reply.recipients), ("", ["carol@sender.test"]))
        head = reply.data.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"\r\nAuto-Submitted: auto-replied", head)
        self.assertIn(b"\r\nIn-Reply-To: <m1@sender.test>", head)
        self.assertIn(b"Subject: Away", head)
        self.assertIn(b"d=example.test", head)
        verified = yield deferToThread(self.verify_dkim, reply.data)
        self.assertTrue(verified)
        self.assertEqual(len(self.server.messages("alice")), 1)
        memory = self.server.maildir("alice") / ".mailx.vacation"
        yield wait_until(memory.exists)
        # The same sender again: filed, not answered.
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], to_alice("again", message_id="m2"))
        self.assertEqual(len(self.server.messages("alice")), 2)
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(self.sink.accepted), 1)
        self.assertTrue(any("already got one this period" in line for line in self.lines))
        vacations = [line for line in filter_lines(self.lines) if ": vacation " in line]
        self.assertEqual(len(vacations), 1)
        self.assertTrue(vacations[0].endswith("filter of alice@example.test: vacation carol@sender.test"))

    @defer.inlineCallbacks
    def test_no_reply_to_a_list_message_bulk_or_the_null_sender(self) -> None:
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"],
                        to_alice("digest", "List-Id: <dev.lists.sender.test>"))
        yield send_mail(self.server.port, "dave@sender.test", ["alice@example.test"],
                        to_alice("offer", "Precedence: bulk"))
        yield send_mail(self.server.port, "", ["alice@example.test"], to_alice("bounce"))
        self.assertEqual(len(self.server.messages("alice")), 3)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.sink.accepted, [])
        self.assertFalse((self.server.maildir("alice") / ".mailx.vacation").exists())


class VacationMemoryAcrossKillTests(unittest.TestCase):
    """The "already replied" memory is on disk before the next message: kill -9 keeps it."""

    timeout = 120

    @defer.inlineCallbacks
    def test_no_second_reply_after_kill_9_and_restart(self) -> None:
        zones = start_dns_server(ZONES)
        self.addCleanup(zones.stop)
        sink = start_sink()
        self.addCleanup(sink.stop)
        port = free_port()
        overrides = config_overrides(zones.port, sink.port)
        overrides["listen"] = {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}
        config = write_config(Path(self.mktemp()).absolute(), overrides)
        home = config.parent / "mail" / "example.test" / "alice"
        activate(home, VACATION)
        process = ServerProcess(config, port)
        self.addCleanup(process.kill)
        yield deferToThread(process.start)
        yield send_mail(port, "carol@sender.test", ["alice@example.test"], to_alice("first"))
        yield sink.wait_for(1)
        yield wait_until((home / ".mailx.vacation").exists)
        queue = config.parent / "spool" / "queue"
        # Delivered and done: a reply still queued would (rightly) go out again after the restart.
        yield wait_until(lambda: [n for n in os.listdir(queue) if not n.startswith(".")] == [])
        process.kill()  # SIGKILL
        self.assertEqual(process.proc.returncode, -9)
        yield deferToThread(process.start)
        yield send_mail(port, "carol@sender.test", ["alice@example.test"], to_alice("second"))
        new = home / "new"
        self.assertEqual(len(os.listdir(new)), 2)
        yield wait_until(lambda: "already got one this period" in process.log_path.read_text())
        self.assertEqual([n for n in os.listdir(queue) if not n.startswith(".")], [])
        self.assertEqual(len(sink.accepted), 1)


class ManageSieveRoundTripTests(unittest.TestCase):
    """Uploaded and activated through Dovecot's ManageSieve (sievelib), then mail over
    SMTP through mailx lands where the script says, and Dovecot's IMAP shows it there."""

    timeout = 120

    def setUp(self) -> None:
        from tests import test_managesieve

        test_managesieve.ManageSieveTests.setUp(self)  # type: ignore[arg-type]  # its skips and home

    def start_dovecot(self) -> tuple[int, int]:
        from tests import test_managesieve

        sieve_port, imap_port = free_port(), free_port()
        (self.base / "users").write_text(f"alice@example.test:{{PLAIN}}{test_managesieve.PASSWORD}\n")
        block = (
            test_managesieve.docs_block()
            .replace("/srv/mailx/mail", str(self.mail))
            .replace("port = 4190", f"port = {sieve_port}")
        )
        settings = test_managesieve.TEST_SETTINGS.format(
            base=self.base, uid=self.vmail.pw_uid, gid=self.vmail.pw_gid
        ).replace("protocols =", "protocols = imap")
        imap = (
            "service imap-login {\n  inet_listener imap {\n    address = 127.0.0.1\n"
            f"    port = {imap_port}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n"
        )
        config = self.base / "dovecot.conf"
        config.write_text(settings + imap + block)
        (self.base / "state").mkdir()
        dovecot.launch_for(self, config, [sieve_port, imap_port])
        return sieve_port, imap_port

    def upload(self, port: int, name: str, script: str) -> None:
        from tests import test_managesieve

        client = self.managesieve.Client("127.0.0.1", port)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Credentials are sent over an unencrypted", UserWarning)
            self.assertTrue(client.connect("alice@example.test", test_managesieve.PASSWORD, authmech="PLAIN"))
        try:
            self.assertTrue(client.putscript(name, script), client.errmsg)
            self.assertTrue(client.setactive(name), client.errmsg)
        finally:
            client.logout()

    def imap_folder(self, port: int, folder: str) -> list[tuple[bytes, bytes]]:
        """(FLAGS, message) of each message in ``folder``, as Dovecot's IMAP shows them."""
        from tests import test_managesieve

        with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
            imap.login("alice@example.test", test_managesieve.PASSWORD)
            status, _ = imap.select(f'"{folder}"', readonly=True)
            self.assertEqual(status, "OK", folder)
            _, data = imap.search(None, "ALL")
            found = []
            for number in data[0].split():
                _, parts = imap.fetch(number, "(FLAGS RFC822)")
                item: Any = parts[0]
                found.append((item[0], item[1]))
        return found

    @defer.inlineCallbacks
    def test_uploaded_script_files_smtp_mail_into_a_folder_dovecot_shows(self) -> None:
        from tests.test_dovecot import chown_tree
        from tests.test_managesieve import SCRIPT

        sieve_port, imap_port = self.start_dovecot()
        yield deferToThread(self.upload, sieve_port, "roundcube", SCRIPT)
        server = start_server(self, {"paths": {"mail": str(self.mail), "spool": str(self.base / "spool")}})
        yield send_mail(server.port, "shop@vendor.test", ["alice@example.test"],
                        to_alice("Your invoice").replace(b"carol@sender.test", b"shop@vendor.test"))
        yield send_mail(server.port, "carol@sender.test", ["alice@example.test"], to_alice("lunch"))
        # mailx here runs as root; in production it runs as the mail's owner.
        chown_tree(self.mail, self.vmail.pw_uid, self.vmail.pw_gid)
        [(flags, invoice)] = yield deferToThread(self.imap_folder, imap_port, "Finance/Invoices")
        self.assertIn(b"\\Flagged", flags)
        self.assertIn(b"Subject: Your invoice", invoice)
        [(_, lunch)] = yield deferToThread(self.imap_folder, imap_port, "INBOX")
        self.assertIn(b"Subject: lunch", lunch)


class CasemapTests(unittest.TestCase):
    """The fast path of i;ascii-casemap (str.lower on ASCII) folds exactly A-Z, as before."""

    @given(st.text())
    def test_folds_only_a_to_z(self, text: str) -> None:
        from mailx.filters.interpreter import _casemap

        expected = "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)
        self.assertEqual(_casemap(text), expected)
