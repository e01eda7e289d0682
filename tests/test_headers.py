# -*- test-case-name: tests.test_headers -*-
"""Header-field syntax (mailx.headers): names as mail clients read them, linear
splitting, the bounded From parser, and the server-wide header pool."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx import headers
from mailx.inbound.spool import run_inline

# Generous: the quadratic split took 9 s on 996 KiB of continuation lines,
# the stdlib From parser 33 s on one 60 KB field; linear code takes tens of ms.
GENEROUS = 2.0


def elapsed(func, *args):
    start = time.perf_counter()
    func(*args)
    return time.perf_counter() - start


class FieldNameTests(unittest.SynchronousTestCase):
    def test_plain_name(self):
        self.assertEqual(headers.field_name(b"From: a@b.test\r\n"), b"from")

    def test_space_or_tab_before_the_colon(self):
        # RFC 5322 4.5.8 obs-optional: what Dovecot and most parsers accept.
        self.assertEqual(headers.field_name(b"Authentication-Results : x\r\n"), b"authentication-results")
        self.assertEqual(headers.field_name(b"Authentication-Results\t: x\r\n"), b"authentication-results")

    def test_not_a_field(self):
        for line in (b" continued\r\n", b"no colon here\r\n", b": empty name\r\n", b"\r\n", b""):
            self.assertIsNone(headers.field_name(line), line)
            self.assertFalse(headers.is_field_start(line), line)

    def test_value_and_unfold(self):
        self.assertEqual(headers.field_value(b"Subject :  hi\r\n there\r\n"), b"  hi\r\n there\r\n")
        self.assertEqual(headers.unfold(b" hi\r\n there\r\n"), b" hi there")

    def test_has_field(self):
        self.assertTrue(headers.has_field(b"X: 1\r\nDKIM-Signature : v=1\r\n", b"dkim-signature"))
        self.assertFalse(headers.has_field(b"X-DKIM-Signature: v=1\r\n", b"dkim-signature"))
        self.assertFalse(headers.has_field(b"X: 1\r\n DKIM-Signature: v=1\r\n", b"dkim-signature"))

    def test_field_values_and_count(self):
        header = b"From: a\r\n b\r\nTo: x\r\nfrom\t: c\r\nX-From: d\r\n"
        values, count = headers.field_values(header, b"from")
        self.assertEqual(count, 2)
        self.assertEqual([headers.unfold(v).strip() for v in values], [b"a b", b"c"])
        self.assertEqual(headers.field_values(b"From: x\r\n" * 50, b"from", limit=3)[1], 50)
        self.assertEqual(len(headers.field_values(b"From: x\r\n" * 50, b"from", limit=3)[0]), 3)


class SectionTests(unittest.SynchronousTestCase):
    def test_end_of_header(self):
        self.assertEqual(headers.end_of_header(b"\r\nbody"), 0)
        self.assertEqual(headers.end_of_header(b"A: 1\r\n\r\nbody"), 6)
        self.assertEqual(headers.end_of_header(b"A: 1\r\nB: 2\r\n"), -1)

    def test_end_found_across_a_chunk_boundary(self):
        data = b"A: 1\r\n\r\n"
        for cut in range(1, len(data)):
            self.assertEqual(headers.end_of_header(data, cut), 6, cut)

    def test_header_section_crlf_and_lf(self):
        self.assertEqual(headers.header_section(b"A: 1\r\n\r\nB: body\r\n"), b"A: 1\r\n")
        self.assertEqual(headers.header_section(b"A: 1\n\nB: body\n"), b"A: 1\n")
        self.assertEqual(headers.header_section(b"\r\nbody"), b"")

    def test_split_keeps_continuations(self):
        self.assertEqual(
            headers.split_fields(b"A: 1\r\n 2\r\nB: 3\r\n\tfour\r\n five\r\n"),
            [b"A: 1\r\n 2\r\n", b"B: 3\r\n\tfour\r\n five\r\n"],
        )

    @given(st.lists(st.sampled_from([b"A: x\r\n", b" c\r\n", b"\tt\r\n", b"junk\r\n", b"B : y\r\n"])))
    def test_split_join_round_trips(self, lines):
        header = b"".join(lines)
        fields = headers.split_fields(header)
        self.assertEqual(b"".join(fields), header)
        for f in fields[1:]:
            self.assertNotIn(f[:1], (b" ", b"\t"))

    def test_split_is_linear_on_a_folded_megabyte(self):
        header = b"Subject: x\r\n" + b"\t\r\n" * (996 * 1024 // 3)
        self.assertLess(elapsed(headers.split_fields, header), GENEROUS)
        self.assertEqual(len(headers.split_fields(header)), 1)


class MailboxDomainTests(unittest.SynchronousTestCase):
    def test_forms(self):
        cases = {
            "PayPal <ceo@paypal.test>": ["paypal.test"],
            '"ceo@victim.test" <attacker@evil.test>': ["evil.test"],
            "Alice\r\n <alice@example.test>": ["example.test"],
            "a(comment@x.test)@b.test": ["b.test"],
            "g: a@b.test, c@d.test;, e@f.test": ["b.test", "d.test", "f.test"],
            "<@relay.test:x@y.test>": ["y.test"],
            "a@one.test, b@two.test": ["one.test", "two.test"],
            "undisclosed-recipients:;": [],
            "": [],
        }
        for value, expected in cases.items():
            self.assertEqual(headers.mailbox_domains(value), expected, value)

    def test_unusable_addresses(self):
        for value in ("x@", "nobody", "<x@[192.0.2.1]>", "a@b.test c@d.test", "@b.test", 'x@"y"'):
            self.assertEqual(headers.mailbox_domains(value), [None], value)
        # A single label is a domain here; DMARC refuses it (no registered domain).
        self.assertEqual(headers.mailbox_domains("x@y"), ["y"])

    def test_linear_on_hostile_fields(self):
        for value in ('"' * 60_000, "(" * 60_000, "<" * 60_000, "a@" * 30_000, "\\" * 60_000):
            self.assertLess(elapsed(headers.mailbox_domains, value), GENEROUS)

    def test_past_the_token_bound_the_rest_is_unusable(self):
        value = "ceo@paypal.test, " + "word " * headers.MAX_TOKENS + "x@evil.test"
        self.assertEqual(headers.mailbox_domains(value), ["paypal.test", None])

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["", "Alice", '"Bob, Jr."', "=?utf-8?q?C=C3=A9?="]),
                st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
                st.from_regex(r"[a-z0-9]{1,10}(\.[a-z]{2,5}){1,2}", fullmatch=True),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def test_agrees_with_the_stdlib_on_ordinary_fields(self, mailboxes):
        import email.utils

        value = ", ".join(
            f"{name} <{local}@{domain}>" if name else f"{local}@{domain}"
            for name, local, domain in mailboxes
        )
        expected = [addr.rpartition("@")[2] for _, addr in email.utils.getaddresses([value])]
        self.assertEqual(headers.mailbox_domains(value), expected, value)

    @given(st.text(alphabet='abc@.<>,;:()"\\[] \t', max_size=200))
    def test_never_raises(self, value):
        for domain in headers.mailbox_domains(value):
            self.assertTrue(domain is None or isinstance(domain, str))


class HeaderPoolTests(unittest.SynchronousTestCase):
    def test_reserved_octets_are_free(self):
        pool = headers.HeaderPool(reserved=100, shared=1000)
        self.assertTrue(pool.grow(0, 100))
        self.assertEqual(pool.in_use, 0)

    def test_beyond_the_reservation_draws_on_the_pool_until_it_is_empty(self):
        pool = headers.HeaderPool(reserved=100, shared=1000)
        self.assertTrue(pool.grow(0, 600))
        self.assertTrue(pool.grow(600, 700))  # +100
        self.assertEqual(pool.in_use, 600)
        self.assertTrue(pool.grow(0, 500))  # another session: +400
        self.assertFalse(pool.grow(500, 600))  # would be 1100
        pool.release(700)
        pool.release(500)
        self.assertEqual(pool.in_use, 0)


class _Context:
    def __init__(self, directory):
        from pathlib import Path

        self.incoming = Path(directory)
        self.header_pool = headers.HeaderPool()
        self.in_disk_pool = run_inline  # headers only: no spool file to write


class _Delivery:
    def __init__(self, directory):
        self.context = _Context(directory)


class AccumulationTests(unittest.TestCase):
    """`delivery.IncomingMessage` gathering a header section in small pieces."""

    def feed(self, total: int, piece: int = 99) -> float:
        from mailx.inbound.delivery import IncomingMessage

        directory = self.mktemp()
        import os

        os.makedirs(directory)
        incoming = IncomingMessage(_Delivery(directory), "Q1", "s@x.test", [])
        line = b"X-Pad: " + b"p" * (piece - 9) + b"\r\n"
        chunks = [b"From: a@x.test\r\n"] + [line] * (total // len(line))
        start = time.perf_counter()
        for chunk in chunks:
            incoming.dataReceived(chunk)
        incoming.dataReceived(b"\r\nbody\r\n")
        taken = time.perf_counter() - start
        self.assertFalse(incoming._in_header)
        self.assertEqual(len(incoming.header), 16 + len(line) * (total // len(line)))
        incoming.connectionLost()
        return taken

    def test_time_grows_linearly_with_the_header(self):
        # Appending to bytes and searching all of it per piece was quadratic:
        # eight times the header took some sixty times as long (3.5 s at 1 MiB
        # here); linear is eight.  A shared machine makes small timings noisy
        # (1 to 5 us a piece), hence the floor: still seven times below 3.5 s.
        small = min(self.feed(128 * 1024) for _ in range(5))
        large = min(self.feed(1024 * 1024) for _ in range(5))
        self.assertLess(large, max(small * 24, 0.5), (small, large))

    def test_the_pool_is_drawn_and_given_back(self):
        from mailx.inbound.delivery import IncomingMessage

        directory = self.mktemp()
        import os

        os.makedirs(directory)
        delivery = _Delivery(directory)
        incoming = IncomingMessage(delivery, "Q2", "s@x.test", [])
        incoming.dataReceived(b"From: a@x.test\r\n" + b"X: " + b"y" * 100_000 + b"\r\n")
        self.assertEqual(delivery.context.header_pool.in_use, 16 + len(b"X: \r\n") + 100_000 - 64 * 1024)
        incoming.connectionLost()
        self.assertEqual(delivery.context.header_pool.in_use, 0)


class DateNowTests(unittest.SynchronousTestCase):
    """date_now is formatdate(localtime=True), made once a second."""

    def test_it_is_formatdate_of_this_second(self) -> None:
        from email.utils import formatdate, parsedate_to_datetime

        for _ in range(3):
            before = int(time.time())
            text = headers.date_now()
            after = int(time.time())
            self.assertIn(text, {formatdate(s, localtime=True) for s in range(before, after + 1)})
            self.assertLessEqual(abs(parsedate_to_datetime(text).timestamp() - time.time()), 2)

    def test_a_new_second_gets_a_new_date(self) -> None:
        clock = [1796221662.25]
        self.patch(time, "time", lambda: clock[0])
        first = headers.date_now()
        clock[0] += 0.5
        self.assertIs(headers.date_now(), first)
        clock[0] += 1.0
        from email.utils import formatdate

        self.assertEqual(headers.date_now(), formatdate(1796221663, localtime=True))
        self.assertNotEqual(headers.date_now(), first)
