# -*- test-case-name: tests.test_config -*-
"""The configuration file (SPEC section 3): mailx.config."""

from __future__ import annotations

import builtins
import dataclasses
import operator
import os
import time
from pathlib import Path
from textwrap import dedent

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx import config as config_module
from mailx.config import (
    BLOCK_DEFAULTS,
    DEFAULTS,
    Config,
    ConfigError,
    DNSBLZone,
    Problem,
    load_config,
    load_config_text,
    parse_duration,
    parse_size,
)
from mailx.inbound.routing import route
from mailx.testing import SRS_SECRET, SRS_SECRET_2
from mailx.testing.tls import certificate_pem

REPOSITORY = Path(__file__).resolve().parent.parent

# Line 1 is "hostname"; domains start on line 2.
MINIMAL = """\
hostname: mx.example.test
domains:
  example.test:
    mailboxes: [alice, bob]
    aliases:
      postmaster: alice
"""


class ConfigTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.file = self.directory / "mailx.yaml"

    def load(self, text: str) -> Config:
        return load_config_text(dedent(text), self.file)

    def problems(self, text: str) -> list[Problem]:
        error = self.assertRaises(ConfigError, self.load, text)
        return error.problems

    def assertProblem(self, text: str, line: int | None, key: str | None, message: str) -> None:
        """Exactly one problem, at line and key, whose message contains message."""
        problems = self.problems(text)
        self.assertEqual(len(problems), 1, problems)
        problem = problems[0]
        self.assertEqual((problem.file, problem.line, problem.key), (str(self.file), line, key))
        self.assertIn(message, problem.message)

    def with_domains(self, domains: str, head: str = "") -> str:
        """A config: head, then a domains block (domains starts on line len(head)+1)."""
        return dedent(head) + "domains:\n" + dedent(domains)


class RepositoryDefaultTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = load_config(REPOSITORY / "mailx.yaml")

    def test_loads(self) -> None:
        self.assertEqual(self.config.hostname, "mx.example.test")

    def test_listens_unprivileged_on_localhost(self) -> None:
        self.assertEqual(self.config.listen, ("tcp:2525:interface=127.0.0.1",))

    def test_keeps_everything_under_var(self) -> None:
        self.assertEqual(self.config.paths.mail, REPOSITORY / "var" / "mail")
        self.assertEqual(self.config.paths.spool, REPOSITORY / "var" / "spool")

    def test_serves_example_test(self) -> None:
        domain = self.config.domains["example.test"]
        self.assertEqual(domain.mailboxes, frozenset({"alice", "bob"}))
        self.assertEqual(dict(domain.aliases), {"postmaster": ("alice",), "team": ("alice", "bob")})

    def test_enforces_dmarc(self) -> None:
        self.assertEqual(self.config.authentication.dmarc, "enforce")

    def test_mirrors_the_defaults(self) -> None:
        """mailx.yaml shows the default of everything but hostname, paths and domains."""
        directory = Path(self.mktemp())
        directory.mkdir()
        defaults = load_config_text(MINIMAL, directory / "mailx.yaml")
        for field in [
            "public_addresses",
            "listen",
            "tls",
            "limits",
            "dns",
            "authentication",
            "checks",
            "outbound",
        ]:
            with self.subTest(field=field):
                self.assertEqual(getattr(self.config, field), getattr(defaults, field))

    def test_mentions_every_key(self) -> None:
        text = (REPOSITORY / "mailx.yaml").read_text()
        keys = set(DEFAULTS)
        for section in DEFAULTS.values():
            if hasattr(section, "keys"):
                keys |= set(section)
        for block in BLOCK_DEFAULTS.values():
            keys |= set(block)
        for key in sorted(keys):
            with self.subTest(key=key):
                self.assertIn(f"{key}:", text)


