# -*- test-case-name: tests.test_trace -*-
"""``mailxctl trace ID`` against a running server (SPEC section 13).

The server runs as a twistd subprocess where the story spans attempts or a
restart (the record is then read from its files, as mailxctl does), in this
process otherwise; the loopback DNS server gives the sender an SPF record
and outside.test an MX, and an SMTP sink plays that MX, answering 451 as
scripted.  The writer's own promises (rotation, pruning by age, a torn
last line) are checked on `TraceRecord` with a clock the test sets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailx.admin import cli
from mailx.observe import trace
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.server import (
    LineClient,
    ServerProcess,
    capture_log,
    free_port,
    start_server,
    write_config,
)
from mailx.testing.sink import start_sink
from tests.test_forwarding import ZONES, config_overrides, wait_until

CHECKS = {"spf": True, "dkim": True, "dmarc": "enforce"}


def message(subject: str) -> bytes:
    return (
        "From: Alice <alice@good.test>\r\n"
        "To: boss@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject}@good.test>\r\n"
        "\r\n"
        "Hello.\r\n"
    ).encode()


def send(port: int, sender: str, recipients: list[str], data: bytes) -> tuple[str, list[int]]:
    """One transaction (blocking): the queue ID of the 250 and each RCPT's code."""
    client = LineClient(port)
    try:
        client.reply()
        client.command(b"EHLO client.good.test")
        code, _ = client.command(f"MAIL FROM:<{sender}>".encode())
        assert code == 250, code
        codes = [client.command(f"RCPT TO:<{r}>".encode())[0] for r in recipients]
        client.command(b"DATA")
        code, text = client.command(data.rstrip(b"\r\n") + b"\r\n.")
        assert code == 250, (code, text)
        return re.search(rb"queued as (\S+)", text)[1].decode(), codes
    finally:
        client.close()


class TraceCase(unittest.TestCase):
    timeout = 120

    def mailxctl(self, config: Path, *argv: str) -> tuple[int, str, str]:
        """mailxctl in-process: (exit status, stdout, stderr)."""
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main(["-c", str(config), *argv])
        return status, stdout.getvalue(), stderr.getvalue()

    def steps(self, config: Path, ident: str) -> list[dict[str, Any]]:
        status, out, _ = self.mailxctl(config, "trace", ident, "--json")
        if status != 0:
            return []
        [found] = json.loads(out)["messages"]
        return found["steps"]

    def story_until(self, config: Path, ident: str, done: Any) -> defer.Deferred:
        """The steps once ``done(steps)`` holds (the record is written about once a second)."""
        seen: list[list[dict[str, Any]]] = [[]]

        def check() -> bool:
            seen[0] = self.steps(config, ident)
            return bool(seen[0]) and done(seen[0])

        return wait_until(check, timeout=30).addCallback(lambda _: seen[0])


def deliveries(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s["fields"] for s in steps if s["event"] == "delivery"]


def position(steps: list[dict[str, Any]], pattern: str) -> int:
    """Where the first step whose text matches ``pattern`` is."""
    for n, step in enumerate(steps):
        if re.search(pattern, step["text"]):
            return n
    raise AssertionError(f"no step matches {pattern!r}: {[s['text'] for s in steps]}")


