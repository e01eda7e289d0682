# -*- test-case-name: tests.test_pipeline,tests.test_smtp -*-
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
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.mail.smtp import IMessage
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mailx import headers
from mailx.address import quote_path
from mailx.checks.policy import Action
from mailx.checks.results import is_forged_results
from mailx.filters.outcome import KEEP, FilterOutcome
from mailx.inbound.decide import Content, Decision, Hop, Transport, decide, final_mailboxes
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Route, Router
from mailx.inbound.spool import SpoolBuffer
from mailx.outbound import dkimkeys, dsn
from mailx.outbound.srs import srs_route
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError
from mailx.storage import maildir
from mailx.storage.writer import Filing, InlineFiler, MaildirCopy, QueueCopy
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
    # This configuration's routing, built once per (re)load by the server, which
    # gives the same one to its Outbound (notices to our own mailboxes).
    router: Router
    authenticator: Any = None  # mailx.checks.Authenticator; None when every check is off
    blocklists: Any = None  # mailx.checks.dnsbl.Blocklists; None without checks.dnsbl
    writer: Any = None  # mailx.storage.writer.WriterClient: files every message, all or none
    outbound: Any = None  # mailx.outbound.relay.Outbound: forwarding queue and SRS
    names: Any = None  # mailx.checks.ptr.NameLookups: the client's name at connect (checks.reverse_dns)
    # The mailboxes' filters (mailx.filters.mailbox): ``outcome(destination, sender,
    # recipient as given, header bytes, read_body) -> FilterOutcome``, blocking.
    filters: Any = None
    # Header sections held in memory by every session together (docs/security.md).
    header_pool: headers.HeaderPool = field(default_factory=headers.HeaderPool)
    incoming: Path = field(init=False)

    def __post_init__(self) -> None:
        self.incoming = self.config.paths.spool / "incoming"
        if self.writer is None:
            # The same engine in the disk pool: for contexts made without a server.
            self.writer = InlineFiler(self.reactor, self.disk_pool)

    def in_disk_pool(self, func: Any, *args: Any) -> defer.Deferred:
        """Run blocking file work (a spilled body's writes) off the reactor thread."""
        return deferToThreadPool(self.reactor, self.disk_pool, func, *args)

    def route(self, recipient: str) -> Route:
        """A recipient's route: one of our SRS addresses, or the configuration's routing."""
        srs = self.outbound.srs if self.outbound is not None else None
        return srs_route(srs, self.config, recipient) or self.router.route(recipient)


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

    def rcpt(self, queue_id: str, recipient: str) -> Route | defer.Deferred[Route]:
        # A bare <postmaster> (RFC 5321 4.5.1) is the Router's to resolve.
        decision = self.context.route(recipient)
        if self._listing is None or decision.address.local == "postmaster":
            return self._accepted(queue_id, recipient, decision)
        # Each RCPT gets its own Deferred on the one lookup at connect.
        listing: defer.Deferred[Any] = defer.Deferred()

        def pass_on(result: Any) -> Any:
            listing.callback(result)
            return result

        self._listing.addBoth(pass_on)

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
            rcpt=decision.address,
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
        self._outcomes: dict[str, FilterOutcome] = {}  # the filters' outcomes, once run

    # --- receiving ---------------------------------------------------------

    def on_spool_backlog(self, listener: Callable[[bool], None]) -> None:
        """``listener(True)`` once the spool's disk is far behind the content,
        ``listener(False)`` once it caught up: the session stops reading meanwhile."""
        self.body.on_backlog = listener

    def spool_stalled(self, seconds: float) -> None:
        """The session waited ``seconds`` for the spool's disk: fail the message."""
        self.body.stalled(seconds)

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
    def _spooled(self) -> Generator[defer.Deferred[Any], Any, None]:
        """The body, all on the spool; a disk error is 451 4.3.0 (SPEC 5), and the sender retries."""
        yield self.body.finish()
        if self.body.error is not None:
            log.error("{qid}: spool write failed: {error}", qid=self.queue_id, error=str(self.body.error))
            raise SMTPReplyError(replies.LOCAL_ERROR)

    @defer.inlineCallbacks
    def eomReceived(self) -> Generator[defer.Deferred[Any], Any, replies.Reply]:
        if self._in_header:  # a message that is all header section
            self._end_header(bytes(self._head), b"")
        ctx = self.delivery.context
        config = ctx.config
        end_of_data = ctx.reactor.seconds()
        try:
            yield self._spooled()
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
            header = b"".join(fields)
            extra: list[bytes] = [verdict.header.encode("utf-8") + b"\r\n"] if verdict is not None else []
            outcomes: dict[str, FilterOutcome] = {}
            if ctx.filters is not None and self._filtered(verdict):
                outcomes = yield self._filter_outcomes(header, extra)
            decision = decide(
                self.queue_id,
                self.sender,
                self.routes,
                verdict,
                listed=self.delivery.junk,
                outcomes=outcomes,
                size=size,
                # For mailxctl trace MESSAGE-ID (mailx.observe.trace).
                message_id=_message_id(fields, names),
            )
            for note in decision.notes:
                log.info("{qid}: {note}", qid=self.queue_id, note=note)
            if not decision.accepted:
                # Every mailbox's filter rejected it: the rejects are what happened.
                _log_filter_actions(self.queue_id, outcomes, decision)
                log.info(VERDICT_LINE, event="verdict", **decision.log)
                raise SMTPReplyError(decision.reply)
            filing, entries = yield self._filing(decision, header, extra, verdict)
            filed = yield ctx.writer.file(filing)
            # Logged once durable: "accepted" is what the 250 reply says.
            log.info(
                VERDICT_LINE,
                filing_seconds=ctx.reactor.seconds() - end_of_data,
                **decision.log,
                **replies.outcome("message", replies.MESSAGE_ACCEPTED),
            )
            self._filed(decision, filing, entries, filed)
            return decision.reply
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

    def _filtered(self, verdict: Any) -> bool:
        """Do the mailboxes' filters run?  Not for a refused message, nor for junk,
        which is filed into Junk unfiltered (`mailx.inbound.decide`)."""
        if self.delivery.junk:
            return False
        return verdict is None or verdict.action == Action.ACCEPT

    @defer.inlineCallbacks
    def _filter_outcomes(
        self, header: bytes, extra: list[bytes]
    ) -> Generator[defer.Deferred, Any, dict[str, FilterOutcome]]:
        """Each final mailbox's `FilterOutcome`, by its address; the filters run in
        the disk pool (they read scripts and the body), and any error is `KEEP`."""
        ctx = self.delivery.context
        # An LMTP domain's mailboxes are filtered by its LMTP server (SPEC 14).
        mailboxes = [m for m in final_mailboxes(self.routes) if m[0].lmtp is None]
        # A mailbox the (inotify-kept) cache knows has no script costs no hop.
        needs_thread = getattr(ctx.filters, "needs_thread", None)
        if needs_thread is not None:
            mailboxes = [m for m in mailboxes if needs_thread(m[0])]
        if not mailboxes:
            return {}

        def read_body(limit: int) -> bytes:
            taken, size = [], 0
            for chunk in _after_blank_line(self.body.chunks()):
                taken.append(chunk[: limit - size])
                size += len(taken[-1])
                if size >= limit:
                    break
            return b"".join(taken)

        size = len(self.header) + self.body.size

        def run(dest: MailboxDestination, given: str) -> Any:
            # The header section as the mailbox's copy will have it.
            head = b"".join(self._copy_trace(dest, given) + extra) + header
            return ctx.filters.outcome(
                dest, self.sender, given, head, read_body, size=size, queue_id=self.queue_id
            )

        def run_all() -> dict[str, FilterOutcome]:
            # One hop to the pool for all the mailboxes: each hand-off between
            # the reactor and a thread costs more than a script-less mailbox's check.
            outcomes: dict[str, FilterOutcome] = {}
            for dest, given in mailboxes:
                try:
                    outcomes[dest.address] = run(dest, given)
                except Exception:
                    log.failure(
                        "{qid}: filters of {mailbox} failed; keeping the message in INBOX",
                        qid=self.queue_id,
                        mailbox=dest.address,
                    )
                    outcomes[dest.address] = KEEP
            return outcomes

        found: dict[str, FilterOutcome] = yield deferToThreadPool(
            ctx.reactor, ctx.disk_pool, run_all
        )
        # Logged by _filed once the plan is on disk (inbound and submission alike).
        self._outcomes = found
        return found

    def _forward_trace(self, original: str) -> bytes:
        """Delivered-To and Received for a forwarded copy, as for a mailbox; not Return-Path."""
        return b"".join(self._trace_headers(ForwardDestination(original))[1:])

    def _copy_trace(self, dest: Any, original: str) -> list[bytes]:
        return self._trace_headers(dest, original)

    def _lmtp_trace(self, hop: Hop, extra: list[bytes]) -> bytes:
        """A mailbox copy's trace for an LMTP server: without Return-Path and
        Delivered-To, which it writes itself (RFC 2033 hands it the envelope),
        with our Authentication-Results (``extra``) for its filters."""
        trace = self._copy_trace(ForwardDestination(hop.address), hop.original)
        kept = [f for f in trace if not f.startswith((b"Return-Path:", b"Delivered-To:"))]
        return b"".join(kept + extra)

    def _envelope_results(self, verdict: Any) -> dict[str, str | None]:
        """The SPF and DMARC results a queue entry keeps: a bounce goes only to a
        sender they authenticate (dsn.notice_refusal: no backscatter)."""
        spf = getattr(verdict, "spf", None)
        dmarc = getattr(verdict, "dmarc", None)
        return {
            "spf": spf.result if spf is not None else None,
            "dmarc": dmarc.result if dmarc is not None else None,
        }

    @defer.inlineCallbacks
    def _filing(
        self, decision: Decision, header: bytes, extra: list[bytes], verdict: Any
    ) -> Generator[defer.Deferred, Any, tuple[Filing, list[QueueCopy]]]:
        """The decision's plan as one all-or-none `Filing`, and its queue entries.

        Each copy gets our trace fields; each forwarded copy our Received and
        a Delivered-To naming the address it was sent to (as Postfix does
        when an alias forwards), and no Return-Path (RFC 5321 4.4: that is
        the final delivery's).  Below them the message goes out byte for
        byte, so DKIM signatures still verify.
        """
        ctx = self.delivery.context
        config = ctx.config
        copies = [
            MaildirCopy(
                copy.destination.maildir_path(config),
                maildir.unique_name(self.queue_id, n, config.hostname),
                _lf(b"".join(self._copy_trace(copy.destination, copy.original) + extra) + header),
                folder=f".{copy.folder}" if copy.folder else None,
                flags=copy.flags,
            )
            for n, copy in enumerate(decision.copies)
        ]
        entries: list[QueueCopy] = []
        notices = 0
        for outgoing in decision.outgoing:
            if ctx.outbound is None:
                raise RuntimeError("forwarding without an outbound queue")
            if outgoing.content is Content.MESSAGE:
                forwards = [
                    (hop.original, hop.address, self._forward_trace(hop.original))
                    for hop in outgoing.hops
                    if hop.transport is Transport.SMTP
                ]
                lmtp = [
                    (hop.original, hop.address, self._lmtp_trace(hop, extra), hop.endpoint or "")
                    for hop in outgoing.hops
                    if hop.transport is Transport.LMTP
                ]
                envelope = ctx.outbound.envelope_for(
                    self.queue_id,
                    self.sender,
                    self.delivery.session.helo or "",
                    forwards,
                    lmtp=lmtp,
                    **self._envelope_results(verdict),
                )
                entries.append(QueueCopy(ctx.outbound.queue.root, envelope, header))
                continue
            notices += 1
            [hop] = outgoing.hops
            if outgoing.content is Content.VACATION:
                assert outgoing.vacation is not None
                message = outgoing.vacation.message
            else:
                message = dsn.reject_notice(
                    config.hostname,
                    self.queue_id,
                    self.sender,
                    outgoing.mailbox,
                    outgoing.reason,
                    header,
                    ctx.reactor.seconds(),
                )
            signed: bytes = yield deferToThreadPool(
                ctx.reactor, ctx.disk_pool, dkimkeys.sign_if_configured, config, message
            )
            more_copies, more_entries = ctx.outbound.notice_parts(
                f"{self.queue_id}N{notices}", hop.address, "notice", signed
            )
            copies += more_copies
            entries += more_entries
        return Filing(copies, entries, self.body), entries

    def _filed(
        self, decision: Decision, filing: Filing, entries: list[QueueCopy], filed: list[Path]
    ) -> None:
        """The message is on disk: start its queue entries, log its copies."""
        ctx = self.delivery.context
        _log_filter_actions(self.queue_id, self._outcomes, decision)
        for entry in entries:
            ctx.outbound.submitted(
                entry.envelope, filing.entry_data(entry, ctx.outbound.send_from_memory)
            )
        for outgoing in decision.outgoing:
            if outgoing.vacation is not None and ctx.filters is not None:
                # Queued: the sender gets no other reply this period (RFC 5230 4.6).
                deferToThreadPool(
                    ctx.reactor, ctx.disk_pool, ctx.filters.record_vacation, outgoing.vacation
                ).addErrback(
                    lambda f: log.failure(
                        "{qid}: cannot record the vacation reply", f, qid=self.queue_id
                    )
                )
        # The decision's copies come first in the filing, in order.
        for copy, path in zip(decision.copies, filed, strict=False):
            dest = copy.destination
            log.info(
                "{qid}: delivered to=<{address}> mailbox={mailbox}{folder}",
                qid=self.queue_id,
                path=str(path),
                address=dest.address,
                mailbox=f"{dest.domain}/{dest.mailbox}",
                folder=f" folder={copy.folder}" if copy.folder else "",
                event="delivery",
                kind="maildir",
                status="sent",
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
            f"\tfor <{dest.address}>; {headers.date_now()}\r\n"
        )
        trace = [f"Return-Path: <{quote_path(self.sender)}>\r\n".encode()]
        if original is not None:
            # SPEC 4: the RCPT address as given, before alias expansion and
            # subaddress stripping, so filters can sort on me+news@.
            trace.append(f"X-Original-To: {_UNSAFE_ADDRESS.sub('?', original)}\r\n".encode())
        trace += [f"Delivered-To: {dest.address}\r\n".encode(), received.encode("utf-8")]
        return trace


