# -*- test-case-name: tests.test_client_pipelining -*-
"""RFC 2920 in the outbound client: the envelope in one write, the outcome lock-step's.

Against the real sink over loopback (its ``reads`` tell one write from a
command per round trip), and, for the decision, hypothesis over every
mix of replies a server could give, each session run twice over a
StringTransport, pipelined and lock-step, with the same scripted server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailx.outbound.lmtp import LMTPClientProtocol
from mailx.outbound.relay import (
    ClientSettings,
    HostFailure,
    SessionResult,
    SMTPClientProtocol,
    Transaction,
)
from mailx.storage.queue import DELIVERED, FAILED
from mailx.testing import ENTRY_LINE
from tests.test_outbound import FAST, OutboundCase, wait_until

RECIPIENTS = ("a@outside.test", "b@outside.test", "c@outside.test")


def verbs(commands: list[bytes]) -> list[bytes]:
    return [c.split(b" ")[0].split(b":")[0] for c in commands]


class PipelinedSessionTests(OutboundCase):
    """The sink offers PIPELINING (its default)."""

    def read_with(self, verb: bytes) -> list[bytes]:
        [read] = [r for r in self.sink.reads if verbs(r)[0] == verb]
        return verbs(read)

    @defer.inlineCallbacks
    def test_mail_every_rcpt_and_data_arrive_in_one_read(self) -> None:
        envelope = self.submit(recipients=RECIPIENTS)
        [message] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.read_with(b"MAIL"), [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"])
        self.assertEqual(message.recipients, list(RECIPIENTS))
        self.assertIn(b"Subject: hello", message.data)

    @defer.inlineCallbacks
    def test_a_refused_recipient_fails_alone(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user", address="b@outside.test")
        self.sink.script("rcpt", "451 4.2.0 later", address="c@outside.test")
        envelope = self.submit(recipients=RECIPIENTS, sender="")
        [message] = yield self.sink.wait_for(1)
        yield self.settle(envelope)
        self.assertEqual(message.recipients, ["a@outside.test"])
        states = {r.address: r.state for r in envelope.recipients}
        self.assertEqual(states["a@outside.test"], DELIVERED)
        self.assertEqual(states["b@outside.test"], FAILED)
        self.assertTrue(envelope.pending)  # c is retried later

    @defer.inlineCallbacks
    def test_no_data_is_sent_when_every_recipient_is_refused(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no", "550 5.1.1 no")
        envelope = self.submit(recipients=RECIPIENTS[:2], sender="")
        yield self.gone(envelope)
        self.assertEqual(self.read_with(b"MAIL"), [b"MAIL", b"RCPT", b"RCPT", b"DATA"])
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.sink.unaddressed_data, [])  # the DATA got a 503: nothing to end

    @defer.inlineCallbacks
    def test_a_reused_connection_pipelines_rset_with_the_next_mail(self) -> None:
        # Every RCPT refused leaves the transaction open: RSET before the next.
        self.sink.script("rcpt", "550 5.1.1 no")
        first = self.submit(sender="")
        yield self.gone(first)
        yield self.wait_idle()
        second = self.submit(queue_id="65F00000000002")
        [message] = yield self.sink.wait_for(1)
        yield self.gone(second)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.read_with(b"RSET"), [b"RSET", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(message.connection, 1)

    def wait_idle(self) -> defer.Deferred:
        return wait_until(lambda: self.outbound._idle_count == 1)


class DataAcceptedWithoutRecipientsTests(OutboundCase):
    """RFC 2920 3.1: a server may answer a pipelined DATA with 354 though no RCPT succeeded."""

    sink_options = {"data_without_recipients": True}

    @defer.inlineCallbacks
    def test_a_lone_dot_ends_it_and_the_connection_serves_the_next(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no", "550 5.1.1 no")
        first = self.submit(recipients=RECIPIENTS[:2], sender="")
        yield self.gone(first)
        self.assertEqual(self.sink.unaddressed_data, [0])  # a lone dot, no content
        self.assertEqual(self.sink.messages, [])
        self.assertTrue(all(r.state == FAILED for r in first.recipients))
        yield wait_until(lambda: self.outbound._idle_count == 1)
        second = self.submit(queue_id="65F00000000002")
        [message] = yield self.sink.wait_for(1)
        yield self.gone(second)
        # The dot's reply ended the transaction (RFC 5321 4.1.1.4): no RSET.
        self.assertNotIn(b"RSET", self.sink.commands)
        self.assertEqual(message.connection, 1)
        self.assertIn(b"Subject: hello", message.data)


class LockStepTests(OutboundCase):
    sink_options = {"pipelining": False}

    @defer.inlineCallbacks
    def test_without_pipelining_each_command_waits_for_its_reply(self) -> None:
        envelope = self.submit(recipients=RECIPIENTS)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        transaction = [r for r in self.sink.reads if verbs(r)[0] in (b"MAIL", b"RCPT", b"DATA")]
        self.assertEqual(
            [verbs(r) for r in transaction],
            [[b"MAIL"], [b"RCPT"], [b"RCPT"], [b"RCPT"], [b"DATA"]],
        )


# ---------------------------------------------------------------------------
# Pipelined and lock-step decide alike


@dataclass
class Script:
    """One transaction's replies; RCPT replies in order, used only once MAIL succeeded."""

    mail: str
    rcpts: list[str]
    data: str
    end: str
    data_anyway: bool  # 354 to DATA even with no recipient accepted


