# -*- test-case-name: tests.test_mtasts -*-
"""MTA-STS (RFC 8461): the parsers and matching, the policy in force, and delivery under it.

The delivery tests run for real on 127.0.0.1: the loopback DNS server
publishes ``_mta-sts.remote.test``, ``mta-sts.remote.test`` and the MX of
``remote.test``; an HTTPS server (twisted.web) serves the policy with a
certificate from a throw-away CA that the test trusts through
``SSL_CERT_FILE``, as an administrator would; the SMTP sink plays the MX.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailx.config import load_config_text
from mailx.dns import NXDomainError
from mailx.outbound import mtasts
from mailx.outbound.mtasts import (
    MTASTS,
    Policy,
    PolicyCache,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_record,
)
from mailx.storage.queue import DELIVERED, PENDING
from mailx.testing.mtasts import start_policy_server
from mailx.testing.tls import TestCA, certificate_pem
from tests.test_outbound import NOW, OutboundCase, wait_until

CA = TestCA()

ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx.remote.test\r\nmax_age: 86400\r\n"
ENFORCE_OTHER_MX = b"version: STSv1\r\nmode: enforce\r\nmx: other.remote.test\r\nmax_age: 86400\r\n"
TESTING_OTHER_MX = b"version: STSv1\r\nmode: testing\r\nmx: other.remote.test\r\nmax_age: 86400\r\n"
RECORD = "v=STSv1; id=20260101T000000;"

REMOTE_ZONES = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
    "_mta-sts.remote.test": {"TXT": [RECORD]},
    "mta-sts.remote.test": {"A": ["127.0.0.1"]},
    # Same MX, no MTA-STS policy: its mail may go in clear text.
    "plain.test": {"MX": [(10, "mx.remote.test")]},
}


# ---------------------------------------------------------------------------
# Pure parts


class RecordTests(unittest.TestCase):
    def test_id_of_a_valid_record(self) -> None:
        self.assertEqual(parse_record(["v=STSv1; id=20160831085700Z;"]), "20160831085700Z")

    def test_trailing_semicolon_and_whitespace_are_optional(self) -> None:
        self.assertEqual(parse_record(["v=STSv1;id=abc"]), "abc")
        self.assertEqual(parse_record(["v=STSv1;  id=abc ;  "]), "abc")

    def test_other_records_are_ignored(self) -> None:
        self.assertEqual(parse_record(["v=spf1 -all", "v=STSv1; id=a1;", "hello"]), "a1")

    def test_two_sts_records_mean_no_policy(self) -> None:
        # RFC 8461 3.1: not exactly one record left: no available policy.
        self.assertIsNone(parse_record(["v=STSv1; id=a;", "v=STSv1; id=b;"]))

    def test_extensions_are_accepted(self) -> None:
        self.assertEqual(parse_record(["v=STSv1; id=a; ext_1=value;"]), "a")

    def test_invalid_records(self) -> None:
        for record in (
            "v=STSv1;",  # no id
            "v=STSv1; id=;",
            "v=STSv1; id=" + "a" * 33,
            "v=STSv1; id=a-b;",
            "v=STSv2; id=a;",
            "id=a; v=STSv1;",
            "v=STSv1; id=a; garbage;",
            "v=STSv1; id=a; id=b;",
        ):
            with self.subTest(record=record):
                self.assertIsNone(parse_record([record]))


class PolicyParseTests(unittest.TestCase):
    def test_crlf_policy(self) -> None:
        policy = parse_policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
            b"mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n"
        )
        self.assertEqual(
            policy,
            Policy(
                "enforce", ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800
            ),
        )

    def test_lf_policy_unknown_keys_and_first_duplicate(self) -> None:
        policy = parse_policy(
            b"version: STSv1\nmode: testing\nfoo: bar\nmode: enforce\nmx: MX.Example.COM.\n"
            b"max_age:86400"
        )
        self.assertEqual(policy, Policy("testing", ("mx.example.com",), 86400))

    def test_max_age_is_capped_at_a_year(self) -> None:
        body = b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n"
        self.assertEqual(parse_policy(body).max_age, mtasts.MAX_AGE_LIMIT)

    def test_mode_none_needs_no_mx(self) -> None:
        self.assertEqual(
            parse_policy(b"version: STSv1\nmode: none\nmax_age: 10\n"), Policy("none", (), 10)
        )

    def test_invalid_policies(self) -> None:
        for body in (
            b"",
            b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            b"mode: enforce\nmx: a.test\nmax_age: 1\n",
            b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n",
            b"version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nthis is not a field\nmx: a.test\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: \xc3\xa9.test\nmax_age: 1\n",
            b"<html>version: STSv1</html>",
        ):
            with self.subTest(body=body):
                self.assertRaises(PolicyError, parse_policy, body)

    def test_oversized_policy_is_refused(self) -> None:
        body = ENFORCE + b"x: " + b"y" * mtasts.MAX_POLICY_SIZE + b"\n"
        self.assertRaises(PolicyError, parse_policy, body)


class MatchTests(unittest.TestCase):
    def test_exact_match_ignores_case_and_final_dot(self) -> None:
        self.assertTrue(mx_matches("MX.Example.Net.", "mx.example.net"))
        self.assertFalse(mx_matches("mx2.example.net", "mx.example.net"))

    def test_wildcard_matches_exactly_one_label(self) -> None:
        # RFC 8461 4.1's own examples.
        self.assertTrue(mx_matches("mail.example.com", "*.example.com"))
        self.assertFalse(mx_matches("example.com", "*.example.com"))
        self.assertFalse(mx_matches("foo.bar.example.com", "*.example.com"))
        self.assertFalse(mx_matches(".example.com", "*.example.com"))

    @given(st.from_regex(r"\A[a-z0-9]{1,10}\Z"), st.from_regex(r"\A[a-z]{1,8}\.[a-z]{2,4}\Z"))
    def test_wildcard_property(self, label: str, parent: str) -> None:
        self.assertTrue(mx_matches(f"{label}.{parent}", f"*.{parent}"))
        self.assertFalse(mx_matches(f"{label}.{label}.{parent}", f"*.{parent}"))


# ---------------------------------------------------------------------------
# The policy in force (RFC 8461 5.1), with a stand-in resolver and fetcher


class _Resolver:
    def __init__(self) -> None:
        self.records: list[str] | Exception = [RECORD]

    def lookup_txt(self, name: str) -> defer.Deferred:
        if isinstance(self.records, Exception):
            return defer.fail(self.records)
        return defer.succeed(list(self.records))


class _Fetcher:
    def __init__(self) -> None:
        self.body = ENFORCE
        self.calls = 0
        self.fail: Exception | None = None

    def fetch(self, domain: str) -> defer.Deferred:
        self.calls += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(parse_policy(self.body))


class PolicyInForceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.resolver = _Resolver()
        self.fetcher = _Fetcher()
        self.directory = Path(self.mktemp())
        self.sts = self.make()

    def make(self) -> MTASTS:
        return MTASTS(
            self.resolver,
            PolicyCache(self.directory),
            self.fetcher,
            clock=self.clock,
            run_blocking=lambda f, *a: defer.maybeDeferred(f, *a),
        )

    def policy(self, sts: MTASTS | None = None) -> Any:
        return self.successResultOf((sts or self.sts).policy("remote.test"))

    def test_fetched_once_while_the_id_stays(self) -> None:
        self.assertEqual(self.policy().mode, "enforce")
        self.assertEqual(self.policy().mode, "enforce")
        self.assertEqual(self.fetcher.calls, 1)

    def test_new_id_is_refetched(self) -> None:
        self.policy()
        self.fetcher.body = TESTING_OTHER_MX
        self.resolver.records = ["v=STSv1; id=2;"]
        self.assertEqual(self.policy().mode, "testing")
        self.assertEqual(self.fetcher.calls, 2)

    def test_failed_fetch_keeps_the_cached_policy(self) -> None:
        self.policy()
        self.fetcher.fail = mtasts.FetchError("blocked by an attacker")
        self.resolver.records = ["v=STSv1; id=2;"]
        self.assertEqual(self.policy().mode, "enforce")

    def test_vanished_record_keeps_the_cached_policy(self) -> None:
        # RFC 8461 3.1: no usable TXT record does not remove a cached policy.
        self.policy()
        self.resolver.records = NXDomainError("gone")
        self.assertEqual(self.policy().mode, "enforce")
        self.resolver.records = ["v=STSv1; id=1;", "v=STSv1; id=2;"]
        self.assertEqual(self.policy().mode, "enforce")

    def test_expired_policy_is_not_used(self) -> None:
        self.policy()
        self.clock.advance(86400)
        self.resolver.records = NXDomainError("gone")
        self.assertIsNone(self.policy())

    def test_no_record_and_no_cache_is_no_policy(self) -> None:
        self.resolver.records = NXDomainError("none")
        self.assertIsNone(self.policy())
        self.assertEqual(self.fetcher.calls, 0)

    def test_failed_fetch_is_not_repeated_at_once(self) -> None:
        self.fetcher.fail = mtasts.FetchError("down")
        self.assertIsNone(self.policy())
        self.assertIsNone(self.policy())
        self.assertEqual(self.fetcher.calls, 1)
        self.clock.advance(mtasts.FETCH_FAILURE_MEMORY)
        self.fetcher.fail = None
        self.assertEqual(self.policy().mode, "enforce")

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        calls = []

        def fetch(domain: str) -> defer.Deferred:
            calls.append(domain)
            return pending

        self.fetcher.fetch = fetch  # type: ignore[method-assign]
        first, second = self.sts.policy("remote.test"), self.sts.policy("remote.test")
        self.assertNoResult(first)
        pending.callback(parse_policy(ENFORCE))
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(calls, ["remote.test"])

    def test_cache_survives_a_restart(self) -> None:
        self.policy()
        [saved] = os.listdir(self.directory)
        self.assertEqual(saved, "remote.test.json")
        data = json.loads((self.directory / saved).read_text())
        self.assertEqual((data["id"], data["policy"]["mode"]), ("20260101T000000", "enforce"))
        self.fetcher.fail = mtasts.FetchError("down")
        self.assertEqual(self.policy(self.make()).mode, "enforce")
        self.assertEqual(self.fetcher.calls, 1)

    def test_cache_is_bounded(self) -> None:
        cache = PolicyCache(self.directory, max_entries=2)
        for n, domain in enumerate(("a.test", "b.test", "c.test")):
            cache.put(mtasts.CachedPolicy(domain, "1", parse_policy(ENFORCE), NOW + n))
        self.assertEqual(sorted(os.listdir(self.directory)), ["b.test.json", "c.test.json"])
        self.assertIsNone(PolicyCache(self.directory).get("a.test"))

    def test_cache_in_memory_is_read_without_a_thread(self) -> None:
        calls: list[Any] = []
        sts = MTASTS(
            self.resolver,
            PolicyCache(self.directory),
            self.fetcher,
            clock=self.clock,
            run_blocking=lambda f, *a: (calls.append(f), defer.maybeDeferred(f, *a))[1],
        )
        self.assertEqual(self.policy(sts).mode, "enforce")  # the first read loads the directory
        self.assertEqual(len(calls), 2)  # cache.get, then cache.put after the fetch
        self.assertEqual(self.policy(sts).mode, "enforce")
        self.assertEqual(len(calls), 2)

    def test_peek_never_waits(self) -> None:
        cache = PolicyCache(self.directory)
        self.assertEqual(cache.peek("remote.test"), (False, None))  # not loaded: a file read
        entry = mtasts.CachedPolicy("remote.test", "1", parse_policy(ENFORCE), NOW)
        cache.put(entry)
        self.assertEqual(cache.peek("remote.test"), (True, entry))
        self.assertEqual(cache.peek("other.test"), (True, None))
        with cache._lock:  # a put in a disk thread, fsyncing
            self.assertEqual(cache.peek("remote.test"), (False, None))

    def test_unsafe_domain_has_no_policy(self) -> None:
        self.assertIsNone(self.successResultOf(self.sts.policy("../../etc")))
        self.assertEqual(self.fetcher.calls, 0)


# ---------------------------------------------------------------------------
# Delivery under a policy, for real on 127.0.0.1


class MTASTSCase(OutboundCase):
    """OutboundCase with remote.test publishing an MTA-STS policy over HTTPS on loopback."""

    sink_options = {"certificate": CA.issue("mx.remote.test")}
    policy_certificate = CA.issue("mta-sts.remote.test")
    policy_body = ENFORCE

    def setUp(self) -> None:
        ca_file = Path(self.mktemp())
        ca_file.write_bytes(CA.pem)
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = str(ca_file)
        self.addCleanup(
            lambda: (
                os.environ.__setitem__("SSL_CERT_FILE", old)
                if old is not None
                else os.environ.pop("SSL_CERT_FILE", None)
            )
        )
        self.policy_server = start_policy_server(self.policy_certificate, self.policy_body)
        self.addCleanup(self.policy_server.stop)
        super().setUp()
        self.dns.load(REMOTE_ZONES)
        self.events: list[str] = []
        observer = lambda event: self.events.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make_outbound(self, smarthost_tls: Any = None, **overrides: Any) -> Any:
        outbound = super().make_outbound(smarthost_tls, **overrides)
        # RFC 8461 3.3 fetches from port 443; the test's server has its own.
        outbound.mta_sts.fetcher.port = self.policy_server.port
        return outbound

    def restart(self) -> None:
        self.outbound.stopService()
        self.outbound = self.make_outbound()
        self.outbound.startService()

    def logged(self, text: str) -> bool:
        return any(text in e for e in self.events)


class EnforceTests(MTASTSCase):
    @defer.inlineCallbacks
    def test_listed_mx_gets_the_mail_over_verified_tls(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        [message] = yield self.sink.wait_for(1)
        self.assertTrue(message.tls)
        yield self.gone(envelope)
        # The name of RFC 8461 3.3's URL, whatever port the test serves on.
        self.assertEqual(self.policy_server.hosts, ["mta-sts.remote.test"])
        self.assertTrue(self.logged("MTA-STS policy of remote.test fetched: id 20260101T000000"))

    @defer.inlineCallbacks
    def test_the_policy_is_cached_in_the_spool(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.gone(envelope)
        saved = self.directory / "spool" / "mta-sts" / "remote.test.json"
        self.assertEqual(json.loads(saved.read_text())["policy"]["mode"], "enforce")

    @defer.inlineCallbacks
    def test_mx_without_starttls_is_not_used(self) -> None:
        self.sink.tls_options = None
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("requires TLS", r.last_reply)
        self.assertFalse(any(c.startswith(b"MAIL") for c in self.sink.commands))

    @defer.inlineCallbacks
    def test_other_domains_are_not_held_up(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test", "someone@outside.test"))
        messages = yield self.sink.wait_for(2)
        self.assertEqual(
            sorted(m.recipients[0] for m in messages),
            ["someone@outside.test", "someone@remote.test"],
        )
        yield self.gone(envelope)


class EnforceReuseTests(MTASTSCase):
    @defer.inlineCallbacks
    def test_enforce_never_rides_a_kept_clear_text_connection(self) -> None:
        # A domain without policy, same MX, while it offers no STARTTLS.
        tls_options, self.sink.tls_options = self.sink.tls_options, None
        first = self.submit(recipients=("someone@plain.test",))
        [plain] = yield self.sink.wait_for(1)
        self.assertFalse(plain.tls)
        yield self.gone(first)
        yield wait_until(lambda: self.outbound._idle_count == 1)
        self.sink.tls_options = tls_options
        second = self.submit(recipients=("someone@remote.test",), queue_id="65F00000000002")
        messages = yield self.sink.wait_for(2)
        yield self.gone(second)
        self.assertTrue(messages[1].tls)
        self.assertEqual([m.connection for m in messages], [1, 2])

    @defer.inlineCallbacks
    def test_enforce_messages_share_a_verified_connection(self) -> None:
        for n in range(1, 4):
            envelope = self.submit(
                recipients=("someone@remote.test",), queue_id=f"65F0000000000{n}"
            )
            yield self.gone(envelope)
            yield wait_until(lambda: self.outbound._idle_count == 1)
        messages = self.sink.accepted
        self.assertEqual(len(messages), 3)
        self.assertTrue(all(m.tls for m in messages))
        self.assertEqual(self.sink.connections, 1)


class EnforceUnlistedMXTests(MTASTSCase):
    policy_body = ENFORCE_OTHER_MX

    @defer.inlineCallbacks
    def test_unlisted_mx_is_deferred_and_nothing_is_sent(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertTrue(r.last_reply.startswith("451 4.7.5"), r.last_reply)
        self.assertIn("MTA-STS", r.last_reply)
        self.assertEqual(self.sink.connections, 0)
        self.assertTrue(
            self.logged("65F00000000001: MTA-STS enforce: not delivering to mx.remote.test")
        )
        self.assertTrue(self.logged("status=deferred"))

    @defer.inlineCallbacks
    def test_changed_policy_id_is_refetched_at_the_next_attempt(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        self.assertEqual(self.sink.connections, 0)
        self.policy_server.body = ENFORCE
        self.dns.set("_mta-sts.remote.test", "TXT", ["v=STSv1; id=2;"])
        self.outbound.resolver.clear_cache()
        self.clock.advance(60)
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.policy_server.requests, 2)

    @defer.inlineCallbacks
    def test_same_id_is_not_refetched(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        self.policy_server.body = ENFORCE  # published without a new id: not seen
        self.clock.advance(60)
        yield self.settle(envelope)
        self.assertEqual(envelope.recipients[0].attempts, 2)
        self.assertEqual(self.policy_server.requests, 1)
        self.assertEqual(self.sink.connections, 0)

    @defer.inlineCallbacks
    def test_restart_keeps_the_cache_and_a_failed_fetch_keeps_it_in_force(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        self.restart()
        # An attacker now blocks the policy host and removes the record:
        # the cached enforce policy still applies (RFC 8461 5.1).
        self.policy_server.status = 500
        self.dns.set("_mta-sts.remote.test", "TXT", ["v=STSv1; id=3;"])
        self.outbound.flush()
        yield wait_attempts(self, envelope, 2)
        [r] = self.outbound._entries[envelope.id].envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("MTA-STS", r.last_reply)
        self.assertEqual(self.sink.connections, 0)
        self.assertTrue(self.logged("not fetched: https://mta-sts.remote.test"))
        self.assertTrue(self.logged("keeping the cached policy of remote.test"))

    @defer.inlineCallbacks
    def test_smarthost_delivery_ignores_mta_sts(self) -> None:
        self.outbound.stopService()
        self.outbound = self.make_outbound(smarthost=f"tcp:127.0.0.1:{self.sink.port}")
        self.outbound.startService()
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.policy_server.requests, 0)


class EnforceBadMXCertificateTests(MTASTSCase):
    sink_options = {"tls": True}  # self-signed, for mx.outside.test

    @defer.inlineCallbacks
    def test_unverified_certificate_defers_without_clear_text_fallback(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("TLS handshake", r.last_reply)
        self.assertEqual(self.sink.connections, 1)
        self.assertFalse(any(c.startswith(b"MAIL") for c in self.sink.commands))
        self.assertTrue(self.logged("MTA-STS enforce: no clear-text fallback"))


class TestingModeTests(MTASTSCase):
    sink_options = {"tls": True}  # a certificate enforce would not accept
    policy_body = TESTING_OTHER_MX

    @defer.inlineCallbacks
    def test_mismatch_is_delivered_and_logged(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        [message] = yield self.sink.wait_for(1)
        self.assertTrue(message.tls)  # the unverified TLS of a policy-less delivery
        yield self.gone(envelope)
        self.assertEqual(envelope.recipients[0].state, DELIVERED)
        self.assertTrue(self.logged("MTA-STS testing: mx.remote.test not in the policy"))
        self.assertTrue(self.logged("MTA-STS testing: mx.remote.test[127.0.0.1]"))


class BadPolicyHostCertificateTests(MTASTSCase):
    # Self-signed, not from the trusted CA: the fetch must fail.
    policy_certificate = certificate_pem("mta-sts.remote.test")
    policy_body = ENFORCE_OTHER_MX

    @defer.inlineCallbacks
    def test_no_policy_without_a_cache_so_delivered_as_today(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        [message] = yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertTrue(self.logged("MTA-STS policy of remote.test not fetched"))
        self.assertEqual(self.policy_server.requests, 0)  # the handshake failed first

    @defer.inlineCallbacks
    def test_cached_policy_is_used_when_the_certificate_goes_bad(self) -> None:
        cache = PolicyCache(self.directory / "spool" / "mta-sts")
        cache.put(mtasts.CachedPolicy("remote.test", "0", parse_policy(ENFORCE_OTHER_MX), NOW))
        self.restart()
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.settle(envelope)
        [r] = envelope.recipients
        self.assertEqual(r.state, PENDING)
        self.assertIn("MTA-STS", r.last_reply)
        self.assertEqual(self.sink.connections, 0)


class RefusedPolicyResponseTests(MTASTSCase):
    """Answers that are not a policy: delivery goes on as without one."""

    policy_body = ENFORCE_OTHER_MX

    @defer.inlineCallbacks
    def deliver_without_policy(self) -> Any:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertTrue(self.logged("MTA-STS policy of remote.test not fetched"))

    @defer.inlineCallbacks
    def test_redirect_is_not_followed(self) -> None:
        # RFC 8461 3.3: 3xx redirects must not be followed.
        self.policy_server.status = 301
        self.policy_server.headers[b"location"] = (
            f"https://mta-sts.remote.test:{self.policy_server.port}/.well-known/mta-sts.txt"
        ).encode()
        yield self.deliver_without_policy()
        self.assertEqual(self.policy_server.requests, 1)
        self.assertTrue(self.logged("HTTP 301"))

    @defer.inlineCallbacks
    def test_oversized_policy_is_refused(self) -> None:
        self.policy_server.body = ENFORCE_OTHER_MX + b"x: " + b"y" * (100 * 1024) + b"\r\n"
        yield self.deliver_without_policy()
        self.assertTrue(self.logged("is too large"))

    @defer.inlineCallbacks
    def test_oversized_policy_without_length_is_cut_off(self) -> None:
        self.policy_server.body = ENFORCE_OTHER_MX + b"x: " + b"y" * (1024 * 1024) + b"\r\n"
        self.policy_server.chunks = 64
        yield self.deliver_without_policy()
        self.assertTrue(self.logged("policy larger than 65536 octets"))

    @defer.inlineCallbacks
    def test_wrong_content_type_is_refused(self) -> None:
        self.policy_server.content_type = b"text/html"
        yield self.deliver_without_policy()
        self.assertTrue(self.logged("not text/plain"))

    @defer.inlineCallbacks
    def test_private_policy_host_address_is_not_contacted(self) -> None:
        self.dns.set("mta-sts.remote.test", "A", ["10.0.0.1"])
        yield self.deliver_without_policy()
        self.assertTrue(self.logged("only private or reserved addresses"))
        self.assertEqual(self.policy_server.requests, 0)


class DisabledTests(MTASTSCase):
    settings_overrides = {"mta_sts": False}
    policy_body = ENFORCE_OTHER_MX

    @defer.inlineCallbacks
    def test_switched_off_delivers_as_without_a_policy(self) -> None:
        envelope = self.submit(recipients=("someone@remote.test",))
        yield self.sink.wait_for(1)
        yield self.gone(envelope)
        self.assertEqual(self.policy_server.requests, 0)


class ConfigTests(unittest.TestCase):
    def test_default_on_and_switch(self) -> None:
        base = (
            "hostname: mx.example.test\n"
            "domains: {example.test: {mailboxes: [a], aliases: {postmaster: a}}}\n"
        )
        self.assertTrue(load_config_text(base, "/tmp/mailx.yaml").outbound.mta_sts)
        off = load_config_text(base + "outbound: {mta_sts: false}\n", "/tmp/mailx.yaml")
        self.assertFalse(off.outbound.mta_sts)


def wait_attempts(case: OutboundCase, envelope: Any, count: int) -> defer.Deferred:
    """Until the envelope's first recipient has had ``count`` attempts and is idle again."""
    from tests.test_outbound import wait_until

    def done() -> bool:
        entry = case.outbound._entries.get(envelope.id)  # after a restart: a new Envelope
        return (
            entry is not None
            and entry.envelope.recipients[0].attempts >= count
            and not entry.busy
            and not entry.in_flight
        )

    return wait_until(done)


class SilentPolicyHostTests(MTASTSCase):
    """A policy host that accepts and never answers costs a bounded wait, for its domain only."""

    policy_body = ENFORCE_OTHER_MX

    def setUp(self) -> None:
        super().setUp()
        from twisted.internet import protocol, reactor

        silent = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        self.outbound.mta_sts.fetcher.port = silent.getHost().port
        self.outbound.mta_sts.fetcher.timeout = 1.0

    @defer.inlineCallbacks
    def test_other_domain_is_served_meanwhile_then_delivered_without_policy(self) -> None:
        self.submit(recipients=("someone@remote.test",), queue_id="65F00000000001")
        other = self.submit(recipients=("someone@outside.test",), queue_id="65F00000000002")
        [first] = yield self.sink.wait_for(1)
        self.assertEqual(first.recipients, ["someone@outside.test"])
        yield self.gone(other)
        messages = yield self.sink.wait_for(2)
        self.assertEqual(messages[1].recipients, ["someone@remote.test"])
        self.assertTrue(self.logged("MTA-STS policy of remote.test not fetched"))
        self.assertTrue(self.logged("mta-sts.txt: timed out"))
