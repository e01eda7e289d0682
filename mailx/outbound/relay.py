# -*- test-case-name: tests.test_outbound -*-
"""Forwarding: the SMTP client and the scheduler that drives the queue.

The client is our own small state machine on ``LineOnlyReceiver`` rather
than Twisted's ``SMTPClient``/``ESMTPClient``.  The stock client does not
dot-stuff a "." first line nor a "." line at a 16 KiB chunk boundary (a
forwarded message could smuggle a second one into the next hop), wants LF
line ends, sends neither SIZE nor BODY=8BITMIME, has no timeouts, never
falls back to plain text after a failed TLS handshake and reports enhanced
codes only inside free text (research notes section 5).  Patching all of
that would leave little of it; one message per connection, in order, is a
few hundred lines we can reason about:

- RFC 5321 4.5.2 transparency by `DotStuffer`, whose state crosses chunk
  boundaries; bare CR and LF become CRLF on the way (SPEC 5);
- EHLO (HELO when EHLO is refused, RFC 5321 3.2), opportunistic STARTTLS
  without certificate checks (RFC 7435: anything beats clear text, and a
  failed handshake retries the same host in clear text), AUTH PLAIN/LOGIN
  only over TLS and only to the smarthost;
- MTA-STS (RFC 8461, `mailx.outbound.mtasts`) for MX delivery: under ``enforce``
  only listed MX hosts, STARTTLS required and the certificate verified for
  the MX name, never a clear-text retry; ``testing`` logs what enforce
  would refuse;
- SIZE (RFC 1870) and BODY=8BITMIME (RFC 6152) when offered;
- PIPELINING (RFC 2920) when offered: RSET (on a reused connection), MAIL,
  every RCPT and DATA go out in one write and the replies are read in
  order, each recipient decided as in lock-step;
- every wait bounded by RFC 5321 4.5.3.2's timeouts (`Timeouts`), on an
  injectable clock, so tests drive them with ``task.Clock``.

`Outbound` is the scheduler: it resumes the queue at start-up, resolves MX
hosts through the process's `mailx.dns.Resolver` (null MX, implicit MX,
AAAA and A), limits connections per destination and in total, applies the
retry schedule and the queue lifetime, and sends bounces and delay notices
(`mailx.outbound.dsn`).  One log line per event, each with the queue ID (SPEC 10).
"""

from __future__ import annotations

import base64
import ipaddress
import random
import re
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, interfaces
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
)
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailx.address import quote_local, quote_path
from mailx.dns import DNSError, DNSVoidError, NullMXError, NXDomainError
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Router
from mailx.outbound import dkimkeys, dsn, mtasts
from mailx.outbound.srs import SRS, srs_route
from mailx.smtp.replies import Reply, SMTPReplyError
from mailx.storage import maildir
from mailx.storage.queue import DELIVERED, FAILED, Envelope, Queue, Recipient, open_data
from mailx.storage.writer import Filing, InlineFiler, MaildirCopy, QueueCopy, WriterGone
from mailx.text import Logger

log = Logger(namespace="mailx.outbound")

__all__ = [
    "DotStuffer",
    "HostFailure",
    "Outbound",
    "SMTPClientProtocol",
    "SessionResult",
    "Timeouts",
    "Transaction",
    "destination_allowed",
    "forward_path",
    "parse_reply",
    "retry_after",
    "reverse_path",
]

# Postfix smtp_mx_address_limit: addresses tried per delivery attempt.
MAX_ADDRESSES = 5
# A host that just failed is tried after the others for this long
# (Postfix keeps a similar "dead host" memory in qmgr).
HOST_FAILURE_MEMORY = 600.0
# How often the server looks for ``mailxctl queue flush``'s request file.
FLUSH_POLL = 1.0
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; allow slack.
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
SEND_CHUNK = 64 * 1024
# A message just filed is sent from memory on its first attempt (no trip to
# the disk pool to read back what the writer fsynced moments ago), if it is
# at most this big and the queue holds at most HELD_IN_MEMORY such octets.
SEND_FROM_MEMORY = 256 * 1024
HELD_IN_MEMORY = 16 * 1024 * 1024
# Endpoint strings parsed and kept (the smarthost, LMTP servers): a few in practice.
NAMED_ENDPOINTS_KEPT = 64
# Connection reuse (issue 12): an idle session waits this long for the next
# message to the same host (Postfix smtp_connection_cache_time_limit: 2 s),
# rather than a new TCP, EHLO and TLS handshake for each message.
IDLE_TIME = 5.0
# Transactions per connection (Postfix smtp_connection_reuse_count_limit: 0, no limit);
# bounded so that one connection does not live for ever.
MAX_TRANSACTIONS = 100


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each stage of a session."""

    connect: float = 30.0  # Postfix smtp_connect_timeout
    greeting: float = 300.0  # RFC 5321 4.5.3.2.1: initial 220, 5 minutes
    helo: float = 300.0  # Postfix smtp_helo_timeout
    starttls: float = 300.0  # Postfix smtp_starttls_timeout
    auth: float = 300.0
    mail: float = 300.0  # RFC 5321 4.5.3.2.2
    rcpt: float = 300.0  # RFC 5321 4.5.3.2.3
    data_init: float = 120.0  # RFC 5321 4.5.3.2.4
    data_block: float = 180.0  # RFC 5321 4.5.3.2.5: per block sent
    data_end: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the final reply
    quit: float = 30.0  # Postfix smtp_quit_timeout is 300s; nothing depends on it


# ---------------------------------------------------------------------------
# Wire helpers


class DotStuffer:
    """RFC 5321 4.5.2 transparency over a stream of chunks, with CRLF normalisation.

    Every line that begins with "." gets another "." in front, whether the
    line starts the message, follows a chunk boundary or follows a bare LF
    that becomes CRLF here.  A CR at the end of a chunk is held back until
    the next one says whether it is half of a CRLF.
    """

    _BREAKS = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if chunk.count(b"\r") != chunk.count(b"\n") or chunk.count(b"\r\n") != chunk.count(b"\n"):
            chunk = self._BREAKS.sub(b"\r\n", chunk)
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._line_start = chunk.endswith(b"\n")
        return chunk

    def finish(self) -> bytes:
        """What ends the data: the held CR as CRLF, a CRLF if the last line lacks one, then "."."""
        out = b""
        if self._held_cr:
            out, self._held_cr, self._line_start = b"\r\n", False, True
        if not self._line_start:
            out += b"\r\n"
        return out + b".\r\n"


_ENHANCED = re.compile(r"\A([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")


def parse_reply(lines: Sequence[bytes]) -> Reply:
    """A (multi-line) reply as a `Reply`; the enhanced code if the text starts with one (RFC 3463)."""
    code = int(lines[0][:3])
    texts = [line[4:].decode("utf-8", "replace").strip() for line in lines]
    enhanced = ""
    match = _ENHANCED.match(texts[0])
    if match and match.group(1) == str(code)[0]:
        enhanced = ".".join(match.groups())
        texts = [_ENHANCED.sub("", t, count=1) for t in texts]
    return Reply(code, enhanced, " ".join(t for t in texts if t))


def _reply_text(reply: Reply) -> str:
    return str(reply) if reply.enhanced else f"{reply.code} {reply.text}"


def _is_quoted_string(local: str) -> bool:
    """RFC 5321 4.1.2 Quoted-string: DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE, whole."""
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    i, end = 1, len(local) - 1
    while i < end:
        c = local[i]
        if c == "\\":
            if i + 1 >= end or not " " <= local[i + 1] <= "~":
                return False
            i += 2
        elif c == '"' or not " " <= c <= "~":
            return False
        else:
            i += 1
    return True


def reverse_path(sender: str) -> str:
    """MAIL FROM's address as RFC 5321 4.1.2 writes it; ``sender`` has its local part unquoted.

    Senders are kept unquoted inside (``john smith@x``, ``a@b@x``, as SPF
    and the logs want them; SRS rewrites them so), and become
    ``"john smith"@x``, ``"a@b"@x`` here (`mailx.inbound.routing.quote_path`).
    """
    return quote_path(sender) if sender else ""


def forward_path(address: str) -> str:
    """RCPT TO's address as RFC 5321 4.1.2 writes it.

    Recipients are kept as routing writes them (`mailx.inbound.routing.Address`,
    SRS reversal, the configuration): already quoted where needed.  One
    whose local part is neither a Dot-string nor a whole Quoted-string (a
    sender's address written unquoted, as a notice's recipient was in
    entries queued before this was fixed) is quoted here.
    """
    local, at, domain = address.rpartition("@")
    if not at or _is_quoted_string(local):
        return address
    return f"{quote_local(local)}@{domain}"


def _wire_address(address: str) -> bytes:
    # ASCII only: SMTPUTF8 is neither offered nor used; parsing let nothing else in.
    return address.encode("utf-8")


# ---------------------------------------------------------------------------
# Where we may connect (SPEC 8)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# RFC 6052 2.1: the NAT64 well-known prefix carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def destination_allowed(ip: str, allowed_networks: Sequence[Network] = ()) -> bool:
    """Whether we may connect to ``ip`` for an MX or the smarthost (SPEC 8).

    Only globally routed unicast addresses, plus loopback (a local relay or
    filter listens there), plus what ``outbound.allowed_networks`` lists.
    Anything else (RFC 1918 private, 100.64/10 shared, 169.254/16 and
    fe80::/10 link-local (cloud metadata services live there), fc00::/7,
    multicast, reserved, unspecified, documentation ranges) would let
    whoever controls a domain's DNS make us connect inside our own network.
    An IPv4 address embedded in IPv6 (mapped ``::ffff:0:0/96``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) is judged as that IPv4 address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if any(address in net for net in allowed_networks):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return destination_allowed(str(embedded), allowed_networks)
    if address.is_loopback:
        return True
    # Python 3.11: is_global is False for private, shared (100.64/10),
    # link-local and reserved space, but True for multicast.
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_link_local
    )


# ---------------------------------------------------------------------------
# One session


@dataclass(frozen=True)
class Transaction:
    """What one session tries to send: one message to recipients of one domain."""

    mail_from: str
    recipients: tuple[str, ...]
    prefix: bytes  # our trace header fields, CRLF-terminated
    data_path: Path  # the queued message
    size: int  # octets before dot-stuffing (prefix included), for SIZE=
    eight_bit: bool
    data: bytes | None = None  # the data file's contents, when still in memory


