# -*- test-case-name: tests.test_policy -*-
"""Sender authentication: SPF, DKIM and DMARC on every message (SPEC 6).

`Authenticator.check` is what the SMTP layer calls at the end of DATA::

    verdict = yield authenticator.check(client_ip, helo, mail_from, message)
    if verdict.action in ("reject", "tempfail"):
        raise SMTPReplyError(verdict.reply)
    # prepend verdict.header + "\\r\\n"; verdict.action == "junk": the .Junk folder
    log.info("... {fields}", fields=verdict.log_fields())

For a signed message SPF and DKIM run at once in worker threads, then
DMARC (which needs both) in another; an unsigned one takes a single trip to
a thread.  The reactor thread only builds the header and the decision.
`check_sync` does the same inline, for ``mailxctl check-message``.

Switches (``authentication:`` in the configuration): ``spf: false`` or
``dkim: false`` skips that method, so DMARC can pass only through the
other; ``dmarc: off`` skips DMARC (no ``dmarc=`` in the header: "none"
would claim the sender published nothing); ``monitor`` evaluates and
records but always accepts; ``enforce`` acts on the policy (`policy`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from twisted.internet import defer

from mailx.auth.dkim import DKIMResult, verify_dkim
from mailx.auth.dmarc import DMARCResult, default_psl, evaluate_dmarc
from mailx.auth.policy import Decision, decide
from mailx.auth.results import build_header, is_forged_results, strip_forged_results
from mailx.auth.spf import SPFResult, check_spf
from mailx.dns import NotCached, Resolver
from mailx.replies import Reply

__all__ = [
    "AuthenticationSettings",
    "Authenticator",
    "DKIMResult",
    "DMARCResult",
    "SPFResult",
    "Verdict",
    "is_forged_results",
    "strip_forged_results",
]


class AuthenticationSettings(Protocol):
    """What `Authenticator` reads: ``mailx.config.AuthenticationConfig``."""

    spf: bool
    dkim: bool
    dmarc: str  # "enforce" | "monitor" | "off"


def _token(text: str | None) -> str:
    """A log value: sender-chosen names (d=) cannot split or forge the line."""
    return "".join(c if "!" <= c <= "~" else "?" for c in text) if text else "-"


@dataclass(frozen=True)
class Verdict:
    """Everything the checks concluded about one message."""

    spf: SPFResult | None  # None: SPF switched off
    dkim: tuple[DKIMResult, ...] | None  # None: DKIM off; (): unsigned
    dmarc: DMARCResult | None  # None: DMARC off
    action: str  # "accept" | "junk" | "reject" | "tempfail"
    reply: Reply | None  # the refusal for reject and tempfail
    header: str  # folded Authentication-Results field, no final CRLF
    reason: str = ""

    def log_fields(self) -> dict[str, str]:
        """``spf=pass:example.com dkim=pass:example.com dmarc=pass:example.com
        action=accept``: values without spaces, for the message's log line."""
        fields: dict[str, str] = {}
        if self.spf is not None:
            fields["spf"] = f"{self.spf.result}:{_token(self.spf.domain)}"
        if self.dkim is not None:
            fields["dkim"] = (
                ",".join(f"{r.result}:{_token(r.domain)}" for r in self.dkim)
                if self.dkim
                else "none"
            )
        if self.dmarc is not None:
            fields["dmarc"] = f"{self.dmarc.result}:{_token(self.dmarc.from_domain)}"
            if self.dmarc.result == "fail":
                fields["dmarc"] += f":{self.dmarc.disposition}"
        fields["action"] = self.action
        return fields

    def as_dict(self) -> dict[str, Any]:
        """Every verdict with its reason, JSON-ready: ``check-message --json``."""
        dkim = None if self.dkim is None else [asdict(r) for r in self.dkim]
        dmarc = None
        if self.dmarc is not None:
            dmarc = asdict(self.dmarc)
            dmarc["record"] = self.dmarc.record.to_text() if self.dmarc.record else None
            dmarc["author_domains"] = list(self.dmarc.author_domains)
        return {
            "spf": None if self.spf is None else asdict(self.spf),
            "dkim": dkim,
            "dmarc": dmarc,
            "action": self.action,
            "reply": None if self.reply is None else str(self.reply),
            "reason": self.reason,
            "header": self.header,
        }


def _signed(message: bytes) -> bool:
    """Whether the header section has a DKIM-Signature field."""
    header = message.split(b"\r\n\r\n", 1)[0].lower()
    return header.startswith(b"dkim-signature:") or b"\r\ndkim-signature:" in header


# How long an SPF result is reused for the same client, HELO and sender, and
# how many are kept; see Authenticator._spf.
SPF_MEMORY = 60.0
SPF_MEMORY_ENTRIES = 10_000


