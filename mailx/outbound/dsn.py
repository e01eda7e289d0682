# -*- test-case-name: tests.test_dsn -*-
"""Delivery status notifications: the bounce and the delay notice (RFC 3464).

A message we forwarded and could not deliver goes back to its original
envelope sender as one ``multipart/report`` (RFC 6522) per message: a human
explanation, the machine-readable ``message/delivery-status`` (RFC 3464) with
each recipient's remote reply, and the original header section as
``text/rfc822-headers`` (the body is left out: it is the sender's own, and
returning it doubles the backscatter a forged sender causes).

The rules that keep notices from causing harm (RFC 5321 4.5.5, RFC 3464 2):

- never to the null sender: a bounce has nowhere to go back to;
- never for a notice: a message that is itself a delivery report
  (``multipart/report; report-type=delivery-status``) or one of ours
  (``kind`` bounce or delay, sent from ``<>``) gets none, whatever its
  sender claims, so two servers can never bounce at each other;
- never to a sender we could not authenticate (backscatter): the envelope
  sender gets a notice only when SPF passed for it or DMARC passed, and
  never when either failed (`notice_refusal`);
- the returned header section is cut at a field boundary past
  `MAX_RETURNED_HEADER` octets: a notice never carries more than a few KiB
  of a stranger's text;
- our notices are sent with the null sender and come from
  ``MAILER-DAEMON@<hostname>``.

The functions are pure: queue state in, message bytes out (CRLF).  Each
one that reads message data runs in time linear in its length (no
backtracking regular expression sees it).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from email.utils import formatdate

from mailx import headers
from mailx.address import quote_path
from mailx.storage.queue import Envelope, Recipient

__all__ = [
    "MAX_RETURNED_HEADER",
    "bounce_message",
    "delay_message",
    "is_report",
    "notice_refusal",
    "returned_header",
    "wants_notice",
]

# RFC 5322 2.1.1: keep every line we generate well under 998 octets.
MAX_TEXT = 900
MAX_LINE = 998
# The header section returned in a notice (RFC 6522 3, text/rfc822-headers):
# real ones are a few KiB; Postfix returns at most 50 KiB of a whole message
# (bounce_size_limit), and headers alone are all the sender needs to tell
# which message it was.
MAX_RETURNED_HEADER = 16 * 1024
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

# SPF results (RFC 7208 2.6) and DMARC results (RFC 7489 11.2) as the
# envelope records them; None: not checked (switched off, or an entry queued
# before mailx recorded them).
_SENDER_AUTHENTICATED = "pass"
_FAILED = "fail"


def _ascii(text: str) -> str:
    """Printable ASCII on one line (remote replies may carry anything)."""
    return _UNPRINTABLE.sub("?", text)[:MAX_TEXT]


def _field_value(header: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first ``name`` field (lower-case name), or None.

    The name as mail clients read it, ``Content-Type :`` too (RFC 5322
    4.5.8), by `mailx.headers`: linear in the header's size (repeated
    ``+=`` of continuation lines, or a regular expression with ``.*`` over
    the field, are quadratic on a hostile header).
    """
    for field in headers.split_fields(header):
        if headers.field_name(field) == name:
            return headers.unfold(headers.field_value(field))
    return None


def is_report(header: bytes) -> bool:
    """True when the header section says the message is a delivery report (RFC 3464 2).

    RFC 2045 5.1 ``Content-Type: multipart/report; report-type=delivery-status``,
    parameters in any order and case, the value quoted or not, folded or not.
    A hand-written scan rather than ``email``'s header parser: the check
    needs one field and one parameter, and must stay linear in a
    stranger's input (the regular expression it replaces took 15 s on a
    250 KiB field).
    """
    value = _field_value(header, b"content-type")
    if value is None:
        return False
    media, *params = value.split(b";")
    if media.strip().lower() != b"multipart/report":
        return False
    for param in params:
        key, eq, val = param.partition(b"=")
        if eq and key.strip().lower() == b"report-type":
            return val.strip().strip(b'"').strip().lower() == b"delivery-status"
    return False