class DefaultsTests(ConfigTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = self.load(MINIMAL)

    def test_limits(self) -> None:
        limits = self.config.limits
        self.assertEqual(
            dataclasses.astuple(limits),
            (25 * 1024 * 1024, 100, 1000, 20, 300.0, 1800.0, 20, 60, 1.0, 100, 64, 5, 200),
        )

    def test_only_loopback_may_send_proxy_headers(self) -> None:
        self.assertEqual(
            [n.compressed for n in self.config.haproxy_trusted_networks], ["127.0.0.0/8", "::1/128"]
        )

    def test_listen(self) -> None:
        self.assertEqual(self.config.listen, ("tcp:2525:interface=127.0.0.1",))

    def test_no_tls(self) -> None:
        self.assertIsNone(self.config.tls)

    def test_dns(self) -> None:
        self.assertEqual(dataclasses.astuple(self.config.dns), ((), 5.0, None))

    def test_authentication(self) -> None:
        self.assertEqual(
            dataclasses.astuple(self.config.authentication), (True, True, "enforce", 30.0, 2)
        )

    def test_no_dnsbl(self) -> None:
        self.assertEqual(self.config.checks.dnsbl, ())

    def test_outbound(self) -> None:
        self.assertEqual(
            dataclasses.astuple(self.config.outbound),
            (
                (),
                None,
                25,
                (300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
                432000.0,
                None,
                14400.0,
                100,
                20,
                (),
                True,  # mta_sts
            ),
        )

    def test_paths_relative_to_the_file(self) -> None:
        self.assertEqual(self.config.paths.mail, self.directory / "var" / "mail")
        self.assertEqual(self.config.paths.spool, self.directory / "var" / "spool")

    def test_domain(self) -> None:
        domain = self.config.domains["example.test"]
        self.assertEqual(
            (domain.name, domain.subaddress_delimiter, domain.dkim, domain.alias_of),
            ("example.test", "+", None, None),
        )

    def test_source_is_absolute(self) -> None:
        self.assertEqual(self.config.source, self.file)

    def test_first_domain(self) -> None:
        self.assertEqual(self.config.first_domain, "example.test")

    def test_hostname_defaults_to_system_fqdn(self) -> None:
        self.patch(config_module.socket, "getfqdn", lambda: "Mail.Example.NET")
        self.assertEqual(
            self.load(MINIMAL.replace("hostname: mx.example.test\n", "")).hostname,
            "mail.example.net",
        )

    def test_system_hostname_that_is_not_an_fqdn_is_a_problem(self) -> None:
        """Not silently 'localhost': `mailxctl dns` would print MX 10 localhost."""
        self.patch(config_module.socket, "getfqdn", lambda: "localhost")
        self.assertProblem(
            MINIMAL.replace("hostname: mx.example.test\n", ""),
            1,
            "hostname",
            "the system's host name 'localhost' is not a fully qualified domain name: set"
            " hostname to the name your MX record points at, e.g. mx.example.test",
        )

    def test_unusable_system_hostname_is_a_problem(self) -> None:
        self.patch(config_module.socket, "getfqdn", lambda: "under_score")
        self.assertProblem(
            MINIMAL.replace("hostname: mx.example.test", "hostname: null"),
            1,
            "hostname",
            "the system's host name 'under_score' is not a domain name: set hostname",
        )


class ImmutabilityTests(ConfigTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = self.load(MINIMAL)

    def test_config_is_frozen(self) -> None:
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, self.config, "hostname", "x")

    def test_domains_mapping_is_read_only(self) -> None:
        self.assertRaises(TypeError, operator.setitem, self.config.domains, "x.test", None)

    def test_aliases_mapping_is_read_only(self) -> None:
        aliases = self.config.domains["example.test"].aliases
        self.assertRaises(TypeError, operator.setitem, aliases, "x", ("alice",))

    def test_defaults_are_read_only(self) -> None:
        self.assertRaises(TypeError, operator.setitem, DEFAULTS["limits"], "recipients", 1)


class UnitTests(unittest.TestCase):
    def test_sizes(self) -> None:
        for text, size in [
            (512, 512),
            ("512", 512),
            ("1B", 1),
            ("1KiB", 1024),
            ("25MiB", 25 * 1024**2),
            ("25 MiB", 25 * 1024**2),
            ("1GiB", 1024**3),
            ("1KB", 1000),
            ("10MB", 10_000_000),
            ("2GB", 2_000_000_000),
            ("1.5MiB", 1572864),
        ]:
            with self.subTest(text=text):
                self.assertEqual(parse_size(text), size)

    def test_bad_sizes(self) -> None:
        for text in ["25 megs", "-5MiB", "10Mb", "10mib", "", "MiB", -1, True, "1.2.3", None]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_size, text)

    def test_durations(self) -> None:
        for text, seconds in [
            (90, 90.0),
            (2.5, 2.5),
            ("90", 90.0),
            ("30s", 30.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("2d", 172800.0),
            ("1h30m", 5400.0),
            ("1h 30m", 5400.0),
        ]:
            with self.subTest(text=text):
                self.assertEqual(parse_duration(text), seconds)

    def test_bad_durations(self) -> None:
        for text in ["5x", "-5m", "", "m", "5 minutes", -3, True, "1w", None]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_duration, text)


class ValueTests(ConfigTestCase):
    def test_bad_size(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  message_size: 25 megs\n",
            8,
            "limits.message_size",
            "'25 megs' is not a size",
        )

    def test_zero_size(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  message_size: 0\n", 8, "limits.message_size", "at least 1 byte"
        )

    def test_size_units_in_file(self) -> None:
        config = self.load(MINIMAL + "limits:\n  message_size: 10MB\n")
        self.assertEqual(config.limits.message_size, 10_000_000)

    def test_bad_duration(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  idle_timeout: 5x\n",
            8,
            "limits.idle_timeout",
            "'5x' is not a duration",
        )

    def test_negative_duration(self) -> None:
        self.assertProblem(
            MINIMAL + "dns:\n  timeout: -5\n", 8, "dns.timeout", "cannot be negative"
        )

    def test_zero_duration(self) -> None:
        self.assertProblem(
            MINIMAL + "dns:\n  timeout: 0s\n", 8, "dns.timeout", "must be longer than zero"
        )

    def test_zero_greeting_delay_means_off(self) -> None:
        self.assertEqual(
            self.load(MINIMAL + "limits:\n  greeting_delay: 0\n").limits.greeting_delay, 0.0
        )

    def test_greeting_delay(self) -> None:
        self.assertEqual(
            self.load(MINIMAL + "limits:\n  greeting_delay: 6s\n").limits.greeting_delay, 6.0
        )

    def test_duration_units_in_file(self) -> None:
        config = self.load(MINIMAL + "dns:\n  watch: 6h\n")
        self.assertEqual(config.dns.watch, 21600.0)

    def test_negative_count(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  recipients: -1\n",
            8,
            "limits.recipients",
            "must be at least 1, got -1",
        )

    def test_count_of_wrong_type(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  recipients: many\n",
            8,
            "limits.recipients",
            "expected a whole number, got 'many'",
        )

    def test_boolean_is_not_a_count(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  connections: yes\n",
            8,
            "limits.connections",
            "expected a whole number",
        )

    def test_zero_connection_rate_means_off(self) -> None:
        self.assertEqual(
            self.load(
                MINIMAL + "limits:\n  connection_rate_per_ip: 0\n"
            ).limits.connection_rate_per_ip,
            0,
        )

    def test_section_of_wrong_type(self) -> None:
        self.assertProblem(
            MINIMAL + "limits: [1, 2]\n", 7, "limits", "expected a mapping, got a list"
        )

    def test_boolean_of_wrong_type(self) -> None:
        self.assertProblem(
            MINIMAL + "authentication:\n  spf: maybe\n",
            8,
            "authentication.spf",
            "expected true or false, got 'maybe'",
        )

    def test_bad_dmarc_mode(self) -> None:
        self.assertProblem(
            MINIMAL + "authentication:\n  dmarc: reject\n",
            8,
            "authentication.dmarc",
            "must be one of enforce, monitor, off, got 'reject'",
        )

    def test_check_timeout_and_concurrency(self) -> None:
        config = self.load(
            MINIMAL + "authentication:\n  timeout: 1m\n  concurrency_per_ip: 4\n"
        )
        self.assertEqual(
            (config.authentication.timeout, config.authentication.concurrency_per_ip), (60.0, 4)
        )
        self.assertProblem(
            MINIMAL + "authentication:\n  concurrency_per_ip: 0\n",
            8,
            "authentication.concurrency_per_ip",
            "must be at least 1",
        )
        self.assertProblem(
            MINIMAL + "authentication:\n  timeout: 0s\n",
            8,
            "authentication.timeout",
            "must be longer than zero",
        )

    def test_dmarc_off_unquoted_is_off_not_false(self) -> None:
        """YAML 1.1 reads a bare off as false; the key means the word."""
        config = self.load(MINIMAL + "authentication:\n  dmarc: off\n")
        self.assertEqual(config.authentication.dmarc, "off")

    def test_hostname_must_be_fully_qualified(self) -> None:
        for name in ("localhost", "mx", "192.0.2.25", "mx.123"):
            self.assertProblem(
                MINIMAL.replace("mx.example.test", name),
                1,
                "hostname",
                f"'{name}' is not a fully qualified domain name: set it to the name your MX"
                " record points at, e.g. mx.example.test",
            )

    def test_bad_hostname(self) -> None:
        self.assertProblem(
            MINIMAL.replace("mx.example.test", "mx example"), 1, "hostname", "invalid domain"
        )

    def test_public_addresses_are_normalized(self) -> None:
        config = self.load(MINIMAL + "public_addresses: [192.0.2.1, '2001:DB8::1']\n")
        self.assertEqual(config.public_addresses, ("192.0.2.1", "2001:db8::1"))

    def test_bad_public_address(self) -> None:
        self.assertProblem(
            MINIMAL + "public_addresses: [192.0.2.300]\n",
            7,
            "public_addresses[0]",
            "'192.0.2.300' is not an IP address",
        )


class NameserverTests(ConfigTestCase):
    def nameservers(self, *entries: str) -> tuple:
        listed = ", ".join(f'"{e}"' for e in entries)
        return self.load(MINIMAL + f"dns:\n  nameservers: [{listed}]\n").dns.nameservers

    def test_forms(self) -> None:
        self.assertEqual(
            self.nameservers("127.0.0.1", "127.0.0.1:5353", "[::1]:5353", "::1", "[::1]"),
            (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 5353), ("::1", 53), ("::1", 53)),
        )

    def test_host_name_is_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "dns:\n  nameservers: [dns.google]\n",
            8,
            "dns.nameservers[0]",
            "a nameserver must be an IP address",
        )

    def test_bad_port(self) -> None:
        self.assertProblem(
            MINIMAL + "dns:\n  nameservers: ['127.0.0.1:0']\n",
            8,
            "dns.nameservers[0]",
            "bad port '0'",
        )

    def test_brackets_only_for_ipv6(self) -> None:
        self.assertProblem(
            MINIMAL + "dns:\n  nameservers: ['[127.0.0.1]:53']\n",
            8,
            "dns.nameservers[0]",
            "brackets are for IPv6",
        )


