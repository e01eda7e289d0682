# -*- test-case-name: tests.test_smtp -*-
"""The ESMTP server: Twisted's ESMTP with the gaps of the research notes closed.

Twisted's ``smtp.ESMTP`` gives us the reply plumbing, TimeoutMixin and the
EHLO/extension machinery, but the probes (research notes, sections 1-4) found
that its line handling can be desynchronised (over-long DATA lines, no-CRLF
floods, STARTTLS injection), that asynchronous checks break pipelining, and
that SIZE, PIPELINING, ENHANCEDSTATUSCODES, NOOP and VRFY are missing.  So this
subclass owns the byte stream and the command handlers, and keeps Twisted's
protocol skeleton:

- Input is processed from one buffer, parsed from an offset (linear time).
  Processing stops while a reason to hold input stands (``HOLD_*``: the
  greeting pause, a Deferred such as a recipient check or the end-of-data
  filing, the error pause, replies the client does not read); pipelined
  lines wait in the buffer, so replies always come in order (RFC 2920
  section 3), and the socket is not read meanwhile (while a check runs, up
  to one read more, so that a hang-up is noticed).
- DATA is handled chunk by chunk rather than line by line: dot-unstuffing,
  bare CR/LF normalisation and size counting are bytes operations on whole
  runs of lines, which keeps a 100 KiB message from costing a thousand Python
  calls.  Only ``<CRLF>.<CRLF>`` ends DATA.
- Over-long input ends the session instead of being skipped, so the rest of
  a line can never be read as commands.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import address, defer, interfaces, tcp
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.mail import smtp
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailx.inbound.routing import AddressError, parse_address
from mailx.smtp import replies
from mailx.smtp.replies import Reply, SMTPReplyError
from mailx.text import Logger

log = Logger(namespace="mailx.smtp")

COMMAND = "COMMAND"
DATA = "DATA"
AUTH = "AUTH"  # the next line is a SASL response (RFC 4954 4), not a command

# Listener kinds.  Port 25 (an MX) never offers AUTH; the submission
# listeners (SPEC 11) take mail only from authenticated users, over TLS.
SMTP = "smtp"
SUBMISSION = "submission"  # RFC 6409, port 587: STARTTLS, then AUTH
SUBMISSIONS = "submissions"  # RFC 8314, port 465: TLS from the first byte
LISTENER_KINDS = (SMTP, SUBMISSION, SUBMISSIONS)

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_COMMAND_LINE = 510
# A partial command line (no CRLF yet) longer than this cannot become a valid
# command; keep reading it and memory grows with the attacker's patience.
MAX_PARTIAL_COMMAND = 4096
# RFC 5322 2.1.1 limits lines to 998 octets, but real mail (HTML mailers,
# long base64 without folding) exceeds that; SPEC 5 accepts up to 64 KiB.
MAX_DATA_LINE = 64 * 1024
# Input kept from a client that talks before the banner: it is refused when
# the pause ends whatever it said, so a little is enough to know it spoke.
MAX_EARLY_INPUT = 4096

# Why input is held: while any reason stands, nothing is processed and the
# socket is not read, so a stranger's unread input stays in the kernel;
# except while a check runs, when reading goes on up to MAX_HELD_INPUT so
# that a client hanging up during its message's checks is noticed at once.
HOLD_GREETING = "greeting"  # the pause before the banner
HOLD_CHECK = "check"  # waiting for a Deferred answer (checks, filing); replies stay in order
HOLD_ERROR_PAUSE = "error pause"  # smtpd_error_sleep_time after repeated errors
HOLD_BACKLOG = "backlog"  # our replies are not being read (the transport paused us)
# Postfix's smtpd_junk_command_limit counts NOOP, VRFY, ETRN and RSET; EXPN
# and HELP cost us as much and deliver nothing either.
JUNK_COMMANDS = frozenset((b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP"))
# Unprocessed input kept while a check holds the session: one socket read.
MAX_HELD_INPUT = 64 * 1024
# Seconds a closing session waits for its last replies to be read before it
# is aborted: loseConnection waits for the write buffer to drain, and a
# client that keeps its receive window shut would keep the session, its slot
# and a spilled body's spool file for as long as it liked.
CLOSE_GRACE = 10.0

_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _partial_line_length(tail: bytes) -> int:
    """Octets of the unfinished last line, as normalised (a bare CR ends a line).

    ``tail`` holds no LF; a final CR may be the first half of a CRLF still in
    flight, so it is not counted.
    """
    if tail.endswith(b"\r"):
        tail = tail[:-1]
    return len(tail) - (tail.rfind(b"\r") + 1)


def _longest_line(region: bytes) -> int:
    """The longest line of ``region`` as normalised: CRLF, bare LF and bare CR end lines."""
    longest = max(map(len, region.split(b"\n")))  # fast, and never shorter
    if longest <= MAX_DATA_LINE:
        return longest
    return max(map(len, _LINE_BREAKS.split(region)))


def _normalise_breaks(region: bytes) -> bytes:
    """Turn every bare CR or LF into CRLF (SPEC 5: never stored as-is)."""
    return _LINE_BREAKS.sub(b"\r\n", region)


class Session:
    """What the delivery layer knows about the client of one connection."""

    __slots__ = (
        "session_id",
        "client_ip",
        "client_port",
        "helo",
        "esmtp",
        "tls",
        "reverse_name",
        "started",
        "kind",
        "account",
    )

    def __init__(
        self, session_id: str, client_ip: str, client_port: int, kind: str = SMTP
    ) -> None:
        self.kind = kind  # SMTP, SUBMISSION or SUBMISSIONS
        self.account: str | None = None  # after a successful AUTH (submission only)
        self.session_id = session_id
        self.client_ip = client_ip
        self.client_port = client_port
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None  # "TLSv1.3:TLS_AES_256_GCM_SHA384" once negotiated
        self.reverse_name: str | None = None
        self.started = time.time()


def _peer_ip(transport: Any) -> tuple[str, int]:
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer), 0
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return host, getattr(peer, "port", 0) or 0


@implementer(interfaces.IPushProducer)
class MailxESMTP(smtp.ESMTP):
    """One SMTP session.  See the module docstring for what differs from Twisted.

    It is the push producer of its transport's writes: when a client does not
    read its replies and the write buffer passes the transport's high-water
    mark, the transport pauses us and we stop reading and processing (as
    aiosmtpd awaits ``drain()``), so memory per session stays bounded.
    """

    noisy = False

    def __init__(self, factory: MailxSMTPFactory) -> None:
        super().__init__(chal={}, contextFactory=factory.tls_context)
        self.factory = factory
        self.kind = factory.kind  # SMTP, SUBMISSION or SUBMISSIONS: what this listener allows
        self.settings = factory.settings
        self.host = self.settings.hostname.encode("ascii")
        self.timeout = self.settings.idle_timeout
        self.mode = COMMAND
        self._auth_next: Callable[[bytes], None] | None = None  # in AUTH mode: what takes the response
        self.session: Session | None = None
        self.delivery: Any = None
        # Unprocessed input is self._buffer[self._offset:]; the consumed prefix
        # is dropped once per _process run, so parsing stays linear.
        self._buffer = b""
        self._offset = 0
        self._data_line_start = True  # DATA: the next byte starts a line (after CRLF)
        self._holds: set[str] = set()  # see HOLD_*; empty: input is processed
        self._reading_paused = False  # we paused the transport's reading
        self._producing = False  # registered as the transport's producer
        self._processing = False
        self._closing = False
        self._session_deadline: Any = None
        self._greeting: Any = None
        self._pause: Any = None
        self._abort_later: Any = None  # CLOSE_GRACE after loseConnection
        self._admitted = False
        self._finishing: Any = None  # the message whose end of data is being handled
        self.limit_key = ""  # what the factory's per-IP counts know this client by
        self._errors = 0  # bad commands and refused recipients, whole session
        self._junk = 0  # junk commands since the last delivered message
        self._reset_transaction()

    # --- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        ip, port = _peer_ip(self.transport)
        refusal = self.factory.admit(self, ip)
        if refusal is not None:
            self.transport.write(refusal.wire())
            self._hang_up()
            return
        self._admitted = True
        self.transport.registerProducer(self, True)
        self._producing = True
        self.session = Session(self.factory.new_session_id(), ip, port, self.factory.kind)
        if _openssl_connection(self.transport) is not None:
            self.startedTLS = True  # an implicit-TLS (ssl:) listener
            self.session.tls = "TLS"
        self.canStartTLS = (
            interfaces.ITLSTransport.providedBy(self.transport) and self.ctx is not None
        )
        self.delivery = self.factory.delivery_for(self.session)
        log.info(
            "{session}: connect from {ip}:{port}",
            session=self.session.session_id,
            ip=ip,
            port=port,
            event="connect",  # `event`: what mailx.observe.metrics counts (see there)
        )
        self.setTimeout(self.timeout)
        self._session_deadline = self.callLater(
            self.settings.session_timeout, self._session_too_long
        )
        if self.settings.greeting_delay > 0:
            # Like Postfix's postscreen greet pause: real MTAs wait for the
            # banner (RFC 5321 4.5.3.2.1 gives them 5 minutes); spamware
            # that talks first is told so and dropped.
            self._holds.add(HOLD_GREETING)
            self._greeting = self.callLater(self.settings.greeting_delay, self._greet_client)
        else:
            self._greet_client()

    def _greet_client(self) -> None:
        self._greeting = None
        self._holds.discard(HOLD_GREETING)
        if self.factory.shutting_down:
            self._close_with(replies.SHUTTING_DOWN)
            return
        if self._buffer:
            log.info(
                "{session}: early talker from {ip} refused",
                session=self.session.session_id,
                ip=self.session.client_ip,
            )
            self._close_with(replies.EARLY_TALKER)
            return
        self.sendCode(220, self.host + b" ESMTP mailx")
        self._process()  # reading resumes if it was paused

    def connectionLost(self, reason: Failure = None) -> None:
        self._closing = True
        self.setTimeout(None)
        if self._greeting is not None and self._greeting.active():
            self._greeting.cancel()
        if self._pause is not None and self._pause.active():
            self._pause.cancel()
        if self._session_deadline is not None and self._session_deadline.active():
            self._session_deadline.cancel()
        if self._abort_later is not None and self._abort_later.active():
            self._abort_later.cancel()
        if self.mode == DATA and self._message is not None:
            self._message.connectionLost()
            self._message = None
        if self._finishing is not None:
            # Nobody is left to answer: the checks stop and free their slot.
            abandon = getattr(self._finishing, "abandon", None)
            self._finishing = None
            if abandon is not None:
                abandon()
        if self._admitted:
            self.factory.release(self)
            log.info("{session}: disconnect", session=self.session.session_id)
        if self.delivery is not None:
            self.delivery.disconnected()

    def shutdown(self) -> None:
        if self.mode == COMMAND and HOLD_CHECK not in self._holds:
            self._close_with(replies.SHUTTING_DOWN)

    def timeoutConnection(self) -> None:
        self._close_with(replies.IDLE_TIMEOUT)

    def _session_too_long(self) -> None:
        self._close_with(replies.SESSION_TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        if self._closing:
            return
        if self.session is not None:
            log.info(
                "{session}: closing: {reply}", session=self.session.session_id, reply=str(reply)
            )
        self.reply(reply)
        self._hang_up()

    def _hang_up(self) -> None:
        """Close after the replies are sent; at once for a client that does not read them.

        A registered producer keeps a Twisted transport open after
        ``loseConnection``, so it is unregistered first.  A client that lets
        our replies pile up would hold the socket open for as long as it
        keeps its receive window shut: that one is aborted, at once when the
        transport had paused us, else after CLOSE_GRACE.
        """
        self._closing = True
        self._buffer = b""
        self._offset = 0
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        if HOLD_BACKLOG in self._holds:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            if self._abort_later is None:
                self._abort_later = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # --- flow control -------------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: the client is not reading."""
        self._holds.add(HOLD_BACKLOG)

    def resumeProducing(self) -> None:
        self._release(HOLD_BACKLOG)

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _release(self, reason: str) -> None:
        self._holds.discard(reason)
        if self._closing:
            return
        if self._holds:
            self._sync_reading()  # e.g. back to reading behind a check
        else:
            self._process()

    def _sync_reading(self) -> None:
        """Read from the socket only while input can be processed (see HOLD_*)."""
        if self._closing or self.transport is None:
            return
        if self._holds == {HOLD_CHECK}:
            held = len(self._buffer) - self._offset > MAX_HELD_INPUT
        else:
            held = bool(self._holds)
        if held != self._reading_paused:
            self._reading_paused = held
            if held:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # --- replies ----------------------------------------------------------

    def reply(self, reply: Reply, **fields: object) -> None:
        text = reply.text.format(**fields) if fields else reply.text
        if reply.enhanced:
            text = f"{reply.enhanced} {text}"
        self._send(b"%d %s\r\n" % (reply.code, text.encode("utf-8")))

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # Twisted's own callers (banner, EHLO) come through here.
        lines = message.splitlines() or [b""]
        out = [b"%03d-%s\r\n" % (code, line) for line in lines[:-1]]
        out.append(b"%03d %s\r\n" % (code, lines[-1]))
        self._send(b"".join(out))

    def _send(self, data: bytes) -> None:
        """Send a reply at once when nothing is queued before it.

        ``transport.write`` queues the bytes and registers the socket for
        writability until the next reactor turn: two epoll_ctl calls per
        reply on top of the send, measured at ~10% of the CPU of a small
        message.  A reply to a client that is waiting for it nearly always
        fits the socket buffer, so on a plain TCP connection with an empty
        write buffer it is sent directly (what asyncio's transports do);
        TLS, a backlog or a partial send fall back to ``transport.write``,
        which keeps the order and counts towards the high-water mark at which
        the transport pauses us (``pauseProducing``).  This reads
        ``tcp.Server`` internals (``dataBuffer``, ``_tempDataBuffer``) because
        no public API offers "send now if nothing is queued"; the type check
        keeps any other transport on the public path.
        """
        transport = self.transport
        while isinstance(transport, _ProxyFirstWrapper):
            transport = transport.transport
        if (
            type(transport) is tcp.Server
            and not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        ):
            sent = transport.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        self.transport.write(data)

    # --- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        if HOLD_GREETING in self._holds:
            # Refused when the pause ends, whatever it says; keep a sample.
            self._buffer = (self._buffer + data)[:MAX_EARLY_INPUT]
        else:
            self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._holds and not self._closing:
                if self.factory.shutting_down and self.mode == COMMAND:
                    # Between transactions: the client retries elsewhere or later.
                    self._close_with(replies.SHUTTING_DOWN)
                    break
                if self._offset >= len(self._buffer):
                    break
                if self.mode == DATA:
                    if not self._process_data():
                        break
                else:
                    buf = self._buffer
                    end = buf.find(b"\r\n", self._offset)
                    if end < 0:
                        if len(buf) - self._offset > MAX_PARTIAL_COMMAND:
                            self._close_with(replies.LINE_TOO_LONG)
                        break
                    line = buf[self._offset : end]
                    self._offset = end + 2
                    if self.mode == AUTH:  # a SASL response line (RFC 4954 4)
                        self._auth_response(line)
                    else:
                        self._command(line)
        finally:
            self._processing = False
            if self._offset:
                self._buffer = self._buffer[self._offset :]
                self._offset = 0
            self._sync_reading()

    def _process_data(self) -> bool:
        """Consume whole lines of message data; False when more input is needed.

        Lines are cut at any LF, so a message with bare LF line ends streams
        to the spool like any other, and their length is measured as they
        will be stored (SPEC 5: a bare LF or CR ends a line).  Only
        ``<CRLF>.<CRLF>`` ends DATA: after a cut at a bare LF the next byte
        does not start a line for the end marker or dot-unstuffing.
        """
        buf, start = self._buffer, self._offset
        if self._data_line_start and buf.startswith(b".\r\n", start):
            self._offset = start + 3
            self._end_of_data()
            return True
        marker = buf.find(b"\r\n.\r\n", start)
        if marker >= 0:
            cut, resume, finished = marker + 2, marker + 5, True
        else:
            last = buf.rfind(b"\n", start)
            if last < 0:
                if len(buf) - start > MAX_DATA_LINE and _partial_line_length(buf[start:]) > MAX_DATA_LINE:
                    self._data_line_too_long()
                return False
            cut = resume = last + 1
            finished = False
            if len(buf) - cut > MAX_DATA_LINE and _partial_line_length(buf[cut:]) > MAX_DATA_LINE:
                self._data_line_too_long()
                return False
        region = buf[start:cut]
        self._offset = resume
        if len(region) > MAX_DATA_LINE and _longest_line(region) > MAX_DATA_LINE:
            self._data_line_too_long()
            return False
        # RFC 5321 4.5.2: a line starting with "." lost its first dot in transit.
        if self._data_line_start and region.startswith(b"."):
            region = region[1:]
        self._data_line_start = finished or region.endswith(b"\r\n")
        region = region.replace(b"\r\n.", b"\r\n")
        # Unstuff first, then normalise: a dot after a bare LF was never stuffed.
        if region.count(b"\n") != region.count(b"\r\n") or region.count(b"\r") != region.count(
            b"\n"
        ):
            region = _normalise_breaks(region)
        self._data_chunk(region)
        if finished:
            self._end_of_data()
        return True

    def _data_line_too_long(self) -> None:
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        self._log_message(
            "refused: {reply}",
            reply=str(replies.DATA_LINE_TOO_LONG),
            **replies.outcome("message", replies.DATA_LINE_TOO_LONG),
        )
        self.mode = COMMAND
        self._close_with(replies.DATA_LINE_TOO_LONG)

    def _data_chunk(self, region: bytes) -> None:
        if self._data_failed is not None:
            return
        self._data_size += len(region)
        if self._data_size > self.settings.message_size:
            self._data_failed = replies.MESSAGE_TOO_BIG
            self._message.connectionLost()
            self._message = None
            return
        try:
            self._message.dataReceived(region)
        except SMTPReplyError as e:
            self._data_failed = e.reply
            self._message.connectionLost()
            self._message = None
        except Exception:
            log.failure("{qid}: spool write failed", qid=self._qid)
            self._data_failed = replies.LOCAL_ERROR
            self._message.connectionLost()
            self._message = None

    def _end_of_data(self) -> None:
        self.mode = COMMAND
        failed, message = self._data_failed, self._message
        qid = self._qid
        self._reset_transaction()
        if failed is not None:
            self._log_message(
                "refused: {reply}", reply=str(failed), qid=qid, **replies.outcome("message", failed)
            )
            self.reply(failed)
            self._count_error()
            return
        self._finishing = message
        self._await(
            defer.maybeDeferred(message.eomReceived), self._message_done, self._message_failed
        )

    def _message_done(self, result: Reply | None) -> None:
        self._finishing = None
        reply = result if isinstance(result, Reply) else replies.OK
        if reply.code == 250:
            self._junk = 0  # a session that delivers mail is not junk
        self.reply(reply)

    def _message_failed(self, failure: Failure) -> None:
        self._finishing = None
        if failure.check(defer.CancelledError):
            return  # abandoned at connectionLost: nobody to answer
        if failure.check(SMTPReplyError):
            self.reply(failure.value.reply)
        else:
            log.failure("message handling failed", failure)
            self.reply(replies.LOCAL_ERROR)

    def _await(
        self,
        d: defer.Deferred,
        done: Callable[[Any], None],
        failed: Callable[[Failure], None],
    ) -> None:
        """Hold input until ``d`` fires, so pipelined replies stay in order.

        Most checks answer at once (routing is a dictionary lookup): then the
        _process loop that called us goes on, and the transport is never
        paused, which spares two epoll_ctl calls per command.
        """
        self._holds.add(HOLD_CHECK)

        def finish(result: object) -> None:
            if self._closing or self.transport is None:
                return
            self._holds.discard(HOLD_CHECK)
            if isinstance(result, Failure):
                failed(result)
            else:
                done(result)
            if not self._processing:  # answered later: go on with what waited
                self._process()

        d.addBoth(finish).addErrback(lambda f: log.failure("reply handling failed", f))

    # --- commands ---------------------------------------------------------

    def _command(self, line: bytes) -> None:
        if len(line) > MAX_PARTIAL_COMMAND:
            # The same answer whether or not the CRLF came in the same read.
            self._close_with(replies.LINE_TOO_LONG)
            return
        if len(line) > MAX_COMMAND_LINE:
            self.reply(replies.LINE_TOO_LONG)
            self._count_error()
            return
        if b"\0" in line:
            self.reply(replies.NUL_IN_COMMAND)
            self._count_error()
            return
        parts = line.strip().split(None, 1)
        if not parts:
            self.reply(replies.COMMAND_UNRECOGNIZED)
            self._count_error()
            return
        verb = parts[0].upper()
        arg = parts[1] if len(parts) > 1 else b""
        handler = self._handlers.get(verb)
        if handler is None:
            self.reply(replies.COMMAND_UNRECOGNIZED)
            self._count_error()
            return
        if verb in JUNK_COMMANDS and not self._count_junk():
            return
        refusal = self._submission_gate(verb)
        if refusal is not None:
            self.reply(refusal)
            self._count_error()
            return
        handler(self, arg)

    def _submission_gate(self, verb: bytes) -> Reply | None:
        """What a submission listener requires before a command (SPEC 11), or None.

        The whole table: on port 25 nothing; on a submission listener AUTH
        and MAIL need TLS (RFC 3207 4, RFC 8314 3), MAIL needs AUTH (RFC
        6409 4.1); RCPT and DATA need MAIL, as everywhere.
        """
        if self.kind == SMTP:
            return None
        if verb in (b"AUTH", b"MAIL") and not self.startedTLS:
            return replies.MUST_STARTTLS
        if verb == b"MAIL" and self.session.account is None:
            return replies.AUTH_REQUIRED
        return None

    def _count_error(self) -> None:
        """Postfix's smtpd_soft/hard_error_limit: slow down, then hang up.

        Refused recipients count (SPEC 3), so harvesting addresses costs the
        same second per guess as bad commands.  The pause is a hold of its
        own: it delays the replies to what follows, after this reply, even
        when the error was answered while a check held input.
        """
        self._errors += 1
        if self._errors >= self.settings.error_limit:
            self._close_with(replies.TOO_MANY_ERRORS)
        elif self._errors > self.settings.error_limit // 2 and HOLD_ERROR_PAUSE not in self._holds:
            # smtpd_error_sleep_time: the next command waits, which costs a
            # guessing client time and us nothing.
            self._holds.add(HOLD_ERROR_PAUSE)
            self._pause = self.callLater(self.settings.error_sleep, self._resume_after_pause)

    def _resume_after_pause(self) -> None:
        self._pause = None
        self._release(HOLD_ERROR_PAUSE)

    def _count_junk(self) -> bool:
        """Postfix's smtpd_junk_command_limit: False when the session was ended."""
        self._junk += 1
        if self._junk > self.settings.junk_commands:
            self._close_with(replies.TOO_MANY_JUNK)
            return False
        return True

    def _reset_transaction(self) -> None:
        self._sender: str | None = None
        self._recipients: list[Any] = []
        self._qid: str | None = None
        self._declared_size = 0
        self._data_size = 0
        self._data_failed: Reply | None = None
        self._message: Any = None

    def _log_message(self, fmt: str, qid: str | None = None, **fields: object) -> None:
        qid = qid or self._qid or (self.session.session_id if self.session else "-")
        log.info("{qid}: " + fmt, qid=qid, **fields)

    def do_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        # RFC 5321 wants a domain or address literal; like Postfix (without
        # reject_invalid_helo_hostname) any text is taken: SPF's HELO check
        # and the Received header judge it, not the dialogue.
        name = rest.strip()
        if not name:
            self.reply(replies.SYNTAX_ERROR.with_text("HELO/EHLO needs a domain or address"))
            self._count_error()
            return
        if _CONTROL.search(name):
            # A bare LF or CR here would split a log line or a header in two.
            self.reply(replies.SYNTAX_ERROR.with_text("Control characters in HELO/EHLO"))
            self._count_error()
            return
        self._reset_transaction()
        self.session.helo = name.decode("ascii", "replace")
        self.session.esmtp = esmtp
        if self.startedTLS:
            described = self.tls_description()
            if described != self.session.tls:  # the first greeting after the handshake
                log.info(
                    "{session}: TLS {tls} from {ip}",
                    session=self.session.session_id,
                    tls=described,
                    ip=self.session.client_ip,
                    event="tls",
                )
            self.session.tls = described
        greeting = self.host + b" Hello " + self.session.client_ip.encode("ascii")
        if not esmtp:
            self.sendCode(250, greeting)
            return
        self.sendCode(250, greeting + b"\n" + self.listExtensions())

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [b"%d" % self.settings.message_size],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.kind != SMTP and self.startedTLS and self.session.account is None:
            # RFC 4954 4: not offered before TLS, nor once authenticated.
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def do_MAIL(self, rest: bytes) -> None:
        if self.session.helo is None:
            self.reply(replies.BAD_SEQUENCE.with_text("Send HELO/EHLO first"))
            self._count_error()
            return
        if self._sender is not None:
            self.reply(replies.NESTED_MAIL)
            self._count_error()
            return
        parsed = self._parse_path(rest, b"FROM:", replies.BAD_SENDER_SYNTAX, allow_null=True)
        if parsed is None:
            return
        sender, params = parsed
        size = 0
        for name, value in params:
            if name == b"SIZE" and value is not None and value.isdigit() and len(value) < 20:
                size = int(value)
            elif name == b"BODY" and value is not None and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            elif name == b"AUTH" and self.kind != SMTP and value is not None:
                # RFC 4954 5: a server offering AUTH accepts MAIL's AUTH=
                # parameter; its claim is not trusted (the login decides).
                pass
            else:
                self.reply(replies.PARAMETER_NOT_IMPLEMENTED)
                self._count_error()
                return
        if size > self.settings.message_size:
            # RFC 1870 6.1: refuse at MAIL when the declared size is too large.
            self.reply(replies.MESSAGE_TOO_BIG)
            return
        qid = self.factory.new_queue_id()

        def accepted(_: object) -> None:
            self._sender = sender
            self._qid = qid
            self._declared_size = size
            self.reply(replies.SENDER_OK)

        def refused(failure: Failure) -> None:
            reply = failure.value.reply if failure.check(SMTPReplyError) else replies.LOCAL_ERROR
            if not failure.check(SMTPReplyError):
                log.failure("{qid}: sender check failed", failure, qid=qid)
            log.info(
                "{qid}: sender <{sender}> refused: {reply}",
                qid=qid,
                sender=sender,
                reply=str(reply),
                session=self.session.session_id,  # mailx.observe.trace links them
            )
            self.reply(reply)

        self._await(defer.maybeDeferred(self.delivery.mail, qid, sender, size), accepted, refused)

    def do_RCPT(self, rest: bytes) -> None:
        if self._sender is None:
            self.reply(replies.NEED_MAIL)
            self._count_error()
            return
        parsed = self._parse_path(rest, b"TO:", replies.BAD_RECIPIENT_SYNTAX, allow_null=False)
        if parsed is None:
            return
        recipient, params = parsed
        if params:
            self.reply(replies.PARAMETER_NOT_IMPLEMENTED)
            self._count_error()
            return
        if len(self._recipients) >= self.settings.recipients:
            # RFC 5321 4.5.3.1.10: 452 asks the client to send the rest later.
            self._log_message(
                "recipient <{rcpt}> deferred: too many recipients",
                rcpt=recipient,
                **replies.outcome("rcpt", replies.TOO_MANY_RECIPIENTS),
            )
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return

        def accepted(route: object) -> None:
            self._recipients.append(route)
            self.reply(replies.RECIPIENT_OK)

        def refused(failure: Failure) -> None:
            reply = failure.value.reply if failure.check(SMTPReplyError) else replies.LOCAL_ERROR
            if not failure.check(SMTPReplyError):
                log.failure("{qid}: recipient check failed", failure, qid=self._qid)
            self._log_message(
                "recipient <{rcpt}> refused: {reply}",
                rcpt=recipient,
                reply=str(reply),
                **replies.outcome("rcpt", reply),
            )
            self.reply(reply)
            if reply.permanent:
                self._count_error()

        self._await(defer.maybeDeferred(self.delivery.rcpt, self._qid, recipient), accepted, refused)

    def _parse_path(
        self, rest: bytes, prefix: bytes, bad: Reply, allow_null: bool
    ) -> tuple[str, list[tuple[bytes, bytes | None]]] | None:
        if rest[: len(prefix)].upper() != prefix:
            self.reply(replies.SYNTAX_ERROR.with_text(f"Syntax: {prefix.decode()}<address>"))
            self._count_error()
            return None
        rest = rest[len(prefix) :].strip()
        if rest.startswith(b"<"):
            close = rest.find(b">")
            if close < 0:
                self.reply(bad)
                self._count_error()
                return None
            path, tail = rest[1:close], rest[close + 1 :]
        else:
            # RFC 5321 requires the brackets; Postfix and Exim accept without.
            path, _, tail = rest.partition(b" ")
        params = []
        for word in tail.split():
            m = _PARAM.match(word)
            if m is None:
                self.reply(replies.SYNTAX_ERROR.with_text("Bad parameter syntax"))
                self._count_error()
                return None
            params.append((m.group(1).upper(), m.group(2)))
        if b":" in path and path.startswith(b"@"):
            # RFC 5321 4.1.1.3: a source route is accepted and ignored.
            path = path.split(b":", 1)[1]
        if not path:
            if allow_null:
                return "", params
            self.reply(bad)
            self._count_error()
            return None
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            # SMTPUTF8 is not advertised, so 8-bit addresses are a syntax error.
            self.reply(bad.with_text("Address must be ASCII (SMTPUTF8 not offered)"))
            self._count_error()
            return None
        recipient = prefix == b"TO:"
        if recipient and text.lower() == "postmaster":
            return "postmaster", params
        try:
            address = parse_address(text, fold_case=recipient)
        except AddressError as e:
            self.reply(bad.with_text(f"Bad address syntax: {e}"))
            self._count_error()
            return None
        if recipient:
            return str(address), params
        # The sender unquoted, as SPF and the logs want it; Return-Path quotes it again.
        return f"{address.local}@{address.domain}", params

    def do_DATA(self, rest: bytes) -> None:
        if rest.strip():
            self.reply(replies.SYNTAX_ERROR.with_text("DATA takes no arguments"))
            self._count_error()
            return
        if self._sender is None:
            self.reply(replies.NEED_MAIL)
            self._count_error()
            return
        if not self._recipients:
            self.reply(replies.NEED_RCPT)
            self._count_error()
            return
        if self._offset < len(self._buffer):
            # RFC 2920 3.1: DATA is the last command of a pipelined group; the
            # content may only follow our 354.  A client that sends it along
            # (smtpsmug's "pipelining" test; Postfix 3.9's
            # smtpd_forbid_unauth_pipelining) is not an MTA that checks replies.
            self._log_message("refused: content sent before the 354")
            self._reset_transaction()
            self._close_with(replies.DATA_PIPELINED)
            return
        try:
            self._message = self.delivery.data(self._qid, self._sender, list(self._recipients))
        except SMTPReplyError as e:
            self.reply(e.reply)
            self._reset_transaction()
            return
        except Exception:
            log.failure("{qid}: cannot start message", qid=self._qid)
            self.reply(replies.LOCAL_ERROR)
            self._reset_transaction()
            return
        self.mode = DATA
        self._data_line_start = True
        self.sendCode(354, replies.START_DATA.text.encode("ascii"))

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(replies.RESET_OK)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            self.reply(replies.SYNTAX_ERROR.with_text("VRFY needs an argument"))
            return
        # RFC 5321 3.5.3: 252 when we will not verify but will accept.
        self.reply(replies.VRFY_CANNOT)

    def do_EXPN(self, rest: bytes) -> None:
        # Expanding aliases would publish them to address harvesters.
        self.reply(replies.NOT_IMPLEMENTED)

    def do_HELP(self, rest: bytes) -> None:
        self._send(
            b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
            + (b" STARTTLS" if self.canStartTLS else b"")
            + b"\r\n214 2.0.0 See RFC 5321\r\n"
        )

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(replies.BYE)
        self._hang_up()

    def do_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self.reply(replies.SYNTAX_ERROR.with_text("STARTTLS takes no arguments"))
            return
        if self.startedTLS:
            self.reply(replies.TLS_ALREADY)
            return
        if not self.canStartTLS:
            self.reply(replies.TLS_NOT_AVAILABLE)
            return
        self.reply(replies.TLS_GO_AHEAD)
        # RFC 3207 4.2 and CVE-2011-0411: anything pipelined after STARTTLS in
        # cleartext is discarded, and the session starts over.
        self._buffer = b""
        self._offset = 0
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._reset_transaction()
        self.session.helo = None
        self.session.esmtp = False
        self.session.tls = "TLS"

    # --- AUTH (submission listeners; SPEC 11, RFC 4954) -----------------------
    #
    # Written here rather than through Twisted's ESMTP ``challengers`` and
    # ``portal`` (research notes section 3, "AUTH"): Twisted's ext_AUTH
    # accepts AUTH before TLS (235 in cleartext), a PLAIN response without
    # NULs raises unguarded and drops the connection, it reads responses
    # through the line mode this class replaces, its replies carry no
    # enhanced codes, and it has no hook for the per-IP failure count nor
    # for our pipelining hold.  PLAIN and LOGIN are a few lines each.

    def do_AUTH(self, rest: bytes) -> None:
        if self.kind == SMTP:
            # An MX takes no logins (SPEC 11: 502 5.5.1 on port 25).
            self.reply(replies.NOT_IMPLEMENTED)
            return
        if self.session.helo is None:
            self.reply(replies.BAD_SEQUENCE.with_text("Send EHLO first"))
            self._count_error()
            return
        if self.session.account is not None:
            self.reply(replies.AUTH_ALREADY)  # RFC 4954 4
            return
        if self._sender is not None:
            self.reply(replies.AUTH_IN_TRANSACTION)  # RFC 4954 4
            return
        if self.factory.submission.failures.blocked(self.limit_key):
            log.info(
                "auth refused: ip={ip} too many failures ({session})",
                ip=self.session.client_ip,
                session=self.session.session_id,
            )
            self._close_with(replies.AUTH_TOO_MANY_FAILURES)
            return
        words = rest.split()
        mechanism = words[0].upper() if words else b""
        initial = words[1] if len(words) > 1 else None
        if len(words) > 2 or mechanism not in (b"PLAIN", b"LOGIN"):
            self.reply(replies.AUTH_MECHANISM)
            self._count_error()
            return
        if mechanism == b"PLAIN":
            if initial is None:
                self._challenge(b"", self._auth_plain)
            else:
                # RFC 4954 4: "=" is an empty initial response.
                self._auth_plain(b"" if initial == b"=" else initial)
        elif initial is None:
            self._challenge(b"VXNlcm5hbWU6", self._auth_login_user)  # "Username:"
        else:
            self._auth_login_user(initial)

    def _challenge(self, challenge: bytes, then: Callable[[bytes], None]) -> None:
        """334 and wait for the client's response line (RFC 4954 4)."""
        self.mode = AUTH
        self._auth_next = then
        self._send(b"334 " + challenge + b"\r\n")

    def _auth_response(self, line: bytes) -> None:
        self.mode = COMMAND
        then, self._auth_next = self._auth_next, None
        response = line.strip()
        if response == b"*":
            self.reply(replies.AUTH_CANCELLED)  # RFC 4954 4: the client cancels
            return
        then(response)

    def _auth_plain(self, response: bytes) -> None:
        from mailx.smtp.submission import decode_base64, decode_plain

        if decode_base64(response) is None:
            self.reply(replies.AUTH_BAD_BASE64)
            self._count_error()
            return
        parsed = decode_plain(response)
        if parsed is None:
            self._auth_failed("", "PLAIN")
            return
        authzid, user, password = parsed
        if authzid and authzid.lower() != user.lower():
            # Acting for another user (RFC 4616 authzid) is not offered.
            self._auth_failed(user, "PLAIN")
            return
        self._check_login(user, password, "PLAIN")

    def _auth_login_user(self, response: bytes) -> None:
        from mailx.smtp.submission import decode_base64

        user = decode_base64(response)
        if user is None:
            self.reply(replies.AUTH_BAD_BASE64)
            self._count_error()
            return
        self._challenge(b"UGFzc3dvcmQ6", lambda r: self._auth_login_password(user, r))  # "Password:"

    def _auth_login_password(self, user: str, response: bytes) -> None:
        from mailx.smtp.submission import decode_base64

        password = decode_base64(response)
        if password is None:
            self.reply(replies.AUTH_BAD_BASE64)
            self._count_error()
            return
        self._check_login(user, password, "LOGIN")

    def _check_login(self, user: str, password: str, mechanism: str) -> None:
        """Ask the accounts (off the reactor thread), holding input meanwhile."""
        accounts = self.factory.submission.accounts
        d = defer.maybeDeferred(accounts.authenticate, user, password, self.session.client_ip)

        def done(account: Any) -> None:
            if account is None:
                self._auth_failed(user, mechanism)
                return
            self.session.account = account.address
            log.info(
                "{session}: authenticated as {account} ip={ip} mechanism={mechanism}",
                session=self.session.session_id,
                account=account.address,
                ip=self.session.client_ip,
                mechanism=mechanism,
            )
            self.reply(replies.AUTH_OK)

        def failed(failure: Failure) -> None:
            from mailx.smtp.accounts import AccountsUnavailable

            if not failure.check(AccountsUnavailable):
                log.failure("{session}: authentication check failed", failure, session=self.session.session_id)
            log.info(
                "auth unavailable: ip={ip} mechanism={mechanism} user={user}: {why}",
                ip=self.session.client_ip,
                mechanism=mechanism,
                user=user[:256],
                why=str(failure.value),
            )
            self.reply(replies.AUTH_UNAVAILABLE)  # RFC 4954 6: 454 4.7.0

        self._await(d, done, failed)

    def _auth_failed(self, user: str, mechanism: str) -> None:
        """535, counted per client IP; the line docs/fail2ban/mailx.conf matches.

        The IP comes first: the user name is the client's text (escaped by
        mailx.text.Logger, but it may contain " ip=..."), so the filter
        anchors on the first field.
        """
        count = self.factory.submission.failures.failed(self.limit_key)
        log.info(
            "auth failed: ip={ip} mechanism={mechanism} failures={count} session={session} user={user}",
            ip=self.session.client_ip,
            mechanism=mechanism,
            count=count,
            session=self.session.session_id,
            user=user[:256],
        )
        self.reply(replies.AUTH_INVALID)

    def do_BDAT(self, rest: bytes) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    _handlers: dict[bytes, Callable[[MailxESMTP, bytes], None]] = {}

    def tls_description(self) -> str | None:
        """'TLSv1.3:TLS_AES_256_GCM_SHA384' for the Received header, once known."""
        if not self.startedTLS:
            return None
        conn = _openssl_connection(self.transport)
        try:
            return f"{conn.get_protocol_version_name()}:{conn.get_cipher_name()}"
        except Exception:
            return "TLS"