def notice_refusal(envelope: Envelope, header: bytes) -> str | None:
    """Why no bounce or delay notice may be sent for this message; None when one may.

    Backscatter: the envelope sender is whatever the client claimed.  A
    notice goes to it only when the checks at reception vouch for it: SPF
    passed for the MAIL FROM domain, or DMARC passed (the author domain
    is authenticated, through SPF or an aligned DKIM signature).  An SPF or
    DMARC ``fail`` means a forgery: never a notice then, whatever else
    passed.  ``none``, ``neutral``, ``softfail`` and the errors authenticate
    nothing, so they give no notice either.  Postfix with postsrsd, and
    Exim, bounce them all; we are stricter because a lost notice to a
    sender nothing vouches for costs little, while a notice to a forged
    one sends a stranger's text to a third party, signed by us.  Entries
    without recorded results (checks switched off, or queued by an older
    mailx under the old rules) keep the old behaviour.
    """
    if not envelope.sender:
        return "null sender"
    if envelope.kind != "forward":
        return "the message is itself one of our notices"
    if is_report(header):
        return "the message is itself a delivery report"
    spf, dmarc = envelope.spf, envelope.dmarc
    if spf is None and dmarc is None:
        return None
    if spf == _FAILED or dmarc == _FAILED:
        return f"sender not authenticated (spf={spf or '-'} dmarc={dmarc or '-'}): likely forged"
    if spf == _SENDER_AUTHENTICATED or dmarc == _SENDER_AUTHENTICATED:
        return None
    return f"sender not authenticated (spf={spf or '-'} dmarc={dmarc or '-'})"


def wants_notice(envelope: Envelope, header: bytes) -> bool:
    """Whether a bounce or delay notice may be sent for this message (see `notice_refusal`)."""
    return notice_refusal(envelope, header) is None


def returned_header(header: bytes, limit: int = MAX_RETURNED_HEADER) -> tuple[bytes, bool]:
    """The header section to return: whole fields, in order, at most ``limit`` octets in all.

    Returns it and whether any field was left out.  A field that would pass
    the limit is left out, and so is one with a line over 998 octets (RFC
    5322 2.1.1: our notice must not carry one); none is ever cut (half a
    field could end inside an encoded word or a quoted string).  The fields
    after a left-out one still count: Subject and Message-ID often come
    late.  One pass: linear in the header's size.
    """
    if len(header) <= limit and all(len(line) <= MAX_LINE for line in header.split(b"\r\n")):
        return header, False
    kept: list[bytes] = []
    size = 0
    left_out = False

    def take(lines: list[bytes]) -> None:
        nonlocal size, left_out
        octets = sum(len(line) + 2 for line in lines)
        if size + octets > limit or any(len(line) > MAX_LINE for line in lines):
            left_out = True
            return
        kept.extend(lines)
        size += octets

    field: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
            continue
        if field:
            take(field)
        field = [line] if line else []
    if field:
        take(field)
    return b"".join(line + b"\r\n" for line in kept), left_out


def _date(when: float) -> str:
    return formatdate(when, localtime=True)


def _status(recipient: Recipient, default: str) -> str:
    return recipient.status or default


def _recipient_fields(
    recipient: Recipient, action: str, default_status: str, will_retry_until: float | None
) -> list[str]:
    out = []
    if recipient.original and recipient.original != recipient.address:
        # RFC 3464 2.3.1: the address as the sender gave it, before our alias.
        out.append(f"Original-Recipient: rfc822;{_ascii(recipient.original)}")
    out.append(f"Final-Recipient: rfc822;{_ascii(recipient.address)}")
    out.append(f"Action: {action}")
    out.append(f"Status: {_status(recipient, default_status)}")
    if recipient.remote_mta:
        out.append(f"Remote-MTA: dns;{_ascii(recipient.remote_mta)}")
    if recipient.last_reply:
        # RFC 3464 2.3.6: "smtp" diagnostics are the remote reply as received.
        out.append(f"Diagnostic-Code: smtp;{_ascii(recipient.last_reply)}")
    if recipient.last_attempt is not None:
        out.append(f"Last-Attempt-Date: {_date(recipient.last_attempt)}")
    if will_retry_until is not None:
        out.append(f"Will-Retry-Until: {_date(will_retry_until)}")
    return out