class ListenTests(ConfigTestCase):
    def test_several_endpoints(self) -> None:
        config = self.load(MINIMAL + "listen:\n  smtp: ['tcp:25', 'tcp6:25:interface=\\:\\:']\n")
        self.assertEqual(config.listen, ("tcp:25", "tcp6:25:interface=\\:\\:"))

    def test_single_string(self) -> None:
        self.assertEqual(self.load(MINIMAL + "listen:\n  smtp: tcp:25\n").listen, ("tcp:25",))

    def test_trusted_proxy_networks(self) -> None:
        config = self.load(
            MINIMAL + "listen:\n  haproxy_trusted_networks: [10.0.0.0/8, 192.0.2.7, '2001:db8::/32']\n"
        )
        self.assertEqual(
            [n.compressed for n in config.haproxy_trusted_networks],
            ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
        )

    def test_trusted_proxy_network_with_host_bits_is_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "listen:\n  haproxy_trusted_networks: [10.0.0.1/8]\n",
            8,
            "listen.haproxy_trusted_networks[0]",
            "is not a network such as 10.0.0.0/8",
        )

    def test_bad_port(self) -> None:
        self.assertProblem(
            MINIMAL + "listen:\n  smtp: ['tcp:smtp']\n",
            8,
            "listen.smtp[0]",
            "is not a Twisted endpoint",
        )

    def test_unknown_endpoint_type(self) -> None:
        self.assertProblem(
            MINIMAL + "listen:\n  smtp: ['carrier-pigeon:25']\n",
            8,
            "listen.smtp[0]",
            "is not a Twisted endpoint",
        )

    def test_port_out_of_range(self) -> None:
        self.assertProblem(
            MINIMAL + "listen:\n  smtp: ['tcp:99999']\n",
            8,
            "listen.smtp[0]",
            "port 99999 out of range",
        )

    def test_port_out_of_range_behind_haproxy_or_named(self) -> None:
        # Read from the description, not Twisted's private endpoint._port.
        self.assertProblem(
            MINIMAL + "listen:\n  smtp: ['haproxy:tcp:port=70000:interface=127.0.0.1']\n",
            8,
            "listen.smtp[0]",
            "port 70000 out of range",
        )

    def test_empty_list(self) -> None:
        self.assertProblem(
            MINIMAL + "listen:\n  smtp: []\n", 8, "listen.smtp", "needs at least one endpoint"
        )


class TLSTests(ConfigTestCase):
    TLS = "tls:\n  certificate: cert.pem\n  key: key.pem\n"

    def write(self, *names: str) -> None:
        for name in names:
            (self.directory / name).write_text("-----BEGIN-----\n")

    def test_files_resolve_against_config_directory(self) -> None:
        cert, key = certificate_pem()
        (self.directory / "cert.pem").write_bytes(cert)
        (self.directory / "key.pem").write_bytes(key)
        (self.directory / "key.pem").chmod(0o600)
        tls = self.load(MINIMAL + self.TLS).tls
        self.assertEqual(
            (tls.certificate, tls.key), (self.directory / "cert.pem", self.directory / "key.pem")
        )

    def test_missing_file(self) -> None:
        self.write("cert.pem")
        self.assertProblem(
            MINIMAL + self.TLS,
            9,
            "tls.key",
            f"cannot read {self.directory / 'key.pem'}: No such file or directory",
        )

    def test_directory_is_not_a_file(self) -> None:
        self.write("key.pem")
        (self.directory / "cert.pem").mkdir()
        self.assertProblem(MINIMAL + self.TLS, 8, "tls.certificate", "Is a directory")

    def test_unreadable_file(self) -> None:
        self.write("cert.pem", "key.pem")
        key = self.directory / "key.pem"
        key.chmod(0)
        if os.geteuid() == 0:  # root reads anything: make open() say what it would to others
            real_open = builtins.open

            def refusing_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
                if Path(file) == key:
                    raise PermissionError(13, "Permission denied", str(file))
                return real_open(file, *args, **kwargs)

            self.patch(builtins, "open", refusing_open)
        self.assertProblem(MINIMAL + self.TLS, 9, "tls.key", "Permission denied")

    def test_key_is_required(self) -> None:
        self.write("cert.pem")
        self.assertProblem(MINIMAL + "tls:\n  certificate: cert.pem\n", 7, "tls.key", "required")


class DNSBLTests(ConfigTestCase):
    def test_zone_and_action(self) -> None:
        config = self.load(MINIMAL + "checks:\n  dnsbl: [{zone: Zen.Spamhaus.org, action: junk}]\n")
        self.assertEqual(config.checks.dnsbl, (DNSBLZone("zen.spamhaus.org", "junk"),))

    def test_action_defaults_to_reject(self) -> None:
        config = self.load(MINIMAL + "checks:\n  dnsbl: [{zone: zen.spamhaus.org}]\n")
        self.assertEqual(config.checks.dnsbl, (DNSBLZone("zen.spamhaus.org", "reject"),))

    def test_bare_zone(self) -> None:
        config = self.load(MINIMAL + "checks:\n  dnsbl: [zen.spamhaus.org]\n")
        self.assertEqual(config.checks.dnsbl, (DNSBLZone("zen.spamhaus.org", "reject"),))

    def test_bad_action(self) -> None:
        self.assertProblem(
            MINIMAL + "checks:\n  dnsbl:\n    - zone: zen.spamhaus.org\n      action: drop\n",
            10,
            "checks.dnsbl[0].action",
            "must be one of reject, junk, got 'drop'",
        )

    def test_zone_is_required(self) -> None:
        self.assertProblem(
            MINIMAL + "checks:\n  dnsbl:\n    - action: junk\n",
            9,
            "checks.dnsbl[0].zone",
            "required",
        )


