# -*- test-case-name: tests.test_srs -*-
"""SRS: what we sign we can reverse; what we did not sign, or signed too long ago, we refuse."""

from __future__ import annotations

import random
import string

import srslib
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.config import load_config_text
from mailx.inbound.routing import ForwardDestination
from mailx.outbound.srs import HASH_LENGTH, SRS, SRSError, is_srs, srs_route
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError

DAY = 86400.0
NOW = 1_750_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(secrets: tuple[str, ...] = ("s3cret",), clock: Clock | None = None) -> SRS:
    return SRS(secrets, clock=clock or Clock())


class ForwardTests(unittest.TestCase):
    def test_forward_makes_srs0_at_our_domain(self) -> None:
        address = make().forward("alice@sender.test", "example.test")
        pattern = rf"^SRS0=[^=]{{{HASH_LENGTH}}}=[A-Z2-7]{{2}}=sender\.test=alice@example\.test$"
        self.assertRegex(address, pattern)

    def test_null_sender_stays_null(self) -> None:
        self.assertEqual(make().forward("", "example.test"), "")

    def test_reverse_gives_the_original_sender(self) -> None:
        srs = make()
        self.assertEqual(
            srs.reverse(srs.forward("alice@sender.test", "example.test")), "alice@sender.test"
        )

    def test_reverse_ignores_case(self) -> None:
        # Our own routing folds local parts; so do many MTAs on the way back.
        srs = make()
        address = srs.forward("Alice@Sender.test", "example.test")
        self.assertEqual(srs.reverse(address.lower()), "alice@sender.test")

    def test_srs0_of_another_forwarder_becomes_srs1(self) -> None:
        theirs = SRS(("other-secret",), clock=Clock()).forward("alice@sender.test", "hop1.test")
        ours = make().forward(theirs, "example.test")
        self.assertTrue(ours.startswith("SRS1="))
        self.assertEqual(make().reverse(ours).lower(), theirs.lower())

    @given(st.from_regex(r"[a-z0-9_+-]{1,10}(\.[a-z0-9_+-]{1,10}){0,2}", fullmatch=True))
    def test_round_trip(self, local: str) -> None:
        srs = make()
        sender = f"{local}@sender.test"
        self.assertEqual(srs.reverse(srs.forward(sender, "example.test")), sender)


class ReverseRefusalTests(unittest.TestCase):
    def test_tampered_address_is_refused(self) -> None:
        address = make().forward("alice@sender.test", "example.test")
        forged = address.replace("=alice@", "=mallory@")
        self.assertRaises(SRSError, make().reverse, forged)

    def test_other_secret_is_refused(self) -> None:
        address = SRS(("not-ours",), clock=Clock()).forward("alice@sender.test", "example.test")
        self.assertRaises(SRSError, make().reverse, address)

    def test_short_hash_is_refused_even_when_its_prefix_matches(self) -> None:
        # srslib alone accepts any prefix of the right hash (research notes 8).
        srs = make()
        address = srs.forward("alice@sender.test", "example.test")
        _, hash_, rest = address.split("=", 2)
        for n in range(1, HASH_LENGTH):
            with self.subTest(length=n):
                self.assertRaises(SRSError, srs.reverse, f"SRS0={hash_[:n]}={rest}")

    def test_random_short_hashes_never_pass(self) -> None:
        srs = make()
        rng = random.Random(7)
        ts = srs.forward("a@b.test", "example.test").split("=")[2]
        alphabet = string.ascii_letters + string.digits + "+/"
        for _ in range(2000):
            guess = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
            self.assertRaises(
                SRSError, srs.reverse, f"SRS0={guess}={ts}=victim.test=anyone@example.test"
            )

    def test_expired_timestamp_is_refused(self) -> None:
        clock = Clock()
        srs = make(clock=clock)
        address = srs.forward("alice@sender.test", "example.test")
        clock.now += 20 * DAY
        self.assertEqual(srs.reverse(address), "alice@sender.test")
        clock.now += 2 * DAY
        self.assertRaises(SRSError, srs.reverse, address)

    def test_not_srs_is_refused(self) -> None:
        self.assertRaises(SRSError, make().reverse, "alice@example.test")

    def test_hash_length_below_minimum_cannot_be_configured(self) -> None:
        self.assertRaises(ValueError, SRS, ("s",), hash_length=HASH_LENGTH - 1)

    def test_no_secret_cannot_be_configured(self) -> None:
        self.assertRaises(ValueError, SRS, ())


class RotationTests(unittest.TestCase):
    def test_first_secret_signs(self) -> None:
        address = SRS(("new", "old"), clock=Clock()).forward("a@sender.test", "example.test")
        self.assertEqual(SRS(("new",), clock=Clock()).reverse(address), "a@sender.test")
        self.assertRaises(SRSError, SRS(("old",), clock=Clock()).reverse, address)

    def test_old_secrets_still_verify(self) -> None:
        old = SRS(("old",), clock=Clock()).forward("a@sender.test", "example.test")
        self.assertEqual(SRS(("new", "old"), clock=Clock()).reverse(old), "a@sender.test")



