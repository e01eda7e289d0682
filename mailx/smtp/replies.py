# -*- test-case-name: tests.test_smtp -*-
"""Every SMTP reply mailx sends, in one table (SPEC section 5).

A reply is a value: code, RFC 3463 enhanced status code, text.  The SMTP
layer turns it into wire bytes; everything else only names the constant, so
a reply's wording is decided here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def line(self) -> str:
        """The text after the code, as Twisted's sendCode wants it."""
        return f"{self.enhanced} {self.text}"

    def wire(self) -> bytes:
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode()

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class Outcome(TypedDict):
    """`outcome`'s fields, named so that ``**outcome(...)`` fills no other parameter."""

    event: str
    result: str
    code: str


def outcome(event: str, reply: Reply) -> Outcome:
    """Log fields saying how a stage ended, for `mailx.observe.metrics` (and the JSON log):
    ``event`` (rcpt, message), ``result`` (refused on 5xx, tempfail on 4xx,
    accepted) and ``code``, the enhanced status code: the reason, in a
    vocabulary small enough to be a metric label."""
    if reply.permanent:
        result = "refused"
    elif reply.temporary:
        result = "tempfail"
    else:
        result = "accepted"
    return {"event": event, "result": result, "code": reply.enhanced}


class SMTPReplyError(Exception):
    """Raised by the delivery layer to answer with a given reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# Session
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
CONNECTION_RATE = Reply(421, "4.7.0", "Too many connections from your address recently, try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session too long, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
EARLY_TALKER = Reply(554, "5.5.0", "Protocol error: you spoke before the greeting")
TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands without mail, closing connection")
# RFC 2920 3.1: DATA ends a pipelined group; the client must wait for the 354.
DATA_PIPELINED = Reply(554, "5.5.0", "Protocol error: message content sent before the 354 reply")
BYE = Reply(221, "2.0.0", "Bye")

# Commands
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Command not recognized")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL character in command")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
PARAMETER_NOT_IMPLEMENTED = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_GO_AHEAD = Reply(220, "2.0.0", "Ready to start TLS")

# Recipients and senders
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "No such user here")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
DNSBL_BLOCKED = Reply(554, "5.7.1", "Service unavailable; client [{ip}] blocked using {zone}")
SRS_FORGED = Reply(550, "5.7.1", "Invalid SRS address")

# Messages
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section too large")
# RFC 3463 4.3.1: mail system full; every session's headers together hit the bound.
HEADER_MEMORY = Reply(452, "4.3.1", "Insufficient system resources, try again later")
DATA_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long in message data, message refused")
BARE_LINEFEED = Reply(554, "5.6.11", "Bare CR or LF in message data is not allowed")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "OK queued as {queue_id}")
DMARC_REJECT = Reply(550, "5.7.1", "Rejected by DMARC policy of the sender's domain")
DNS_TEMPFAIL = Reply(451, "4.7.5", "Temporary DNS failure while checking the sender, try again later")
MAIL_LOOP = Reply(554, "5.4.6", "Mail loop detected")
# RFC 5429 2.1.1: every recipient's Sieve script rejected it; the text is the script's reason.
SIEVE_REJECT = Reply(550, "5.7.1", "{reason}")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")

# Submission (SPEC 11; RFC 4954 for AUTH, RFC 3207 4 for 530 before STARTTLS)
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY_FAILURES = Reply(454, "4.7.0", "Too many authentication failures, try again later")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism (PLAIN and LOGIN are offered)")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response (base64)")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by {account}")
FROM_NOT_OWNED = Reply(550, "5.7.1", "{reason}")
SEND_RATE = Reply(450, "4.7.1", "Sending rate limit of {limit} recipients per hour reached, try again later")