class OutboundTests(ConfigTestCase):
    def test_srs_secret_list(self) -> None:
        config = self.load(MINIMAL + f"outbound:\n  srs_secret: [{SRS_SECRET}, {SRS_SECRET_2}]\n")
        self.assertEqual(config.outbound.srs_secrets, (SRS_SECRET, SRS_SECRET_2))

    def test_srs_secret_string(self) -> None:
        self.assertEqual(
            self.load(MINIMAL + f"outbound:\n  srs_secret: '{SRS_SECRET}'\n").outbound.srs_secrets,
            (SRS_SECRET,),
        )

    def test_sample_srs_secret_is_refused(self) -> None:
        # mailx.yaml's comment once suggested it; it passed `mailxctl check`.
        self.assertProblem(
            MINIMAL + "outbound:\n  srs_secret: change-me\n",
            8,
            "outbound.srs_secret",
            "'change-me' is a sample value: anyone who guesses it can relay through us",
        )

    def test_short_srs_secret_is_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  srs_secret: '12345'\n",
            8,
            "outbound.srs_secret",
            "too short (5 characters, at least 32)",
        )

    def test_repeated_srs_secret_is_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  srs_secret: " + "change-me" * 4 + "\n",
            8,
            "outbound.srs_secret",
            "'change-me' repeated is not random",
        )

    def test_low_variety_srs_secret_is_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  srs_secret: " + "ab" * 10 + "ba" * 10 + "\n",
            8,
            "outbound.srs_secret",
            "too repetitive to be random",
        )

    def test_weak_old_srs_secret_is_refused_too(self) -> None:
        # An old secret verifies: a guessable one mints addresses as well as the first.
        self.assertProblem(
            MINIMAL + f"outbound:\n  srs_secret: [{SRS_SECRET}, secret]\n",
            8,
            "outbound.srs_secret[1]",
            "'secret' is a sample value",
        )

    def test_weak_srs_secret_message_offers_a_fresh_one(self) -> None:
        def offered() -> str:
            (problem,) = self.problems(MINIMAL + "outbound:\n  srs_secret: changeme\n")
            return problem.message.rsplit("e.g. ", 1)[1]

        first = offered()
        self.assertIsNone(config_module.secret_weakness(first))
        self.assertNotEqual(first, offered())

    def test_smarthost(self) -> None:
        config = self.load(MINIMAL + "outbound:\n  smarthost: 'tcp:relay.example.net:587'\n")
        self.assertEqual(config.outbound.smarthost, "tcp:relay.example.net:587")

    def test_bad_smarthost(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  smarthost: relay.example.net\n",
            8,
            "outbound.smarthost",
            "is not a Twisted client endpoint",
        )

    def test_smarthost_auth(self) -> None:
        config = self.load(
            MINIMAL
            + "outbound:\n  smarthost: 'tcp:relay.example.net:587'\n"
            + "  smarthost_auth: {username: u, password: p}\n"
        )
        self.assertEqual(
            (config.outbound.smarthost_auth.username, config.outbound.smarthost_auth.password),
            ("u", "p"),
        )
        self.assertNotIn("'p'", repr(config.outbound.smarthost_auth))

    def test_smarthost_auth_needs_a_smarthost(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  smarthost_auth: {username: u, password: p}\n",
            8,
            "outbound.smarthost_auth",
            "only used with outbound.smarthost",
        )

    def test_smarthost_auth_needs_a_password(self) -> None:
        self.assertProblem(
            MINIMAL
            + "outbound:\n  smarthost: 'tcp:r.example.net:587'\n  smarthost_auth: {username: u}\n",
            9,
            "outbound.smarthost_auth.password",
            "required",
        )

    def test_allowed_networks(self) -> None:
        config = self.load(MINIMAL + "outbound:\n  allowed_networks: [10.0.0.0/8, 'fd00::/8', 192.168.1.5]\n")
        self.assertEqual(
            [str(n) for n in config.outbound.allowed_networks],
            ["10.0.0.0/8", "fd00::/8", "192.168.1.5/32"],
        )

    def test_allowed_network_with_host_bits_is_a_problem(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  allowed_networks: [10.0.0.1/8]\n",
            8,
            "outbound.allowed_networks[0]",
            "host bits set",
        )

    def test_delay_warning_off(self) -> None:
        config = self.load(MINIMAL + "outbound:\n  delay_warning: null\n")
        self.assertIsNone(config.outbound.delay_warning)

    def test_port_range(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  port: 70000\n", 8, "outbound.port", "at most 65535"
        )

    def test_retry_needs_an_interval(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  retry: []\n", 8, "outbound.retry", "at least one"
        )

    def test_bad_retry_interval(self) -> None:
        self.assertProblem(
            MINIMAL + "outbound:\n  retry: [5m, soon]\n",
            8,
            "outbound.retry[1]",
            "'soon' is not a duration",
        )


class UnknownKeyTests(ConfigTestCase):
    def test_top_level(self) -> None:
        self.assertProblem(
            MINIMAL + "hostnme: x\n", 7, "hostnme", "unknown key (did you mean 'hostname'?)"
        )

    def test_in_section(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  mesage_size: 3\n",
            8,
            "limits.mesage_size",
            "unknown key (did you mean 'message_size'?)",
        )

    def test_in_domain(self) -> None:
        self.assertProblem(
            MINIMAL + "    mailbox: [carol]\n",
            7,
            "domains.example.test.mailbox",
            "unknown key (did you mean 'mailboxes'?)",
        )

    def test_in_dkim(self) -> None:
        self.assertProblem(
            MINIMAL + "    dkim: {selector: mx1, key: k.pem, algo: rsa}\n",
            7,
            "domains.example.test.dkim.algo",
            "unknown key",
        )

    def test_in_tls(self) -> None:
        (self.directory / "c.pem").write_text("x")
        self.assertProblem(
            MINIMAL + "tls:\n  certificate: c.pem\n  key: c.pem\n  chain: c.pem\n",
            10,
            "tls.chain",
            "unknown key",
        )

    def test_in_dnsbl_entry(self) -> None:
        self.assertProblem(
            MINIMAL + "checks:\n  dnsbl:\n    - zone: zen.spamhaus.org\n      acton: junk\n",
            10,
            "checks.dnsbl[0].acton",
            "unknown key (did you mean 'action'?)",
        )

    def test_without_suggestion(self) -> None:
        problems = self.problems(MINIMAL + "zzz: 1\n")
        self.assertEqual(problems[0].message, "unknown key")


# Real mistakes in the shipped mailx.yaml: (what, the line as it was, the
# line as the user wrote it, line blamed relative to the edited one, message).
# PyYAML's own line is given where it differs, to show what is fixed.
YAML_MISTAKES = [
    (
        "tab",
        "  message_size: 25MiB",
        "\tmessage_size: 25MiB",
        0,
        "a tab in the indentation: YAML needs spaces",
    ),
    (
        "unquoted catch-all",
        '      # "*": alice',
        "      *: alice",
        0,
        "'*' starts a YAML alias; to mean a literal *, quote it: \"*\": alice",
    ),
    (
        "key indented one too many (PyYAML: 4 lines below)",
        "    mailboxes: [alice, bob]",
        "     mailboxes: [alice, bob]",
        0,
        "wrong indentation (5 spaces; the line above has 2, the line below 4): the keys of"
        " one block start in the same column, a block nested under a key further right",
    ),
    (
        "key indented one too few",
        "  recipients: 100",
        " recipients: 100",
        0,
        "wrong indentation (1 space; the line above has 2, the line below 2): the keys of"
        " one block start in the same column, a block nested under a key further right",
    ),
    (
        "first entry of a block not nested (PyYAML: the line below)",
        "      postmaster: alice",
        "    postmaster: alice",
        0,
        "wrong indentation (4 spaces; the line above has 4, the line below 6): the keys of"
        " one block start in the same column, a block nested under a key further right",
    ),
    (
        "unclosed quote (PyYAML: 16 lines below)",
        '    subaddress_delimiter: "+"',
        '    subaddress_delimiter: "+',
        0,
        'the quote " opened on this line is not closed',
    ),
    (
        "unclosed bracket (PyYAML: 4 lines below)",
        '  smtp: ["tcp:2525:interface=127.0.0.1"]',
        '  smtp: ["tcp:2525:interface=127.0.0.1"',
        0,
        "the [ opened on this line is not closed with ]",
    ),
    (
        "missing colon (PyYAML: the line below)",
        "  message_size: 25MiB         # advertised as SIZE and enforced.  Default: 25MiB",
        "  message_size 25MiB",
        0,
        "'message_size 25MiB' has no ':' after its key (write key: value)",
    ),
    (
        "colon in a plain value",
        "hostname: mx.example.test",
        "hostname: mx.example.test: 25",
        0,
        'a value containing \': \' must be quoted, e.g. key: "a: b"',
    ),
    (
        "value starting with @",
        "      team: [alice, bob]        # several targets; each mailbox gets one copy",
        "      team: @alice",
        0,
        "a value cannot start with @ in YAML: quote it",
    ),
    (
        "list item among keys",
        "      team: [alice, bob]        # several targets; each mailbox gets one copy",
        "      - alice",
        0,
        "a list item ('- ') where a key was expected: write key: [a, b], or put the items"
        " under a key of their own",
    ),
    (
        "block key without its colon (PyYAML: the line below)",
        "    aliases:",
        "    aliases",
        0,
        "'aliases' has no ':' after its key (write key: value)",
    ),
    (
        "domain without its colon (PyYAML: 2 lines below)",
        "  example.test:",
        "  example.test",
        0,
        "'example.test' has no ':' after its key (write key: value)",
    ),
    (
        "one ] too many",
        "      team: [alice, bob]        # several targets; each mailbox gets one copy",
        "      team: [alice, bob]]",
        0,
        "a ] on this line closes no [",
    ),
    (
        "top-level key indented",
        "hostname: mx.example.test",
        " hostname: mx.example.test",
        0,
        "wrong indentation (1 space; the line below has 0): the keys of one block start in the"
        " same column, a block nested under a key further right",
    ),
    (
        "unclosed single quote",
        '  smtp: ["tcp:2525:interface=127.0.0.1"]',
        "  smtp: 'tcp:2525",
        0,
        "the quote ' opened on this line is not closed",
    ),
    (
        "duplicate key: PyYAML would keep the last silently",
        "  recipients: 100             # per message (RFC 5321 minimum).  Default: 100",
        "  recipients: 100\n  recipients: 5",
        1,
        "limits.recipients: duplicate key (first on line {line})",
    ),
]


