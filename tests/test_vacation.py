# -*- test-case-name: tests.test_vacation -*-
"""Vacation (RFC 5230, RFC 6131, RFC 3834): when a reply goes, what it says,
the memory that keeps it to one per sender and period (across kill -9),
and ``mailxctl vacation``, whose scripts Pigeonhole must compile too.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.admin import cli
from mailx.filters import autoreply
from mailx.filters import vacation as vacation_module
from mailx.filters.outcome import Copy
from mailx.filters.vacation import VacationMemory
from mailx.testing.sievetest import SIEVE_TEST, Pigeonhole

from .test_filters_mailbox import FiltersTestCase

DAY = 86400
SCRIPT = 'require "vacation";\nvacation :subject "Away" "I am away until Monday.";\n'


def header(*extra: str, to: str = "alice@example.test", subject: str = "Lunch?") -> bytes:
    fields = ["From: Friend <friend@sender.test>", f"To: {to}", f"Subject: {subject}",
              "Message-ID: <q1@sender.test>", "References: <q0@sender.test>", *extra]
    return ("\r\n".join(fields) + "\r\n\r\n").encode()


class VacationRuleTests(FiltersTestCase):
    """Each RFC 3834 / RFC 5230 4.5 rule, one message that breaks it at a time."""

    def setUp(self) -> None:
        super().setUp()
        self.activate(SCRIPT)

    def reply(self, head: bytes, sender: str = "friend@sender.test", to: str = "alice@example.test"):
        outcome = self.outcome(header=head, sender=sender, to=to)
        self.assertEqual(outcome.copies, (Copy(),))  # vacation never stops the keep
        return outcome

    def assertNoReply(self, head: bytes, why: str, **kwargs: str) -> None:
        outcome = self.reply(head, **kwargs)
        self.assertIsNone(outcome.vacation)
        self.assertTrue(any(why in note for note in outcome.notes), outcome.notes)

    def test_an_ordinary_message_gets_a_reply(self) -> None:
        self.assertEqual(self.reply(header()).vacation.recipient, "friend@sender.test")

    def test_auto_submitted_no_gets_a_reply(self) -> None:
        self.assertIsNotNone(self.reply(header("Auto-Submitted: no")).vacation)

    def test_null_sender(self) -> None:
        self.assertNoReply(header(), "null sender", sender="")
        self.assertNoReply(header(), "null sender", sender="<>")

    def test_auto_submitted(self) -> None:
        for value in ("auto-generated", "auto-replied", "auto-notified; owner-email=x@y.test"):
            with self.subTest(value=value):
                self.assertNoReply(header(f"Auto-Submitted: {value}"), "Auto-Submitted")

    def test_precedence_bulk_list_junk(self) -> None:
        for value in ("bulk", "list", "junk", "Bulk"):
            with self.subTest(value=value):
                self.assertNoReply(header(f"Precedence: {value}"), "Precedence")
        self.assertIsNotNone(self.reply(header("Precedence: first-class")).vacation)

    def test_list_headers(self) -> None:
        for field in ("List-Id: <dev.lists.test>", "List-Unsubscribe: <mailto:u@lists.test>", "List-Post: NO"):
            with self.subTest(field=field):
                self.assertNoReply(header(field), "mailing list")

    def test_system_senders(self) -> None:
        for sender in ("MAILER-DAEMON@sender.test", "owner-dev@lists.test", "dev-request@lists.test"):
            with self.subTest(sender=sender):
                self.assertNoReply(header(), "system address", sender=sender)

    def test_not_addressed_to_me(self) -> None:
        self.assertNoReply(header(to="someone@else.test"), "not in To/Cc")

    def test_the_address_the_sender_used_counts(self) -> None:
        self.assertIsNotNone(
            self.reply(header(to="alice+trips@example.test"), to="alice+trips@example.test").vacation
        )

    def test_cc_counts(self) -> None:
        self.assertIsNotNone(self.reply(header("Cc: alice@example.test", to="team@example.test")).vacation)

    def test_addresses_count(self) -> None:
        self.activate(
            'require "vacation";\nvacation :addresses ["a.smith@example.test"] "Away.";\n', name="addr"
        )
        self.assertIsNotNone(self.reply(header(to="a.smith@example.test")).vacation)

    def test_not_to_myself(self) -> None:
        self.assertNoReply(header(), "this mailbox", sender="alice@example.test")


class MemoryTests(FiltersTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.activate(SCRIPT)

    def test_once_per_sender_per_period(self) -> None:
        first = self.outcome(header=header()).vacation
        self.assertEqual(first.seconds, 7 * DAY)
        # Not recorded (the message was not accepted, say): the next one gets it.
        self.assertIsNotNone(self.outcome(header=header()).vacation)
        self.filters.record_vacation(first)
        self.assertIsNone(self.outcome(header=header()).vacation)
        # Another sender is another entry.
        self.assertIsNotNone(self.outcome(header=header(), sender="other@sender.test").vacation)
        self.clock.advance(7 * DAY - 10)
        self.assertIsNone(self.outcome(header=header()).vacation)
        self.clock.advance(20)
        self.assertIsNotNone(self.outcome(header=header()).vacation)

    def test_memory_survives_a_new_instance(self) -> None:
        self.filters.record_vacation(self.outcome(header=header()).vacation)
        self.assertIsNone(self.outcome(header=header(), filters=self.make_filters()).vacation)

    def test_days_and_seconds_with_pigeonholes_minimum(self) -> None:
        self.activate('require "vacation";\nvacation :days 2 "Away.";\n', name="days")
        self.assertEqual(self.outcome(header=header()).vacation.seconds, 2 * DAY)
        self.activate('require ["vacation", "vacation-seconds"];\nvacation :seconds 60 "Away.";\n', name="seconds")
        self.assertEqual(self.outcome(header=header()).vacation.seconds, DAY)

    def test_another_handle_replies_again(self) -> None:
        self.filters.record_vacation(self.outcome(header=header()).vacation)
        self.activate('require "vacation";\nvacation :subject "Away" "Back on the 3rd.";\n', name="new")
        self.assertIsNotNone(self.outcome(header=header()).vacation)

    def test_memory_is_pruned_and_capped(self) -> None:
        self.patch(vacation_module, "MAX_ENTRIES", 50)
        memory = VacationMemory(self.home)
        now = 1_800_000_000
        for i in range(200):
            memory.record(f"k{i}", f"s{i}@x.test", 10 if i < 100 else DAY, now + i)
        entries = memory.entries()
        self.assertEqual(len(entries), 50)
        self.assertEqual(entries[-1].key, "k199")
        # Expired entries go at the next write.
        memory.record("late", "late@x.test", DAY, now + 2 * DAY)
        self.assertEqual([e.key for e in memory.entries()], ["late"])

    def test_memory_does_not_write_through_links(self) -> None:
        victim = self.base / "server-file"
        victim.write_text("untouched\n")
        memory = VacationMemory(self.home)
        for name in (vacation_module.MEMORY_FILE, vacation_module.MEMORY_FILE + f".{os.getpid()}.{threading.get_ident()}.tmp"):
            os.symlink(victim, self.home / name)
        memory.record("k", "s@x.test", DAY, 1_800_000_000)
        self.assertEqual(victim.read_text(), "untouched\n")
        self.assertFalse((self.home / vacation_module.MEMORY_FILE).is_symlink())

    def test_memory_survives_kill_9(self) -> None:
        """A process recording replies is killed mid-stream: all it confirmed is there."""
        program = (
            "import sys\n"
            "from pathlib import Path\n"
            "from mailx.filters.vacation import VacationMemory\n"
            "memory = VacationMemory(Path(sys.argv[1]))\n"
            "for i in range(100000):\n"
            "    memory.record(f'key{i}', f'sender{i}@x.test', 86400, 1800000000)\n"
            "    print(i, flush=True)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        process = subprocess.Popen(
            [sys.executable, "-c", program, str(self.home)], stdout=subprocess.PIPE, env=env
        )
        confirmed = -1
        assert process.stdout is not None
        while confirmed < 30:
            line = process.stdout.readline()
            self.assertTrue(line, "the recorder died on its own")
            confirmed = int(line)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        keys = {e.key for e in VacationMemory(self.home).entries(1_800_000_000)}
        self.assertTrue({f"key{i}" for i in range(confirmed + 1)} <= keys)
        # The file parses whole: every line is an entry.
        text = (self.home / vacation_module.MEMORY_FILE).read_text()
        self.assertEqual(len(text.splitlines()), len(keys))


class ReplyMessageTests(FiltersTestCase):
    def test_reply_fields(self) -> None:
        self.activate(SCRIPT)
        reply = self.outcome(header=header(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=")).vacation
        message = email.message_from_bytes(reply.message, policy=email.policy.default)
        self.assertEqual(message["From"], "alice@example.test")
        self.assertEqual(message["To"], "friend@sender.test")
        self.assertEqual(message["Subject"], "Away")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["In-Reply-To"], "<q1@sender.test>")
        self.assertEqual(message["References"], "<q0@sender.test> <q1@sender.test>")
        self.assertIsNotNone(message["Date"])
        self.assertTrue(message["Message-ID"].endswith("@example.test>"))
        self.assertEqual(message.get_content_type(), "text/plain")
        self.assertEqual(message.get_content_charset(), "utf-8")
        self.assertIn("away until Monday", message.get_content())
        self.assertEqual(reply.mailbox, "alice@example.test")
        self.assertIn(b"\r\n\r\n", reply.message)

    def test_default_subject_and_from(self) -> None:
        self.activate('require "vacation";\nvacation :from "Alice <a.smith@example.test>" "Bin weg, grüße."\n;')
        reply = self.outcome(header=header(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=")).vacation
        message = email.message_from_bytes(reply.message, policy=email.policy.default)
        self.assertEqual(message["Subject"], "Auto: Grüße")
        self.assertEqual(message["From"], "Alice <a.smith@example.test>")
        self.assertIn("grüße", message.get_content())

    def test_mime_body_as_given(self) -> None:
        self.activate(
            'require "vacation";\nvacation :mime "Content-Type: text/html; charset=us-ascii\r\n\r\n<p>Away</p>";\n'
        )
        reply = self.outcome(header=header()).vacation
        message = email.message_from_bytes(reply.message, policy=email.policy.default)
        self.assertEqual(message.get_content_type(), "text/html")
        self.assertIn("<p>Away</p>", message.get_content())


class VacationCommandTests(FiltersTestCase):
    """mailxctl vacation, its scripts compiled by Pigeonhole as well as by us."""

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = cli.main(["-c", str(self.base / "etc" / "mailx.yaml"), "vacation", *argv])
        return status, stdout.getvalue(), stderr.getvalue()

    def body_file(self, text: str = 'Away until Monday.\nUrgent: call "Bob" \\ 555.\n') -> str:
        path = self.base / "body.txt"
        path.write_text(text)
        return str(path)

    def assertPigeonholeCompiles(self, script: Path) -> None:
        if SIEVE_TEST is None:
            return
        pigeonhole = Pigeonhole()
        self.addCleanup(pigeonhole.close)
        from mailx.filters import Envelope

        status, *_ = pigeonhole.run(
            script.read_bytes(), header(), Envelope("friend@sender.test", "alice@example.test", "alice@example.test")
        )
        self.assertEqual(status, "ok", script.read_text())

    def test_on_without_a_script_then_status_then_off(self) -> None:
        status, out, err = self.run_cli("alice@example.test", "on", "--subject", "Away", "--body-file", self.body_file(), "--days", "3")
        self.assertEqual(status, 0, err)
        link = self.home / ".dovecot.sieve"
        self.assertEqual(os.readlink(link), "sieve/mailx-vacation.sieve")
        self.assertPigeonholeCompiles(link)
        reply = self.outcome(header=header()).vacation
        self.assertEqual(reply.seconds, 3 * DAY)
        self.assertIn(b'Urgent: call "Bob" \\ 555.', reply.message)
        self.filters.record_vacation(reply)
        status, out, _ = self.run_cli("alice@example.test", "status")
        self.assertIn("on", out.splitlines()[0])
        self.assertIn("subject: Away", out)
        self.assertIn("days: 3", out)
        self.assertIn("friend@sender.test", out)
        status, out, _ = self.run_cli("alice@example.test", "off")
        self.assertEqual(status, 0)
        self.assertFalse(os.path.lexists(link))
        self.assertIsNone(self.outcome(header=header()).vacation)
        _, out, _ = self.run_cli("alice@example.test", "status")
        self.assertIn("off", out.splitlines()[0])

    def test_keeps_the_users_rules(self) -> None:
        own = (
            '# my rules\nrequire ["fileinto"];\nrequire "imap4flags";\n'
            'if header :contains "subject" "Lunch" {\n  fileinto "Food";\n  stop;\n}\n'
        )
        path = self.activate(own, name="roundcube")
        status, _, err = self.run_cli("alice@example.test", "on", "--subject", "Away", "--body-file", self.body_file())
        self.assertEqual(status, 0, err)
        self.assertPigeonholeCompiles(path)
        outcome = self.outcome(header=header())
        self.assertEqual(outcome.copies, (Copy("Food"),))  # the user's rule still files
        self.assertIsNotNone(outcome.vacation)  # and the block ran before its stop
        # On again replaces the block rather than adding one.
        self.run_cli("alice@example.test", "on", "--subject", "Still away", "--body-file", self.body_file())
        self.assertEqual(path.read_text().count(autoreply.BEGIN), 1)
        self.run_cli("alice@example.test", "off")
        self.assertEqual(path.read_text(), own)
        self.assertEqual(os.readlink(self.home / ".dovecot.sieve"), "sieve/roundcube.sieve")

    def test_not_a_mailbox(self) -> None:
        status, _, err = self.run_cli("nobody@example.test", "status")
        self.assertEqual(status, 1)
        self.assertIn("not a mailbox", err)


class AutoreplyTextTests(unittest.TestCase):
    def test_with_and_without_rule_round_trip(self) -> None:
        rule = autoreply.VacationRule("Away", "Gone.", 7)
        for script in ["", "keep;", 'require "fileinto";\nfileinto "A";', "# only a comment\n"]:
            with self.subTest(script=script):
                new = autoreply.with_rule(script, rule)
                self.assertEqual(autoreply.current_rule(new), rule)
                self.assertEqual(autoreply.without_rule(new).rstrip("\n"), script.rstrip("\n"))

    def test_require_and_rule_on_one_line_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            autoreply.with_rule('require "fileinto"; fileinto "A";', autoreply.VacationRule("S", "B", 1))



_FIELDS = [
    "Auto-Submitted: no", "Auto-Submitted: auto-generated", "Auto-Submitted: auto-replied",
    "Precedence: bulk", "Precedence: list", "Precedence: junk", "Precedence: normal",
    "List-Id: <dev.lists.test>", "List-Help: <mailto:help@lists.test>", "X-Mailer: mutt",
    "Cc: alice@example.test", "Cc: other@else.test",
]
_SENDERS = ["friend@sender.test", "", "MAILER-DAEMON@x.test", "owner-list@x.test", "x-request@x.test", "alice@example.test"]
_TO = ["alice@example.test", "Alice <ALICE@example.test>", "team@example.test", "alice+x@example.test"]


class VacationDecisionPropertyTests(FiltersTestCase):
    """Any mix of the fields: a reply exactly when no rule forbids one."""

    def setUp(self) -> None:
        super().setUp()
        self.activate(SCRIPT)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        fields=st.lists(st.sampled_from(_FIELDS), max_size=4, unique=True),
        sender=st.sampled_from(_SENDERS),
        to=st.sampled_from(_TO),
    )
    def test_reply_exactly_when_allowed(self, fields: list[str], sender: str, to: str) -> None:
        local = sender.partition("@")[0].lower()
        forbidden = (
            not sender
            or local in ("mailer-daemon",) or local.startswith("owner-") or local.endswith("-request")
            or any(f.startswith("Auto-Submitted:") and not f.endswith(": no") for f in fields)
            or any(f.startswith("Precedence:") and f.split()[-1] in ("bulk", "list", "junk") for f in fields)
            or any(f.startswith("List-") for f in fields)
            # To the mailbox, or to the address the sender used (the envelope's alice+x).
            or not ("alice@example.test" in to.lower() or "+x" in to or "Cc: alice@example.test" in fields)
            or sender == "alice@example.test"
        )
        # The address the sender used is the envelope recipient here.
        rcpt = "alice+x@example.test" if "+x" in to else "alice@example.test"
        outcome = self.outcome(header=header(*fields, to=to), sender=sender, to=rcpt)
        self.assertEqual(outcome.vacation is None, forbidden, (fields, sender, to, outcome.notes))
        self.assertEqual(outcome.copies, (Copy(),))
