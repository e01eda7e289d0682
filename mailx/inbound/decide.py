# -*- test-case-name: tests.test_decide -*-
"""What happens to one message, decided as a value: the pipeline's one decision.

After the checks, `decide` turns the routes (each recipient's destinations),
the checks' verdict, the client's DNSBL listing and each final mailbox's
filter outcome into a `Decision`: the reply, the log line's fields, and the
filing plan (the Maildir copies, the queue entries, the notices mailx
itself originates).  It is pure (no sockets, threads, disk or clock), so
it is tested on its own with hypothesis (``tests.test_decide``);
`mailx.inbound.delivery` does what it says, filing the plan all or none
(`mailx.storage.writer`).

What it renders is left to the caller: the trace fields (they carry the
time), the SRS rewriting of envelope senders (it carries a timestamp), the
notices' bodies.  The plan says which, by enums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mailx.checks.policy import Action
from mailx.filters.outcome import KEEP, FilterOutcome, VacationReply
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Route
from mailx.smtp import replies
from mailx.smtp.replies import Reply

__all__ = [
    "JUNK_FOLDER",
    "Action",
    "Content",
    "Decision",
    "Disposition",
    "Hop",
    "MailboxCopy",
    "Outgoing",
    "Sender",
    "Transport",
    "decide",
    "final_mailboxes",
]

JUNK_FOLDER = "Junk"  # as FilterOutcome's folders: the Maildir++ name without its dot
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its code.
MAX_REASON = 400


class Disposition(Enum):
    """What became of one final mailbox's share of the message, for the log."""

    DELIVERED = "delivered"  # at least one copy in the mailbox
    JUNK = "junk"  # its copy went to the Junk folder
    REDIRECTED = "redirected"  # no copy, only its filters' redirects
    REJECTED = "rejected"  # its filters rejected it (Sieve reject)
    DISCARDED = "discarded"  # its filters discarded it
    HANDED_OVER = "lmtp"  # queued for its domain's LMTP server, which files and filters it


class Transport(Enum):
    """How a queue entry's recipient is reached."""

    SMTP = "smtp"  # the domain's MX (or the smarthost)
    LMTP = "lmtp"  # a mailbox of an LMTP domain (SPEC 14): ``Hop.endpoint``


class Sender(Enum):
    """The envelope sender of a queue entry."""

    # The message's own, SRS-rewritten at our recipient's domain unless null
    # or ours (`mailx.outbound.relay.Outbound.envelope_for`), as forwards are.
    MESSAGE = "message"
    # <>: what mailx originates (RFC 3834 autoreplies, RFC 5429 notices).
    NULL = "null"


class Content(Enum):
    """What a queue entry carries."""

    MESSAGE = "message"  # the message as received, our trace fields per recipient
    VACATION = "vacation"  # the filters' `VacationReply.message`
    REJECT_NOTICE = "reject-notice"  # RFC 5429 2.1: the sender is told of a Sieve reject


@dataclass(frozen=True)
class Hop:
    """One recipient of a queue entry: where it goes, and on whose behalf.

    ``original`` is the address the message was for: the RCPT address of
    an alias forward, the mailbox's address for a redirect, a vacation or a
    notice (its domain is where SRS rewrites the sender, and it names the
    recipient in a DSN).
    """

    address: str
    original: str
    transport: Transport = Transport.SMTP
    endpoint: str | None = None  # the LMTP server's, for Transport.LMTP


@dataclass(frozen=True)
class MailboxCopy:
    """One copy in one of our mailboxes; ``folder`` "" is INBOX, else the
    Maildir++ name without its dot; ``flags`` Maildir info letters."""

    destination: MailboxDestination
    original: str  # the RCPT address that led there (X-Original-To)
    folder: str = ""
    flags: str = ""


@dataclass(frozen=True)
class Outgoing:
    """One queue entry to file with the message."""

    content: Content
    sender: Sender
    hops: tuple[Hop, ...]
    mailbox: str = ""  # for what a mailbox originates: its address
    vacation: VacationReply | None = None
    reason: str = ""  # a reject notice's reason


@dataclass(frozen=True)
class Decision:
    reply: Reply
    accepted: bool  # the reply is 250 and the plan is to be filed
    copies: tuple[MailboxCopy, ...] = ()
    outgoing: tuple[Outgoing, ...] = ()
    dispositions: tuple[tuple[str, Disposition], ...] = ()  # per final mailbox address
    log: Mapping[str, Any] = field(default_factory=dict)  # the verdict line's fields
    notes: tuple[str, ...] = ()  # worth a log line: filters' notes, notices not sent


def final_mailboxes(routes: Sequence[Route]) -> list[tuple[MailboxDestination, str]]:
    """One entry per final mailbox, whatever aliases led there (SPEC 4), with the
    RCPT address that led there: the first one when several did (one copy, one
    X-Original-To)."""
    seen: dict[tuple[str, str], tuple[MailboxDestination, str]] = {}
    for r in routes:
        for dest in r.destinations:
            if isinstance(dest, MailboxDestination):
                seen.setdefault((dest.domain, dest.mailbox), (dest, str(r.address)))
    return list(seen.values())


def _one_line(reason: str) -> str:
    """A filter's reason, safe as SMTP reply text: printable ASCII, one line, bounded."""
    text = "".join(c if " " <= c <= "~" else " " for c in reason)
    text = " ".join(text.split())[:MAX_REASON]
    return text or "Rejected by the recipient's filter"


