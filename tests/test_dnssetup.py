# -*- test-case-name: tests.test_dnssetup -*-
"""``mailxctl dns`` (SPEC section 9): the records to publish, and ``--check``.

The check tests publish, in the loopback DNS server, exactly what
``mailxctl dns --json`` says to publish, and expect every record ok; then
they break one record at a time, the way records break in real life, and
expect exit status 1 and a message naming the record and the fix.

``mailxctl`` blocks on DNS while the reactor thread serves it, so each
command runs in a thread (`run_cli`).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.reversename
import dns.zone
from defusedxml import ElementTree
from twisted.internet import defer, threads
from twisted.trial import unittest

from mailx.admin import cli, dnssetup
from mailx.config import ConfigError, load_config, load_config_text
from mailx.outbound import dkimkeys
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.tls import make_certificate

REPOSITORY = Path(__file__).resolve().parent.parent

HOST = "mx.example.test"
IPV4 = "192.0.2.25"
IPV6 = "2001:db8::25"


def write_config(
    directory: Path,
    nameservers: Any = (),
    *,
    addresses: tuple[str, ...] = (IPV4, IPV6),
    dkim: bool = True,
    extra: str = "",
) -> Path:
    """A configuration for example.test in ``directory``, with a DKIM key made for it."""
    directory.mkdir(parents=True, exist_ok=True)
    servers = ", ".join(f'"{h}:{p}"' for h, p in nameservers)
    text = f"""\
hostname: {HOST}
public_addresses: [{", ".join(addresses)}]
reports: dmarc@example.test
dns:
  nameservers: [{servers}]
  timeout: 2s
domains:
  example.test:
    mailboxes: [alice]
    aliases:
      postmaster: alice
      dmarc: alice
"""
    if dkim:
        key = directory / "dkim" / "example.test.key"
        if not key.exists():
            dkimkeys.write_key(dkimkeys.generate_key("rsa"), key)
        text += "    dkim: {selector: mx1, key: dkim/example.test.key}\n"
    path = directory / "mailx.yaml"
    path.write_text(text + extra)
    return path


def client_extra(directory: Path, submission: str = "tcp:587", submissions: str = "tcp:465") -> str:
    """mailx.yaml lines for submission listeners (with the tls: and accounts: they need) and imap:."""
    cert, key = make_certificate(directory / "tls")
    (directory / "passwd").touch()
    return f"""\
imap: imap.example.test
tls: {{certificate: {cert}, key: {key}}}
accounts: {{passwords: passwd}}
listen:
  smtp: ["tcp:2525:interface=127.0.0.1"]
  submission: ["{submission}"]
  submissions: ["{submissions}"]
"""


def zone_from_json(data: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """The loopback server's zone data for the records ``mailxctl dns --json`` prints."""
    zone: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for record in data["records"]:
        if record["value"] is None:
            continue
        if record["type"] == "MX":
            preference, exchange = record["value"].split()
            zone[record["name"]]["MX"].append((int(preference), exchange))
        elif record["type"] == "TXT":
            zone[record["name"]]["TXT"].append(tuple(record["strings"]))
        elif record["type"] == "SRV":
            priority, weight, port, target = record["value"].split()
            zone[record["name"]]["SRV"].append((int(priority), int(weight), int(port), target))
        else:
            zone[record["name"]][record["type"]].append(record["value"])
    return zone


def reverse(address: str) -> str:
    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


