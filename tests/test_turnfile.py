# -*- test-case-name: tests.test_turnfile -*-
"""The log written once per reactor turn (`mailx.observe.turnfile`)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task
from twisted.logger import FileLogObserver
from twisted.trial import unittest

from mailx.observe import turnfile
from mailx.observe.turnfile import TurnFile


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


class FakeReactor:
    def __init__(self) -> None:
        self.running = True
        self.later: list[Callable[[], None]] = []
        self.from_threads: list[Callable[[], None]] = []
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []

    def callLater(self, delay: float, f: Callable[[], None]) -> None:
        assert delay == 0
        self.later.append(f)

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.from_threads.append(f)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], None]) -> None:
        self.triggers.append((phase, event, f))

    def end_of_turn(self) -> None:
        calls, self.later = self.later, []
        for f in calls:
            f()


class TurnFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out = CountingFile()
        self.reactor = FakeReactor()
        self.file = TurnFile(self.out, self.reactor)
        self.in_io_thread = True
        self.patch(turnfile.threadable, "isInIOThread", lambda: self.in_io_thread)

    def test_a_turns_lines_go_out_in_one_write_when_it_ends(self) -> None:
        for n in range(3):
            self.file.write(f"line {n}\n")
            self.file.flush()  # FileLogObserver's, after each line
        self.assertEqual((self.out.getvalue(), self.out.writes), ("", 0))
        self.assertEqual(len(self.reactor.later), 1)
        self.reactor.end_of_turn()
        self.assertEqual(self.out.getvalue(), "line 0\nline 1\nline 2\n")
        self.assertEqual((self.out.writes, self.out.flushes), (1, 1))
        # The next turn's line schedules a write of its own.
        self.file.write("line 3\n")
        self.reactor.end_of_turn()
        self.assertEqual(self.out.writes, 2)
        self.assertTrue(self.out.getvalue().endswith("line 3\n"))

    def test_without_a_running_reactor_a_line_goes_out_at_once(self) -> None:
        self.reactor.running = False
        self.file.write("starting\n")
        self.assertEqual(self.out.getvalue(), "starting\n")
        self.assertEqual(self.reactor.later, [])

    def test_a_line_from_another_thread_is_written_by_the_reactor(self) -> None:
        self.in_io_thread = False
        self.file.write("from a resolver thread\n")
        self.assertEqual(self.reactor.later, [])
        [drain] = self.reactor.from_threads
        drain()
        self.assertEqual(self.out.getvalue(), "from a resolver thread\n")

    def test_what_is_pending_at_shutdown_is_written(self) -> None:
        self.file.write("Received SIGTERM, shutting down.\n")
        [(phase, event, drain)] = self.reactor.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        drain()
        self.assertEqual(self.out.getvalue(), "Received SIGTERM, shutting down.\n")

    def test_a_log_that_cannot_be_written_does_not_raise(self) -> None:
        def broken(text: str) -> int:
            raise OSError(28, "No space left on device")

        self.patch(self.out, "write", broken)
        self.file.write("lost\n")
        self.reactor.end_of_turn()
        # And the next line is tried again.
        self.patch(self.out, "write", lambda text: io.StringIO.write(self.out, text))
        self.file.write("kept\n")
        self.reactor.end_of_turn()
        self.assertEqual(self.out.getvalue(), "kept\n")

    def test_lines_from_many_threads_are_all_written_once(self) -> None:
        self.in_io_thread = False
        threads = [
            threading.Thread(target=lambda n=n: [self.file.write(f"{n} {i}\n") for i in range(200)])
            for n in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for drain in self.reactor.from_threads:
            drain()
        lines = self.out.getvalue().splitlines()
        self.assertEqual(sorted(lines), sorted(f"{n} {i}" for n in range(4) for i in range(200)))
        for n in range(4):  # each thread's lines in its order
            self.assertEqual([x for x in lines if x.startswith(f"{n} ")], [f"{n} {i}" for i in range(200)])


class RealReactorTests(unittest.TestCase):
    def test_an_observers_line_is_out_after_the_turn(self) -> Any:
        out = io.StringIO()
        observe = FileLogObserver(TurnFile(out), lambda event: event["text"])

        def during_a_turn() -> Any:
            self.assertTrue(reactor.running)
            observe({"text": "one\n"})
            observe({"text": "two\n"})
            self.assertEqual(out.getvalue(), "")
            return task.deferLater(reactor, 0, out.getvalue)

        d = task.deferLater(reactor, 0, during_a_turn)
        d.addCallback(self.assertEqual, "one\ntwo\n")
        return d