def _openssl_connection(transport: Any) -> Any:
    """The OpenSSL connection under a transport: implicit TLS, STARTTLS, behind PROXY."""
    from OpenSSL import SSL

    for _ in range(4):
        if transport is None:
            return None
        if getattr(transport, "TLS", False) and hasattr(transport, "protocol"):
            handle = transport.protocol.getHandle()  # STARTTLS on a TCP transport
            if isinstance(handle, SSL.Connection):
                return handle
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, SSL.Connection):
            return handle
        transport = getattr(transport, "transport", None)
    return None


MailxESMTP._handlers = {
    name[3:].encode("ascii"): getattr(MailxESMTP, name)
    for name in dir(MailxESMTP)
    if name.startswith("do_") and name[3:].isupper()
}


class Settings:
    """The per-connection knobs, taken from the config once per (re)load."""

    __slots__ = (
        "hostname",
        "message_size",
        "recipients",
        "idle_timeout",
        "session_timeout",
        "error_limit",
        "connections",
        "connections_per_ip",
        "connection_rate_per_ip",
        "greeting_delay",
        "error_sleep",
        "junk_commands",
        "ipv6_prefix_length",
        "trusted_proxies",
    )

    def __init__(self, config: Any) -> None:
        limits = config.limits
        self.hostname = config.hostname
        self.message_size = limits.message_size
        self.recipients = limits.recipients
        self.idle_timeout = limits.idle_timeout
        self.session_timeout = limits.session_timeout
        self.error_limit = limits.error_limit
        self.connections = limits.connections
        self.connections_per_ip = limits.connections_per_ip
        self.connection_rate_per_ip = limits.connection_rate_per_ip
        self.greeting_delay = limits.greeting_delay
        # Postfix's smtpd_error_sleep_time default.
        self.error_sleep = 1.0
        self.junk_commands = limits.junk_commands
        self.ipv6_prefix_length = limits.ipv6_prefix_length
        self.trusted_proxies = tuple(ipaddress.ip_network(n) for n in config.haproxy_trusted_networks)

    def proxy_trusted(self, peer: Any) -> bool:
        """May this peer send a PROXY header?  UNIX-socket peers are local: yes."""
        host = getattr(peer, "host", None)
        if host is None:
            return isinstance(peer, address.UNIXAddress)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_proxies)

    def limit_key(self, ip: str) -> str:
        """What the per-IP limits count: the address, or its /64 (prefix) for IPv6.

        One IPv6 host is usually given a whole /64 (RFC 6177), so counting
        single addresses would give an attacker 2^64 of them.
        """
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if parsed.version == 4:
            return ip
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return ipaddress.ip_network(f"{ip}/{self.ipv6_prefix_length}", strict=False).compressed


