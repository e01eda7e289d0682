# -*- test-case-name: tests.test_smtp -*-
"""The delivery layer: what happens at MAIL, RCPT and DATA of one session.

The hooks follow the dialogue (``mail``, ``rcpt``, ``data``), in the shape of
Twisted's ``IMessageDelivery`` but over addresses already parsed into ``str``:
Twisted's ``Address`` is bytes, ASCII-only and its tokenizer is a measurable
share of per-message CPU (research notes section 9).  The message object is
Twisted's ``IMessage`` plus ``dataReceived`` for whole runs of lines.

A message is answered ``250`` only once every copy is fsynced in its final
Maildir; until then it exists only in memory or the incoming spool, which is
discarded after a crash (the client was never told it was accepted).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.mail.smtp import IMessage
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mailx import headers
from mailx.checks.results import is_forged_results
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Route, quote_path, route
from mailx.inbound.spool import SpoolBuffer
from mailx.outbound.srs import srs_route
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError
from mailx.storage import maildir
from mailx.text import Logger

log = Logger(namespace="mailx.delivery")

# Postfix's header_size_limit is 102400; ours is ten times that, and a header
# section past it refuses the message (it cannot be checked or filtered).
MAX_HEADER_SECTION = 1024 * 1024
# A header section up to this size is split and checked on the reactor thread
# (well under a millisecond); a larger one in a worker thread.
INLINE_HEADER = 64 * 1024
# Postfix's hopcount_limit; RFC 5321 6.3 suggests counting Received fields.
MAX_RECEIVED = 50
_UNSAFE = re.compile(r"[^\x21-\x7e]")
# A quoted local part may hold spaces (RFC 5321 4.1.2), never a line break.
_UNSAFE_ADDRESS = re.compile(r"[^\x20-\x7e]")


class IDelivery(Interface):
    """The delivery layer of one SMTP session (one method per stage)."""

    def mail(queue_id: str, sender: str, size: int) -> Any:
        """Accept (return, or a Deferred) or refuse (raise SMTPReplyError) a sender."""

    def rcpt(queue_id: str, recipient: str) -> Any:
        """Return the recipient's Route (or a Deferred of it), or raise SMTPReplyError."""

    def data(queue_id: str, sender: str, routes: Sequence[Route]) -> IMessage:
        """Return the message object that receives the body."""

    def disconnected() -> None:
        """The session ended."""


@dataclass
class DeliveryContext:
    """What every session of one configuration shares."""

    config: Any
    disk_pool: ThreadPool
    reactor: Any
    authenticator: Any = None  # mailx.checks.Authenticator; None when every check is off
    blocklists: Any = None  # mailx.checks.dnsbl.Blocklists; None without checks.dnsbl
    committer: Any = None  # mailx.storage.committer.GroupCommitter: files messages with forwards
    writer: Any = None  # mailx.storage.writer.WriterClient: files mailbox-only messages
    outbound: Any = None  # mailx.outbound.relay.Outbound: forwarding queue and SRS
    names: Any = None  # mailx.checks.ptr.NameLookups: the client's name at connect (checks.reverse_dns)
    # Header sections held in memory by every session together (docs/security.md).
    header_pool: headers.HeaderPool = field(default_factory=headers.HeaderPool)
    incoming: Path = field(init=False)

    def __post_init__(self) -> None:
        self.incoming = self.config.paths.spool / "incoming"

    def in_disk_pool(self, func: Any, *args: Any) -> defer.Deferred:
        """Run blocking file work (a spilled body's writes) off the reactor thread."""
        return deferToThreadPool(self.reactor, self.disk_pool, func, *args)

    def deliver_in_thread(self, func: Any, *args: Any) -> defer.Deferred:
        """Run a filing function in the group committer (``sync_directory`` is its)."""
        return self.committer.submit(lambda batch: func(*args, sync_directory=batch.sync_later))


