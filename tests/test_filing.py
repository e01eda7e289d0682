# -*- test-case-name: tests.test_filing -*-
"""The filing engine: one all-or-none request per message, group-committed.

What was the group committer's (one directory fsync per batch, a failing
request failing alone, a failed directory fsync failing the requests that
renamed into it, stop finishing what was sent) now holds for the writer
child's `commit`; and a request is whole or absent, a crash included.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailx.storage import maildir, writer_child
from mailx.storage.queue import Envelope, Queue, Recipient, open_data
from mailx.storage.writer import (
    Filing,
    MaildirCopy,
    QueueCopy,
    WriterClient,
    WriterGone,
    commit,
    decode_all,
)


def answers(frames: list) -> list[dict]:
    return [answer for answer, _ in decode_all(bytearray(commit(frames)))]


class EngineTests(unittest.TestCase):
    """The child's work, called directly."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.alice = self.root / "mail" / "example.test" / "alice"
        self.bob = self.root / "mail" / "example.test" / "bob"
        for box in (self.alice, self.bob):
            maildir.ensure_maildir(box)
        self.queue = Queue(self.root / "queue")
        self.queue.prepare()
        self.synced: list[Path] = []
        self.fail_sync: set[Path] = set()
        real = maildir.fsync_directory

        def fsync_directory(path: Path) -> None:
            if Path(path) in self.fail_sync:
                raise OSError(5, "I/O error")
            self.synced.append(Path(path))
            real(path)

        self.patch(maildir, "fsync_directory", fsync_directory)

    def envelope(self, queue_id: str = "Q1") -> Envelope:
        return Envelope(
            id=queue_id,
            sender="s@remote.test",
            created=1700000000.5,
            client="helo [192.0.2.1]",
            recipients=[Recipient("x@elsewhere.test", "team@example.test", "s@remote.test", "Delivered-To: team@example.test\r\n")],
        )

    def request(self, number: int, filing: Filing) -> tuple:
        return filing.request(number)

    def copy(self, box: Path, name: str, **kw) -> MaildirCopy:
        return MaildirCopy(box, name, b"Delivered-To: a\n", **kw)

    def test_requests_of_one_batch_share_one_directory_sync(self) -> None:
        body = b"Subject: x\r\n\r\nbody\r\n"
        frames = [self.request(n, Filing([self.copy(self.alice, f"m{n}")], body=body)) for n in range(5)]
        self.synced.clear()
        found = answers(frames)
        self.assertEqual([a["id"] for a in found], [0, 1, 2, 3, 4])
        self.assertTrue(all("paths" in a for a in found))
        self.assertEqual(found[0]["batch"], 5)
        self.assertEqual(self.synced, [self.alice / "new"])

    def test_requests_of_a_batch_are_filed_at_once(self) -> None:
        # Their fsyncs must wait together to share the journal's commits;
        # one after another, the barrier would never fill.
        barrier = threading.Barrier(4, timeout=5)
        real = maildir.stage_message

        def stage(*args, **kwargs):
            barrier.wait()
            return real(*args, **kwargs)

        self.patch(maildir, "stage_message", stage)
        boxes = [self.alice, self.bob] * 2
        frames = [
            self.request(n, Filing([self.copy(box, f"m{n}")], body=b"\r\nx\r\n"))
            for n, box in enumerate(boxes)
        ]
        self.synced.clear()
        found = answers(frames)
        self.assertEqual([len(a.get("paths", ())) for a in found], [1, 1, 1, 1])
        self.assertEqual(sorted(self.synced), sorted([self.alice / "new", self.bob / "new"]))

    def test_a_failing_request_fails_alone(self) -> None:
        (self.bob / "new").rmdir()
        (self.bob / "new").write_text("not a directory")
        bad = self.request(1, Filing([self.copy(self.bob, "b")], body=b"\r\nbody\r\n"))
        good = self.request(2, Filing([self.copy(self.alice, "a")], body=b"\r\nbody\r\n"))
        first, second = answers([bad, good])
        self.assertIn("error", first)
        self.assertEqual(len(second["paths"]), 1)
        self.assertEqual(os.listdir(self.bob / "tmp"), [])

    def test_failed_directory_sync_fails_and_takes_back_the_requests_that_renamed_into_it(self) -> None:
        self.fail_sync.add(self.bob / "new")
        broken = self.request(1, Filing([self.copy(self.alice, "a1"), self.copy(self.bob, "b1")], body=b"\r\nx\r\n"))
        fine = self.request(2, Filing([self.copy(self.alice, "a2")], body=b"\r\nx\r\n"))
        first, second = answers([broken, fine])
        self.assertIn("fsync", first["error"])
        self.assertEqual(len(second["paths"]), 1)
        # All or none: the broken request's copy in alice's Maildir went too.
        self.assertEqual([n.split(",")[0] for n in os.listdir(self.alice / "new")], ["a2"])
        self.assertEqual(os.listdir(self.bob / "new"), [])

    def test_copies_and_a_queue_entry_in_one_request(self) -> None:
        header = b"Subject: x\r\n"
        body = b"\r\nbody \xc3\xa9\r\n"
        envelope = self.envelope()
        filing = Filing(
            [self.copy(self.alice, "a"), self.copy(self.bob, "b", folder=".Work.Clients", flags="FS")],
            [QueueCopy(self.queue.root, envelope, header)],
            body,
        )
        [answer] = answers([self.request(1, filing)])
        paths = filing.filed(answer)
        self.assertEqual(paths[0].parent, self.alice / "new")
        self.assertEqual(paths[0].read_bytes(), b"Delivered-To: a\n\nbody \xc3\xa9\n")
        # Dovecot's layout: a flat .Work.Clients folder, flags in the info of a cur/ name.
        folder = self.bob / ".Work.Clients"
        self.assertTrue((folder / "maildirfolder").exists())
        self.assertEqual(paths[1].parent, folder / "cur")
        self.assertTrue(paths[1].name.endswith(f",S={paths[1].stat().st_size}:2,FS"))
        # The queue's on-disk format, unchanged: the queue reads it back as written.
        self.assertEqual((envelope.size, envelope.eight_bit), (len(header + body), True))
        self.assertEqual(self.queue.load("Q1"), envelope)
        self.assertEqual(
            (self.queue.data_path("Q1")).read_bytes(), envelope.to_json() + header + body
        )
        self.assertEqual(os.listdir(self.queue.root / ".tmp"), [])

    def test_a_failing_queue_entry_takes_the_copies_back(self) -> None:
        self.queue.enqueue(self.envelope(), [b"old"])
        filing = Filing(
            [self.copy(self.alice, "a"), self.copy(self.bob, "b")],
            [QueueCopy(self.queue.root, self.envelope(), b"Subject: x\r\n")],
            b"\r\nbody\r\n",
        )
        [answer] = answers([self.request(1, filing)])
        self.assertEqual(answer["kind"], "FileExistsError")
        for box in (self.alice, self.bob):
            self.assertEqual(os.listdir(box / "new"), [])
            self.assertEqual(os.listdir(box / "tmp"), [])
        with open_data(self.queue.data_path("Q1")) as f:
            self.assertEqual(f.read(), b"old")

    def test_a_failing_second_mailbox_takes_the_first_copy_and_the_entry_back(self) -> None:
        (self.bob / "tmp").rmdir()
        (self.bob / "tmp").write_text("not a directory")
        filing = Filing(
            [self.copy(self.alice, "a"), self.copy(self.bob, "b")],
            [QueueCopy(self.queue.root, self.envelope(), b"Subject: x\r\n")],
            b"\r\nbody\r\n",
        )
        [answer] = answers([self.request(1, filing)])
        self.assertIn("error", answer)
        self.assertEqual(os.listdir(self.alice / "new"), [])
        self.assertEqual(os.listdir(self.alice / "tmp"), [])
        self.assertEqual(self.queue.ids(), [])

    def test_a_folder_name_that_is_no_folder_is_refused(self) -> None:
        for folder in ("../x", ".a/../../b", "Junk", ".", ".a..b"):
            filing = Filing([self.copy(self.alice, "a", folder=folder)], body=b"\r\nx\r\n")
            [answer] = answers([self.request(1, filing)])
            self.assertIn("not a Maildir++ folder", answer["error"])
        self.assertEqual(sorted(os.listdir(self.alice)), ["cur", "new", "tmp"])

    def test_take_back_removes_what_a_request_renamed(self) -> None:
        filing = Filing(
            [self.copy(self.alice, "a", folder=".Junk"), self.copy(self.bob, "b", flags="S")],
            [QueueCopy(self.queue.root, self.envelope(), b"Subject: x\r\n")],
            b"\r\nbody\r\n",
        )
        request, payload = self.request(1, filing)
        writer_child.file_request(request, payload)
        older = self.envelope("Q2")
        self.queue.enqueue(older, [b"another message's entry"])
        request["entries"].append(dict(request["entries"][0], envelope=dict(request["entries"][0]["envelope"], id="Q2", created=1.0)))
        removed = writer_child.take_back(request)
        self.assertEqual(len(removed), 3)
        self.assertEqual(os.listdir(self.alice / ".Junk" / "new"), [])
        self.assertEqual(os.listdir(self.bob / "cur"), [])
        # An entry of that ID that this request did not write is left alone.
        self.assertEqual(self.queue.ids(), ["Q2"])