@dataclass(frozen=True)
class ClientSettings:
    helo: str
    timeouts: Timeouts
    clock: Any  # IReactorTime
    tls: Any = None  # client TLS options; None: never STARTTLS
    credentials: tuple[str, str] | None = None  # AUTH, smarthost only, TLS required
    # RFC 8461 4.2 (MTA-STS enforce): STARTTLS is a must; no MAIL in clear text.
    require_tls: bool = False
    # Offered the session once a transaction is over; True: it keeps it for
    # the next (`SMTPClientProtocol.reuse`), False or None: QUIT.
    idle: Callable[[SMTPClientProtocol], bool] | None = None
    # Runs the data file's blocking reads: the scheduler's disk pool; by
    # default at once, for tests over a StringTransport.
    run_blocking: Callable[..., defer.Deferred] = defer.maybeDeferred


@dataclass(frozen=True)
class SessionResult:
    """A session that reached RCPT: the reply that decides each recipient's fate."""

    replies: dict[str, Reply]
    tls: str | None


class HostFailure(Exception):
    """The host could not take the message before any RCPT was answered: try the next one."""

    def __init__(
        self, reply: Reply, tls_failed: bool = False, tls: str | None = None, reused: bool = False
    ) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.tls_failed = tls_failed
        self.tls = tls
        self.reused = reused  # on a connection kept from an earlier message: not the host's fault


def _open_data(path: Path) -> Any:
    """The queued message, for reading (blocking); the producer closes it at EOF or when stopped."""
    return open_data(path)


@implementer(interfaces.IPushProducer)
class _DataProducer:
    """Streams prefix + data file, dot-stuffed, as fast as the transport drains.

    The file is opened and read by ``run_blocking`` (the disk pool): even a
    file we wrote moments ago may have left the page cache under memory
    pressure, and a read from a slow disk on the reactor thread would stall
    every session.  One read is in flight at a time; the transport's
    ``pauseProducing`` stops the next one until it has drained.
    """

    def __init__(
        self,
        client: SMTPClientProtocol,
        prefix: bytes,
        path: Path,
        run_blocking: Callable[..., defer.Deferred],
        data: bytes | None = None,
    ) -> None:
        self._client = client
        self._path = path
        self._data = data  # the file's contents, sent without reading it
        self._offset = 0
        self._run_blocking = run_blocking
        self._file: Any = None  # touched only by the reads, one at a time
        self._stuffer = DotStuffer()
        self._prefix = prefix
        self._paused = False
        self._reading = False
        self._done = False  # at the end of the file, failed or stopped

    def start(self) -> None:
        """Registered with the transport: send."""
        out = self._stuffer.feed(self._prefix)
        if out:
            self._transport.write(out)
        self._pump()

    @property
    def _transport(self) -> Any:
        return self._client.transport

    def _pump(self) -> None:
        """Read and send chunks while the transport takes them."""
        while not (self._paused or self._reading or self._done):
            if self._data is not None:
                chunk = self._data[self._offset : self._offset + SEND_CHUNK]
                self._offset += len(chunk)
                self._send((chunk, self._offset >= len(self._data)))
                continue
            self._reading = True
            d = self._run_blocking(self._read_chunk)
            if not d.called:
                d.addBoth(self._read_later)
                return
            # Read at once (no worker thread): loop rather than recurse.
            result: list[Any] = []
            d.addBoth(result.append)
            self._reading = False
            self._send(result[0])

    def _read_later(self, result: Any) -> None:
        self._reading = False
        self._send(result)
        self._pump()

    def _read_chunk(self) -> tuple[bytes, bool]:
        """Blocking: the next chunk, and whether it is the last (the file is then
        closed).  A buffered read returns less than asked only at the end, so
        a message under SEND_CHUNK takes one trip to the thread, not two."""
        if self._file is None:
            self._file = _open_data(self._path)
        chunk = self._file.read(SEND_CHUNK)
        at_end = len(chunk) < SEND_CHUNK
        if at_end:
            self._close()
        return chunk, at_end

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _send(self, result: Any) -> None:
        client = self._client
        if self._done:  # stopped while the read ran
            self._run_blocking(self._close).addErrback(lambda _: None)
            return
        if isinstance(result, Failure):
            self._done = True
            self._run_blocking(self._close).addErrback(lambda _: None)
            self._transport.unregisterProducer()
            # Cut mid-DATA, without the final dot: the server discards what it got.
            client._fail(Reply(451, "4.3.0", f"cannot read the queued message: {result.value}"))
            client._abort()
            return
        client._data_progress()
        chunk, at_end = result
        out = self._stuffer.feed(chunk)
        if at_end:
            self._done = True
            self._transport.unregisterProducer()
            self._transport.write(out + self._stuffer.finish())
            client._data_sent()
        elif out:
            self._transport.write(out)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if self._done:
            return
        self._done = True
        if not self._reading and self._data is None:
            self._run_blocking(self._close).addErrback(lambda _: None)


class _SessionTransport(interfaces.ITLSTransport, interfaces.IConsumer):
    """What a session needs of its connection, for the type checker: TCP's
    `abortConnection`, `startTLS`, and the consumer the DATA producer feeds
    (Twisted's TCP and UNIX transports are all three)."""