class CLITestCase(unittest.TestCase):
    """mailxctl in-process, its output captured, run in a thread."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.patch(
            os, "environ", {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENVIRONMENT}
        )

    @defer.inlineCallbacks
    def run_cli(self, *argv: str) -> Any:
        """(exit status, stdout, stderr) of ``mailxctl argv``."""
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        try:
            status = yield threads.deferToThread(cli.main, list(argv))
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
            self.patch(sys, "stderr", sys.__stderr__)
        return status, stdout.getvalue(), stderr.getvalue()


# ---------------------------------------------------------------------------
# What to publish (no DNS)


class PlanTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.config = load_config(write_config(self.directory))
        self.plan = dnssetup.plan(self.config, "example.test")

    def record(self, kind: str, plan: dnssetup.Plan | None = None) -> dnssetup.Expected:
        return next(r for r in (plan or self.plan).records if r.record == kind)

    def test_mx_points_at_hostname(self) -> None:
        self.assertEqual(self.record("MX").value, f"10 {HOST}")

    def test_addresses_from_public_addresses(self) -> None:
        self.assertEqual(self.record("A").value, IPV4)
        self.assertEqual(self.record("AAAA").value, IPV6)

    def test_ip_options_override_public_addresses(self) -> None:
        plan = dnssetup.plan(self.config, "example.test", ["198.51.100.7"])
        self.assertEqual(
            [(r.type, r.value) for r in plan.records if r.type in ("A", "AAAA")],
            [("A", "198.51.100.7")],
        )

    def test_spf_is_mx_minus_all(self) -> None:
        self.assertEqual(self.record("SPF").value, "v=spf1 mx -all")

    def test_spf_names_the_smarthost(self) -> None:
        config = load_config(
            write_config(
                self.directory, extra="outbound:\n  smarthost: tcp:relay.example.net:587\n"
            )
        )
        plan = dnssetup.plan(config, "example.test")
        self.assertEqual(self.record("SPF", plan).value, "v=spf1 mx a:relay.example.net -all")

    def test_spf_purpose_names_the_term_the_record_uses(self) -> None:
        config = load_config(
            write_config(self.directory, extra="outbound:\n  smarthost: tcp:1.2.3.4:587\n")
        )
        spf = self.record("SPF", dnssetup.plan(config, "example.test"))
        self.assertEqual(spf.value, "v=spf1 mx ip4:1.2.3.4 -all")
        self.assertIn("use it instead of ip4:1.2.3.4.", spf.purpose)
        self.assertNotIn("a:1.2.3.4", spf.purpose)

    def test_loopback_smarthost_stays_out_of_public_spf_with_a_note(self) -> None:
        for relay in ("127.0.0.1", "10.1.2.3", "localhost"):
            config = load_config(
                write_config(self.directory, extra=f"outbound:\n  smarthost: tcp:{relay}:25\n")
            )
            plan = dnssetup.plan(config, "example.test")
            self.assertEqual(self.record("SPF", plan).value, "v=spf1 mx -all", relay)
            self.assertTrue(
                any(f"The smarthost {relay} is a loopback or private address" in n
                    for n in plan.notes),
                plan.notes,
            )

    def test_dmarc_quarantine_with_rua_from_reports(self) -> None:
        self.assertEqual(
            self.record("DMARC").value, "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"
        )
        self.assertIn("p=quarantine to start", self.record("DMARC").purpose)

    def test_dmarc_without_reports_has_no_rua(self) -> None:
        config = load_config(REPOSITORY / "mailx.yaml")
        plan = dnssetup.plan(config, "example.test")
        self.assertEqual(self.record("DMARC", plan).value, "v=DMARC1; p=quarantine")
        self.assertEqual(
            self.record("TLS-RPT", plan).value, "v=TLSRPTv1; rua=mailto:postmaster@example.test"
        )

    def test_report_address_elsewhere_needs_its_authorization(self) -> None:
        config = load_config_text(
            write_config(self.directory)
            .read_text()
            .replace("reports: dmarc@example.test", "reports: reports@elsewhere.test"),
            self.directory / "mailx.yaml",
        )
        plan = dnssetup.plan(config, "example.test")
        authorization = self.record("DMARC-REPORTS", plan)
        self.assertEqual(authorization.name, "example.test._report._dmarc.elsewhere.test")
        self.assertEqual(authorization.value, "v=DMARC1")

    def test_dkim_record_is_our_public_key(self) -> None:
        key = dkimkeys.load_key(self.directory / "dkim" / "example.test.key")
        dkim_record = self.record("DKIM")
        self.assertEqual(dkim_record.name, "mx1._domainkey.example.test")
        self.assertEqual(dkim_record.value, dkimkeys.dns_record(key))
        self.assertTrue(dkim_record.required)

    def test_no_dkim_key_configured_is_a_placeholder_and_a_note(self) -> None:
        plan = dnssetup.plan(load_config(REPOSITORY / "mailx.yaml"), "example.test")
        self.assertTrue(self.record("DKIM", plan).placeholder)
        self.assertTrue(any("mailxctl dkim keygen example.test" in n for n in plan.notes))

    def test_mta_sts_id_follows_the_policy(self) -> None:
        policy = dnssetup.mta_sts_policy(HOST)
        self.assertIn("mode: testing", policy)
        self.assertEqual(self.record("MTA-STS").value, f"v=STSv1; id={dnssetup.mta_sts_id(policy)}")
        self.assertEqual(dnssetup.mta_sts_id(policy), dnssetup.mta_sts_id(policy))
        self.assertNotEqual(
            dnssetup.mta_sts_id(policy), dnssetup.mta_sts_id(dnssetup.mta_sts_policy("mx2.test"))
        )
        self.assertRegex(dnssetup.mta_sts_id(policy), r"\A[A-Za-z0-9]{1,32}\Z")

    def test_ptr_for_each_address(self) -> None:
        ptrs = {r.name: r.value for r in self.plan.records if r.type == "PTR"}
        self.assertEqual(ptrs, {reverse(IPV4): HOST, reverse(IPV6): HOST})

    def test_unknown_domain_is_refused(self) -> None:
        self.assertRaises(ValueError, dnssetup.plan, self.config, "example.com")


class RenderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.plan = dnssetup.plan(load_config(write_config(self.directory)), "example.test")

    def test_txt_strings_at_most_255_octets(self) -> None:
        value = "v=DKIM1; k=rsa; p=" + "A" * 600
        strings = dnssetup.txt_strings(value)
        self.assertEqual([len(s) for s in strings], [255, 255, 108])
        self.assertEqual("".join(strings), value)

    def test_zone_fragment_parses_and_holds_every_value(self) -> None:
        """dnspython reads our fragment back: the syntax and the TXT splitting are right."""
        fragment = dnssetup.zone_fragment(self.plan)
        zone = dns.zone.from_text(
            "$TTL 3600\n" + fragment, origin="example.test.", relativize=False, check_origin=False
        )
        published = {}
        for name, rdataset in zone.iterate_rdatasets():
            for rdata in rdataset:
                owner = name.to_text(omit_final_dot=True)
                if rdataset.rdtype == dns.rdatatype.TXT:
                    self.assertTrue(all(len(s) <= 255 for s in rdata.strings))
                    value = b"".join(rdata.strings).decode()
                else:
                    value = rdata.to_text().rstrip(".")
                published[(owner, dns.rdatatype.to_text(rdataset.rdtype), value)] = True
        wanted = {
            (r.name, r.type, r.value) for r in self.plan.records if r.in_zone and not r.placeholder
        }
        self.assertEqual(set(published), wanted)

    def test_long_dkim_record_is_split_in_the_zone_file(self) -> None:
        fragment = dnssetup.zone_fragment(self.plan)
        line = next(x for x in fragment.splitlines() if x.startswith("mx1._domainkey"))
        self.assertIn('IN TXT   ( "v=DKIM1; k=rsa; p=', line)

    def test_ptr_is_commented_out_in_the_zone(self) -> None:
        fragment = dnssetup.zone_fragment(self.plan)
        self.assertIn(f"; {reverse(IPV4)}.", fragment)
        self.assertIn("hosting provider", fragment)

    def test_web_table_gives_values_whole(self) -> None:
        table = dnssetup.web_table(self.plan)
        dkim_value = next(r.value for r in self.plan.records if r.record == "DKIM")
        self.assertGreater(len(dkim_value), 255)
        self.assertIn(dkim_value, table)
        self.assertIn(f"{HOST}  (priority 10)", table)

    def test_json_has_whole_value_and_strings(self) -> None:
        data = dnssetup.plan_json(self.plan)
        dkim_json = next(r for r in data["records"] if r["record"] == "DKIM")
        self.assertEqual("".join(dkim_json["strings"]), dkim_json["value"])
        self.assertEqual(data["mta_sts_policy"]["url"], self.plan.mta_sts_url)


# ---------------------------------------------------------------------------
# Records for mail clients: RFC 6186 SRV and the Thunderbird autoconfig file


class ClientRecordTests(unittest.TestCase):
    """Built from the configuration alone; no DNS."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.config = load_config(write_config(self.directory))

    def plan(self, **changes: Any) -> dnssetup.Plan:
        return dnssetup.plan(replace(self.config, **changes), "example.test")

    @staticmethod
    def srv(p: dnssetup.Plan) -> dict[str, str]:
        return {r.name: r.value for r in p.records if r.type == "SRV"}

    def test_no_listeners_no_srv_and_a_note(self) -> None:
        p = self.plan()
        self.assertEqual(self.srv(p), {})
        self.assertIsNone(p.autoconfig)
        self.assertTrue(any("no SRV records (RFC 6186)" in n for n in p.notes), p.notes)

    def test_submissions_preferred_over_submission(self) -> None:
        p = self.plan(submission=("tcp:587",), submissions=("tcp:465",))
        self.assertEqual(
            self.srv(p),
            {
                "_submissions._tcp.example.test": f"0 1 465 {HOST}",
                "_submission._tcp.example.test": f"1 1 587 {HOST}",
            },
        )
        self.assertTrue(all(not r.required for r in p.records if r.type == "SRV"))
        # Without imap:, Thunderbird has no incoming server: no autoconfig, a note.
        self.assertIsNone(p.autoconfig)
        self.assertTrue(any("Set imap:" in n for n in p.notes), p.notes)

    def test_only_the_configured_listener_is_published(self) -> None:
        p = self.plan(submission=("tcp:587",))
        self.assertEqual(self.srv(p), {"_submission._tcp.example.test": f"1 1 587 {HOST}"})

    def test_standard_port_chosen_among_several_endpoints(self) -> None:
        p = self.plan(submission=("tcp:2587:interface=127.0.0.1", "tcp6:port=587"))
        self.assertEqual(self.srv(p), {"_submission._tcp.example.test": f"1 1 587 {HOST}"})
        self.assertFalse(any("listen.submission" in n for n in p.notes), p.notes)

    def test_other_port_is_published_with_a_note(self) -> None:
        p = self.plan(submissions=("tcp:2465:interface=127.0.0.1",))
        self.assertEqual(self.srv(p), {"_submissions._tcp.example.test": f"0 1 2465 {HOST}"})
        notes = " ".join(p.notes)
        self.assertIn("port 2465, not the standard 465", notes)
        self.assertIn("publish 465 instead", notes)
        self.assertIn("listens on 127.0.0.1 only", notes)

    def test_behind_haproxy_the_standard_port_with_a_note(self) -> None:
        p = self.plan(submission=("haproxy:tcp:2587",))
        self.assertEqual(self.srv(p), {"_submission._tcp.example.test": f"1 1 587 {HOST}"})
        self.assertTrue(any("standard port 587" in n for n in p.notes), p.notes)

    def test_imap_gets_imaps_and_no_cleartext_imap(self) -> None:
        p = self.plan(imap=("imap.example.test", 993))
        self.assertEqual(
            self.srv(p),
            {
                "_imaps._tcp.example.test": "0 1 993 imap.example.test",
                # RFC 2782: "." says not offered.
                "_imap._tcp.example.test": "0 0 0 .",
            },
        )

    def test_endpoint_port(self) -> None:
        cases = {
            "tcp:587": (587, None),
            "tcp:port=465:interface=0.0.0.0": (465, "0.0.0.0"),
            "tcp6:587:interface=\\:\\:1": (587, "::1"),
            "haproxy:tcp:2587": (2587, None),
            "systemd:domain=INET:index=0": (None, None),
            "unix:/run/mailx.sock": (None, None),
        }
        for endpoint, wanted in cases.items():
            self.assertEqual(dnssetup.endpoint_port(endpoint), wanted, endpoint)

    def autoconfig(self) -> Any:
        p = self.plan(
            submission=("tcp:587",), submissions=("tcp:465",), imap=("imap.example.test", 993)
        )
        self.assertIsNotNone(p.autoconfig)
        return ElementTree.fromstring(p.autoconfig.encode())

    def test_autoconfig_names_the_servers(self) -> None:
        root = self.autoconfig()
        self.assertEqual((root.tag, root.get("version")), ("clientConfig", "1.1"))
        provider = root.find("emailProvider")
        self.assertEqual(provider.get("id"), "example.test")
        self.assertEqual(provider.findtext("domain"), "example.test")

        def server(element: Any) -> tuple[str | None, ...]:
            return (
                element.get("type"),
                element.findtext("hostname"),
                element.findtext("port"),
                element.findtext("socketType"),
                element.findtext("authentication"),
                element.findtext("username"),
            )

        self.assertEqual(
            [server(e) for e in provider.findall("incomingServer")],
            [("imap", "imap.example.test", "993", "SSL", "password-cleartext", "%EMAILADDRESS%")],
        )
        # Thunderbird tries them in order: TLS from the first byte first (RFC 8314).
        self.assertEqual(
            [server(e) for e in provider.findall("outgoingServer")],
            [
                ("smtp", HOST, "465", "SSL", "password-cleartext", "%EMAILADDRESS%"),
                ("smtp", HOST, "587", "STARTTLS", "password-cleartext", "%EMAILADDRESS%"),
            ],
        )

    def test_autoconfig_urls_and_json(self) -> None:
        p = self.plan(submissions=("tcp:465",), imap=("imap.example.test", 993))
        data = dnssetup.plan_json(p)
        self.assertEqual(
            data["autoconfig"]["urls"],
            [
                "https://autoconfig.example.test/mail/config-v1.1.xml",
                "https://example.test/.well-known/autoconfig/mail/config-v1.1.xml",
            ],
        )
        self.assertEqual(data["autoconfig"]["text"], p.autoconfig)
        srv = {(r["name"], r["value"]) for r in data["records"] if r["type"] == "SRV"}
        self.assertIn(("_submissions._tcp.example.test", f"0 1 465 {HOST}"), srv)
        self.assertIsNone(dnssetup.plan_json(self.plan())["autoconfig"])

    def test_zone_fragment_srv_parses(self) -> None:
        """dnspython reads the SRV lines back, "." target included."""
        p = self.plan(
            submission=("tcp:587",), submissions=("tcp:465",), imap=("imap.example.test", 993)
        )
        zone = dns.zone.from_text(
            "$TTL 3600\n" + dnssetup.zone_fragment(p),
            origin="example.test.",
            relativize=False,
            check_origin=False,
        )
        found = {
            (name.to_text(omit_final_dot=True), rdata.to_text())
            for name, rdataset in zone.iterate_rdatasets("SRV")
            for rdata in rdataset
        }
        self.assertEqual(
            found,
            {
                ("_submissions._tcp.example.test", f"0 1 465 {HOST}."),
                ("_submission._tcp.example.test", f"1 1 587 {HOST}."),
                ("_imaps._tcp.example.test", "0 1 993 imap.example.test."),
                ("_imap._tcp.example.test", "0 0 0 ."),
            },
        )


