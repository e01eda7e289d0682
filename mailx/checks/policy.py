# -*- test-case-name: tests.test_policy -*-
"""What a DMARC verdict means for the message, under ``authentication.dmarc``.

A pure function (STYLE: the decisions are pure, the I/O is at the edge).
SPEC 6: SPF and DKIM results alone never refuse a message; only the
sender's DMARC policy does, and only under ``enforce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mailx.smtp import replies
from mailx.smtp.replies import Reply

if TYPE_CHECKING:
    # A type only: delivery imports Action from here for every message,
    # with or without the checks (and their dkimpy, pyspf, PSL) loaded.
    from mailx.checks.dmarc import DMARCResult

__all__ = [
    "ACCEPT",
    "ACTIONS",
    "JUNK",
    "MODES",
    "REJECT",
    "TEMPFAIL",
    "Action",
    "Decision",
    "decide",
]


class Action(StrEnum):
    """What the checks want done with a message; the values are the log's words."""

    ACCEPT = "accept"
    JUNK = "junk"  # deliver into the mailbox's .Junk Maildir++ folder
    REJECT = "reject"  # 550 5.7.1 at the end of DATA
    TEMPFAIL = "tempfail"  # 451 4.7.5: a DNS failure decides, the sender retries


ACCEPT, JUNK, REJECT, TEMPFAIL = Action.ACCEPT, Action.JUNK, Action.REJECT, Action.TEMPFAIL
ACTIONS = tuple(Action)
MODES = ("enforce", "monitor", "off")


@dataclass(frozen=True)
class Decision:
    action: Action
    reply: Reply | None  # the refusal for REJECT and TEMPFAIL, else None
    reason: str


def decide(dmarc: DMARCResult | None, mode: str) -> Decision:
    """The action for a DMARC result (None when DMARC was not evaluated).

    ``enforce``: a failure is refused when its disposition (the published
    policy after the pct sample, RFC 7489 6.6.4) is reject, filed as junk
    when quarantine (RFC 7489 6.3 p=); a temperror that could end in either
    defers with 451 so the sender retries, rather than letting the
    message through or refusing it for good; a permerror is junk.  ``monitor`` and ``off``
    always accept: monitor records the verdict, off skips DMARC.
    """
    if mode not in MODES:
        raise ValueError(f"authentication.dmarc must be one of {MODES}, not {mode!r}")
    if dmarc is None or mode == "off":
        return Decision(ACCEPT, None, "DMARC not evaluated")
    if mode == "monitor":
        return Decision(ACCEPT, None, f"monitor: dmarc={dmarc.result}")
    if dmarc.result == "fail":
        if dmarc.disposition == "reject":
            return Decision(REJECT, replies.DMARC_REJECT, f"{dmarc.from_domain} policy reject")
        if dmarc.disposition == "quarantine":
            author = dmarc.from_domain or "an undeterminable author"
            return Decision(JUNK, None, f"{author} policy quarantine")
        return Decision(ACCEPT, None, f"{dmarc.from_domain} policy none")
    if dmarc.result == "temperror" and dmarc.decided_by_temperror:
        return Decision(TEMPFAIL, replies.DNS_TEMPFAIL, dmarc.reason)
    if dmarc.result == "permerror":
        # `evaluate_dmarc` reports an undeterminable author as fail; should a
        # permerror come back all the same, it must not reach the inbox as
        # if it had passed (a forger would aim for it).
        return Decision(JUNK, None, f"dmarc=permerror: {dmarc.reason}")
    return Decision(ACCEPT, None, f"dmarc={dmarc.result}")
