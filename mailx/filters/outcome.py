# -*- test-case-name: tests.test_filters_mailbox -*-
"""What a mailbox's filters decided for its copy of one message: a value.

The seam between the filters (`mailx.filters`, which run the scripts) and
the pipeline's decision (`mailx.inbound`), which turns every recipient's
outcome into copies, forwards and notices that are filed all-or-none.  No
filter configured, or any filter failure, is `KEEP`: the message lands in
INBOX (SPEC 12: no filter outcome loses a message that got 250).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Copy:
    """One copy in the mailbox.

    ``folder`` is "" for INBOX, otherwise the Maildir++ folder's name as it
    is on disk without the leading dot (``Work.Clients`` for the Sieve name
    ``Work/Clients``), already checked and in modified UTF-7.  ``flags`` are
    Maildir info letters in ASCII order (``"FS"``).
    """

    folder: str = ""
    flags: str = ""


@dataclass(frozen=True)
class VacationReply:
    """An autoreply to send: the pipeline signs it and queues it from ``<>``.

    ``memory_key`` is recorded in the vacation memory once the reply is
    queued, so that a message that is not accepted does not use up the
    sender's one reply per period.
    """

    recipient: str
    message: bytes
    memory_key: str
    seconds: int
    # The mailbox that replies (local@domain): whose memory records it.
    mailbox: str = ""


@dataclass(frozen=True)
class FilterOutcome:
    copies: tuple[Copy, ...] = (Copy(),)
    redirects: tuple[str, ...] = ()
    # The reason of a Sieve ``reject``; then ``copies`` is empty.
    reject: str | None = None
    vacation: VacationReply | None = None
    # What to log for this mailbox: discard, run-time errors, refused folder names.
    notes: tuple[str, ...] = ()


KEEP = FilterOutcome()