class IMAPConfigTests(unittest.TestCase):
    def config(self, line: str) -> Any:
        return load_config_text(
            f"hostname: {HOST}\n{line}domains:\n  example.test:\n"
            "    mailboxes: [alice]\n    aliases: {postmaster: alice}\n",
            "mailx.yaml",
        )

    def test_default_is_none(self) -> None:
        self.assertIsNone(self.config("").imap)

    def test_port_993_unless_given(self) -> None:
        self.assertEqual(self.config("imap: IMAP.Example.TEST\n").imap, ("imap.example.test", 993))
        self.assertEqual(
            self.config("imap: imap.example.test:1993\n").imap, ("imap.example.test", 1993)
        )

    def test_bad_values_are_problems(self) -> None:
        for value in ("imap.example.test:99999", "imap.example.test:x", "localhost", "[bad"):
            e = self.assertRaises(ConfigError, self.config, f'imap: "{value}"\n')
            self.assertEqual([p.key for p in e.problems], ["imap"], value)

    def test_repository_default_mirrors_it(self) -> None:
        self.assertIn("\nimap: null\n", (REPOSITORY / "mailx.yaml").read_text())


# ---------------------------------------------------------------------------
# SPF syntax and lookup counting


class SPFTests(unittest.TestCase):
    def test_parse_terms(self) -> None:
        terms = dnssetup.parse_spf("v=spf1 ip4:192.0.2.0/24 mx:example.test/24 ~all exp=x.test")
        self.assertEqual(
            [(t.kind, t.name, t.qualifier) for t in terms],
            [
                ("mechanism", "ip4", "+"),
                ("mechanism", "mx", "+"),
                ("mechanism", "all", "~"),
                ("modifier", "exp", "+"),
            ],
        )

    def test_syntax_errors(self) -> None:
        for record in (
            "v=spf1 mx -al",
            "v=spf1 ip4:300.1.1.1",
            "v=spf1 ip4:2001:db8::1",
            "v=spf1 include",
            "v=spf1 redirect=a.test redirect=b.test",
            "v=spf10 mx",
        ):
            self.assertRaises(dnssetup.SPFSyntaxError, dnssetup.parse_spf, record)

    def fetch(self, zone: dict[str, list[str]]) -> Any:
        from mailx.dns import NXDomainError

        def fetch(name: str) -> list[str]:
            if name not in zone:
                raise NXDomainError(name)
            return zone[name]

        return fetch

    def test_counts_through_includes(self) -> None:
        zone = {
            "example.test": ["v=spf1 mx a include:a.test -all"],
            "a.test": ["v=spf1 ip4:192.0.2.1 include:b.test exists:x.test -all"],
            "b.test": ["v=spf1 ptr -all"],
        }
        count = dnssetup.count_spf_lookups("example.test", self.fetch(zone))
        self.assertEqual((count.lookups, count.problems), (6, []))

    def test_redirect_ignored_beside_all(self) -> None:
        zone = {"example.test": ["v=spf1 mx -all redirect=b.test"]}
        self.assertEqual(dnssetup.count_spf_lookups("example.test", self.fetch(zone)).lookups, 1)

    def test_macro_domains_count_once(self) -> None:
        zone = {"example.test": ["v=spf1 include:%{d}.spf.test -all"]}
        self.assertEqual(dnssetup.count_spf_lookups("example.test", self.fetch(zone)).lookups, 1)

    def test_include_without_record_is_a_problem(self) -> None:
        zone = {"example.test": ["v=spf1 include:gone.test -all"]}
        count = dnssetup.count_spf_lookups("example.test", self.fetch(zone))
        self.assertIn("gone.test, which has no SPF record", count.problems[0])

    def test_include_loop_stops_over_the_limit(self) -> None:
        zone = {"example.test": ["v=spf1 include:example.test -all"]}
        count = dnssetup.count_spf_lookups("example.test", self.fetch(zone))
        self.assertEqual(count.lookups, dnssetup.MAX_SPF_LOOKUPS + 1)


