# -*- test-case-name: tests.test_dmarc -*-
"""DMARC (RFC 7489) on the Public Suffix List and our resolver.

Written here rather than on the ``dmarc`` package, which aligns without a
PSL, ignores ``pct`` and does no organizational-domain fallback (research
notes, section 8).  The record parser and alignment are pure functions;
`evaluate_dmarc` adds the DNS lookups of policy discovery.

Decisions the RFC leaves open, taken here:

- An author that cannot be determined (RFC 7489 6.6.1: no From field,
  several From fields, an address without a usable domain, a field past
  the parser's bounds) fails DMARC: every usable domain it names is
  evaluated as failing under its own policy, the strictest wins, and the
  disposition is at least quarantine.  Passing is not enough: a second
  From field above a signed one keeps the DKIM pass while the reader sees
  the forged one; and a forger must not escape a policy by making the
  author undeterminable (a permerror was accepted into the inbox).
- Several addresses in one From field (legal, RFC 5322 3.6.2): every
  author domain is checked and the worst outcome decides, a failure with
  the strictest policy first; all must pass.  A DKIM signature covers the
  whole field, so no address can be added to a signed one.
- A temporary DNS failure is ``temperror`` only where it matters: the
  record lookup itself, or an SPF/DKIM temperror on an identifier that
  would align.  ``decided_by_temperror`` says whether the outcome could
  be a quarantine or reject once DNS answers; the policy then defers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from mailx import headers
from mailx.address import AddressError, normalize_domain
from mailx.checks.dkim import DKIMResult
from mailx.checks.spf import SPFResult
from mailx.dns import DNSTemporaryError, DNSVoidError, NXDomainError, Resolver

__all__ = [
    "DMARCRecord",
    "DMARCRecordError",
    "DMARCResult",
    "POLICIES",
    "aligned",
    "author_domains",
    "default_psl",
    "evaluate_dmarc",
    "organizational_domain",
    "parse_record",
]

POLICIES = ("none", "quarantine", "reject")
# RFC 7489 6.6.4: outside the pct sample, the next lower policy applies.
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
# rua/ruf: RFC 7489 6.4 dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ]
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,]+(?:![0-9]+[kmgtKMGT]?)?")


class DMARCRecordError(ValueError):
    """The text is not a DMARC record (it does not begin with v=DMARC1)."""


@dataclass(frozen=True)
class DMARCRecord:
    """A parsed ``_dmarc`` TXT record (RFC 7489 6.3), defaults applied."""

    p: str | None  # None: absent or invalid (RFC 7489 6.6.3 step 6)
    sp: str | None = None  # subdomain policy; None: same as p
    np: str | None = None  # non-existent subdomain policy (RFC 9091)
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    sp_invalid: bool = False  # sp= present with an unknown value

    def to_text(self) -> str:
        """The record as it would be published (round-trips through parse)."""
        tags = ["v=DMARC1"]
        if self.p is not None:
            tags.append(f"p={self.p}")
        if self.sp is not None:
            tags.append(f"sp={self.sp}")
        if self.np is not None:
            tags.append(f"np={self.np}")
        tags += [f"pct={self.pct}", f"adkim={self.adkim}", f"aspf={self.aspf}"]
        if self.rua:
            tags.append("rua=" + ",".join(self.rua))
        if self.ruf:
            tags.append("ruf=" + ",".join(self.ruf))
        return "; ".join(tags)

    @property
    def has_valid_rua(self) -> bool:
        return any(_URI.fullmatch(uri) for uri in self.rua)


def parse_record(text: str) -> DMARCRecord:
    """Parse a DMARC record; raise `DMARCRecordError` if it is not one.

    RFC 7489 6.3: v=DMARC1 must be the first tag, exactly; unknown tags
    are ignored; a bad value for an optional tag yields its default.  Tag
    names are case-insensitive (RFC 5234 quoted strings), so are the
    policy words; the first occurrence of a repeated tag wins.
    """
    parts = [part.strip(" \t\r\n") for part in text.split(";")]
    first = parts[0].split("=", 1)
    if len(first) != 2 or first[0].strip(" \t").lower() != "v" or first[1].strip(" \t") != "DMARC1":
        raise DMARCRecordError("not a DMARC record: it must begin with v=DMARC1")
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(" \t").lower(), value.strip(" \t"))

    def policy(name: str) -> str | None:
        value = tags.get(name, "").lower()
        return value if value in POLICIES else None

    pct_text = tags.get("pct", "")
    pct = int(pct_text) if pct_text.isascii() and pct_text.isdigit() and len(pct_text) <= 3 else 100
    return DMARCRecord(
        p=policy("p"),
        sp=policy("sp"),
        np=policy("np"),
        pct=pct if 0 <= pct <= 100 else 100,
        adkim=_mode(tags.get("adkim")),
        aspf=_mode(tags.get("aspf")),
        rua=_uris(tags.get("rua")),
        ruf=_uris(tags.get("ruf")),
        sp_invalid="sp" in tags and policy("sp") is None,
    )


def _mode(value: str | None) -> str:
    return "s" if value is not None and value.lower() == "s" else "r"


def _uris(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(u.strip(" \t") for u in value.split(",") if u.strip(" \t"))


@lru_cache(maxsize=1)
def default_psl() -> PublicSuffixList:
    """The full list, private section included: github.io users are separate
    organizations (research notes 8; ICANN-only would align them)."""
    return PublicSuffixList()


def _domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


def organizational_domain(domain: str, psl: PublicSuffixList | None = None) -> str:
    """RFC 7489 3.2: the public suffix plus one label; a suffix is its own."""
    domain = _domain(domain)
    return (psl or default_psl()).privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: str, psl: PublicSuffixList | None = None) -> bool:
    """RFC 7489 3.1: strict is the same name; relaxed, the same organization."""
    a, b = _domain(identifier), _domain(author)
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and organizational_domain(a, psl) == organizational_domain(b, psl)


# Bounds on what a stranger's From fields cost us (docs/security.md).  Past
# them the author cannot be determined (RFC 7489 6.6.1) and DMARC fails.
MAX_FROM_FIELD = 4096  # octets of one From field value; real ones are < 200
MAX_FROM_FIELDS = 5  # From fields read; more than one is already a failure
MAX_AUTHOR_DOMAINS = 10  # distinct domains whose policy is looked up


def author_domains(message: bytes) -> tuple[tuple[str, ...], int, str | None]:
    """The RFC5322.From domains, the number of From fields, and any problem.

    Only the header section of ``message`` is read.  Domains are A-labels
    (IDNA2008, `mailx.inbound.routing.normalize_domain`, as everywhere in mailx),
    lower case, each once, in order; every usable one is returned even when
    there is a problem, so that each named domain's policy still applies.
    A problem (no From, several, an address without a usable domain, a
    field past the bounds) means the author cannot be determined.  Its text
    is ours: no sender text goes into it (it reaches Authentication-Results).
    """
    fields, count = headers.field_values(
        headers.header_section(message), b"from", limit=MAX_FROM_FIELDS
    )
    if not count:
        return (), 0, "no From header field"
    problem = f"{count} From header fields" if count > 1 else None
    domains: list[str] = []
    for value in fields:
        if len(value) > MAX_FROM_FIELD:
            problem = problem or f"From header field over {MAX_FROM_FIELD} octets"
            continue
        found = headers.mailbox_domains(value.decode("utf-8", "replace"))
        if not found:
            problem = problem or "From header field without an address"
        for text in found:
            domain = _author_domain(text)
            if domain is None:
                problem = problem or "From address without a usable domain"
            elif domain not in domains:
                if len(domains) == MAX_AUTHOR_DOMAINS:
                    problem = problem or f"more than {MAX_AUTHOR_DOMAINS} author domains"
                    break
                domains.append(domain)
    return tuple(domains), count, problem


def _author_domain(text: str | None) -> str | None:
    """A From address's domain as an A-label, None when it is not a domain name
    with a dot (a single label is no registered domain: no policy to find)."""
    if not text:
        return None
    try:
        domain = normalize_domain(text.strip().rstrip("."))
    except AddressError:
        return None
    return domain if "." in domain else None


@dataclass(frozen=True)
class DMARCResult:
    """The DMARC verdict on a message, for policy, logs and A-R."""

    result: str  # pass, fail, none, temperror, permerror
    from_domain: str | None  # header.from: the author domain that decided
    reason: str
    policy: str | None = None  # published policy that applies (p, sp or np)
    disposition: str = "none"  # what the policy asks for after pct (RFC 7489 6.6.4)
    org_domain: str | None = None
    record_domain: str | None = None  # where the record was found
    record: DMARCRecord | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    decided_by_temperror: bool = False  # retrying could end in quarantine/reject
    author_domains: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def _records_at(resolver: Resolver, domain: str) -> list[DMARCRecord]:
    """RFC 7489 6.6.3 steps 1-2: the DMARC records at _dmarc.<domain>."""
    try:
        texts = resolver.txt(f"_dmarc.{domain}")
    except DNSVoidError:
        return []
    records = []
    for text in texts:
        try:
            records.append(parse_record(text))
        except DMARCRecordError:
            continue
    return records


def _nonexistent(resolver: Resolver, domain: str) -> bool:
    """RFC 9091 4.1: the name does not exist in DNS (NXDOMAIN)."""
    try:
        resolver.query(domain, "A")
    except NXDomainError:
        return True
    except (DNSVoidError, DNSTemporaryError):
        return False  # exists (NODATA) or unknown: sp applies, not np
    return False


def evaluate_dmarc(
    resolver: Resolver,
    message: bytes,
    spf: SPFResult | None,
    dkim: Sequence[DKIMResult] | None,
    *,
    psl: PublicSuffixList | None = None,
    rng: Callable[[], float] = random.random,
) -> DMARCResult:
    """DMARC for ``message`` given its SPF and DKIM results (None: not checked).

    With SPF switched off only DKIM can pass, and vice versa.  ``rng``
    draws the pct sample (RFC 7489 6.6.4), a float in [0, 1).  Blocks on
    DNS: call from a worker thread.
    """
    psl = psl or default_psl()
    domains, count, problem = author_domains(message)
    broken = problem is not None
    results = [_evaluate(resolver, d, spf, dkim or (), psl, rng, broken) for d in domains]
    if not results:
        # RFC 7489 6.6.1: no author to check; never a pass, never ignored.
        return DMARCResult("fail", None, problem or "", disposition="quarantine")
    worst = min(results, key=_severity)
    note = f" ({count} From fields)" if count > 1 else ""
    if len(domains) > 1:
        note += f" ({len(domains)} author domains, the worst decides)"
    reason = worst.reason + note
    if broken:
        reason = f"{problem}: the author cannot be determined (RFC 7489 6.6.1); {reason}"
        if worst.result == "fail" and worst.disposition == "none":
            worst = replace(worst, disposition="quarantine")
    return replace(worst, reason=reason, author_domains=domains)


def _severity(r: DMARCResult) -> tuple[int, int]:
    """Order for several author domains: what acts first, then the result."""
    if r.result == "fail" and r.disposition == "reject":
        act = 0
    elif r.result == "fail" and r.disposition == "quarantine":
        act = 1
    elif r.result == "temperror" and r.decided_by_temperror:
        act = 2
    else:
        act = 3
    return act, ("fail", "temperror", "permerror", "none", "pass").index(r.result)


def _evaluate(
    resolver: Resolver,
    domain: str,
    spf: SPFResult | None,
    dkim: Sequence[DKIMResult],
    psl: PublicSuffixList,
    rng: Callable[[], float],
    broken: bool = False,
) -> DMARCResult:
    """One author domain; ``broken``: the From fields are (RFC 7489 6.6.1), so the
    message fails whatever aligns (a second From field above a signed one
    keeps the DKIM pass: a replayed signature must not carry a forged
    author), under this domain's policy, and no less than quarantine."""
    org = organizational_domain(domain, psl)
    base = DMARCResult("none", domain, "", org_domain=org)
    spf_domain = spf.domain if spf is not None and spf.passed and spf.domain else None
    dkim_domains = [r.domain for r in dkim if r.passed and r.domain]

    def aligned_pass(aspf: str, adkim: str) -> tuple[bool, bool]:
        s = spf_domain is not None and aligned(spf_domain, domain, aspf, psl)
        d = any(aligned(d, domain, adkim, psl) for d in dkim_domains)
        return s, d

    # Policy discovery, RFC 7489 6.6.3.
    try:
        records, where = _records_at(resolver, domain), domain
        if not records and org != domain:
            records, where = _records_at(resolver, org), org
    except DNSTemporaryError as e:
        s, d = aligned_pass("s", "s")  # passes under any alignment mode?
        return replace(
            base,
            result="temperror",
            reason=f"DMARC record lookup failed: {e}",
            spf_aligned=s,
            dkim_aligned=d,
            decided_by_temperror=broken or not (s or d),
        )
    if broken:
        # Without a usable policy still a failure (at least quarantine, by the caller).
        base = replace(base, result="fail")
    if not records:
        return replace(base, reason=f"no DMARC record for {domain}")
    if len(records) > 1:
        # Step 5: several records: discovery ends, DMARC does not apply.
        return replace(base, record_domain=where, reason=f"several DMARC records at _dmarc.{where}")
    record = records[0]
    if record.p is None or record.sp_invalid:
        if not record.has_valid_rua:  # step 6.2
            return replace(base, record_domain=where, reason="DMARC record without a valid p=")
        record = replace(record, p="none", sp=None, sp_invalid=False)  # step 6.1
    if where == domain:
        policy = record.p
    else:
        policy = record.sp or record.p  # RFC 7489 6.3 sp
        if record.np is not None and _nonexistent(resolver, domain):
            policy = record.np  # RFC 9091 4
    base = replace(base, record_domain=where, record=record, policy=policy)

    # Identifier alignment, RFC 7489 3.1 and 6.6.2.
    s, d = aligned_pass(record.aspf, record.adkim)
    base = replace(base, spf_aligned=s, dkim_aligned=d)
    if (s or d) and not broken:
        how = " and ".join(n for n, ok in (("SPF", s), ("DKIM", d)) if ok)
        return replace(base, result="pass", reason=f"{how} aligned with {domain}")

    pending = []
    if (
        spf is not None
        and spf.result == "temperror"
        and aligned(spf.domain, domain, record.aspf, psl)
    ):
        pending.append("SPF")
    if any(
        r.result == "temperror" and r.domain and aligned(r.domain, domain, record.adkim, psl)
        for r in dkim
    ):
        pending.append("DKIM")
    if pending and not broken:
        return replace(
            base,
            result="temperror",
            reason=f"{' and '.join(pending)} temporarily unavailable for {domain}",
            decided_by_temperror=policy in ("quarantine", "reject"),
        )

    disposition = policy or "none"
    sampled = True
    if disposition != "none" and record.pct < 100:
        sampled = rng() * 100 < record.pct
        if not sampled:
            disposition = _LOWER[disposition]
    if broken:
        reason = f"{domain} is named as an author; policy {policy}"
    else:
        reason = f"no aligned SPF or DKIM pass for {domain}; policy {policy}"
    if not sampled:
        reason += f", outside pct={record.pct} sample: {disposition}"
    return replace(base, result="fail", disposition=disposition, reason=reason)