class YAMLSyntaxTests(unittest.TestCase):
    """Each broken file gives exactly one line, naming the line the user got wrong."""

    def test_mistakes(self) -> None:
        lines = (REPOSITORY / "mailx.yaml").read_text().split("\n")
        for what, was, wrote, offset, message in YAML_MISTAKES:
            matches = [i for i, line in enumerate(lines) if line.startswith(was)]
            self.assertEqual(len(matches), 1, f"{what}: {was!r} not found once in mailx.yaml")
            index = matches[0]
            broken = lines[:index] + wrote.split("\n") + lines[index + 1 :]
            error = self.assertRaises(
                ConfigError, load_config_text, "\n".join(broken), "mailx.yaml"
            )
            line = index + 1 + offset
            self.assertEqual(
                str(error), f"mailx.yaml:{line}: {message.format(line=index + 1)}", what
            )

    def test_a_large_broken_file_is_explained_promptly(self) -> None:
        """The indentation search is bounded (mailx.yamlerrors._SEARCH_SECONDS)."""
        import time

        lines = ["hostname: mx.example.test", "domains:", "  example.test:",
                 "    mailboxes: [alice]", "    aliases:"]
        lines += [f"      a{i}: alice" for i in range(3400)]
        lines.append("     b: alice")
        started = time.monotonic()
        error = self.assertRaises(ConfigError, load_config_text, "\n".join(lines), "m.yaml")
        self.assertLess(time.monotonic() - started, 15)  # unbounded, it took 40 s
        self.assertEqual(error.problems[0].line, len(lines))

    def test_error_without_a_better_explanation_keeps_pyyaml_words_and_line(self) -> None:
        error = self.assertRaises(
            ConfigError, load_config_text, "hostname: mx.example.test\n--- x\n: y\n", "m.yaml"
        )
        self.assertEqual(len(error.problems), 1)
        self.assertTrue(error.problems[0].message, error.problems[0])


class FileTests(ConfigTestCase):
    def test_problem_format(self) -> None:
        problem = Problem(
            "mailx.yaml", 14, "domains.example.test.aliases.sales", "unknown mailbox 'bobb'"
        )
        self.assertEqual(
            str(problem),
            "mailx.yaml:14: domains.example.test.aliases.sales: unknown mailbox 'bobb'",
        )

    def test_problem_as_spec_shows_it(self) -> None:
        text = (
            "# comment\n" * 7
            + MINIMAL.replace("[alice, bob]", "[alice, carol]")
            + "      sales: bobb\n"
        )
        error = self.assertRaises(ConfigError, load_config_text, text, "mailx.yaml")
        self.assertEqual(
            str(error), "mailx.yaml:14: domains.example.test.aliases.sales: unknown mailbox 'bobb'"
        )

    def test_yaml_syntax_error_has_its_line(self) -> None:
        """The line of the unclosed [, not the end of the file where PyYAML noticed."""
        problems = self.problems(MINIMAL + "limits:\n  recipients: [1, 2\n")
        self.assertEqual(len(problems), 1)
        self.assertEqual(problems[0].line, 8)
        self.assertEqual(problems[0].message, "the [ opened on this line is not closed with ]")

    def test_duplicate_yaml_key(self) -> None:
        self.assertProblem(
            MINIMAL + "hostname: other.example.test\n",
            7,
            "hostname",
            "duplicate key (first on line 1)",
        )

    def test_missing_file(self) -> None:
        error = self.assertRaises(ConfigError, load_config, self.directory / "nope.yaml")
        self.assertEqual(
            str(error),
            f"{self.directory / 'nope.yaml'}: cannot read configuration: No such file or directory",
        )

    def test_not_utf8(self) -> None:
        self.file.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
        error = self.assertRaises(ConfigError, load_config, self.file)
        self.assertEqual(
            (error.problems[0].line, error.problems[0].message), (7, "not valid UTF-8")
        )

    def test_load_config_reads_the_file(self) -> None:
        self.file.write_text(MINIMAL)
        self.assertEqual(load_config(self.file).hostname, "mx.example.test")

    def test_relative_paths_follow_the_file_not_the_cwd(self) -> None:
        self.file.write_text(MINIMAL + "paths:\n  mail: maildirs\n  spool: /var/spool/mailx\n")
        config = load_config(os.path.relpath(self.file))
        self.assertEqual(config.paths.mail, self.directory / "maildirs")
        self.assertEqual(config.paths.spool, Path("/var/spool/mailx"))

    def test_empty_file(self) -> None:
        self.assertProblem("", 1, "domains", "no domains configured")

    def test_no_domains_key(self) -> None:
        self.assertProblem("hostname: mx.example.test\n", 1, "domains", "no domains configured")

    def test_empty_domains(self) -> None:
        self.assertProblem(
            "hostname: mx.example.test\ndomains: {}\n", 2, "domains", "no domains configured"
        )

    def test_document_is_not_a_mapping(self) -> None:
        self.assertProblem("- a\n- b\n", 1, "", "expected a mapping, got a list")

    def test_several_problems_at_once(self) -> None:
        problems = self.problems(
            MINIMAL.replace("postmaster: alice", "postmaster: alise")
            + "limits:\n  recipients: none\n  idle_timeout: 5x\nauthentication:\n  dmarc: strict\n"
        )
        self.assertEqual(
            [(p.line, p.key) for p in problems],
            [
                (6, "domains.example.test.aliases.postmaster"),
                (8, "limits.recipients"),
                (9, "limits.idle_timeout"),
                (11, "authentication.dmarc"),
            ],
        )

    def test_config_error_lists_every_problem_on_its_own_line(self) -> None:
        error = self.assertRaises(
            ConfigError, self.load, MINIMAL + "limits:\n  recipients: x\n  connections: y\n"
        )
        self.assertEqual(str(error).splitlines(), [str(p) for p in error.problems])
        self.assertEqual(len(error.problems), 2)


