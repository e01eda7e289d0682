# -*- test-case-name: tests.test_submission -*-
"""Authenticated submission (SPEC 11) against a running mailx: smtplib and
msmtp on the STARTTLS and implicit-TLS listeners, every row of SPEC 11's
table, the failure and rate limits, and delivery (local at once, remote
through the queue to a sink, DKIM-signed)."""

from __future__ import annotations

import base64
import os
import re
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dkim
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailx.admin import dnssetup
from mailx.checks.spf import check_spf
from mailx.config import ConfigError, load_config
from mailx.dns import Resolver
from mailx.outbound import dkimkeys
from mailx.smtp.accounts import hash_password
from mailx.smtp.submission import (
    AuthFailures,
    SendRate,
    decode_plain,
    header_refusal,
    unsigned_domains,
)
from mailx.testing.dnsserver import start_dns_server
from mailx.testing.server import (
    LineClient,
    ServerProcess,
    capture_log,
    free_port,
    start_server,
    write_config,
)
from mailx.testing.sink import start_sink
from mailx.testing.tls import make_certificate

PASSWORD = "correct horse battery"
# Argon2 and RSA key generation are slow: once per module.
_HASHES: dict[str, str] = {}
_DKIM_KEY: list[Any] = []


def hashed(password: str) -> str:
    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


def dkim_key() -> Any:
    if not _DKIM_KEY:
        _DKIM_KEY.append(dkimkeys.generate_key("rsa"))
    return _DKIM_KEY[0]


ZONES = {
    "outside.test": {"MX": [(10, "mx.outside.test")]},
    "mx.outside.test": {"A": ["127.0.0.1"]},
}


def wait_until(predicate: Any, timeout: float = 20.0) -> defer.Deferred:
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll() -> Any:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, 0.02, lambda: None)

    return poll()


def submitted(
    sender: str = "alice@example.test", to: str = "bob@example.test", extra: str = ""
) -> bytes:
    """A message as a mail client writes it, without Date or Message-ID."""
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: hi\r\n{extra}\r\nHello.\r\n").encode()


def tls_client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names mx.example.test; we dial 127.0.0.1
    return context


class SubmissionCase(unittest.TestCase):
    timeout = 60
    limits: dict[str, Any] = {}

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        self.cert, key = make_certificate(directory / "tls")
        self.passwd = directory / "passwd"
        self.passwd.write_text(
            f"alice@example.test:{hashed(PASSWORD)}\nbob@example.test:{hashed('bobs')}\n"
        )
        self.dkim_key = dkim_key()
        dkim_path = dkimkeys.write_key(self.dkim_key, directory / "dkim.key")
        self.dns = start_dns_server(
            {**ZONES, "mx1._domainkey.example.test": {"TXT": [dkimkeys.dns_record(self.dkim_key)]}}
        )
        self.addCleanup(self.dns.stop)
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.overrides = {
            "listen": {
                "submission": ["tcp:0:interface=127.0.0.1"],
                "submissions": ["tcp:0:interface=127.0.0.1"],
            },
            "tls": {"certificate": str(self.cert), "key": str(key)},
            "accounts": {
                "passwords": str(self.passwd),
                "send_as": {"alice@example.test": ["sales@example.test"]},
            },
            "limits": {"connection_rate_per_ip": 0, **self.limits},
            "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "2s"},
            "domains": {
                "example.test": {
                    "mailboxes": ["alice", "bob", "sales"],
                    "aliases": {"postmaster": "alice", "team": ["alice", "bob"], "*": "bob"},
                    "dkim": {"selector": "mx1", "key": str(dkim_path)},
                },
            },
            "outbound": {"port": self.sink.port, "retry": ["1s"], "queue_lifetime": "1h"},
        }
        self.server = start_server(self, self.overrides)
        self.smtp_port, self.submission_port, self.submissions_port = self.server.ports

    # --- clients (blocking; run in a thread) ---------------------------------

    def client(self, implicit: bool = False) -> smtplib.SMTP:
        context = tls_client_context(self.cert)
        if implicit:
            c: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", self.submissions_port, timeout=20, context=context
            )
            c.ehlo("client.test")
            return c
        c = smtplib.SMTP("127.0.0.1", self.submission_port, timeout=20)
        c.ehlo("client.test")
        c.starttls(context=context)
        c.ehlo("client.test")
        return c

    def inthread(self, func: Any, *args: Any) -> defer.Deferred:
        return deferToThread(func, *args)

    def verify_dkim(self, message: bytes) -> bool:
        record = dkimkeys.dns_record(self.dkim_key).encode()
        return dkim.verify(message, dnsfunc=lambda name, timeout=5: record)


