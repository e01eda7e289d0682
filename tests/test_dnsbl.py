# -*- test-case-name: tests.test_dnsbl -*-
"""DNS blocklists: through the running server, with a loopback DNS server serving the list."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailx.checks.dnsbl import classify, query_name
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import capture_log, dialogue, in_thread, start_server


class QueryNameTests(unittest.TestCase):
    def test_ipv4_is_reversed(self) -> None:
        self.assertEqual(query_name("192.0.2.99", "bl.test"), "99.2.0.192.bl.test")

    def test_ipv6_is_reversed_by_nibble(self) -> None:
        name = query_name("2001:db8::1", "bl.test")
        self.assertEqual(name, "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test")

    def test_only_127_8_means_listed(self) -> None:
        self.assertEqual(classify(["127.0.0.2"])[0], "127.0.0.2")
        self.assertIsNone(classify(["192.0.2.1"])[0])
        # Spamhaus's "query refused" codes are errors, not listings.
        self.assertIsNone(classify(["127.255.255.254"])[0])

    def test_error_codes_are_errors_not_listings(self) -> None:
        # Spamhaus's error codes, the "refused" 127.0.0.1, answers outside 127/8.
        for code in ("127.255.255.252", "127.255.255.254", "127.255.255.255", "127.0.0.1",
                     "192.0.2.1"):
            self.assertEqual(classify([code]), (None, code))
        self.assertEqual(classify(["127.255.255.254", "127.0.0.3"]), ("127.0.0.3", "127.255.255.254"))


class BlocklistServerTests(unittest.TestCase):
    """Clients presented through PROXY as listed or not, lists served on loopback."""

    def setUp(self) -> None:
        self.dns = serve_for_test(
            self,
            {
                "9.113.0.203.reject.test": {"A": ["127.0.0.2"]},
                "10.113.0.203.junk.test": {"A": ["127.0.0.4"]},
                "11.113.0.203.reject.test": {"A": ["127.255.255.254"]},
                "13.113.0.203.reject.test": {"A": ["127.0.0.1"]},
                "14.113.0.203.reject.test": {"A": ["127.255.255.254"]},
            },
        )
        self.server = start_server(
            self,
            {
                "listen": {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"]},
                "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "2s"},
                "checks": {
                    "dnsbl": [
                        {"zone": "reject.test", "action": "reject"},
                        {"zone": "junk.test", "action": "junk"},
                    ]
                },
            },
        )

    def send(self, client_ip: str, recipient: bytes = b"alice@example.test") -> defer.Deferred:
        script = [b"EHLO c.test", b"MAIL FROM:<s@sender.test>", b"RCPT TO:<" + recipient + b">",
                  b"DATA", b"Subject: dnsbl\r\n\r\nbody\r\n.", b"QUIT"]
        return in_thread(dialogue, self.server.port, script, client_ip)

    @defer.inlineCallbacks
    def test_listed_client_is_refused_at_rcpt(self) -> None:
        replies = yield self.send("203.0.113.9")
        self.assertEqual(
            replies[3],
            (554, b"5.7.1 Service unavailable; client [203.0.113.9] blocked using reject.test"),
        )
        self.assertEqual(self.server.all_messages(), [])

    @defer.inlineCallbacks
    def test_listed_client_may_still_write_to_postmaster(self) -> None:
        replies = yield self.send("203.0.113.9", b"postmaster@example.test")
        self.assertEqual(replies[5][0], 250)
        self.assertEqual(len(self.server.messages("alice")), 1)

    @defer.inlineCallbacks
    def test_junk_listing_files_into_junk(self) -> None:
        replies = yield self.send("203.0.113.10")
        self.assertEqual(replies[5][0], 250)
        self.assertEqual(self.server.messages("alice"), [])
        self.assertEqual(len(self.server.messages("alice", folder=".Junk")), 1)

    @defer.inlineCallbacks
    def test_junk_is_filed_unfiltered(self) -> None:
        from mailx.filters.outcome import Copy, FilterOutcome
        from tests.test_pipeline import FixedFilters

        filters = FixedFilters({"alice@example.test": FilterOutcome(copies=(Copy("Work"),))})
        self.server.service.context.filters = filters
        replies = yield self.send("203.0.113.10")
        self.assertEqual(replies[5][0], 250)
        self.assertEqual(len(self.server.messages("alice", folder=".Junk")), 1)
        self.assertEqual(self.server.messages("alice", folder=".Work"), [])
        self.assertEqual(filters.calls, [])
        # An unlisted client's message is filtered.
        replies = yield self.send("203.0.113.50")
        self.assertEqual(len(self.server.messages("alice", folder=".Work")), 1)

    @defer.inlineCallbacks
    def test_unlisted_and_error_coded_clients_are_accepted(self) -> None:
        for ip in ("203.0.113.50", "203.0.113.11"):
            replies = yield self.send(ip)
            self.assertEqual(replies[5][0], 250)
        self.assertEqual(len(self.server.messages("alice")), 2)

    @defer.inlineCallbacks
    def test_error_codes_accept_and_are_logged_once_per_zone(self) -> None:
        log = capture_log(self)
        for ip in ("203.0.113.11", "203.0.113.14", "203.0.113.13"):
            replies = yield self.send(ip)
            self.assertEqual(replies[5][0], 250, ip)
        self.assertEqual(len(self.server.messages("alice")), 3)
        errors = [line for line in log if "dnsbl reject.test answered" in line]
        self.assertEqual(len(errors), 2, errors)  # .254 once, 127.0.0.1 once
        self.assertIn("public or open resolver", errors[0])

    @defer.inlineCallbacks
    def test_list_that_does_not_answer_is_skipped(self) -> None:
        self.dns.timeout("12.113.0.203.reject.test")
        replies = yield self.send("203.0.113.12")
        self.assertEqual(replies[5][0], 250)
        self.flushLoggedErrors()
