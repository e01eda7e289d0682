# -*- test-case-name: tests.test_smtp -*-
"""The ESMTP server: the Twisted adapter of the sans-I/O dialogue in ``mailx.smtp.session``.

Twisted's ``smtp.ESMTP`` gives us the reply plumbing, TimeoutMixin and the
EHLO/extension machinery, but the probes (research notes, sections 1-4) found
that its line handling can be desynchronised (over-long DATA lines, no-CRLF
floods, STARTTLS injection), that asynchronous checks break pipelining, and
that SIZE, PIPELINING, ENHANCEDSTATUSCODES, NOOP and VRFY are missing.  So
the byte stream and the decisions about it belong to ``SMTPSession`` (its
states, its table of legal commands, its limits and holds), and this
subclass only moves bytes and waits:

- What the socket reads goes to the session; the events it hands back (a
  legal command, a SASL response, message content, the end of it) are acted
  on here: the command handlers parse arguments and ask the delivery layer
  (``IDelivery``: mail, rcpt, data; the message's dataReceived and
  eomReceived).  The session's actions (send, start the error pause, hang
  up) are carried out here.
- While a reason to hold input stands (``Hold``: a Deferred such as a
  recipient check or the end-of-data filing, the error pause, replies the
  client does not read), pipelined lines wait in the session's buffer, so
  replies always come in order (RFC 2920 section 3), and the socket is not
  read meanwhile (while a check runs, up to one read more, so that a hang-up
  is noticed).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import address, defer, interfaces
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.mail import smtp
from twisted.protocols import policies
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from mailx.address import AddressError, parse_address
from mailx.smtp import replies
from mailx.smtp.replies import Reply, SMTPReplyError
from mailx.smtp.session import (
    COMMANDS,
    LISTENER_KINDS,
    MAX_DATA_LINE,
    MAX_EARLY_INPUT,
    SMTP,
    SUBMISSION,
    SUBMISSIONS,
    AuthResponse,
    CommandEvent,
    Content,
    ContentRefused,
    EndOfContent,
    Event,
    HangUp,
    Hold,
    Refusal,
    Send,
    SMTPSession,
    StartPause,
    State,
    Violation,
)
from mailx.text import Logger

__all__ = [
    "CLOSE_GRACE",
    "LISTENER_KINDS",
    "MAX_DATA_LINE",
    "MAX_EARLY_INPUT",
    "SMTP",
    "SUBMISSION",
    "SUBMISSIONS",
    "MailxESMTP",
    "MailxSMTPFactory",
    "Session",
    "server_endpoint",
]

log = Logger(namespace="mailx.smtp")

# Seconds a closing session waits for its last replies to be read before it
# is aborted: loseConnection waits for the write buffer to drain, and a
# client that keeps its receive window shut would keep the session, its slot
# and a spilled body's spool file for as long as it liked.
CLOSE_GRACE = 10.0
# How long a session waits, not reading, for its spool disk to catch up
# (spool.HIGH_WATER): a slow disk is waited for, a stalled one is 451 4.3.0.
SPOOL_STALL = 20.0

_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


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

@implementer(interfaces.IPushProducer)
class MailxESMTP(smtp.ESMTP):
    """One SMTP session.  See the module docstring for what differs from Twisted.

    It is the push producer of its transport's writes: when a client does not
    read its replies and the write buffer passes the transport's high-water
    mark, the transport pauses us and we stop reading and processing (as
    aiosmtpd awaits ``drain()``), so memory per session stays bounded.
    """

    noisy = False
    transport: Any  # a TCP or TLS transport, or the PROXY wrapper over one

    def __init__(self, factory: MailxSMTPFactory) -> None:
        super().__init__(chal={}, contextFactory=factory.tls_context)
        self.factory = factory
        self.kind = factory.kind  # SMTP, SUBMISSION or SUBMISSIONS: what this listener allows
        # A session keeps the configuration it started with across reloads.
        self.limits = factory.limits
        self.host = factory.hostname.encode("ascii")
        self.timeout = self.limits.idle_timeout
        self.dialogue = SMTPSession(self.kind, self.limits, self.limits.greeting_delay > 0)
        self._auth_next: Callable[[bytes], None] | None = None  # in State.AUTH: what takes the response
        self.session: Session | None = None
        self.delivery: Any = None
        self._message: Any = None  # the delivery layer's message while its content arrives
        self._finishing: Any = None  # the message whose end of data is being handled
        self._reading_paused = False  # we paused the transport's reading
        self._spool_wait: Any = None  # while the spool's disk is behind: its time limit
        self._producing = False  # registered as the transport's producer
        self._in_process = False  # _process is on the stack (a Deferred fired inside it)
        self._session_deadline: Any = None
        self._greeting: Any = None
        self._pause: Any = None
        self._abort_later: Any = None  # CLOSE_GRACE after loseConnection
        self._admitted = False
        self.limit_key = ""  # what the factory's per-IP counts know this client by

    # --- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        ip, port = _peer_ip(self.transport)
        refusal = self.factory.admit(self, ip)
        if refusal is not None:
            self.dialogue.close(refusal)
            self._flush()
            return
        self._admitted = True
        self.transport.registerProducer(self, True)
        self._producing = True
        self.session = Session(self.factory.new_session_id(), ip, port, self.factory.kind)
        if _openssl_connection(self.transport) is not None:
            self.startedTLS = True  # an implicit-TLS (ssl:) listener
            self.dialogue.tls = True
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
        self._session_deadline = self.callLater(self.limits.session_timeout, self._session_too_long)
        if self.dialogue.state is State.GREETING:
            # Like Postfix's postscreen greet pause: real MTAs wait for the
            # banner (RFC 5321 4.5.3.2.1 gives them 5 minutes); spamware
            # that talks first is told so and dropped.
            self._greeting = self.callLater(self.limits.greeting_delay, self._greet_client)
        else:
            self._greet_client()

    def _greet_client(self) -> None:
        assert self.session is not None  # set by connectionMade on admission
        self._greeting = None
        refusal = self.dialogue.banner_due()
        if refusal is replies.EARLY_TALKER:
            log.info(
                "{session}: early talker from {ip} refused",
                session=self.session.session_id,
                ip=self.session.client_ip,
            )
        if refusal is not None:
            self._close_with(refusal)
            return
        self.sendCode(220, self.host + b" ESMTP mailx")
        self._process()  # reading resumes if it was paused

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.dialogue.connection_lost()
        self.setTimeout(None)
        for timer in (
            self._greeting, self._pause, self._session_deadline, self._abort_later, self._spool_wait
        ):
            if timer is not None and timer.active():
                timer.cancel()
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        if self._finishing is not None:
            # Nobody is left to answer: the checks stop and free their slot.
            abandon = getattr(self._finishing, "abandon", None)
            self._finishing = None
            if abandon is not None:
                abandon()
        if self._admitted:
            assert self.session is not None  # set by connectionMade on admission
            self.factory.release(self)
            log.info("{session}: disconnect", session=self.session.session_id)
        if self.delivery is not None:
            self.delivery.disconnected()

    def shutdown(self) -> None:
        """The server stops: between transactions, 421 now; otherwise after this message."""
        self.dialogue.shutdown()
        self._flush()

    def timeoutConnection(self) -> None:
        self._close_with(replies.IDLE_TIMEOUT)

    def _session_too_long(self) -> None:
        self._close_with(replies.SESSION_TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        self.dialogue.close(reply)
        self._flush()

    # --- carrying out the session's actions ---------------------------------

    def _flush(self) -> None:
        for action in self.dialogue.actions():
            if isinstance(action, Send):
                # Twisted's transport.write: a reply waits for the next
                # reactor turn.  (Sending "at once when nothing is queued"
                # needs tcp.Server's private buffers; no public API has it.)
                self.transport.write(action.data)
            elif isinstance(action, StartPause):
                self._pause = self.callLater(action.seconds, self._pause_over)
            elif isinstance(action, HangUp):
                if action.reply is not None and self.session is not None:
                    log.info(
                        "{session}: closing: {reply}",
                        session=self.session.session_id,
                        reply=str(action.reply),
                    )
                self._hang_up(action.abort)

    def _hang_up(self, abort: bool) -> None:
        """Close after the replies are sent; at once for a client that does not read them.

        A registered producer keeps a Twisted transport open after
        ``loseConnection``, so it is unregistered first.  A client that lets
        our replies pile up would hold the socket open for as long as it
        keeps its receive window shut: that one is aborted, at once when the
        transport had paused us, else after CLOSE_GRACE.
        """
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            if self._abort_later is None:
                self._abort_later = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _pause_over(self) -> None:
        self._pause = None
        self.dialogue.release(Hold.ERROR_PAUSE)
        self._process()

    # --- flow control -------------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: the client is not reading."""
        self.dialogue.hold(Hold.BACKLOG)

    def resumeProducing(self) -> None:
        self.dialogue.release(Hold.BACKLOG)
        self._process()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _spool_backlog(self, behind: bool) -> None:
        """The message's spool file is far behind its content (or caught up):
        the client's input waits in the kernel meanwhile, up to SPOOL_STALL."""
        if behind:
            self.dialogue.hold(Hold.SPOOL)
            if self._spool_wait is None:
                self._spool_wait = self.callLater(SPOOL_STALL, self._spool_stalled)
            return  # reading pauses when _process ends, where this is told
        if self._spool_wait is not None:
            if self._spool_wait.active():
                self._spool_wait.cancel()
            self._spool_wait = None
        if Hold.SPOOL in self.dialogue.holds:
            self.dialogue.release(Hold.SPOOL)
            if self.transport is not None and self.dialogue.state is not State.CLOSING:
                self._process()

    def _spool_stalled(self) -> None:
        self._spool_wait = None
        stalled = getattr(self._message, "spool_stalled", None)
        if stalled is not None:
            stalled(SPOOL_STALL)  # tells _spool_backlog(False): the rest is read and dropped

    def _sync_reading(self) -> None:
        """Read from the socket only while the session can use the input."""
        if self.dialogue.state is State.CLOSING or self.transport is None:
            return
        paused = not self.dialogue.reading_wanted()
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # --- replies ----------------------------------------------------------

    def reply(self, reply: Reply, **fields: object) -> None:
        self.dialogue.reply(reply, **fields)

    def _refuse(self, reply: Reply, counts: bool = True) -> None:
        """Answer ``reply``; ``counts`` towards limits.error_limit."""
        self.dialogue.refuse(Refusal(reply, counts))

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # Twisted's own callers (banner, EHLO) come through here.
        lines = message.splitlines() or [b""]
        out = [b"%03d-%s\r\n" % (code, line) for line in lines[:-1]]
        out.append(b"%03d %s\r\n" % (code, lines[-1]))
        self.dialogue.send(b"".join(out))

    # --- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.dialogue.state is State.CLOSING:
            return
        self.resetTimeout()
        self.dialogue.receive(data)
        self._process()

    def _process(self) -> None:
        """Act on the session's events until it needs more input or is held."""
        if self._in_process:
            return
        self._in_process = True
        try:
            while True:
                event = self.dialogue.next_event()
                if event is None:
                    break
                self._handle(event)
                self._flush()  # one event's replies before the next: a backlog stops the loop
        finally:
            self._in_process = False
            self.dialogue.compact()
            self._flush()
            self._sync_reading()

    def _handle(self, event: Event) -> None:
        if isinstance(event, CommandEvent):
            self._handlers[event.verb](self, event.argument)
        elif isinstance(event, Content):
            self._content(event.data)
        elif isinstance(event, ContentRefused):
            self._drop_message()
        elif isinstance(event, EndOfContent):
            self._end_of_content(event)
        elif isinstance(event, AuthResponse):
            self._auth_response(event.line)
        elif isinstance(event, Violation):
            self._violation(event)

    def _violation(self, event: Violation) -> None:
        if event.reply is replies.DATA_LINE_TOO_LONG:
            self._drop_message()
            self._log_message(
                "refused: {reply}", reply=str(event.reply), **replies.outcome("message", event.reply)
            )
        elif event.why:
            self._log_message("refused: " + event.why)
        self.dialogue.reset()
        self._close_with(event.reply)

    def _drop_message(self) -> None:
        if self._message is not None:
            self._message.connectionLost()
            self._message = None

    def _content(self, data: bytes) -> None:
        try:
            self._message.dataReceived(data)
        except SMTPReplyError as e:
            self.dialogue.content_refused(e.reply)
            self._drop_message()
        except Exception:
            log.failure("{qid}: spool write failed", qid=self.dialogue.transaction.queue_id)
            self.dialogue.content_refused(replies.LOCAL_ERROR)
            self._drop_message()

    def _end_of_content(self, event: EndOfContent) -> None:
        message, self._message = self._message, None
        if event.refused is not None:
            self._log_message(
                "refused: {reply}",
                reply=str(event.refused),
                qid=event.queue_id,
                **replies.outcome("message", event.refused),
            )
            self._refuse(event.refused)
            return
        self._finishing = message
        self._await(
            defer.maybeDeferred(message.eomReceived), self._message_done, self._message_failed
        )

    def _message_done(self, result: Reply | None) -> None:
        self._finishing = None
        reply = result if isinstance(result, Reply) else replies.OK
        self.dialogue.message_answered(reply)
        self.reply(reply)

    def _message_failed(self, failure: Failure) -> None:
        self._finishing = None
        if failure.check(defer.CancelledError):
            return  # abandoned at connectionLost: nobody to answer
        self.dialogue.message_answered(replies.LOCAL_ERROR)
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
        self.dialogue.hold(Hold.CHECK)
        answered_later = False

        def finish(result: object) -> None:
            if self.dialogue.state is State.CLOSING or self.transport is None:
                return
            self.dialogue.release(Hold.CHECK)
            if isinstance(result, Failure):
                failed(result)
            else:
                done(result)
            if answered_later:
                self._process()  # go on with what waited

        d.addBoth(finish).addErrback(lambda f: log.failure("reply handling failed", f))
        answered_later = True

    def _log_message(self, fmt: str, qid: str | None = None, **fields: object) -> None:
        qid = qid or self.dialogue.transaction.queue_id or (self.session.session_id if self.session else "-")
        log.info("{qid}: " + fmt, qid=qid, **fields)

    # --- commands: each runs where mailx.smtp.session.COMMANDS allows it ----

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
            self._refuse(replies.SYNTAX_ERROR.with_text("HELO/EHLO needs a domain or address"))
            return
        if _CONTROL.search(name):
            # A bare LF or CR here would split a log line or a header in two.
            self._refuse(replies.SYNTAX_ERROR.with_text("Control characters in HELO/EHLO"))
            return
        self.dialogue.helo()
        assert self.session is not None  # set by connectionMade on admission
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
            b"SIZE": [b"%d" % self.limits.message_size],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        assert self.session is not None  # set by connectionMade on admission
        if self.kind != SMTP and self.startedTLS and self.session.account is None:
            # RFC 4954 4: not offered before TLS, nor once authenticated.
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def do_MAIL(self, rest: bytes) -> None:
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
                self._refuse(replies.PARAMETER_NOT_IMPLEMENTED)
                return
        if size > self.limits.message_size:
            # RFC 1870 6.1: refuse at MAIL when the declared size is too large.
            self.reply(replies.MESSAGE_TOO_BIG)
            return
        qid = self.factory.new_queue_id()

        def accepted(_: object) -> None:
            self.dialogue.mail_accepted(qid, sender, size)
            self.reply(replies.SENDER_OK)

        def refused(failure: Failure) -> None:
            reply = failure.value.reply if failure.check(SMTPReplyError) else replies.LOCAL_ERROR
            if not failure.check(SMTPReplyError):
                log.failure("{qid}: sender check failed", failure, qid=qid)
            assert self.session is not None  # set by connectionMade on admission
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
        parsed = self._parse_path(rest, b"TO:", replies.BAD_RECIPIENT_SYNTAX, allow_null=False)
        if parsed is None:
            return
        recipient, params = parsed
        if params:
            self._refuse(replies.PARAMETER_NOT_IMPLEMENTED)
            return
        if self.dialogue.too_many_recipients():
            self._log_message(
                "recipient <{rcpt}> deferred: too many recipients",
                rcpt=recipient,
                **replies.outcome("rcpt", replies.TOO_MANY_RECIPIENTS),
            )
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        qid = self.dialogue.transaction.queue_id

        def accepted(route: object) -> None:
            self.dialogue.rcpt_accepted(route)
            self.reply(replies.RECIPIENT_OK)

        def refused(failure: Failure) -> None:
            reply = failure.value.reply if failure.check(SMTPReplyError) else replies.LOCAL_ERROR
            if not failure.check(SMTPReplyError):
                log.failure("{qid}: recipient check failed", failure, qid=qid)
            self._log_message(
                "recipient <{rcpt}> refused: {reply}",
                rcpt=recipient,
                reply=str(reply),
                **replies.outcome("rcpt", reply),
            )
            self._refuse(reply, counts=reply.permanent)

        self._await(defer.maybeDeferred(self.delivery.rcpt, qid, recipient), accepted, refused)

    def _parse_path(
        self, rest: bytes, prefix: bytes, bad: Reply, allow_null: bool
    ) -> tuple[str, list[tuple[bytes, bytes | None]]] | None:
        if rest[: len(prefix)].upper() != prefix:
            self._refuse(replies.SYNTAX_ERROR.with_text(f"Syntax: {prefix.decode()}<address>"))
            return None
        rest = rest[len(prefix) :].strip()
        if rest.startswith(b"<"):
            close = rest.find(b">")
            if close < 0:
                self._refuse(bad)
                return None
            path, tail = rest[1:close], rest[close + 1 :]
        else:
            # RFC 5321 requires the brackets; Postfix and Exim accept without.
            path, _, tail = rest.partition(b" ")
        params = []
        for word in tail.split():
            m = _PARAM.match(word)
            if m is None:
                self._refuse(replies.SYNTAX_ERROR.with_text("Bad parameter syntax"))
                return None
            params.append((m.group(1).upper(), m.group(2)))
        if b":" in path and path.startswith(b"@"):
            # RFC 5321 4.1.1.3: a source route is accepted and ignored.
            path = path.split(b":", 1)[1]
        if not path:
            if allow_null:
                return "", params
            self._refuse(bad)
            return None
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            # SMTPUTF8 is not advertised, so 8-bit addresses are a syntax error.
            self._refuse(bad.with_text("Address must be ASCII (SMTPUTF8 not offered)"))
            return None
        recipient = prefix == b"TO:"
        if recipient and text.lower() == "postmaster":
            return "postmaster", params
        try:
            address = parse_address(text, fold_case=recipient)
        except AddressError as e:
            self._refuse(bad.with_text(f"Bad address syntax: {e}"))
            return None
        if recipient:
            return str(address), params
        # The sender unquoted, as SPF and the logs want it; Return-Path quotes it again.
        return f"{address.local}@{address.domain}", params

    def do_DATA(self, rest: bytes) -> None:
        transaction = self.dialogue.transaction
        try:
            self._message = self.delivery.data(
                transaction.queue_id, transaction.sender, list(transaction.recipients)
            )
        except SMTPReplyError as e:
            self.reply(e.reply)
            self.dialogue.reset()
            return
        except Exception:
            log.failure("{qid}: cannot start message", qid=transaction.queue_id)
            self.reply(replies.LOCAL_ERROR)
            self.dialogue.reset()
            return
        listen = getattr(self._message, "on_spool_backlog", None)
        if listen is not None:
            listen(self._spool_backlog)
        self.dialogue.data_started()
        self.sendCode(354, replies.START_DATA.text.encode("ascii"))

    def do_RSET(self, rest: bytes) -> None:
        self.dialogue.reset()
        self.reply(replies.RESET_OK)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            self._refuse(replies.SYNTAX_ERROR.with_text("VRFY needs an argument"), counts=False)
            return
        # RFC 5321 3.5.3: 252 when we will not verify but will accept.
        self.reply(replies.VRFY_CANNOT)

    def do_EXPN(self, rest: bytes) -> None:
        # Expanding aliases would publish them to address harvesters.
        self.reply(replies.NOT_IMPLEMENTED)

    def do_HELP(self, rest: bytes) -> None:
        self.dialogue.send(
            b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
            + (b" STARTTLS" if self.canStartTLS else b"")
            + b"\r\n214 2.0.0 See RFC 5321\r\n"
        )

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(replies.BYE)
        self.dialogue.close(None)

    def do_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            self.reply(replies.TLS_ALREADY)
            return
        if not self.canStartTLS:
            self.reply(replies.TLS_NOT_AVAILABLE)
            return
        self.reply(replies.TLS_GO_AHEAD)
        self._flush()  # in cleartext, before the handshake
        # RFC 3207 4.2 and CVE-2011-0411: anything pipelined after STARTTLS in
        # cleartext is discarded, and the session starts over.
        self.dialogue.start_tls()
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        assert self.session is not None  # set by connectionMade on admission
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
        assert self.session is not None  # set by connectionMade on admission
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
            self._refuse(replies.AUTH_MECHANISM)
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
        self._auth_next = then
        self.dialogue.challenge(challenge)

    def _auth_response(self, response: bytes) -> None:
        then, self._auth_next = self._auth_next, None
        if response == b"*":
            self.reply(replies.AUTH_CANCELLED)  # RFC 4954 4: the client cancels
            return
        assert then is not None  # State.AUTH is entered by _challenge, which sets it
        then(response)

    def _auth_plain(self, response: bytes) -> None:
        from mailx.smtp.submission import decode_base64, decode_plain

        if decode_base64(response) is None:
            self._refuse(replies.AUTH_BAD_BASE64)
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
            self._refuse(replies.AUTH_BAD_BASE64)
            return
        self._challenge(b"UGFzc3dvcmQ6", lambda r: self._auth_login_password(user, r))  # "Password:"

    def _auth_login_password(self, user: str, response: bytes) -> None:
        from mailx.smtp.submission import decode_base64

        password = decode_base64(response)
        if password is None:
            self._refuse(replies.AUTH_BAD_BASE64)
            return
        self._check_login(user, password, "LOGIN")

    def _check_login(self, user: str, password: str, mechanism: str) -> None:
        """Ask the accounts (off the reactor thread), holding input meanwhile."""
        accounts = self.factory.submission.accounts
        session = self.session
        assert session is not None  # set by connectionMade on admission
        d = defer.maybeDeferred(accounts.authenticate, user, password, session.client_ip)

        def done(account: Any) -> None:
            if account is None:
                self._auth_failed(user, mechanism)
                return
            session.account = account.address
            self.dialogue.logged_in_as()
            log.info(
                "{session}: authenticated as {account} ip={ip} mechanism={mechanism}",
                session=session.session_id,
                account=account.address,
                ip=session.client_ip,
                mechanism=mechanism,
            )
            self.reply(replies.AUTH_OK)

        def failed(failure: Failure) -> None:
            from mailx.smtp.accounts import AccountsUnavailable

            if not failure.check(AccountsUnavailable):
                log.failure("{session}: authentication check failed", failure, session=session.session_id)
            log.info(
                "auth unavailable: ip={ip} mechanism={mechanism} user={user}: {why}",
                ip=session.client_ip,
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
        assert self.session is not None  # set by connectionMade on admission
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

    _handlers: dict[bytes, Callable[[MailxESMTP, bytes], None]] = {}  # filled below

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


# The table's commands and nothing else: Twisted's own do_UNKNOWN is not one.
MailxESMTP._handlers = {verb: getattr(MailxESMTP, "do_" + verb.decode("ascii")) for verb in COMMANDS}



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
        self.delivery_for = delivery_for
        self.tls_context = tls_context
        self.sessions: set[MailxESMTP] = set()
        self.per_ip: dict[str, int] = {}
        self.recent: dict[str, deque[float]] = {}
        self.shutting_down = False
        self._counter = 0
        self._epoch = int(time.time())
        self.clock: Callable[[], float] = time.monotonic
        self._configure(config)

    def _configure(self, config: Any) -> None:
        # config.limits itself, not a copy: its defaults live in mailx.config only.
        self.limits = config.limits
        self.hostname: str = config.hostname
        self.trusted_proxies = tuple(ipaddress.ip_network(n) for n in config.haproxy_trusted_networks)

    def reconfigure(self, config: Any, delivery_for: Callable[[Session], Any], tls_context: Any) -> None:
        """New sessions get the new configuration; running ones keep theirs."""
        self._configure(config)
        self.delivery_for = delivery_for
        self.tls_context = tls_context

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
        return ipaddress.ip_network(f"{ip}/{self.limits.ipv6_prefix_length}", strict=False).compressed

    def buildProtocol(self, addr: Any) -> MailxESMTP:
        return self.protocol(self)

    def admit(self, proto: MailxESMTP, ip: str) -> Reply | None:
        """None when ``proto`` may start; the refusal otherwise.

        Per-IP counts are kept under ``limit_key`` (an IPv6
        client's /64), remembered on the session so that a reload changing
        the prefix still releases what was counted.
        """
        if self.shutting_down:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= self.limits.connections:
            log.info(
                "refused connection from {ip}: too many connections",
                ip=ip,
                event="connection_refused",
                reason="connections",
            )
            return replies.TOO_MANY_CONNECTIONS
        key = self.limit_key(ip)
        if self.per_ip.get(key, 0) >= self.limits.connections_per_ip:
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
        limit = self.limits.connection_rate_per_ip
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



# --- PROXY protocol: Twisted's public proxyEndpoint, with the session started after the header
#
# Twisted's wrapper (``twisted.protocols.haproxy.proxyEndpoint``, its only
# public name) connects the wrapped protocol at once, so an SMTP server would
# greet, log and count the connection under the proxy's address; and it
# believes whoever connects.  Its parser and its wrapper class are private,
# and it says nothing when a header is complete.  So the pieces around it
# use public API only: below it, ``_ProxyTap`` (a ``policies.ProtocolWrapper``)
# tells the gate after every read; above it, ``_ProxyGate`` checks who
# connected and starts the SMTP session once ``getPeer()`` names the client.


class _ProxyGate(Protocol):
    """Above Twisted's PROXY wrapper: the SMTP session starts after the header.

    Only peers in ``listen.haproxy_trusted_networks`` may send a header,
    others are disconnected unheard; and a header that names no IP client
    (v1 ``UNKNOWN``, v2 ``LOCAL`` or AF_UNIX, for which Twisted yields no
    source or a UNIXAddress) is refused, since the session would otherwise
    be counted under the proxy's own (loopback, rate-exempt) address.

    The header is known to be read when ``getPeer()`` no longer names the
    proxy, or when input arrives after it (Twisted passes on only what
    follows the header).  A header naming no client, sent alone, is
    therefore only noticed with the client's first line, or at
    ``header_timeout``.
    """

    header_timeout = 30.0
    transport: Any  # Twisted's PROXY wrapper (a policies.ProtocolWrapper)

    def __init__(self, factory: MailxSMTPFactory) -> None:
        self.smtp_factory = factory
        self._after_header: list[bytes] = []
        self._read = False
        self._deadline: Any = None
        self._proxy: Any = None

    def connectionMade(self) -> None:
        self._proxy = self.transport.getPeer()  # before the header: the proxy itself
        if not self.smtp_factory.proxy_trusted(self._proxy):
            self._read = True
            self._refuse("refused connection from {peer}: not in listen.haproxy_trusted_networks")
            return
        from twisted.internet import reactor

        self._deadline = reactor.callLater(self.header_timeout, self.transport.loseConnection)

    def _refuse(self, why: str) -> None:
        log.info(why, peer=getattr(self._proxy, "host", None) or str(self._proxy))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """What followed the header in the same read: the header is complete."""
        self._after_header.append(data)
        self.header_progress()

    def header_progress(self) -> None:
        if self._read:
            return
        peer = self.transport.getPeer()
        if peer == self._proxy and not self._after_header:
            return  # the header is not complete yet
        self._read = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if peer == self._proxy or not isinstance(peer, (address.IPv4Address, address.IPv6Address)):
            self._refuse("refused connection from proxy {peer}: PROXY header names no IP client")
            return
        session = self.smtp_factory.buildProtocol(peer)
        # ProtocolWrapper's public attribute: from now on Twisted's wrapper
        # hands input and the connection's end to the session itself.
        self.transport.wrappedProtocol = session
        session.makeConnection(self.transport)
        if self._after_header:
            session.dataReceived(b"".join(self._after_header))
            self._after_header = []

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()


class _ProxyGateFactory(ServerFactory):
    noisy = False

    def __init__(self, smtp_factory: MailxSMTPFactory) -> None:
        self.smtp_factory = smtp_factory

    def buildProtocol(self, addr: Any) -> _ProxyGate:
        return _ProxyGate(self.smtp_factory)


class _ProxyTap(policies.ProtocolWrapper):
    """Under Twisted's PROXY wrapper: after each read, the gate above looks whether the header is done."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        gate = getattr(self.wrappedProtocol, "wrappedProtocol", None)
        if isinstance(gate, _ProxyGate):
            gate.header_progress()


class _ProxyTapFactory(policies.WrappingFactory):
    protocol = _ProxyTap
    noisy = False


@implementer(interfaces.IStreamServerEndpoint)
class _WrappingEndpoint:
    """Listen on ``inner`` with the factory wrapped by ``wrap``."""

    def __init__(self, inner: Any, wrap: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._wrap = wrap

    def listen(self, factory: Any) -> defer.Deferred:
        return self._inner.listen(self._wrap(factory))


def server_endpoint(reactor: Any, description: str) -> Any:
    """A listening endpoint from a Twisted endpoint string.

    ``haproxy:`` endpoints get the PROXY-aware wrapping above (Twisted's own
    ``haproxy:`` parser would connect the session before the header); every
    other description goes to ``serverFromString`` unchanged.
    """
    from twisted.internet.endpoints import serverFromString

    if description.startswith("haproxy:"):
        tapped = _WrappingEndpoint(serverFromString(reactor, description[len("haproxy:") :]), _ProxyTapFactory)
        return _WrappingEndpoint(proxyEndpoint(tapped), _ProxyGateFactory)
    return serverFromString(reactor, description)