@implementer(IDelivery)
class SessionDelivery:
    def __init__(self, context: DeliveryContext, session: Any) -> None:
        self.context = context
        self.config = context.config
        self.session = session
        self.junk = False  # a DNSBL with action "junk" listed the client
        self._listing: defer.Deferred | None = None
        if context.blocklists is not None:
            # Started at connect so the answer is usually in by the first RCPT.
            self._listing = context.blocklists.check(session.client_ip)
        if context.names is not None:
            self._look_up_name()

    def _look_up_name(self) -> None:
        """Start the client's forward-confirmed reverse lookup (`mailx.checks.ptr`); nothing waits."""
        from mailx.checks.dnsbl import exempt

        session = self.session
        if exempt(session.client_ip):
            return

        def found(name: str | None) -> None:
            session.reverse_name = name
            log.info(
                "{session}: client {ip} is {name}",
                session=session.session_id,
                ip=session.client_ip,
                name=name or "unknown (no PTR, or its name does not resolve back)",
            )

        self.context.names.look_up(session.client_ip).addCallback(found)

    def mail(self, queue_id: str, sender: str, size: int) -> None:
        log.info(
            # The session ID here links the connection's lines to the message's.
            "{qid}: session={session} from=<{sender}>{size} client={name}[{ip}] helo={helo}",
            qid=queue_id,
            session=self.session.session_id,
            sender=sender,
            # The size the client declared (RFC 1870); none said, none shown.
            size=f" size={size}" if size else "",
            name=self.session.reverse_name or "unknown",
            ip=self.session.client_ip,
            helo=self.session.helo,
            event="mail",  # the session <-> message link mailx.observe.trace follows
        )

    def rcpt(self, queue_id: str, recipient: str) -> Route:
        if recipient == "postmaster":
            # RFC 5321 4.5.1: <postmaster> without a domain must be accepted.
            first = next(iter(self.config.domains))
            recipient = f"postmaster@{first}"
        srs = self.context.outbound.srs if self.context.outbound is not None else None
        decision = srs_route(srs, self.config, recipient) or route(self.config, recipient)
        if self._listing is None or decision.address.local == "postmaster":
            return self._accepted(queue_id, recipient, decision)
        # Each RCPT gets its own Deferred on the one lookup at connect.
        listing: defer.Deferred = defer.Deferred()
        self._listing.addBoth(lambda result: (listing.callback(result), result)[1])

        def decide(found: Any) -> Route:
            if found is not None and found.action == "reject":
                raise SMTPReplyError(
                    replies.DNSBL_BLOCKED.with_text(
                        replies.DNSBL_BLOCKED.text.format(
                            ip=self.session.client_ip, zone=found.zone
                        )
                    )
                )
            if found is not None:
                if not self.junk:
                    log.info(
                        "{qid}: client {ip} listed in {zone} ({code}): filing into Junk",
                        qid=queue_id,
                        ip=self.session.client_ip,
                        zone=found.zone,
                        code=found.answer,
                    )
                self.junk = True
            return self._accepted(queue_id, recipient, decision)

        return listing.addCallback(decide)

    def _accepted(self, queue_id: str, recipient: str, decision: Route) -> Route:
        log.info(
            "{qid}: to=<{rcpt}> accepted: {destinations}",
            qid=queue_id,
            rcpt=recipient,
            destinations=", ".join(_describe(d) for d in decision.destinations),
            event="rcpt",
            result="accepted",
        )
        return decision

    def data(self, queue_id: str, sender: str, routes: Sequence[Route]) -> IncomingMessage:
        return IncomingMessage(self, queue_id, sender, routes)

    def disconnected(self) -> None:
        pass


# The message's verdict: logged when refused, or once filed when accepted.
VERDICT_LINE = "{qid}: {action} size={size} nrcpt={nrcpt} {results}"


def _describe(destination: Any) -> str:
    if isinstance(destination, MailboxDestination) and destination.lmtp is not None:
        return f"mailbox {destination.domain}/{destination.mailbox} via LMTP {destination.lmtp}"
    if isinstance(destination, MailboxDestination):
        return f"mailbox {destination.domain}/{destination.mailbox}"
    return f"forward {destination.address}"