class SubmissionDeliveryTests(SubmissionCase):
    @defer.inlineCallbacks
    def test_starttls_login_files_local_mail_signed(self) -> None:
        def send() -> None:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                c.sendmail("alice@example.test", ["bob@example.test"], submitted())

        yield self.inthread(send)
        [message] = self.server.messages("bob")
        head = message.split(b"\n\n", 1)[0]
        self.assertIn(b"with ESMTPSA", head)
        self.assertIn(b"\nDate: ", head)
        self.assertIn(b"\nMessage-ID: <", head)
        self.assertIn(b"DKIM-Signature:", head)
        # What the mailbox holds is what went out, plus Return-Path/Delivered-To.
        self.assertTrue(self.verify_dkim(message.replace(b"\n", b"\r\n")))

    @defer.inlineCallbacks
    def test_implicit_tls_plain(self) -> None:
        def send() -> None:
            with self.client(implicit=True) as c:
                c.login("alice@example.test", PASSWORD)  # smtplib tries PLAIN first... or CRAM
                c.sendmail(
                    "alice+news@example.test",
                    ["alice@example.test"],
                    submitted("sales@example.test"),
                )

        yield self.inthread(send)
        [message] = self.server.messages("alice")
        self.assertIn(b"with ESMTPSA", message)
        self.assertIn(b"Return-Path: <alice+news@example.test>", message)

    @defer.inlineCallbacks
    def test_remote_recipient_queued_signed_sender_kept(self) -> None:
        def send() -> None:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                c.sendmail(
                    "team@example.test",
                    ["someone@outside.test"],
                    submitted("team@example.test", "someone@outside.test"),
                )

        yield self.inthread(send)
        [received] = yield self.sink.wait_for(1)
        self.assertEqual(received.mail_from, "team@example.test")  # no SRS
        self.assertEqual(received.recipients, ["someone@outside.test"])
        self.assertTrue(self.verify_dkim(received.data))
        self.assertIn(b"with ESMTPSA", received.data)
        self.assertNotIn(b"Delivered-To", received.data)
        # SPF for the sending IP passes with the records `mailxctl dns` prints.
        plan = dnssetup.plan(self.server.config, "example.test", ["127.0.0.1"])
        for record in plan.records:
            if record.type in ("MX", "A", "TXT") and record.name in (
                "example.test",
                "mx.example.test",
            ):
                value: Any = record.value
                if record.type == "MX":
                    preference, host = record.value.split()
                    value = (int(preference), host)
                self.dns.set(record.name, record.type, [value])
        resolver = Resolver(self.dns.nameservers, 2)
        spf = yield resolver.call(
            check_spf, resolver, "127.0.0.1", "mx.example.test", received.mail_from
        )
        self.assertEqual(spf.result, "pass")

    @defer.inlineCallbacks
    def test_msmtp_on_both_listeners(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        for n, (port, tls) in enumerate(
            [(self.submission_port, "tls_starttls on"), (self.submissions_port, "tls_starttls off")]
        ):
            conf = directory / f"msmtprc{n}"
            conf.write_text(
                "account default\nhost 127.0.0.1\n"
                f"port {port}\ntls on\n{tls}\ntls_trust_file {self.cert}\n"
                "tls_host_override mx.example.test\nauth on\nuser alice@example.test\n"
                f"password {PASSWORD}\nfrom alice@example.test\ndomain client.test\n"
            )
            conf.chmod(0o600)
            result = yield self.inthread(
                lambda c=conf: subprocess.run(
                    ["msmtp", "-C", str(c), "bob@example.test"],
                    input=submitted(),
                    capture_output=True,
                    timeout=30,
                )
            )
            self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.server.messages("bob")), 2)


