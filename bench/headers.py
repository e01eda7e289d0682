"""CPU cost of hostile header sections, in-process: what a stranger's header
costs mailx's reactor thread (or the worker it is sent to).

    python3 bench/headers.py            # best of 3, milliseconds

Each figure is the work done for one message: splitting a 996 KiB folded
header section, gathering 1 MiB of header in 99-byte pieces, and reading
the author domains of two 60 KB From fields.  The test suite only checks
these with generous bounds (tests.test_headers, tests.test_server); precise
figures belong here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailx import headers  # noqa: E402
from mailx.checks.dmarc import author_domains  # noqa: E402
from mailx.inbound.delivery import IncomingMessage  # noqa: E402
from mailx.inbound.spool import run_inline  # noqa: E402


def best(func, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


class _Context:
    def __init__(self, directory: str) -> None:
        self.incoming = Path(directory)
        self.header_pool = headers.HeaderPool()
        self.in_disk_pool = run_inline  # headers only: no spool file to write


class _Delivery:
    def __init__(self, directory: str) -> None:
        self.context = _Context(directory)


def gather(directory: str, total: int, piece: int = 99) -> None:
    message = IncomingMessage(_Delivery(directory), "B1", "s@x.test", [])
    line = b"X-Pad: " + b"p" * (piece - 9) + b"\r\n"
    message.dataReceived(b"From: a@x.test\r\n")
    for _ in range(total // len(line)):
        message.dataReceived(line)
    message.dataReceived(b"\r\nbody\r\n")
    message.connectionLost()


def main() -> None:
    folded = b"Subject: x\r\n" + b"\t\r\n" * (996 * 1024 // 3)
    two_from = (
        b"From: " + b'"' * 60_000 + b"\r\nFrom: " + b"(" * 60_000 + b"\r\n\r\nbody\r\n"
    )
    quotes = b"From: " + b'"' * 4000 + b"\r\n\r\n"
    with tempfile.TemporaryDirectory() as directory:
        rows = [
            ("split 996 KiB of folded header", best(lambda: headers.split_fields(folded))),
            ("gather 1 MiB of header in 99-byte pieces", best(lambda: gather(directory, 1 << 20))),
            ("author domains, two 60 KB From fields", best(lambda: author_domains(two_from))),
            ("author domains, 4 KB of quotes", best(lambda: author_domains(quotes))),
            ("From fields found in 996 KiB of folded header",
             best(lambda: headers.field_values(folded, b"from", 5))),
        ]
    for name, ms in rows:
        print(f"{ms:9.1f} ms  {name}")


if __name__ == "__main__":
    main()