@implementer(IMessage)
class IncomingMessage:
    """One message being received: header section in memory, body spooled."""

    def __init__(
        self, delivery: SessionDelivery, queue_id: str, sender: str, routes: Sequence[Route]
    ) -> None:
        self.delivery = delivery
        self.queue_id = queue_id
        self.sender = sender
        self.routes = list(routes)
        self.header = b""  # the header section, once its end has arrived
        self._in_header = True
        self._head = bytearray()  # the header section so far
        self._pool = delivery.context.header_pool
        self._held = 0  # octets of self._head counted in the pool
        self.body = SpoolBuffer(
            delivery.context.incoming, queue_id, delivery.context.in_disk_pool
        )
        self._checks: defer.Deferred | None = None
        self._abandoned = False

    # --- receiving ---------------------------------------------------------

    def dataReceived(self, chunk: bytes) -> None:
        """Whole CRLF lines, already dot-unstuffed and normalised.

        Linear in the header size: chunks are appended to one bytearray and
        only the new bytes (plus 3 of overlap) are searched for the empty
        line; the bytes held count against the server-wide header pool.
        """
        if not self._in_header:
            self.body.write(chunk)
            return
        head = self._head
        if not chunk:
            return
        if not head:
            if chunk.startswith(b"\r\n"):
                self._end_header(b"", chunk)
                return
            if not headers.is_field_start(chunk):
                # No header section at all (RFC 5322 3.5 makes it optional in practice).
                self._end_header(b"", b"\r\n" + chunk)
                return
        searched = len(head)
        head += chunk
        end = headers.end_of_header(head, searched)
        size = end if end >= 0 else len(head)
        if size > MAX_HEADER_SECTION:
            # Passing it on unparsed would keep forged Authentication-Results
            # and a From that DMARC never saw; no real message comes close.
            raise SMTPReplyError(replies.HEADER_TOO_BIG)
        if not self._pool.grow(self._held, size):
            raise SMTPReplyError(replies.HEADER_MEMORY)
        self._held = max(self._held, size)
        if end >= 0:
            view = memoryview(head)
            header, rest = bytes(view[:end]), bytes(view[end:])
            view.release()
            self._end_header(header, rest)

    def _end_header(self, header: bytes, rest: bytes) -> None:
        self.header, self._in_header = header, False
        self._head = bytearray()
        if rest:
            self.body.write(rest)

    def _release(self) -> None:
        """Give back what this message drew from the header pool (once)."""
        self._pool.release(self._held)
        self._held = 0
        self.header, self._head = b"", bytearray()

    def lineReceived(self, line: bytes) -> None:
        self.dataReceived(line + b"\r\n")

    def connectionLost(self) -> None:
        self._release()
        self.body.discard()

    def abandon(self) -> None:
        """The client hung up after the end of data: stop the checks if they still run.

        Their slot and lookups are freed (`mailx.checks.Authenticator.check`);
        filing, once begun, goes on (its thread reads the body) and only its
        reply is lost.  A hang-up while a large header section is split in a
        worker thread starts neither checks nor filing afterwards.
        """
        self._abandoned = True
        if self._checks is not None:
            self._checks.cancel()

    # --- end of data ----------------------------------------------------------

    @defer.inlineCallbacks
    def eomReceived(self) -> Iterator[defer.Deferred]:
        if self._in_header:  # a message that is all header section
            self._end_header(bytes(self._head), b"")
        ctx = self.delivery.context
        config = ctx.config
        end_of_data = ctx.reactor.seconds()
        try:
            yield self.body.finish()
            if self.body.error is not None:
                # SPEC section 5: a disk error is 451 4.3.0, and the sender retries.
                log.error(
                    "{qid}: spool write failed: {error}",
                    qid=self.queue_id,
                    error=str(self.body.error),
                )
                raise SMTPReplyError(replies.LOCAL_ERROR)
            if len(self.header) > INLINE_HEADER:
                # Linear, but a megabyte of fields is still milliseconds of
                # CPU that every other session would wait for.
                fields, names = yield deferToThreadPool(
                    ctx.reactor, ctx.reactor.getThreadPool(), _incoming_fields,
                    self.header, config.hostname,
                )
                if self._abandoned:  # the client hung up meanwhile: nobody to answer
                    raise defer.CancelledError()
            else:
                fields, names = _incoming_fields(self.header, config.hostname)
            self.routes = self._without_loops(fields, names)
            verdict = None
            if ctx.authenticator is not None:
                self._checks = ctx.authenticator.check(
                    self.delivery.session.client_ip,
                    self.delivery.session.helo,
                    self.sender,
                    *self._message_for_checks(fields, names),
                    queue_id=self.queue_id,
                )
                try:
                    verdict = yield self._checks
                finally:
                    self._checks = None
            size = len(self.header) + self.body.size
            action = verdict.action if verdict is not None else "accept"
            if action == "accept" and self.delivery.junk:
                action = "junk"
            results = verdict.log_fields() if verdict is not None else {}
            verdict_line = {
                "qid": self.queue_id,
                "action": "accepted" if action in ("accept", "junk") else action,
                "size": size,
                "nrcpt": len(self.routes),
                "results": " ".join(f"{k}={v}" for k, v in results.items()),
                # Each method's A-R result alone, for mailx.observe.metrics.
                "checks": verdict.results() if verdict is not None else {},
                # For mailxctl trace MESSAGE-ID (mailx.observe.trace).
                "message_id": _message_id(fields, names),
            }
            if action in ("reject", "tempfail"):
                log.info(VERDICT_LINE, event="verdict", **verdict_line)
                raise SMTPReplyError(verdict.reply)
            extra = [verdict.header.encode("utf-8") + b"\r\n"] if verdict is not None else []
            # Mailboxes of LMTP domains (SPEC 14) go into the queue entry (_outgoing).
            mailboxes = [m for m in _unique_mailboxes(self.routes) if m[0].lmtp is None]
            copies = [
                (dest, self._trace_headers(dest, given) + extra, action == "junk")
                for dest, given in mailboxes
            ]
            header = b"".join(fields)
            outgoing = self._outgoing(verdict, extra)
            enqueue = None
            if outgoing is not None:
                enqueue = lambda data, sync=None: ctx.outbound.queue.enqueue(outgoing, data, sync)  # noqa: E731
            if enqueue is None and ctx.writer is not None and copies:
                filed = yield ctx.writer.file(
                    *_writer_request(config, self.queue_id, copies, header), self.body
                )
            else:
                # Mailbox copies and the queue entry in one all-or-none step.
                filed = yield ctx.deliver_in_thread(
                    file_copies, config, self.queue_id, copies, header, self.body, enqueue
                )
            # Logged once durable: "accepted" is what the 250 reply says.
            log.info(
                VERDICT_LINE,
                filing_seconds=ctx.reactor.seconds() - end_of_data,
                **verdict_line,
                **replies.outcome("message", replies.MESSAGE_ACCEPTED),
            )
            if outgoing is not None:
                ctx.outbound.submitted(outgoing)
            for n, (dest, _, junk) in enumerate(copies):
                log.info(
                    "{qid}: delivered to=<{address}> mailbox={mailbox}{junk}",
                    qid=self.queue_id,
                    path=str(filed[n]) if n < len(filed or ()) else None,
                    address=dest.address,
                    mailbox=f"{dest.domain}/{dest.mailbox}",
                    junk=" folder=Junk" if junk else "",
                    event="delivery",
                    kind="maildir",
                    status="sent",
                )
            return replies.MESSAGE_ACCEPTED.with_text(
                replies.MESSAGE_ACCEPTED.text.format(queue_id=self.queue_id)
            )
        except SMTPReplyError as e:
            log.info(
                "{qid}: refused: {reply}",
                qid=self.queue_id,
                reply=str(e.reply),
                **replies.outcome("message", e.reply),
            )
            raise
        except defer.CancelledError:
            log.info("{qid}: abandoned: the client hung up before the reply", qid=self.queue_id)
            raise
        except OSError as e:
            # An operational problem (permissions, a full disk, a file where a
            # directory should be): one line naming what to fix, not a
            # traceback; the client keeps the message and retries on 451.
            log.error(
                "{qid}: cannot file the message: {error}; check that the user mailx runs as"
                " can write under {mail} (the client will retry)",
                qid=self.queue_id,
                error=str(e).replace("\n", " "),
                mail=str(config.paths.mail),
                **replies.outcome("message", replies.LOCAL_ERROR),
            )
            raise SMTPReplyError(replies.LOCAL_ERROR) from None
        except Exception:
            log.failure(
                "{qid}: delivery failed",
                qid=self.queue_id,
                **replies.outcome("message", replies.LOCAL_ERROR),
            )
            raise SMTPReplyError(replies.LOCAL_ERROR) from None
        finally:
            self._release()
            self.body.discard()

    def _without_loops(self, fields: list[bytes], names: list[bytes | None]) -> list[Route]:
        """The routes minus what already went through us; 554 5.4.6 if nothing is left.

        RFC 5321 6.3: more than MAX_RECEIVED Received fields is a loop.  A
        Delivered-To we wrote (the recipient's address, or the mailbox's) means
        the message was delivered or forwarded to that address before and came
        back, as Postfix's local(8) detects, for local and forwarded copies
        alike.  Only the copies that loop are dropped (that address has the
        message already); the message is refused when all of them do.
        """
        received = names.count(b"received")
        if received > MAX_RECEIVED:
            reason = f"{received} Received header fields"
        else:
            seen = (
                {
                    headers.field_value(f).strip().strip(b"<>").decode("utf-8", "replace").lower()
                    for f, name in zip(fields, names, strict=True)
                    if name == b"delivered-to"
                }
                if b"delivered-to" in names
                else set()
            )
            if not seen:
                return self.routes
            kept, dropped = [], []
            for r in self.routes:
                if str(r.address) in seen:
                    dropped.append(str(r.address))
                    continue
                dests = tuple(
                    d for d in r.destinations
                    if not (isinstance(d, MailboxDestination) and d.address in seen)
                )
                dropped.extend(d.address for d in r.destinations if d not in dests)
                if dests:
                    kept.append(replace(r, destinations=dests))
            if not dropped:
                return self.routes
            reason = f"already delivered to {', '.join(dropped)}"
            if kept:
                log.info(
                    "{qid}: mail loop, not delivered again to {to}",
                    qid=self.queue_id,
                    to=", ".join(dropped),
                )
                return kept
        raise SMTPReplyError(replies.MAIL_LOOP.with_text(f"{replies.MAIL_LOOP.text}: {reason}"))

    def _outgoing(self, verdict: Any = None, results: Sequence[bytes] = ()) -> Any:
        """The queue entry for the outside recipients (SPEC 8) and the mailboxes of
        LMTP domains (SPEC 14), or None without any.

        The entry keeps the SPF and DMARC results: a bounce goes only to a
        sender they authenticate (dsn.notice_refusal: no backscatter).

        Each copy gets our Received and a Delivered-To naming the address it
        was sent to (as Postfix does when an alias forwards), and no
        Return-Path (RFC 5321 4.4: that is the final delivery's).  Below them
        the message goes out byte for byte, so DKIM signatures still verify.
        """
        forwards = []
        for r in self.routes:
            # Delivered-To and Received, as for a mailbox; not Return-Path.
            trace = b"".join(self._trace_headers(ForwardDestination(str(r.address)))[1:])
            for d in r.destinations:
                if isinstance(d, ForwardDestination):
                    forwards.append((str(r.address), d.address, trace))
        # The LMTP server writes Return-Path and Delivered-To itself (RFC 2033
        # hands it the envelope); ours would be there twice.  ``results`` is
        # our Authentication-Results, for its filters.
        lmtp = [
            (
                given,
                dest.address,
                b"".join(
                    f for f in self._trace_headers(dest, given)
                    if not f.startswith((b"Return-Path:", b"Delivered-To:"))
                )
                + b"".join(results),
                dest.lmtp,
            )
            for dest, given in _unique_mailboxes(self.routes)
            if dest.lmtp is not None
        ]
        if not forwards and not lmtp:
            return None
        outbound = self.delivery.context.outbound
        if outbound is None:
            raise RuntimeError("forwarding without an outbound queue")
        spf = getattr(verdict, "spf", None)
        dmarc = getattr(verdict, "dmarc", None)
        return outbound.envelope_for(
            self.queue_id,
            self.sender,
            self.delivery.session.helo or "",
            forwards,
            spf=spf.result if spf is not None else None,
            dmarc=dmarc.result if dmarc is not None else None,
            lmtp=lmtp,
        )

    def _message_for_checks(
        self, fields: list[bytes], names: list[bytes | None]
    ) -> tuple[bytes, Any]:
        """The header section for the checks, and the body's chunks when a DKIM
        signature needs them (read by the DKIM worker thread, never all in memory)."""
        header = b"".join(fields) + b"\r\n"
        if b"dkim-signature" not in names:
            return header, None
        return header, lambda: _after_blank_line(self.body.chunks())

    def _trace_headers(self, dest: Any, original: str | None = None) -> list[bytes]:
        """Return-Path, X-Original-To (a local copy's ``original`` RCPT), Delivered-To, Received.

        In Postfix local(8)'s order, which filters and people already know.
        """
        session = self.delivery.session
        config = self.delivery.config
        helo = _UNSAFE.sub("?", session.helo or "unknown")
        reverse = session.reverse_name or "unknown"
        protocol = ("ESMTPS" if session.tls else "ESMTP") if session.esmtp else (
            "SMTPS" if session.tls else "SMTP"
        )
        tls = f"\r\n\t(using {session.tls})" if session.tls else ""
        received = (
            f"Received: from {helo} ({reverse} [{session.client_ip}])\r\n"
            f"\tby {config.hostname} (mailx) with {protocol} id {self.queue_id}{tls}\r\n"
            f"\tfor <{dest.address}>; {formatdate(localtime=True)}\r\n"
        )
        trace = [f"Return-Path: <{quote_path(self.sender)}>\r\n".encode()]
        if original is not None:
            # SPEC 4: the RCPT address as given, before alias expansion and
            # subaddress stripping, so filters can sort on me+news@.
            trace.append(f"X-Original-To: {_UNSAFE_ADDRESS.sub('?', original)}\r\n".encode())
        trace += [f"Delivered-To: {dest.address}\r\n".encode(), received.encode("utf-8")]
        return trace