@dataclass
class ScriptedServer:
    """A minimal, honest SMTP server playing ``scripts`` one transaction after another."""

    scripts: list[Script]
    pipelining: bool
    buffer: bytes = b""
    transaction: int = -1
    mail_ok: bool = False
    rcpts_seen: int = 0
    accepted: int = 0
    in_data: bool = False
    closed: bool = False
    delivered: list[int] = field(default_factory=list)

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out: list[str] = []
        while b"\r\n" in self.buffer and not self.closed:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            out.extend(self.answer(line))
        return b"".join(r.encode() + b"\r\n" for r in out)

    def answer(self, line: bytes) -> list[str]:
        if self.in_data:
            if line != b".":
                return []
            self.in_data = False
            script = self.scripts[self.transaction]
            reply = script.end if self.accepted else "554 5.5.1 No valid recipients"
            if self.accepted and reply.startswith("2"):
                self.delivered.append(self.transaction)
            self.mail_ok, self.accepted = False, 0
            return [reply]
        verb = line.split(b" ")[0].split(b":")[0].upper()
        if verb == b"EHLO":
            return ["250-hi", "250-PIPELINING", "250 8BITMIME"] if self.pipelining else ["250 hi"]
        if verb == b"RSET":
            self.mail_ok, self.accepted = False, 0
            return ["250 2.0.0 ok"]
        if verb == b"QUIT":
            self.closed = True
            return ["221 bye"]
        if verb == b"MAIL":
            self.transaction += 1
            self.rcpts_seen = 0
            reply = self.scripts[self.transaction].mail
            self.mail_ok = reply.startswith("2")
            self.closed = reply.startswith("421")
            return [reply]
        script = self.scripts[self.transaction] if self.transaction >= 0 else None
        if verb == b"RCPT":
            if not self.mail_ok or script is None:
                return ["503 5.5.1 MAIL first"]
            reply = script.rcpts[self.rcpts_seen]
            self.rcpts_seen += 1
            self.accepted += reply.startswith("2")
            return [reply]
        if verb == b"DATA":
            if not self.mail_ok or script is None:
                return ["503 5.5.1 MAIL first"]
            if not self.accepted and not script.data_anyway:
                return ["554 5.5.1 No valid recipients"]
            self.in_data = script.data.startswith("354")
            return [script.data]
        return ["502 5.5.1 what"]


