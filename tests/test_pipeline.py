# -*- test-case-name: tests.test_pipeline -*-
"""A message's path end to end: checks, the mailboxes' filters, the decision, one filing.

mailx runs in-process on 127.0.0.1 with the loopback DNS server and SMTP
sink of tests.test_forwarding as the outside world.  The filters are a
stand-in with the signature `mailx.filters.mailbox` implements (it is built
separately; a fixed outcome per mailbox is what the pipeline consumes).
"""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from typing import Any

from twisted.internet import defer, reactor, task

from mailx.filters.outcome import Copy, FilterOutcome, VacationReply
from mailx.testing.server import send_mail
from tests.test_forwarding import ForwardingCase, original, wait_until


class FixedFilters:
    """Each mailbox's outcome from a table; records how it was asked."""

    def __init__(self, outcomes: dict[str, Any]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[str, str, str, bytes, bytes, bool]] = []
        self.recorded: list[VacationReply] = []

    def record_vacation(self, reply: VacationReply) -> None:
        self.recorded.append(reply)

    def outcome(
        self, destination: Any, sender: str, recipient: str, header: bytes, read_body: Any,
        *, size: int | None = None, queue_id: str = "",
    ) -> Any:
        on_reactor = threading.current_thread() is threading.main_thread()
        self.calls.append((destination.address, sender, recipient, header, read_body(6), on_reactor))
        found = self.outcomes.get(destination.address)
        if isinstance(found, Exception):
            raise found
        return found or FilterOutcome()


