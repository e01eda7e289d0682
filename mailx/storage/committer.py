# -*- test-case-name: tests.test_committer -*-
"""Group commit: one thread files messages in batches, fsyncing each directory once.

Filing a message is a handful of blocking system calls (write, fsync,
rename, fsync of the directory).  Handing each message to a thread pool
costs more than the calls themselves on a small machine: every hand-off is
a wake-up, and every system call a GIL hand-over between the reactor and a
crowd of workers (measured: 40+ futex calls and ~1 ms of kernel time per
message, most of it context switches).  Instead, everything that arrives
while a batch is being written waits and goes into the next batch, as a
database's group commit does:

- the committer thread takes the whole batch; its jobs run at once in a
  few threads of the committer's own (``PARALLEL_JOBS``), each writing and
  fsyncing its own files and renaming them into place;
- the directories they renamed into are fsynced once per batch, so ten
  messages to one mailbox cost one directory fsync, not ten;
- only then are the jobs' Deferreds fired, together, in the reactor thread.

Why at once rather than one after another: each fsync waits for a journal
commit, and ext4's journal (jbd2) makes one commit for the fsyncs that
wait together, but one per fsync when they come one by one.  Measured on
the 2-core development machine (ext4, 200 queue entries of two files, the
entry's directory and the queue directory fsynced): 46-71 entries/s from
one thread, 137-752 from ten (bench: issue 12's forwarding and submission
runs were capped by exactly this).  Hand-offs stay per batch, not per
message: the reactor wakes the committer once, the committer the workers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailx.text import Logger

log = Logger(namespace="mailx.committer")

DirectorySync = Callable[[Path], None]

# Jobs of one batch run at once in this many threads (see the module docstring).
PARALLEL_JOBS = 8


class _Directories:
    """The directories a batch's jobs renamed into, to fsync before replying."""

    def __init__(self) -> None:
        self.directories: dict[Path, list[int]] = {}
        self._lock = threading.Lock()  # jobs add from several threads

    def add(self, directory: Path, number: int) -> None:
        with self._lock:
            self.directories.setdefault(directory, []).append(number)


class Batch:
    """What a job is handed: its way to have a directory fsynced with the batch."""

    def __init__(self, directories: _Directories, number: int) -> None:
        self._directories = directories
        self._number = number

    def sync_later(self, directory: Path) -> None:
        """Make the rename into ``directory`` durable before this job's Deferred fires."""
        self._directories.add(directory, self._number)


class GroupCommitter:
    """A single writer thread fed by the reactor; see the module docstring."""

    def __init__(self, reactor: Any, fsync_directory: DirectorySync, name: str = "mailx-commit") -> None:
        self.reactor = reactor
        self._fsync_directory = fsync_directory
        self._name = name
        self._jobs: list[tuple[Callable[[Batch], Any], defer.Deferred]] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._stopping = False
        # Called in the committer thread with each batch's size (mailx.observe.metrics).
        self.observe_batch: Callable[[int], None] | None = None

    def start(self) -> None:
        self._stopping = False
        self._workers = ThreadPoolExecutor(PARALLEL_JOBS, thread_name_prefix=self._name)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then end the thread (blocks)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._workers is not None:
            self._workers.shutdown()
            self._workers = None

    def submit(self, job: Callable[[Batch], Any]) -> defer.Deferred:
        """Run ``job(batch)`` in the committer thread; fires once its directories are synced."""
        d: defer.Deferred = defer.Deferred()
        with self._wakeup:
            if self._stopping or self._thread is None:
                return defer.fail(RuntimeError("the disk writer is stopped"))
            self._jobs.append((job, d))
            if len(self._jobs) == 1:
                self._wakeup.notify()
        return d

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._jobs and not self._stopping:
                    self._wakeup.wait()
                jobs, self._jobs = self._jobs, []
                if not jobs and self._stopping:
                    return
            outcomes = self._commit(jobs)
            self.reactor.callFromThread(self._report, outcomes)

    def _commit(self, jobs: list[tuple[Callable[[Batch], Any], defer.Deferred]]) -> list[Any]:
        if self.observe_batch is not None:
            self.observe_batch(len(jobs))
        batch = _Directories()

        def run(number: int) -> Any:
            try:
                return jobs[number][0](Batch(batch, number))
            except BaseException:
                return Failure()

        if len(jobs) == 1 or self._workers is None:
            results = [run(number) for number in range(len(jobs))]
        else:
            results = list(self._workers.map(run, range(len(jobs))))
        for directory, members in batch.directories.items():
            try:
                self._fsync_directory(directory)
            except OSError:
                failure = Failure()
                for number in members:
                    if not isinstance(results[number], Failure):
                        results[number] = failure
        return [(d, result) for (_, d), result in zip(jobs, results, strict=True)]

    @staticmethod
    def _report(outcomes: list[tuple[defer.Deferred, Any]]) -> None:
        for d, result in outcomes:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