def _exempt_from_rate(ip: str) -> bool:
    """Loopback clients (a local proxy, monitoring, the tests) are not rate-limited.

    Postfix exempts $mynetworks from anvil's rate limits the same way; the
    concurrency limits still apply.
    """
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class MailxSMTPFactory(ServerFactory):
    """Builds sessions and counts them: total and per client IP.

    Twisted's ``LimitConnectionsByPeer`` is broken and
    ``LimitTotalConnectionsFactory`` bypasses ``buildProtocol`` (research notes
    section 4), and with PROXY protocol the client's address is only known
    after the header, so admission happens in ``connectionMade``.
    """

    protocol = MailxESMTP
    noisy = False

    def __init__(
        self,
        config: Any,
        delivery_for: Callable[[Session], Any],
        tls_context: Any = None,
        kind: str = SMTP,
        submission: Any = None,
    ) -> None:
        self.kind = kind
        # mailx.smtp.submission.SubmissionState: accounts and the shared counters.
        self.submission = submission
        self.settings = Settings(config)
        self.delivery_for = delivery_for
        self.tls_context = tls_context
        self.sessions: set[MailxESMTP] = set()
        self.per_ip: dict[str, int] = {}
        self.recent: dict[str, deque[float]] = {}
        self.shutting_down = False
        self._counter = 0
        self._epoch = int(time.time())
        self.clock: Callable[[], float] = time.monotonic

    def reconfigure(self, config: Any, delivery_for: Callable[[Session], Any], tls_context: Any) -> None:
        """New sessions get the new configuration; running ones keep theirs."""
        self.settings = Settings(config)
        self.delivery_for = delivery_for
        self.tls_context = tls_context

    def buildProtocol(self, addr: Any) -> MailxESMTP:
        return self.protocol(self)

    def admit(self, proto: MailxESMTP, ip: str) -> Reply | None:
        """None when ``proto`` may start; the refusal otherwise.

        Per-IP counts are kept under ``Settings.limit_key`` (an IPv6
        client's /64), remembered on the session so that a reload changing
        the prefix still releases what was counted.
        """
        if self.shutting_down:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= self.settings.connections:
            log.info(
                "refused connection from {ip}: too many connections",
                ip=ip,
                event="connection_refused",
                reason="connections",
            )
            return replies.TOO_MANY_CONNECTIONS
        key = self.settings.limit_key(ip)
        if self.per_ip.get(key, 0) >= self.settings.connections_per_ip:
            log.info(
                "refused connection from {ip}: too many connections from {key}",
                ip=ip,
                key=key,
                event="connection_refused",
                reason="connections_per_ip",
            )
            return replies.TOO_MANY_CONNECTIONS_FROM_IP
        if self._over_rate(ip, key):
            log.info(
                "refused connection from {ip}: connection rate limit of {key}",
                ip=ip,
                key=key,
                event="connection_refused",
                reason="connection_rate",
            )
            return replies.CONNECTION_RATE
        self.sessions.add(proto)
        proto.limit_key = key
        self.per_ip[key] = self.per_ip.get(key, 0) + 1
        return None

    def _over_rate(self, ip: str, key: str) -> bool:
        """Postfix's smtpd_client_connection_rate_limit, over a sliding minute."""
        limit = self.settings.connection_rate_per_ip
        if not limit or _exempt_from_rate(ip):
            return False
        now = self.clock()
        window = self.recent.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(self.recent) > 10_000:
            # Bounded memory under a flood of addresses: forget quiet clients.
            for other in [k for k, v in self.recent.items() if not v or v[-1] <= now - 60]:
                del self.recent[other]
        if len(window) >= limit:
            return True
        window.append(now)
        return False

    def shutdown(self) -> None:
        """Stop taking sessions; idle ones are told 421 now, busy ones after their message."""
        self.shutting_down = True
        for proto in list(self.sessions):
            proto.shutdown()

    def release(self, proto: MailxESMTP) -> None:
        self.sessions.discard(proto)
        key = proto.limit_key
        left = self.per_ip.get(key, 1) - 1
        if left > 0:
            self.per_ip[key] = left
        else:
            self.per_ip.pop(key, None)

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def new_session_id(self) -> str:
        return f"S{self._epoch & 0xFFFFFF:X}{self._next() & 0xFFFF:04X}"

    def new_queue_id(self) -> str:
        """Unique across restarts: seconds since the epoch, then a counter."""
        return f"{int(time.time()):X}{self._next() & 0xFFFFFF:06X}"


