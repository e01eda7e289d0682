# -*- test-case-name: tests.test_dkimkeys -*-
"""DKIM keys (mailx.outbound.dkimkeys) and ``mailxctl dkim keygen``.

A key is only right if a verifier accepts what we sign with it: each
algorithm's record is published in the loopback DNS server and the
signed message verified through it, by dkimpy itself for RSA and by
`mailx.checks.dkim` (dkimpy plus ``cryptography``) for Ed25519, which
dkimpy alone verifies only with PyNaCl installed.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
from pathlib import Path
from typing import Any
from unittest import mock

import dkim
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial import unittest

from mailx.checks.dkim import verify_dkim
from mailx.config import load_config
from mailx.dns import Resolver
from mailx.outbound import dkimkeys
from mailx.testing.dnsserver import serve_for_test
from tests.test_dnssetup import CLITestCase, write_config

# A DSN as mailx.outbound.dsn writes them: CRLF, From MAILER-DAEMON at our hostname.
MESSAGE = (
    b"From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\r\n"
    b"To: <alice@sender.test>\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Date: Sat, 03 Oct 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q1.abc@mx.example.test>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Your message could not be delivered.\r\n"
)


def signature_tags(message: bytes) -> dict[str, str]:
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    value = header.split("DKIM-Signature:", 1)[1].split("\r\nFrom:", 1)[0]
    value = "".join(value.split())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


class KeyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()

    def test_rsa_is_2048_bits(self) -> None:
        key = dkimkeys.generate_key("rsa")
        self.assertIsInstance(key, rsa.RSAPrivateKey)
        self.assertEqual(key.key_size, 2048)

    def test_rsa_record(self) -> None:
        key = dkimkeys.generate_key("rsa")
        record = dkimkeys.dns_record(key)
        self.assertTrue(record.startswith("v=DKIM1; k=rsa; p=MII"))

    def test_ed25519_record_is_the_bare_32_octets(self) -> None:
        # RFC 8463 4.2: p= is the base64 of the raw public key, not SPKI.
        key = dkimkeys.generate_key("ed25519")
        record = dkimkeys.dns_record(key)
        self.assertTrue(record.startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(len(base64.b64decode(record.rpartition("p=")[2])), 32)

    def test_unknown_algorithm(self) -> None:
        self.assertRaises(ValueError, dkimkeys.generate_key, "dsa")

    def test_written_with_mode_0600(self) -> None:
        old = os.umask(0)  # fchmod, not the umask, decides
        try:
            path = dkimkeys.write_key(dkimkeys.generate_key(), self.directory / "k" / "a.key")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)

    def test_never_overwrites(self) -> None:
        path = dkimkeys.write_key(dkimkeys.generate_key(), self.directory / "a.key")
        before = path.read_bytes()
        e = self.assertRaises(
            dkimkeys.KeyExistsError, dkimkeys.write_key, dkimkeys.generate_key(), path
        )
        self.assertIn("never overwrites", str(e))
        self.assertEqual(path.read_bytes(), before)

    def test_does_not_follow_a_symlink(self) -> None:
        self.directory.mkdir(parents=True)
        target = self.directory / "elsewhere"
        link = self.directory / "a.key"
        link.symlink_to(target)
        self.assertRaises(
            dkimkeys.KeyExistsError, dkimkeys.write_key, dkimkeys.generate_key(), link
        )
        self.assertFalse(target.exists())

    def test_load_round_trip(self) -> None:
        for algorithm in dkimkeys.ALGORITHMS:
            key = dkimkeys.generate_key(algorithm)
            path = dkimkeys.write_key(key, self.directory / f"{algorithm}.key")
            self.assertEqual(dkimkeys.dns_record(dkimkeys.load_key(path)), dkimkeys.dns_record(key))

    def test_load_rsa_is_pkcs1_pem(self) -> None:
        path = dkimkeys.write_key(dkimkeys.generate_key("rsa"), self.directory / "a.key")
        self.assertTrue(path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----"))

    def test_load_dkimpy_ed25519_seed(self) -> None:
        self.directory.mkdir(parents=True)
        seed = os.urandom(32)
        path = self.directory / "seed.key"
        path.write_bytes(base64.b64encode(seed) + b"\n")
        key = dkimkeys.load_key(path)
        self.assertIsInstance(key, ed25519.Ed25519PrivateKey)
        expected = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self.assertEqual(dkimkeys.dns_record(key), dkimkeys.dns_record(expected))

    def test_load_garbage(self) -> None:
        self.directory.mkdir(parents=True)
        path = self.directory / "bad.key"
        path.write_text("hello")
        self.assertRaises(dkimkeys.KeyFileError, dkimkeys.load_key, path)
        self.assertRaises(dkimkeys.KeyFileError, dkimkeys.load_key, self.directory / "none")

    def test_an_unchanged_key_file_is_read_once(self) -> None:
        path = dkimkeys.write_key(dkimkeys.generate_key("rsa"), self.directory / "once.key")
        reads = []
        real = Path.read_bytes

        def counting(self: Path) -> bytes:
            reads.append(self)
            return real(self)

        with mock.patch.object(Path, "read_bytes", counting):
            first = dkimkeys.load_key(path)
            self.assertIs(dkimkeys.load_key(str(path)), first)
        self.assertEqual(reads, [path])

    def test_a_key_file_replaced_in_place_is_read_again(self) -> None:
        path = dkimkeys.write_key(dkimkeys.generate_key("rsa"), self.directory / "k.key")
        before = dkimkeys.dns_record(dkimkeys.load_key(path))
        newer = dkimkeys.write_key(dkimkeys.generate_key("rsa"), self.directory / "new.key")
        os.replace(newer, path)
        after = dkimkeys.dns_record(dkimkeys.load_key(path))
        self.assertNotEqual(after, before)
        self.assertEqual(after, dkimkeys.dns_record(dkimkeys.load_key(path)))

    def test_default_selector_changes_each_month(self) -> None:
        self.assertEqual(dkimkeys.default_selector(datetime.date(2026, 10, 3)), "mx202610")


class SignTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = serve_for_test(self)
        self.resolver = Resolver(self.server.nameservers, 2.0)

    def publish(self, key: dkimkeys.PrivateKey, selector: str = "mx1") -> None:
        self.server.set(f"{selector}._domainkey.example.test", "TXT", [dkimkeys.dns_record(key)])

    def dkimpy_verify(self, message: bytes) -> defer.Deferred[bool]:
        return threads.deferToThread(dkim.verify, message, dnsfunc=self.resolver.dkim_dnsfunc)

    @defer.inlineCallbacks
    def test_rsa_signature_verifies_with_dkimpy(self) -> None:
        key = dkimkeys.generate_key("rsa")
        self.publish(key)
        signed = dkimkeys.sign(MESSAGE, "example.test", "mx1", key)
        self.assertTrue((yield self.dkimpy_verify(signed)))

    @defer.inlineCallbacks
    def test_rsa_signature_from_key_file(self) -> None:
        key = dkimkeys.generate_key("rsa")
        path = dkimkeys.write_key(key, Path(self.mktemp()) / "k.key")
        self.publish(key)
        signed = dkimkeys.sign(MESSAGE, "example.test", "mx1", path)
        self.assertTrue((yield self.dkimpy_verify(signed)))

    @defer.inlineCallbacks
    def test_rsa_tampered_body_fails(self) -> None:
        key = dkimkeys.generate_key("rsa")
        self.publish(key)
        signed = dkimkeys.sign(MESSAGE, "example.test", "mx1", key)
        self.assertFalse((yield self.dkimpy_verify(signed.replace(b"could not", b"could"))))

    @defer.inlineCallbacks
    def test_rsa_with_another_published_key_fails(self) -> None:
        self.publish(dkimkeys.generate_key("rsa"))
        signed = dkimkeys.sign(MESSAGE, "example.test", "mx1", dkimkeys.generate_key("rsa"))
        self.assertFalse((yield self.dkimpy_verify(signed)))

    @defer.inlineCallbacks
    def test_ed25519_signature_verifies(self) -> None:
        key = dkimkeys.generate_key("ed25519")
        self.publish(key, "ed")
        signed = dkimkeys.sign(MESSAGE, "example.test", "ed", key)
        [result] = yield threads.deferToThread(verify_dkim, self.resolver, signed)
        self.assertEqual((result.result, result.algorithm), ("pass", "ed25519-sha256"), result)

    @defer.inlineCallbacks
    def test_ed25519_tampered_header_fails(self) -> None:
        key = dkimkeys.generate_key("ed25519")
        self.publish(key, "ed")
        signed = dkimkeys.sign(MESSAGE, "example.test", "ed", key)
        tampered = signed.replace(b"Subject: Undelivered", b"Subject: Delivered")
        [result] = yield threads.deferToThread(verify_dkim, self.resolver, tampered)
        self.assertEqual(result.result, "fail")

    def test_relaxed_relaxed_and_the_headers_signed(self) -> None:
        signed = dkimkeys.sign(MESSAGE, "example.test", "mx1", dkimkeys.generate_key("rsa"))
        tags = signature_tags(signed)
        self.assertEqual(
            (tags["c"], tags["d"], tags["s"]), ("relaxed/relaxed", "example.test", "mx1")
        )
        signed_headers = tags["h"].split(":")
        for name in ("from", "to", "subject", "date", "message-id", "mime-version"):
            self.assertIn(name, signed_headers)
        # RFC 6376 8.15: From is signed once more than it occurs.
        self.assertEqual(signed_headers.count("from"), 2)
        self.assertTrue(signed.endswith(MESSAGE))

    def test_message_without_from_cannot_be_signed(self) -> None:
        message = MESSAGE.replace(
            b"From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\r\n", b""
        )
        self.assertRaises(
            dkim.DKIMException,
            dkimkeys.sign,
            message,
            "example.test",
            "mx1",
            dkimkeys.generate_key(),
        )


class SignIfConfiguredTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.config = load_config(write_config(self.directory))
        self.events: list[dict[str, Any]] = []
        self.patch(dkimkeys, "log", Logger(observer=self.events.append))

    def test_signs_mail_from_our_hostname_with_the_parent_domain(self) -> None:
        # DMARC relaxed alignment (RFC 7489 3.1.1): d=example.test covers
        # From: MAILER-DAEMON@mx.example.test.
        signed = dkimkeys.sign_if_configured(self.config, MESSAGE)
        tags = signature_tags(signed)
        self.assertEqual((tags["d"], tags["s"]), ("example.test", "mx1"))

    def test_signing_domain(self) -> None:
        self.assertEqual(dkimkeys.signing_domain(self.config, "example.test"), "example.test")
        self.assertEqual(dkimkeys.signing_domain(self.config, "a.b.example.test"), "example.test")
        self.assertIsNone(dkimkeys.signing_domain(self.config, "notexample.test"))
        self.assertIsNone(dkimkeys.signing_domain(self.config, "test"))

    def test_foreign_from_is_left_alone(self) -> None:
        message = MESSAGE.replace(b"MAILER-DAEMON@mx.example.test", b"someone@elsewhere.test")
        self.assertEqual(dkimkeys.sign_if_configured(self.config, message), message)

    def test_domain_without_key_is_left_alone(self) -> None:
        config = load_config(write_config(self.directory / "nokey", dkim=False))
        self.assertEqual(dkimkeys.sign_if_configured(config, MESSAGE), MESSAGE)

    def test_unreadable_key_sends_unsigned_and_warns(self) -> None:
        (self.directory / "dkim" / "example.test.key").unlink()
        self.assertEqual(dkimkeys.sign_if_configured(self.config, MESSAGE), MESSAGE)
        self.assertEqual(len(self.events), 1)
        self.assertIn("cannot read DKIM key", self.events[0]["error"])


class KeygenCommandTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = write_config(self.directory, dkim=False)

    @defer.inlineCallbacks
    def test_rsa_key_at_the_default_path(self) -> None:
        status, out, err = yield self.run_cli(
            "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(self.config)
        )
        self.assertEqual((status, err), (0, ""))
        path = self.directory / "dkim" / "example.test.s1.key"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        record = dkimkeys.dns_record(dkimkeys.load_key(path))
        self.assertIn(record, out)
        self.assertIn('s1._domainkey.example.test. IN TXT   ( "v=DKIM1; k=rsa; p=', out)
        self.assertIn("dkim: {selector: s1, key: dkim/example.test.s1.key}", out)

    @defer.inlineCallbacks
    def test_ed25519_json(self) -> None:
        status, out, _ = yield self.run_cli(
            "dkim",
            "keygen",
            "example.test",
            "--algorithm",
            "ed25519",
            "--selector",
            "ed",
            "--json",
            "-c",
            str(self.config),
        )
        data = json.loads(out)
        self.assertEqual(status, 0)
        self.assertEqual(data["name"], "ed._domainkey.example.test")
        self.assertTrue(data["record"].startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(data["record"], dkimkeys.dns_record(dkimkeys.load_key(data["key"])))

    @defer.inlineCallbacks
    def test_default_selector_and_configured_path(self) -> None:
        status, out, _ = yield self.run_cli(
            "dkim", "keygen", "example.test", "--json", "-c", str(self.config)
        )
        data = json.loads(out)
        self.assertEqual((status, data["selector"]), (0, dkimkeys.default_selector()))
        # Once configured, keygen writes where the configuration says.
        config = write_config(self.directory / "configured")  # dkim: mx1, dkim/example.test.key
        key = self.directory / "configured" / "dkim" / "example.test.key"
        key.unlink()
        status, out, _ = yield self.run_cli(
            "dkim", "keygen", "example.test", "--json", "-c", str(config)
        )
        data = json.loads(out)
        self.assertEqual((status, data["selector"], data["key"]), (0, "mx1", str(key)))
        self.assertIsNone(data["config"])  # mailx.yaml already names it

    @defer.inlineCallbacks
    def test_refuses_to_overwrite(self) -> None:
        argv = ("dkim", "keygen", "example.test", "--selector", "s1", "-c", str(self.config))
        yield self.run_cli(*argv)
        path = self.directory / "dkim" / "example.test.s1.key"
        before = path.read_bytes()
        status, out, _ = yield self.run_cli(*argv)
        self.assertEqual(status, 1)
        self.assertIn("already exists", out)
        self.assertEqual(path.read_bytes(), before)

    @defer.inlineCallbacks
    def test_output_option(self) -> None:
        target = self.directory / "elsewhere" / "k.pem"
        status, _, _ = yield self.run_cli(
            "dkim", "keygen", "example.test", "--output", str(target), "-c", str(self.config)
        )
        self.assertEqual(status, 0)
        self.assertTrue(target.exists())

    @defer.inlineCallbacks
    def test_foreign_domain_exits_1(self) -> None:
        status, out, _ = yield self.run_cli("dkim", "keygen", "example.com", "-c", str(self.config))
        self.assertEqual(status, 1)
        self.assertIn("not a configured domain", out)
        self.assertFalse((self.directory / "dkim").exists())

    @defer.inlineCallbacks
    def test_bad_selector_is_a_usage_error(self) -> None:
        status, _, err = yield self.run_cli(
            "dkim", "keygen", "example.test", "--selector", "a_b", "-c", str(self.config)
        )
        self.assertEqual(status, 2)
        self.assertIn("not a DKIM selector", err)

    @defer.inlineCallbacks
    def test_generated_key_checks_ok_in_dns(self) -> None:
        """keygen, add the printed line, publish the printed record: --check says DKIM ok."""
        server = serve_for_test(self)
        config = write_config(self.directory / "live", server.nameservers, dkim=False)
        status, out, _ = yield self.run_cli(
            "dkim", "keygen", "example.test", "--selector", "k1", "--json", "-c", str(config)
        )
        data = json.loads(out)
        text = config.read_text() + f"    {data['config']}\n"
        config.write_text(text)
        server.set(data["name"], "TXT", [tuple(data["strings"])])
        status, out, _ = yield self.run_cli(
            "dns", "example.test", "--check", "--json", "-c", str(config)
        )
        [finding] = [f for f in json.loads(out)["findings"] if f["record"] == "DKIM"]
        self.assertEqual(finding["status"], "ok", finding)
