# -*- test-case-name: tests.test_lmtp -*-
"""LMTP (RFC 2033) to a domain's mailbox store: Dovecot, or any LMTP server (SPEC 14).

A mailbox of a domain with ``delivery: {lmtp: ENDPOINT}`` is not filed
here: at the end of DATA it becomes a recipient of a queue entry
(`mailx.storage.queue`, transport ``lmtp:ENDPOINT``), fsynced before our
250 exactly like a forward, and `mailx.outbound.relay.Outbound` hands it to
`LMTPClientProtocol` instead of an MX.  Everything the queue does for
forwards applies: the retry schedule (``outbound.retry``), the queue
lifetime, delay notices, one DSN for the recipients that failed, and
``mailxctl queue``.  A recipient's reply after the data decides it: 2xx
delivered, 5xx failed and bounced, 4xx (or no server, or a session that
broke off) retried with backoff.

Delivery guarantee: **at least once**.  A recipient is marked delivered
only once the LMTP server's 250 for it has arrived, and the mark is a
durable rewrite of the envelope; a crash (of mailx or its host) after the
server's 250 and before that rewrite sends the message again after the
restart, and that window is the only way to a duplicate (on the sending
side, RFC 1047's: a 250 of ours fsynced but never received, so the client
sends again).  Nothing acknowledged is lost: the queue entry exists,
fsynced, before our 250.  A Sieve ``duplicate`` test (RFC 7352) in the
LMTP server can drop the second copy by Message-ID if that matters.
``tests.test_lmtp.DeliveryGuaranteeTests`` and ``TwoHostsTests`` test it.

The LMTP server files the message and runs the mailbox's filters (Sieve in
Dovecot's Pigeonhole): mailx runs none for these mailboxes.  The server
also writes Return-Path and Delivered-To, so our prefix is X-Original-To,
Received and the Authentication-Results of reception.

Why not Twisted's client: ``twisted.mail.smtp`` has no LMTP client at all
(no LHLO), and its ``SMTPClient`` reads one reply after the data
(``smtpState_msgSent``) where RFC 2033 4.2 sends one per accepted
recipient; it also has the dot-stuffing and timeout gaps listed in
`mailx.outbound.relay`.  So this is our SMTP client with the three places
LMTP differs replaced: LHLO instead of EHLO (no HELO fallback, RFC 2033
4.1), no STARTTLS, and one reply per accepted recipient after the data.
Connection reuse, timeouts and SIZE/8BITMIME come with it.
"""

from __future__ import annotations

from mailx.outbound.relay import SessionResult, SMTPClientProtocol
from mailx.smtp.replies import Reply

__all__ = ["TRANSPORT_PREFIX", "LMTPClientProtocol", "endpoint_of", "transport_for"]

TRANSPORT_PREFIX = "lmtp:"


def transport_for(endpoint: str) -> str:
    """A queue recipient's transport for an LMTP endpoint string."""
    return TRANSPORT_PREFIX + endpoint


def endpoint_of(transport: str | None) -> str | None:
    """The LMTP endpoint of a queue recipient's transport; None for MX delivery."""
    if transport is None or not transport.startswith(TRANSPORT_PREFIX):
        return None
    return transport[len(TRANSPORT_PREFIX) :]


class LMTPClientProtocol(SMTPClientProtocol):
    """One LMTP session; ``done`` fires with each recipient's reply after the data."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # RFC 2033 4.1: a server that refuses LHLO is no LMTP server; no HELO.
        self._said_helo = True
        self._awaiting: list[str] = []

    def _ehlo(self) -> None:
        self._send(b"LHLO " + self.settings.helo.encode("ascii"))
        self._expect("lhlo", self._on_ehlo, self.settings.timeouts.helo)

    def _data_sent(self) -> None:
        # RFC 2033 4.2: one reply per recipient whose RCPT succeeded, in RCPT order.
        self._awaiting = list(self._accepted)
        self._expect("data-end", self._on_recipient_reply, self.settings.timeouts.data_end)

    def _on_recipient_reply(self, reply: Reply) -> None:
        address = self._awaiting.pop(0)
        self._results[address] = reply
        # Answered: it keeps this reply if the session breaks before the others'
        # (`_fail` gives ours only to recipients still in _accepted).
        self._accepted.remove(address)
        if self._awaiting:
            self._expect("data-end", self._on_recipient_reply, self.settings.timeouts.data_end)
            return
        self._clean = True
        self._end(SessionResult(dict(self._results), self.tls))
