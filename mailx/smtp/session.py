# -*- test-case-name: tests.test_session -*-
"""The SMTP dialogue without I/O: bytes in, events and actions out (as h11 does HTTP).

``SMTPSession`` knows where a session stands (``State``), what holds its
input (``Hold``) and, in one table (``COMMANDS``), which command is legal in
which state and what the others are told.  The limits the dialogue enforces
live here too: line lengths, input kept before the banner, the error count
and its pause, the junk-command count, the recipients per message, the
message size, and RFC 2920's rule that content waits for the 354.

The Twisted protocol (``mailx.smtp.server``) feeds it what the socket read
(``receive``), pulls events (``next_event``: a legal command, a SASL
response, a run of message content, the end of it), calls the delivery
hooks, tells the session the outcome (``reply``, ``mail_accepted``, ...),
and carries out the actions it gets back (``actions``: send these bytes,
start the error pause, hang up).  Nothing here reads a clock or a socket, so
every decision is testable with plain calls (tests/test_session.py).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailx.smtp import replies
from mailx.smtp.replies import Reply

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
# Unprocessed input kept while a check holds the session: one socket read.
MAX_HELD_INPUT = 64 * 1024
# Postfix's smtpd_error_sleep_time default: the pause after repeated errors.
ERROR_SLEEP = 1.0

_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")


class State(enum.Enum):
    """Where the dialogue stands.  Input is parsed as commands in the COMMAND_STATES."""

    GREETING = "greeting"  # before the banner (the greeting pause): input is an early talker
    CONNECTED = "connected"  # banner sent (or TLS just started): HELO/EHLO expected
    GREETED = "greeted"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # message content, after our 354
    PROCESSING = "processing"  # end of data seen: the delivery layer checks and files
    AUTH = "auth"  # the next line is a SASL response (RFC 4954 4), not a command
    CLOSING = "closing"  # the last reply is queued or the client is gone: input is ignored

    # Identity is equality for members; Enum's own __hash__ is Python code,
    # and the session looks states up in sets for every command.
    __hash__ = object.__hash__


COMMAND_STATES = frozenset((State.CONNECTED, State.GREETED, State.MAIL, State.RCPT))
_NOT_READING = frozenset((State.GREETING, State.PROCESSING, State.CLOSING))  # input waits
# STARTTLS has no state of its own: Twisted's TLS transport runs the
# handshake under us, and what follows it is a new session (RFC 3207 4.2):
# CONNECTED again.


class Hold(enum.Enum):
    """Why input is not processed; while any stands, pipelined lines wait in the buffer."""

    CHECK = "check"  # a Deferred answer (checks, filing): replies stay in order (RFC 2920 3)
    ERROR_PAUSE = "error pause"  # smtpd_error_sleep_time after repeated errors
    BACKLOG = "backlog"  # our replies are not being read (the transport paused us)
    SPOOL = "spool"  # the spool's disk is behind the message's content

    __hash__ = object.__hash__  # as State's


@dataclass(frozen=True)
class Refusal:
    """A reply to a command that is not legal where it was sent."""

    reply: Reply
    counts: bool = True  # towards limits.error_limit (Postfix's smtpd_*_error_limit)


@dataclass(frozen=True)
class Command:
    """One row of the table: how a command is judged before its handler runs.

    The checks, in this order: ``listeners`` (the kinds that offer it, else
    ``unoffered``); on a submission listener, ``needs_tls`` and
    ``needs_login`` (SPEC 11); ``no_arguments``; ``once_logged_in``;
    then the state: legal in ``states``, else ``refusals[state]``.
    """

    states: frozenset[State]
    refusals: Mapping[State, Refusal] = field(default_factory=dict)
    # Postfix's smtpd_junk_command_limit counts NOOP, VRFY, ETRN and RSET;
    # EXPN and HELP cost us as much and deliver nothing either.
    junk: bool = False
    listeners: frozenset[str] = frozenset(LISTENER_KINDS)
    unoffered: Refusal | None = None
    needs_tls: bool = False  # on a submission listener: RFC 3207 4, RFC 8314 3
    needs_login: bool = False  # on a submission listener: RFC 6409 4.1
    no_arguments: Refusal | None = None
    once_logged_in: Refusal | None = None
    # RFC 2920 3.1: the last command of a pipelined group.  If input follows
    # it in the buffer, the client did not wait for our reply: refused, and
    # the session ends (only DATA is enforced: its content may only follow
    # the 354; smtpsmug's "pipelining" test, Postfix 3.9's
    # smtpd_forbid_unauth_pipelining).
    pipelined: Refusal | None = None


def _syntax(text: str, counts: bool = True) -> Refusal:
    return Refusal(replies.SYNTAX_ERROR.with_text(text), counts)


_ANYWHERE = COMMAND_STATES
_NEED_MAIL = Refusal(replies.NEED_MAIL)

# The table.  Each command's handler (MailxESMTP.do_<VERB>) runs only where
# its row allows it; the argument syntax and the delivery layer's answers
# are the handler's.
COMMANDS: Mapping[bytes, Command] = {
    b"HELO": Command(_ANYWHERE),
    b"EHLO": Command(_ANYWHERE),
    b"MAIL": Command(
        frozenset((State.GREETED,)),
        {
            State.CONNECTED: Refusal(replies.BAD_SEQUENCE.with_text("Send HELO/EHLO first")),
            State.MAIL: Refusal(replies.NESTED_MAIL),
            State.RCPT: Refusal(replies.NESTED_MAIL),
        },
        needs_tls=True,
        needs_login=True,
    ),
    b"RCPT": Command(
        frozenset((State.MAIL, State.RCPT)),
        {State.CONNECTED: _NEED_MAIL, State.GREETED: _NEED_MAIL},
    ),
    b"DATA": Command(
        frozenset((State.RCPT,)),
        {
            State.CONNECTED: _NEED_MAIL,
            State.GREETED: _NEED_MAIL,
            State.MAIL: Refusal(replies.NEED_RCPT),
        },
        no_arguments=_syntax("DATA takes no arguments"),
        pipelined=Refusal(replies.DATA_PIPELINED),
    ),
    b"BDAT": Command(_ANYWHERE),  # answered 502: CHUNKING is not offered
    b"RSET": Command(_ANYWHERE, junk=True),
    b"NOOP": Command(_ANYWHERE, junk=True),
    b"VRFY": Command(_ANYWHERE, junk=True),
    b"EXPN": Command(_ANYWHERE, junk=True),
    b"HELP": Command(_ANYWHERE, junk=True),
    b"QUIT": Command(_ANYWHERE),
    b"STARTTLS": Command(
        _ANYWHERE, no_arguments=_syntax("STARTTLS takes no arguments", counts=False)
    ),
    b"AUTH": Command(
        frozenset((State.GREETED,)),
        {
            State.CONNECTED: Refusal(replies.BAD_SEQUENCE.with_text("Send EHLO first")),
            State.MAIL: Refusal(replies.AUTH_IN_TRANSACTION, counts=False),  # RFC 4954 4
            State.RCPT: Refusal(replies.AUTH_IN_TRANSACTION, counts=False),
        },
        # An MX takes no logins (SPEC 11: 502 5.5.1 on port 25).
        listeners=frozenset((SUBMISSION, SUBMISSIONS)),
        unoffered=Refusal(replies.NOT_IMPLEMENTED, counts=False),
        needs_tls=True,
        once_logged_in=Refusal(replies.AUTH_ALREADY, counts=False),  # RFC 4954 4
    ),
}


# --- events: what the session hands the protocol ----------------------------


@dataclass(frozen=True)
class CommandEvent:
    """A command that is legal here: the protocol runs its handler."""

    verb: bytes
    argument: bytes


@dataclass(frozen=True)
class AuthResponse:
    """A SASL response line (RFC 4954 4), already stripped."""

    line: bytes


@dataclass(frozen=True)
class Content:
    """Message content: dot-unstuffed, every line end CRLF (SPEC 5)."""

    data: bytes


@dataclass(frozen=True)
class ContentRefused:
    """The message is refused from here on (too big, the spool failed): drop it.

    Its content is still read up to the end of data, which is answered with
    ``reply``.
    """

    reply: Reply


@dataclass(frozen=True)
class EndOfContent:
    """``<CRLF>.<CRLF>``: the message is complete, or was refused (``refused``)."""

    queue_id: str | None
    refused: Reply | None


@dataclass(frozen=True)
class Violation:
    """The client broke the framing: the protocol logs it and closes with ``reply``."""

    reply: Reply
    why: str


Event = CommandEvent | AuthResponse | Content | ContentRefused | EndOfContent | Violation
_END = object()  # in SMTPSession._pending: the end of data, judged when it is reached


# --- actions: what the protocol carries out ---------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartPause:
    """Release ``Hold.ERROR_PAUSE`` (``release``) after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class HangUp:
    """Close after the replies are sent; ``abort``: at once (the client does not read).

    ``reply``: why the server ends the session (logged); None when the client asked (QUIT).
    """

    abort: bool
    reply: Reply | None


