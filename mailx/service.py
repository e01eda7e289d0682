# -*- test-case-name: tests.test_server -*-
"""Wiring: configuration in, listening services out (twistd's ``makeService``)."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailx import maildir, spool
from mailx.config import Config, ConfigError, load_config
from mailx.delivery import DeliveryContext, SessionDelivery
from mailx.smtp import MailxSMTPFactory, server_endpoint

log = Logger(namespace="mailx.service")

# Enough threads that concurrent fsyncs share journal commits (STYLE.md),
# few enough that a flood cannot exhaust memory with blocked writers.
DISK_THREADS = 16


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Configuration file (default: $MAILX_CONFIG or ./mailx.yaml)."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = os.environ.get("MAILX_CONFIG", "mailx.yaml")


def tls_context(config: Config) -> Any:
    """Server TLS options from the PEM chain and key; TLS 1.2 and up."""
    if config.tls is None:
        return None
    from twisted.internet import ssl

    cert_pem = config.tls.certificate.read_bytes()
    key_pem = config.tls.key.read_bytes()
    certs = _pem_blocks(cert_pem)
    leaf = ssl.PrivateCertificate.loadPEM(certs[0] + key_pem)
    extra = [ssl.Certificate.loadPEM(c).original for c in certs[1:]]
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=extra,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + marker + b"\n" for part in data.split(marker) if part.strip()]


class MailxService(service.MultiService):
    """The running server: listeners, the disk thread pool, start-up recovery."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.disk_pool = ThreadPool(minthreads=0, maxthreads=DISK_THREADS, name="mailx-disk")
        self.context = DeliveryContext(config, self.disk_pool, reactor)
        self.factory = MailxSMTPFactory(
            config, self._delivery_for, tls_context=tls_context(config)
        )
        self.endpoints = [server_endpoint(reactor, d) for d in config.listen]
        self.ports: list[Any] = []

    def _delivery_for(self, session: Any) -> SessionDelivery:
        return SessionDelivery(self.context, session)

    def prepare_storage(self) -> None:
        """Create the directories and clear what a crash left behind."""
        config = self.config
        incoming = config.paths.spool / "incoming"
        os.makedirs(incoming, mode=0o700, exist_ok=True)
        dropped = spool.clean_incoming(incoming)
        if dropped:
            log.info(
                "start-up: discarded {n} incomplete incoming message(s) (never acknowledged)",
                n=dropped,
            )
        cleaned = 0
        for domain in config.domains.values():
            for mailbox in sorted(domain.mailboxes):
                path = config.paths.mail / domain.name / mailbox
                maildir.ensure_maildir(path)
                cleaned += maildir.clean_tmp(path)
        if cleaned:
            log.info("start-up: removed {n} unfinished Maildir tmp file(s)", n=cleaned)

    def startService(self) -> None:
        self.prepare_storage()
        self.disk_pool.start()
        super().startService()
        for description, endpoint in zip(self.config.listen, self.endpoints, strict=True):
            # Stream endpoints listen synchronously; a port in use must stop
            # start-up with a clear error rather than leave a deaf server.
            failures: list[Failure] = []
            endpoint.listen(self.factory).addCallbacks(self.ports.append, failures.append)
            if failures:
                self.disk_pool.stop()
                raise ListenError(f"cannot listen on {description}: {failures[0].getErrorMessage()}")
        log.info(
            "mailx ready as {hostname} on {listen}, domains: {domains}",
            hostname=self.config.hostname,
            listen=", ".join(self.config.listen),
            domains=", ".join(self.config.domains),
        )

    def stopService(self) -> Any:
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(port.stopListening) for port in ports]
        stopping.append(defer.maybeDeferred(super().stopService))
        d = defer.gatherResults(stopping, consumeErrors=True)
        d.addBoth(lambda result: (self.disk_pool.stop(), result)[1])
        return d


class ListenError(Exception):
    """A listen endpoint could not be bound."""


def makeService(options: Options) -> MailxService:
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None
    return MailxService(config)