def decide(
    queue_id: str,
    sender: str,
    routes: Sequence[Route],
    verdict: Any = None,
    *,
    listed: bool = False,
    outcomes: Mapping[str, FilterOutcome] | None = None,
    size: int = 0,
    message_id: str | None = None,
) -> Decision:
    """The decision for one message (see the module docstring).

    ``verdict`` is the checks' `mailx.checks.Verdict` (None: no checks),
    ``listed`` whether a DNSBL with action junk listed the client,
    ``outcomes`` each final mailbox's filter outcome by its address
    (missing: `KEEP`); ``size`` and ``message_id`` are for the log.
    """
    outcomes = outcomes or {}
    action = Action(verdict.action) if verdict is not None else Action.ACCEPT
    if action is Action.ACCEPT and listed:
        action = Action.JUNK
    results = verdict.log_fields() if verdict is not None else {}
    log: dict[str, Any] = {
        "qid": queue_id,
        "action": "accepted" if action in (Action.ACCEPT, Action.JUNK) else action.value,
        "size": size,
        "nrcpt": len(routes),
        "results": " ".join(f"{k}={v}" for k, v in results.items()),
        # Each method's A-R result alone, for mailx.observe.metrics.
        "checks": verdict.results() if verdict is not None else {},
        "message_id": message_id,
    }
    if action in (Action.REJECT, Action.TEMPFAIL):
        return Decision(verdict.reply, False, log=log)

    copies: list[MailboxCopy] = []
    dispositions: list[tuple[str, Disposition]] = []
    notes: list[str] = []
    forwards: dict[str, Hop] = {}
    for r in routes:
        for d in r.destinations:
            if isinstance(d, ForwardDestination):
                forwards.setdefault(d.address, Hop(d.address, str(r.address)))
    vacations: list[Outgoing] = []
    rejected: list[tuple[str, str]] = []  # (mailbox address, reason)
    handed: list[Hop] = []
    for dest, given in final_mailboxes(routes):
        if dest.lmtp is not None:
            # The LMTP server files it and runs the mailbox's filters (SPEC 14).
            handed.append(Hop(dest.address, given, Transport.LMTP, dest.lmtp))
            dispositions.append((dest.address, Disposition.HANDED_OVER))
            continue
        if action is Action.JUNK:
            # Junk is filed unfiltered: no script's redirect or autoreply acts on spam.
            copies.append(MailboxCopy(dest, given, JUNK_FOLDER))
            dispositions.append((dest.address, Disposition.JUNK))
            continue
        outcome = outcomes.get(dest.address, KEEP)
        notes.extend(f"{dest.address}: {note}" for note in outcome.notes)
        if outcome.reject is not None:
            rejected.append((dest.address, outcome.reject))
            dispositions.append((dest.address, Disposition.REJECTED))
            continue
        seen: set[tuple[str, str]] = set()
        for c in outcome.copies:
            if (c.folder, c.flags) not in seen:
                seen.add((c.folder, c.flags))
                copies.append(MailboxCopy(dest, given, c.folder, c.flags))
        for address in outcome.redirects:
            forwards.setdefault(address, Hop(address, dest.address))
        if outcome.vacation is not None:
            if sender:
                vacations.append(
                    Outgoing(
                        Content.VACATION,
                        Sender.NULL,
                        (Hop(outcome.vacation.recipient, dest.address),),
                        mailbox=dest.address,
                        vacation=outcome.vacation,
                    )
                )
            else:
                notes.append(f"{dest.address}: no vacation reply to the null sender")
        if outcome.copies:
            dispositions.append((dest.address, Disposition.DELIVERED))
        elif outcome.redirects:
            dispositions.append((dest.address, Disposition.REDIRECTED))
        else:
            dispositions.append((dest.address, Disposition.DISCARDED))

    if rejected and len(rejected) == len(dispositions) and not forwards:
        # (an LMTP mailbox is a disposition too: then not every recipient rejected)
        # RFC 5429 2.1.1: refused in the protocol, not accepted and then bounced.
        reason = _one_line(rejected[0][1])
        return Decision(
            replies.SIEVE_REJECT.with_text(reason),
            False,
            dispositions=tuple(dispositions),
            log=dict(log, action="rejected by filter"),
            notes=tuple(notes),
        )
    outgoing: list[Outgoing] = []
    if forwards or handed:
        hops = (*forwards.values(), *handed)
        outgoing.append(Outgoing(Content.MESSAGE, Sender.MESSAGE, hops))
    for mailbox, reason in rejected:
        if not sender:
            notes.append(f"{mailbox}: rejected by its filter; no notice to the null sender")
            continue
        # RFC 5429 2.1: the others got it, so it is accepted and the sender told.
        outgoing.append(
            Outgoing(
                Content.REJECT_NOTICE,
                Sender.NULL,
                (Hop(sender, mailbox),),
                mailbox=mailbox,
                reason=_one_line(reason),
            )
        )
    outgoing.extend(vacations)
    return Decision(
        replies.MESSAGE_ACCEPTED.with_text(
            replies.MESSAGE_ACCEPTED.text.format(queue_id=queue_id)
        ),
        True,
        tuple(copies),
        tuple(outgoing),
        tuple(dispositions),
        log,
        tuple(notes),
    )