def _message_id(fields: list[bytes], names: list[bytes | None]) -> str | None:
    """The Message-ID field's value on one line (RFC 5322 3.6.4), or None without one."""
    try:
        found = fields[names.index(b"message-id")][:4096]
    except ValueError:
        return None
    value = " ".join(headers.field_value(found).decode("utf-8", "replace").split())
    return value[:998] or None  # RFC 5322 2.1.1: no longer than a line


def _after_blank_line(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body proper: the spool starts with the empty line that ends the header."""
    skip = 2
    for chunk in chunks:
        if skip:
            dropped = min(skip, len(chunk))
            chunk, skip = chunk[dropped:], skip - dropped
        if chunk:
            yield chunk


def split_header(header: bytes) -> list[bytes]:
    """Header fields with their continuation lines, CRLF kept (RFC 5322 2.2.3)."""
    return headers.split_fields(header)


def _incoming_fields(header: bytes, hostname: str) -> tuple[list[bytes], list[bytes | None]]:
    """The fields of an arriving header section, minus forged Authentication-Results,
    and their lower-case names (None for a line that is no field)."""
    fields, names = [], []
    for f in headers.split_fields(header):
        name = headers.field_name(f)
        if name == b"authentication-results" and _is_forged_results(f, hostname):
            continue
        fields.append(f)
        names.append(name)
    return fields, names


def _is_forged_results(field: bytes, hostname: str) -> bool:
    """An incoming Authentication-Results claiming to be ours (RFC 8601 5); the name
    as mail clients read it, "Authentication-Results :" included (RFC 5322 4.5.8)."""
    if headers.field_name(field) != b"authentication-results":
        return False
    return is_forged_results(headers.field_value(field).decode("utf-8", "replace"), hostname)


def _unique_mailboxes(routes: Sequence[Route]) -> list[tuple[MailboxDestination, str]]:
    """One copy per final mailbox, whatever aliases led there (SPEC 4), with the
    RCPT address that led there: the first one when several did (one copy, one
    X-Original-To)."""
    seen: dict[tuple[str, str], tuple[MailboxDestination, str]] = {}
    for r in routes:
        for dest in r.destinations:
            if isinstance(dest, MailboxDestination):
                seen.setdefault((dest.domain, dest.mailbox), (dest, str(r.address)))
    return list(seen.values())


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def _writer_request(
    config: Any,
    queue_id: str,
    copies: list[tuple[MailboxDestination, list[bytes], bool]],
    header: bytes,
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The copies for `mailx.storage.writer`, with the header block each one starts with."""
    specs, heads = [], []
    for n, (dest, trace, junk) in enumerate(copies):
        specs.append(
            {
                "maildir": str(dest.maildir_path(config)),
                "name": maildir.unique_name(queue_id, n, config.hostname),
                "folder": maildir.JUNK_FOLDER if junk else None,
            }
        )
        heads.append(_lf(b"".join(trace) + header))
    return specs, heads


def file_copies(
    config: Any,
    queue_id: str,
    copies: list[tuple[MailboxDestination, list[bytes], bool]],
    header: bytes,
    body: SpoolBuffer,
    enqueue: Callable[[Iterator[bytes]], Any] | None = None,
    sync_directory: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write every Maildir copy durably, then the forwarding queue entry (``enqueue``
    of the message as received); all or none (blocking, worker thread)."""
    written: list[Path] = []
    try:
        for n, (dest, trace, junk) in enumerate(copies):
            box = dest.maildir_path(config)
            if junk:
                box = maildir.ensure_folder(box)
            head = _lf(b"".join(trace) + header)
            name = maildir.unique_name(queue_id, n, config.hostname)
            written.append(
                maildir.write_message(
                    box, name, _chain(head, maildir.lf_chunks(body.chunks())), sync_directory
                )
            )
        if enqueue is not None:
            # The queue directory's fsync is the batch's, as the Maildirs' are.
            enqueue(_chain(header, body.chunks()), sync_directory)
    except BaseException:
        for path in written:
            maildir.remove_message(path)
        raise
    return written


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