class _ProxyFirstWrapper(HAProxyProtocolWrapper):
    """Twisted's PROXY wrapper, but the SMTP session starts after the header.

    The stock wrapper connects the wrapped protocol at once, so an SMTP server
    would greet, log and count the connection under the proxy's address, and
    a client that waits for the banner after sending only the header would
    never see the wrapped protocol learn the real address.  Here the wrapped
    protocol is connected once the header is parsed.

    The stock wrapper also believes whoever connects: here only peers in
    ``listen.haproxy_trusted_networks`` may send a header, others are
    disconnected unheard; and a header that names no IP client (v1
    ``UNKNOWN``, v2 ``LOCAL`` or AF_UNIX, for which Twisted yields no source
    or a UNIXAddress) is refused, since the session would otherwise be
    counted under the proxy's own (loopback, rate-exempt) address.
    """

    header_timeout = 30.0

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._started = False
        self._refused = False
        self._header_deadline: Any = None
        peer = transport.getPeer()
        if not self.factory.wrappedFactory.settings.proxy_trusted(peer):
            self._refuse("refused connection from {peer}: not in listen.haproxy_trusted_networks", peer)
            return
        from twisted.internet import reactor

        self._header_deadline = reactor.callLater(self.header_timeout, self.loseConnection)

    def _refuse(self, why: str, peer: Any) -> None:
        log.info(why, peer=getattr(peer, "host", None) or str(peer))
        self._refused = True
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            return self.wrappedProtocol.dataReceived(data)
        if self._refused:
            return None
        before = self._proxyInfo
        parser_done = False
        # Let the stock parser consume the header without touching the
        # wrapped protocol, then start it and hand over what follows.
        wrapped, self.wrappedProtocol = self.wrappedProtocol, _Collector()
        try:
            super().dataReceived(data)
            parser_done = self._proxyInfo is not None and before is None
        finally:
            collector, self.wrappedProtocol = self.wrappedProtocol, wrapped
        if parser_done:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            if not isinstance(self._proxyInfo.source, (address.IPv4Address, address.IPv6Address)):
                self._refuse(
                    "refused connection from proxy {peer}: PROXY header names no IP client",
                    self.transport.getPeer(),
                )
                return
            self._started = True
            self.wrappedProtocol.makeConnection(self)
            if collector.data and not self.disconnecting:
                self.wrappedProtocol.dataReceived(b"".join(collector.data))

    def connectionLost(self, reason: Failure) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class _Collector:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class _ProxyFirstWrappingFactory(HAProxyWrappingFactory):
    protocol = _ProxyFirstWrapper


@implementer(interfaces.IStreamServerEndpoint)
class _ProxyFirstEndpoint:
    def __init__(self, inner: interfaces.IStreamServerEndpoint) -> None:
        self._inner = inner

    def listen(self, factory: Any) -> defer.Deferred:
        return self._inner.listen(_ProxyFirstWrappingFactory(factory))


def server_endpoint(reactor: Any, description: str) -> interfaces.IStreamServerEndpoint:
    """A listening endpoint from a Twisted endpoint string.

    ``haproxy:`` endpoints get the PROXY-aware wrapper above; every other
    description goes to ``serverFromString`` unchanged.
    """
    from twisted.internet.endpoints import serverFromString

    if description.startswith("haproxy:"):
        return _ProxyFirstEndpoint(serverFromString(reactor, description[len("haproxy:") :]))
    return serverFromString(reactor, description)