# ---------------------------------------------------------------------------
# The config key this feature added


class ReportsConfigTests(unittest.TestCase):
    def config(self, line: str) -> Any:
        return load_config_text(
            f"hostname: {HOST}\n{line}domains:\n  example.test:\n"
            "    mailboxes: [alice]\n    aliases: {postmaster: alice}\n",
            "mailx.yaml",
        )

    def test_default_is_none(self) -> None:
        self.assertIsNone(self.config("").reports)

    def test_address_is_normalized(self) -> None:
        self.assertEqual(self.config("reports: DMARC@Example.TEST\n").reports, "dmarc@example.test")

    def test_bad_address_is_a_problem(self) -> None:
        e = self.assertRaises(ConfigError, self.config, "reports: not an address\n")
        self.assertEqual([p.key for p in e.problems], ["reports"])

    def test_repository_default_mirrors_it(self) -> None:
        text = (REPOSITORY / "mailx.yaml").read_text()
        self.assertIn("\nreports: null\n", text)


# ---------------------------------------------------------------------------
# mailxctl dns


class DNSCommandTests(CLITestCase):
    @defer.inlineCallbacks
    def test_prints_zone_table_and_policy(self) -> None:
        config = write_config(self.directory)
        status, out, err = yield self.run_cli("dns", "example.test", "-c", str(config))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("example.test.", out)
        self.assertIn("TYPE  NAME", out)
        self.assertIn("mode: testing", out)
        self.assertIn(f"{IPV4} -> {HOST}", out)

    @defer.inlineCallbacks
    def test_ip_options(self) -> None:
        config = write_config(self.directory, addresses=())
        status, out, _ = yield self.run_cli(
            "dns", "example.test", "--ip", "198.51.100.7", "--json", "-c", str(config)
        )
        data = json.loads(out)
        self.assertEqual(status, 0)
        self.assertEqual(data["addresses"], ["198.51.100.7"])

    @defer.inlineCallbacks
    def test_ipv6_given_to_ip_is_a_usage_error(self) -> None:
        config = write_config(self.directory)
        status, _, err = yield self.run_cli("dns", "example.test", "--ip", IPV6, "-c", str(config))
        self.assertEqual(status, 2)
        self.assertIn("not an IPv4 address", err)

    @defer.inlineCallbacks
    def test_unknown_domain_exits_1(self) -> None:
        config = write_config(self.directory)
        status, out, _ = yield self.run_cli("dns", "example.com", "-c", str(config))
        self.assertEqual(status, 1)
        self.assertIn("example.com is not a configured domain", out)

    @defer.inlineCallbacks
    def test_autoconfig_alone(self) -> None:
        """``--autoconfig`` prints the file and nothing else, ready to save and serve."""
        config = write_config(self.directory, extra=client_extra(self.directory))
        status, out, err = yield self.run_cli(
            "dns", "example.test", "--autoconfig", "-c", str(config)
        )
        self.assertEqual((status, err), (0, ""))
        root = ElementTree.fromstring(out.encode())
        self.assertEqual(root.find("emailProvider/incomingServer/port").text, "993")
        self.assertEqual(out, dnssetup.plan(load_config(config), "example.test").autoconfig)

    @defer.inlineCallbacks
    def test_autoconfig_without_imap_exits_1(self) -> None:
        config = write_config(self.directory)
        status, out, _ = yield self.run_cli(
            "dns", "example.test", "--autoconfig", "-c", str(config)
        )
        self.assertEqual(status, 1)
        self.assertIn("it needs imap: and a submission listener", out)