class FilteredDeliveryTests(ForwardingCase):
    def filters(self, outcomes: dict[str, Any]) -> FixedFilters:
        filters = FixedFilters(outcomes)
        self.server.service.context.filters = filters
        return filters

    def names(self, mailbox: str, sub: str) -> list[str]:
        path = self.server.maildir(mailbox) / sub
        return sorted(os.listdir(path)) if path.is_dir() else []

    @defer.inlineCallbacks
    def test_folders_flags_and_redirects_are_filed_with_the_message(self) -> None:
        filters = self.filters({
            "alice@example.test": FilterOutcome(copies=(Copy("Work.Clients", "FS"), Copy()), redirects=("r@outside.test",)),
        })
        yield send_mail(self.server.port, "carol@sender.test", ["alice+news@example.test"], original(body=b"Body text.\r\n"))
        [(address, sender, given, header, body, on_reactor)] = filters.calls
        self.assertEqual((address, sender, given, body, on_reactor), ("alice@example.test", "carol@sender.test", "alice+news@example.test", b"Body t", False))
        self.assertIn(b"X-Original-To: alice+news@example.test\r\n", header)
        self.assertIn(b"Subject: hello\r\n", header)
        folder = self.server.maildir("alice") / ".Work.Clients"
        self.assertTrue((folder / "maildirfolder").exists())
        [flagged] = os.listdir(folder / "cur")
        self.assertTrue(flagged.endswith(":2,FS"))
        self.assertIn(b"Body text.\n", (folder / "cur" / flagged).read_bytes())
        self.assertEqual(len(self.server.messages("alice")), 1)
        yield wait_until(lambda: len(self.sink.accepted) == 1)
        [redirect] = self.sink.accepted
        self.assertEqual(redirect.recipients, ["r@outside.test"])
        self.assertTrue(redirect.mail_from.startswith("SRS0="), redirect.mail_from)
        self.assertIn(b"Delivered-To: alice@example.test\r\n", redirect.data)

    @defer.inlineCallbacks
    def test_a_reject_by_every_recipient_is_550_and_nothing_is_filed(self) -> None:
        self.filters({
            "alice@example.test": FilterOutcome(copies=(), reject="I do not want this"),
            "bob@example.test": FilterOutcome(copies=(), reject="Nor I"),
        })
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield send_mail(self.server.port, "carol@sender.test", ["team@example.test"], original())
        self.assertEqual(caught.exception.smtp_code, 550)
        self.assertEqual(caught.exception.smtp_error, b"5.7.1 I do not want this")
        self.assertEqual(self.server.all_messages(), [])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_a_reject_by_some_recipients_tells_the_sender_from_the_null_sender(self) -> None:
        self.filters({"bob@example.test": FilterOutcome(copies=(), reject="not for me")})
        yield send_mail(self.server.port, "carol@sender.test", ["team@example.test"], original())
        self.assertEqual(len(self.server.messages("alice")), 1)
        self.assertEqual(self.server.messages("bob"), [])
        yield wait_until(lambda: len(self.sink.accepted) == 1)
        [notice] = self.sink.accepted
        self.assertEqual((notice.mail_from, notice.recipients), ("", ["carol@sender.test"]))
        self.assertIn(b"report-type=disposition-notification", notice.data)
        self.assertIn(b"Disposition: automatic-action/MDN-sent-automatically; deleted", notice.data)
        self.assertIn(b"not for me", notice.data)

    @defer.inlineCallbacks
    def test_no_reject_notice_and_no_vacation_to_the_null_sender(self) -> None:
        vacation = VacationReply("", b"Subject: away\r\n\r\nAway.\r\n", "k", 86400)
        self.filters({
            "alice@example.test": FilterOutcome(vacation=vacation),
            "bob@example.test": FilterOutcome(copies=(), reject="not for me"),
        })
        yield send_mail(self.server.port, "", ["team@example.test"], original())
        self.assertEqual(len(self.server.messages("alice")), 1)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_a_vacation_reply_is_queued_from_the_null_sender(self) -> None:
        reply = b"From: alice@example.test\r\nTo: carol@sender.test\r\nSubject: Away\r\nAuto-Submitted: auto-replied\r\n\r\nBack soon.\r\n"
        vacation = VacationReply("carol@sender.test", reply, "k", 86400, "alice@example.test")
        filters = self.filters({"alice@example.test": FilterOutcome(vacation=vacation)})
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original())
        yield wait_until(lambda: filters.recorded == [vacation])
        self.assertEqual(len(self.server.messages("alice")), 1)
        yield wait_until(lambda: len(self.sink.accepted) == 1)
        [autoreply] = self.sink.accepted
        self.assertEqual((autoreply.mail_from, autoreply.recipients), ("", ["carol@sender.test"]))
        self.assertTrue(autoreply.data.endswith(reply))

    @defer.inlineCallbacks
    def test_a_failing_filter_keeps_the_message_in_inbox(self) -> None:
        self.filters({"alice@example.test": RuntimeError("script store unreadable")})
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original())
        self.assertEqual(len(self.server.messages("alice")), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class WriterDeathThroughSMTPTests(ForwardingCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_writer_killed_mid_request_is_451_and_nothing_is_filed(self) -> None:
        writer = self.server.service.writer
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original(subject="first"))
        pid = writer._child.transport.pid
        os.kill(pid, signal.SIGSTOP)  # the request waits in the pipe, unanswered
        sending = send_mail(self.server.port, "carol@sender.test", ["team@example.test", "both@example.test"], original(subject="lost"))
        deadline = time.monotonic() + 20
        while not writer._child.pending and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(writer._child.pending)
        os.kill(pid, signal.SIGKILL)
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield sending
        self.assertEqual(caught.exception.smtp_code, 451)
        self.flushLoggedErrors()
        self.assertEqual(len(self.server.messages("alice")), 1)  # the first message only
        self.assertEqual(self.server.messages("bob"), [])
        self.assertEqual(self.queued(), [])
        # The next message starts a new writer.
        yield send_mail(self.server.port, "carol@sender.test", ["bob@example.test"], original(subject="again"))
        self.assertEqual(len(self.server.messages("bob")), 1)


class SieveScriptTests(ForwardingCase):
    """The server's own filters (`mailx.filters.mailbox.MailboxFilters`) on a real script."""

    def activate(self, mailbox: str, script: str) -> None:
        home = self.server.maildir(mailbox)
        (home / "sieve").mkdir(parents=True, exist_ok=True)
        (home / "sieve" / "main.sieve").write_text(script)
        os.symlink("sieve/main.sieve", home / ".dovecot.sieve")

    @defer.inlineCallbacks
    def test_fileinto_a_new_folder_with_flags(self) -> None:
        self.activate("alice", 'require ["fileinto", "imap4flags"];\n'
                      'if header :contains "subject" "report" { fileinto :flags "\\\\Seen" "Work/Clients"; }\n')
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original(subject="weekly report"))
        yield send_mail(self.server.port, "carol@sender.test", ["alice@example.test"], original(subject="lunch"))
        folder = self.server.maildir("alice") / ".Work.Clients"
        [name] = os.listdir(folder / "cur")
        self.assertTrue(name.endswith(":2,S"), name)
        self.assertIn(b"Subject: weekly report", (folder / "cur" / name).read_bytes())
        [inbox] = self.server.messages("alice")
        self.assertIn(b"Subject: lunch", inbox)

    @defer.inlineCallbacks
    def test_reject_by_the_only_recipient_is_550(self) -> None:
        self.activate("bob", 'require "reject";\nreject "Bob is not here";\n')
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield send_mail(self.server.port, "carol@sender.test", ["bob@example.test"], original())
        self.assertEqual((caught.exception.smtp_code, caught.exception.smtp_error), (550, b"5.7.1 Bob is not here"))
        self.assertEqual(self.server.all_messages(), [])