class ForwardedMessageTests(TraceCase):
    """Forwarded, answered 451 twice, then delivered: every attempt in the story."""

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.port = free_port()
        overrides = config_overrides(self.dns.port, self.sink.port)  # retry: [1s]
        overrides["listen"] = {"smtp": [f"tcp:{self.port}:interface=127.0.0.1"]}
        overrides["authentication"] = CHECKS
        self.config = write_config(Path(self.mktemp()).absolute(), overrides)
        self.process = ServerProcess(self.config, self.port)
        self.addCleanup(self.process.kill)

    @defer.inlineCallbacks
    def test_deferred_twice_then_delivered(self) -> None:
        self.sink.script("rcpt", "451 4.7.1 Greylisted", "451 4.7.1 Greylisted")
        yield deferToThread(self.process.start)
        qid, codes = yield deferToThread(
            send, self.port, "alice@good.test", ["boss@example.test"], message("greylisted")
        )
        self.assertEqual(codes, [250])
        yield self.sink.wait_for(1)
        steps = yield self.story_until(
            self.config, qid, lambda s: "removed from the queue" in s[-1]["text"]
        )
        attempts = deliveries(steps)
        self.assertEqual([d["status"] for d in attempts], ["deferred", "deferred", "sent"])
        self.assertEqual([d["attempts"] for d in attempts], [1, 2, 3])
        for attempt in attempts:
            self.assertEqual(attempt["rcpt"], "someone@outside.test")
            self.assertIn("mx.outside.test", attempt["relay"])
            self.assertIn("tls", attempt)
        self.assertEqual(attempts[0]["reply"], "451 4.7.1 Greylisted")
        self.assertRegex(attempts[2]["reply"], r"^250 ")
        order = [
            position(steps, r"^connect from 127\.0\.0\.1"),
            position(steps, r"from=<alice@good\.test>.* helo=client\.good\.test"),
            position(steps, r"^to=<boss@example\.test> accepted: forward someone@outside\.test"),
            position(steps, r"^accepted .*spf=pass"),
            position(steps, r"^queued for forwarding"),
            position(steps, r"status=deferred"),
            position(steps, r"status=sent"),
            position(steps, r"^done: 1 delivered, 0 failed"),
        ]
        self.assertEqual(order, sorted(order))
        for step in steps:
            self.assertNotIn("Unable to format", step["text"])
        [verdict] = [s for s in steps if s["event"] == "message"]
        self.assertEqual(verdict["fields"]["checks"]["spf"], "pass")
        self.assertEqual(verdict["fields"]["message_id"], "<greylisted@good.test>")

    @defer.inlineCallbacks
    def test_a_bounce_and_its_delivery_are_in_the_story(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 No such user", address="someone@outside.test")
        yield deferToThread(self.process.start)
        qid, _ = yield deferToThread(
            send, self.port, "alice@good.test", ["boss@example.test"], message("bounced")
        )
        steps = yield self.story_until(
            self.config,
            qid,
            lambda s: any(x["id"] == qid + "B" and x["event"] == "delivery" for x in s),
        )
        [failed] = [d for d in deliveries(steps) if d["qid"] == qid]
        self.assertEqual((failed["status"], failed["reply"]), ("bounced", "550 5.1.1 No such user"))
        [notice] = [d for d in deliveries(steps) if d["qid"] == qid + "B"]
        self.assertEqual((notice["status"], notice["rcpt"]), ("sent", "alice@good.test"))
        self.assertLess(
            position(steps, r"status=bounced"), position(steps, rf"bounce notice {qid}B queued")
        )

    @defer.inlineCallbacks
    def test_by_message_id_the_same_story_and_the_text_aligned(self) -> None:
        yield deferToThread(self.process.start)
        qid, _ = yield deferToThread(
            send, self.port, "alice@good.test", ["boss@example.test"], message("aligned")
        )
        yield self.sink.wait_for(1)
        by_qid = yield self.story_until(
            self.config, qid, lambda s: any(d["status"] == "sent" for d in deliveries(s))
        )
        self.assertEqual(self.steps(self.config, "<aligned@good.test>"), by_qid)
        status, out, _ = self.mailxctl(self.config, "trace", qid)
        self.assertEqual(status, 0)
        heading, *lines = out.rstrip("\n").split("\n")
        self.assertIn(f"message {qid}, Message-ID <aligned@good.test>", heading)
        self.assertEqual(len(lines), len(by_qid))
        stamp = re.compile(r"^  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  \S+ +\S")
        for line in lines:
            self.assertRegex(line, stamp)
        # The text column starts at the same place on every line.
        starts = {stamp.match(line).end() - 1 for line in lines}
        self.assertEqual(len(starts), 1)


class RefusedRecipientTests(TraceCase):
    @defer.inlineCallbacks
    def test_one_recipient_refused_at_rcpt_the_other_filed(self) -> None:
        server = start_server(self)
        config = server.config.source
        qid, codes = yield deferToThread(
            send,
            server.port,
            "someone@sender.test",
            ["alice@example.test", "nobody@example.test"],
            message("half"),
        )
        self.assertEqual(codes, [250, 550])
        steps = yield self.story_until(
            config, qid, lambda s: any(x["event"] == "delivery" for x in s)
        )
        decisions = [s["fields"] for s in steps if s["event"] == "rcpt"]
        self.assertEqual(
            [(d["rcpt"], d["result"]) for d in decisions],
            [("alice@example.test", "accepted"), ("nobody@example.test", "refused")],
        )
        self.assertEqual(decisions[1]["code"], "5.1.1")
        self.assertRegex(decisions[1]["reply"], r"^550 5\.1\.1 ")
        [filed] = deliveries(steps)
        self.assertEqual(filed["kind"], "maildir")
        self.assertTrue(Path(filed["path"]).is_file())
        self.assertEqual(Path(filed["path"]).parent, server.maildir("alice") / "new")

    @defer.inlineCallbacks
    def test_the_text_log_links_the_session_and_the_queue_id(self) -> None:
        lines = capture_log(self)
        server = start_server(self)
        qid, _ = yield deferToThread(
            send, server.port, "someone@sender.test", ["alice@example.test"], message("link")
        )
        steps = yield self.story_until(
            server.config.source, qid, lambda s: any(x["event"] == "delivery" for x in s)
        )
        [session] = {s["fields"]["session"] for s in steps if "session" in s["fields"]}
        links = [line for line in lines if line.startswith(f"{qid}: session={session} ")]
        self.assertEqual(len(links), 1)
        self.assertIn(f"{session}: connect from 127.0.0.1:", "\n".join(lines))

    @defer.inlineCallbacks
    def test_an_unknown_id_exits_1(self) -> None:
        server = start_server(self)
        status, out, _ = yield deferToThread(
            lambda: self.mailxctl(server.config.source, "trace", "<nothing@nowhere.test>")
        )
        self.assertEqual(status, 1)
        self.assertIn("no message <nothing@nowhere.test> in the trace record", out)

    def test_keep_days_0_writes_no_record(self) -> None:
        server = start_server(self, {"logging": {"trace": {"keep_days": 0}}})
        self.assertIsNone(server.service.trace)
        self.assertFalse((server.config.paths.spool / "trace").exists())


class FilterActionTests(TraceCase):
    """Each filter action is one step of the story, with its mailbox and where it went."""

    @defer.inlineCallbacks
    def test_fileinto_and_discard_are_in_the_story(self) -> None:
        server = start_server(self)
        for mailbox, script in (
            ("alice", 'require ["fileinto", "imap4flags"];\nfileinto :flags "\\\\Flagged" "Work";\n'),
            ("bob", "discard;\n"),
        ):
            home = server.maildir(mailbox)
            (home / "sieve").mkdir(parents=True)
            (home / "sieve" / "main.sieve").write_text(script)
            os.symlink("sieve/main.sieve", home / ".dovecot.sieve")
        qid, _ = yield deferToThread(
            send, server.port, "someone@sender.test", ["team@example.test"], message("sorted")
        )
        steps = yield self.story_until(
            server.config.source, "<sorted@good.test>",
            lambda s: any(x["event"] == "delivery" for x in s),
        )
        actions = [
            {k: s["fields"].get(k) for k in ("qid", "mailbox", "action", "folder", "flags")}
            for s in steps if s["event"] == "filter"
        ]
        self.assertEqual(actions, [
            {"qid": qid, "mailbox": "alice@example.test", "action": "fileinto", "folder": "Work", "flags": "F"},
            {"qid": qid, "mailbox": "bob@example.test", "action": "discard", "folder": None, "flags": None},
        ])
        # Before the copy it made is logged as filed.
        self.assertLess(position(steps, r"filter of alice@example\.test: fileinto Work"),
                        position(steps, r"delivered to=<alice@example\.test> mailbox=example\.test/alice folder=Work"))


class SubmittedMessageTests(TraceCase):
    """A submitted message is found by its Message-ID, the one mailx added too."""

    limits: dict[str, Any] = {}  # SubmissionCase's: none beyond its own

    def setUp(self) -> None:
        from tests.test_submission import SubmissionCase

        SubmissionCase.setUp(self)  # type: ignore[arg-type]  # its server, certificate, accounts

    @defer.inlineCallbacks
    def test_trace_by_the_message_id_mailx_added(self) -> None:
        from tests.test_submission import PASSWORD, SubmissionCase, submitted

        def submit() -> None:
            with SubmissionCase.client(self) as c:  # type: ignore[arg-type]
                c.login("alice@example.test", PASSWORD)
                c.sendmail("alice@example.test", ["bob@example.test"], submitted())

        yield deferToThread(submit)
        [filed] = self.server.messages("bob")
        message_id = re.search(rb"\nMessage-ID: (<[^>]+>)", filed)[1].decode()
        steps = yield self.story_until(
            self.server.config.source, message_id,
            lambda s: any(x["event"] == "delivery" for x in s),
        )
        [line] = [s for s in steps if "submitted by alice@example.test" in s["text"]]
        self.assertEqual(line["fields"]["message_id"], message_id)
        [delivery] = deliveries(steps)
        self.assertEqual(Path(delivery["path"]).parent, self.server.maildir("bob") / "new")


class RestartTests(TraceCase):
    """A message deferred, the server killed (-9) and started again, then delivered."""

    def setUp(self) -> None:
        self.dns = start_dns_server(ZONES)
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.port = free_port()
        overrides = config_overrides(self.dns.port, self.sink.port, retry=["1h"])
        overrides["listen"] = {"smtp": [f"tcp:{self.port}:interface=127.0.0.1"]}
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory, overrides)
        self.process = ServerProcess(self.config, self.port)
        self.addCleanup(self.process.kill)

    @defer.inlineCallbacks
    def test_the_story_goes_on_across_a_restart(self) -> None:
        self.sink.script("rcpt", "451 4.3.0 try later")
        yield deferToThread(self.process.start)
        first_pid = self.process.proc.pid
        qid, _ = yield deferToThread(
            send, self.port, "alice@sender.test", ["boss@example.test"], message("restart")
        )
        before = yield self.story_until(
            self.config, qid, lambda s: any(d["status"] == "deferred" for d in deliveries(s))
        )
        self.process.kill()
        yield deferToThread(self.process.start)
        self.assertNotEqual(self.process.proc.pid, first_pid)
        (self.directory / "spool" / "queue" / ".flush").touch()  # the 1h retry, now
        yield self.sink.wait_for(1)
        after = yield self.story_until(
            self.config, qid, lambda s: any(d["status"] == "sent" for d in deliveries(s))
        )
        # What was recorded before the kill is all there, first, unchanged.
        self.assertEqual(after[: len(before)], before)
        self.assertEqual([d["status"] for d in deliveries(after)], ["deferred", "sent"])
        self.assertLess(position(after, r"^connect from"), position(after, "status=deferred"))


