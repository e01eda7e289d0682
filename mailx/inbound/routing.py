# -*- test-case-name: tests.test_routing -*-
"""Where an address goes (SPEC section 4), as pure functions over a Config.

Routing runs on every RCPT, so `Router` expands every mailbox and alias of a
configuration once, up front; routing an address is then a parse and a few
dictionary lookups.  The same expansion code audits a configuration while it
is loaded (`audit_domains`), so the loader and the router can never disagree
about what an alias means.

Lookup order for ``local+tag@domain``, as Postfix does it: the full local
part (so a mailbox literally named ``alice+news`` wins), then the local part
with the subaddress stripped, each as a mailbox and then an alias; then the
domain's catch-all ``*``.  Alias targets must name a mailbox or alias
explicitly: the catch-all never swallows an alias target, so a typo in an
alias is a load-time error instead of mail silently going to the catch-all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailx.address import Address, parse_address, split_subaddress
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError

if TYPE_CHECKING:
    from mailx.config import Config, DomainConfig



@dataclass(frozen=True)
class MailboxDestination:
    """One of our mailboxes: a Maildir, or handed to the domain's LMTP server (SPEC 14).

    ``lmtp`` is the domain's LMTP endpoint when it has one; it does not take
    part in equality, so a mailbox is the same mailbox however it is filed.
    """

    domain: str
    mailbox: str
    lmtp: str | None = field(default=None, compare=False)

    @property
    def address(self) -> str:
        """The final address, for Delivered-To."""
        return f"{self.mailbox}@{self.domain}"

    def maildir_path(self, config: Config) -> Path:
        """``<paths.mail>/<domain>/<mailbox>`` (SPEC section 7)."""
        return config.paths.mail / self.domain / self.mailbox


@dataclass(frozen=True)
class ForwardDestination:
    """An outside address an alias forwards to (SPEC section 8)."""

    address: str


Destination = MailboxDestination | ForwardDestination


@dataclass(frozen=True)
class Route:
    """Where mail for ``address`` goes, and the steps that decided it."""

    address: Address
    destinations: tuple[Destination, ...]
    trace: tuple[str, ...]


class RouteRefused(SMTPReplyError):
    """An `SMTPReplyError` that also carries the routing steps taken, for ``mailxctl route``."""

    def __init__(self, reply: replies.Reply, trace: Iterable[str]) -> None:
        super().__init__(reply)
        self.trace = tuple(trace)


@dataclass(frozen=True)
class Finding:
    """Something `audit_domains` found; the config loader decides what is an error.

    kind is ``loop``, ``unknown`` (dangling target), ``forward`` (a target
    outside our domains) or ``postmaster`` (the domain has none).  alias and
    index locate the alias target concerned (None for ``postmaster``).
    """

    kind: str
    domain: str
    alias: str | None
    index: int | None
    message: str


@dataclass(frozen=True)
class _Expansion:
    destinations: tuple[Destination, ...]
    trace: tuple[str, ...]


def _unique(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


class _Expander:
    """Expands mailboxes and aliases recursively, memoized, recording findings."""

    def __init__(self, domains: Mapping[str, DomainConfig], mail_root: Path | None) -> None:
        self._domains = domains
        self._mail_root = mail_root
        self._memo: dict[tuple[str, str], _Expansion] = {}
        self._stack: list[tuple[str, str]] = []
        self._loops: set[frozenset[tuple[str, str]]] = set()
        self.findings: list[Finding] = []
        self.first_domain = next(iter(domains), None)

    def own_postmaster(self, domain: str) -> str | None:
        """The name postmaster@``domain`` reaches without the fallback: its own or the catch-all."""
        found = self.lookup(domain, "postmaster")
        if found is not None:
            return found[0]
        return "*" if "*" in self._domains[domain].aliases else None

    def postmaster_fallback(self, domain: str, local: str) -> tuple[str, str, str] | None:
        """SPEC 4: postmaster@``domain`` without its own goes to the first domain's postmaster.

        RFC 5321 4.5.1 wants postmaster at every domain we accept mail for;
        the first domain's is the one a bare <postmaster> reaches, so it is
        the administrator's.  Returns (canonical domain, name, trace line), or
        None if ``local`` is not postmaster or the domain has its own.
        """
        base, _ = split_subaddress(local, self._domains[domain].subaddress_delimiter)
        if "postmaster" not in (local, base) or self.own_postmaster(domain) is not None:
            return None
        first = self.canonical(self.first_domain) if self.first_domain else None
        if first is None or first == domain:
            return None
        name = self.own_postmaster(first)
        if name is None:
            return None
        return (
            first,
            name,
            f"{domain} has no postmaster: postmaster@{domain} goes to the first domain's,"
            f" postmaster@{self.first_domain} (SPEC section 4, RFC 5321 section 4.5.1)",
        )

    def canonical(self, domain: str) -> str | None:
        """The domain whose mailboxes serve ``domain``, or None if it is not ours."""
        config = self._domains.get(domain)
        if config is None:
            return None
        if config.alias_of is None:
            return domain
        target = self._domains.get(config.alias_of)
        if target is None or target.alias_of is not None:
            return None
        return config.alias_of

    def _names(self, domain: str, name: str) -> bool:
        config = self._domains[domain]
        return name in config.mailboxes or (name != "*" and name in config.aliases)

    def lookup(self, domain: str, local: str) -> tuple[str, tuple[str, ...]] | None:
        """The mailbox or alias name ``local`` means in canonical ``domain``, without the catch-all."""
        if self._names(domain, local):
            return local, ()
        base, tag = split_subaddress(local, self._domains[domain].subaddress_delimiter)
        if tag and self._names(domain, base):
            return base, (f"'{local}' → '{base}' (subaddress '{tag}' stripped)",)
        return None

    def expand(self, domain: str, name: str) -> _Expansion:
        """Everything mailbox or alias ``name`` of canonical ``domain`` delivers to."""
        key = (domain, name)
        if key in self._memo:
            return self._memo[key]
        config = self._domains[domain]
        if name in config.mailboxes:
            lmtp = config.lmtp
            if lmtp is not None:
                where = f"LMTP {lmtp} (the LMTP server files it and runs the mailbox's filters)"
            else:
                where = str(self._mail_root / domain / name if self._mail_root else f"{domain}/{name}")
            expansion = _Expansion(
                (MailboxDestination(domain, name, lmtp),),
                (f"{name}@{domain} is a mailbox → {where}",),
            )
        else:
            targets = config.aliases[name]
            what = f"catch-all *@{domain}" if name == "*" else f"{name}@{domain} is an alias"
            trace = [f"{what} → {', '.join(targets)}"]
            found: list[Destination] = []
            self._stack.append(key)
            for index, target in enumerate(targets):
                sub = self._target(domain, name, index, target)
                if sub is not None:
                    found.extend(sub.destinations)
                    trace.extend(sub.trace)
            self._stack.pop()
            destinations = _unique(found)
            for twice in _unique(d for d in found if found.count(d) > 1):
                trace.append(f"{twice.address} reached more than once → one copy")
            expansion = _Expansion(destinations, _unique(trace))
        self._memo[key] = expansion
        return expansion

    def _target(self, domain: str, alias: str, index: int, target: str) -> _Expansion | None:
        steps: tuple[str, ...] = ()
        if "@" in target:
            address = parse_address(target)
            target_domain = self.canonical(address.domain)
            if target_domain is None:
                self.findings.append(
                    Finding(
                        "forward", domain, alias, index, f"forwards to outside address {target}"
                    )
                )
                return _Expansion(
                    (ForwardDestination(target),), (f"{target} is an outside address → forwarded",)
                )
            if target_domain != address.domain:
                steps = (f"{address.domain} is an alias of {target_domain}",)
            local = address.local
        else:
            target_domain, local = domain, target
        found = self.lookup(target_domain, local)
        if found is None:
            fallback = self.postmaster_fallback(target_domain, local)
            if fallback is None:
                self._unknown(domain, alias, index, target, target_domain, local)
                return None
            target_domain, fallback_name, step = fallback
            found = (fallback_name, (step,))
        name, more = found
        key = (target_domain, name)
        if key in self._stack:
            self._loop(domain, alias, index, key)
            return None
        sub = self.expand(target_domain, name)
        return _Expansion(sub.destinations, steps + more + sub.trace)

    def _unknown(
        self, domain: str, alias: str, index: int, target: str, target_domain: str, local: str
    ) -> None:
        config = self._domains[target_domain]
        names = sorted(config.mailboxes | (config.aliases.keys() - {"*"}))
        import difflib  # only a wrong configuration needs a suggestion

        close = difflib.get_close_matches(local, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.findings.append(
            Finding("unknown", domain, alias, index, f"unknown mailbox '{target}'{hint}")
        )

    def _loop(self, domain: str, alias: str, index: int, key: tuple[str, str]) -> None:
        cycle = [*self._stack[self._stack.index(key) :], key]
        if frozenset(cycle) in self._loops:
            return
        self._loops.add(frozenset(cycle))
        shown = " → ".join(n if d == domain else f"{n}@{d}" for d, n in cycle)
        self.findings.append(Finding("loop", domain, alias, index, f"alias loop: {shown}"))


def audit_domains(domains: Mapping[str, DomainConfig]) -> tuple[Finding, ...]:
    """Expand every alias of ``domains`` and report loops, dangling and outside targets.

    Also reports a first domain whose postmaster does not resolve (mailbox,
    alias or catch-all): it receives a bare <postmaster> and the postmaster
    mail of every domain without its own (SPEC section 4), so RFC 5321 4.5.1
    is met for all domains at once.  Another domain without a postmaster is
    fine.  The config loader runs this on domains that passed their own
    checks; `Router` relies on it having found nothing (forwards aside).
    """
    expander = _Expander(domains, None)
    for name, config in domains.items():
        if expander.canonical(name) == name:
            for alias in config.aliases:
                expander.expand(name, alias)
    first = expander.first_domain
    canonical = expander.canonical(first) if first is not None else None
    if first is not None and canonical is not None and expander.own_postmaster(canonical) is None:
        expander.findings.append(
            Finding(
                "postmaster",
                first,
                None,
                None,
                f"postmaster@{first} goes nowhere: add a mailbox or an alias 'postmaster'"
                " (RFC 5321 section 4.5.1; the first domain's postmaster also receives"
                " bare <postmaster> and that of domains without their own)",
            )
        )
    return tuple(expander.findings)


class Router:
    """A configuration's routing, precomputed: `route` costs a parse and a few lookups.

    Immutable once built, so one Router can serve every session and thread.
    """

    def __init__(self, config: Config) -> None:
        self._domains = config.domains
        self._expander = _Expander(config.domains, config.paths.mail)
        for name, domain in config.domains.items():
            if self._expander.canonical(name) == name:
                for mailbox in domain.mailboxes:
                    self._expander.expand(name, mailbox)
                for alias in domain.aliases:
                    self._expander.expand(name, alias)
        self.postmaster_domain = next(iter(config.domains))

    def postmaster_falls_back(self, domain: str) -> bool:
        """Does postmaster@``domain`` go to the first domain's postmaster (SPEC section 4)?"""
        canonical = self._expander.canonical(domain)
        return (
            canonical is not None
            and self._expander.postmaster_fallback(canonical, "postmaster") is not None
        )

    def expansion(self, domain: str, name: str) -> tuple[Destination, ...]:
        """Where mailbox or alias ``name`` of (canonical) ``domain`` delivers; for summaries."""
        return self._expander.expand(domain, name).destinations

    def route(self, address: str | Address) -> Route:
        """Route one recipient; raises `RouteRefused` (an `SMTPReplyError`) or `AddressError`."""
        trace: list[str] = []
        if isinstance(address, str) and address.lower() == "postmaster":
            # RFC 5321 4.1.1.3 and 4.5.1: <Postmaster> without a domain, any case.
            address = Address("postmaster", self.postmaster_domain)
            trace.append(
                f"bare 'postmaster' is the first domain's: {address} (RFC 5321 section 4.5.1)"
            )
        elif isinstance(address, str):
            address = parse_address(address)
        domain = self._expander.canonical(address.domain)
        if domain is None:
            trace.append(f"{address.domain} is not one of our domains")
            raise RouteRefused(replies.RELAY_DENIED, trace)
        if domain == address.domain:
            trace.append(f"{domain} is a local domain")
        else:
            trace.append(f"{address.domain} is an alias of {domain}")
        found = self._expander.lookup(domain, address.local)
        fallback = self._expander.postmaster_fallback(domain, address.local)
        if found is not None:
            name, steps = found
            trace.extend(steps)
        elif fallback is not None:
            domain, name, step = fallback
            trace.append(step)
        elif "*" in self._domains[domain].aliases:
            name = "*"
            trace.append(
                f"'{address.local}' is not a mailbox or alias of {domain}: the catch-all applies"
            )
        else:
            trace.append(
                f"'{address.local}' is not a mailbox or alias of {domain}, and there is no catch-all"
            )
            raise RouteRefused(replies.UNKNOWN_RECIPIENT, trace)
        expansion = self._expander.expand(domain, name)
        return Route(address, expansion.destinations, (*trace, *expansion.trace))


def route(config: Config, address: str | Address) -> Route:
    """Where mail for ``address`` goes under ``config`` (SPEC section 4), for one-off
    lookups (tools, tests): it expands the whole configuration each time, so the
    server's parts route through the Router their owner built for the configuration
    (`mailx.inbound.delivery.DeliveryContext.router`, shared with the Outbound).

    Raises `SMTPReplyError` (a `RouteRefused`) with RELAY_DENIED for a domain
    that is not ours and UNKNOWN_RECIPIENT for a local part that matches
    nothing, and `AddressError` for bad syntax.  The bare address
    ``postmaster`` is the first configured domain's postmaster.
    """
    return Router(config).route(address)
