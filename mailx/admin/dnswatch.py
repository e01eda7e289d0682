# -*- test-case-name: tests.test_dnswatch -*-
"""Watching our own DNS: the ``mailxctl dns --check`` of every domain, every ``dns.watch``.

Records drift: a registrar migration drops the DMARC record, a hosting
change moves the address but not the PTR, someone "cleans up" a TXT record
that was the SPF.  Mail then starts failing at receivers, silently, days
before anyone notices.  With ``dns.watch`` set (``6h``), the running server
repeats the check and logs one warning line per record that is missing or
wrong, naming it and the fix, on every round until it is repaired; a
record that comes back is logged once.

The check blocks on DNS (`mailx.dns.Resolver`), so it runs in the
reactor's thread pool; each round builds a fresh resolver, so what it
sees is what DNS says now, not a cached answer from the previous round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall

from mailx.config import Config
from mailx.text import Logger

if TYPE_CHECKING:
    from mailx.admin.dnssetup import Finding

__all__ = ["DNSWatchService", "add_dns_watch", "check_in_thread"]

log = Logger(namespace="mailx.dnswatch")

Results = dict[str, list["Finding"]]


def check_in_thread(config: Config) -> defer.Deferred[Results]:
    """`dnssetup.check_config` in the reactor's thread pool."""
    # Imported here: the DNS assistant (dnspython's reversename, dkimkeys'
    # record checks) is only needed by a server with dns.watch set.
    from mailx.admin import dnssetup

    return threads.deferToThread(dnssetup.check_config, config)


class DNSWatchService(service.Service):
    """Re-checks every domain's records each ``dns.watch`` seconds and logs drift.

    ``config`` is the configuration or a function returning the current one
    (so a reload's new domains and interval apply from the next round).
    ``clock`` and ``check`` are for tests: a `twisted.internet.task.Clock`
    and a function returning a Deferred of ``{domain: [Finding]}``.
    """

    name = "dns-watch"  # type: ignore[assignment]  # Service's stub types it None

    def __init__(
        self,
        config: Config | Callable[[], Config],
        *,
        clock: Any = None,
        check: Callable[[Config], defer.Deferred[Results]] = check_in_thread,
    ) -> None:
        self._config = config if callable(config) else (lambda: config)
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._check = check
        self._loop: LoopingCall | None = None
        self._bad: set[tuple[str, str, str, str]] = set()  # (domain, record, type, name)
        self.rounds = 0

    def startService(self) -> None:
        super().startService()
        interval = self._config().dns.watch
        if interval is not None:
            # The first round at start-up: a problem shows in the log right away.
            self._start(interval, now=True)

    def _start(self, interval: float, now: bool) -> None:
        loop = LoopingCall(self.check_once)
        loop.clock = self.clock
        self._loop = loop
        loop.start(interval, now=now).addErrback(
            lambda failure: log.failure("dns watch stopped", failure)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def check_once(self) -> defer.Deferred[Any]:
        """One round; never fails, so the loop keeps going after a bad round."""
        config = self._config()
        d = defer.maybeDeferred(self._check, config)
        d.addCallback(self._report)
        d.addErrback(lambda failure: log.failure("dns watch: the check failed", failure))
        d.addBoth(lambda _: self._follow_interval(config))
        return d

    def _report(self, results: Results) -> None:
        self.rounds += 1
        bad_now: set[tuple[str, str, str, str]] = set()
        for domain, findings in results.items():
            for finding in findings:
                key = (domain, finding.record, finding.type, finding.name)
                if finding.ok:
                    if key in self._bad:
                        log.info(
                            "dns watch: {domain}: {record} {name} is ok again",
                            domain=domain,
                            record=finding.record,
                            name=finding.name,
                        )
                    continue
                bad_now.add(key)
                log.warn(
                    "dns watch: {domain}: {problem}",
                    domain=domain,
                    problem=finding.message(),
                    record=finding.record,
                    status=finding.status,
                    required=finding.required,
                )
            if not any(not f.ok for f in findings):
                log.info(
                    "dns watch: {domain}: all {count} records ok",
                    domain=domain,
                    count=len(findings),
                )
        self._bad = bad_now

    def _follow_interval(self, config: Config) -> None:
        """A reload may have changed ``dns.watch``: the next round is that far off."""
        loop = self._loop
        if loop is None or not loop.running or config.dns.watch == loop.interval:
            return
        loop.stop()
        self._loop = None
        if config.dns.watch is not None:
            self._start(config.dns.watch, now=False)


def add_dns_watch(
    parent: service.MultiService, config: Config | Callable[[], Config], **kwargs: Any
) -> DNSWatchService | None:
    """Make a `DNSWatchService` a child of ``parent`` when ``dns.watch`` is set."""
    current = config() if callable(config) else config
    if current.dns.watch is None:
        return None
    watcher = DNSWatchService(config, **kwargs)
    watcher.setServiceParent(parent)
    return watcher
