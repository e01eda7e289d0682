"""The benchmark's peer: the fairest plain-Python receiving server we could write.

    python3 bench/peer_aiosmtpd.py --port 2526 --maildir /tmp/x/mail/bench.test/alice

An aiosmtpd server (no ``Controller`` thread: it owns the main thread's event
loop, as mailx owns its reactor) that accepts mail for one domain, any local
part, and files every message into one Maildir with the durability mailx
promises before it answers 250 (SPEC section 7): write to ``tmp/`` under a
unique name, fsync the file, rename it into ``new/``, fsync ``new/``.

Fair means no shortcut mailx is not allowed either (every fsync is real, one
copy per message is written before the reply) and no handicap: the code is
what an aiosmtpd user would write. It prepends the trace headers mailx adds
(``Return-Path``, ``Delivered-To``, ``Received``) and stores LF line ends, as
mailx does, so both write the same number of bytes within a few.

By default the Maildir write runs synchronously inside the async
``handle_DATA`` hook. That is the common aiosmtpd pattern (its documentation's
examples do their I/O inline) and it blocks the event loop for the length of
two fsyncs, so concurrent sessions queue behind each other's disk flushes.
``--fsync-in-thread`` is the variant a careful user would write next: the same
write in the loop's default thread pool, so concurrent fsyncs overlap (and
share ext4 journal commits), as mailx's design does (docs/design.md).
"""

import argparse
import asyncio
import itertools
import os
import signal
import socket
import time
from email.utils import formatdate
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

# RFC 5321 4.2.3 and 4.2.5 (codes), RFC 3463 (enhanced codes): the replies
# mailx gives for the same situations (SPEC section 5).
RELAY_DENIED = "550 5.7.1 Relaying denied"
OK_QUEUED = "250 2.0.0 Ok: stored"
OK_RCPT = "250 2.1.5 Ok"
DISK_ERROR = "451 4.3.0 Local error in processing"


class Maildir:
    """One Maildir, written the durable way (tmp, fsync, rename, fsync new/)."""

    def __init__(self, path: Path):
        self.path = path
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self._pid = os.getpid()
        self._counter = itertools.count()

    def _unique_name(self) -> str:
        # The Maildir naming convention as Dovecot writes it: seconds, then
        # M<microseconds>P<pid>Q<delivery count>, then the host name.
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{self._pid}Q{next(self._counter)}.{self._host}"

    def deliver(self, data: bytes) -> str:
        name = self._unique_name()
        tmp = self.path / "tmp" / name
        final = f"{name},S={len(data)}"  # Dovecot's size suffix, as mailx writes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, self.path / "new" / final)
        dirfd = os.open(self.path / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return final


class MaildirHandler:
    """aiosmtpd hooks, named after the dialogue: RCPT checks the domain, DATA files."""

    def __init__(self, maildir: Maildir, domain: str, mailbox: str, hostname: str,
                 in_thread: bool):
        self.maildir = maildir
        self.domain = domain.lower()
        self.mailbox = mailbox
        self.hostname = hostname
        self.in_thread = in_thread

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        _, _, domain = address.rpartition("@")
        if domain.lower() != self.domain:
            return RELAY_DENIED
        envelope.rcpt_tos.append(address)
        return OK_RCPT

    def _trace_headers(self, session: Session, envelope: Envelope) -> bytes:
        ip = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        sender = envelope.mail_from or ""
        rcpt = envelope.rcpt_tos[0]
        return (
            f"Return-Path: <{sender}>\r\n"
            f"Delivered-To: {self.mailbox}@{self.domain}\r\n"
            f"Received: from {session.host_name} (unknown [{ip}])\r\n"
            f"\tby {self.hostname} (aiosmtpd peer) with ESMTP\r\n"
            f"\tfor <{rcpt}>; {formatdate(localtime=True)}\r\n"
        ).encode("utf-8", "surrogateescape")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Every recipient is one of our domain's addresses and they all lead to
        # the one mailbox: one copy, as mailx de-duplicates final mailboxes.
        data = self._trace_headers(session, envelope) + envelope.original_content
        # LF line ends, as Maildir files conventionally have them (and mailx writes).
        data = data.replace(b"\r\n", b"\n")
        try:
            if self.in_thread:
                await asyncio.get_running_loop().run_in_executor(
                    None, self.maildir.deliver, data)
            else:
                # The common aiosmtpd pattern: blocking file I/O right in the
                # coroutine. The loop waits for both fsyncs.
                self.maildir.deliver(data)
        except OSError:
            return DISK_ERROR
        return OK_QUEUED


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True,
                        help="the Maildir every message is filed into")
    parser.add_argument("--domain", default="bench.test", help="the one domain accepted")
    parser.add_argument("--mailbox", default="alice", help="for Delivered-To")
    parser.add_argument("--hostname", default="peer.bench.test",
                        help="banner and Received (aiosmtpd would call getfqdn() per connection)")
    parser.add_argument("--fsync-in-thread", action="store_true",
                        help="file messages in the loop's thread pool instead of inline")
    args = parser.parse_args(argv)

    handler = MaildirHandler(Maildir(args.maildir), args.domain, args.mailbox,
                             args.hostname, args.fsync_in_thread)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Same cap as mailx's default limits.message_size (SPEC section 3).
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(handler, hostname=args.hostname, data_size_limit=25 * 1024 * 1024,
                     loop=loop),
        host=args.host, port=args.port))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    try:
        loop.run_forever()
    finally:
        # No wait_closed(): since Python 3.12 it also waits for every client.
        server.close()
        loop.close()


if __name__ == "__main__":
    main()
