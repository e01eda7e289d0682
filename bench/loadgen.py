"""The benchmark's load generators: a Python asyncio client, and Postfix's smtp-source.

    python3 bench/loadgen.py --port 2525 --messages 2000 --concurrency 10 --size 1024

The Python client opens C connections at once; each says EHLO once, then sends
messages back to back over its one session (MAIL, RCPT, DATA, body), waiting
for every reply: no PIPELINING, so every server sees the same dialogue as from
smtp-source. Sessions take messages from one shared count, so a fast session
sends more. It prints one JSON object: messages acknowledged with 250, errors
(with a few samples), and the CLOCK_MONOTONIC times of the first connection
attempt and of the last reply (``time.monotonic()`` is system-wide on Linux,
so the runner can compare them with its own clock).

``smtp_source_command()`` builds the equivalent smtp-source command line: one
session per connection (``-d``), the same message file (``-F``), the same
envelope. smtp-source gives up on the first unexpected reply (no ``-A``), so a
zero exit status means every message got its 250.
"""

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SENDER = "loadgen@client.bench.test"
RECIPIENT = "alice@bench.test"
HELO = "client.bench.test"

# RFC 5322 2.1.1: lines SHOULD be no more than 78 characters, CRLF excluded.
LINE_LIMIT = 78

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "if so no will my more out up into do any your what some can only other new time "
    "could these two may first then see way than also people like over such our after "
    "most made well just where should between each those through great years must "
    "message server delivery mailbox domain header receipt benchmark throughput queue"
).split()