class SMTPClientProtocol(LineOnlyReceiver):
    """One SMTP session that sends one `Transaction`; ``done`` fires with the outcome.

    ``done`` gets a `SessionResult` once the server answered RCPT (each
    recipient's deciding reply; recipients the server accepted get the reply
    to the end of data, or a 4xx of ours if the session broke off), or fails
    with `HostFailure` when the session ended before that.  The reply to MAIL
    being 5xx is a result (every recipient failed), a 4xx a host failure.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_LINE
    transport: _SessionTransport  # set by makeConnection

    def __init__(self, transaction: Transaction, settings: ClientSettings, peer: str) -> None:
        self.transaction = transaction
        self.settings = settings
        self.peer = peer  # "mx.example.net[192.0.2.1]:25", for messages
        self.done: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()  # fires once the connection is gone
        self.extensions: dict[str, str] = {}
        self.tls: str | None = None
        self._lines: list[bytes] = []
        self._last_lines: list[bytes] = []
        self._handler: Callable[[Reply], None] | None = None
        # Replies owed after the one ``_handler`` waits for (a pipelined group).
        self._queued: deque[tuple[str, Callable[[Reply], None], float]] = deque()
        self._mail_refused = False  # a pipelined MAIL got a 5xx: its RCPT replies mean nothing
        self._stage = "connect"
        self._timer: Any = None
        self._finished = False
        self._tls_started = False
        self._tls_declined = False
        self._said_helo = False
        self._results: dict[str, Reply] = {}
        self._accepted: list[str] = []
        self._pending_rcpts: list[str] = []
        # Fires when this transaction no longer needs the connection: it is
        # idle, waiting for the next, or gone.
        self.released: defer.Deferred = defer.Deferred()
        self.transactions = 1  # on this connection, this one included
        self.reused = False  # this transaction rides a connection that carried others
        self.idle = False
        self.cache_key: Any = None  # set by whoever keeps idle sessions
        # No transaction open at the server: none begun, or the last one ended
        # with the reply to its data (RFC 5321 4.1.1.4) or a refused MAIL.
        self._clean = True
        self._idle_timer: Any = None

    # -- reuse (RFC 5321 4.1.1.5: RSET after an unfinished transaction) ------

    def reuse(self, transaction: Transaction) -> defer.Deferred:
        """Send ``transaction`` on this idle session; returns its ``done``.

        MAIL at once when the last transaction was finished, else RSET
        first, to clear what it left (a MAIL with every RCPT refused).  A
        failure before any RCPT is answered (the server closed the idle
        connection, a 421) is a `HostFailure` with ``reused`` set, so the
        caller can try a new connection instead.
        """
        assert self.idle
        self.idle = False
        self._cancel_idle_timer()
        self.transaction = transaction
        self.done = defer.Deferred()
        self.released = defer.Deferred()
        self.transactions += 1
        self.reused = True
        self._finished = False
        self._results = {}
        self._accepted = []
        self._pending_rcpts = []
        self._mail_refused = False
        if self._clean:
            self._mail()
        elif "PIPELINING" in self.extensions:
            self._mail(rset=True)
        else:
            self._send(b"RSET")
            self._expect("rset", self._on_rset, self.settings.timeouts.mail)
        return self.done

    def _on_rset(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            self._give_up(reply)  # 421: the server is closing; try a new connection
            return
        self._clean = True
        self._mail()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _release(self) -> None:
        if not self.released.called:
            self.released.callback(None)

    def _end(self, result: SessionResult) -> None:
        """The transaction is over and the session sound: keep it for the next, or QUIT."""
        done = self.done
        if self._finished:
            return
        self._finished = True
        keep = self.settings.idle
        if (
            keep is not None
            and self.transactions < MAX_TRANSACTIONS
            # RFC 5321 3.8: a 421 means the server is closing the channel.
            and all(r.code != 421 for r in result.replies.values())
            and self.transport is not None
            and getattr(self.transport, "connected", True)
            and not getattr(self.transport, "disconnecting", False)
        ):
            self.idle = True
            self._stage = "idle"
            self._handler = None
            self._queued.clear()
            if keep(self):
                self._idle_timer = self.settings.clock.callLater(IDLE_TIME, self._idle_over)
                self._release()
                done.callback(result)
                return
            self.idle = False
        done.callback(result)
        self._quit()

    def _idle_over(self) -> None:
        self._idle_timer = None
        if self.idle:
            self.idle = False
            self._quit()

    # -- plumbing -----------------------------------------------------------

    def connectionMade(self) -> None:
        self._expect("greeting", self._on_greeting, self.settings.timeouts.greeting)

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _expect(self, stage: str, handler: Callable[[Reply], None], timeout: float) -> None:
        if self._handler is not None:
            # Commands sent before their predecessors' replies came (RFC 2920):
            # the replies arrive in order, so wait for this one after those.
            self._queued.append((stage, handler, timeout))
            return
        self._stage = stage
        self._handler = handler
        self._arm(timeout)

    def _arm(self, timeout: float) -> None:
        self._cancel_timer()
        self._timer = self.settings.clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def lineReceived(self, line: bytes) -> None:
        if self._finished and self._handler is None:
            return
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
            self._broken(f"bad reply line from {self.peer}: {line[:80]!r}")
            return
        self._lines.append(line)
        if line[3:4] == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._broken(f"reply of more than {MAX_REPLY_LINES} lines from {self.peer}")
            return
        if any(other[:3] != line[:3] for other in self._lines):
            self._broken(f"reply lines with different codes from {self.peer}")
            return
        reply = parse_reply(self._lines)
        self._last_lines, self._lines = self._lines, []
        self._cancel_timer()
        handler, self._handler = self._handler, None
        if handler is None:
            self._broken(f"unexpected reply from {self.peer}: {reply}")
            return
        if self._queued:
            stage, self._handler, timeout = self._queued.popleft()
            self._stage = stage
            self._arm(timeout)
        handler(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._broken(f"reply line longer than {MAX_REPLY_LINE} octets from {self.peer}")

    def _broken(self, why: str) -> None:
        self._fail(Reply(451, "4.5.0", why))
        self._abort()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Reply(451, "4.4.2", f"timeout waiting for {self.peer} ({self._stage})"))
        self._abort()

    def _abort(self) -> None:
        self._handler = None
        self._queued.clear()
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        self._cancel_idle_timer()
        self.idle = False
        self._release()
        self.closed.callback(None)
        if self._finished:
            return
        if self._stage == "starttls-ehlo":
            # The handshake failed (or the server hung up during it).
            what = reason.getErrorMessage() if reason is not None else "connection lost"
            self._fail(Reply(451, "4.7.5", f"TLS handshake with {self.peer} failed: {what}"))
            return
        what = reason.getErrorMessage() if reason is not None else "connection lost"
        self._fail(Reply(451, "4.4.2", f"lost connection with {self.peer} ({self._stage}): {what}"))

    def _fail(self, reply: Reply) -> None:
        """The session is over without delivering: a result or a host failure."""
        if self._finished:
            return
        if self._stage == "starttls-ehlo":
            self._finish_failure(HostFailure(reply, tls_failed=True))
        elif self._stage in ("rcpt", "data", "data-block", "data-end") and self._results:
            # Past RCPT: recipients answered keep their reply, the rest get ours.
            # RFC 1047: a loss waiting for the final reply may mean a duplicate later.
            for address in self.transaction.recipients:
                if address in self._accepted or address not in self._results:
                    self._results[address] = reply
            self._finish(SessionResult(dict(self._results), self.tls))
        else:
            self._finish_failure(HostFailure(reply, tls=self.tls, reused=self.reused))

    def _finish(self, result: SessionResult) -> None:
        if not self._finished:
            self._finished = True
            self.done.callback(result)

    def _finish_failure(self, failure: HostFailure) -> None:
        if not self._finished:
            self._finished = True
            self.done.errback(failure)

    def _quit(self) -> None:
        self._send(b"QUIT")
        self._expect(
            "quit", lambda reply: self.transport.loseConnection(), self.settings.timeouts.quit
        )

    def _give_up(self, reply: Reply) -> None:
        """A reply before RCPT that ends this host's chance."""
        self._finish_failure(HostFailure(reply, tls=self.tls, reused=self.reused))
        self._quit()

    # -- the dialogue ------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            # RFC 5321 3.1: 554 means no service here; 4xx, try later or elsewhere.
            self._give_up(reply)
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self._send(b"EHLO " + self.settings.helo.encode("ascii"))
        stage = "starttls-ehlo" if self._tls_started and self.tls is None else "ehlo"
        self._expect(stage, self._on_ehlo, self.settings.timeouts.helo)

    def _on_ehlo(self, reply: Reply) -> None:
        if self._tls_started and self.tls is None:
            self.tls = _tls_description(self.transport)
        if reply.code // 100 != 2:
            if not self._said_helo and reply.code in (500, 501, 502, 504, 550):
                # RFC 5321 3.2: a server that does not know EHLO gets HELO.
                self._said_helo = True
                self._send(b"HELO " + self.settings.helo.encode("ascii"))
                self._expect("helo", self._on_helo, self.settings.timeouts.helo)
                return
            self._give_up(reply)
            return
        self.extensions = _extensions(self._last_lines)
        self._after_hello()

    def _on_helo(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            self._give_up(reply)
            return
        self.extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        settings = self.settings
        is_tls = self._tls_started or interfaces.ISSLTransport.providedBy(self.transport)
        if (
            not is_tls
            and settings.tls is not None
            and not self._tls_declined
            and "STARTTLS" in self.extensions
        ):
            self._send(b"STARTTLS")
            self._expect("starttls", self._on_starttls, settings.timeouts.starttls)
            return
        if settings.require_tls and not is_tls:
            self._give_up(
                Reply(
                    451,
                    "4.7.5",
                    f"{self.peer} offers no STARTTLS; the domain's MTA-STS policy requires TLS",
                )
            )
            return
        if settings.credentials is not None:
            if not is_tls:
                # Never send a password in clear text.
                self._give_up(
                    Reply(451, "4.7.10", f"{self.peer} offers no TLS; not sending credentials")
                )
                return
            if self.tls is None:
                self.tls = _tls_description(self.transport)
            self._auth(*settings.credentials)
            return
        self._mail()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220 and self.settings.require_tls:
            self._give_up(reply)
            return
        if reply.code != 220:
            # RFC 3207 4: the client may go on without TLS; opportunistic, so we do.
            log.info(
                "{peer}: STARTTLS refused ({reply}); continuing in clear text",
                peer=self.peer,
                reply=str(reply),
            )
            self._tls_declined = True
            self._after_hello()
            return
        self._tls_started = True
        self.transport.startTLS(self.settings.tls)
        # RFC 3207 4.2: forget what was said before TLS and greet again.
        self.extensions = {}
        self._ehlo()

    def _auth(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            # RFC 4616: authzid NUL authcid NUL passwd.
            token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
            self._send(b"AUTH PLAIN " + token)
            self._expect("auth", self._on_auth_done, self.settings.timeouts.auth)
        elif "LOGIN" in mechanisms:
            self._send(b"AUTH LOGIN")
            self._expect(
                "auth", partial(self._on_login_user, username, password), self.settings.timeouts.auth
            )
        else:
            self._give_up(Reply(451, "4.7.12", f"{self.peer} offers neither AUTH PLAIN nor LOGIN"))

    def _on_login_user(self, username: str, password: str, reply: Reply) -> None:
        if reply.code != 334:
            self._give_up(reply)
            return
        self._send(base64.b64encode(username.encode()))
        self._expect(
            "auth", partial(self._on_login_password, password), self.settings.timeouts.auth
        )

    def _on_login_password(self, password: str, reply: Reply) -> None:
        if reply.code != 334:
            self._give_up(reply)
            return
        self._send(base64.b64encode(password.encode()))
        self._expect("auth", self._on_auth_done, self.settings.timeouts.auth)

    def _on_auth_done(self, reply: Reply) -> None:
        if reply.code != 235:
            self._give_up(reply)
            return
        self._mail()

    def _mail(self, rset: bool = False) -> None:
        """MAIL, lock-step or (``rset``: after an RSET) pipelined with the rest of the transaction."""
        t = self.transaction
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and t.size > int(limit):
            # RFC 1870 6: the server would refuse it; fail now, permanently.
            reply = Reply(
                552, "5.3.4", f"message size {t.size} exceeds the limit {limit} of {self.peer}"
            )
            self._end(SessionResult({a: reply for a in t.recipients}, self.tls))
            return
        line = b"MAIL FROM:<" + _wire_address(reverse_path(t.mail_from)) + b">"
        if "SIZE" in self.extensions:
            line += b" SIZE=%d" % t.size
        if t.eight_bit and "8BITMIME" in self.extensions:
            line += b" BODY=8BITMIME"
        if "PIPELINING" in self.extensions:
            self._send_group(line, rset)
            return
        self._send(line)
        self._expect("mail", self._on_mail, self.settings.timeouts.mail)

    # -- RFC 2920: one write for the envelope, the replies read in order ------

    def _send_group(self, mail_line: bytes, rset: bool) -> None:
        """RSET, MAIL, every RCPT and DATA (last, RFC 2920 3.1) in one write.

        One round trip instead of one per command, and one TLS record.  The
        handlers only note each reply; what lock-step would have done is
        decided at DATA's reply, once every reply of the group is in.
        """
        timeouts = self.settings.timeouts
        group: list[tuple[bytes, str, Callable[[Reply], None], float]] = []
        if rset:
            group.append((b"RSET", "rset", self._on_group_rset, timeouts.mail))
        group.append((mail_line, "mail", self._on_group_mail, timeouts.mail))
        for address in self.transaction.recipients:
            line = b"RCPT TO:<" + _wire_address(forward_path(address)) + b">"
            group.append((line, "rcpt", partial(self._on_group_rcpt, address), timeouts.rcpt))
        group.append((b"DATA", "data", self._on_group_data, timeouts.data_init))
        self.transport.write(b"".join(command[0] + b"\r\n" for command in group))
        for _, stage, handler, timeout in group:
            self._expect(stage, handler, timeout)

    def _on_group_rset(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            # 421: the server is closing; the caller tries a new connection.
            self._finish_failure(HostFailure(reply, tls=self.tls, reused=self.reused))
            return
        self._clean = True

    def _on_group_mail(self, reply: Reply) -> None:
        if self._finished:
            return
        if reply.code // 100 == 2:
            self._clean = False
        elif reply.permanent:
            # As in lock-step: every recipient fails with the sender's refusal.
            self._mail_refused = True
            self._results = {a: reply for a in self.transaction.recipients}
        else:
            self._finish_failure(HostFailure(reply, tls=self.tls, reused=self.reused))

    def _on_group_rcpt(self, address: str, reply: Reply) -> None:
        if self._finished or self._mail_refused:
            return
        self._results[address] = reply
        if reply.code // 100 == 2:
            self._accepted.append(address)

    def _on_group_data(self, reply: Reply) -> None:
        if not self._finished and self._accepted:
            self._on_data(reply)
            return
        if reply.code == 354:
            # RFC 2920 3.1: DATA accepted though no RCPT was: "the client SMTP
            # should send a single dot" to end the empty transaction.
            self._send(b".")
            self._expect("data-end", self._on_group_dot, self.settings.timeouts.data_end)
            return
        self._group_over()

    def _on_group_dot(self, reply: Reply) -> None:
        self._clean = True  # the reply to the data ends the transaction
        self._group_over()

    def _group_over(self) -> None:
        """Every reply of a group that sent no message is in: report, then QUIT or idle."""
        if self._finished:
            self._quit()  # a HostFailure went out already
            return
        self._end(SessionResult(dict(self._results), self.tls))

    def _on_mail(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self._clean = False
            self._pending_rcpts = list(self.transaction.recipients)
            self._stage = "rcpt"
            self._next_rcpt()
        elif reply.permanent:
            # The sender is refused: another MX of the same domain would say the same.
            self._end(SessionResult({a: reply for a in self.transaction.recipients}, self.tls))
        else:
            self._give_up(reply)

    def _next_rcpt(self) -> None:
        if not self._pending_rcpts:
            if not self._accepted:
                self._end(SessionResult(dict(self._results), self.tls))
                return
            self._send(b"DATA")
            self._expect("data", self._on_data, self.settings.timeouts.data_init)
            return
        address = self._pending_rcpts[0]
        self._send(b"RCPT TO:<" + _wire_address(forward_path(address)) + b">")
        self._expect("rcpt", self._on_rcpt, self.settings.timeouts.rcpt)

    def _on_rcpt(self, reply: Reply) -> None:
        address = self._pending_rcpts.pop(0)
        self._results[address] = reply
        if reply.code // 100 == 2:
            self._accepted.append(address)
        self._next_rcpt()

    def _on_data(self, reply: Reply) -> None:
        if reply.code != 354:
            for address in self._accepted:
                self._results[address] = reply
            self._end(SessionResult(dict(self._results), self.tls))
            return
        self._stage = "data-block"
        self._arm(self.settings.timeouts.data_block)
        self._producer = _DataProducer(
            self,
            self.transaction.prefix,
            self.transaction.data_path,
            self.settings.run_blocking,
            self.transaction.data,
        )
        self.transport.registerProducer(self._producer, True)
        self._producer.start()

    def _data_progress(self) -> None:
        self._arm(self.settings.timeouts.data_block)

    def _data_sent(self) -> None:
        self._expect("data-end", self._on_data_end, self.settings.timeouts.data_end)

    def _on_data_end(self, reply: Reply) -> None:
        self._clean = True
        for address in self._accepted:
            self._results[address] = reply
        self._end(SessionResult(dict(self._results), self.tls))


def _extensions(lines: Sequence[bytes]) -> dict[str, str]:
    """EHLO keywords, upper case, and their parameters (RFC 5321 4.1.1.1); line one is the greeting."""
    found = {}
    for line in lines[1:]:
        words = line[4:].decode("ascii", "replace").split(None, 1)
        if words:
            found[words[0].upper()] = words[1].strip() if len(words) > 1 else ""
    return found


def _tls_description(transport: Any) -> str:
    try:
        conn = transport.getHandle()
        return f"{conn.get_protocol_version_name()}:{conn.get_cipher_name()}"
    except Exception:
        return "TLS"


# ---------------------------------------------------------------------------
# The scheduler


def retry_after(retry: Sequence[float], attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt (``outbound.retry``); the last
    interval repeats."""
    return retry[min(attempts, len(retry)) - 1]


class _Slots:
    """Connection slots, per destination and in total; waiters are served in order.

    Waiters are kept per destination, so a release costs a look at the
    destinations waiting, not at every message waiting (a flush of a big
    queue for one domain queues thousands).
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self.used: dict[str, int] = {}
        self.count = 0
        self._waiting: dict[str, deque[defer.Deferred]] = {}

    def _free(self, key: str) -> bool:
        return self.count < self.total and self.used.get(key, 0) < self.per_key

    def _take(self, key: str) -> None:
        self.count += 1
        self.used[key] = self.used.get(key, 0) + 1

    def acquire(self, key: str) -> defer.Deferred:
        if self._free(key) and key not in self._waiting:
            self._take(key)
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.setdefault(key, deque()).append(d)
        return d

    def release(self, key: str) -> None:
        self.count -= 1
        left = self.used[key] - 1
        if left:
            self.used[key] = left
        else:
            del self.used[key]
        for k in list(self._waiting):
            if self.count >= self.total:
                break
            queue = self._waiting[k]
            while queue and self._free(k):
                self._take(k)
                queue.popleft().callback(None)
            if not queue:
                del self._waiting[k]
            else:
                # Served: to the back of the line, so one busy domain cannot starve the rest.
                self._waiting[k] = self._waiting.pop(k)

    def cancel_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for queue in waiting.values():
            for d in queue:
                d.errback(defer.CancelledError("shutting down"))


@dataclass
class _Entry:
    envelope: Envelope
    timer: Any = None
    in_flight: set[int] = field(default_factory=set)  # id() of Recipients being tried
    lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    busy: int = 0  # attempts under way, until their outcome is saved
    finishing: bool = False


def _mta_name(target: str) -> str:
    """The host for a DSN's Remote-MTA (RFC 3464 2.3.5: a host name): an MX name as
    it is, the host of a smarthost endpoint string (``tcp:relay.example.net:587``)."""
    if ":" not in target:  # host names have no colon; endpoint strings do
        return target
    from mailx.admin.dnssetup import smarthost_host

    return smarthost_host(target) or target


@dataclass(frozen=True)
class _Outcome:
    reply: Reply
    host: str | None = None  # "mx.example.net[192.0.2.1]:25"
    remote_mta: str | None = None  # "mx.example.net"
    tls: str | None = None


class Outbound(service.Service):
    """The forwarding queue's scheduler; a child service of the server.

    ``reactor`` makes connections and runs threads; ``clock`` (default: the
    reactor) decides when attempts and timeouts happen, so tests can drive
    retries with ``task.Clock`` while real sockets carry the sessions.
    """

    name = "outbound"  # type: ignore[assignment]  # Service's stub types it None

    def __init__(
        self,
        config: Any,
        queue: Queue,
        resolver: Any,
        *,
        reactor: Any = None,
        clock: Any = None,
        disk_pool: Any = None,
        timeouts: Timeouts = Timeouts(),
        tls: Any = "default",
        rng: random.Random | None = None,
        smarthost_tls: Any = None,
        endpoint_factory: Callable[[str, str | None], Any] | None = None,
        mta_sts: Any = "default",
        filer: Any = None,
        router: Router | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.config = config
        # Where notices to our own senders go; the server passes its sessions' one.
        self.router = router if router is not None else Router(config)
        self.queue = queue
        self.resolver = resolver
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.disk_pool = disk_pool
        # The filing engine for the notices mailx originates (the server's writer).
        self.filer = filer if filer is not None else InlineFiler(reactor, disk_pool)
        self.timeouts = timeouts
        self.tls = _client_tls() if tls == "default" else tls
        # None: check the certificate against the smarthost's name (tests give a trust root).
        self._smarthost_tls_given = smarthost_tls
        self._smarthost_tls = smarthost_tls
        secrets = config.outbound.srs_secrets
        self.srs: SRS | None = SRS(secrets, clock=self.clock.seconds) if secrets else None
        self._rng = rng or random.Random()
        # (MX name, IP) -> the client endpoint of one attempt; IP None: the
        # smarthost's endpoint string.  Tests pass one to see every attempt.
        self._endpoint_factory = endpoint_factory or self._endpoint
        self._named_endpoints: dict[str, Any] = {}
        self._entries: dict[str, _Entry] = {}
        # Queue ID -> its data file's contents, until its first attempt is over.
        self._in_memory: dict[str, bytes] = {}
        self._in_memory_size = 0
        self.send_from_memory = SEND_FROM_MEMORY  # the largest message kept
        # Entries to remove at the end of this reactor turn, in one disk-pool trip.
        self._removals: list[tuple[str, defer.Deferred[bool]]] = []
        self._removing = False  # a removal batch is scheduled or in the disk pool
        self._slots = _Slots(config.outbound.connections, config.outbound.connections_per_domain)
        self._failed_hosts: dict[str, float] = {}
        self._sessions: set[SMTPClientProtocol] = set()
        # Idle sessions by (peer, TLS options, TLS required, credentials), newest last.
        self._idle: dict[tuple[Any, ...], list[SMTPClientProtocol]] = {}
        self._idle_count = 0
        self._work: set[defer.Deferred] = set()
        self._poll: LoopingCall | None = None
        self._stopping = False
        # RFC 8461 policies, cached in the spool; tests pass their own (HTTPS port).
        self.mta_sts = self._default_mta_sts() if mta_sts == "default" else mta_sts

    def _default_mta_sts(self) -> mtasts.MTASTS:
        fetcher = mtasts.PolicyFetcher(
            self.resolver,
            reactor=self.reactor,
            allowed=lambda ip: destination_allowed(ip, self.config.outbound.allowed_networks),
        )
        return mtasts.MTASTS(
            self.resolver,
            mtasts.PolicyCache(self.config.paths.spool / "mta-sts"),
            fetcher,
            clock=self.clock,
            run_blocking=self._in_thread,
        )

    # -- service -------------------------------------------------------------

    def reconfigure(self, config: Any, resolver: Any, router: Router | None = None) -> None:
        """A reloaded configuration: new secrets, limits and schedule apply from now on."""
        self.config = config
        self.router = router if router is not None else Router(config)
        self.resolver = resolver
        secrets = config.outbound.srs_secrets
        self.srs = SRS(secrets, clock=self.clock.seconds) if secrets else None
        self._slots.total = config.outbound.connections
        self._slots.per_key = config.outbound.connections_per_domain
        self._smarthost_tls = self._smarthost_tls_given
        if self.mta_sts is not None:
            self.mta_sts.resolver = self.mta_sts.fetcher.resolver = resolver

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        # Blocking, once, before any mail is accepted: entries half-made by
        # a crash (never acknowledged) go, whole ones are resumed.
        dropped = self.queue.prepare()
        if dropped:
            log.info("start-up: discarded {n} half-written queue entr(ies)", n=dropped)
        envelopes = self.queue.scan()
        for envelope in envelopes:
            self._add(envelope)
        if envelopes:
            log.info(
                "outbound: resumed {n} queued message(s), {r} recipient(s) pending",
                n=len(envelopes),
                r=sum(len(e.pending) for e in envelopes),
            )
        self._poll = LoopingCall(self._check_flush_request)
        self._poll.clock = self.clock
        self._poll.start(FLUSH_POLL, now=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = True
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for entry in self._entries.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.timer = None
        self._slots.cancel_all()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abortConnection()
        idle = [p for sessions in self._idle.values() for p in sessions]
        for session in idle:
            if session.transport is not None:
                session.transport.abortConnection()
        closed = [p.closed for p in idle]
        return defer.DeferredList(list(self._work) + closed, consumeErrors=True)

    # -- entering the queue --------------------------------------------------

    def envelope_for(
        self,
        queue_id: str,
        sender: str,
        client: str,
        forwards: Sequence[tuple[str, str, bytes]],
        *,
        spf: str | None = None,
        dmarc: str | None = None,
        lmtp: Sequence[tuple[str, str, bytes, str]] = (),
    ) -> Envelope:
        """A new entry's envelope: ``forwards`` is (original recipient, outside address, trace).

        ``lmtp`` is (original recipient, mailbox address, trace, endpoint) for
        the mailboxes of LMTP domains (SPEC 14): they keep the sender as it
        is (the message stays with us: no SRS) and go to that endpoint.

        The envelope sender becomes an SRS address at the domain the message
        was sent to (SPEC 8: so SPF passes at the destination), unless it is
        null (a bounce stays a bounce) or already at one of our domains.
        ``spf`` and ``dmarc`` are the results at reception (None: not
        checked); they decide whether the sender may get a notice later.
        """
        now = self.clock.seconds()
        recipients = []
        seen = set()
        for original, address, trace in forwards:
            if address in seen:
                continue  # SPEC 4: one copy per final address, whatever aliases led there
            seen.add(address)
            recipients.append(
                Recipient(
                    address=address,
                    original=original,
                    mail_from=self._rewrite(sender, original),
                    trace=trace.decode("utf-8", "surrogateescape"),
                    next_attempt=now,
                )
            )
        from mailx.outbound.lmtp import transport_for  # lmtp imports this module

        for original, address, trace, endpoint in lmtp:
            recipients.append(
                Recipient(
                    address=address,
                    original=original,
                    mail_from=sender,
                    trace=trace.decode("utf-8", "surrogateescape"),
                    next_attempt=now,
                    transport=transport_for(endpoint),
                )
            )
        return Envelope(
            id=queue_id,
            sender=sender,
            created=now,
            client=client,
            spf=spf,
            dmarc=dmarc,
            recipients=recipients,
        )

    def _rewrite(self, sender: str, original: str) -> str:
        if not sender or self.srs is None:
            return sender
        domain = sender.rpartition("@")[2].lower()
        if domain in self.config.domains:
            return sender
        return self.srs.forward(sender, original.rpartition("@")[2])

    def queued(self) -> list[float]:
        """When each queued message was accepted (epoch seconds): for the metrics,
        read at scrape time from the scraping thread, hence the copy."""
        return [entry.envelope.created for entry in list(self._entries.values())]

    def submitted(self, envelope: Envelope, data: bytes | None = None) -> None:
        """A new entry is on disk (fsynced): start delivering it.  ``data`` is its
        data file's contents, if the caller still has them in memory."""
        if (
            data is not None
            and len(data) == envelope.size
            and len(data) <= self.send_from_memory
            and self._in_memory_size + len(data) <= HELD_IN_MEMORY
        ):
            self._in_memory[envelope.id] = data
            self._in_memory_size += len(data)
        log.info(
            "{qid}: queued for forwarding: {rcpts}",
            qid=envelope.id,
            rcpts=", ".join(
                f"<{r.address}> from=<{r.mail_from}>" + (f" via {r.transport}" if r.transport else "")
                for r in envelope.recipients
            ),
        )
        self._add(envelope)

    def _add(self, envelope: Envelope) -> None:
        entry = _Entry(envelope)
        self._entries[envelope.id] = entry
        self._schedule(entry)

    # -- flushing -------------------------------------------------------------

    def flush(self) -> int:
        """Make every pending recipient due now (``mailxctl queue flush``); returns how many."""
        now = self.clock.seconds()
        count = 0
        for entry in list(self._entries.values()):
            for r in entry.envelope.pending:
                if id(r) not in entry.in_flight:
                    r.next_attempt = min(r.next_attempt, now)
                    count += 1
            self._schedule(entry)
        log.info("outbound: flush requested: {n} recipient(s) due now", n=count)
        return count

    def _check_flush_request(self) -> defer.Deferred:
        """Look for the request in the disk pool; the poll waits for the answer
        (`LoopingCall` does not call again before the Deferred fires)."""

        def taken(requested: bool) -> None:
            if requested and not self._stopping:
                self.flush()

        def failed(failure: Failure) -> None:
            failure.trap(OSError)
            log.error("outbound: cannot read the flush request: {e}", e=failure.value)

        d = self._in_thread(self.queue.take_flush_request)
        d.addCallbacks(taken, failed)
        return d

    # -- scheduling -----------------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        if self._stopping or not self.running or self._entries.get(entry.envelope.id) is not entry:
            return
        if entry.envelope.complete:
            if not entry.busy and not entry.finishing:
                self._track(self._complete(entry))
            return
        waiting = [r for r in entry.envelope.pending if id(r) not in entry.in_flight]
        if not waiting:
            return
        delay = min(r.next_attempt for r in waiting) - self.clock.seconds()
        # Due now: the next reactor turn, whatever clock measures the waits.
        timer = self.clock if delay > 0 else self.reactor
        entry.timer = timer.callLater(max(0.0, delay), self._run, entry)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._work.add(d)

        def untrack(result: object) -> object:
            self._work.discard(d)
            return result

        d.addBoth(untrack)
        d.addErrback(lambda f: log.failure("outbound: unexpected error", f))
        return d

    def _drop_from_memory(self, queue_id: str) -> None:
        data = self._in_memory.pop(queue_id, None)
        if data is not None:
            self._in_memory_size -= len(data)

    def _forget(self, entry: _Entry, why: str) -> None:
        self._drop_from_memory(entry.envelope.id)
        if self._entries.get(entry.envelope.id) is entry:
            del self._entries[entry.envelope.id]
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            log.info("{qid}: {why}", qid=entry.envelope.id, why=why)

    def _run(self, entry: _Entry) -> None:
        entry.timer = None
        if self._stopping or self._entries.get(entry.envelope.id) is not entry:
            return
        if not any(r.attempts for r in entry.envelope.recipients):
            # Written or scanned at start-up moments ago: nothing to ask the disk.
            self._start_due(True, entry)
            return
        # Still queued (mailxctl queue remove)?  Asked in the disk pool: a stat
        # can wait on a busy disk.
        checked = self._in_thread(self.queue.exists, entry.envelope.id)
        self._track(checked.addCallback(self._start_due, entry))

    def _start_due(self, queued: bool, entry: _Entry) -> None:
        """Start an attempt for each group of recipients that is due."""
        if self._stopping or self._entries.get(entry.envelope.id) is not entry:
            return
        if not queued:
            self._forget(entry, "removed from the queue (mailxctl queue remove)")
            return
        now = self.clock.seconds()
        groups: dict[tuple[str, str, str], list[Recipient]] = {}
        for r in entry.envelope.pending:
            if id(r) not in entry.in_flight and r.next_attempt <= now:
                groups.setdefault((r.destination, r.mail_from, r.trace), []).append(r)
        for (domain, mail_from, trace), recipients in groups.items():
            entry.in_flight.update(id(r) for r in recipients)
            self._track(self._deliver(entry, domain, mail_from, trace, recipients))
        self._schedule(entry)

    # -- one attempt for a group of recipients --------------------------------

    @defer.inlineCallbacks
    def _deliver(
        self, entry: _Entry, domain: str, mail_from: str, trace: str, recipients: list[Recipient]
    ) -> Any:
        entry.busy += 1
        try:
            yield self._deliver_group(entry, domain, mail_from, trace, recipients)
            # A retry reads the file: a queue that backs up does not pile up in memory.
            self._drop_from_memory(entry.envelope.id)
            entry.in_flight.difference_update(id(r) for r in recipients)
            if not self._stopping and self._entries.get(entry.envelope.id) is entry:
                yield self._after_attempt(entry)
        finally:
            entry.in_flight.difference_update(id(r) for r in recipients)
            entry.busy -= 1
        self._schedule(entry)

    @defer.inlineCallbacks
    def _deliver_group(
        self, entry: _Entry, domain: str, mail_from: str, trace: str, recipients: list[Recipient]
    ) -> Any:
        """One attempt, its outcome applied and saved; the recipients stay in flight until then."""
        envelope = entry.envelope
        lmtp = recipients[0].transport is not None  # grouped by destination: all or none
        key = "smarthost" if self.config.outbound.smarthost and not lmtp else domain
        try:
            yield self._slots.acquire(key)
        except defer.CancelledError:
            return
        closing: list[defer.Deferred] = []  # the sessions' connections
        try:
            outcomes = yield self._attempt(envelope, domain, mail_from, trace, recipients, closing)
        except Exception:
            log.failure("{qid}: delivery attempt failed", qid=envelope.id)
            outcomes = {}
        finally:
            # The slot is the connection's use: free once it is closed (after
            # QUIT) or kept idle for the next message.
            done = defer.DeferredList(closing, consumeErrors=True)
            done.addBoth(lambda _: self._slots.release(key))
        now = self.clock.seconds()
        changed = False
        for r in recipients:
            outcome = outcomes.get(r.address) or _Outcome(
                Reply(451, "4.3.0", "local error while delivering")
            )
            if self._stopping and outcome.reply.temporary:
                continue  # shut down mid-attempt: not the destination's fault
            self._apply(envelope, r, outcome, now)
            changed = True
        if changed and not envelope.complete:
            # A complete entry is removed next (if a power cut undoes that, the
            # entry is sent again: at least once).
            yield self._save(entry)

    def _apply(self, envelope: Envelope, r: Recipient, outcome: _Outcome, now: float) -> None:
        reply = outcome.reply
        r.attempts += 1
        r.last_attempt = now
        r.last_reply = _reply_text(reply)
        r.last_host = outcome.host
        r.remote_mta = outcome.remote_mta
        delay = now - envelope.created
        fields = {
            "qid": envelope.id,
            "rcpt": r.address,
            "orig": r.original,
            "relay": outcome.host or "none",
            "tls": outcome.tls or "none",
            "delay": f"{delay:.1f}",
            "attempts": r.attempts,
            "reply": r.last_reply,
            "event": "delivery",  # for mailx.observe.metrics, with kind and status
            # LMTP hand-overs (SPEC 14) count apart from forwards and notices.
            "kind": "lmtp" if r.transport is not None and envelope.kind == "forward" else envelope.kind,
        }
        fmt = (
            "{qid}: to=<{rcpt}> orig_to=<{orig}> relay={relay} tls={tls} delay={delay}s"
            " attempts={attempts} status={status} ({reply})"
        )
        if reply.code // 100 == 2:
            r.state = DELIVERED
            r.status = reply.enhanced or "2.0.0"
            log.info(fmt, status="sent", **fields)
        elif reply.permanent:
            r.state = FAILED
            r.status = reply.enhanced or "5.0.0"
            log.info(fmt, status="bounced", **fields)
        elif now >= envelope.created + self.config.outbound.queue_lifetime:
            r.state = FAILED
            # RFC 3463 4.4.7: delivery time expired.
            r.status = reply.enhanced if reply.enhanced.startswith("4.") else "4.4.7"
            log.info(
                fmt + " gave up after {lifetime:.0f}s",
                status="expired",
                lifetime=self.config.outbound.queue_lifetime,
                **fields,
            )
        else:
            r.status = reply.enhanced or "4.0.0"
            r.next_attempt = min(
                now + retry_after(self.config.outbound.retry, r.attempts),
                envelope.created + self.config.outbound.queue_lifetime,
            )
            log.info(
                fmt + " next attempt in {wait:.0f}s",
                status="deferred",
                wait=r.next_attempt - now,
                **fields,
            )

    @defer.inlineCallbacks
    def _save(self, entry: _Entry) -> Any:
        """Write the envelope; False if the entry was removed meanwhile."""
        yield entry.lock.acquire()
        try:
            yield self._in_thread(self.queue.save, entry.envelope.id, entry.envelope.to_json())
        except FileNotFoundError:
            self._forget(entry, "removed from the queue (mailxctl queue remove)")
            return False
        finally:
            entry.lock.release()
        return True

    @defer.inlineCallbacks
    def _after_attempt(self, entry: _Entry) -> Any:
        envelope = entry.envelope
        now = self.clock.seconds()
        warning = self.config.outbound.delay_warning
        if (
            not envelope.complete
            and warning is not None
            and not envelope.delay_notified
            and now - envelope.created >= warning
        ):
            delayed = [r for r in envelope.pending if r.attempts]
            if delayed:
                header, refusal = yield self._in_thread(
                    self._notice_decision, envelope, delayed[0]
                )
                if refusal is not None:
                    log.info(
                        "{qid}: no delay notice to <{to}>: {why}",
                        qid=envelope.id,
                        to=envelope.sender,
                        why=refusal,
                    )
                else:
                    message = dsn.delay_message(
                        self.config.hostname,
                        envelope,
                        delayed,
                        header,
                        now,
                        envelope.created + self.config.outbound.queue_lifetime,
                    )
                    yield self._send_notice(envelope, "D", "delay", message)
                envelope.delay_notified = True
                yield self._save(entry)

    @defer.inlineCallbacks
    def _complete(self, entry: _Entry) -> Any:
        """Every recipient is done: bounce the failed ones (one DSN), then drop the entry."""
        entry.finishing = True
        envelope = entry.envelope
        failed = envelope.failed
        if failed and not envelope.bounce_queued:
            header, refusal = yield self._in_thread(self._notice_decision, envelope, failed[0])
            if refusal is None:
                message = dsn.bounce_message(
                    self.config.hostname, envelope, failed, header, self.clock.seconds()
                )
                yield self._send_notice(envelope, "B", "bounce", message)
            else:
                log.info(
                    "{qid}: no bounce to <{to}> for {n} failed recipient(s): {why}",
                    qid=envelope.id,
                    to=envelope.sender,
                    n=len(failed),
                    why=refusal,
                )
        yield self._remove(envelope.id)
        self._forget(
            entry,
            f"done: {len(envelope.recipients) - len(failed)} delivered, {len(failed)} failed;"
            " removed from the queue",
        )

    def _notice_decision(
        self, envelope: Envelope, recipient: Recipient
    ) -> tuple[bytes, str | None]:
        """The header to return and `dsn.notice_refusal`'s verdict (blocking: reads the
        data file, and scans up to 256 KiB of a stranger's header off the reactor thread)."""
        header = self._notice_header(envelope, recipient)
        return header, dsn.notice_refusal(envelope, header)

    def _notice_header(self, envelope: Envelope, recipient: Recipient) -> bytes:
        """The header section as the recipient's copy had it (blocking)."""
        return recipient.trace.encode("utf-8", "surrogateescape") + self.queue.read_header(
            envelope.id
        )

    @defer.inlineCallbacks
    def _send_notice(self, envelope: Envelope, suffix: str, kind: str, message: bytes) -> Any:
        """Queue (or file locally) a notice to ``envelope.sender``, sent from ``<>``."""
        notice_id = envelope.id + suffix
        if self._notice_route(envelope.sender)[1]:
            # Signed with our domain's key so the notice passes DMARC at the
            # sender's provider (a no-op without domains.<d>.dkim).
            message = yield self._in_thread(dkimkeys.sign_if_configured, self.config, message)
        copies, entries = self.notice_parts(notice_id, envelope.sender, kind, message)
        if not copies and not entries:
            return
        try:
            # The local copies and the queue entry, all or none (the filing engine).
            yield self.filer.file(Filing(copies, entries))
        except FileExistsError:
            return  # queued before a crash: once is enough
        if copies:
            log.info(
                "{qid}: {kind} notice {nid} delivered to <{to}>",
                qid=envelope.id,
                kind=kind,
                nid=notice_id,
                to=envelope.sender,
                event="delivery",
                status="sent",
            )
        for entry in entries:
            log.info(
                "{qid}: {kind} notice {nid} queued to <{to}>",
                qid=envelope.id,
                kind=kind,
                nid=notice_id,
                to=", ".join(r.address for r in entry.envelope.recipients),
            )
            self._add(entry.envelope)

    def notice_parts(
        self, notice_id: str, to: str, kind: str, message: bytes
    ) -> tuple[list[MaildirCopy], list[QueueCopy]]:
        """A notice from ``<>`` to ``to`` as filing parts: copies in our own
        mailboxes, or a queue entry for outside addresses and the mailboxes of
        LMTP domains (SPEC 14) (``kind``: bounce, delay, notice).  File them
        with `filer`, then `submitted` the entries."""
        from mailx.outbound.lmtp import transport_for  # lmtp imports this module

        mailboxes, forwards = self._notice_route(to)
        handed = [m for m in mailboxes if m.lmtp is not None]
        mailboxes = [m for m in mailboxes if m.lmtp is None]
        copies = [
            MaildirCopy(
                dest.maildir_path(self.config),
                maildir.unique_name(notice_id, n, self.config.hostname),
                (f"Return-Path: <>\r\nDelivered-To: {dest.address}\r\n".encode() + message).replace(
                    b"\r\n", b"\n"
                ),
                body=False,
            )
            for n, dest in enumerate(mailboxes)
        ]
        entries = []
        if forwards or handed:
            now = self.clock.seconds()
            notice = Envelope(
                id=notice_id,
                sender="",
                created=now,
                kind=kind,
                recipients=[
                    Recipient(address=a, original=to, mail_from="", next_attempt=now)
                    for a in forwards
                ]
                + [
                    Recipient(
                        address=m.address,
                        original=to,
                        mail_from="",
                        next_attempt=now,
                        transport=transport_for(m.lmtp),
                    )
                    for m in handed
                    if m.lmtp is not None
                ],
            )
            entries.append(QueueCopy(self.queue.root, notice, message, body=False))
        return copies, entries

    def _notice_route(self, sender: str) -> tuple[list[MailboxDestination], list[str]]:
        """Where a notice to ``sender`` goes: our own mailboxes, or outside."""
        domain = sender.rpartition("@")[2].lower()
        address = reverse_path(sender)  # as routing writes addresses: quoted where needed
        if domain not in self.config.domains:
            return [], [address]
        try:
            decision = srs_route(self.srs, self.config, address) or self.router.route(address)
        except (SMTPReplyError, ValueError) as e:
            log.info("notice to <{to}> dropped: {e}", to=sender, e=e)
            return [], []
        mailboxes = [d for d in decision.destinations if isinstance(d, MailboxDestination)]
        forwards = [d.address for d in decision.destinations if isinstance(d, ForwardDestination)]
        return mailboxes, forwards

    def _remove(self, queue_id: str) -> defer.Deferred[bool]:
        """`Queue.remove`, batched: one batch at a time goes to the filing engine
        (the writer child; the disk pool if it is gone), and the entries done
        meanwhile (or in the same reactor turn) make the next, sharing one
        fsync of the queue directory.  Idle, a removal waits for nothing."""
        d: defer.Deferred[bool] = defer.Deferred()
        self._removals.append((queue_id, d))
        if not self._removing:
            self._removing = True
            self.reactor.callLater(0, self._remove_batch)
        return d

    def _remove_batch(self) -> None:
        batch, self._removals = self._removals, []
        if not batch:
            self._removing = False
            return

        def removed(results: list[bool | OSError]) -> None:
            for (_, d), result in zip(batch, results, strict=True):
                if isinstance(result, OSError):
                    d.errback(result)
                else:
                    d.callback(result)

        def failed(failure: Failure) -> None:
            for _, d in batch:
                d.errback(failure)

        def next_batch(_: object) -> None:
            self._remove_batch()  # what came meanwhile; or none, and the flag is down

        ids = [queue_id for queue_id, _ in batch]

        def without_writer(failure: Failure) -> defer.Deferred:
            failure.trap(WriterGone)  # it died or stops: the disk pool does the same work
            return self._in_thread(self.queue.remove_many, ids)

        # The filing engine removes too: in the server, its child process, so
        # that no disk thread here contends with the reactor for the GIL.
        done = self.filer.remove_entries(self.queue.root, ids)
        done.addErrback(without_writer)
        done.addCallbacks(removed, failed)
        done.addBoth(next_batch)

    def _in_thread(self, func: Callable[..., Any], *args: Any) -> defer.Deferred:
        pool = self.disk_pool if self.disk_pool is not None else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, func, *args)

    # -- routing and sessions -----------------------------------------------

    @defer.inlineCallbacks
    def _attempt(
        self,
        envelope: Envelope,
        domain: str,
        mail_from: str,
        trace: str,
        recipients: list[Recipient],
        closing: list[defer.Deferred],
    ) -> Any:
        """Try the destination's hosts in order; each recipient's outcome.

        ``domain`` is the group's destination: a recipient domain, or an LMTP
        transport (`mailx.outbound.lmtp`), which has one host and no MX.
        """
        addresses = tuple(r.address for r in recipients)

        def every(outcome: _Outcome) -> dict[str, _Outcome]:
            return {a: outcome for a in addresses}

        transaction = Transaction(
            mail_from=mail_from,
            recipients=addresses,
            prefix=trace.encode("utf-8", "surrogateescape"),
            data_path=self.queue.data_path(envelope.id),
            size=envelope.size + len(trace.encode("utf-8", "surrogateescape")),
            eight_bit=envelope.eight_bit,
            data=self._in_memory.get(envelope.id),
        )
        from mailx.outbound.lmtp import endpoint_of  # lmtp imports this module

        lmtp = endpoint_of(recipients[0].transport)
        if lmtp is not None:
            try:
                result = yield self._session(
                    lmtp, None, transaction, closing, tls=None, qid=envelope.id, lmtp=True
                )
            except HostFailure as e:
                log.info(
                    "{qid}: LMTP {peer} failed: {reply}",
                    qid=envelope.id,
                    peer=lmtp,
                    reply=_reply_text(e.reply),
                )
                reply = e.reply
                if not reply.temporary:
                    # A 5xx greeting or LHLO is the server's state, not the recipient's.
                    reply = Reply(
                        451, "4.4.0", f"LMTP {lmtp} refused the session: {_reply_text(reply)}"
                    )
                return every(_Outcome(reply, lmtp, lmtp, None))
            return self._outcomes(result, lmtp, lmtp)
        policy = None
        targets: Sequence[tuple[str, str | None]]  # no IP: the smarthost, by name
        if self.config.outbound.smarthost:
            refusal = yield self._smarthost_refusal()
            if refusal is not None:
                log.info("{qid}: {reply}", qid=envelope.id, reply=_reply_text(refusal))
                return every(_Outcome(refusal))
            targets = [(self.config.outbound.smarthost, None)]
        else:
            try:
                hosts: list[tuple[str, str]] = yield self._hosts(domain)
            except _Unroutable as e:
                return every(_Outcome(e.reply))
            targets = self._reachable(envelope, domain, hosts)
            if not targets:
                # SPEC 8: like an unreachable host, retried until queue_lifetime
                # (the owner may fix allowed_networks, the domain its DNS).
                return every(
                    _Outcome(
                        Reply(
                            451,
                            "4.4.4",
                            f"the mail hosts of {domain} have only private or reserved"
                            " addresses, not in outbound.allowed_networks",
                        )
                    )
                )
            # RFC 8461 applies to MX delivery only: the smarthost is our own
            # choice, and its certificate is checked when we log in to it.
            policy = yield self._mta_sts_policy(envelope.id, domain)
            if policy is not None:
                targets = self._apply_mta_sts(envelope, domain, policy, targets)
                if not targets:
                    # RFC 8461 4.2, 5.1: never deliver against an enforce policy;
                    # a temporary failure, so the next try sees an updated policy.
                    return every(
                        _Outcome(
                            Reply(
                                451,
                                "4.7.5",
                                f"no mail host of {domain} is listed in its MTA-STS policy",
                            )
                        )
                    )
        last: HostFailure | None = None
        last_target: tuple[str, str | None] | None = None
        for name, ip in targets[:MAX_ADDRESSES]:
            if self._stopping:
                break
            peer = self._peer(name, ip)
            failure = None
            # Each way to talk to the host, best first; the next after a failed handshake.
            ways = self._tls_ways(name, ip, policy)
            for n, (tls, require_tls) in enumerate(ways):
                try:
                    result = yield self._session(
                        name,
                        ip,
                        transaction,
                        closing,
                        tls=tls,
                        require_tls=require_tls,
                        qid=envelope.id,
                    )
                except HostFailure as e:
                    failure = e
                    if not e.tls_failed or n + 1 == len(ways):
                        break
                    if policy is not None and policy.mode == mtasts.TESTING and n == 0:
                        log.info(
                            "{qid}: MTA-STS testing: {peer}: {reply}; enforce would not"
                            " deliver to it",
                            qid=envelope.id,
                            peer=peer,
                            reply=str(e.reply),
                        )
                    log.info(
                        "{qid}: {peer}: {reply}; retrying {how}",
                        qid=envelope.id,
                        peer=peer,
                        reply=str(e.reply),
                        how="without TLS" if ways[n + 1][0] is None else "with unverified TLS",
                    )
                    continue
                if policy is not None and policy.mode == mtasts.TESTING and result.tls is None:
                    log.info(
                        "{qid}: MTA-STS testing: {peer} delivered without TLS; enforce would"
                        " not deliver to it",
                        qid=envelope.id,
                        peer=peer,
                    )
                if ip is not None:
                    self._failed_hosts.pop(ip, None)
                return self._outcomes(result, name, peer)
            if failure is not None:
                if policy is not None and policy.mode == mtasts.ENFORCE and failure.tls_failed:
                    log.info(
                        "{qid}: {peer}: {reply}; MTA-STS enforce: no clear-text fallback",
                        qid=envelope.id,
                        peer=peer,
                        reply=str(failure.reply),
                    )
                last, last_target = failure, (name, ip)
                if ip is not None:
                    self._failed_hosts[ip] = self.clock.seconds()
                log.info(
                    "{qid}: {peer} failed: {reply}",
                    qid=envelope.id,
                    peer=peer,
                    reply=_reply_text(failure.reply),
                )
        reply = (
            last.reply if last is not None else Reply(451, "4.4.4", f"no host to try for {domain}")
        )
        if not reply.temporary:
            # A 5xx greeting or EHLO is one host's trouble; another may work later.
            reply = Reply(
                451, "4.4.0", f"all hosts for {domain} refused the session: {_reply_text(reply)}"
            )
        host = self._peer(*last_target) if last_target else None
        return every(
            _Outcome(
                reply,
                host,
                _mta_name(last_target[0]) if last_target else None,
                last.tls if last else None,
            )
        )

    def _reachable(
        self, envelope: Envelope, domain: str, targets: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """The targets we may connect to (`destination_allowed`); the others are logged."""
        networks = self.config.outbound.allowed_networks
        allowed = [t for t in targets if destination_allowed(t[1], networks)]
        refused = [t for t in targets if t not in allowed]
        if refused:
            log.info(
                "{qid}: not connecting to {hosts} for {domain}: private or reserved address,"
                " not in outbound.allowed_networks",
                qid=envelope.id,
                hosts=", ".join(f"{name}[{ip}]" for name, ip in refused),
                domain=domain,
            )
        return allowed

    @defer.inlineCallbacks
    def _mta_sts_policy(self, qid: str, domain: str) -> Any:
        """The domain's MTA-STS policy in enforce or testing mode, else None (never fails)."""
        if self.mta_sts is None or not self.config.outbound.mta_sts:
            return None
        try:
            policy = yield self.mta_sts.policy(domain, qid)
        except Exception:
            log.failure("{qid}: MTA-STS lookup for {domain} failed", qid=qid, domain=domain)
            return None
        if policy is None or policy.mode not in (mtasts.ENFORCE, mtasts.TESTING):
            return None
        return policy

    def _apply_mta_sts(
        self, envelope: Envelope, domain: str, policy: Any, targets: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """RFC 8461 4.1: the MX hosts the policy lists; testing mode only logs the others."""
        unlisted = sorted({name for name, _ in targets if not policy.allows(name)})
        if not unlisted:
            return targets
        if policy.mode == mtasts.TESTING:
            log.info(
                "{qid}: MTA-STS testing: {hosts} not in the policy of {domain} ({mx});"
                " enforce would not deliver to them",
                qid=envelope.id,
                hosts=", ".join(unlisted),
                domain=domain,
                mx=", ".join(policy.mx),
            )
            return targets
        log.info(
            "{qid}: MTA-STS enforce: not delivering to {hosts}: not in the policy of"
            " {domain} ({mx})",
            qid=envelope.id,
            hosts=", ".join(unlisted),
            domain=domain,
            mx=", ".join(policy.mx),
        )
        return [t for t in targets if t[0] not in unlisted]

    def _tls_ways(self, name: str, ip: str | None, policy: Any) -> list[tuple[Any, bool]]:
        """(TLS options or None, TLS required) to try in turn with one host.

        Without a policy: opportunistic TLS, then clear text after a failed
        handshake (RFC 7435).  ``enforce``: TLS verified for the MX host
        name, nothing else (RFC 8461 4.2).  ``testing``: verified first, then
        as without a policy, so the failure is logged and the mail still goes.
        """
        opportunistic = [(self.tls, False), (None, False)]
        if ip is None or policy is None:
            return opportunistic
        verified = self._mx_tls(name)
        if policy.mode == mtasts.ENFORCE:
            return [(verified, True)]
        return [(verified, False), *opportunistic]

    def _mx_tls(self, name: str) -> Any:
        """TLS options checking an MX's certificate for its host name (RFC 8461 4.1).

        Against the system's trust store (OpenSSL's default paths, so
        ``SSL_CERT_FILE`` applies); made per session, as OpenSSL reads that
        variable when the context is made.
        """
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(name)

    @defer.inlineCallbacks
    def _smarthost_refusal(self) -> Any:
        """None when the smarthost's addresses may be connected to, else the reply to defer with.

        The smarthost's name is resolved as the endpoint will resolve it
        (the system's resolver, getaddrinfo: ``localhost`` and /etc/hosts
        work), and every address must be allowed; the endpoint then
        resolves it again itself, a moment later, under the owner's
        control.  Endpoints without a host (``unix:``) are local.
        """
        smarthost = self.config.outbound.smarthost
        host = _endpoint_host(clientFromString(self.reactor, smarthost))
        if host is None:
            return None
        try:
            found = yield deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                socket.getaddrinfo,
                host,
                None,
                0,
                socket.SOCK_STREAM,
            )
        except OSError as e:
            return Reply(451, "4.4.3", f"cannot resolve the smarthost {host}: {e}")
        addresses = sorted({info[4][0] for info in found})
        refused = [a for a in addresses if not destination_allowed(a, self.config.outbound.allowed_networks)]
        if refused or not addresses:
            return Reply(
                451,
                "4.4.4",
                f"not connecting to the smarthost {host}[{', '.join(refused)}]: private or"
                " reserved address, not in outbound.allowed_networks",
            )
        return None

    def _outcomes(self, result: SessionResult, name: str, peer: str) -> dict[str, _Outcome]:
        mta = _mta_name(name)
        return {a: _Outcome(reply, peer, mta, result.tls) for a, reply in result.replies.items()}

    def _verified_smarthost_tls(self) -> Any:
        if self._smarthost_tls is None:
            self._smarthost_tls = _verified_tls_for(self.reactor, self.config.outbound.smarthost)
        return self._smarthost_tls

    def _endpoint(self, name: str, ip: str | None) -> Any:
        """The endpoint for an MX address, or the smarthost's (``ip`` None)."""
        if ip is None:
            # Parsed once per string: clientFromString's tokenizer was 2% of
            # the reactor's time per LMTP delivery.  An endpoint is only a
            # description; each connect() makes its own connection.
            endpoint = self._named_endpoints.get(name)
            if endpoint is None:
                if len(self._named_endpoints) >= NAMED_ENDPOINTS_KEPT:
                    self._named_endpoints.clear()  # reloads changed the names many times
                endpoint = self._named_endpoints[name] = clientFromString(self.reactor, name)
            return endpoint
        kind = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        return kind(self.reactor, ip, self.config.outbound.port, timeout=self.timeouts.connect)

    def _peer(self, name: str, ip: str | None) -> str:
        if ip is None:
            return name
        return f"{name}[{ip}]:{self.config.outbound.port}"

    @defer.inlineCallbacks
    def _hosts(self, domain: str) -> Any:
        """(MX name, IP) pairs to try, best first (RFC 5321 5.1); `_Unroutable` if none."""
        try:
            mxs = yield self.resolver.lookup_mail_exchangers(domain)
        except NullMXError:
            # RFC 7505 4.2: 556 5.1.10, and no retry.
            raise _Unroutable(Reply(556, "5.1.10", f"{domain} accepts no mail (null MX)")) from None
        except NXDomainError:
            raise _Unroutable(Reply(550, "5.1.2", f"domain {domain} does not exist")) from None
        except DNSError as e:
            raise _Unroutable(
                Reply(451, "4.4.3", f"DNS lookup of MX for {domain} failed: {e}")
            ) from None
        # RFC 5321 5.1: hosts of equal preference are tried in random order.
        by_preference: dict[int, list[Any]] = {}
        for mx in mxs:
            by_preference.setdefault(mx.preference, []).append(mx)
        ordered = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self._rng.shuffle(group)
            ordered.extend(group)
        targets: list[tuple[str, str]] = []
        temporary = False
        for mx in ordered:
            for lookup in (self.resolver.lookup_aaaa, self.resolver.lookup_a):
                try:
                    found = yield lookup(mx.exchange)
                except DNSVoidError:
                    continue
                except DNSError:
                    temporary = True
                    continue
                targets.extend(
                    (mx.exchange, ip) for ip in found if (mx.exchange, ip) not in targets
                )
        if not targets:
            if mxs and mxs[0].implicit and not temporary:
                raise _Unroutable(
                    Reply(550, "5.1.2", f"{domain} has neither MX nor address records")
                )
            raise _Unroutable(
                Reply(451, "4.4.4", f"no address found for the mail hosts of {domain}")
            )
        # A host that failed lately goes last, the others keep their order.
        now = self.clock.seconds()
        fresh = {ip for ip, when in self._failed_hosts.items() if now - when < HOST_FAILURE_MEMORY}
        return [t for t in targets if t[1] not in fresh] + [t for t in targets if t[1] in fresh]

    @defer.inlineCallbacks
    def _session(
        self,
        name: str,
        ip: str | None,
        transaction: Transaction,
        closing: list[defer.Deferred],
        tls: Any = "default",
        require_tls: bool = False,
        qid: str = "",
        lmtp: bool = False,
    ) -> Any:
        """One session, on a kept connection to the host if there is one; ``tls`` the
        options for STARTTLS ("default": ours, None: none).  With ``lmtp``, ``name``
        is an LMTP endpoint string, spoken to by `mailx.outbound.lmtp`."""
        peer = self._peer(name, ip)
        if ip is not None and not destination_allowed(ip, self.config.outbound.allowed_networks):
            # `_reachable` filtered them out already; never connect whatever the path.
            raise HostFailure(Reply(451, "4.4.4", f"{peer}: private or reserved address"))
        endpoint = self._endpoint_factory(name, ip)
        auth = self.config.outbound.smarthost_auth
        credentials = (
            (auth.username, auth.password) if ip is None and not lmtp and auth is not None else None
        )
        options = self.tls if tls == "default" else tls
        if credentials is not None and options is not None:
            options = self._verified_smarthost_tls()
        settings = ClientSettings(
            helo=self.config.hostname,
            timeouts=self.timeouts,
            clock=self.clock,
            tls=options,
            credentials=credentials,
            require_tls=require_tls,
            run_blocking=self._in_thread,
        )
        # Verified TLS options are made per session: what they check is the name.
        verified = options is not None and options is not self.tls
        key = (peer, options is None, verified, require_tls, credentials, lmtp)
        while True:
            idle = self._take_idle(key)
            if idle is None:
                break
            self._sessions.add(idle)
            done = idle.reuse(transaction)
            closing.append(idle.released)
            try:
                result = yield done
            except HostFailure as e:
                if not e.reused:
                    raise
                # The server closed the kept connection (its idle timeout, a
                # 421): no fault of the host, nothing sent; a new connection.
                log.info(
                    "{qid}: {peer}: kept connection unusable ({reply}); opening a new one",
                    qid=qid,
                    peer=peer,
                    reply=str(e.reply),
                )
                continue
            finally:
                self._sessions.discard(idle)
            return result
        settings = replace(settings, idle=self._keep_idle)
        if lmtp:
            from mailx.outbound.lmtp import LMTPClientProtocol

            protocol: SMTPClientProtocol = LMTPClientProtocol(transaction, settings, peer)
        else:
            protocol = SMTPClientProtocol(transaction, settings, peer)
        protocol.cache_key = key
        try:
            yield endpoint.connect(_OneSession(protocol))
        except Exception as e:
            raise HostFailure(Reply(451, "4.4.1", f"connect to {peer} failed: {e}")) from None
        self._sessions.add(protocol)
        closing.append(protocol.released)
        try:
            result = yield protocol.done
        finally:
            self._sessions.discard(protocol)
        return result

    # -- idle sessions (connection reuse) ---------------------------------------

    def _keep_idle(self, protocol: SMTPClientProtocol) -> bool:
        """Keep a session whose transaction is over, for the next message to its host.

        At most as many idle sessions as ``outbound.connections`` (and per
        host ``connections_per_domain``) allow at once (Postfix keeps them in scache).
        """
        key = protocol.cache_key
        sessions = self._idle.setdefault(key, [])
        per_host = sum(len(v) for k, v in self._idle.items() if k[0] == key[0])
        if (
            self._stopping
            or not self.running
            or self._idle_count >= self.config.outbound.connections
            or per_host >= self.config.outbound.connections_per_domain
        ):
            if not sessions:
                del self._idle[key]
            return False
        sessions.append(protocol)
        self._idle_count += 1
        protocol.closed.addCallback(lambda _: self._drop_idle(protocol))
        return True

    def _drop_idle(self, protocol: SMTPClientProtocol) -> None:
        sessions = self._idle.get(protocol.cache_key)
        if sessions and protocol in sessions:
            sessions.remove(protocol)
            self._idle_count -= 1
            if not sessions:
                del self._idle[protocol.cache_key]

    def _take_idle(self, key: tuple[Any, ...]) -> SMTPClientProtocol | None:
        """The newest idle session for ``key`` (same host, same TLS demands), if any."""
        sessions = self._idle.get(key)
        while sessions:
            protocol = sessions.pop()
            self._idle_count -= 1
            if not sessions:
                del self._idle[key]
            if protocol.idle:
                return protocol
            sessions = self._idle.get(key)
        return None


def _verified_tls_for(reactor: Any, smarthost: str) -> Any:
    """TLS options that check the smarthost's certificate against its host name.

    Credentials must reach the relay they are for, not whoever intercepts
    the connection, so unlike MX delivery this checks the certificate (the
    platform's trust store); a failed check never falls back to sending
    them in clear text (the client refuses AUTH without TLS).
    """
    from twisted.internet import ssl

    host = getattr(clientFromString(reactor, smarthost), "_host", None)
    if not host:  # tls:, unix: and other endpoints carry their own security
        return _client_tls()
    return ssl.optionsForClientTLS(host)


def _endpoint_host(endpoint: Any) -> str | None:
    """The host name or address a client endpoint connects to; None for ``unix:`` and the like.

    Twisted keeps it in private attributes (``tcp:`` ``_host``, ``tls:``
    wraps a HostnameEndpoint with ``_hostText``), as `_verified_tls_for`
    relies on too; there is no public accessor.
    """
    for _ in range(4):
        for attribute in ("_hostText", "_host"):
            host = getattr(endpoint, attribute, None)
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            if isinstance(host, str) and host:
                return host
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
        if endpoint is None:
            return None
    return None


class _OneSession(ClientFactory):
    """connectProtocol's factory, without its two log lines per connection."""

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.protocol_instance


class _Unroutable(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _client_tls() -> Any:
    """Opportunistic TLS (RFC 7435): encrypt, but check no certificate.

    An MX's certificate rarely names the MX host in a way we could check
    without DANE or MTA-STS, and refusing to deliver over an unverified
    channel would only push the message into clear text.
    """
    from twisted.internet import ssl

    return ssl.CertificateOptions(verify=False)