class CheckTestCase(CLITestCase):
    """A loopback zone holding exactly what ``mailxctl dns --json`` prints."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.server = serve_for_test(self)
        self.config = str(write_config(self.directory, self.server.nameservers))
        status, out, _ = yield self.run_cli("dns", "example.test", "--json", "-c", self.config)
        self.assertEqual(status, 0)
        self.published = json.loads(out)
        self.server.load(zone_from_json(self.published))

    @defer.inlineCallbacks
    def check(self, *extra: str) -> Any:
        return (yield self.run_cli("dns", "example.test", "--check", "-c", self.config, *extra))

    @defer.inlineCallbacks
    def assertFault(self, record: str, *words: str) -> Any:
        """Exit 1; a WRONG or MISSING line naming ``record``; its fix containing ``words``."""
        status, out, _ = yield self.check()
        self.assertEqual(status, 1, out)
        lines = out.splitlines()
        index = next(
            (
                i
                for i, line in enumerate(lines)
                if line.split()[0] in ("WRONG", "MISSING")
                and [w.rstrip(":") for w in line.split()[1:3]] == record.split()
            ),
            None,
        )
        self.assertIsNotNone(index, f"no fault reported for {record}:\n{out}")
        block = "\n".join(lines[index : index + 4])
        self.assertIn("fix:", block)
        for word in words:
            self.assertIn(word, block)
        self.assertIn("required record(s) missing or wrong", lines[-1])
        return out


class CheckTests(CheckTestCase):
    @defer.inlineCallbacks
    def test_what_we_print_checks_ok(self) -> None:
        status, out, _ = yield self.check()
        self.assertEqual(status, 0, out)
        for line in out.splitlines()[:-1]:
            self.assertTrue(line.startswith("ok "), line)
        self.assertEqual(out.splitlines()[-1], "example.test: all required records ok")

    @defer.inlineCallbacks
    def test_json(self) -> None:
        status, out, _ = yield self.check("--json")
        data = json.loads(out)
        self.assertEqual((status, data["ok"]), (0, True))
        checked = {(f["record"], f["status"]) for f in data["findings"]}
        for record in ("MX", "A", "AAAA", "SPF", "DKIM", "DMARC", "MTA-STS", "TLS-RPT", "PTR"):
            self.assertIn((record, "ok"), checked)

    @defer.inlineCallbacks
    def test_missing_mx(self) -> None:
        self.server.set("example.test", "MX", [])
        out = yield self.assertFault("MX example.test", f"example.test. IN MX 10 {HOST}.")
        self.assertIn("MISSING  MX example.test", out)

    @defer.inlineCallbacks
    def test_mx_to_another_host(self) -> None:
        self.server.set("example.test", "MX", [(10, "mx.elsewhere.test")])
        out = yield self.assertFault("MX example.test", f"IN MX 10 {HOST}.")
        self.assertIn(f"MX points to mx.elsewhere.test, not {HOST}", out)

    @defer.inlineCallbacks
    def test_null_mx(self) -> None:
        self.server.set("example.test", "MX", [(0, ".")])
        out = yield self.assertFault("MX example.test")
        self.assertIn("null MX (RFC 7505)", out)

    @defer.inlineCallbacks
    def test_two_spf_records(self) -> None:
        self.server.set("example.test", "TXT", ["v=spf1 mx -all", "v=spf1 a:mx.example.test -all"])
        out = yield self.assertFault("SPF example.test", "delete all but one", '"v=spf1 mx -all"')
        self.assertIn("2 SPF records", out)

    @defer.inlineCallbacks
    def test_spf_over_ten_lookups(self) -> None:
        self.server.load(
            {
                "example.test": {"TXT": ["v=spf1 mx include:_spf.a.test include:_spf.b.test -all"]},
                "_spf.a.test": {
                    "TXT": ["v=spf1 a mx ptr exists:%{i}.x.test a:one.test mx:two.test -all"]
                },
                "_spf.b.test": {"TXT": ["v=spf1 a mx include:_spf.c.test -all"]},
                "_spf.c.test": {"TXT": ["v=spf1 a -all"]},
            }
        )
        out = yield self.assertFault("SPF example.test", "remove includes")
        self.assertIn("more than 10 DNS lookups", out)
        self.assertIn("RFC 7208 4.6.4", out)

    @defer.inlineCallbacks
    def test_spf_that_does_not_authorize_us(self) -> None:
        self.server.set("example.test", "TXT", ["v=spf1 ip4:198.51.100.0/24 -all"])
        out = yield self.assertFault("SPF example.test", '"v=spf1 mx -all"')
        self.assertIn(f"does not authorize {HOST}: {IPV4} (fail)", out)

    @defer.inlineCallbacks
    def test_other_spf_wording_that_authorizes_us_is_ok(self) -> None:
        self.server.set("example.test", "TXT", [f"v=spf1 ip4:{IPV4} ip6:{IPV6} ~all"])
        status, out, _ = yield self.check()
        self.assertEqual(status, 0, out)

    @defer.inlineCallbacks
    def test_dmarc_missing(self) -> None:
        self.server.remove("_dmarc.example.test")
        out = yield self.assertFault(
            "DMARC _dmarc.example.test",
            '_dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"',
        )
        self.assertIn("no v=DMARC1 record", out)

    @defer.inlineCallbacks
    def test_two_dmarc_records(self) -> None:
        self.server.set("_dmarc.example.test", "TXT", ["v=DMARC1; p=none", "v=DMARC1; p=reject"])
        out = yield self.assertFault("DMARC _dmarc.example.test", "delete all but one")
        self.assertIn("RFC 7489 6.6.3", out)

    @defer.inlineCallbacks
    def test_dkim_key_mismatch(self) -> None:
        other = dkimkeys.dns_record(dkimkeys.generate_key("rsa"))
        self.server.set("mx1._domainkey.example.test", "TXT", [other])
        out = yield self.assertFault(
            "DKIM mx1._domainkey.example.test", "mx1._domainkey.example.test. IN TXT"
        )
        self.assertIn("not the public half of our key", out)
        self.assertIn("example.test.key", out)

    @defer.inlineCallbacks
    def test_dkim_missing(self) -> None:
        self.server.remove("mx1._domainkey.example.test")
        yield self.assertFault("DKIM mx1._domainkey.example.test", "v=DKIM1; k=rsa; p=")

    @defer.inlineCallbacks
    def test_ptr_mismatch(self) -> None:
        self.server.set(reverse(IPV4), "PTR", ["vps-25.hosting.test"])
        out = yield self.assertFault(f"PTR {reverse(IPV4)}", "ask your hosting provider", HOST)
        self.assertIn(f"reverse DNS of {IPV4} is vps-25.hosting.test, not {HOST}", out)

    @defer.inlineCallbacks
    def test_ptr_without_forward_confirmation(self) -> None:
        self.server.set(HOST, "AAAA", [])
        out = yield self.assertFault(f"PTR {reverse(IPV6)}", f"publish {HOST} AAAA {IPV6}")
        self.assertIn("does not resolve", out)

    @defer.inlineCallbacks
    def test_stale_extra_address(self) -> None:
        self.server.set(HOST, "A", [IPV4, "198.51.100.99"])
        out = yield self.assertFault(f"A {HOST}", "remove", "198.51.100.99")
        self.assertIn("not this server's", out)

    @defer.inlineCallbacks
    def test_recommended_records_missing_still_exit_0(self) -> None:
        self.server.remove("_mta-sts.example.test")
        self.server.remove("_smtp._tls.example.test")
        status, out, _ = yield self.check()
        self.assertEqual(status, 0, out)
        self.assertIn("MISSING  MTA-STS _mta-sts.example.test (recommended)", out)
        self.assertIn("2 recommended record(s) to add or fix", out)

    @defer.inlineCallbacks
    def test_timeout_is_an_error_not_missing(self) -> None:
        self.server.timeout("_dmarc.example.test")
        status, out, _ = yield self.check()
        self.assertEqual(status, 1)
        self.assertIn("ERROR    DMARC _dmarc.example.test", out)

    @defer.inlineCallbacks
    def test_unknown_addresses_checked_from_dns(self) -> None:
        """Without public_addresses, the host's published addresses are checked for FCrDNS."""
        write_config(self.directory, self.server.nameservers, addresses=())
        status, out, _ = yield self.check()
        self.assertEqual(status, 0, out)
        self.assertIn(f"{IPV4} -> {HOST} -> {IPV4} (forward-confirmed)", out)
        self.server.set(reverse(IPV6), "PTR", [])
        status, out, _ = yield self.check()
        self.assertEqual(status, 1)
        self.assertIn(f"{IPV6} has no reverse DNS", out)


