# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics (SPEC section 13), counted from the log events.

One seam: mailx already logs one structured event per thing that happens
(SPEC section 10), and the events that matter carry an ``event`` field
(``connect``, ``rcpt``, ``message``, ``verdict``, ``delivery``, ``tls``,
``connection_refused``) with the outcome in plain fields (``result``,
``code``, ``checks``, ``kind``, ``status``).  `Metrics` is a
`twisted.logger` observer that turns those events into counter updates, so
the log line and the metric cannot disagree, and the SMTP, delivery and
outbound code carry no metric calls of their own.  The cost is a dict
lookup per event, on the reactor thread, where the event is emitted.

Each service owns its `CollectorRegistry` (not prometheus_client's global
one): tests run many servers in one process.  Gauges of the moment (the
outbound queue) are read at scrape time by a custom collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.web.server import Site

# The _created series double the text format for nothing a dashboard uses
# (prometheus_client's switch is process-wide; mailx is the process).
disable_created_metrics()

RESULTS = ("accepted", "refused", "tempfail")
DELIVERY_KINDS = ("maildir", "forward", "submission", "lmtp", "dsn")
DELIVERY_RESULTS = ("delivered", "deferred", "bounced")
# Envelope kinds (mailx.storage.queue) and notice kinds as a delivery kind.
_KIND = {"bounce": "dsn", "delay": "dsn"}
# Outbound and delivery statuses (the log's status=) as a delivery result.
_STATUS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced", "expired": "bounced"}

