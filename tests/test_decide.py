# -*- test-case-name: tests.test_decide -*-
"""The pipeline's decision, without sockets, threads or disk: invariants over its inputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.address import Address
from mailx.checks import Verdict
from mailx.checks.policy import Action
from mailx.filters.outcome import KEEP, Copy, FilterOutcome, VacationReply
from mailx.inbound.decide import (
    JUNK_FOLDER,
    Content,
    Disposition,
    Sender,
    Transport,
    decide,
    final_mailboxes,
)
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Route
from mailx.smtp import replies

MAILBOXES = [MailboxDestination("example.test", name) for name in ("alice", "bob", "carol")]
# A mailbox of an LMTP domain (SPEC 14): queued for its LMTP server, filtered there.
HANDED = MailboxDestination("lmtp.test", "dave", "unix:/run/dovecot/lmtp")
FORWARDS = [ForwardDestination(a) for a in ("x@elsewhere.test", "y@elsewhere.test")]

destinations = st.lists(st.sampled_from([*MAILBOXES, HANDED, *FORWARDS]), min_size=1, max_size=3, unique=True)
routes = st.lists(
    st.builds(
        lambda local, dests: Route(Address(local, "example.test"), tuple(dests), ()),
        st.sampled_from(["alice", "bob", "carol", "team", "all"]),
        destinations,
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda r: r.address,
)
copies = st.lists(
    st.builds(Copy, st.sampled_from(["", "Work", "Work.Clients"]), st.sampled_from(["", "S", "FS"])),
    max_size=3,
)
vacations = st.none() | st.builds(
    VacationReply,
    st.sampled_from(["sender@remote.test", "other@remote.test"]),
    st.just(b"Subject: away\r\n\r\nback soon\r\n"),
    st.just("key"),
    st.just(86400),
)
outcome = st.one_of(
    st.just(KEEP),
    st.builds(
        FilterOutcome,
        copies=copies.map(tuple),
        redirects=st.lists(st.sampled_from(["r@elsewhere.test", "x@elsewhere.test"]), max_size=2).map(
            tuple
        ),
        vacation=vacations,
    ),
    st.builds(
        lambda reason: FilterOutcome(copies=(), reject=reason),
        st.text(min_size=0, max_size=60),
    ),
)
outcomes = st.fixed_dictionaries({}, optional={m.address: outcome for m in [*MAILBOXES, HANDED]})
senders = st.sampled_from(["", "sender@remote.test"])
actions = st.sampled_from(list(Action))


def verdict_for(action: Action) -> Verdict:
    reply = {Action.REJECT: replies.DMARC_REJECT, Action.TEMPFAIL: replies.DNS_TEMPFAIL}.get(action)
    return Verdict(None, None, None, action, reply, "Authentication-Results: mx.example.test; none")


class DecisionInvariantTests(unittest.TestCase):
    @settings(max_examples=500)
    @given(routes, senders, st.none() | actions, st.booleans(), outcomes)
    def test_invariants(self, routes, sender, action, listed, outcomes) -> None:
        verdict = verdict_for(action) if action is not None else None
        decision = decide("ABC123", sender, routes, verdict, listed=listed, outcomes=outcomes, size=10)
        self.assertEqual(decision, decide("ABC123", sender, routes, verdict, listed=listed, outcomes=outcomes, size=10))
        self.assertEqual(decision.accepted, decision.reply.code == 250)
        self.assertRegex(decision.reply.text, r"\A[ -~]+\Z")
        if action in (Action.REJECT, Action.TEMPFAIL):
            self.assertEqual(decision.reply, verdict.reply)
            self.assertEqual((decision.copies, decision.outgoing), ((), ()))
            return
        junk = listed or action is Action.JUNK
        mailboxes = final_mailboxes(routes)
        dispositions = dict(decision.dispositions)
        # One disposition per final mailbox, however many aliases led there.
        self.assertEqual(sorted(dispositions), sorted(d.address for d, _ in mailboxes))
        forwards = {d.address for r in routes for d in r.destinations if isinstance(d, ForwardDestination)}
        if not decision.accepted:
            # Only every mailbox rejecting, with nothing forwarded, refuses the message.
            self.assertFalse(junk)
            self.assertEqual(forwards, set())
            self.assertEqual(set(dispositions.values()), {Disposition.REJECTED})  # none handed over
            self.assertEqual((decision.reply.code, decision.reply.enhanced), (550, "5.7.1"))
            self.assertEqual((decision.copies, decision.outgoing), ((), ()))
            return
        copied = {c.destination.address for c in decision.copies}
        message_hops = [
            hop for o in decision.outgoing if o.content is Content.MESSAGE for hop in o.hops
        ]
        hopped = {hop.address for hop in message_hops if hop.transport is Transport.SMTP}
        self.assertEqual(len({h.address for h in message_hops}), len(message_hops), "one copy per final address")
        self.assertLessEqual(forwards, hopped)
        lmtp_hops = {
            (h.address, h.endpoint) for h in message_hops if h.transport is Transport.LMTP
        }
        handed = {a for a, d in dispositions.items() if d is Disposition.HANDED_OVER}
        self.assertEqual(handed, {HANDED.address} if HANDED.address in dispositions else set())
        self.assertEqual(lmtp_hops, {(a, HANDED.lmtp) for a in handed})
        for address, disposition in dispositions.items():
            # Every accepted recipient gets a copy or a forward, or its filter said otherwise.
            if disposition is Disposition.HANDED_OVER:
                continue
            if disposition in (Disposition.DELIVERED, Disposition.JUNK):
                self.assertIn(address, copied)
            else:
                self.assertNotIn(address, copied)
            if disposition is Disposition.REDIRECTED:
                # Its redirects are sent (once per address: an alias may forward there too).
                redirects = set(outcomes[address].redirects)
                self.assertTrue(redirects)
                self.assertLessEqual(redirects, hopped)
        for o in decision.outgoing:
            if o.sender is Sender.NULL:
                # Nothing mailx originates goes to the null sender.
                self.assertTrue(sender)
                self.assertTrue(all(h.address for h in o.hops))
            if o.content is Content.REJECT_NOTICE:
                self.assertEqual([h.address for h in o.hops], [sender])
                self.assertEqual(dispositions[o.mailbox], Disposition.REJECTED)
        if junk:
            self.assertEqual(len(decision.copies), len(mailboxes) - len(handed))
            self.assertLessEqual({c.folder for c in decision.copies}, {JUNK_FOLDER})
            self.assertLessEqual(set(dispositions.values()), {Disposition.JUNK, Disposition.HANDED_OVER})
            self.assertEqual(hopped, forwards, "junk is not redirected")
            self.assertEqual([o for o in decision.outgoing if o.sender is Sender.NULL], [])
        else:
            rejected = [a for a, d in dispositions.items() if d is Disposition.REJECTED]
            notices = [o.mailbox for o in decision.outgoing if o.content is Content.REJECT_NOTICE]
            self.assertEqual(sorted(notices), sorted(rejected) if sender else [])

    @given(routes, senders, st.text(max_size=200))
    def test_a_reject_by_every_recipient_is_550_with_the_reason(self, routes, sender, reason) -> None:
        routes = [
            Route(r.address, tuple(d for d in r.destinations if d in MAILBOXES) or (MAILBOXES[0],), ())
            for r in routes
        ]
        rejected = FilterOutcome(copies=(), reject=reason)
        decision = decide(
            "Q1", sender, routes, outcomes={m.address: rejected for m in MAILBOXES}
        )
        self.assertFalse(decision.accepted)
        self.assertEqual((decision.reply.code, decision.reply.enhanced), (550, "5.7.1"))
        printable = " ".join("".join(c if " " <= c <= "~" else " " for c in reason).split())
        if printable:
            self.assertEqual(decision.reply.text, printable[:400])


class DecisionExampleTests(unittest.TestCase):
    def test_no_filters_no_checks_is_one_inbox_copy_per_mailbox(self) -> None:
        route = Route(Address("team", "example.test"), (MAILBOXES[0], MAILBOXES[1], FORWARDS[0]), ())
        decision = decide("Q1", "s@remote.test", [route])
        self.assertEqual(str(decision.reply), "250 2.0.0 OK queued as Q1")
        self.assertEqual([(c.destination, c.original, c.folder) for c in decision.copies], [
            (MAILBOXES[0], "team@example.test", ""), (MAILBOXES[1], "team@example.test", "")
        ])
        [forward] = decision.outgoing
        self.assertEqual((forward.content, forward.sender), (Content.MESSAGE, Sender.MESSAGE))
        self.assertEqual([(h.address, h.original) for h in forward.hops], [("x@elsewhere.test", "team@example.test")])
        self.assertEqual(decision.log["action"], "accepted")

    def test_a_listed_client_is_filed_into_junk(self) -> None:
        route = Route(Address("alice", "example.test"), (MAILBOXES[0],), ())
        decision = decide("Q1", "s@remote.test", [route], listed=True)
        self.assertEqual([c.folder for c in decision.copies], ["Junk"])
        self.assertEqual(decision.dispositions, (("alice@example.test", Disposition.JUNK),))

    def test_a_partial_reject_sends_a_notice_from_the_null_sender(self) -> None:
        routes = [
            Route(Address("alice", "example.test"), (MAILBOXES[0],), ()),
            Route(Address("bob", "example.test"), (MAILBOXES[1],), ()),
        ]
        outcomes = {"bob@example.test": FilterOutcome(copies=(), reject="no thanks\r\nBcc: x")}
        decision = decide("Q1", "s@remote.test", routes, outcomes=outcomes)
        self.assertTrue(decision.accepted)
        [notice] = decision.outgoing
        self.assertEqual((notice.content, notice.sender, notice.mailbox), (Content.REJECT_NOTICE, Sender.NULL, "bob@example.test"))
        self.assertEqual(notice.reason, "no thanks Bcc: x")
        self.assertEqual(decide("Q1", "", routes, outcomes=outcomes).outgoing, ())

    def test_filter_folders_flags_redirects_and_vacation(self) -> None:
        route = Route(Address("alice", "example.test"), (MAILBOXES[0],), ())
        vacation = VacationReply("s@remote.test", b"Subject: away\r\n\r\n", "k", 60)
        outcome = FilterOutcome(
            copies=(Copy("Work.Clients", "FS"), Copy()), redirects=("r@elsewhere.test",), vacation=vacation
        )
        decision = decide("Q1", "s@remote.test", [route], outcomes={"alice@example.test": outcome})
        self.assertEqual([(c.folder, c.flags) for c in decision.copies], [("Work.Clients", "FS"), ("", "")])
        redirect, autoreply = decision.outgoing
        self.assertEqual([(h.address, h.original) for h in redirect.hops], [("r@elsewhere.test", "alice@example.test")])
        self.assertEqual((autoreply.content, autoreply.sender, autoreply.vacation), (Content.VACATION, Sender.NULL, vacation))

    def test_a_dmarc_reject_is_its_reply(self) -> None:
        route = Route(Address("alice", "example.test"), (MAILBOXES[0],), ())
        decision = decide("Q1", "s@remote.test", [route], verdict_for(Action.REJECT))
        self.assertEqual(decision.reply, replies.DMARC_REJECT)
        self.assertEqual(decision.log["action"], "reject")