class DomainTests(ConfigTestCase):
    def test_unicode_domain_becomes_a_label(self) -> None:
        config = self.load(MINIMAL.replace("example.test", "Bücher.Example"))
        self.assertEqual(list(config.domains), ["xn--bcher-kva.example"])

    def test_punycode_domain_is_lower_cased(self) -> None:
        config = self.load(MINIMAL.replace("example.test", "XN--BCHER-KVA.example"))
        self.assertEqual(list(config.domains), ["xn--bcher-kva.example"])

    def test_same_domain_twice_after_idna(self) -> None:
        self.assertProblem(
            MINIMAL + "  xn--bcher-kva.example: {alias_of: example.test}\n"
            "  Bücher.example: {alias_of: example.test}\n",
            8,
            "domains.Bücher.example",
            "same domain as 'xn--bcher-kva.example' on line 7",
        )

    def test_same_domain_twice_after_case_folding(self) -> None:
        self.assertProblem(
            MINIMAL + "  EXAMPLE.test: {}\n",
            7,
            "domains.EXAMPLE.test",
            "same domain as 'example.test' on line 3",
        )

    def test_bad_domain_name(self) -> None:
        self.assertProblem(
            MINIMAL + "  -bad.test: {}\n", 7, "domains.-bad.test", "not a valid domain name"
        )

    def test_bad_punycode(self) -> None:
        self.assertProblem(MINIMAL + "  xn--zz.test: {}\n", 7, "domains.xn--zz.test", "bad A-label")

    def test_domain_of_wrong_type(self) -> None:
        self.assertProblem(
            MINIMAL + "  example.net: [alice]\n",
            7,
            "domains.example.net",
            "expected a mapping, got a list",
        )

    def test_domains_of_wrong_type(self) -> None:
        self.assertProblem(
            "hostname: mx.example.test\ndomains: [example.test]\n",
            2,
            "domains",
            "expected a mapping of domain names, got a list",
        )

    def test_mailbox_names_are_folded(self) -> None:
        config = self.load(MINIMAL.replace("[alice, bob]", "[Alice, BOB]"))
        self.assertEqual(config.domains["example.test"].mailboxes, frozenset({"alice", "bob"}))

    def test_duplicate_mailbox_after_folding(self) -> None:
        self.assertProblem(
            MINIMAL.replace("[alice, bob]", "[alice, bob, Alice]"),
            4,
            "domains.example.test.mailboxes[2]",
            "duplicate mailbox 'alice'",
        )

    def test_bad_mailbox_names(self) -> None:
        for name in ["al ice", "a..b", ".alice", "ålice", "a/b", "'*'", "a" * 65]:
            with self.subTest(name=name):
                problems = self.problems(MINIMAL.replace("[alice, bob]", f"[alice, bob, {name}]"))
                self.assertEqual(
                    [(p.line, p.key) for p in problems], [(4, "domains.example.test.mailboxes[2]")]
                )

    def test_mailbox_name_that_yaml_reads_as_a_boolean(self) -> None:
        config = self.load(MINIMAL.replace("[alice, bob]", "[alice, bob, no, 123]"))
        self.assertEqual(
            config.domains["example.test"].mailboxes, frozenset({"alice", "bob", "no", "123"})
        )

    def test_subaddress_delimiter_disabled(self) -> None:
        for value in ["null", "''"]:
            with self.subTest(value=value):
                config = self.load(MINIMAL + f"    subaddress_delimiter: {value}\n")
                self.assertIsNone(config.domains["example.test"].subaddress_delimiter)

    def test_several_delimiters(self) -> None:
        config = self.load(MINIMAL + "    subaddress_delimiter: '+-'\n")
        self.assertEqual(config.domains["example.test"].subaddress_delimiter, "+-")

    def test_letter_is_not_a_delimiter(self) -> None:
        self.assertProblem(
            MINIMAL + "    subaddress_delimiter: x\n",
            7,
            "domains.example.test.subaddress_delimiter",
            "delimiters must be punctuation",
        )

    def test_dkim(self) -> None:
        config = self.load(MINIMAL + "    dkim: {selector: MX1, key: dkim/example.test.key}\n")
        dkim = config.domains["example.test"].dkim
        self.assertEqual(
            (dkim.selector, dkim.key), ("mx1", self.directory / "dkim" / "example.test.key")
        )

    def test_dkim_key_open_to_other_users_is_refused(self) -> None:
        # Whoever reads the key signs as the domain; keygen writes it 0600.
        key = self.directory / "k.pem"
        key.write_text("key")
        for mode in (0o644, 0o604, 0o602, 0o601):
            with self.subTest(mode=oct(mode)):
                key.chmod(mode)
                self.assertProblem(
                    MINIMAL + "    dkim: {selector: mx1, key: k.pem}\n",
                    7,
                    "domains.example.test.dkim.key",
                    f"every user of this machine can use {key} (mode {mode:04o}): chmod 600 {key}",
                )

    def test_private_or_group_dkim_key_is_accepted(self) -> None:
        key = self.directory / "k.pem"
        key.write_text("key")
        for mode in (0o600, 0o400, 0o640, 0o660):
            with self.subTest(mode=oct(mode)):
                key.chmod(mode)
                config = self.load(MINIMAL + "    dkim: {selector: mx1, key: k.pem}\n")
                self.assertEqual(config.domains["example.test"].dkim.key, key)

    def test_dkim_selector_is_required(self) -> None:
        self.assertProblem(
            MINIMAL + "    dkim: {key: k.pem}\n",
            7,
            "domains.example.test.dkim.selector",
            "required",
        )

    def test_bad_dkim_selector(self) -> None:
        self.assertProblem(
            MINIMAL + "    dkim: {selector: 'mx 1', key: k.pem}\n",
            7,
            "domains.example.test.dkim.selector",
            "invalid domain",
        )