def _report(
    *,
    hostname: str,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    original_header: bytes,
    now: float,
    subject: str,
    explanation: list[str],
    action: str,
    default_status: str,
    will_retry_until: float | None,
) -> bytes:
    boundary = f"{envelope.id}.{uuid.uuid4().hex}/{hostname}"
    header, cut = returned_header(original_header)
    human = list(explanation)
    if cut:
        human += [
            "",
            f"The message's header section is longer than {MAX_RETURNED_HEADER // 1024} KiB"
            " or has over-long lines;",
            "only its first fields are returned below.",
        ]
    for r in recipients:
        human.append("")
        human.append(
            f"<{_ascii(r.address)}>"
            + (f" (sent to <{_ascii(r.original)}>)" if r.original != r.address else "")
        )
        if r.last_host:
            human.append(f"    host {_ascii(r.last_host)} said: {_ascii(r.last_reply or '')}")
        elif r.last_reply:
            human.append(f"    {_ascii(r.last_reply)}")
    per_message = [f"Reporting-MTA: dns;{hostname}", f"X-Mailx-Queue-ID: {envelope.id}"]
    if envelope.client:
        per_message.append(f"Received-From-MTA: dns;{_ascii(envelope.client)}")
    per_message.append(f"Arrival-Date: {_date(envelope.created)}")
    status_blocks = ["\r\n".join(per_message)]
    for r in recipients:
        status_blocks.append(
            "\r\n".join(_recipient_fields(r, action, default_status, will_retry_until))
        )
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_ascii(quote_path(envelope.sender))}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{envelope.id}.{uuid.uuid4().hex[:12]}@{hostname}>",
        # RFC 3834 5: an automatic response; RFC 3464 has no header of its own.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        # RFC 2045 6.4: 8bit when the returned header fields carry 8-bit octets.
        f"Content-Transfer-Encoding: {'7bit' if header.isascii() else '8bit'}",
    ]
    if header and not header.endswith(b"\r\n"):
        header += b"\r\n"
    parts = [
        "\r\n".join(head) + "\r\n\r\n",
        "This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Description: Notification\r\n",
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        "\r\n".join(human) + "\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Description: Delivery report\r\n",
        "Content-Type: message/delivery-status\r\n\r\n",
        "\r\n\r\n".join(status_blocks) + "\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Description: Undelivered message headers\r\n",
        # RFC 6522 3: the returned content may be just the header section.
        "Content-Type: text/rfc822-headers\r\n\r\n",
    ]
    return "".join(parts).encode("ascii") + header + f"\r\n--{boundary}--\r\n".encode("ascii")


def bounce_message(
    hostname: str,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    original_header: bytes,
    now: float,
) -> bytes:
    """The bounce for ``recipients`` (all failed), to ``envelope.sender``."""
    return _report(
        hostname=hostname,
        envelope=envelope,
        recipients=recipients,
        original_header=original_header,
        now=now,
        subject="Undelivered Mail Returned to Sender",
        explanation=[
            f"This is the mail system at host {hostname}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "It was forwarded by an address at this host and was refused",
            "by the next mail server, or could not reach it in time.",
        ],
        action="failed",
        default_status="5.0.0",
        will_retry_until=None,
    )


def delay_message(
    hostname: str,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    original_header: bytes,
    now: float,
    retry_until: float,
) -> bytes:
    """The delay notice for ``recipients`` (still pending), to ``envelope.sender``."""
    return _report(
        hostname=hostname,
        envelope=envelope,
        recipients=recipients,
        original_header=original_header,
        now=now,
        subject="Delayed Mail (still being retried)",
        explanation=[
            f"This is the mail system at host {hostname}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            f"Delivery will be retried until {_date(retry_until)}.",
        ],
        action="delayed",
        default_status="4.0.0",
        will_retry_until=retry_until,
    )


def reject_notice(
    hostname: str,
    queue_id: str,
    sender: str,
    mailbox: str,
    reason: str,
    original_header: bytes,
    now: float,
) -> bytes:
    """RFC 5429 2.1: the MDN (RFC 8098) telling ``sender`` that ``mailbox``'s
    Sieve script rejected the message; ``reason`` is already one safe line."""
    boundary = f"{queue_id}.{uuid.uuid4().hex}/{hostname}"
    header, _ = returned_header(original_header)
    if header and not header.endswith(b"\r\n"):
        header += b"\r\n"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_ascii(quote_path(sender))}>",
        "Subject: Message rejected by the recipient's filter",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id}R.{uuid.uuid4().hex[:12]}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=disposition-notification;"
        f'\r\n\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'7bit' if header.isascii() else '8bit'}",
    ]
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        f"Your message to <{_ascii(mailbox)}> was rejected by the recipient's filter:",
        "",
        f"    {_ascii(reason)}",
    ]
    report = [
        f"Reporting-UA: {hostname}; mailx",
        f"Final-Recipient: rfc822;{_ascii(mailbox)}",
        "Disposition: automatic-action/MDN-sent-automatically; deleted",
    ]
    parts = [
        "\r\n".join(head) + "\r\n\r\n",
        "This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        "\r\n".join(human) + "\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Type: message/disposition-notification\r\n\r\n",
        "\r\n".join(report) + "\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Type: text/rfc822-headers\r\n\r\n",
    ]
    return "".join(parts).encode("ascii") + header + f"\r\n--{boundary}--\r\n".encode("ascii")
