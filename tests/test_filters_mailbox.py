# -*- test-case-name: tests.test_filters_mailbox -*-
"""MailboxFilters: a mailbox's scripts, from the files Pigeonhole's layout puts
in its home, to the FilterOutcome the pipeline files (SPEC 12).

Real files in a temporary home; Pigeonhole's ``sieve-test`` and Dovecot's
``doveadm mailbox mutf7`` as oracles where they are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from mailx.config import ConfigError, load_config
from mailx.filters.folders import FolderError, maildir_flags, maildir_folder, mutf7
from mailx.filters.mailbox import MailboxFilters
from mailx.filters.outcome import KEEP, Copy
from mailx.inbound.routing import MailboxDestination
from mailx.testing.server import write_config
from mailx.testing.sievetest import SIEVE_TEST, Pigeonhole, canonical_pigeonhole

ALICE = MailboxDestination("example.test", "alice")
HEADER = (
    b"From: Friend <friend@sender.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <m1@sender.test>\r\n\r\n"
)
BODY = b"Numbers attached.\r\n"
DOVEADM = shutil.which("doveadm")


class FiltersTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.filters = self.make_filters()
        self.home = self.base / "mail" / "example.test" / "alice"
        self.home.mkdir(parents=True)

    def make_filters(self, domain: dict | None = None) -> MailboxFilters:
        overrides = {"paths": {"mail": str(self.base / "mail"), "spool": str(self.base / "spool")}}
        if domain:
            overrides["domains"] = {"example.test": domain}
        config = load_config(write_config(self.base / "etc", overrides))
        return MailboxFilters(config, self.clock)

    def activate(self, script: str | bytes, name: str = "main") -> Path:
        sieve = self.home / "sieve"
        sieve.mkdir(exist_ok=True)
        path = sieve / f"{name}.sieve"
        path.write_bytes(script.encode() if isinstance(script, str) else script)
        link = self.home / ".dovecot.sieve"
        if link.is_symlink():
            link.unlink()
        os.symlink(f"sieve/{name}.sieve", link)
        return path

    def outcome(self, header: bytes = HEADER, body: bytes = BODY, sender: str = "friend@sender.test",
                to: str = "alice@example.test", filters: MailboxFilters | None = None):
        return (filters or self.filters).outcome(ALICE, sender, to, header, lambda n: body[:n])


class OutcomeTests(FiltersTestCase):
    def test_no_script_keeps(self) -> None:
        self.assertIs(self.outcome(), KEEP)

    def test_fileinto_with_flags_becomes_a_maildir_folder_and_info_letters(self) -> None:
        self.activate(
            'require ["fileinto", "imap4flags"];\n'
            'if header :contains "subject" "report" {\n'
            '  fileinto :flags ["\\\\Seen", "\\\\Flagged", "$Label1"] "Work/Clients";\n'
            "}\n"
        )
        outcome = self.outcome()
        self.assertEqual(outcome.copies, (Copy("Work.Clients", "FS"),))
        self.assertEqual(outcome.redirects, ())

    def test_keep_and_inbox_are_one_copy(self) -> None:
        self.activate('require "fileinto"; keep; fileinto "INBOX";')
        self.assertEqual(self.outcome().copies, (Copy(),))

    def test_refused_folder_name_keeps_in_inbox_with_a_note(self) -> None:
        self.activate('require "fileinto"; fileinto "../../../etc";')
        outcome = self.outcome()
        self.assertEqual(outcome.copies, (Copy(),))
        self.assertIn("'.'", outcome.notes[0])

    def test_redirect_copy_keeps_and_forwards(self) -> None:
        self.activate('require "copy"; redirect :copy "books@accountant.test";')
        outcome = self.outcome()
        self.assertEqual(outcome.copies, (Copy(),))
        self.assertEqual(outcome.redirects, ("books@accountant.test",))

    def test_four_redirects_and_a_fifth_is_an_error(self) -> None:
        four = "".join(f'redirect "r{i}@elsewhere.test";\n' for i in range(4))
        self.activate(four)
        outcome = self.outcome()
        self.assertEqual(len(outcome.redirects), 4)
        self.assertEqual(outcome.copies, ())
        self.activate(four + 'redirect "r5@elsewhere.test";\n', name="five")
        outcome = self.outcome()
        self.assertEqual((outcome.copies, outcome.redirects), ((Copy(),), ()))
        self.assertIn("redirect", (self.home / ".dovecot.sieve.log").read_text())

    def test_reject_has_no_copies(self) -> None:
        self.activate('require "reject"; reject "Go away.";')
        outcome = self.outcome()
        self.assertEqual((outcome.copies, outcome.reject), ((), "Go away."))

    def test_discard_has_no_copies_and_a_note(self) -> None:
        self.activate("discard;")
        outcome = self.outcome()
        self.assertEqual(outcome.copies, ())
        self.assertIn("discard", outcome.notes[0])

    def test_body_read_only_when_a_script_looks_at_it(self) -> None:
        reads: list[int] = []

        def read_body(n: int) -> bytes:
            reads.append(n)
            return BODY

        self.activate('require "fileinto"; if header :is "subject" "x" { fileinto "X"; }')
        self.filters.outcome(ALICE, "friend@sender.test", "alice@example.test", HEADER, read_body)
        self.assertEqual(reads, [])
        self.activate('require ["body", "fileinto"]; if body :contains "Numbers" { fileinto "N"; }', "b")
        outcome = self.filters.outcome(ALICE, "friend@sender.test", "alice@example.test", HEADER, read_body)
        self.assertEqual(len(reads), 1)
        self.assertEqual(outcome.copies, (Copy("N"),))

    def test_mailboxexists_looks_at_the_home(self) -> None:
        self.activate(
            'require ["fileinto", "mailbox"];\n'
            'if mailboxexists "Lists/Dev" { fileinto "Lists/Dev"; } else { fileinto "Other"; }'
        )
        self.assertEqual(self.outcome().copies, (Copy("Other"),))
        (self.home / ".Lists.Dev").mkdir()
        self.assertEqual(self.outcome().copies, (Copy("Lists.Dev"),))

    def test_active_link_out_of_the_sieve_directory_is_ignored(self) -> None:
        outside = self.base / "secret.sieve"
        outside.write_text("discard;")
        os.symlink(str(outside), self.home / ".dovecot.sieve")
        self.assertIs(self.outcome(), KEEP)


class FailureTests(FiltersTestCase):
    """Every failure is the implicit keep, logged in the home as Pigeonhole does."""

    def assertKeptFast(self, started: float) -> None:
        outcome = self.outcome()
        self.assertEqual((outcome.copies, outcome.redirects, outcome.reject), ((Copy(),), (), None))
        self.assertTrue(outcome.notes)
        # Generous: the bounds make it a second or two at worst on a busy machine.
        self.assertLess(time.monotonic() - started, 30)

    def test_compile_error_keeps_and_goes_to_the_user_log(self) -> None:
        self.activate('require "fileinto";\nfileinto "A"\nkeep;\n')
        self.assertKeptFast(time.monotonic())
        log = (self.home / ".dovecot.sieve.log").read_text()
        self.assertRegex(log, r"main: line \d+: error")

    def test_runtime_error_keeps(self) -> None:
        self.activate('require "reject"; keep; reject "no";')
        self.assertKeptFast(time.monotonic())

    def test_oversize_script_keeps(self) -> None:
        self.activate("# " + "x" * (1 << 20) + "\nkeep;\n")
        self.assertKeptFast(time.monotonic())
        self.assertIn("larger than", (self.home / ".dovecot.sieve.log").read_text())

    def test_nesting_over_32_keeps(self) -> None:
        self.activate("if true { " * 40 + "discard;" + " }" * 40)
        self.assertKeptFast(time.monotonic())

    def test_catastrophic_regex_keeps_or_matches_fast(self) -> None:
        self.activate(
            'require ["regex", "fileinto"];\n'
            'if header :regex "subject" "^(a+)+$" { fileinto "Never"; }\n'
            'if header :matches "subject" "*a*a*a*a*a*a*a*a*a*b" { fileinto "Never"; }\n'
        )
        started = time.monotonic()
        header = b"Subject: " + b"a" * 60_000 + b"!\r\n\r\n"
        outcome = self.outcome(header=header)
        self.assertEqual(outcome.copies, (Copy(),))
        self.assertLess(time.monotonic() - started, 30)

    def test_script_that_does_too_much_work_keeps(self) -> None:
        # Sieve has no loops; the nearest is a key list the interpreter's step bound stops.
        keys = ",".join(['"~"'] * 110_000)
        self.activate(f'if header :contains ["subject", "from", "to"] [{keys}] {{ discard; }}')
        self.assertKeptFast(time.monotonic())
        self.assertIn("too much work", (self.home / ".dovecot.sieve.log").read_text())

    def test_user_log_link_is_not_followed(self) -> None:
        # The home is the user's; a link there must not make the server write elsewhere.
        victim = self.base / "server-file"
        victim.write_text("untouched\n")
        os.symlink(victim, self.home / ".dovecot.sieve.log")
        self.activate("this is not sieve;\n")
        self.assertKeptFast(time.monotonic())
        self.assertEqual(victim.read_text(), "untouched\n")

    def test_user_log_stays_small(self) -> None:
        self.activate("this is not sieve;\n")
        for _ in range(400):
            self.outcome()
        self.assertLess((self.home / ".dovecot.sieve.log").stat().st_size, 12 * 1024)
        self.assertTrue((self.home / ".dovecot.sieve.log.0").exists())


class CacheTests(FiltersTestCase):
    def test_compiled_once_while_unchanged(self) -> None:
        path = self.activate('require "fileinto"; fileinto "A";')
        self.outcome()
        cached = self.filters._cache[str(path)]
        self.outcome()
        self.assertIs(self.filters._cache[str(path)], cached)

    def test_script_changed_while_in_use(self) -> None:
        path = self.activate('require "fileinto"; fileinto "A";')
        self.assertEqual(self.outcome().copies, (Copy("A"),))
        # Same size, rewritten in place (same inode), mtime moved on.
        path.write_text('require "fileinto"; fileinto "B";')
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
        self.assertEqual(self.outcome().copies, (Copy("B"),))
        # Replaced by rename, as ManageSieve does: a new inode.
        new = path.with_name("tmp.sieve")
        new.write_text('require "fileinto"; fileinto "C";')
        os.replace(new, path)
        self.assertEqual(self.outcome().copies, (Copy("C"),))
        # Another script activated.
        self.activate("discard;", name="other")
        self.assertEqual(self.outcome().copies, ())


class WatchedCacheTests(FiltersTestCase):
    """With the reactor, inotify tells the filters of changes (no stat per
    message); each change applies to the first message after its event."""

    def make_filters(self, domain: dict | None = None) -> MailboxFilters:
        from twisted.internet import reactor

        filters = super().make_filters(domain)
        filters = MailboxFilters(filters.config, self.clock, reactor=reactor)
        self.addCleanup(filters.close)
        return filters

    @inlineCallbacks
    def until(self, files: str | None, filters: MailboxFilters | None = None):
        """Poll the outcome (the reactor runs the inotify events between) until it files into ``files``."""
        from twisted.internet import reactor

        filters = filters or self.filters
        deadline = time.monotonic() + 10
        while True:
            if filters.needs_thread(ALICE):
                copies = self.outcome(filters=filters).copies
            else:
                copies = KEEP.copies
            if copies == ((Copy(files),) if files is not None else KEEP.copies):
                return
            if time.monotonic() > deadline:
                self.fail(f"still {copies} 10 s after the change, not {files}")
            yield deferLater(reactor, 0.01, lambda: None)

    def test_a_mailbox_without_a_script_needs_no_thread_once_known(self) -> None:
        self.assertTrue(self.filters.needs_thread(ALICE))  # cold: nothing known yet
        self.assertEqual(self.outcome(), KEEP)
        self.assertFalse(self.filters.needs_thread(ALICE))

    def test_cached_until_the_event_is_processed(self) -> None:
        path = self.activate('require "fileinto"; fileinto "A";')
        self.filters.needs_thread(ALICE)
        self.assertEqual(self.outcome().copies, (Copy("A"),))
        path.unlink()
        # No reactor turn since: the event is still in inotify's queue.
        self.assertEqual(self.outcome().copies, (Copy("A"),))

    @inlineCallbacks
    def test_activated_changed_renamed_relinked_removed(self):
        self.filters.needs_thread(ALICE)
        self.assertEqual(self.outcome(), KEEP)
        self.assertFalse(self.filters.needs_thread(ALICE))
        path = self.activate('require "fileinto"; fileinto "A";')
        yield self.until("A")
        # Rewritten in place (same inode).
        path.write_text('require "fileinto"; fileinto "B";')
        yield self.until("B")
        # Replaced by rename, as ManageSieve and editors do.
        new = path.with_name("tmp.sieve")
        new.write_text('require "fileinto"; fileinto "C";')
        os.replace(new, path)
        (self.home / "sieve" / "other.sieve").write_text('require "fileinto"; fileinto "D";')
        yield self.until("C")
        # Another script activated by renaming a new link over the old one.
        os.symlink("sieve/other.sieve", self.home / "link.tmp")
        os.replace(self.home / "link.tmp", self.home / ".dovecot.sieve")
        yield self.until("D")
        # Deactivated.
        (self.home / ".dovecot.sieve").unlink()
        yield self.until(None)
        self.assertFalse(self.filters.needs_thread(ALICE))

    @inlineCallbacks
    def test_script_directory_removed_and_made_again(self):
        # Twisted's INotify stops when a watched directory goes: the filters start afresh.
        self.activate('require "fileinto"; fileinto "A";')
        yield self.until("A")
        shutil.rmtree(self.home / "sieve")
        yield self.until(None)
        path = self.activate('require "fileinto"; fileinto "B";')
        yield self.until("B")
        path.write_text('require "fileinto"; fileinto "E";')
        yield self.until("E")

    @inlineCallbacks
    def test_home_made_after_the_first_message(self):
        shutil.rmtree(self.home)
        self.assertTrue(self.filters.needs_thread(ALICE))
        self.assertEqual(self.outcome(), KEEP)
        self.assertTrue(self.filters.needs_thread(ALICE))  # unwatched: statted each time
        self.home.mkdir()
        self.activate('require "fileinto"; fileinto "A";')
        yield self.until("A")
        (self.home / "sieve" / "main.sieve").write_text('require "fileinto"; fileinto "B";')
        yield self.until("B")

    @inlineCallbacks
    def test_sieve_before_replaced(self):
        path = self.base / "before.sieve"
        path.write_text('require "fileinto"; fileinto "A";')
        filters = self.make_filters({"mailboxes": ["alice", "bob"], "sieve_before": str(path)})
        yield self.until("A", filters)
        new = path.with_name("before.tmp")
        new.write_text('require "fileinto"; fileinto "B";')
        os.replace(new, path)
        yield self.until("B", filters)
        path.write_text('require "fileinto"; fileinto "C";')
        yield self.until("C", filters)
        # The user's script after it, watched too.
        path.write_text("")
        script = self.activate('require "fileinto"; fileinto "U";')
        yield self.until("U", filters)
        script.write_text('require "fileinto"; fileinto "V";')
        yield self.until("V", filters)
        self.assertIn(self.home, filters._watcher.resolved)

    def test_closed_filters_stat_again(self) -> None:
        self.filters.close()
        self.assertEqual(self.outcome(), KEEP)
        self.assertTrue(self.filters.needs_thread(ALICE))
        self.activate('require "fileinto"; fileinto "A";')
        self.assertEqual(self.outcome().copies, (Copy("A"),))


class SieveBeforeTests(FiltersTestCase):
    def before(self, script: str) -> MailboxFilters:
        path = self.base / "before.sieve"
        path.write_text(script)
        return self.make_filters({"mailboxes": ["alice", "bob"], "sieve_before": str(path)})

    def test_stop_in_sieve_before_ends_the_sequence(self) -> None:
        filters = self.before('require ["fileinto", "imap4flags"]; addflag "\\\\Flagged"; stop;')
        self.activate("discard;")
        self.assertEqual(self.outcome(filters=filters).copies, (Copy("", "F"),))

    def test_sieve_before_then_the_users_script(self) -> None:
        filters = self.before('require ["copy", "fileinto"]; fileinto :copy "Archive";')
        self.activate('require "fileinto"; fileinto "Work";')
        self.assertEqual(self.outcome(filters=filters).copies, (Copy("Archive"), Copy("Work")))

    def test_sieve_before_that_files_ends_the_sequence_as_in_pigeonhole(self) -> None:
        filters = self.before('require "fileinto"; if header :contains "subject" "report" { fileinto "Spam"; }')
        self.activate("discard;")
        self.assertEqual(self.outcome(filters=filters).copies, (Copy("Spam"),))

    def test_sieve_before_alone(self) -> None:
        filters = self.before('require "fileinto"; fileinto "Sorted";')
        self.assertEqual(self.outcome(filters=filters).copies, (Copy("Sorted"),))

    def test_sieve_before_that_does_not_compile_is_a_configuration_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.before('require "fileinto";\nfileinto\n')
        self.assertIn("sieve_before", str(caught.exception))
        self.assertIn("before.sieve:", str(caught.exception))


class FolderNameTests(unittest.TestCase):
    def test_names_as_dovecot_stores_them(self) -> None:
        self.assertEqual(maildir_folder("INBOX"), "")
        self.assertEqual(maildir_folder("inbox"), "")
        self.assertEqual(maildir_folder("Work/Clients"), "Work.Clients")
        self.assertEqual(maildir_folder("Entwürfe"), "Entw&APw-rfe")
        self.assertEqual(maildir_folder("R&D"), "R&-D")
        self.assertEqual(maildir_folder("日本語/メール"), "&ZeVnLIqe-.&MOEw,DDr-")

    def test_refused_names(self) -> None:
        for name in ["", "A.B", "..", "../x", "A/../B", "A//B", "/A", "A/", "Tab\there", "x\x7f", "~root", "a" * 300]:
            with self.subTest(name=name), self.assertRaises(FolderError):
                maildir_folder(name)

    @settings(max_examples=500, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=40))
    def test_no_name_escapes_the_home(self, name: str) -> None:
        home = Path("/srv/mail/example.test/alice")
        try:
            folder = maildir_folder(name)
        except FolderError:
            return
        path = home / ("." + folder) if folder else home
        self.assertEqual(os.path.normpath(path), str(path))
        self.assertIn(path.parent, (home, home.parent))
        self.assertNotIn("/", folder)
        self.assertNotIn("", folder.split(".") if folder else [])

    def test_flags_as_maildir_info(self) -> None:
        self.assertEqual(maildir_flags(["\\Seen", "\\flagged", "\\Answered", "\\Deleted", "\\Draft", "$Work"]), "DFRST")
        self.assertEqual(maildir_flags([]), "")


class DovecotDifferentialTests(unittest.TestCase):
    """Our modified UTF-7 against Dovecot's own (doveadm mailbox mutf7)."""

    def setUp(self) -> None:
        if DOVEADM is None:
            raise unittest.SkipTest("doveadm is not installed (Debian: dovecot-core)")
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.config = base / "dovecot.conf"
        self.config.write_text(f"protocols =\nmail_location = maildir:{base}/mail\n")

    def doveadm(self, names: list[str]) -> list[str]:
        proc = subprocess.run(
            [DOVEADM, "-c", str(self.config), "mailbox", "mutf7", *names],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout.splitlines()

    def test_fixed_names(self) -> None:
        names = ["Entwürfe", "R&D", "日本語", "a&b&", "Ça va?", "€uro", "😀 emoji", "mixed ü&ö"]
        self.assertEqual([mutf7(n) for n in names], self.doveadm(names))

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
                    min_size=1, max_size=10))
    def test_generated_names(self, names: list[str]) -> None:
        names = [n for n in names if n.strip() and not n.startswith("-") and "\n" not in n]
        if names:
            self.assertEqual([mutf7(n) for n in names], self.doveadm(names))


