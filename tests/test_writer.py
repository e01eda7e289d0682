# -*- test-case-name: tests.test_writer -*-
"""The Maildir writer process: framing, durable batches, failures, and its death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailx.inbound.spool import SPILL_AT, SpoolBuffer
from mailx.storage import maildir, writer_child
from mailx.storage.writer import (
    Filing,
    MaildirCopy,
    WriterClient,
    WriterGone,
    commit,
    decode_all,
    encode,
)


class FramingTests(unittest.TestCase):
    @given(
        st.lists(
            st.tuples(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.binary()),
            max_size=5,
        ),
        st.integers(min_value=1, max_value=50),
    )
    def test_frames_survive_any_split(self, frames: list, piece: int) -> None:
        stream = b"".join(encode(header, payload) for header, payload in frames)
        buffer, decoded = bytearray(), []
        for start in range(0, len(stream), piece):
            buffer += stream[start : start + piece]
            decoded += decode_all(buffer)
        self.assertEqual(decoded, frames)
        self.assertEqual(buffer, bytearray())


class CommitTests(unittest.TestCase):
    """The child's work, called directly."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.box = self.root / "example.test" / "alice"
        maildir.ensure_maildir(self.box)

    def request(self, number: int, name: str, head: bytes, body: bytes, folder: str | None = None) -> tuple:
        copy = {"maildir": str(self.box), "name": name, "folder": folder, "head": len(head)}
        return ({"id": number, "copies": [copy]}, head + body)

    def test_batch_writes_every_copy_with_lf_line_ends(self) -> None:
        answers = decode_all(bytearray(commit([
            self.request(1, "one", b"Delivered-To: a\n", b"Subject: x\r\n\r\nbody\r\n"),
            self.request(2, "two", b"Delivered-To: a\n", b"Subject: y\r\n\r\nbody\r\n", ".Junk"),
        ])))
        paths = [Path(answer["paths"][0]) for answer, _ in answers]
        self.assertEqual(paths[0].read_bytes(), b"Delivered-To: a\nSubject: x\n\nbody\n")
        self.assertEqual(paths[0].parent, self.box / "new")
        self.assertEqual(paths[1].parent, self.box / ".Junk" / "new")
        self.assertTrue(paths[0].name.endswith(f",S={paths[0].stat().st_size}"))
        self.assertEqual(os.listdir(self.box / "tmp"), [])

    def test_a_failing_request_answers_an_error_and_leaves_nothing(self) -> None:
        (self.box / "new").rmdir()
        (self.box / "new").write_text("not a directory")
        [(answer, _)] = decode_all(bytearray(commit([self.request(7, "x", b"", b"body\r\n")])))
        self.assertEqual(answer["id"], 7)
        self.assertIn("error", answer)
        self.assertEqual(os.listdir(self.box / "tmp"), [])


    def queue_with(self, *queue_ids: str) -> Path:
        queue = self.root / "queue"
        for queue_id in queue_ids:
            writer_child.write_entry(queue, {"id": queue_id, "recipients": []}, lambda: iter([b"m\r\n"]))
        return queue

    def record_fsyncs(self) -> list[Path]:
        synced: list[Path] = []
        real = maildir.fsync_directory
        self.patch(maildir, "fsync_directory", lambda d: (synced.append(Path(d)), real(d)))
        return synced

    def test_a_removal_rides_along_with_a_filing_uncounted_and_unsynced(self) -> None:
        queue = self.queue_with("65F00000000001", "65F00000000002")
        synced = self.record_fsyncs()
        removal = {"id": 3, "remove": {"queue": str(queue),
                                       "ids": ["65F00000000001", "65F00000000002", "65F00000000099"]}}
        answers = decode_all(bytearray(commit([
            self.request(1, "one", b"", b"body\r\n"), (removal, b"")])))
        self.assertEqual(answers[1][0], {"id": 3, "removed": [True, True, False]})
        self.assertIn("paths", answers[0][0])
        # The metric counts messages filed: the removal rides along uncounted.
        self.assertEqual(answers[0][0]["batch"], 1)
        # Unlinked; the queue directory not fsynced for it (at least once).
        self.assertEqual([p.name for p in queue.iterdir()], [".tmp"])
        self.assertNotIn(queue, synced)

    def test_a_removal_is_made_durable_by_the_next_entry_s_fsync_of_the_queue(self) -> None:
        queue = self.queue_with("65F00000000001")
        synced = self.record_fsyncs()
        removal = {"id": 1, "remove": {"queue": str(queue), "ids": ["65F00000000001"]}}
        [(answer, _)] = decode_all(bytearray(commit([(removal, b"")])))
        self.assertEqual((answer["removed"], synced), ([True], []))
        entry = {"queue": str(queue), "envelope": {"id": "65F00000000002", "recipients": []},
                 "head": 0, "body": True}
        [(filed, _)] = decode_all(bytearray(commit([({"id": 2, "entries": [entry]}, b"m\r\n")])))
        self.assertNotIn("error", filed)
        self.assertEqual(synced, [queue])  # the one fsync covers the earlier unlink too
        self.assertEqual(sorted(p.name for p in queue.iterdir()), [".tmp", "65F00000000002"])

    def test_a_removal_never_leaves_the_queue_directory(self) -> None:
        queue = self.queue_with("65F00000000001")
        outside = self.root / "elsewhere"
        outside.mkdir()
        removal = {"id": 1, "remove": {"queue": str(queue), "ids": ["../elsewhere", ".tmp", ""]}}
        [(answer, _)] = decode_all(bytearray(commit([(removal, b"")])))
        self.assertTrue(all(isinstance(r, str) and "not a queue ID" in r for r in answer["removed"]))
        self.assertTrue(outside.is_dir())