def _filter_actions(
    outcomes: dict[str, FilterOutcome], decision: Decision
) -> Iterator[dict[str, str]]:
    """Each action a mailbox's filters took, as the decision applied it; none for
    a mailbox whose filters kept the message in INBOX unchanged (no script, or
    only the implicit keep)."""
    replying = {o.mailbox for o in decision.outgoing if o.content is Content.VACATION}
    for mailbox, outcome in outcomes.items():
        if outcome == KEEP:
            continue
        if outcome.reject is not None:
            reason = " ".join(outcome.reject.split())[:200]  # one log line
            yield {"mailbox": mailbox, "action": "reject", "target": reason}
            continue
        for copy in outcome.copies:
            yield {
                "mailbox": mailbox,
                "action": "fileinto" if copy.folder else "keep",
                "folder": copy.folder or "INBOX",
                "flags": copy.flags,
            }
        for address in outcome.redirects:
            yield {"mailbox": mailbox, "action": "redirect", "target": address}
        if not outcome.copies and not outcome.redirects:
            yield {"mailbox": mailbox, "action": "discard"}
        if outcome.vacation is not None and mailbox in replying:
            yield {"mailbox": mailbox, "action": "vacation", "target": outcome.vacation.recipient}


def _log_filter_actions(
    queue_id: str, outcomes: dict[str, FilterOutcome], decision: Decision
) -> None:
    """One line per filter action, for the log and `mailxctl trace` (``event="filter"``)."""
    for action in _filter_actions(outcomes, decision):
        where = action.get("folder") or action.get("target") or ""
        flags = f" flags={action['flags']}" if action.get("flags") else ""
        log.info(
            "{qid}: filter of {mailbox}: {action}{where}{flags_shown}",
            qid=queue_id,
            where=f" {where}" if where else "",
            flags_shown=flags,
            event="filter",
            **action,
        )


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


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")
