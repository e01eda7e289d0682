# -*- test-case-name: tests.test_policy -*-
"""Sender authentication: SPF, DKIM and DMARC on every message (SPEC 6).

`Authenticator.check` is what the SMTP layer calls at the end of DATA::

    verdict = yield authenticator.check(client_ip, helo, mail_from, message)
    if verdict.action in ("reject", "tempfail"):
        raise SMTPReplyError(verdict.reply)
    # prepend verdict.header + "\\r\\n"; verdict.action == "junk": the .Junk folder
    log.info("... {fields}", fields=verdict.log_fields())

SPF and DKIM run at once in worker threads, then DMARC (which needs both)
in another; the reactor thread only builds the header and the decision.
`check_sync` does the same inline, for ``mailxctl check-message``.

Switches (``authentication:`` in the configuration): ``spf: false`` or
``dkim: false`` skips that method, so DMARC can pass only through the
other; ``dmarc: off`` skips DMARC (no ``dmarc=`` in the header: "none"
would claim the sender published nothing); ``monitor`` evaluates and
records but always accepts; ``enforce`` acts on the policy (`policy`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from twisted.internet import defer

from mailx.auth.dkim import DKIMResult, verify_dkim
from mailx.auth.dmarc import DMARCResult, default_psl, evaluate_dmarc
from mailx.auth.policy import Decision, decide
from mailx.auth.results import build_header, is_forged_results, strip_forged_results
from mailx.auth.spf import SPFResult, check_spf
from mailx.dns import Resolver
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
    ) -> None:
        self.resolver = resolver
        self.config = config
        self.hostname = hostname
        # Parsing the list takes ~40 ms: once, at start-up, not per message.
        self.psl = psl if psl is not None else default_psl()
        self._rng = rng

    # -- the three checks, blocking (worker threads) -----------------------

    def _spf(self, client_ip: str, helo: str | None, mail_from: str) -> SPFResult | None:
        if not self.config.spf:
            return None
        return check_spf(self.resolver, client_ip, helo, mail_from, receiver=self.hostname)

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