def run_sessions(
    path: Path, recipient_counts: list[int], scripts: list[Script], pipelining: bool
) -> tuple[list[Any], ScriptedServer, list[bytes]]:
    """Each transaction on one connection (reused while the client keeps it); outcomes, server, writes."""
    server = ScriptedServer(scripts, pipelining)
    transport = StringTransport()
    transactions = [
        Transaction("s@example.test", RECIPIENTS[:n], b"X: y\r\n", path, 20, False)
        for n in recipient_counts
    ]
    client = SMTPClientProtocol(
        transactions[0],
        ClientSettings("mx.example.test", FAST, task.Clock(), idle=lambda _: True),
        "sink",
    )
    outcomes: list[Any] = []
    writes: list[bytes] = []

    def pump(replies: bytes) -> None:
        while replies:
            client.dataReceived(replies)
            while transport.producer is not None:
                transport.producer.resumeProducing()
            sent = transport.value()
            transport.clear()
            writes.append(sent)
            replies = server.feed(sent)
            if server.closed and not transport.disconnecting:
                client.dataReceived(replies)
                client.connectionLost(Failure(ConnectionError("closed")))
                return

    def outcome_of(done: defer.Deferred) -> Any:
        box: list[Any] = []
        done.addBoth(box.append)
        return box[0] if box else None

    client.makeConnection(transport)
    done = client.done
    pump(b"220 hi\r\n")
    outcomes.append(outcome_of(done))
    for transaction in transactions[1:]:
        if not client.idle:
            break
        done = client.reuse(transaction)
        sent = transport.value()
        transport.clear()
        writes.append(sent)
        pump(server.feed(sent))
        outcomes.append(outcome_of(done))
    return outcomes, server, writes


def summary(outcome: Any) -> Any:
    if isinstance(outcome, SessionResult):
        return {a: (r.code, r.enhanced) for a, r in outcome.replies.items()}
    if isinstance(outcome, Failure):
        outcome.trap(HostFailure)
        return ("host failure", outcome.value.reply.code)
    return outcome


REPLIES = {
    "mail": st.sampled_from(["250 2.1.0 ok", "451 4.3.0 later", "553 5.7.1 no sender", "421 4.3.2 bye"]),
    "rcpt": st.sampled_from(
        ["250 2.1.5 ok", "251 2.1.5 forwarded", "450 4.2.1 busy", "550 5.1.1 unknown", "552 5.2.2 full"]
    ),
    "data": st.sampled_from(["354 go", "451 4.3.0 later", "554 5.7.1 no"]),
    "end": st.sampled_from(["250 2.0.0 queued", "452 4.3.1 full", "552 5.3.4 too big"]),
}


@st.composite
def sessions(draw: Any) -> tuple[list[int], list[Script]]:
    counts = draw(st.lists(st.integers(1, len(RECIPIENTS)), min_size=1, max_size=3))
    scripts = [
        Script(
            mail=draw(REPLIES["mail"]),
            rcpts=draw(st.lists(REPLIES["rcpt"], min_size=n, max_size=n)),
            data=draw(REPLIES["data"]),
            end=draw(REPLIES["end"]),
            data_anyway=draw(st.booleans()),
        )
        for n in counts
    ]
    return counts, scripts


class SameOutcomeTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(sessions())
    def test_pipelined_outcomes_are_lock_steps(self, session: tuple[list[int], list[Script]]) -> None:
        counts, scripts = session
        path = Path(self.mktemp())
        path.write_bytes(ENTRY_LINE + b"Subject: x\r\n\r\n.dot\r\n")
        lock_step, lock_server, _ = run_sessions(path, counts, scripts, pipelining=False)
        pipelined, pipe_server, writes = run_sessions(path, counts, scripts, pipelining=True)
        self.assertEqual([summary(o) for o in pipelined], [summary(o) for o in lock_step])
        self.assertEqual(pipe_server.delivered, lock_server.delivered)
        self.assertNotIn(None, pipelined, "a transaction left undecided")
        # The envelope went in one write: MAIL ... DATA, RSET first on a reused connection.
        for sent in writes:
            lines = sent.split(b"\r\n")[:-1]
            if any(line.startswith(b"MAIL") for line in lines):
                self.assertEqual(verbs(lines)[-1], b"DATA")
                self.assertIn(verbs(lines)[0], (b"MAIL", b"RSET"))


