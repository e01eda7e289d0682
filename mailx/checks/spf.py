# -*- test-case-name: tests.test_spf,tests.test_rfc7208_suite -*-
"""SPF (RFC 7208) through pyspf, resolving with our `mailx.dns.Resolver`.

pyspf does the evaluation: record selection, mechanisms, macros, the
10-lookup limit and the 2-void-lookup limit (RFC 7208 4.6.4).  It reaches
DNS through the module-global ``spf.DNSLookup``; rather than replace that
global for the whole process, `_Query` overrides ``query.dns`` (the one
method that calls it) so each check uses the resolver it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import spf

from mailx.dns import Resolver

__all__ = ["SPF_RESULTS", "SPFResult", "check_spf"]

# RFC 7208 2.6; RFC 8601 2.7.2 uses the same words in Authentication-Results.
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class SPFResult:
    """The SPF verdict on one identity of one SMTP transaction."""

    result: str  # one of SPF_RESULTS
    identity: str  # "mailfrom", or "helo" for the null sender (RFC 7208 2.4)
    domain: str  # the domain whose policy was checked ("" when there was none)
    sender: str  # the address checked: MAIL FROM, or postmaster@HELO
    client_ip: str
    helo: str | None
    reason: str  # why, for people and logs; never sender-supplied text
    explanation: str | None = None  # RFC 7208 6.2 exp= text, on fail only

    @property
    def passed(self) -> bool:
        return self.result == "pass"


class _Query(spf.query):
    """pyspf's query, asking our resolver instead of ``spf.DNSLookup``."""

    def __init__(self, resolver: Resolver, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._resolver = resolver

    def dns(self, name, qtype, cnames=None, ignore_void=False):  # noqa: ANN001, ANN201
        """``spf.query.dns`` with the lookup swapped; same contract.

        Returns a list of values (TXT: tuples of bytes; MX: (preference,
        name)); ``[]`` for a void lookup, counted against the limit unless
        ``ignore_void``; raises ``spf.TempError`` on temporary failures.
        CNAMEs are followed by the resolver, so pyspf's own CNAME walking
        (needed with pydns) is not repeated here.
        """
        if not name:
            raise spf.PermError("Invalid query")
        name = str(name).rstrip(".").lower()
        # RFC 7208 4.3, 4.8: a name no query can be built from is void.
        if not reduce(lambda ok, label: ok and 0 < len(label) < 64, name.split("."), True):
            return []
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            answers = self._resolver.spf_lookup(name, qtype, self.strict, self.timeout)
            result = [value for _, value in answers]
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


def check_spf(
    resolver: Resolver,
    client_ip: str,
    helo: str | None,
    mail_from: str,
    *,
    receiver: str = "unknown",
    default_explanation: str | None = None,
) -> SPFResult:
    """Check the MAIL FROM identity, or HELO for the null sender (RFC 7208 2.4).

    ``mail_from`` is the reverse-path without angle brackets, "" for the
    null sender.  Blocks on DNS: call from a worker thread.
    """
    helo = helo or None
    if mail_from:
        identity, sender = "mailfrom", mail_from
    else:
        identity, sender = "helo", f"postmaster@{helo}" if helo else ""
    domain = _domain_of(sender) if sender else ""

    def result(res: str, reason: str, explanation: str | None = None) -> SPFResult:
        return SPFResult(res, identity, domain, sender, client_ip, helo, reason, explanation)

    if not domain:
        # RFC 7208 2.4: nothing to check without a HELO for the null sender.
        return result("none", "no identity to check (null sender without HELO)")
    try:
        q = _Query(resolver, i=client_ip, s=mail_from, h=helo or "", receiver=receiver)
        if default_explanation is not None:
            q.set_default_explanation(default_explanation)
        res, _code, explanation = q.check()
    except spf.PermError as e:  # raised by pyspf's constructor for a bad IP
        return result("permerror", f"cannot check: {e}")
    except Exception as e:  # noqa: BLE001 - a pyspf bug must not lose mail
        # Temporary on purpose: the sender retries; a permanent verdict
        # here could let DMARC refuse a message over our own fault.
        return result("temperror", f"SPF evaluation error: {type(e).__name__}: {e}")
    res = {"ambiguous": "neutral"}.get(res, res)
    return result(res, _reason(res, q, client_ip, sender), explanation if res == "fail" else None)


def _reason(res: str, q: spf.query, client_ip: str, sender: str) -> str:
    """A short account in our words (RFC 7208 9.1 "Received-SPF" style)."""
    problem = getattr(q, "prob", None)
    if res == "pass":
        return f"{client_ip} is permitted to send for {sender}"
    if res in ("fail", "softfail"):
        return f"{client_ip} is not permitted to send for {sender}"
    if res == "neutral":
        return f"{sender}'s policy neither permits nor denies {client_ip}"
    if res == "none":
        return f"no SPF record for {_domain_of(sender)}"
    if res == "temperror":
        return f"temporary DNS error: {problem}" if problem else "temporary DNS error"
    return f"policy error: {problem}" if problem else "permanent error in SPF policy"
