# -*- test-case-name: tests.test_committer -*-
"""The group committer: a batch's jobs at once, each directory fsynced once per batch."""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailx.storage.committer import GroupCommitter


class GroupCommitterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.synced: list[Path] = []
        self.fail_sync: set[Path] = set()
        self.committer = GroupCommitter(reactor, self.fsync_directory)
        self.committer.start()
        self.addCleanup(self.committer.stop)

    def fsync_directory(self, path: Path) -> None:
        if path in self.fail_sync:
            raise OSError(5, "I/O error")
        self.synced.append(path)

    @defer.inlineCallbacks
    def test_jobs_submitted_together_share_one_directory_sync(self) -> None:
        gate = threading.Event()
        first = self.committer.submit(lambda batch: gate.wait(5) and "first")

        def job(n: int):
            def run(batch):
                batch.sync_later(Path("/maildir/new"))
                return n

            return run

        rest = [self.committer.submit(job(n)) for n in range(5)]
        gate.set()
        results = yield defer.gatherResults([first, *rest])
        self.assertEqual(results, ["first", 0, 1, 2, 3, 4])
        self.assertEqual(self.synced, [Path("/maildir/new")])

    @defer.inlineCallbacks
    def test_jobs_of_a_batch_run_at_once(self) -> None:
        # Their fsyncs must wait together to share the journal's commits;
        # one after another, the barrier would never fill.
        gate = threading.Event()
        hold = self.committer.submit(lambda batch: gate.wait(5))
        barrier = threading.Barrier(4, timeout=5)

        def job(n: int):
            def run(batch):
                barrier.wait()
                batch.sync_later(Path(f"/maildir/{n % 2}/new"))
                return n

            return run

        together = [self.committer.submit(job(n)) for n in range(4)]
        gate.set()
        yield hold
        self.assertEqual((yield defer.gatherResults(together)), [0, 1, 2, 3])
        self.assertEqual(sorted(self.synced), [Path("/maildir/0/new"), Path("/maildir/1/new")])

    @defer.inlineCallbacks
    def test_a_failing_job_fails_alone(self) -> None:
        def boom(batch):
            raise ValueError("disk full")

        bad = self.committer.submit(boom)
        good = self.committer.submit(lambda batch: "ok")
        yield self.assertFailure(bad, ValueError)
        self.assertEqual((yield good), "ok")

    @defer.inlineCallbacks
    def test_failed_directory_sync_fails_the_jobs_that_renamed_into_it(self) -> None:
        self.fail_sync.add(Path("/broken/new"))
        gate = threading.Event()
        hold = self.committer.submit(lambda batch: gate.wait(5))

        def into(path: str):
            return lambda batch: batch.sync_later(Path(path)) or path

        broken = self.committer.submit(into("/broken/new"))
        fine = self.committer.submit(into("/fine/new"))
        gate.set()
        yield hold
        yield self.assertFailure(broken, OSError)
        self.assertEqual((yield fine), "/fine/new")

    @defer.inlineCallbacks
    def test_stop_finishes_what_was_submitted(self) -> None:
        done = []
        d = self.committer.submit(lambda batch: done.append(1) or "filed")
        self.committer.stop()
        self.assertEqual(done, [1])
        yield self.assertFailure(self.committer.submit(lambda batch: None), RuntimeError)
        self.assertEqual((yield d), "filed")