class AliasTests(ConfigTestCase):
    def aliases(self, *lines: str) -> str:
        """MINIMAL with alias lines added; the first added line is line 7."""
        return MINIMAL + "".join(f"      {line}\n" for line in lines)

    def test_list_of_targets(self) -> None:
        config = self.load(self.aliases("team: [alice, Bob]"))
        self.assertEqual(config.domains["example.test"].aliases["team"], ("alice", "bob"))

    def test_cross_domain_target_is_normalized(self) -> None:
        config = self.load(
            self.aliases("sales: Dave@Example.NET")
            + "  example.net:\n    mailboxes: [dave]\n    aliases: {postmaster: dave}\n"
        )
        self.assertEqual(config.domains["example.test"].aliases["sales"], ("dave@example.net",))

    def test_alias_keys_are_folded(self) -> None:
        config = self.load(self.aliases("Team: alice"))
        self.assertIn("team", config.domains["example.test"].aliases)

    def test_duplicate_alias_after_folding(self) -> None:
        self.assertProblem(
            self.aliases("team: alice", "TEAM: bob"),
            8,
            "domains.example.test.aliases.TEAM",
            "duplicate alias 'team' (also on line 7)",
        )

    def test_alias_colliding_with_mailbox(self) -> None:
        self.assertProblem(
            self.aliases("Bob: alice"),
            7,
            "domains.example.test.aliases.Bob",
            "'bob' is both a mailbox and an alias",
        )

    def test_dangling_target(self) -> None:
        self.assertProblem(
            self.aliases("sales: bobb"),
            7,
            "domains.example.test.aliases.sales",
            "unknown mailbox 'bobb' (did you mean 'bob'?)",
        )

    def test_dangling_target_in_list_is_located(self) -> None:
        self.assertProblem(
            self.aliases("team:", "  - alice", "  - carol"),
            9,
            "domains.example.test.aliases.team[1]",
            "unknown mailbox 'carol'",
        )

    def test_dangling_cross_domain_target(self) -> None:
        self.assertProblem(
            self.aliases("sales: carol@example.org") + "  example.org: {alias_of: example.test}\n",
            7,
            "domains.example.test.aliases.sales",
            "unknown mailbox 'carol@example.org'",
        )

    def test_catch_all_does_not_rescue_a_dangling_target(self) -> None:
        self.assertProblem(
            self.aliases("'*': alice", "sales: bobb"),
            8,
            "domains.example.test.aliases.sales",
            "unknown mailbox 'bobb'",
        )

    def test_loop(self) -> None:
        self.assertProblem(
            self.aliases("a: b", "b: a"),
            8,
            "domains.example.test.aliases.b",
            "alias loop: a → b → a",
        )

    def test_loop_to_itself(self) -> None:
        self.assertProblem(
            self.aliases("a: [alice, a]"),
            7,
            "domains.example.test.aliases.a[1]",
            "alias loop: a → a",
        )

    def test_loop_across_domains_is_reported_once(self) -> None:
        self.assertProblem(
            self.aliases("a: b@example.net")
            + "  example.net:\n    mailboxes: [dave]\n    aliases: {postmaster: dave, b: a@example.test}\n",
            10,
            "domains.example.net.aliases.b",
            "alias loop: a@example.test → b → a@example.test",
        )

    def test_loop_through_subaddress_target(self) -> None:
        self.assertProblem(
            self.aliases("a: b+x", "b: a"), 8, "domains.example.test.aliases.b", "alias loop"
        )

    def test_target_with_subaddress_is_accepted(self) -> None:
        config = self.load(self.aliases("news: alice+news"))
        self.assertEqual(config.domains["example.test"].aliases["news"], ("alice+news",))

    def test_alias_without_targets(self) -> None:
        for value in ["[]", "null", "{a: b}"]:
            with self.subTest(value=value):
                problems = self.problems(self.aliases(f"team: {value}"))
                self.assertEqual(
                    [(p.line, p.key) for p in problems], [(7, "domains.example.test.aliases.team")]
                )

    def test_bad_target_address(self) -> None:
        self.assertProblem(
            self.aliases("sales: 'bob@'"),
            7,
            "domains.example.test.aliases.sales",
            "bad address 'bob@'",
        )

    def test_catch_all_is_not_a_target(self) -> None:
        self.assertProblem(
            self.aliases("sales: '*'"),
            7,
            "domains.example.test.aliases.sales",
            "'*' is the catch-all key",
        )

    def test_catch_all(self) -> None:
        config = self.load(self.aliases("'*': [alice, bob]"))
        self.assertEqual(config.domains["example.test"].aliases["*"], ("alice", "bob"))

    def test_outside_target_needs_srs_secret(self) -> None:
        self.assertProblem(
            self.aliases("boss: someone@elsewhere.test"),
            7,
            "outbound.srs_secret",
            "required: domains.example.test.aliases.boss forwards to an outside address",
        )

    def test_outside_target_with_srs_secret(self) -> None:
        config = self.load(
            self.aliases("boss: someone@elsewhere.test")
            + f"outbound: {{srs_secret: {SRS_SECRET}}}\n"
        )
        self.assertEqual(
            config.domains["example.test"].aliases["boss"], ("someone@elsewhere.test",)
        )


class AliasOfTests(ConfigTestCase):
    def test_alias_of(self) -> None:
        config = self.load(MINIMAL + "  example.org:\n    alias_of: Example.Test\n")
        domain = config.domains["example.org"]
        self.assertEqual(
            (domain.alias_of, domain.mailboxes, dict(domain.aliases)),
            ("example.test", frozenset(), {}),
        )

    def test_alias_of_shares_the_target_delimiter(self) -> None:
        config = self.load(
            MINIMAL + "    subaddress_delimiter: '-'\n  example.org:\n    alias_of: example.test\n"
        )
        self.assertEqual(config.domains["example.org"].subaddress_delimiter, "-")

    def test_alias_of_with_mailboxes(self) -> None:
        self.assertProblem(
            MINIMAL + "  example.org:\n    alias_of: example.test\n    mailboxes: [carol]\n",
            9,
            "domains.example.org.mailboxes",
            "example.org is an alias of another domain (alias_of) and has no mailboxes of its own",
        )

    def test_alias_of_with_aliases(self) -> None:
        self.assertProblem(
            MINIMAL + "  example.org:\n    alias_of: example.test\n    aliases: {x: alice}\n",
            9,
            "domains.example.org.aliases",
            "has no aliases of its own",
        )

    def test_alias_of_unknown_domain(self) -> None:
        self.assertProblem(
            MINIMAL + "  example.org:\n    alias_of: example.tset\n",
            8,
            "domains.example.org.alias_of",
            "'example.tset' is not a configured domain (did you mean 'example.test'?)",
        )

    def test_alias_of_an_alias_domain(self) -> None:
        self.assertProblem(
            MINIMAL
            + "  example.org: {alias_of: example.test}\n  example.net: {alias_of: example.org}\n",
            8,
            "domains.example.net.alias_of",
            "example.org is itself an alias of example.test: use alias_of: example.test",
        )

    def test_alias_of_itself(self) -> None:
        self.assertProblem(
            MINIMAL + "  example.org: {alias_of: example.org}\n",
            7,
            "domains.example.org.alias_of",
            "a domain cannot be an alias of itself",
        )


class PostmasterTests(ConfigTestCase):
    def test_first_domain_needs_a_postmaster(self) -> None:
        self.assertProblem(
            MINIMAL.replace("postmaster: alice", "team: alice"),
            3,
            "domains.example.test",
            "postmaster@example.test goes nowhere",
        )

    def test_first_domain_postmaster_problem_says_why(self) -> None:
        self.assertProblem(
            MINIMAL.replace("postmaster: alice", "team: alice"),
            3,
            "domains.example.test",
            "RFC 5321 section 4.5.1; the first domain's postmaster also receives bare"
            " <postmaster> and that of domains without their own",
        )

    def test_another_domain_without_postmaster_is_not_a_problem(self) -> None:
        """SPEC 4: it falls back to the first domain's postmaster."""
        config = self.load(MINIMAL + "  example.net:\n    mailboxes: [dave]\n")
        self.assertEqual(
            [d.address for d in route(config, "postmaster@example.net").destinations],
            ["alice@example.test"],
        )

    def test_alias_to_a_fallback_postmaster(self) -> None:
        config = self.load(
            MINIMAL + "  example.net:\n    mailboxes: [dave]\n    aliases: {abuse: postmaster}\n"
        )
        self.assertEqual(
            [d.address for d in route(config, "abuse@example.net").destinations],
            ["alice@example.test"],
        )

    def test_fallback_that_comes_back_is_a_loop(self) -> None:
        problems = self.problems(
            MINIMAL.replace("postmaster: alice", "postmaster: postmaster@example.net")
            + "  example.net:\n    mailboxes: [dave]\n"
        )
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("alias loop", problems[0].message)

    def test_postmaster_mailbox(self) -> None:
        self.load(MINIMAL + "  example.net:\n    mailboxes: [postmaster]\n")

    def test_postmaster_through_catch_all(self) -> None:
        self.load(MINIMAL + "  example.net:\n    mailboxes: [dave]\n    aliases: {'*': dave}\n")

    def test_postmaster_of_alias_of_domain_is_the_target_domain(self) -> None:
        self.load(MINIMAL + "  example.org: {alias_of: example.test}\n")

    def test_postmaster_in_another_domain(self) -> None:
        self.load(MINIMAL + "  example.net:\n    aliases: {postmaster: postmaster@example.test}\n")