class Authenticator:
    """SPF, DKIM and DMARC for the messages of one server.

    ``hostname`` is the authserv-id of our Authentication-Results.
    ``rng`` draws DMARC's pct sample; ``psl`` the Public Suffix List.
    """

    def __init__(
        self,
        resolver: Resolver,
        config: AuthenticationSettings,
        hostname: str,
        *,
        psl: Any = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.config = config
        self.hostname = hostname
        # Parsing the list takes ~40 ms: once, at start-up, not per message.
        self.psl = psl if psl is not None else default_psl()
        self._rng = rng
        self._clock = clock
        self._spf_memory: dict[tuple[str, str | None, str], tuple[float, SPFResult]] = {}

    # -- the three checks, blocking (worker threads) -----------------------

    def _spf(self, client_ip: str, helo: str | None, mail_from: str) -> SPFResult | None:
        """SPF, remembered briefly for the same client, HELO and sender.

        A sender's messages come in runs (a list, a newsletter, a busy
        correspondent); evaluating the record again, even from cached DNS
        answers, costs more than the rest of a small message's handling.
        The result is a function of these three and of DNS answers that the
        resolver caches longer than ``SPF_MEMORY`` seconds in practice;
        temporary errors are never remembered.
        """
        if not self.config.spf:
            return None
        key = (client_ip, helo, mail_from)
        now = self._clock()
        remembered = self._spf_memory.get(key)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        result = check_spf(self.resolver, client_ip, helo, mail_from, receiver=self.hostname)
        if result.result != "temperror" and not self.resolver.cache_only_missed():
            if len(self._spf_memory) >= SPF_MEMORY_ENTRIES:
                self._spf_memory.clear()
            self._spf_memory[key] = (now + SPF_MEMORY, result)
        return result

    def _dkim(self, message: bytes) -> tuple[DKIMResult, ...] | None:
        if not self.config.dkim:
            return None
        return verify_dkim(self.resolver, message)

    def _dmarc(
        self, message: bytes, spf: SPFResult | None, dkim: tuple[DKIMResult, ...] | None
    ) -> DMARCResult | None:
        if self.config.dmarc == "off":
            return None
        return evaluate_dmarc(self.resolver, message, spf, dkim, psl=self.psl, rng=self._rng)

    def _verdict(
        self,
        spf: SPFResult | None,
        dkim: tuple[DKIMResult, ...] | None,
        dmarc: DMARCResult | None,
    ) -> Verdict:
        decision: Decision = decide(dmarc, self.config.dmarc)
        header = build_header(
            self.hostname, spf, dkim, dmarc, enforced=self.config.dmarc == "enforce"
        )
        return Verdict(spf, dkim, dmarc, decision.action, decision.reply, header, decision.reason)

    # -- entry points ---------------------------------------------------------

    def check(
        self, client_ip: str, helo: str | None, mail_from: str, message: bytes
    ) -> defer.Deferred[Verdict]:
        """Check a message without blocking the reactor.

        ``mail_from`` is the reverse-path without brackets ("" for the null
        sender); ``message`` the header section and, when it has
        DKIM-Signature fields, the body.  Errors from our own code fail the
        Deferred (the caller answers 451 4.3.0); DNS trouble never does.
        """
        call = self.resolver.call
        if not _signed(message):
            # With every answer cached (a sender's second message, and most
            # of every message's lookups), the checks take a fraction of a
            # millisecond: run them here, no thread, no network.
            try:
                return defer.succeed(
                    self.resolver.from_cache(self.check_sync, client_ip, helo, mail_from, message)
                )
            except NotCached:
                pass
            # Unsigned (most mail): one trip to a worker thread for all three
            # checks.  With answers in the resolver's cache they take well
            # under a millisecond, and each extra hand-off costs a GIL round
            # trip with the reactor thread (measured: three hops cost more
            # than the checks themselves).
            return call(self.check_sync, client_ip, helo, mail_from, message)
        # Signed: the key lookups and SPF's at once, then DMARC.
        both = defer.gatherResults(
            [call(self._spf, client_ip, helo, mail_from), call(self._dkim, message)],
            consumeErrors=True,
        )
        both.addErrback(
            lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f
        )

        def then(results: list[Any]) -> defer.Deferred[Verdict]:
            spf, dkim = results
            d = call(self._dmarc, message, spf, dkim)
            d.addCallback(lambda dmarc: self._verdict(spf, dkim, dmarc))
            return d

        return both.addCallback(then)


    def check_sync(
        self, client_ip: str, helo: str | None, mail_from: str, message: bytes
    ) -> Verdict:
        """`check` in the calling thread: for the CLI, never the reactor thread."""
        spf = self._spf(client_ip, helo, mail_from)
        dkim = self._dkim(message)
        return self._verdict(spf, dkim, self._dmarc(message, spf, dkim))