# End of DATA to durable: one fsync batch is milliseconds, a busy disk more.
FILING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Accepted to delivered (or given up): seconds for most, days for the worst.
DELIVERY_BUCKETS = (1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SIZE_BUCKETS = tuple(2.0**n for n in range(10, 26, 2))  # 1 KiB .. 32 MiB


class _QueueCollector(Collector):
    """The outbound queue as it is at scrape time: how many, how old the oldest."""

    def __init__(self, entries: Callable[[], Iterable[float]], now: Callable[[], float]) -> None:
        self._entries = entries
        self._now = now

    def collect(self) -> Iterator[Metric]:
        created = list(self._entries())
        count = GaugeMetricFamily(
            "mailx_queue_messages", "Messages in the outbound queue (forwards, notices)."
        )
        count.add_metric([], len(created))
        yield count
        oldest = GaugeMetricFamily(
            "mailx_queue_oldest_seconds",
            "Age of the oldest message in the outbound queue; 0 when empty.",
        )
        oldest.add_metric([], max(0.0, self._now() - min(created)) if created else 0.0)
        yield oldest


@implementer(ILogObserver)
class Metrics:
    """The service's metrics and the log observer that keeps them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions = Counter(
            "mailx_smtp_sessions", "SMTP connections admitted (counted at connect).", registry=r
        )
        self.connections_refused = Counter(
            "mailx_smtp_connections_refused",
            "Connections refused before the banner, by limit.",
            ["reason"],
            registry=r,
        )
        self.tls = Counter(
            "mailx_tls_sessions",
            "Sessions that negotiated TLS, by protocol version.",
            ["version"],
            registry=r,
        )
        self.recipients = Counter(
            "mailx_recipients", "RCPT commands, by outcome.", ["result"], registry=r
        )
        self.messages = Counter(
            "mailx_messages_received",
            "Messages at the end of DATA, by outcome.",
            ["result"],
            registry=r,
        )
        self.refusals = Counter(
            "mailx_refusals",
            "Refused and deferred recipients and messages, by stage and enhanced status code.",
            ["stage", "code"],
            registry=r,
        )
        self.auth = Counter(
            "mailx_auth_checks",
            "SPF, DKIM and DMARC results, one per message and method.",
            ["method", "result"],
            registry=r,
        )
        self.deliveries = Counter(
            "mailx_deliveries",
            "Delivery attempts, by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "mailx_delivery_seconds",
            "Accepted to delivered or bounced, for queued messages, by kind.",
            ["kind"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.filing = Histogram(
            "mailx_filing_seconds",
            "End of DATA to durable, per accepted message.",
            buckets=FILING_BUCKETS,
            registry=r,
        )
        self.message_size = Histogram(
            "mailx_message_size_bytes",
            "Size of accepted messages.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.dns_seconds = Histogram(
            "mailx_dns_lookup_seconds",
            "DNS lookups sent to the resolvers (cache misses), by record type.",
            ["type"],
            buckets=DNS_BUCKETS,
            registry=r,
        )
        self.dns_failures = Counter(
            "mailx_dns_failures",
            "DNS lookups that failed (timeout, or SERVFAIL and the like), by record type.",
            ["type", "error"],
            registry=r,
        )
        self.batches = Histogram(
            "mailx_filing_batch_messages",
            "Messages per group commit (one fsync of each directory per batch).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Every series a dashboard graphs exists from the start, at 0.  The
        # children are kept: labels() takes a lock and builds its key each
        # call, several times per message on the reactor thread (issue 14).
        self._recipients = {result: self.recipients.labels(result) for result in RESULTS}
        self._messages = {result: self.messages.labels(result) for result in RESULTS}
        for kind in DELIVERY_KINDS:
            for result in DELIVERY_RESULTS:
                self.deliveries.labels(kind, result)
        self._children: dict[tuple[object, ...], Any] = {}
        self._handlers: dict[str, Callable[[LogEvent], None]] = {
            "connect": self._connect,
            "connection_refused": self._connection_refused,
            "tls": self._tls,
            "rcpt": self._rcpt,
            "verdict": self._verdict,
            "message": self._message,
            "delivery": self._delivery,
        }

    def watch_queue(self, entries: Callable[[], Iterable[float]], now: Callable[[], float]) -> None:
        """Report the outbound queue: ``entries()`` gives each message's creation time."""
        self.registry.register(_QueueCollector(entries, now))

    def dns_lookup(self, rdtype: str, seconds: float, error: str | None) -> None:
        """`mailx.dns.Resolver`'s observe hook (any thread: prometheus_client locks)."""
        self.dns_seconds.labels(rdtype).observe(seconds)
        if error is not None:
            self.dns_failures.labels(rdtype, error).inc()

    def filing_batch(self, size: int) -> None:
        """`mailx.storage.writer.WriterClient`'s hook (a batch of the filing engine)."""
        self.batches.observe(size)

    # -- the observer ---------------------------------------------------------

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("event")
        if kind is None or not isinstance(kind, str):
            return
        handler = self._handlers.get(kind)
        if handler is None:
            return
        try:
            handler(event)
        except Exception:  # a malformed event must not break logging
            pass

    def _connect(self, event: LogEvent) -> None:
        self.sessions.inc()

    def _connection_refused(self, event: LogEvent) -> None:
        self.connections_refused.labels(str(event.get("reason", "other"))).inc()

    def _tls(self, event: LogEvent) -> None:
        # "TLSv1.3:TLS_AES_256_GCM_SHA384" (smtp.tls_description): the protocol.
        described = str(event.get("tls") or "")
        self._child(self.tls, described.split(":", 1)[0] or "unknown").inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per series."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _rcpt(self, event: LogEvent) -> None:
        result = event.get("result")
        counter = self._recipients.get(result)  # type: ignore[arg-type]
        if counter is None:
            return
        counter.inc()
        if result != "accepted":
            self._child(self.refusals, "rcpt", str(event.get("code") or "-")).inc()

    def _verdict(self, event: LogEvent) -> None:
        checks = event.get("checks")
        if isinstance(checks, dict):
            for method, result in checks.items():
                self._child(self.auth, str(method), str(result)).inc()

    def _message(self, event: LogEvent) -> None:
        result = event.get("result")
        counter = self._messages.get(result)  # type: ignore[arg-type]
        if counter is None:
            return
        counter.inc()
        self._verdict(event)
        if result != "accepted":
            self._child(self.refusals, "data", str(event.get("code") or "-")).inc()
            return
        seconds = event.get("filing_seconds")
        if isinstance(seconds, int | float):
            self.filing.observe(seconds)
        size = event.get("size")
        if isinstance(size, int):
            self.message_size.observe(size)

    def _delivery(self, event: LogEvent) -> None:
        raw = str(event.get("kind", "forward"))
        kind = _KIND.get(raw, raw)
        result = _STATUS.get(str(event.get("status")))
        if result is None:
            return
        self._child(self.deliveries, kind, result).inc()
        if result == "delivered" or result == "bounced":
            try:
                delay = float(event["delay"])
            except (KeyError, TypeError, ValueError):
                return
            self._child(self.delivery_seconds, kind).observe(delay)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)

    def site(self) -> Site:
        """``GET /metrics`` on twisted.web; prometheus_client renders in a thread."""
        # Imported here: twisted.web's server (~3 MiB) only with listen.metrics set.
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.noisy = False
        site.displayTracebacks = False
        return site


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` by (name, sorted labels): for tests and bench."""
    from prometheus_client import generate_latest

    return samples(generate_latest(registry).decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An exposition's samples by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


__all__ = ["Metrics", "samples", "scrape"]