def make_message(size: int, seed: int = 0) -> bytes:
    """A plain-text message of exactly ``size`` bytes (CRLF line ends, no final dot).

    Realistic headers, then body lines of words, none longer than 78
    characters and none starting with a dot, so no dot-stuffing is needed and
    the bytes on the wire are the bytes counted. The last line is empty:
    smtp-source ends every ``-F`` message with one, and both load generators
    send the same bytes.
    """
    header = (
        f"From: Load Generator <{SENDER}>\r\n"
        f"To: Alice <{RECIPIENT}>\r\n"
        "Subject: mailx benchmark message\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <bench-{size}-{seed}@{HELO}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode("ascii")
    rng = random.Random(seed)

    def words(width: int, exact: bool = False) -> str:
        # Words up to ``width`` characters; ``exact`` cuts the last word to fill it.
        line = rng.choice(_WORDS).capitalize()[:width]
        while len(line) < width:
            word = rng.choice(_WORDS)
            if not exact and len(line) + 1 + len(word) > width:
                break
            line = (line + " " + word)[:width]
        return line

    lines = []
    remaining = size - len(header) - 2  # the final empty line
    # Paragraph text, wrapped short of the limit, while plenty of room is left...
    while remaining > 2 * (LINE_LIMIT + 2):
        line = words(LINE_LIMIT - rng.randrange(0, 20))
        lines.append(line)
        remaining -= len(line) + 2
    # ...then lines cut to fit exactly, never leaving one byte that no line can hold.
    while remaining > 0:
        width = min(LINE_LIMIT, remaining - 2)
        if remaining - (width + 2) == 1:
            width -= 1
        lines.append(words(width, exact=True))
        remaining -= width + 2
    body = "".join(line + "\r\n" for line in lines).encode("ascii") + b"\r\n"
    message = header + body
    if len(message) != size:
        raise ValueError(f"cannot build a {size}-byte message (headers alone take {len(header)})")
    return message


@dataclass
class Stats:
    remaining: int
    stop_at: float = float("inf")  # monotonic: no message is started after it (--duration)
    ok: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    first_connect: float = 0.0
    last_reply: float = 0.0
    finished: float = 0.0  # monotonic: every session done, or the deadline
    in_flight: int = 0  # messages sent and not yet answered

    def take(self) -> bool:
        if self.remaining <= 0 or time.monotonic() >= self.stop_at:
            return False
        self.remaining -= 1
        return True

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(what)


class ReplyError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One SMTP reply (RFC 5321 4.2.1: continuation lines have "-" after the code)."""
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed by server")
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            break
    try:
        return int(lines[-1][:3]), b" / ".join(lines)
    except ValueError:
        raise ReplyError(f"not an SMTP reply: {lines!r}") from None


async def _command(reader, writer, line: bytes, expect: int) -> None:
    writer.write(line)
    code, text = await _reply(reader)
    if code != expect:
        raise ReplyError(f"{line.strip().decode()}: {text.decode(errors='replace')}")


async def _session(host: str, port: int, data: bytes, stats: Stats) -> None:
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rcpt = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        stats.fail(f"connect: {e}")
        return
    in_flight = False
    try:
        code, text = await _reply(reader)
        if code != 220:
            raise ReplyError(f"banner: {text.decode(errors='replace')}")
        await _command(reader, writer, f"EHLO {HELO}\r\n".encode(), 250)
        while stats.take():
            in_flight = True
            stats.in_flight += 1
            try:
                await _command(reader, writer, mail, 250)
                await _command(reader, writer, rcpt, 250)
                await _command(reader, writer, b"DATA\r\n", 354)
            except ReplyError as e:
                stats.fail(str(e))
                in_flight = False
                stats.in_flight -= 1
                await _command(reader, writer, b"RSET\r\n", 250)
                continue
            writer.write(data)
            await writer.drain()
            code, text = await _reply(reader)
            in_flight = False
            stats.in_flight -= 1
            stats.last_reply = time.monotonic()
            if code == 250:
                stats.ok += 1
            else:
                stats.fail(f"end of DATA: {text.decode(errors='replace')}")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    except (OSError, ReplyError) as e:
        # The session is over; other sessions send what is left.
        if in_flight:
            stats.in_flight -= 1
        stats.fail(f"session: {e}" if in_flight else f"session (idle): {e}")
    finally:
        writer.close()


async def run(host: str, port: int, messages: int, concurrency: int, size: int,
              duration: float | None = None, deadline: float | None = None) -> Stats:
    """Send ``messages`` messages of ``size`` bytes over ``concurrency`` sessions.

    ``duration``: start no message after that many seconds (an offered load
    of fixed length, for bench/abuse.py). ``deadline``: after that many
    seconds, abandon whatever is still waiting for a reply; those messages
    count as errors.
    """
    data = make_message(size) + b".\r\n"
    stats = Stats(remaining=messages)
    stats.first_connect = time.monotonic()
    if duration is not None:
        stats.stop_at = stats.first_connect + duration
    sessions = asyncio.gather(*(_session(host, port, data, stats) for _ in range(concurrency)))
    try:
        await asyncio.wait_for(sessions, deadline)
    except TimeoutError:
        if stats.in_flight:
            stats.fail(f"deadline: {stats.in_flight} messages unanswered after {deadline:g} s")
            stats.errors += stats.in_flight - 1
    stats.finished = time.monotonic()
    return stats


def find_smtp_source() -> str | None:
    """smtp-source's path: Debian's postfix package puts it in /usr/sbin."""
    return shutil.which("smtp-source") or shutil.which(
        "smtp-source", path="/usr/sbin:/usr/local/sbin")


def smtp_source_command(program: str, host: str, port: int, messages: int, concurrency: int,
                        message_file: Path) -> list[str]:
    """The smtp-source command line equivalent to ``run()``.

    ``message_file`` holds the message with LF line ends: smtp-source sends
    each line with CRLF, stuffs dots, adds an empty last line, and no headers
    of its own (``-F``). ``-d`` keeps each session open for the next message. It says
    HELO where the Python client says EHLO; the rest of the dialogue is the
    same.
    """
    return [
        program, "-d", "-s", str(concurrency), "-m", str(messages),
        "-F", str(message_file), "-f", SENDER, "-t", RECIPIENT, "-M", HELO,
        f"inet:{host}:{port}",
    ]


def write_message_file(path: Path, size: int) -> None:
    """``make_message(size)`` for smtp-source ``-F``: LF line ends, and without
    the final empty line, which smtp-source adds."""
    path.write_bytes(make_message(size)[:-2].replace(b"\r\n", b"\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--duration", type=float,
                        help="start no message after this many seconds (--messages stays a cap)")
    parser.add_argument("--deadline", type=float,
                        help="give up on unanswered messages after this many seconds")
    args = parser.parse_args(argv)
    stats = asyncio.run(run(args.host, args.port, args.messages, args.concurrency, args.size,
                            args.duration, args.deadline))
    json.dump({
        # With --duration the cap is not meant to be reached: nothing is "unsent".
        "ok": stats.ok, "errors": stats.errors,
        "unsent": 0 if args.duration is not None else stats.remaining,
        "samples": stats.samples,
        "first_connect": stats.first_connect, "last_reply": stats.last_reply,
        "finished": stats.finished,
    }, sys.stdout)
    print()
    return 0 if stats.ok == args.messages or (args.duration and not stats.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
