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

Strangers choose how slow their DNS answers, so the checks are bounded:
all of one message's end by ``authentication.timeout`` (then 451 4.7.5,
and every lookup still to come fails at once, see `mailx.dns.Deadline`);
at most ``concurrency_per_ip`` messages of one client (IPv6: one /64) are
checked at a time and ``max_checks`` in all, the waiting ones served in
turn per client (`CheckLimiter`), so that no client can hold the DNS
threads.  Cancelling the Deferred of `check` (the client hung up) abandons
the work: its result is dropped and its lookups stop.

Switches (``authentication:`` in the configuration): ``spf: false`` or
``dkim: false`` skips that method, so DMARC can pass only through the
other; ``dmarc: off`` skips DMARC (no ``dmarc=`` in the header: "none"
would claim the sender published nothing); ``monitor`` evaluates and
records but always accepts; ``enforce`` acts on the policy (`policy`).
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from mailx import headers
from mailx.checks.bodyhash import BodyHashStopped
from mailx.dns import Deadline, NotCached, Resolver
from mailx.smtp import replies
from mailx.smtp.replies import Reply
from mailx.text import Logger

if TYPE_CHECKING:
    # The methods' own modules (dkimpy, pyspf, the Public Suffix List,
    # authres) are imported where they are called: the light modules of this
    # package (ptr, dnsbl, results) serve every session, the checks only a
    # configuration that has them on (mailx.service builds no Authenticator
    # otherwise), and a package import runs this file first.
    from mailx.checks.dkim import DKIMResult
    from mailx.checks.dmarc import DMARCResult
    from mailx.checks.policy import Decision
    from mailx.checks.spf import SPFResult

__all__ = [
    "AuthenticationSettings",
    "Authenticator",
    "CheckLimiter",
    "Verdict",
]


class AuthenticationSettings(Protocol):
    """What `Authenticator` reads: ``mailx.config.AuthenticationConfig``
    (read-only properties, so that a frozen dataclass provides them)."""

    @property
    def spf(self) -> bool: ...
    @property
    def dkim(self) -> bool: ...
    @property
    def dmarc(self) -> str: ...  # "enforce" | "monitor" | "off"
    @property
    def timeout(self) -> float: ...  # seconds for all the checks of one message
    @property
    def concurrency_per_ip(self) -> int: ...  # messages of one client checked at once


log = Logger(namespace="mailx.auth")

# RFC 7208 4.6.4: a limit on the time to evaluate SPF "SHOULD allow at least
# 20 seconds"; 30 leaves DKIM keys and DMARC their share, and is far below
# the 10 minutes a client waits for the reply to DATA (RFC 5321 4.5.3.2.6).
DEFAULT_TIMEOUT = 30.0
# Two at once per client: a legitimate MTA's parallel deliveries rarely
# need more, and the next ones only wait their turn.
DEFAULT_CONCURRENCY_PER_IP = 2
# Messages checked at once in all; each takes up to two DNS threads (SPF
# and DKIM), so this stays well below the DNS pool (mailx.service's 32,
# which sets half of it aside for the PTR lookups at connect).
DEFAULT_MAX_CHECKS = 8


def client_key(ip: str) -> str:
    """Whom a bound applies to: the address, or its /64 for IPv6 (one host's usual share)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class CheckLimiter:
    """Slots for checks in flight: at most ``per_client`` per client, ``total`` in all.

    A request beyond either bound waits; a freed slot goes to the waiting
    client with the fewest checks running, so a client with a hundred
    messages waiting does not delay the one message of another by more than
    one slot's time.
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.running: dict[str, int] = {}
        self._in_use = 0
        self._waiting: OrderedDict[str, deque[defer.Deferred[None]]] = OrderedDict()

    def acquire(self, client: str) -> defer.Deferred[None]:
        """Fires when a slot is ``client``'s; cancel it to stop waiting."""

        def withdraw(d: defer.Deferred[None]) -> None:
            queue = self._waiting.get(client)
            if queue is not None and d in queue:
                queue.remove(d)
                if not queue:
                    del self._waiting[client]

        d: defer.Deferred[None] = defer.Deferred(withdraw)
        if self._in_use < self.total and self.running.get(client, 0) < self.per_client:
            self._grant(client, d)
        else:
            self._waiting.setdefault(client, deque()).append(d)
        return d

    def release(self, client: str) -> None:
        """Give back a slot ``acquire`` granted."""
        self._in_use -= 1
        left = self.running[client] - 1
        if left:
            self.running[client] = left
        else:
            del self.running[client]
        while self._waiting and self._in_use < self.total:
            # The client with the fewest checks running goes first, then the
            # one that has waited longest: one with a single message does not
            # queue behind another's hundred.
            eligible = [
                (self.running.get(c, 0), n, c)
                for n, c in enumerate(self._waiting)
                if self.running.get(c, 0) < self.per_client
            ]
            if not eligible:
                break
            chosen = min(eligible)[2]
            queue = self._waiting.pop(chosen)
            d = queue.popleft()
            if queue:
                self._waiting[chosen] = queue  # to the back of the line
            self._grant(chosen, d)

    def _grant(self, client: str, d: defer.Deferred[None]) -> None:
        self._in_use += 1
        self.running[client] = self.running.get(client, 0) + 1
        d.callback(None)

    @property
    def in_use(self) -> int:
        return self._in_use


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

    def results(self) -> dict[str, str]:
        """Each method's one result as in A-R (``{"spf": "pass", "dkim": "none"}``),
        for the metrics: DKIM is ``pass`` when any signature passes, else the
        first signature's result (RFC 8601 2.7.1 results), ``none`` unsigned."""
        results: dict[str, str] = {}
        if self.spf is not None:
            results["spf"] = self.spf.result
        if self.dkim is not None:
            found = [r.result for r in self.dkim]
            results["dkim"] = "pass" if "pass" in found else (found[0] if found else "none")
        if self.dmarc is not None:
            results["dmarc"] = self.dmarc.result
        return results

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
    """Whether the header section has a DKIM-Signature field (``DKIM-Signature :``
    too, RFC 5322 4.5.8: the field is named as the DKIM verifier reads it)."""
    return headers.has_field(headers.header_section(message), b"dkim-signature")