class PigeonholeDifferentialTests(FiltersTestCase):
    """The folders and flags sieve-test reports, mapped, are the copies we return."""

    SCRIPTS = [
        'require "fileinto"; fileinto "Work/Clients";',
        'require ["fileinto", "copy"]; fileinto :copy "A"; fileinto "B/C";',
        'require ["fileinto", "imap4flags"]; setflag "\\\\Seen"; fileinto "Read"; keep;',
        'require ["imap4flags"]; addflag ["\\\\Flagged", "\\\\Answered"];',
        'require "fileinto"; if header :contains "subject" "report" { fileinto "Reports"; stop; } discard;',
        'require "fileinto"; fileinto "Entwürfe";',
        'redirect "boss@elsewhere.test";',
        "discard;",
        'require ["copy"]; redirect :copy "a@elsewhere.test"; redirect "b@elsewhere.test";',
    ]

    def setUp(self) -> None:
        if SIEVE_TEST is None:
            raise unittest.SkipTest("sieve-test is not installed (Debian: dovecot-sieve)")
        super().setUp()
        self.pigeonhole = Pigeonhole()
        self.addCleanup(self.pigeonhole.close)

    def test_outcome_mapping_matches_sieve_test(self) -> None:
        from mailx.filters import Envelope

        envelope = Envelope("friend@sender.test", "alice@example.test", "alice@example.test")
        for i, script in enumerate(self.SCRIPTS):
            with self.subTest(script=script):
                status, explicit, implicit = self.pigeonhole.run(script.encode(), HEADER + BODY, envelope)
                self.assertEqual(status, "ok")
                expected = set()
                redirects = set()
                for action in explicit + implicit:
                    if action[0] == "store":
                        folder = "" if action[1] == "INBOX" else maildir_folder(action[1])
                        expected.add(Copy(folder, maildir_flags(action[2])))
                    elif action[0] == "redirect":
                        redirects.add(action[1])
                self.activate(script, name=f"s{i}")
                outcome = self.outcome()
                self.assertEqual(set(outcome.copies), expected)
                self.assertEqual(set(outcome.redirects), redirects)

    def test_canonical_reader_sees_flags(self) -> None:
        # The oracle's reader itself, on a fixed listing (a test that cannot pass vacuously).
        listing = " * store message in folder: A\n        + add IMAP flags: \\seen\n"
        self.assertEqual(canonical_pigeonhole("Performed actions:\n" + listing), ("ok", (("store", "A", ("\\seen",)),), ()))


