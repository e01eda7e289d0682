# -*- test-case-name: tests.test_turnfile -*-
"""The log file written once per reactor turn, not once per line.

Twisted's `FileLogObserver` writes and flushes each line: a ``write(2)`` per
line, four or more per message, 3-4% of the reactor thread at 1 KiB
(py-spy, bench/run.py 1KiB-c10).  Here the lines of one turn of the reactor
are joined and written when the turn's work is done (``callLater(0)`` runs
before the reactor next waits for input), so a line is out a few hundred
microseconds later than before, and nothing is held while the reactor
sleeps.  What a ``kill -9`` can take is the turn in progress, which a
per-line write would have lost part of anyway.  With no reactor running
(start-up, twistd's last lines), a line is written at once.
"""

from __future__ import annotations

import atexit
import threading
from typing import IO, Any

from twisted.python import threadable
from twisted.python.util import untilConcludes

__all__ = ["TurnFile"]


class TurnFile:
    """A file-like object for `FileLogObserver`: lines out once per reactor turn."""

    def __init__(self, out: IO[Any], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        self._out = out
        self._reactor = reactor
        self._pending: list[Any] = []
        self._scheduled = False
        # Lines come from every thread (the resolver's, the trace writer's).
        self._lock = threading.Lock()
        reactor.addSystemEventTrigger("after", "shutdown", self.drain)
        atexit.register(self.drain)

    def write(self, text: Any) -> None:
        with self._lock:
            self._pending.append(text)
            if self._scheduled:
                return
            self._scheduled = True
        if not self._reactor.running:
            self.drain()
        elif threadable.isInIOThread():
            self._reactor.callLater(0, self.drain)
        else:
            self._reactor.callFromThread(self.drain)

    def flush(self) -> None:
        """`FileLogObserver` flushes after each line: `drain` does, once a turn."""

    def drain(self) -> None:
        """Write out what is pending: at the end of a turn, and at shutdown."""
        with self._lock:  # held while writing: two drains keep the lines' order
            pending, self._pending = self._pending, []
            self._scheduled = False
            if not pending:
                return
            try:
                untilConcludes(self._out.write, pending[0][:0].join(pending))
                untilConcludes(self._out.flush)
            except (OSError, ValueError):
                # ValueError: closed at exit before atexit ran.  A log that
                # cannot be written must not take the server down.
                pass