def event(when: float, qid: str = "Q1") -> dict[str, Any]:
    return {"log_time": when, "log_format": "{qid}: step", "log_namespace": "test", "qid": qid}


def noon(day: date) -> float:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()


class RecordFileTests(unittest.TestCase):
    """The files themselves: one a day, pruned by age, never a torn record read."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.today = date(2026, 12, 2)
        self.now = noon(self.today)
        self.record = trace.TraceRecord(
            self.directory, keep_days=7, clock=lambda: self.now, flush_seconds=0.05
        )

    def day_file(self, days_ago: int) -> Path:
        return self.directory / trace.file_name(self.today - timedelta(days=days_ago))

    def test_files_older_than_keep_days_are_removed_at_start(self) -> None:
        self.directory.mkdir()
        for days_ago in (10, 8, 7, 0):
            self.day_file(days_ago).write_text("")
        (self.directory / "notes.txt").write_text("not ours")
        self.record.start()
        self.addCleanup(self.record.stop)
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            sorted(["notes.txt", self.day_file(7).name, self.day_file(0).name]),
        )

    def test_a_new_day_gets_a_new_file_and_prunes_the_oldest(self) -> None:
        self.directory.mkdir()
        self.day_file(7).write_text("")
        self.record.start()
        self.record(event(self.now))
        tomorrow = self.now + 86400
        self.now = tomorrow
        self.record(event(tomorrow))
        self.record.stop()
        self.assertEqual(
            sorted(os.listdir(self.directory)), [self.day_file(0).name, self.day_file(-1).name]
        )
        for days_ago in (0, -1):
            [line] = self.day_file(days_ago).read_text().splitlines()
            self.assertEqual(json.loads(line)["qid"], "Q1")

    def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_line(self) -> None:
        self.directory.mkdir()
        self.day_file(0).write_text(json.dumps(event(self.now, "Q0")) + "\n" + '{"qid": "Q0", "log_t')
        self.record.start()
        self.record(event(self.now, "Q2"))
        self.record.stop()
        self.assertEqual(
            [r["qid"] for r in trace.read_records(self.directory)], ["Q0", "Q2"]
        )
        self.assertEqual(len(self.day_file(0).read_text().splitlines()), 3)

    def test_events_without_a_queue_or_session_id_are_not_kept(self) -> None:
        self.record.start()
        self.record({"log_time": self.now, "log_format": "mailx ready", "log_namespace": "x"})
        self.record({**event(self.now), "qid": None, "session": "S1"})
        self.record.stop()
        self.assertEqual([r["session"] for r in trace.read_records(self.directory)], ["S1"])

    def test_a_filter_event_by_queue_id_is_the_message_s(self) -> None:
        self.record.start()
        self.record(
            {"log_time": self.now, "log_format": "{queue_id} {note}", "queue_id": "Q3", "note": "x"}
        )
        self.record.stop()
        [kept] = trace.read_records(self.directory)
        self.assertEqual((kept["qid"], trace.text_of(kept)), ("Q3", "Q3 x"))

    def count_syncs(self) -> list[int]:
        """The fds the writer fdatasyncs, in order (the real sync still runs)."""
        synced: list[int] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            synced.append(fd)
            real(fd)

        self.patch(trace.os, "fdatasync", fdatasync)
        return synced

    def wait_for_lines(self, days_ago: int, n: int) -> None:
        for _ in range(400):
            path = self.day_file(days_ago)
            if path.exists() and len(path.read_bytes().splitlines()) >= n:
                return
            time.sleep(0.01)
        self.fail(f"{n} line(s) never written")

    def test_written_each_flush_synced_only_each_sync_interval_and_at_stop(self) -> None:
        synced = self.count_syncs()
        self.record.sync_seconds = 3600.0
        self.record.start()
        self.record(event(self.now, "Q1"))
        self.wait_for_lines(0, 1)  # handed to the kernel within a flush...
        self.record(event(self.now, "Q2"))
        self.wait_for_lines(0, 2)
        self.assertEqual(synced, [])  # ...but not synced before the interval
        self.record.stop()
        self.assertEqual(len(synced), 1)  # what is left is synced at stop
        self.assertEqual([r["qid"] for r in trace.read_records(self.directory)], ["Q1", "Q2"])

    def test_a_day_s_file_is_synced_before_it_is_closed(self) -> None:
        synced = self.count_syncs()
        self.record.sync_seconds = 3600.0
        self.record.start()
        self.record(event(self.now, "Q1"))
        self.wait_for_lines(0, 1)
        self.record(event(self.now + 86400, "Q2"))
        self.wait_for_lines(-1, 1)
        self.assertEqual(len(synced), 1)
        self.record.stop()
        self.assertEqual(len(synced), 2)

    def test_with_a_short_interval_writes_are_synced_as_they_come(self) -> None:
        synced = self.count_syncs()
        self.record.sync_seconds = 0.0
        self.record.start()
        self.addCleanup(self.record.stop)
        for n in range(3):
            self.record(event(self.now, f"Q{n}"))
            self.wait_for_lines(0, n + 1)
            for _ in range(400):
                if len(synced) > n:
                    break
                time.sleep(0.01)
        self.assertEqual(len(synced), 3)

    def test_the_directory_is_private(self) -> None:
        self.record.start()
        self.record.stop()
        self.assertEqual(self.directory.stat().st_mode & 0o777, 0o700)

    def test_whatever_a_field_holds_its_event_is_one_line_found_by_its_ids(self) -> None:
        """orjson writes most lines, the json module those orjson refuses (a lone
        surrogate from a stranger's bytes, an integer past 64 bits): either way
        one line per event, and the reader's search finds it by its IDs."""
        odd: list[Any] = [
            "caf\u00e9 \u2028 line\nbreak \x00",
            "\udcff from surrogateescape",
            2**70,
            b"\xff\x00 bytes",
            {1: object(), "nested": [b"\x80", ("t", 1.5)]},
            float("nan"),
        ]
        self.record.start()
        for n, value in enumerate(odd):
            self.record({**event(self.now, f"Q{n}"), "message_id": f"<m{n}\u00e9@x>", "odd": value})
        self.record.stop()
        lines = self.day_file(0).read_bytes().split(b"\n")
        self.assertEqual(lines[-1], b"")
        self.assertEqual(len(lines) - 1, len(odd))
        for n in range(len(odd)):
            [found] = trace.story(self.directory, f"m{n}\u00e9@x")
            self.assertEqual(found["queue_id"], f"Q{n}")
        by_qid = {r["qid"]: r for r in trace.read_records(self.directory)}
        self.assertEqual(by_qid["Q0"]["odd"], odd[0])
        self.assertEqual(by_qid["Q2"]["odd"], 2**70)
        self.assertEqual(by_qid["Q3"]["odd"], "\\xff\x00 bytes")
        self.assertEqual(by_qid["Q4"]["odd"]["nested"], ["\\x80", ["t", 1.5]])
        self.assertIsNone(by_qid["Q5"]["odd"])


class PruneProperties(unittest.TestCase):
    @settings(max_examples=50, deadline=None)
    @given(
        ages=st.sets(st.integers(min_value=-3, max_value=40), max_size=12),
        keep_days=st.integers(min_value=0, max_value=30),
    )
    def test_exactly_the_days_older_than_keep_days_go(self, ages: set[int], keep_days: int) -> None:
        directory = Path(tempfile.mkdtemp())
        try:
            today = date(2026, 3, 1)
            for age in ages:
                (directory / trace.file_name(today - timedelta(days=age))).write_text("")
            trace.prune(directory, keep_days, noon(today) + 3600 * 11.9)
            left = {
                (today - date.fromisoformat(name[6:16])).days for name in os.listdir(directory)
            }
            self.assertEqual(left, {a for a in ages if a <= keep_days})
        finally:
            shutil.rmtree(directory)

