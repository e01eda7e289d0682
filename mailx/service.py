# -*- test-case-name: tests.test_server -*-
"""Wiring: configuration in, listening services out (twistd's ``makeService``)."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailx.admin import dnswatch, preflight
from mailx.checks import ptr
from mailx.checks.dnsbl import Blocklists
from mailx.checks.ptr import NameLookups
from mailx.config import Config, ConfigError, load_config
from mailx.dns import Resolver
from mailx.filters.mailbox import MailboxFilters
from mailx.headers import HeaderPool
from mailx.inbound import spool
from mailx.inbound.delivery import DeliveryContext, SessionDelivery
from mailx.inbound.routing import Router
from mailx.observe.trace import TraceRecord
from mailx.outbound.relay import Outbound
from mailx.smtp.accounts import accounts_from_config
from mailx.smtp.server import SMTP, SUBMISSION, SUBMISSIONS, MailxSMTPFactory, server_endpoint
from mailx.smtp.submission import SubmissionDelivery, SubmissionState
from mailx.storage import maildir
from mailx.storage.queue import Queue
from mailx.storage.writer import WriterClient
from mailx.text import Logger

if TYPE_CHECKING:
    from mailx.observe.metrics import Metrics

log = Logger(namespace="mailx.service")

# Enough threads that concurrent fsyncs share journal commits (STYLE.md),
# few enough that a flood cannot exhaust memory with blocked writers.
DISK_THREADS = 16
# SPF alone may need 10 sequential lookups per message; enough threads that
# 50 concurrent sessions do not queue behind one another.
DNS_THREADS = 32


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Configuration file (default: $MAILX_CONFIG or ./mailx.yaml)."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = os.environ.get("MAILX_CONFIG", "mailx.yaml")


def pid_path(config: Config) -> Path:
    """Where the running server writes its pid, for ``mailxctl reload`` and friends."""
    return config.paths.spool / "mailx.pid"


def reload_status_path(config: Config) -> Path:
    """Where the server records the verdict of each reload, for ``mailxctl reload``."""
    return config.paths.spool / "reload.status"


def read_reload_status(config: Config) -> dict[str, Any] | None:
    """The last reload verdict (``generation``, ``ok``, ``problems``), None if none."""
    try:
        data = json.loads(reload_status_path(config).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class TLSConfigError(Exception):
    """The certificate or key cannot be used; reported like a config error."""


def tls_context(config: Config) -> Any:
    """Server TLS options from the PEM chain and key; TLS 1.2 and up.

    The key is checked against the certificate here, so a renewal that put
    the wrong key in place fails at start-up (or reload), not at the first
    STARTTLS.
    """
    if config.tls is None:
        return None
    from OpenSSL import SSL, crypto
    from twisted.internet import ssl

    try:
        certs = _pem_blocks(config.tls.certificate.read_bytes())
        if not certs:
            raise TLSConfigError(f"tls.certificate: no certificate in {config.tls.certificate}")
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, config.tls.key.read_bytes())
        leaf = crypto.load_certificate(crypto.FILETYPE_PEM, certs[0])
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, c) for c in certs[1:]]
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=leaf,
            extraCertChain=chain,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        options.getContext()  # loads the pair: a key that does not match fails here
    except (OSError, crypto.Error, SSL.Error, ValueError) as e:
        # The config loader's pair check (mailx.tlsfiles) catches the usual
        # mistakes in words; this is what OpenSSL alone still refuses.
        raise TLSConfigError(
            f"tls: OpenSSL cannot use {config.tls.certificate} with {config.tls.key}:"
            f" {_openssl_words(e)}"
        ) from None
    return options


def _openssl_words(error: Exception) -> str:
    """OpenSSL's reasons without its tuples: [('x509 ...', '', 'key values mismatch')]."""
    reasons = error.args[0] if error.args else None
    if isinstance(reasons, list) and all(isinstance(r, tuple) and r for r in reasons):
        return "; ".join(str(r[-1]) for r in reasons) or str(error)
    return str(getattr(error, "strerror", None) or error)


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentTLS:
    """The implicit-TLS listeners' connection creator: the service's TLS
    options of the moment, so a reload's renewed certificate applies to the
    next connection (twisted.protocols.tls asks once per connection)."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def serverConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        return SSL.Connection(self._service._tls.getContext(), None)


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + marker + b"\n" for part in data.split(marker) if part.strip()]


class MailxService(service.MultiService):
    """The running server: listeners, the disk thread pool, start-up recovery,
    reload on SIGHUP and a graceful stop on SIGTERM."""

    # How long a stop waits for sessions in DATA to finish before cutting them
    # off; an unfinished message was never acknowledged, so nothing is lost.
    shutdown_grace = 30.0

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        log_observer: Any = None,
        freeze_heap: bool = False,
    ) -> None:
        super().__init__()
        # logging.format's; twistd installs it (see setServiceParent).
        self.log_observer = log_observer
        self.freeze_heap = freeze_heap  # twistd's process is ours alone; a test's is not
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.disk_pool = ThreadPool(minthreads=0, maxthreads=DISK_THREADS, name="mailx-disk")
        self._reload_lock = defer.DeferredLock()
        # SPEC 13: counted from the log events, and from these hooks;
        # served on listen.metrics. Without a listener nothing could read
        # them (a reload does not add one), so there are none, and no
        # prometheus_client in the process.
        self.metrics: Metrics | None = None
        if config.metrics_listen:
            from mailx.observe.metrics import Metrics

            self.metrics = Metrics()
        # SPEC 13: every message's events on disk, for mailxctl trace (the
        # path and keep_days of the start-up configuration; a reload keeps them).
        self.trace: TraceRecord | None = None
        if config.trace.keep_days:
            self.trace = TraceRecord(
                config.trace.directory(config.paths.spool), config.trace.keep_days
            )
        # Every durable write is filed by one child process, group-committed
        # (the filing engine, see mailx.storage.writer).
        self.writer = WriterClient(reactor, self.disk_pool)
        if self.metrics is not None:
            self.writer.observe_batch = self.metrics.filing_batch
        # DNS lookups block in dnspython; their own pool keeps a slow DNS
        # server from starving the disk writers.
        self.dns_pool = ThreadPool(minthreads=0, maxthreads=DNS_THREADS, name="mailx-dns")
        self._public_suffixes: Any = None
        # Header sections in memory, all sessions together; kept across reloads.
        self.header_pool = HeaderPool()
        self.context = self._context_for(config)
        self._tls = tls_context(config)
        self.factory = MailxSMTPFactory(config, self._delivery_for, tls_context=self._tls)
        # SPEC 11: the submission listeners, each kind its own factory (their
        # per-IP connection counts are their own); the accounts and the
        # failure and rate counters are shared by both.
        self.accounts = accounts_from_config(config, reactor)
        self.submission = SubmissionState(self.accounts, config.limits)
        self.factories = {SMTP: self.factory}
        for kind in (SUBMISSION, SUBMISSIONS):
            if getattr(config, kind):
                self.factories[kind] = MailxSMTPFactory(
                    config,
                    self._submission_delivery_for,
                    tls_context=self._tls,
                    kind=kind,
                    submission=self.submission,
                )
        self.endpoints = [server_endpoint(reactor, d) for d in config.listen]
        self.listeners: list[tuple[str, Any, Any]] = [
            (d, e, self.factory) for d, e in zip(config.listen, self.endpoints, strict=True)
        ]
        for kind in (SUBMISSION, SUBMISSIONS):
            for description in getattr(config, kind):
                factory: Any = self.factories[kind]
                if kind == SUBMISSIONS and not description.startswith("ssl:"):
                    # RFC 8314 3: TLS from the first byte, with tls:'s
                    # certificate (through _CurrentTLS, so a reload's renewed
                    # certificate applies to new connections).
                    from twisted.protocols.tls import TLSMemoryBIOFactory

                    factory = TLSMemoryBIOFactory(_CurrentTLS(self), False, factory)
                self.listeners.append((description, server_endpoint(reactor, description), factory))
        self.ports: list[Any] = []
        if self.metrics is not None:
            self.metrics.watch_queue(self.outbound.queued, reactor.seconds)
        self.metrics_ports: list[Any] = []
        # dns.watch: re-check our own published records, reading the config
        # of the moment so a reload's changes apply from the next round.
        dnswatch.add_dns_watch(self, lambda: self.config)
        self._listening = False
        self._stopping: defer.Deferred | None = None

    def _context_for(self, config: Config) -> DeliveryContext:
        """Everything sessions share under one configuration, built once per (re)load."""
        resolver = Resolver(
            config.dns.nameservers,
            config.dns.timeout,
            reactor=self.reactor,
            threadpool=self.dns_pool,
            observe=self.metrics.dns_lookup if self.metrics is not None else None,
        )
        auth = config.authentication
        authenticator = None
        if auth.spf or auth.dkim or auth.dmarc != "off":
            # Imported here: dkimpy, pyspf and the PSL only with checks on.
            from mailx.checks import Authenticator

            authenticator = Authenticator(
                resolver,
                auth,
                config.hostname,
                psl=self._psl(),
                reactor=self.reactor,
                # Checks in flight at once: each may hold two DNS threads, and
                # the PTR lookups at connect up to ptr.MAX_IN_FLIGHT more.
                max_checks=(DNS_THREADS - ptr.MAX_IN_FLIGHT) // 2,
                max_body=config.limits.message_size,
            )
        blocklists = Blocklists(resolver, config.checks.dnsbl) if config.checks.dnsbl else None
        # Every mailbox and alias expanded once (on the reactor thread at a reload):
        # the sessions' routing and the Outbound's, for its notices.
        router = Router(config)
        return DeliveryContext(
            config,
            self.disk_pool,
            self.reactor,
            router,
            authenticator=authenticator,
            blocklists=blocklists,
            outbound=self._outbound_for(config, resolver, router),
            writer=self.writer,
            names=NameLookups(resolver, self.reactor) if config.checks.reverse_dns else None,
            # SPEC 12: every mailbox's Sieve scripts run when mail is filed.
            filters=MailboxFilters(config, reactor=self.reactor),
            header_pool=self.header_pool,
        )

    def _outbound_for(self, config: Config, resolver: Resolver, router: Router) -> Outbound:
        """The forwarding queue's scheduler (a child service, started and stopped with
        us): made once, reconfigured on reload; the queue stays in the first spool."""
        outbound: Outbound | None = getattr(self, "outbound", None)
        if outbound is None:
            queue = Queue(config.paths.spool / "queue")
            outbound = Outbound(
                config,
                queue,
                resolver,
                reactor=self.reactor,
                disk_pool=self.disk_pool,
                filer=self.writer,
                router=router,
            )
            outbound.setServiceParent(self)
            self.outbound = outbound
        else:
            outbound.reconfigure(config, resolver, router)
        return outbound

    def _psl(self) -> Any:
        # Parsing the Public Suffix List costs ~40 ms; once per process.
        if self._public_suffixes is None:
            from mailx.checks.dmarc import default_psl

            self._public_suffixes = default_psl()
        return self._public_suffixes

    def _delivery_for(self, session: Any) -> SessionDelivery:
        # The context of the moment the session starts: a reload does not
        # change the rules under a transaction in progress.
        return SessionDelivery(self.context, session)

    def _submission_delivery_for(self, session: Any) -> SubmissionDelivery:
        return SubmissionDelivery(self.context, session, self.submission)

    def prepare_storage(self, clean: bool = True, config: Config | None = None) -> None:
        """Create the directories and (at start-up) clear what a crash left behind."""
        config = config or self.config
        incoming = config.paths.spool / "incoming"
        maildir.make_directories(incoming)
        if clean:
            dropped = spool.clean_incoming(incoming)
            if dropped:
                log.info(
                    "start-up: discarded {n} incomplete incoming message(s) (never acknowledged)",
                    n=dropped,
                )
        cleaned = 0
        for domain in config.domains.values():
            if domain.lmtp is not None:
                continue  # filed by the LMTP server (SPEC 14); made by a reload back to Maildir
            for mailbox in sorted(domain.mailboxes):
                path = config.paths.mail / domain.name / mailbox
                maildir.ensure_maildir(path)
                if clean:
                    cleaned += maildir.clean_tmp(path)
        if cleaned:
            log.info("start-up: removed {n} unfinished Maildir tmp file(s)", n=cleaned)

    def privilegedStartService(self) -> None:
        # twistd calls this as root, before --uid/--gid take effect: bind
        # port 25 here; everything that writes files waits for startService.
        self._listen()
        super().privilegedStartService()

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd's AppLogger takes a log observer set on the application
        # (after makeService, before anything is logged): logging.format.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)

    def _listen(self) -> None:
        if self._listening:
            return
        self._listening = True
        if self.metrics is not None:
            self.metrics.start()
            self._listen_metrics(self.metrics)
        for description, endpoint, factory in self.listeners:
            # Stream endpoints listen synchronously; a port in use must stop
            # start-up with a clear error rather than leave a deaf server.
            failures: list[Failure] = []
            endpoint.listen(factory).addCallbacks(self.ports.append, failures.append)
            if failures:
                error = getattr(failures[0].value, "socketError", None)
                if isinstance(error, OSError):
                    raise ListenError(preflight.listen_error(description, error))
                raise ListenError(f"cannot listen on {description}: {failures[0].getErrorMessage()}")

    def _listen_metrics(self, metrics: Metrics) -> None:
        from twisted.internet.endpoints import serverFromString

        site = metrics.site()
        for description in self.config.metrics_listen:
            failures: list[Failure] = []
            endpoint = serverFromString(self.reactor, description)
            endpoint.listen(site).addCallbacks(self.metrics_ports.append, failures.append)
            if failures:
                error = getattr(failures[0].value, "socketError", None)
                if isinstance(error, OSError):
                    message = preflight.listen_error(description, error)
                    raise ListenError(message.replace("listen.smtp", "listen.metrics"))
                raise ListenError(f"cannot listen on {description}: {failures[0].getErrorMessage()}")

    def startService(self) -> None:
        try:
            self.prepare_storage()
        except OSError as e:
            # makeService checked this for our user; this is what changed since.
            raise StorageError(
                f"cannot prepare {e.filename or 'the spool and Maildirs'}: {e.strerror};"
                f" check that the user mailx runs as owns paths.spool and paths.mail"
            ) from None
        if self.trace is not None:
            try:
                self.trace.start()
            except OSError as e:
                raise StorageError(
                    f"cannot write the trace record in {self.trace.directory}: {e.strerror};"
                    " check that the user mailx runs as owns logging.trace.path"
                ) from None
        self.disk_pool.start()
        self.dns_pool.start()
        self.writer.start()
        super().startService()
        self._listen()
        self.pidfile = pid_path(self.config)
        self.pidfile.write_text(f"{os.getpid()}\n")
        self._write_reload_status(self._reload_status([], start=True))
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        for warning in self.config.warnings:
            # Not warning=...: Twisted's legacy observers (trial's, twistd's)
            # take an event with a "warning" key for a Python warning.
            log.warn("{problem}", problem=str(warning))
        if self.freeze_heap:
            freeze_heap()
        log.info(
            "mailx ready as {hostname} on {listen}, domains: {domains}",
            hostname=self.config.hostname,
            listen=", ".join(d for d, _, _ in self.listeners),
            domains=", ".join(self.config.domains),
        )

    def _on_sighup(self, signum: int, frame: Any) -> None:
        def reload() -> None:
            self.reload_in_thread().addErrback(lambda f: log.failure("reload failed", f))

        self.reactor.callFromThread(reload)

    def reload_in_thread(self) -> defer.Deferred:
        """`reload`, with the file read, checked and its new Maildirs made in the
        disk pool (SIGHUP's way): a large or hostile file, or many mailboxes to
        stat, must not stall the sessions the reactor serves. Reloads run one at
        a time, so the last SIGHUP's file is the one applied."""
        source = self.config.source

        def read() -> defer.Deferred:
            d = threads.deferToThreadPool(self.reactor, self.disk_pool, self._read, source)
            return d.addCallback(applied)

        def applied(read: tuple[Config, Any] | list[str]) -> defer.Deferred:
            problems = read if isinstance(read, list) else self._apply(*read)
            status = self._reload_status(problems)
            d = threads.deferToThreadPool(
                self.reactor, self.disk_pool, self._write_reload_status, status
            )
            return d.addCallback(lambda _: not problems)

        return self._reload_lock.run(read)

    def reload(self) -> bool:
        """Re-read the configuration file; keep the old one if the new one is wrong.

        Synchronous (the file is parsed on the calling thread); the server
        itself reloads with `reload_in_thread`. The verdict is also written to
        `reload_status_path`, so that ``mailxctl reload`` can report it instead
        of only sending a signal."""
        return self._finish_reload(self._read(self.config.source))

    def _finish_reload(self, read: tuple[Config, Any] | list[str]) -> bool:
        problems = read if isinstance(read, list) else self._apply(*read)
        self._write_reload_status(self._reload_status(problems))
        return not problems

    def _read(self, source: Path) -> tuple[Config, Any] | list[str]:
        """The configuration at ``source`` and its TLS context, checked as the
        user we run as and with its new Maildirs made; else its problems (logged).
        Blocking: runs in the disk pool."""
        try:
            config = load_config(source)
            context = tls_context(config)
        except ConfigError as e:
            problems = [str(problem) for problem in e.problems]
        except TLSConfigError as e:
            problems = [str(e)]
        except OSError as e:  # the file itself, unreadable as our user
            problems = [f"{source}: {e.strerror}"]
        else:
            # As the user we now run as: what the new configuration names must be usable.
            problems = preflight.access_problems(config, preflight.run_as())
        if not problems:
            try:
                # New mailboxes' Maildirs (mkdir and fsync), before anything routes to them.
                self.prepare_storage(clean=False, config=config)
            except OSError as e:
                problems = [f"cannot create {e.filename}: {e.strerror}"]
        if problems:
            for problem in problems:
                log.error("reload refused: {problem}", problem=problem)
            return problems
        return config, context

    def _apply(self, config: Config, context: Any) -> list[str]:
        if (config.listen, config.submission, config.submissions) != (
            self.config.listen,
            self.config.submission,
            self.config.submissions,
        ):
            log.warn("reload: listen endpoints changed; they take effect at the next restart")
        if config.accounts != self.config.accounts:
            close = getattr(self.accounts, "close", None)
            if close is not None:
                close()
            self.accounts = accounts_from_config(config, self.reactor)
        self.submission.reconfigure(self.accounts, config.limits)
        self.config = config
        previous = self.context
        self.context = self._context_for(config)
        previous.filters.close()
        self._tls = context
        for kind, factory in self.factories.items():
            delivery_for = self._delivery_for if kind == SMTP else self._submission_delivery_for
            factory.reconfigure(config, delivery_for, context)
        for warning in config.warnings:
            log.warn("{problem}", problem=str(warning))
        log.info(
            "reloaded {source}: domains: {domains}",
            source=str(config.source),
            domains=", ".join(config.domains),
        )
        return []

    def _reload_status(self, problems: list[str], start: bool = False) -> dict[str, Any]:
        """The verdict of this reload (or of the start, generation 0), for `_write_reload_status`."""
        self._reload_generation = 0 if start else getattr(self, "_reload_generation", 0) + 1
        return {
            "pid": os.getpid(),
            "generation": self._reload_generation,
            "ok": not problems,
            "problems": problems,
        }

    def _write_reload_status(self, status: dict[str, Any]) -> None:
        """Write the verdict where `read_reload_status` looks (blocking: the disk
        pool, but at start-up; no fsync: it only matters while both processes run)."""
        path = reload_status_path(self.config)
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(status) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot record the reload verdict in {path}: {error}", path=str(path), error=e.strerror)

    def stopService(self) -> Any:
        if self._stopping is not None:
            again: defer.Deferred[None] = defer.Deferred()

            def also_stopped(result: Any) -> Any:
                again.callback(None)
                return result

            self._stopping.addBoth(also_stopped)
            return again
        if getattr(self, "_previous_sighup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        ports, self.ports = self.ports + self.metrics_ports, []
        self.metrics_ports = []
        self._listening = False
        stopping = [defer.maybeDeferred(port.stopListening) for port in ports]
        stopping.append(defer.maybeDeferred(super().stopService))
        for factory in self.factories.values():
            factory.shutdown()
        d = defer.gatherResults(stopping, consumeErrors=True)
        d.addBoth(lambda _: self._drain_sessions())
        d.addBoth(lambda _: self._close_accounts())
        d.addBoth(lambda _: self.context.filters.close())
        d.addBoth(lambda _: self.writer.stop())
        d.addBoth(lambda _: self._stop_disk_pool())
        self._stopping = d
        return d

    def _close_accounts(self) -> None:
        """The accounts' pool or Dovecot connection, once no session needs them."""
        close = getattr(self.accounts, "close", None)
        if close is not None:
            close()

    @defer.inlineCallbacks
    def _drain_sessions(self) -> Generator[defer.Deferred[None], Any, None]:
        deadline = self.reactor.seconds() + self.shutdown_grace
        def sessions() -> list[Any]:
            return [p for f in self.factories.values() for p in f.sessions]

        while sessions() and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.05, lambda: None)
        for proto in sessions():
            log.info("shutdown: cutting off a session that did not finish in time")
            proto.transport.abortConnection()

    def _stop_disk_pool(self) -> None:
        # ThreadPool.stop joins the workers: every fsync in flight completes.
        self.disk_pool.stop()
        self.dns_pool.stop()
        pidfile = getattr(self, "pidfile", None)
        if pidfile is not None:
            try:
                pidfile.unlink()
            except FileNotFoundError:
                pass
        log.info("mailx stopped")
        if self.metrics is not None:
            self.metrics.stop()
        if self.trace is not None:
            self.trace.stop()  # what is left, written and fsynced


class ListenError(Exception):
    """A listen endpoint could not be bound."""


class StorageError(Exception):
    """The spool or a Maildir cannot be created or written."""


def _twistd_ids(options: Options) -> tuple[int | None, int | None]:
    """twistd's ``--uid``/``--gid`` (our Options' parent), None when not given."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None, None
    try:
        return parent["uid"], parent["gid"]
    except KeyError:
        return None, None


def freeze_heap() -> None:
    """Take what start-up made (modules, configuration, routes: it lives as long
    as the process) out of the collector's sight, so that full collections
    stop walking it again and again: 1-7% more messages per second at 1 KiB in
    paired bench/run.py runs.  A reload's new objects are collected as usual."""
    gc.collect()
    gc.freeze()


def _rotated_on_sigusr1(log_file: Any) -> Any:
    """SIGUSR1 rotates the file, as twistd arranges for the log file it opens."""
    if not signal.getsignal(signal.SIGUSR1):  # None or SIG_DFL: nobody else's

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def _log_observer(options: Options, log_format: str) -> Any:
    """The log observer for twistd to install: `logging.format` json or text,
    to where twistd would log (stdout with ``-n`` or ``--logfile=-``, else
    ``--logfile``, twistd.log by default, rotated as twistd rotates its own).
    None (twistd's own choice) with ``--syslog`` or ``--logger``."""
    from twisted.python import logfile

    from mailx.observe.turnfile import TurnFile

    parent = getattr(options, "parent", None) or {}
    if parent.get("syslog") or parent.get("logger"):
        return None
    name = parent.get("logfile") or ""
    if not name and not parent.get("nodaemon", True):
        name = "twistd.log"  # twistd's UnixAppLogger default when daemonizing
    target = sys.stdout if name in ("", "-") else _rotated_on_sigusr1(logfile.LogFile.fromFullPath(name))
    out: Any = TurnFile(target)  # written once per reactor turn (FileLogObserver wants an IO)
    if log_format == "json":
        from mailx.observe.jsonlog import json_observer

        return json_observer(out)
    from mailx.observe.textlog import text_observer

    return text_observer(out)


def makeService(options: Options) -> MailxService:
    """Load and check everything while the terminal is still attached (see preflight)."""
    path = os.path.abspath(options["config"])
    if not os.path.exists(path):
        print(
            f"mailx: {path}: no configuration file here (choose one with --config FILE"
            " or $MAILX_CONFIG; the default is ./mailx.yaml in the current directory)",
            file=sys.stderr,
        )
        raise SystemExit(1)
    try:
        config = load_config(options["config"])
        user = preflight.run_as(*_twistd_ids(options))
        for made in preflight.create_owned(config, user):
            print(f"mailx: created {made} for {user.describe()}", file=sys.stderr)
        found = preflight.problems(config, user)
        if found:
            print(preflight.lines(found), file=sys.stderr)
            raise SystemExit(1)
        observer = _log_observer(options, config.log_format)
        return MailxService(config, log_observer=observer, freeze_heap=True)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
    except TLSConfigError as e:
        print(f"{options['config']}: {e}", file=sys.stderr)
    raise SystemExit(1)