class LMTPPipeliningTests(unittest.TestCase):
    """RFC 2033 4.1 makes PIPELINING mandatory for LMTP servers: the LMTP client groups too."""

    def test_lhlo_offering_pipelining_gets_the_envelope_in_one_write(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(ENTRY_LINE + b"Subject: hi\r\n\r\nbody\r\n")
        transaction = Transaction("bob@example.org", RECIPIENTS[:2], b"", path, 30, False)
        client = LMTPClientProtocol(
            transaction, ClientSettings("mx.example.test", FAST, task.Clock()), "lmtp"
        )
        transport = StringTransport()
        client.makeConnection(transport)
        results: list[Any] = []
        client.done.addBoth(results.append)

        def server(*lines: bytes) -> bytes:
            transport.clear()
            client.dataReceived(b"".join(line + b"\r\n" for line in lines))
            while transport.producer is not None:
                transport.producer.resumeProducing()
            return transport.value()

        server(b"220 lmtp")
        self.assertEqual(
            server(b"250-lmtp", b"250-PIPELINING", b"250 ENHANCEDSTATUSCODES"),
            b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<a@outside.test>\r\n"
            b"RCPT TO:<b@outside.test>\r\nDATA\r\n",
        )
        sent = server(b"250 2.1.0 ok", b"250 2.1.5 ok", b"550 5.1.1 unknown", b"354 go")
        self.assertEqual(sent, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        # One reply after the data per accepted recipient: only a@.
        self.assertEqual(server(b"250 2.0.0 <a@outside.test> saved"), b"QUIT\r\n")
        [result] = results
        self.assertEqual(result.replies["a@outside.test"].code, 250)
        self.assertEqual(result.replies["b@outside.test"].code, 550)


class PostfixPeerTests(unittest.TestCase):
    """The client against a real Postfix smtpd (bench/peer_postfix.py's maildir mode).

    Skipped without Postfix or root.  Postfix offers PIPELINING and logs
    "improper command pipelining" for a client that gets it wrong.
    """

    timeout = 120

    def setUp(self) -> None:
        # Here, not at the top: the import loads bench/peer_postfix.py.
        from tests.test_bench_postfix import _free_port, peer_postfix

        if not peer_postfix.installed():
            raise unittest.SkipTest("Postfix not installed")
        if os.geteuid() != 0:
            raise unittest.SkipTest("Postfix's master starts as root")
        # Not under _trial_temp: Postfix's socket paths must stay under 108 bytes.
        directory = Path(tempfile.mkdtemp(prefix="mailx-pf-", dir="/var/tmp"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.port = _free_port()
        self.inst = peer_postfix.Instance(
            directory / "postfix", self.port, "maildir", mail=directory / "mail"
        )
        proc = peer_postfix.start(self.inst)
        self.addCleanup(peer_postfix.stop, proc)
        self.data = directory / "message"
        self.data.write_bytes(ENTRY_LINE + b"From: x@client.test\r\nSubject: piped\r\n\r\n.dot\r\n")

    def session(self, recipients: tuple[str, ...]) -> defer.Deferred:
        transaction = Transaction("x@client.test", recipients, b"", self.data, 40, False)
        client = SMTPClientProtocol(
            transaction, ClientSettings("client.test", FAST, reactor), "postfix"
        )
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        return client.done.addCallback(lambda result: (client, result))

    @defer.inlineCallbacks
    def test_each_recipient_gets_postfixs_own_reply(self) -> Any:
        client, result = yield self.session(
            ("alice@bench.test", "nobody@bench.test", "someone@elsewhere.test")
        )
        self.assertIn("PIPELINING", client.extensions)
        codes = {a: r.code for a, r in result.replies.items()}
        self.assertEqual(codes["alice@bench.test"], 250)
        self.assertEqual(codes["nobody@bench.test"] // 100, 5)
        self.assertEqual(codes["someone@elsewhere.test"] // 100, 5)
        self.assertIn("queued as", result.replies["alice@bench.test"].text)
        new = self.inst.directory.parent / "mail" / "bench.test" / "alice" / "new"
        yield wait_until(lambda: new.is_dir() and any(new.iterdir()), timeout=30)
        [filed] = list(new.iterdir())
        self.assertIn(b"Subject: piped\n", filed.read_bytes())
        self.assertTrue(filed.read_bytes().endswith(b"\n\n.dot\n"))  # unstuffed by Postfix
        yield self.assert_no_pipelining_complaint()

    def assert_no_pipelining_complaint(self) -> defer.Deferred:
        def logged() -> bool:
            return self.inst.log.exists() and "reject: RCPT" in self.inst.log.read_text()

        d = wait_until(logged, timeout=30)  # the session's lines are in the log
        d.addCallback(
            lambda _: self.assertNotIn("improper command pipelining", self.inst.log.read_text())
        )
        return d

    @defer.inlineCallbacks
    def test_every_recipient_refused_ends_without_data(self) -> Any:
        _, result = yield self.session(("nobody@bench.test", "someone@elsewhere.test"))
        self.assertEqual({r.code // 100 for r in result.replies.values()}, {5})
        yield self.assert_no_pipelining_complaint()
