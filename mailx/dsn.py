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
- our notices are sent with the null sender and come from
  ``MAILER-DAEMON@<hostname>``.

The functions are pure: queue state in, message bytes out (CRLF).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from email.utils import formatdate

from mailx.queue import Envelope, Recipient

__all__ = ["bounce_message", "delay_message", "is_report", "wants_notice"]

# RFC 5322 2.1.1: keep every line we generate well under 998 octets.
MAX_TEXT = 900
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_CONTENT_TYPE = re.compile(rb"^content-type:", re.IGNORECASE)
_REPORT = re.compile(
    rb"multipart/report\s*;.*report-type\s*=\s*\"?delivery-status", re.IGNORECASE | re.DOTALL
)


def _ascii(text: str) -> str:
    """Printable ASCII on one line (remote replies may carry anything)."""
    return _UNPRINTABLE.sub("?", text)[:MAX_TEXT]


def is_report(header: bytes) -> bool:
    """True when the header section says the message is a delivery report (RFC 3464 2)."""
    for field in _fields(header):
        if _CONTENT_TYPE.match(field):
            return bool(_REPORT.search(field))
    return False


def _fields(header: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        elif line:
            fields.append(line)
    return fields


def wants_notice(envelope: Envelope, header: bytes) -> bool:
    """Whether a bounce or delay notice may be sent for this message (see the module docstring)."""
    return bool(envelope.sender) and envelope.kind == "forward" and not is_report(header)


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
    human = list(explanation)
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
        f"To: <{_ascii(envelope.sender)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{envelope.id}.{uuid.uuid4().hex[:12]}@{hostname}>",
        # RFC 3834 5: an automatic response; RFC 3464 has no header of its own.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
    ]
    header = (
        original_header
        if original_header.endswith(b"\r\n") or not original_header
        else original_header + b"\r\n"
    )
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