class BodyFastPathTests(unittest.TestCase):
    """The one-part shortcut of the body test gives what parsing the message gives."""

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        content_type=st.sampled_from([None, "text/plain", "text/plain; charset=utf-8", "text/html; charset=\"latin-1\"",
                                      "TEXT/PLAIN; charset=bogus-charset", "application/octet-stream", "text/plain; charset"]),
        encoding=st.sampled_from([None, "7bit", "8bit", "binary"]),
        body=st.binary(max_size=200),
        content=st.sampled_from([None, ("text",), ("text/plain",), ("",), ("application",)]),
    )
    def test_same_text_as_the_full_parse(self, content_type, encoding, body, content) -> None:
        from mailx.filters import interpreter

        head = b"Subject: x\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n".encode()
        if encoding:
            head += f"Content-Transfer-Encoding: {encoding}\r\n".encode()
        message = interpreter.Message.from_bytes(head + b"\r\n" + body)
        tags = {"content": content} if content else {}
        fast = interpreter._Run(message, interpreter.Envelope("a@b.test", "c@d.test"), lambda n: False)
        slow = interpreter._Run(message, interpreter.Envelope("a@b.test", "c@d.test"), lambda n: False)
        slow._single_part = lambda: None
        self.assertEqual(fast._body(tags), slow._body(tags))