def _vocabulary() -> list[str]:
    keys = set(DEFAULTS)
    for section in DEFAULTS.values():
        if hasattr(section, "keys"):
            keys |= set(section)
    for block in BLOCK_DEFAULTS.values():
        keys |= set(block)
    return sorted(
        keys | {"example.test", "example.org", "alice", "team", "*", "postmaster", "bogus"}
    )


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(
        [
            "5m",
            "25MiB",
            "alice",
            "team",
            "bob@example.test",
            "tcp:25",
            "off",
            "x@elsewhere.test",
            "*",
        ]
    ),
)
_NAMES = st.sampled_from(
    [
        "alice",
        "Alice",
        "bob",
        "team",
        "postmaster",
        "*",
        "alice+x",
        "bob@example.org",
        "x@elsewhere.test",
    ]
)
_DOCUMENTS = st.dictionaries(
    st.sampled_from(_vocabulary()),
    st.recursive(
        _SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.sampled_from(_vocabulary()), children, max_size=4),
        ),
        max_leaves=20,
    ),
)


class LoaderProperties(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(_DOCUMENTS)
    def test_any_document_loads_or_raises_config_error(self, document: dict) -> None:
        try:
            load_config_text(yaml.safe_dump(document), "/nonexistent/mailx.yaml")
        except ConfigError as e:
            self.assertTrue(e.problems)
            for problem in e.problems:
                self.assertEqual(problem.file, "/nonexistent/mailx.yaml")
                self.assertTrue(problem.line is None or problem.line >= 1)

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def test_any_text_loads_or_raises_config_error(self, text: str) -> None:
        try:
            load_config_text(text, "/nonexistent/mailx.yaml")
        except ConfigError as e:
            self.assertTrue(e.problems)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(
                ["example.test", "Example.TEST", "bücher.example", "b@d", "example.org"]
            ),
            st.fixed_dictionaries(
                {},
                optional={
                    "mailboxes": st.lists(st.one_of(_NAMES, _SCALARS), max_size=4),
                    "aliases": st.dictionaries(
                        st.one_of(_NAMES, st.text(max_size=4)),
                        st.one_of(
                            _NAMES, _SCALARS, st.lists(st.one_of(_NAMES, _SCALARS), max_size=3)
                        ),
                        max_size=5,
                    ),
                    "alias_of": st.one_of(
                        st.sampled_from(["example.test", "example.org"]), _SCALARS
                    ),
                    "subaddress_delimiter": _SCALARS,
                    "dkim": st.one_of(
                        _SCALARS, st.dictionaries(st.sampled_from(["selector", "key"]), _SCALARS)
                    ),
                },
            ),
        )
    )
    def test_any_domains_load_or_raise_config_error(self, domains: dict) -> None:
        try:
            config = load_config_text(
                yaml.safe_dump({"domains": domains}), "/nonexistent/mailx.yaml"
            )
        except ConfigError as e:
            self.assertTrue(e.problems)
            return
        for name in config.domains:
            route(config, f"postmaster@{name}")


# A "billion laughs": 9 levels of 9 aliases, 9^9 values once expanded.
BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
)


class BoundsTests(ConfigTestCase):
    """A hostile or runaway file is one clear problem, quickly (SPEC section 2: never a traceback)."""

    def test_alias_bomb_is_refused_quickly(self) -> None:
        start = time.monotonic()
        (problem,) = self.problems(BOMB + MINIMAL)
        self.assertLess(time.monotonic() - start, 5)  # generous: 41 s and 1.4 GB before
        self.assertEqual((problem.file, problem.line, problem.key), (str(self.file), None, None))
        self.assertIn("expands to more than 200000 values", problem.message)

    def test_merge_key_bomb_is_refused_quickly(self) -> None:
        levels = ["a: &a {x: 1, y: 2}\n"]
        for prev, name in zip(
            "abcdefghijklmnopqrstuvwxy", "bcdefghijklmnopqrstuvwxyz", strict=True
        ):
            levels.append(
                f"{name}: &{name} {{<<: [*{prev}], {name}1: *{prev}, {name}2: *{prev}}}\n"
            )
        start = time.monotonic()
        (problem,) = self.problems("".join(levels) + MINIMAL)
        self.assertLess(time.monotonic() - start, 5)
        self.assertIn("expands to more than", problem.message)

    def test_modest_aliases_still_work(self) -> None:
        config = self.load(
            "hostname: mx.example.test\n"
            "domains:\n"
            "  example.test:\n"
            "    mailboxes: &people [alice, bob]\n"
            "    aliases: {postmaster: alice, team: *people}\n"
        )
        self.assertEqual(config.domains["example.test"].aliases["team"], ("alice", "bob"))

    def test_deep_nesting_is_refused(self) -> None:
        for depth in (60, 100_000):
            with self.subTest(depth=depth):
                (problem,) = self.problems("a: " + "[" * depth + "]" * depth + "\n" + MINIMAL)
                self.assertIn("nested more than 50 levels deep", problem.message)

    def test_file_over_one_mebibyte_is_refused_unread(self) -> None:
        self.file.write_bytes(MINIMAL.encode() + b"#" * (1024 * 1024))
        error = self.assertRaises(ConfigError, load_config, self.file)
        self.assertEqual(len(error.problems), 1)
        self.assertIn("larger than 1024 KiB", error.problems[0].message)

    def test_huge_numbers_are_problems_not_overflow(self) -> None:
        digits = "9" * 400
        cases = {
            "message_size": "a size is at most 1TiB",
            "idle_timeout": "a duration is at most 10 years",
            "recipients": "must be at most 2147483647",
        }
        for key, message in cases.items():
            for value in (digits, f"{digits}m" if key == "idle_timeout" else digits + "MiB"):
                if key == "recipients" and not value.isdigit():
                    continue
                with self.subTest(key=key, value=value[-4:]):
                    self.assertProblem(
                        MINIMAL + f"limits:\n  {key}: {value}\n", 8, f"limits.{key}", message
                    )

    def test_integer_beyond_pythons_digit_limit_is_a_problem(self) -> None:
        # int() refuses over 4300 digits; the YAML constructor raised ValueError.
        self.assertProblem(
            MINIMAL + "limits:\n  recipients: " + "9" * 5000 + "\n",
            8,
            "limits.recipients",
            "must be at most 2147483647",
        )
        self.assertProblem(
            MINIMAL + "limits:\n  message_size: " + "9" * 5000 + "\n",
            8,
            "limits.message_size",
            "a size is at most 1TiB",
        )

    def test_infinite_and_nan_are_refused(self) -> None:
        self.assertProblem(
            MINIMAL + "limits:\n  idle_timeout: .inf\n", 8, "limits.idle_timeout", "not a duration"
        )
        self.assertProblem(
            MINIMAL + "limits:\n  message_size: .nan\n", 8, "limits.message_size", "not a size"
        )

    def test_bounds_themselves_are_accepted(self) -> None:
        config = self.load(MINIMAL + "limits:\n  message_size: 1024GiB\n  idle_timeout: 3650d\n")
        self.assertEqual(config.limits.message_size, 1024**4)
        self.assertEqual(config.limits.idle_timeout, 3650 * 86400.0)