Action = Send | StartPause | HangUp


class SessionLimits(Protocol):
    """The part of ``config.limits`` the dialogue enforces."""

    message_size: int
    recipients: int
    error_limit: int
    junk_commands: int


@dataclass
class Transaction:
    """MAIL, RCPT, DATA: what the client has said since the last reset."""

    queue_id: str | None = None
    sender: str | None = None
    recipients: list[Any] = field(default_factory=list)
    declared_size: int = 0
    received: int = 0  # octets of content so far
    refused: Reply | None = None  # the message is refused; content is read and dropped


class SMTPSession:
    """One session's dialogue state; see the module docstring."""

    def __init__(self, kind: str, limits: SessionLimits, greeting_pause: bool) -> None:
        self.kind = kind
        self.limits = limits
        self.state = State.GREETING if greeting_pause else State.CONNECTED
        self.holds: set[Hold] = set()
        self.tls = False  # TLS is up (implicit or after STARTTLS)
        self.logged_in = False  # AUTH succeeded (submission listeners)
        self.greeted = False  # HELO/EHLO since the banner or STARTTLS
        self.shutting_down = False
        self.transaction = Transaction()
        self.errors = 0  # bad commands and refused recipients, whole session
        self.junk = 0  # junk commands since the last delivered message
        # Unprocessed input is self._buffer[self._offset:]; the consumed
        # prefix is dropped by ``compact``, so parsing stays linear.
        self._buffer = b""
        self._offset = 0
        self._line_start = True  # DATA: the next byte starts a line (after CRLF)
        self._actions: list[Action] = []
        self._pending: deque[Event | object] = deque()  # the rest of one run of content

    # --- input ----------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self.state is State.CLOSING:
            return
        if self.state is State.GREETING:
            # Refused when the pause ends, whatever it says; keep a sample.
            self._buffer = (self._buffer + data)[:MAX_EARLY_INPUT]
        else:
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Octets received and not yet processed."""
        return len(self._buffer) - self._offset

    def compact(self) -> None:
        """Drop the consumed input (once per processing run: linear in the input)."""
        if self._offset:
            self._buffer = self._buffer[self._offset :]
            self._offset = 0

    def reading_wanted(self) -> bool:
        """Whether the socket should be read.

        Not while input cannot be processed, so a stranger's unread input
        stays in the kernel; except while a check runs, when reading goes on
        up to MAX_HELD_INPUT, so that a client hanging up during its
        message's checks is noticed at once.
        """
        if self.state is State.GREETING:
            return False
        if len(self.holds) == 1 and Hold.CHECK in self.holds:
            return self.buffered <= MAX_HELD_INPUT
        return not self.holds

    def next_event(self) -> Event | None:
        """The next thing the protocol must act on, or None (held, or more input needed)."""
        if self._pending:
            return self._next_pending()  # the rest of the run before it
        while not self.holds and self.state not in _NOT_READING:
            if self.shutting_down and self.state in COMMAND_STATES:
                # Between transactions: the client retries elsewhere or later.
                self.close(replies.SHUTTING_DOWN)
                return None
            if self._offset >= len(self._buffer):
                return None
            if self.state is State.DATA:
                consumed = self._offset
                event = self._content()
                if event is not None:
                    return event
                if self._offset == consumed:
                    return None  # the rest of a line is still to come
                continue  # a run of a refused message's content, dropped
            buf = self._buffer
            end = buf.find(b"\r\n", self._offset)
            if end < 0:
                if len(buf) - self._offset > MAX_PARTIAL_COMMAND:
                    return Violation(replies.LINE_TOO_LONG, "")
                return None
            line = buf[self._offset : end]
            self._offset = end + 2
            if self.state is State.AUTH:
                self.state = State.GREETED
                return AuthResponse(line.strip())
            event = self._command(line)
            if event is not None:
                return event
        return None

    def _command(self, line: bytes) -> Event | None:
        """Judge one command line by the table; None when it was answered here."""
        if len(line) > MAX_PARTIAL_COMMAND:
            # The same answer whether or not the CRLF came in the same read.
            return Violation(replies.LINE_TOO_LONG, "")
        if len(line) > MAX_COMMAND_LINE:
            self.refuse(Refusal(replies.LINE_TOO_LONG))
            return None
        if b"\0" in line:
            self.refuse(Refusal(replies.NUL_IN_COMMAND))
            return None
        parts = line.strip().split(None, 1)
        rule = COMMANDS.get(parts[0].upper()) if parts else None
        if rule is None:
            self.refuse(Refusal(replies.COMMAND_UNRECOGNIZED))
            return None
        verb = parts[0].upper()
        argument = parts[1] if len(parts) > 1 else b""
        if rule.junk:
            self.junk += 1
            if self.junk > self.limits.junk_commands:
                self.close(replies.TOO_MANY_JUNK)
                return None
        refusal = self._judge(rule, argument)
        if refusal is not None:
            self.refuse(refusal)
            return None
        if rule.pipelined is not None and self._offset < len(self._buffer):
            return Violation(rule.pipelined.reply, "content sent before the 354")
        return CommandEvent(verb, argument)

    def _judge(self, rule: Command, argument: bytes) -> Refusal | None:
        if self.kind not in rule.listeners:
            return rule.unoffered
        if self.kind != SMTP:
            if rule.needs_tls and not self.tls:
                return Refusal(replies.MUST_STARTTLS)
            if rule.needs_login and not self.logged_in:
                return Refusal(replies.AUTH_REQUIRED)
        if rule.no_arguments is not None and argument.strip():
            return rule.no_arguments
        if rule.once_logged_in is not None and self.logged_in:
            return rule.once_logged_in
        if self.state in rule.states:
            return None
        return rule.refusals.get(self.state, Refusal(replies.BAD_SEQUENCE))

    def _content(self) -> Event | None:
        """A run of whole lines of message content, or the end; None: more input needed.

        Lines are cut at any LF, so a message with bare LF line ends streams
        to the spool like any other, and their length is measured as they
        will be stored (SPEC 5: a bare LF or CR ends a line).  Only
        ``<CRLF>.<CRLF>`` ends DATA: after a cut at a bare LF the next byte
        does not start a line for the end marker or dot-unstuffing.
        """
        buf, start = self._buffer, self._offset
        if self._line_start and buf.startswith(b".\r\n", start):
            self._offset = start + 3
            return self._end_of_content()
        marker = buf.find(b"\r\n.\r\n", start)
        if marker >= 0:
            cut, resume, finished = marker + 2, marker + 5, True
        else:
            last = buf.rfind(b"\n", start)
            if last < 0:
                if len(buf) - start > MAX_DATA_LINE and _partial_line_length(buf[start:]) > MAX_DATA_LINE:
                    return self._line_too_long()
                return None
            cut = resume = last + 1
            finished = False
            if len(buf) - cut > MAX_DATA_LINE and _partial_line_length(buf[cut:]) > MAX_DATA_LINE:
                return self._line_too_long()
        region = buf[start:cut]
        self._offset = resume
        if len(region) > MAX_DATA_LINE and _has_long_line(region):
            return self._line_too_long()
        # RFC 5321 4.5.2: a line starting with "." lost its first dot in transit.
        if self._line_start and region.startswith(b"."):
            region = region[1:]
        self._line_start = finished or region.endswith(b"\r\n")
        region = region.replace(b"\r\n.", b"\r\n")
        # Unstuff first, then normalise: a dot after a bare LF was never stuffed.
        line_feeds = region.count(b"\n")
        if line_feeds != region.count(b"\r") or line_feeds != region.count(b"\r\n"):
            region = _LINE_BREAKS.sub(b"\r\n", region)
        if self.transaction.refused is None:
            self.transaction.received += len(region)
            if self.transaction.received > self.limits.message_size:
                self._pending.append(self.content_refused(replies.MESSAGE_TOO_BIG))
            elif region:
                self._pending.append(Content(region))
        if finished:
            self._pending.append(_END)  # decided when it is reached: the spool may fail first
        return self._next_pending()

    def _next_pending(self) -> Event | None:
        if not self._pending:
            return None
        event = self._pending.popleft()
        if isinstance(event, (Content, ContentRefused)):
            return event
        return self._end_of_content()

    def content_refused(self, reply: Reply) -> ContentRefused:
        """The message is refused (the spool failed, or it is too big); the rest is dropped."""
        self.transaction.refused = reply
        return ContentRefused(reply)

    def _end_of_content(self) -> EndOfContent:
        """The transaction ends here; a message that was not refused is being processed."""
        ended = EndOfContent(self.transaction.queue_id, self.transaction.refused)
        self.reset()
        if ended.refused is None:
            self.state = State.PROCESSING
        return ended

    def _line_too_long(self) -> Violation:
        return Violation(replies.DATA_LINE_TOO_LONG, "a line of message data is too long")

    # --- the dialogue's outcomes, told by the protocol --------------------

    def reply(self, reply: Reply, **fields: object) -> None:
        text = reply.text.format(**fields) if fields else reply.text
        if reply.enhanced:
            text = f"{reply.enhanced} {text}"
        self.send(b"%d %s\r\n" % (reply.code, text.encode("utf-8")))

    def send(self, data: bytes) -> None:
        if self.state is not State.CLOSING:
            self._actions.append(Send(data))

    def refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal.reply``; counted errors slow the session down, then end it."""
        self.reply(refusal.reply)
        if refusal.counts:
            self.count_error()

    def count_error(self) -> None:
        """Postfix's smtpd_soft/hard_error_limit: slow down, then hang up.

        Refused recipients count (SPEC 3), so harvesting addresses costs the
        same second per guess as bad commands.  The pause is a hold of its
        own: it delays the replies to what follows, after this reply, even
        when the error was answered while a check held input.
        """
        self.errors += 1
        if self.errors >= self.limits.error_limit:
            self.close(replies.TOO_MANY_ERRORS)
        elif self.errors > self.limits.error_limit // 2 and Hold.ERROR_PAUSE not in self.holds:
            # smtpd_error_sleep_time: the next command waits, which costs a
            # guessing client time and us nothing.
            self.holds.add(Hold.ERROR_PAUSE)
            self._actions.append(StartPause(ERROR_SLEEP))

    def hold(self, reason: Hold) -> None:
        self.holds.add(reason)

    def release(self, reason: Hold) -> None:
        self.holds.discard(reason)

    def banner_due(self) -> Reply | None:
        """The greeting pause is over: None, or the refusal to close with (early talker)."""
        if self.state is not State.GREETING:
            return None
        self.state = State.CONNECTED
        if self.shutting_down:
            return replies.SHUTTING_DOWN
        if self._buffer:
            return replies.EARLY_TALKER
        return None

    def helo(self) -> None:
        """HELO/EHLO accepted: a new transaction, and MAIL may follow."""
        self.reset()
        self.greeted = True
        self.state = State.GREETED

    def reset(self) -> None:
        """RSET (or the end of a transaction): back to before MAIL."""
        self.transaction = Transaction()
        if self.state is not State.CLOSING:
            self.state = State.GREETED if self.greeted else State.CONNECTED

    def mail_accepted(self, queue_id: str, sender: str, declared_size: int) -> None:
        self.transaction.queue_id = queue_id
        self.transaction.sender = sender
        self.transaction.declared_size = declared_size
        self.state = State.MAIL

    def too_many_recipients(self) -> bool:
        """RFC 5321 4.5.3.1.10: past limits.recipients, 452 asks for the rest later."""
        return len(self.transaction.recipients) >= self.limits.recipients

    def rcpt_accepted(self, route: object) -> None:
        self.transaction.recipients.append(route)
        self.state = State.RCPT

    def data_started(self) -> None:
        """Our 354 is on its way: what follows is content."""
        self.state = State.DATA
        self._line_start = True

    def message_answered(self, reply: Reply) -> None:
        """The end of data was answered; a session that delivers mail is not junk."""
        if reply.code == 250:
            self.junk = 0
        self.reset()

    def challenge(self, data: bytes) -> None:
        """334 and wait for the client's response line (RFC 4954 4)."""
        self.send(b"334 " + data + b"\r\n")
        self.state = State.AUTH

    def logged_in_as(self) -> None:
        self.logged_in = True

    def start_tls(self) -> None:
        """RFC 3207 4.2 and CVE-2011-0411: what was pipelined after STARTTLS is discarded."""
        self._buffer = b""
        self._offset = 0
        self.tls = True
        self.greeted = False
        self.reset()

    def shutdown(self) -> bool:
        """The server stops: True when the session closes now (it is between transactions)."""
        self.shutting_down = True
        if self.state in COMMAND_STATES | {State.GREETING} and Hold.CHECK not in self.holds:
            self.close(replies.SHUTTING_DOWN)
            return True
        return False

    def close(self, reply: Reply | None) -> bool:
        """Send ``reply`` (if any) and hang up; False if the session was already closing."""
        if self.state is State.CLOSING:
            return False
        if reply is not None:
            self.reply(reply)
        self.state = State.CLOSING
        self._buffer = b""
        self._offset = 0
        self._pending.clear()
        self._actions.append(HangUp(abort=Hold.BACKLOG in self.holds, reply=reply))
        return True

    def connection_lost(self) -> None:
        self.state = State.CLOSING
        self._buffer = b""
        self._offset = 0
        self._pending.clear()

    def actions(self) -> Sequence[Action]:
        """What to do now, in order; each action is returned once."""
        if not self._actions:
            return ()
        actions, self._actions = self._actions, []
        return actions


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
    return max(map(len, _LINE_BREAKS.split(region)))


def _has_long_line(region: bytes, limit: int = MAX_DATA_LINE) -> bool:
    """Whether ``region`` holds a line longer than ``limit`` (as `_longest_line`).

    Without splitting: from each line start, the last LF within the next
    ``limit`` + 1 octets is where the next window starts (memrchr finds it
    at once); a window without an LF is a piece that long, measured exactly
    then.  Splitting 64 KiB into its lines allocated one object a line,
    150 us a read of a 100 KiB message on the reactor thread.
    """
    start = 0
    while len(region) - start > limit:
        last = region.rfind(b"\n", start, start + limit + 1)
        if last < 0:
            return _longest_line(region) > limit  # LF-cut pieces are never shorter
        start = last + 1
    return False
