# -*- test-case-name: tests.test_submission -*-
"""Authenticated submission (SPEC 11): what differs from an MX session once a
user has logged in.

- `AuthFailures` and `SendRate` are the two shared counters: failed logins
  per client IP (across every submission listener) and accepted recipients
  per account, each over a sliding window.
- `decode_plain` and `header_refusal` are pure decisions over bytes.
- `SubmissionDelivery` is the delivery layer of an authenticated session:
  send-as at MAIL, any recipient at RCPT (ours routed as inbound mail is,
  the rest queued for their MX), and `SubmittedMessage` at end of DATA:
  header From/Sender checked, Date and Message-ID added when missing
  (RFC 6409 8.2, 8.3), a Received ``with ESMTPSA`` (RFC 3848), a DKIM
  signature, then filing and queueing in one all-or-none step, as inbound
  mail is filed, before the 250.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import functools
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from email.utils import make_msgid
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailx import headers
from mailx.address import parse_address
from mailx.filters.outcome import FilterOutcome
from mailx.inbound.decide import decide
from mailx.inbound.delivery import IncomingMessage, SessionDelivery, _message_id, split_header
from mailx.inbound.routing import ForwardDestination, Route, Router, RouteRefused
from mailx.outbound import dkimkeys
from mailx.smtp import replies
from mailx.smtp.accounts import may_send_as
from mailx.smtp.replies import SMTPReplyError
from mailx.text import Logger

log = Logger(namespace="mailx.submission")

# SPEC 11: failures count per client IP over 10 minutes from the last one.
AUTH_FAILURE_WINDOW = 600.0
# From and Sender fields longer than this are refused (RFC 5322 2.1.1's
# 998-octet line, twice): the parser below never sees more.
MAX_ADDRESS_FIELD = 2000
# SPEC 11: send_per_hour is a sliding hour.
SEND_WINDOW = 3600.0
# Bounded memory under a flood of addresses or accounts: past this many
# keys, the ones whose window has passed are forgotten.
MAX_KEYS = 10_000


class AuthFailures:
    """``limits.auth_failures`` per client (an IPv6 client's /64) per 10 minutes.

    SPEC 11: the Nth failure still gets 535; after it AUTH gets 454 4.7.0 and
    the connection is closed until 10 minutes have passed since the last
    failure.  A success does not reset the count (a guesser who also knows
    one password must not get a fresh start from it).
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def _current(self, key: str) -> int:
        count, last = self._failures.get(key, (0, 0.0))
        if count and self.clock() - last >= AUTH_FAILURE_WINDOW:
            del self._failures[key]
            return 0
        return count

    def blocked(self, key: str) -> bool:
        return self._current(key) >= self.limit

    def failed(self, key: str) -> int:
        """Count one failure; the count now."""
        count = self._current(key) + 1
        now = self.clock()
        self._failures[key] = (count, now)
        if len(self._failures) > MAX_KEYS:
            for other in [
                k for k, (_, t) in self._failures.items() if now - t >= AUTH_FAILURE_WINDOW
            ]:
                del self._failures[other]
        return count


class SendRate:
    """``limits.send_per_hour``: accepted recipients per account over a sliding hour."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._sent: dict[str, deque[float]] = {}

    def take(self, account: str) -> bool:
        """Count one recipient for ``account``; False (nothing counted) when over the limit."""
        now = self.clock()
        window = self._sent.setdefault(account, deque())
        while window and window[0] <= now - SEND_WINDOW:
            window.popleft()
        if len(window) >= self.limit:
            return False
        window.append(now)
        if len(self._sent) > MAX_KEYS:
            for other in [k for k, v in self._sent.items() if not v or v[-1] <= now - SEND_WINDOW]:
                del self._sent[other]
        return True


class SubmissionState:
    """What every submission session shares, across listeners and reloads."""

    def __init__(
        self, accounts: Any, limits: Any, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.accounts = accounts  # mailx.smtp.accounts.IAccounts, or None
        self.failures = AuthFailures(limits.auth_failures, clock)
        self.rate = SendRate(limits.send_per_hour, clock)

    def reconfigure(self, accounts: Any, limits: Any) -> None:
        """A reload: new limits and accounts; the counts so far are kept."""
        self.accounts = accounts
        self.failures.limit = limits.auth_failures
        self.rate.limit = limits.send_per_hour


def unsigned_domains(config: Any) -> list[str]:
    """Our domains users can send from with no DKIM key to sign with (SPEC 11:
    a warning at start-up and in `mailxctl check`); [] without submission.

    Such mail fails DMARC at receivers wherever SPF does not align.
    """
    if not (config.submission or config.submissions):
        return []
    return [name for name in config.domains if dkimkeys.signing_domain(config, name) is None]


def decode_plain(response: bytes) -> tuple[str, str, str] | None:
    """(authzid, authcid, password) of an RFC 4616 PLAIN response, or None.

    RFC 4616 2: ``[authzid] NUL authcid NUL passwd``, UTF-8, neither of the
    last two empty.
    """
    try:
        raw = base64.b64decode(response, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    parts = text.split("\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]


def decode_base64(response: bytes) -> str | None:
    """A LOGIN response: base64 of UTF-8 text, or None."""
    try:
        return base64.b64decode(response, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def _field_value(field: bytes) -> str:
    # RFC 5322 2.2.3: unfolding removes the CRLF before folding whitespace.
    value = field.split(b":", 1)[1] if b":" in field else b""
    return value.replace(b"\r\n", b"").decode("utf-8", "replace")


def header_refusal(
    config: Any, account: str, fields: Sequence[bytes], router: Router | None = None
) -> str | None:
    """Why the header section may not go out under ``account`` (SPEC 11), or None.

    Every From address and the Sender address must be the account's; a
    message without From (RFC 5322 3.6: required) is refused too.  The
    stdlib's header parser, as DMARC uses it; the header section is bounded
    by delivery.MAX_HEADER_SECTION and only an authenticated user sends it.
    """
    froms = [f for f in fields if _field_name(f) == b"from"]
    if not froms:
        return "The message has no From header field"
    for field in fields:
        if _field_name(field) in (b"from", b"sender") and len(field) > MAX_ADDRESS_FIELD:
            # The stdlib's parser is super-linear on hostile input (0.5 s on
            # 4 KB of quotes, mailx.headers); real From fields are short.
            return f"{_field_name(field).decode().title()} header field over {MAX_ADDRESS_FIELD} octets"
    for name, found in (
        (b"from", froms),
        (b"sender", [f for f in fields if _field_name(f) == b"sender"]),
    ):
        for field in found:
            specs = _addr_specs(name.decode().title(), _field_value(field))
            if not specs:
                return f"{name.decode().title()} header field cannot be parsed"
            for spec in specs:
                if not may_send_as(config, account, spec, router):
                    return f"{name.decode().title()} address <{spec}> is not one of {account}'s addresses"
    return None


@functools.lru_cache(maxsize=1024)
def _addr_specs(name: str, value: str) -> tuple[str, ...]:
    """The addr-specs of a From or Sender field's value; () if it cannot be parsed.

    Kept by value: a sender's client writes the same From on every message,
    and the stdlib's parser took a third of a submitted message's time in
    the signing thread (bench/submission.py).
    """
    try:
        addresses = email.policy.default.header_factory(name, value).addresses
    except Exception:  # noqa: BLE001 - the stdlib parser on arbitrary input
        return ()
    return tuple(address.addr_spec for address in addresses)


def added_fields(fields: Sequence[bytes], hostname: str) -> list[bytes]:
    """Date and Message-ID when the message lacks them (RFC 6409 8.2, 8.3)."""
    names = {_field_name(f) for f in fields}
    added = []
    if b"date" not in names:
        added.append(f"Date: {headers.date_now()}\r\n".encode("ascii"))
    if b"message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}\r\n".encode("ascii"))
    return added


def checked_and_signed(
    config: Any,
    account: str,
    fields: Sequence[bytes],
    router: Router | None,
    header: bytes,
    body: Any,
) -> tuple[str | None, bytes]:
    """`header_refusal`, then, if there is none, `dkim_signature` (blocking)."""
    refusal = header_refusal(config, account, fields, router)
    if refusal is not None:
        return refusal, b""
    return None, dkim_signature(config, header, body)


def dkim_signature(config: Any, header: bytes, body: Any) -> bytes:
    """The DKIM-Signature field for the message ``header`` + the spooled body,
    or b"" when its From domain has no key (blocking: a worker thread).

    dkimkeys signs relaxed/relaxed with From oversigned; dkimpy wants the
    whole message in memory, which for submitted mail is bounded by
    limits.message_size and sent by an authenticated user.
    """
    message = header + b"".join(body.chunks())
    signed = dkimkeys.sign_if_configured(config, message)
    return signed[: len(signed) - len(message)]


class SubmissionDelivery(SessionDelivery):
    """The delivery layer of an authenticated submission session (SPEC 11)."""

    def __init__(self, context: Any, session: Any, state: SubmissionState) -> None:
        # Not SessionDelivery's: no DNSBL or PTR lookup of the client.  Users
        # submit from residential addresses that policy lists (Spamhaus PBL)
        # name on purpose; the password is what vouches for them.
        self.context = context
        self.config = context.config
        self.session = session
        self.state = state
        self.junk = False
        self._listing = None

    def mail(self, queue_id: str, sender: str, size: int) -> None:
        account = self.session.account
        super().mail(queue_id, sender, size)
        # SPEC 11: MAIL FROM:<> is refused; a bounce is the MTA's job, not a user's.
        if not sender or not may_send_as(self.config, account, sender, self.context.router):
            raise SMTPReplyError(
                replies.SENDER_NOT_OWNED.with_text(
                    replies.SENDER_NOT_OWNED.text.format(account=account)
                )
            )

    def rcpt(self, queue_id: str, recipient: str) -> Route:
        """Ours: routed as inbound mail is; anyone else's: queued for its MX."""
        try:
            decision = self.context.router.route(recipient)
        except RouteRefused as e:
            if e.reply != replies.RELAY_DENIED:
                raise
            address = parse_address(recipient)
            decision = Route(address, (ForwardDestination(str(address)),), ("submitted",))
        if not self.state.rate.take(self.session.account):
            raise SMTPReplyError(
                replies.SEND_RATE.with_text(
                    replies.SEND_RATE.text.format(limit=self.state.rate.limit)
                )
            )
        return self._accepted(queue_id, recipient, decision)

    def data(self, queue_id: str, sender: str, routes: Sequence[Route]) -> SubmittedMessage:
        return SubmittedMessage(self, queue_id, sender, routes)


class SubmittedMessage(IncomingMessage):
    """A message from an authenticated user: no SPF/DKIM/DMARC checks of our
    own users, the send-as check on the header instead."""

    @defer.inlineCallbacks
    def eomReceived(self) -> Generator[defer.Deferred[Any], Any, replies.Reply]:
        ctx = self.delivery.context
        config = ctx.config
        account = self.delivery.session.account
        try:
            yield self._spooled()
            fields = split_header(self.header)
            added = added_fields(fields, config.hostname)
            header = self._received() + b"".join(fields) + b"".join(added)
            # One worker-thread trip for both: the stdlib's address parser (slow
            # on odd input) and the signature (RSA, the whole message).
            refusal, signature = yield deferToThreadPool(
                ctx.reactor,
                ctx.disk_pool,
                checked_and_signed,
                config,
                account,
                fields,
                ctx.router,
                header,
                self.body,
            )
            if refusal is not None:
                raise SMTPReplyError(replies.FROM_NOT_OWNED.with_text(refusal))
            header = signature + header
            # The same decision and filing as inbound mail, without checks;
            # local recipients' filters apply (SPEC 11).
            outcomes: dict[str, FilterOutcome] = {}
            if ctx.filters is not None:
                outcomes = yield self._filter_outcomes(header, [])
            decision = decide(self.queue_id, self.sender, self.routes, outcomes=outcomes)
            if not decision.accepted:
                raise SMTPReplyError(decision.reply)
            filing, entries = yield self._filing(decision, header, [], None)
            # Mailbox copies and the queue entry in one all-or-none step, fsynced before the 250.
            filed = yield ctx.writer.file(filing)
            log.info(
                "{qid}: submitted by {account} size={size} nrcpt={nrcpt} dkim={dkim}",
                qid=self.queue_id,
                account=account,
                size=len(header) + self.body.size,
                nrcpt=len(self.routes),
                dkim="signed" if signature else "none",
                # For mailxctl trace MESSAGE-ID (mailx.observe.trace), ours if we added it.
                message_id=_message_id(
                    fields + added, [_field_name(f) for f in fields + added]
                ),
            )
            self._filed(decision, filing, entries, filed)
            return replies.MESSAGE_ACCEPTED.with_text(
                replies.MESSAGE_ACCEPTED.text.format(queue_id=self.queue_id)
            )
        except SMTPReplyError as e:
            log.info("{qid}: refused: {reply}", qid=self.queue_id, reply=str(e.reply))
            raise
        except OSError as e:
            log.error(
                "{qid}: cannot file the message: {error} (the client will retry)",
                qid=self.queue_id,
                error=str(e).replace("\n", " "),
            )
            raise SMTPReplyError(replies.LOCAL_ERROR) from None
        except Exception:
            log.failure("{qid}: submission failed", qid=self.queue_id)
            raise SMTPReplyError(replies.LOCAL_ERROR) from None
        finally:
            self.body.discard()

    def _received(self) -> bytes:
        """RFC 3848: ESMTPSA is ESMTP with STARTTLS (or implicit TLS) and AUTH."""
        session = self.delivery.session
        tls = f"\r\n\t(using {session.tls})" if session.tls else ""
        return (
            f"Received: from {_safe(session.helo or 'unknown')} ([{session.client_ip}])\r\n"
            f"\tby {self.delivery.config.hostname} (mailx) with ESMTPSA id {self.queue_id}{tls};\r\n"
            f"\t{headers.date_now()}\r\n"
        ).encode()

    def _copy_trace(self, dest: Any, original: str) -> list[bytes]:
        return self._trace_headers(dest, original)[:-1]  # Received is in the header

    def _forward_trace(self, original: str) -> bytes:
        return b""  # the Received field is in the header already

    def _envelope_results(self, verdict: Any) -> dict[str, str | None]:
        """None: the sender is authenticated, so a failure comes back to it as a
        DSN (dsn.notice_refusal).  The envelope sender is one of our addresses,
        so outbound's SRS rewriting leaves it alone (SPEC 11)."""
        return {}


def _safe(text: str) -> str:
    return "".join(c if "\x21" <= c <= "\x7e" else "?" for c in text)