class ClientRecordCheckTests(CheckTestCase):
    """--check of the SRV records, against the loopback DNS server."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        write_config(self.directory, self.server.nameservers, extra=client_extra(self.directory))
        status, out, _ = yield self.run_cli("dns", "example.test", "--json", "-c", self.config)
        self.assertEqual(status, 0, out)
        self.published = json.loads(out)
        self.server.load(zone_from_json(self.published))

    @defer.inlineCallbacks
    def srv_line(self, name: str) -> Any:
        """Exit 0 (SRV is recommended) and the check's lines about ``name``."""
        status, out, _ = yield self.check()
        self.assertEqual(status, 0, out)
        lines = out.splitlines()
        index = next(i for i, line in enumerate(lines) if f" SRV {name} " in line)
        return "\n".join(lines[index : index + 4])

    @defer.inlineCallbacks
    def test_what_we_print_checks_ok(self) -> None:
        status, out, _ = yield self.check("--json")
        self.assertEqual(status, 0, out)
        srv = {f["name"]: f["status"] for f in json.loads(out)["findings"] if f["type"] == "SRV"}
        self.assertEqual(
            srv,
            {
                "_submissions._tcp.example.test": "ok",
                "_submission._tcp.example.test": "ok",
                "_imaps._tcp.example.test": "ok",
                "_imap._tcp.example.test": "ok",
            },
        )

    @defer.inlineCallbacks
    def test_missing_srv(self) -> None:
        self.server.remove("_submissions._tcp.example.test")
        block = yield self.srv_line("_submissions._tcp.example.test")
        self.assertIn("MISSING  SRV _submissions._tcp.example.test (recommended)", block)
        self.assertIn(f"_submissions._tcp.example.test. IN SRV 0 1 465 {HOST}.", block)

    @defer.inlineCallbacks
    def test_srv_with_the_wrong_port(self) -> None:
        self.server.set("_submission._tcp.example.test", "SRV", [(0, 1, 25, HOST)])
        block = yield self.srv_line("_submission._tcp.example.test")
        self.assertIn(
            f"WRONG    SRV _submission._tcp.example.test (recommended): points to"
            f" {HOST}:25, not {HOST}:587",
            block,
        )
        self.assertIn(f"IN SRV 1 1 587 {HOST}.", block)

    @defer.inlineCallbacks
    def test_srv_to_another_host(self) -> None:
        self.server.set("_submissions._tcp.example.test", "SRV", [(0, 1, 465, "old.example.test")])
        block = yield self.srv_line("_submissions._tcp.example.test")
        self.assertIn("points to old.example.test:465", block)

    @defer.inlineCallbacks
    def test_srv_saying_not_offered(self) -> None:
        self.server.set("_imaps._tcp.example.test", "SRV", [(0, 0, 0, ".")])
        block = yield self.srv_line("_imaps._tcp.example.test")
        self.assertIn("WRONG", block)
        self.assertIn("says the service is not offered", block)

    @defer.inlineCallbacks
    def test_cleartext_imap_advertised(self) -> None:
        self.server.set("_imap._tcp.example.test", "SRV", [(0, 1, 143, "imap.example.test")])
        block = yield self.srv_line("_imap._tcp.example.test")
        self.assertIn("names imap.example.test:143: clients may use it without TLS", block)

    @defer.inlineCallbacks
    def test_srv_timeout_is_an_error(self) -> None:
        self.server.timeout("_submission._tcp.example.test")
        block = yield self.srv_line("_submission._tcp.example.test")
        self.assertIn("ERROR    SRV _submission._tcp.example.test", block)


class CheckDNSCommandTests(CheckTestCase):
    @defer.inlineCallbacks
    def test_check_dns_ok(self) -> None:
        status, out, _ = yield self.run_cli("check", "--dns", "-c", self.config)
        self.assertEqual(status, 0, out)
        self.assertIn("DNS of example.test:", out)
        self.assertIn("example.test: all required records ok", out)

    @defer.inlineCallbacks
    def test_check_dns_fault_exits_1(self) -> None:
        self.server.remove("_dmarc.example.test")
        status, out, _ = yield self.run_cli("check", "--dns", "--json", "-c", self.config)
        data = json.loads(out)
        self.assertEqual((status, data["ok"], data["dns"]["example.test"]["ok"]), (1, False, False))
        [dmarc] = [f for f in data["dns"]["example.test"]["findings"] if f["record"] == "DMARC"]
        self.assertEqual(dmarc["status"], "missing")

    @defer.inlineCallbacks
    def test_check_without_dns_does_not_look_up(self) -> None:
        self.server.remove("_dmarc.example.test")
        asked = len(self.server.queries)
        status, _, _ = yield self.run_cli("check", "-c", self.config)
        self.assertEqual((status, len(self.server.queries)), (0, asked))