class TableTests(SubmissionCase):
    """SPEC 11's table, one row per test."""

    limits = {"auth_failures": 3, "send_per_hour": 4}

    def raw(self, port: int | None = None) -> LineClient:
        c = LineClient(port or self.submission_port)
        self.addCleanup(c.close)
        self.assertEqual(c.reply()[0], 220)
        return c

    @defer.inlineCallbacks
    def test_auth_before_tls(self) -> None:
        def talk() -> tuple[Any, Any]:
            c = self.raw()
            code, text = c.command(b"EHLO client.test")
            return text, c.command(
                b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0" + PASSWORD.encode())
            )

        ehlo, reply = yield self.inthread(talk)
        self.assertNotIn(b"AUTH", ehlo)
        self.assertIn(b"STARTTLS", ehlo)
        self.assertEqual(reply, (530, b"5.7.0 Must issue a STARTTLS command first"))

    @defer.inlineCallbacks
    def test_mail_before_tls(self) -> None:
        def talk() -> Any:
            c = self.raw()
            c.command(b"EHLO client.test")
            return c.command(b"MAIL FROM:<alice@example.test>")

        reply = yield self.inthread(talk)
        self.assertEqual(reply, (530, b"5.7.0 Must issue a STARTTLS command first"))

    @defer.inlineCallbacks
    def test_mail_before_auth(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                self.assertIn("auth", c.esmtp_features)
                return c.docmd("MAIL", "FROM:<alice@example.test>")

        reply = yield self.inthread(talk)
        self.assertEqual(reply, (530, b"5.7.0 Authentication required"))

    @defer.inlineCallbacks
    def test_wrong_password(self) -> None:
        lines = capture_log(self)

        def talk() -> Any:
            with self.client() as c:
                token = base64.b64encode(b"\0alice@example.test\0wrong").decode()
                return c.docmd("AUTH", "PLAIN " + token)

        reply = yield self.inthread(talk)
        self.assertEqual(reply[0], 535)
        self.assertTrue(reply[1].startswith(b"5.7.8"))
        self.assertTrue(
            any(
                re.search(
                    r"auth failed: ip=127\.0\.0\.1 mechanism=PLAIN .*user=alice@example\.test", x
                )
                for x in lines
            ),
            lines,
        )
        # The shipped fail2ban filter finds the client in the real line.
        filter_re = fail2ban_regex()
        hosts = [m.group("host") for x in lines if (m := filter_re.search(x))]
        self.assertEqual(hosts, ["127.0.0.1"])

    @defer.inlineCallbacks
    def test_login_mechanism_and_unknown_mechanism(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                other = c.docmd("AUTH", "CRAM-MD5")
                first = c.docmd("AUTH", "LOGIN")
                second = c.docmd(base64.b64encode(b"alice@example.test").decode())
                third = c.docmd(base64.b64encode(PASSWORD.encode()).decode())
                return other, first, second, third

        other, first, second, third = yield self.inthread(talk)
        self.assertEqual(other[0], 504)
        self.assertTrue(other[1].startswith(b"5.5.4"))
        self.assertEqual(first, (334, b"VXNlcm5hbWU6"))
        self.assertEqual(second, (334, b"UGFzc3dvcmQ6"))
        self.assertEqual(third, (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def test_too_many_failures_then_454_and_close_other_clients_served(self) -> None:
        def guess() -> list[Any]:
            replies = []
            with self.client() as c:
                for n in range(3):
                    token = base64.b64encode(b"\0alice@example.test\0guess%d" % n).decode()
                    replies.append(c.docmd("AUTH", "PLAIN " + token)[0])
            # A new connection, and the other listener: failures count across both.
            c = self.client(implicit=True)
            token = base64.b64encode(b"\0alice@example.test\0" + PASSWORD.encode()).decode()
            replies.append(c.docmd("AUTH", "PLAIN " + token)[0])
            try:
                c.docmd("NOOP")
                replies.append("open")
            except (smtplib.SMTPServerDisconnected, OSError):
                replies.append("closed")
            return replies

        started = time.monotonic()
        replies = yield self.inthread(guess)
        self.assertEqual(replies, [535, 535, 535, 454, "closed"])
        # Meanwhile port 25 still serves mail promptly.
        c = LineClient(self.smtp_port)
        self.addCleanup(c.close)
        code, _ = yield self.inthread(c.reply)
        self.assertEqual(code, 220)
        self.assertLess(time.monotonic() - started, 30)

    @defer.inlineCallbacks
    def test_mail_from_not_owned(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.login("bob@example.test", "bobs")
                return (
                    c.docmd("MAIL", "FROM:<alice@example.test>"),
                    c.docmd("MAIL", "FROM:<>"),
                    # A catch-all delivers to bob, but never makes an address his.
                    c.docmd("MAIL", "FROM:<anything@example.test>"),
                    c.docmd("MAIL", "FROM:<bob@outside.test>"),
                    c.docmd("MAIL", "FROM:<team@example.test>"),
                )

        *refused, team = yield self.inthread(talk)
        for reply in refused:
            self.assertEqual(reply[0], 553, reply)
            self.assertTrue(reply[1].startswith(b"5.7.1"))
        self.assertEqual(team[0], 250)

    @defer.inlineCallbacks
    def test_mail_pipelined_after_auth_waits_for_the_verdict(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                token = base64.b64encode(b"\0alice@example.test\0" + PASSWORD.encode())
                c.send(b"AUTH PLAIN " + token + b"\r\nMAIL FROM:<alice@example.test>\r\n")
                return c.getreply()[0], c.getreply()[0]

        self.assertEqual((yield self.inthread(talk)), (235, 250))

    @defer.inlineCallbacks
    def test_mail_auth_parameter_accepted(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                return c.docmd("MAIL", "FROM:<alice@example.test> AUTH=<>")[0]

        self.assertEqual((yield self.inthread(talk)), 250)

    @defer.inlineCallbacks
    def test_header_from_not_owned(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.login("bob@example.test", "bobs")
                replies = []
                for message in (
                    submitted("alice@example.test"),
                    submitted("bob@example.test", extra="Sender: alice@example.test\r\n"),
                    b"Subject: no From\r\n\r\nHello.\r\n",
                    # Hostile for the stdlib's parser, and over the bound.
                    b'From: bob@example.test, "' + b'\\"' * 3000 + b"\r\n\r\nHello.\r\n",
                ):
                    try:
                        c.sendmail("bob@example.test", ["alice@example.test"], message)
                        replies.append(250)
                    except smtplib.SMTPDataError as e:
                        replies.append((e.smtp_code, e.smtp_error[:5]))
                return replies

        replies = yield self.inthread(talk)
        self.assertEqual(replies, [(550, b"5.7.1")] * 4)
        self.assertEqual(self.server.messages("alice"), [])

    @defer.inlineCallbacks
    def test_over_send_per_hour(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                c.docmd("MAIL", "FROM:<alice@example.test>")
                return [
                    c.docmd("RCPT", f"TO:<{r}>")
                    for r in (
                        "bob@example.test",
                        "x@outside.test",
                        "sales@example.test",
                        "alice@example.test",
                        "team@example.test",
                    )
                ]

        replies = yield self.inthread(talk)
        self.assertEqual([r[0] for r in replies], [250, 250, 250, 250, 450])
        self.assertTrue(replies[4][1].startswith(b"4.7.1"))

    @defer.inlineCallbacks
    def test_port_25_never_offers_auth(self) -> None:
        def talk() -> Any:
            c = self.raw(self.smtp_port)
            _, ehlo = c.command(b"EHLO client.test")
            return ehlo, c.command(b"AUTH PLAIN AGFsaWNlAHg=")

        ehlo, reply = yield self.inthread(talk)
        self.assertNotIn(b"AUTH", ehlo)
        self.assertEqual(reply[0], 502)
        self.assertTrue(reply[1].startswith(b"5.5.1"))

    @defer.inlineCallbacks
    def test_cancelled_and_bad_base64(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.docmd("AUTH", "PLAIN")
                cancelled = c.docmd("*")
                bad = c.docmd("AUTH", "PLAIN !!notbase64")
                ok = c.docmd(
                    "AUTH",
                    "PLAIN "
                    + base64.b64encode(b"\0alice@example.test\0" + PASSWORD.encode()).decode(),
                )
                return cancelled, bad, ok

        cancelled, bad, ok = yield self.inthread(talk)
        self.assertEqual(cancelled[0], 501)
        self.assertEqual(bad[0], 501)
        self.assertEqual(ok[0], 235)


class StolenPasswordTests(SubmissionCase):
    """Someone with alice's password can send as alice, and only as alice."""

    @defer.inlineCallbacks
    def test_cannot_send_as_another_account(self) -> None:
        def talk() -> Any:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                mail = c.docmd("MAIL", "FROM:<bob@example.test>")
                c.docmd("RSET")
                try:
                    c.sendmail(
                        "alice@example.test", ["victim@outside.test"], submitted("ceo@example.test")
                    )
                    end = (250, b"")
                except smtplib.SMTPDataError as e:
                    end = (e.smtp_code, e.smtp_error)
                return mail, end

        mail, end = yield self.inthread(talk)
        self.assertEqual(mail[0], 553)
        self.assertEqual(end[0], 550)
        self.assertEqual(self.sink.accepted, [])


class UnitTests(unittest.TestCase):
    def test_decode_plain(self) -> None:
        self.assertEqual(decode_plain(base64.b64encode(b"\0u@x.test\0pw")), ("", "u@x.test", "pw"))
        self.assertIsNone(decode_plain(base64.b64encode(b"u@x.test\0pw")))
        self.assertIsNone(decode_plain(b"***"))

    def test_failures_cool_down_from_last(self) -> None:
        now = [0.0]
        failures = AuthFailures(2, lambda: now[0])
        failures.failed("ip")
        now[0] = 500
        failures.failed("ip")
        self.assertTrue(failures.blocked("ip"))
        now[0] = 1000  # 10 minutes after the first, not after the last
        self.assertTrue(failures.blocked("ip"))
        now[0] = 1100
        self.assertFalse(failures.blocked("ip"))

    def test_send_rate_sliding_hour(self) -> None:
        now = [0.0]
        rate = SendRate(2, lambda: now[0])
        self.assertTrue(rate.take("a"))
        now[0] = 1800
        self.assertTrue(rate.take("a"))
        self.assertFalse(rate.take("a"))
        now[0] = 3601
        self.assertTrue(rate.take("a"))

    def test_header_refusal_needs_every_from(self) -> None:
        config = load_config(
            write_config(
                Path(self.mktemp()),
                {"domains": {"example.test": {"mailboxes": ["alice", "bob"], "aliases": {}}}},
            )
        )
        ok = [b"From: alice@example.test\r\n"]
        two = [b"From: alice@example.test, bob@example.test\r\n"]
        self.assertIsNone(header_refusal(config, "alice@example.test", ok))
        self.assertIn("bob@example.test", header_refusal(config, "alice@example.test", two))


class ConfigTests(unittest.TestCase):
    def test_submission_without_tls_is_an_error(self) -> None:
        directory = Path(self.mktemp())
        path = write_config(
            directory,
            {
                "listen": {"submission": ["tcp:0:interface=127.0.0.1"]},
                "accounts": {"passwords": "passwd"},
            },
        )
        with self.assertRaises(ConfigError) as e:
            load_config(path)
        self.assertIn("tls", str(e.exception))

    def test_defaults_off(self) -> None:
        config = load_config(write_config(Path(self.mktemp())))
        self.assertEqual((config.submission, config.submissions), ((), ()))


def fail2ban_regex() -> re.Pattern[str]:
    """docs/fail2ban/mailx.conf's failregex in Python ``re``, <HOST> an address."""
    conf = (Path(__file__).parent.parent / "docs" / "fail2ban" / "mailx.conf").read_text()
    [failregex] = re.findall(r"^failregex\s*=\s*(.+)$", conf, re.M)
    return re.compile(failregex.strip().replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))


class Fail2banTests(unittest.TestCase):
    def test_filter_matches_the_log_line(self) -> None:
        pattern = fail2ban_regex()
        line = (
            "2026-12-02T01:40:00+0000 [mailx.smtp#info] auth failed: ip=192.0.2.7 mechanism=PLAIN"
            " failures=1 session=S1 user=x ip=10.9.9.9"
        )
        m = pattern.search(line)
        self.assertIsNotNone(m)
        self.assertEqual(m.group("host"), "192.0.2.7")
        self.assertIsNone(pattern.search(line.replace("auth failed", "auth worked")))


class CrashTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_kill_after_250_delivers_once(self) -> None:
        directory = Path(self.mktemp()).absolute()
        cert, key = make_certificate(directory / "tls")
        passwd = directory / "passwd"
        passwd.write_text(f"alice@example.test:{hashed(PASSWORD)}\n")
        dns = start_dns_server(ZONES)
        self.addCleanup(dns.stop)
        sink = start_sink()
        self.addCleanup(sink.stop)
        # The sink defers the first attempt, so the entry is still queued at the kill.
        sink.script("rcpt", "451 4.3.0 later")
        smtp_port, port = free_port(), free_port()
        path = write_config(
            directory,
            {
                "listen": {
                    "smtp": [f"tcp:{smtp_port}:interface=127.0.0.1"],
                    "submission": [f"tcp:{port}:interface=127.0.0.1"],
                },
                "tls": {"certificate": str(cert), "key": str(key)},
                "accounts": {"passwords": str(passwd)},
                "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
                "outbound": {"port": sink.port, "retry": ["1s"], "queue_lifetime": "1h"},
            },
        )
        process = ServerProcess(path, port)
        self.addCleanup(process.kill)
        yield deferToThread(process.start)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.starttls(context=tls_client_context(cert))
                c.login("alice@example.test", PASSWORD)
                c.sendmail(
                    "alice@example.test",
                    ["someone@outside.test"],
                    submitted(to="someone@outside.test"),
                )

        yield deferToThread(send)
        process.kill()
        first = len(sink.accepted)
        yield deferToThread(process.start)
        yield wait_until(lambda: len(sink.accepted) > first, 60)
        yield task.deferLater(reactor, 2, lambda: None)  # a second copy would come meanwhile
        delivered = [m for m in sink.accepted if m.recipients == ["someone@outside.test"]]
        self.assertEqual(len(delivered), 1)
        process.terminate()


class UnsignedDomainTests(unittest.TestCase):
    def config(self, dkim: bool) -> Any:
        directory = Path(self.mktemp()).absolute()
        cert, key = make_certificate(directory / "tls")
        domain: dict[str, Any] = {"mailboxes": ["alice"], "aliases": {"team": "alice"}}
        if dkim:
            dkimkeys.write_key(dkim_key(), directory / "dkim.key")
            domain["dkim"] = {"selector": "mx1", "key": str(directory / "dkim.key")}
        return load_config(
            write_config(
                directory,
                {
                    "listen": {"submission": ["tcp:0:interface=127.0.0.1"]},
                    "tls": {"certificate": str(cert), "key": str(key)},
                    "accounts": {"passwords": str(directory / "passwd")},
                    "domains": {"example.test": domain},
                },
            )
        )

    def test_domain_without_key_is_a_config_warning(self) -> None:
        warnings = [str(w) for w in self.config(dkim=False).warnings]
        self.assertTrue(any("example.test" in w and "no DKIM key" in w for w in warnings), warnings)

    def test_domain_with_key_is_not(self) -> None:
        config = self.config(dkim=True)
        self.assertEqual(unsigned_domains(config), [])
        self.assertFalse(any("DKIM" in str(w) for w in config.warnings))

    def test_mailxctl_check_prints_it(self) -> None:
        config = self.config(dkim=False)
        result = subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", "--config", str(config.source), "check"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            timeout=60,
        )
        self.assertIn("no DKIM key", result.stdout + result.stderr)

    def test_start_up_warns(self) -> None:
        lines = capture_log(self)
        config = self.config(dkim=False)
        from mailx.service import MailxService

        service = MailxService(config)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(any("example.test" in x and "no DKIM key" in x for x in lines), lines)


class BounceTests(SubmissionCase):
    @defer.inlineCallbacks
    def test_remote_refusal_comes_back_to_the_senders_mailbox(self) -> None:
        self.sink.script("rcpt", "550 5.1.1 no such user")

        def send() -> None:
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                c.sendmail(
                    "alice@example.test",
                    ["nobody@outside.test"],
                    submitted(to="nobody@outside.test"),
                )

        yield self.inthread(send)
        yield wait_until(lambda: self.server.messages("alice"), 30)
        [bounce] = self.server.messages("alice")
        self.assertIn(b"Return-Path: <>", bounce)
        self.assertIn(b"nobody@outside.test", bounce)
        self.assertIn(b"5.1.1", bounce)


class HostileAuthTests(SubmissionCase):
    @defer.inlineCallbacks
    def test_endless_auth_response_is_cut_off_and_others_served(self) -> None:
        def talk() -> Any:
            c = self.client()
            c.docmd("AUTH", "PLAIN")
            c.sock.sendall(b"A" * 100_000)
            try:
                return c.getreply()
            except smtplib.SMTPServerDisconnected:
                return "closed"

        reply = yield self.inthread(talk)
        self.assertIn(reply if reply == "closed" else reply[0], ("closed", 500))

        def other() -> Any:
            with self.client() as c:
                return c.login("alice@example.test", PASSWORD)[0]

        started = time.monotonic()
        self.assertEqual((yield self.inthread(other)), 235)
        self.assertLess(time.monotonic() - started, 15)


    @defer.inlineCallbacks
    def test_hostile_from_under_the_bound_is_refused_and_others_served(self) -> None:
        """2,000 octets of quotes (the stdlib's parser is super-linear on them)
        are parsed in the signing thread, once per value (kept), while another
        client is served; the message is refused, nothing is filed."""
        hostile = b"From: " + b'"' * 1990 + b"\r\n\r\nHello.\r\n"

        def attack() -> Any:
            codes = []
            with self.client() as c:
                c.login("alice@example.test", PASSWORD)
                for _ in range(3):
                    try:
                        c.sendmail("alice@example.test", ["bob@example.test"], hostile)
                        codes.append(250)
                    except smtplib.SMTPDataError as e:
                        codes.append(e.smtp_code)
            return codes

        def other() -> Any:
            with self.client() as c:
                c.login("bob@example.test", "bobs")
                return c.sendmail("bob@example.test", ["alice@example.test"], submitted("bob@example.test"))

        started = time.monotonic()
        codes, refused = yield defer.gatherResults([self.inthread(attack), self.inthread(other)])
        self.assertEqual((codes, refused), ([550, 550, 550], {}))
        self.assertLess(time.monotonic() - started, 15)
        yield wait_until(lambda: len(self.server.messages("alice")) == 1)
        self.assertEqual(self.server.messages("bob"), [])


class ReloadTests(SubmissionCase):
    limits = {"auth_failures": 2}

    @defer.inlineCallbacks
    def test_reload_keeps_failure_counts_and_applies_send_as(self) -> None:
        def fail_twice() -> None:
            with self.client() as c:
                for _ in range(2):
                    c.docmd(
                        "AUTH", "PLAIN " + base64.b64encode(b"\0bob@example.test\0nope").decode()
                    )

        yield self.inthread(fail_twice)
        # bob may send as sales@ after the reload.
        config_path = self.server.config.source
        text = config_path.read_text().replace(
            "alice@example.test:\n    - sales@example.test",
            "alice@example.test:\n    - sales@example.test\n    bob@example.test:\n    - sales@example.test",
        )
        self.assertIn("bob@example.test:", text)
        config_path.write_text(text)
        self.assertTrue(self.server.service.reload())

        def after() -> Any:
            with self.client() as c:
                token = base64.b64encode(b"\0bob@example.test\0bobs").decode()
                return c.docmd("AUTH", "PLAIN " + token)[0]

        self.assertEqual((yield self.inthread(after)), 454)  # still blocked
        self.server.service.submission.failures._failures.clear()  # the cool-down, without waiting

        def send_as_sales() -> Any:
            with self.client() as c:
                c.login("bob@example.test", "bobs")
                return c.docmd("MAIL", "FROM:<sales@example.test>")[0]

        self.assertEqual((yield self.inthread(send_as_sales)), 250)


class DovecotSubmissionTests(unittest.TestCase):
    """Submission against Dovecot's auth service (accounts.dovecot), as
    Postfix's smtpd_sasl_type = dovecot does; the set-up is test_accounts'."""

    timeout = 90

    from tests.test_accounts import RealDovecotTests as _Real

    setUp = _Real.setUp
    stop_dovecot = _Real.stop_dovecot

    @defer.inlineCallbacks
    def test_login_checked_by_dovecot(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()).absolute())
        server = start_server(
            self,
            {
                "listen": {"submission": ["tcp:0:interface=127.0.0.1"]},
                "tls": {"certificate": str(cert), "key": str(key)},
                "accounts": {"dovecot": f"unix:{self.socket}"},
            },
        )
        port = server.ports[1]

        def talk() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.starttls(context=tls_client_context(cert))
                c.ehlo("client.test")
                wrong = c.docmd(
                    "AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.test\0x").decode()
                )
                c.login("alice@example.test", "tr0ub4dor")
                c.sendmail("alice@example.test", ["bob@example.test"], submitted())
                return wrong[0]

        self.assertEqual((yield deferToThread(talk)), 535)
        self.assertEqual(len(server.messages("bob")), 1)