class WriterDeathTests(unittest.TestCase):
    """Killing the child mid-request: no partial copies, the request fails (451)."""

    timeout = 60

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.alice = self.root / "alice"
        self.bob = self.root / "bob"
        for box in (self.alice, self.bob):
            maildir.ensure_maildir(box)
        self.writer = WriterClient(reactor)
        self.writer.start()
        self.addCleanup(self.writer.stop)

    @defer.inlineCallbacks
    def test_kill_mid_request_leaves_no_copy(self) -> None:
        # The body is a FIFO: the child blocks reading it for its second copy,
        # with the first one written, so the kill lands mid-request.
        fifo = self.root / "body"
        os.mkfifo(fifo)

        class Body:
            path = fifo

        filing = Filing(
            [MaildirCopy(self.alice, "a", b"X: 1\n"), MaildirCopy(self.bob, "b", b"X: 2\n")],
            body=Body(),
        )
        in_flight = self.writer.file(filing)
        deadline = time.monotonic() + 20
        fd = None
        while fd is None and time.monotonic() < deadline:
            try:  # ENXIO until the child opens its end
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                yield deferLater(reactor, 0.01, lambda: None)
        os.write(fd, b"\r\nbody\r\n")
        os.close(fd)
        while not os.listdir(self.alice / "tmp") and time.monotonic() < deadline:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(os.listdir(self.alice / "tmp")), 1)  # mid-request
        os.kill(self.writer._child.transport.pid, signal.SIGKILL)
        yield self.assertFailure(in_flight, WriterGone)
        self.flushLoggedErrors()
        for box in (self.alice, self.bob):
            self.assertEqual(os.listdir(box / "new"), [])

    @defer.inlineCallbacks
    def test_what_a_dead_child_renamed_is_taken_back_before_the_failure(self) -> None:
        # A child killed between two renames: simulated by a copy of the
        # request's name already in place when the child dies.
        os.kill(self.writer._child.transport.pid, signal.SIGSTOP)
        filing = Filing([MaildirCopy(self.alice, "n1", b"X: 1\n")], body=b"\r\nbody\r\n")
        in_flight = self.writer.file(filing)
        planted = maildir.write_message(self.alice, "n1", [b"X: 1\n\nbody\n"])
        os.kill(self.writer._child.transport.pid, signal.SIGKILL)
        yield self.assertFailure(in_flight, WriterGone)
        self.flushLoggedErrors()
        self.assertFalse(planted.exists())
        # The next message starts a new child and is filed.
        again = Filing([MaildirCopy(self.alice, "n2", b"")], body=b"\r\nok\r\n")
        [path] = yield self.writer.file(again)
        self.assertEqual(path.read_bytes(), b"\nok\n")

    @defer.inlineCallbacks
    def test_stop_finishes_what_was_sent(self) -> None:
        d = self.writer.file(Filing([MaildirCopy(self.alice, "s", b"")], body=b"\r\nx\r\n"))
        stopped = self.writer.stop()
        yield self.assertFailure(
            self.writer.file(Filing([MaildirCopy(self.alice, "t", b"")], body=b"x")), WriterGone
        )
        [path] = yield d
        yield stopped
        self.assertTrue(path.exists())