# The largest message (a header section, for unsigned mail) checked on the
# reactor thread when every DNS answer is cached.
INLINE_CHECKS = 64 * 1024
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
        reactor: Any = None,
        max_checks: int = DEFAULT_MAX_CHECKS,
        max_body: int | None = None,
    ) -> None:
        self.resolver = resolver
        self.config = config
        self.hostname = hostname
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self.timeout = float(getattr(config, "timeout", DEFAULT_TIMEOUT))
        self.limiter = CheckLimiter(
            max_checks, int(getattr(config, "concurrency_per_ip", DEFAULT_CONCURRENCY_PER_IP))
        )
        self.max_body = max_body  # DKIM hashes at most this much body
        # Parsing the list takes ~40 ms: once, at start-up, not per message.
        if psl is None:
            from mailx.checks.dmarc import default_psl

            psl = default_psl()
        self.psl = psl
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
        from mailx.checks.spf import check_spf

        result = check_spf(self.resolver, client_ip, helo, mail_from, receiver=self.hostname)
        if result.result != "temperror" and not self.resolver.cache_only_missed():
            if len(self._spf_memory) >= SPF_MEMORY_ENTRIES:
                self._spf_memory.clear()
            self._spf_memory[key] = (now + SPF_MEMORY, result)
        return result

    def _dkim(
        self,
        message: bytes,
        body: Callable[[], Iterable[bytes]] | None = None,
        deadline: Deadline | None = None,
    ) -> tuple[DKIMResult, ...] | None:
        if not self.config.dkim:
            return None
        from mailx.checks.dkim import verify_dkim

        # Past the deadline, or once the client hung up, the body hash stops
        # within a piece: a 451 already went out, nobody waits for 25 MiB more.
        stop = None if deadline is None else (lambda: deadline.remaining() <= 0)
        try:
            return verify_dkim(self.resolver, message, body, max_body=self.max_body, stop=stop)
        except BodyHashStopped:
            raise defer.CancelledError() from None

    def _dmarc(
        self, message: bytes, spf: SPFResult | None, dkim: tuple[DKIMResult, ...] | None
    ) -> DMARCResult | None:
        if self.config.dmarc == "off":
            return None
        from mailx.checks.dmarc import evaluate_dmarc

        return evaluate_dmarc(self.resolver, message, spf, dkim, psl=self.psl, rng=self._rng)

    def _verdict(
        self,
        spf: SPFResult | None,
        dkim: tuple[DKIMResult, ...] | None,
        dmarc: DMARCResult | None,
    ) -> Verdict:
        from mailx.checks.policy import decide
        from mailx.checks.results import build_header

        decision: Decision = decide(dmarc, self.config.dmarc)
        header = build_header(
            self.hostname, spf, dkim, dmarc, enforced=self.config.dmarc == "enforce"
        )
        return Verdict(spf, dkim, dmarc, decision.action, decision.reply, header, decision.reason)

    # -- entry points ---------------------------------------------------------

    def check(
        self,
        client_ip: str,
        helo: str | None,
        mail_from: str,
        message: bytes,
        body: Callable[[], Iterable[bytes]] | None = None,
        *,
        queue_id: str = "-",
    ) -> defer.Deferred[Verdict]:
        """Check a message without blocking the reactor.

        ``mail_from`` is the reverse-path without brackets ("" for the null
        sender); ``message`` the header section and its empty line, and
        ``body()`` the body in chunks (read in a worker thread, only for
        DKIM); without ``body``, ``message`` may be the whole message.
        Errors from our own code fail the Deferred (the caller answers 451
        4.3.0); DNS trouble never does.  Past ``timeout`` the verdict is a
        tempfail (451 4.7.5).  ``cancel()`` abandons the checks.
        ``queue_id`` names the message in the log.
        """
        if not _signed(message):
            # With every answer cached (a sender's second message, and most
            # of every message's lookups), the checks take a fraction of a
            # millisecond: run them here, no thread, no network, no slot.  Not
            # for a large header section: reading its From fields is linear and
            # bounded, but milliseconds every other session would wait for.
            if len(message) <= INLINE_CHECKS:
                try:
                    return defer.succeed(
                        self.resolver.from_cache(
                            self.check_sync, client_ip, helo, mail_from, message
                        )
                    )
                except NotCached:
                    pass
        deadline = Deadline(self.timeout)
        client = client_key(client_ip)
        work: list[defer.Deferred[Any]] = []  # the checks, once they have a slot
        timer: list[Any] = []
        ended: list[str] = []  # why the result came before the work: cancelled, timeout

        def stop() -> None:
            deadline.cancel()  # the lookups still to come fail at once
            if timer and timer[0].active():
                timer[0].cancel()
            if not slot.called:
                slot.cancel()  # out of the line; finished() sees the CancelledError

        def abandon(_: defer.Deferred[Verdict]) -> None:
            ended.append("cancelled")
            stop()  # Deferred.cancel then fails ``result`` with CancelledError

        result: defer.Deferred[Verdict] = defer.Deferred(abandon)

        def out_of_time() -> None:
            waited = not slot.called
            ended.append("timeout")
            stop()
            log.info(
                "{qid}: checks for client {ip} out of time after {timeout:g}s{waited}",
                qid=queue_id,
                ip=client_ip,
                timeout=self.timeout,
                waited=" (waiting for a check slot)" if waited else "",
            )
            if not result.called:
                result.callback(self._out_of_time())

        def start(_: None) -> defer.Deferred[Any]:
            d = self._run(deadline, client_ip, helo, mail_from, message, body)
            work.append(d)
            return d

        def finished(outcome: Any) -> None:
            # The slot is given back when the threads are done, not before:
            # a client that hangs up must not free a slot its lookups hold.
            if work:
                self.limiter.release(client)
            if timer and timer[0].active():
                timer[0].cancel()
            cancelled = isinstance(outcome, Failure) and outcome.check(defer.CancelledError)
            if result.called or ended:
                if isinstance(outcome, Failure) and not cancelled:
                    log.failure("{qid}: abandoned checks failed", outcome, qid=queue_id)
            elif cancelled:
                result.callback(self._out_of_time())  # the deadline, seen by a thread first
            elif isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        slot = self.limiter.acquire(client)
        timer.append(self._reactor.callLater(self.timeout, out_of_time))
        slot.addCallback(start).addBoth(finished)
        return result

    def _out_of_time(self) -> Verdict:
        return Verdict(
            None,
            None,
            None,
            "tempfail",
            replies.DNS_TEMPFAIL,
            "",
            f"checks did not finish within {self.timeout:g}s",
        )

    def _run(
        self,
        deadline: Deadline,
        client_ip: str,
        helo: str | None,
        mail_from: str,
        message: bytes,
        body: Callable[[], Iterable[bytes]] | None,
    ) -> defer.Deferred[Verdict]:
        """The checks in the DNS threads, every lookup bounded by ``deadline``."""

        def call(func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
            return self.resolver.call_within(deadline, func, *args)

        if not _signed(message):
            # Unsigned (most mail): one trip to a worker thread for all three
            # checks.  With answers in the resolver's cache they take well
            # under a millisecond, and each extra hand-off costs a GIL round
            # trip with the reactor thread (measured: three hops cost more
            # than the checks themselves).
            return call(self.check_sync, client_ip, helo, mail_from, message)
        # Signed: the key lookups and SPF's at once, then DMARC.
        both = defer.gatherResults(
            [call(self._spf, client_ip, helo, mail_from), call(self._dkim, message, body, deadline)],
            consumeErrors=True,
        )
        both.addErrback(
            lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f
        )

        def then(results: list[Any]) -> defer.Deferred[Verdict]:
            spf, dkim = results
            if deadline.remaining() <= 0:
                return defer.fail(defer.CancelledError())  # nobody waits for DMARC
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