class ChildImportTests(unittest.TestCase):
    def test_the_child_imports_only_the_standard_library(self) -> None:
        # The child's start-up, as WriterClient runs it (-I -S, found by its path).
        root = str(Path(writer_child.__file__).resolve().parents[2])
        code = (
            f"import sys; sys.path.append({root!r}); import mailx.storage.writer_child; "
            "print(' '.join(sorted(m for m in sys.modules"
            " if m.partition('.')[0] not in sys.stdlib_module_names)))"
        )
        out = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        self.assertEqual(out, ["__main__", "mailx", "mailx.storage", "mailx.storage.maildir", "mailx.storage.writer_child"])


class WriterProcessTests(unittest.TestCase):
    """The real child process, driven by the server's client."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.box = self.root / "alice"
        maildir.ensure_maildir(self.box)
        self.writer = WriterClient(reactor)
        self.writer.start()
        self.addCleanup(self.writer.stop)

    def filing(self, name: str, head: bytes, body: SpoolBuffer) -> Filing:
        return Filing([MaildirCopy(self.box, name, head)], body=body)

    @defer.inlineCallbacks
    def test_small_and_spooled_bodies_are_filed(self) -> None:
        small = SpoolBuffer(self.root, "small")
        small.write(b"Subject: small\r\n\r\nhi\r\n")
        big = SpoolBuffer(self.root, "big")
        line = b"b" * 98 + b"\r\n"
        for _ in range(SPILL_AT // len(line) + 10):
            big.write(line)
        big.finish()
        self.assertIsNotNone(big.path)
        results = yield defer.gatherResults([
            self.writer.file(self.filing("s", b"X-Head: 1\n", small)),
            self.writer.file(self.filing("b", b"X-Head: 2\n", big)),
        ])
        [[small_path], [big_path]] = results
        self.assertEqual(small_path.read_bytes(), b"X-Head: 1\nSubject: small\n\nhi\n")
        self.assertEqual(big_path.read_bytes(), b"X-Head: 2\n" + line.replace(b"\r\n", b"\n") * (SPILL_AT // len(line) + 10))

    @defer.inlineCallbacks
    def test_a_dead_writer_fails_what_was_in_flight_and_is_restarted(self) -> None:
        body = SpoolBuffer(self.root, "m")
        body.write(b"Subject: m\r\n\r\nbody\r\n")
        yield self.writer.file(self.filing("first", b"", body))
        os.kill(self.writer._child.transport.pid, signal.SIGKILL)
        in_flight = self.writer.file(self.filing("lost", b"", body))
        yield self.assertFailure(in_flight, WriterGone)
        self.flushLoggedErrors()
        [path] = yield self.writer.file(self.filing("again", b"", body))
        self.assertTrue(path.exists())

    @defer.inlineCallbacks
    def test_the_child_removes_queue_entries_durably(self) -> None:
        queue = self.root / "queue"
        for queue_id in ("65F00000000001", "65F00000000002"):
            writer_child.write_entry(queue, {"id": queue_id, "recipients": []}, lambda: iter([b"m\r\n"]))
        results = yield self.writer.remove_entries(queue, ["65F00000000001", "65F00000000003"])
        self.assertEqual(results, [True, False])
        # Out of the queue at the answer: unlinked, the unlink fsynced.
        self.assertEqual(sorted(p.name for p in queue.iterdir()), [".tmp", "65F00000000002"])

    @defer.inlineCallbacks
    def test_a_removal_in_flight_when_the_writer_dies_fails_and_can_be_retried(self) -> None:
        queue = self.root / "queue"
        writer_child.write_entry(queue, {"id": "65F00000000001", "recipients": []}, lambda: iter([b"m\r\n"]))
        os.kill(self.writer._child.transport.pid, signal.SIGSTOP)
        removal = self.writer.remove_entries(queue, ["65F00000000001"])
        os.kill(self.writer._child.transport.pid, signal.SIGKILL)
        yield self.assertFailure(removal, WriterGone)
        self.flushLoggedErrors()
        results = yield self.writer.remove_entries(queue, ["65F00000000001"])
        self.assertEqual(results, [True])
        self.assertFalse((queue / "65F00000000001").exists())

    @defer.inlineCallbacks
    def test_the_child_runs_this_code_whatever_pythonpath_says(self) -> None:
        # A mailx elsewhere on PYTHONPATH must not be what files the mail.
        decoy = Path(self.mktemp()) / "mailx"
        decoy.mkdir(parents=True)
        (decoy / "__init__.py").write_text("raise SystemExit('the decoy mailx was imported')\n")
        yield self.writer.stop()
        self.patch(os, "environ", dict(os.environ, PYTHONPATH=str(decoy.parent)))
        self.writer.start()
        body = SpoolBuffer(self.root, "m")
        body.write(b"Subject: m\r\n\r\nbody\r\n")
        [path] = yield self.writer.file(self.filing("here", b"", body))
        self.assertEqual(path.read_bytes(), b"Subject: m\n\nbody\n")
        cmdline = Path(f"/proc/{self.writer._child.transport.pid}/cmdline").read_bytes().split(b"\0")
        self.assertEqual(cmdline[1:3], [b"-I", b"-S"])