class FieldBindingTests(unittest.TestCase):
    """The hash binds each field: re-splitting a genuine address gives another hash."""

    def test_moving_a_character_from_host_to_local_part_is_refused(self) -> None:
        srs = make()
        genuine = srs.forward("mvictim@victim.co", "example.test")
        self.assertEqual(srs.reverse(genuine), "mvictim@victim.co")
        forged = genuine.replace("=victim.co=mvictim@", "=victim.com=victim@")
        self.assertRaises(SRSError, srs.reverse, forged)

    def test_resplitting_an_srs1_address_is_refused(self) -> None:
        srs = make()
        theirs = SRS(("other",), clock=Clock()).forward("x@b.test", "a-b.test")
        genuine = srs.forward(theirs, "example.test")  # SRS1=H=a-b.test==HHH=TT=b.test=x@
        self.assertTrue(srs.reverse(genuine).lower().endswith("@a-b.test"))
        forged = genuine.replace("=a-b.test==", "=a=-b.test=")
        self.assertRaises(SRSError, srs.reverse, forged)

    def test_srslib_alone_accepts_the_collision(self) -> None:
        # What the binding closes (and what these tests would fail without).
        old = srslib.SRS("s3cret", hash_length=HASH_LENGTH)
        genuine = old.forward("mvictim@victim.co", "example.test")
        forged = genuine.replace("=victim.co=mvictim@", "=victim.com=victim@")
        self.assertEqual(old.reverse(forged), "victim@victim.com")

    def test_address_minted_before_still_reverses_within_its_validity(self) -> None:
        clock = Clock()
        srs = make(clock=clock)
        old = srslib.SRS("s3cret", hash_length=HASH_LENGTH)
        old._time_fn = clock
        address = old.forward("alice@sender.test", "example.test")
        self.assertEqual(srs.reverse(address), "alice@sender.test")
        clock.now += 22 * DAY
        self.assertRaises(SRSError, srs.reverse, address)

    def test_srs1_minted_before_reverses_while_the_first_hops_timestamp_is_valid(self) -> None:
        clock = Clock()
        srs = make(clock=clock)
        old = srslib.SRS("s3cret", hash_length=HASH_LENGTH)
        old._time_fn = clock
        theirs = SRS(("other",), clock=clock).forward("x@b.test", "hop1.test")
        address = old.forward(theirs, "example.test")
        self.assertEqual(srs.reverse(address).lower(), theirs.lower())
        clock.now += 22 * DAY
        self.assertRaises(SRSError, srs.reverse, address)

    def test_only_the_bound_form_is_minted(self) -> None:
        old = srslib.SRS("s3cret", hash_length=HASH_LENGTH)
        old._time_fn = Clock()
        self.assertNotEqual(
            make().forward("alice@sender.test", "example.test"),
            old.forward("alice@sender.test", "example.test"),
        )


CONFIG = """
hostname: mx.example.test
domains:
  example.test:
    mailboxes: [alice]
    aliases: {postmaster: alice}
  example.org:
    alias_of: example.test
"""


class RouteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = load_config_text(CONFIG, "/tmp/mailx.yaml")
        self.srs = make()

    def test_valid_srs_address_routes_to_the_original_sender(self) -> None:
        address = self.srs.forward("alice@sender.test", "example.test")
        decision = srs_route(self.srs, self.config, address.lower())
        self.assertEqual(decision.destinations, (ForwardDestination("alice@sender.test"),))

    def test_srs_address_at_an_alias_domain_is_ours_too(self) -> None:
        address = self.srs.forward("alice@sender.test", "example.org")
        decision = srs_route(self.srs, self.config, address.lower())
        self.assertEqual(decision.destinations, (ForwardDestination("alice@sender.test"),))

    def test_forged_srs_address_is_refused_with_550_5_7_1(self) -> None:
        with self.assertRaises(SMTPReplyError) as caught:
            srs_route(self.srs, self.config, "srs0=abcdef=aa=victim.test=anyone@example.test")
        self.assertEqual(caught.exception.reply, replies.SRS_FORGED)

    def test_ordinary_address_is_not_srs(self) -> None:
        self.assertIsNone(srs_route(self.srs, self.config, "alice@example.test"))

    def test_srs_address_at_a_foreign_domain_is_left_to_routing(self) -> None:
        address = self.srs.forward("alice@sender.test", "elsewhere.test")
        self.assertIsNone(srs_route(self.srs, self.config, address.lower()))

    def test_without_srs_configured_nothing_is_srs(self) -> None:
        self.assertIsNone(
            srs_route(None, self.config, "srs0=abcdef=aa=victim.test=anyone@example.test")
        )

    def test_is_srs(self) -> None:
        self.assertTrue(is_srs("SRS0=x=y=z=w@example.test"))
        self.assertTrue(is_srs("srs1+x@example.test"))
        self.assertFalse(is_srs("srs@example.test"))
        self.assertFalse(is_srs("srs0@example.test"))
