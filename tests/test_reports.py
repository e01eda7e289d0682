# -*- test-case-name: tests.test_reports -*-
"""``mailxctl reports`` (SPEC section 15): mailx.admin.reports on files, messages and Maildirs.

The fixture reports are built here in the shapes the big receivers send,
from RFC 7489 Appendix C's schema and the receivers' published samples;
every IP is from the documentation ranges and every domain ends in .test:

- Google: ``<?xml ... encoding="UTF-8" ?>``, ``extra_contact_info``, ``np`` in
  policy_published, a ``.zip`` attachment (application/zip) named
  ``google.com!domain!begin!end.zip``.
- Microsoft (Outlook.com): ``xmlns:xsd``/``xmlns:xsi`` on ``<feedback>``, a
  ``<version>`` element, a BOM and a blank line before the XML declaration,
  ``fo`` in policy_published, ``envelope_to`` in identifiers, gzip
  (application/gzip) named ``enterprise.protection.outlook.com!...xml.gz``.
- Yahoo: ``<?xml version="1.0"?>``, no ``extra_contact_info``, SPF results
  without ``scope``, DKIM without ``selector``, a ``.xml.gz``.
- DMARCbis: the ``urn:ietf:params:xml:ns:dmarc-2.0`` namespace, ``np``,
  ``testing``, ``discovery_method``, no ``pct``.
- A TLS report (RFC 8460 4.4 and its Appendix B example), as
  application/tlsrpt+gzip.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import resource
import struct
import time
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailx.admin import reports
from mailx.admin.cli import main
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import send_mail, start_server, write_config

BEGIN = 1764547200  # 2025-12-01 00:00 UTC
END = BEGIN + 86399


def record(ip: str, count: int, *, dkim: str, spf: str, disposition: str = "none",
           header_from: str = "example.test", auth: str = "", extra: str = "") -> str:
    return f"""
  <record>
    <row>
      <source_ip>{ip}</source_ip>
      <count>{count}</count>
      <policy_evaluated>
        <disposition>{disposition}</disposition>
        <dkim>{dkim}</dkim>
        <spf>{spf}</spf>{extra}
      </policy_evaluated>
    </row>
    <identifiers>
      <header_from>{header_from}</header_from>
    </identifiers>
    <auth_results>{auth}
    </auth_results>
  </record>"""


def google(domain: str = "example.test", *records: str, begin: int = BEGIN,
           report_id: str = "4205196846338427133") -> bytes:
    rows = "".join(records) or record(
        "192.0.2.10", 30, dkim="pass", spf="pass",
        auth="<dkim><domain>example.test</domain><selector>mx1</selector><result>pass</result></dkim>"
             "<spf><domain>example.test</domain><scope>mfrom</scope><result>pass</result></spf>",
    )
    return f"""<?xml version="1.0" encoding="UTF-8" ?>
<feedback>
  <report_metadata>
    <org_name>google.com</org_name>
    <email>noreply-dmarc-support@google.test</email>
    <extra_contact_info>https://support.google.test/a/answer/2466580</extra_contact_info>
    <report_id>{report_id}</report_id>
    <date_range>
      <begin>{begin}</begin>
      <end>{begin + 86399}</end>
    </date_range>
  </report_metadata>
  <policy_published>
    <domain>{domain}</domain>
    <adkim>r</adkim>
    <aspf>r</aspf>
    <p>none</p>
    <sp>none</sp>
    <pct>100</pct>
    <np>none</np>
  </policy_published>{rows}
</feedback>
""".encode()


MICROSOFT = f"""\ufeff
<?xml version="1.0"?>
<feedback xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <version>1.0</version>
  <report_metadata>
    <org_name>Outlook.com</org_name>
    <email>dmarcreport@microsoft.test</email>
    <report_id>0d2d9d4c4bcd4a3a9e2a8b2f5d7b1e11</report_id>
    <date_range>
      <begin>{BEGIN}</begin>
      <end>{END}</end>
    </date_range>
  </report_metadata>
  <policy_published>
    <domain>example.test</domain>
    <adkim>r</adkim>
    <aspf>r</aspf>
    <p>none</p>
    <sp>none</sp>
    <pct>100</pct>
    <fo>0</fo>
  </policy_published>
  <record>
    <row>
      <source_ip>198.51.100.7</source_ip>
      <count>4</count>
      <policy_evaluated>
        <disposition>none</disposition>
        <dkim>fail</dkim>
        <spf>fail</spf>
      </policy_evaluated>
    </row>
    <identifiers>
      <envelope_to>example.test</envelope_to>
      <envelope_from>lists.forwarder.test</envelope_from>
      <header_from>example.test</header_from>
    </identifiers>
    <auth_results>
      <dkim>
        <domain>lists.forwarder.test</domain>
        <selector>s1</selector>
        <result>pass</result>
      </dkim>
      <spf>
        <domain>lists.forwarder.test</domain>
        <scope>mfrom</scope>
        <result>pass</result>
      </spf>
    </auth_results>
  </record>
</feedback>
""".encode()

YAHOO = f"""<?xml version="1.0"?>
<feedback>
  <report_metadata>
    <org_name>Yahoo</org_name>
    <email>dmarchelp@yahooinc.test</email>
    <report_id>1764547200.561234</report_id>
    <date_range>
      <begin>{BEGIN}</begin>
      <end>{END}</end>
    </date_range>
  </report_metadata>
  <policy_published>
    <domain>example.test</domain>
    <adkim>r</adkim>
    <aspf>r</aspf>
    <p>none</p>
    <pct>100</pct>
  </policy_published>
  <record>
    <row>
      <source_ip>203.0.113.5</source_ip>
      <count>12</count>
      <policy_evaluated>
        <disposition>none</disposition>
        <dkim>fail</dkim>
        <spf>fail</spf>
      </policy_evaluated>
    </row>
    <identifiers>
      <header_from>example.test</header_from>
    </identifiers>
    <auth_results>
      <spf>
        <domain>example.test</domain>
        <result>fail</result>
      </spf>
    </auth_results>
  </record>
</feedback>
""".encode()

DMARCBIS = f"""<?xml version="1.0" encoding="UTF-8"?>
<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0">
  <version>1.0</version>
  <report_metadata>
    <org_name>receiver.test</org_name>
    <email>dmarc@receiver.test</email>
    <report_id>bis-1</report_id>
    <date_range><begin>{BEGIN}</begin><end>{END}</end></date_range>
  </report_metadata>
  <policy_published>
    <domain>example.test</domain>
    <p>reject</p>
    <sp>reject</sp>
    <np>reject</np>
    <adkim>s</adkim>
    <aspf>r</aspf>
    <testing>n</testing>
    <discovery_method>treewalk</discovery_method>
  </policy_published>
  <record>
    <row>
      <source_ip>2001:db8::25</source_ip>
      <count>3</count>
      <policy_evaluated><disposition>none</disposition><dkim>pass</dkim><spf>pass</spf></policy_evaluated>
    </row>
    <identifiers><header_from>example.test</header_from></identifiers>
    <auth_results>
      <dkim><domain>example.test</domain><selector>mx1</selector><result>pass</result></dkim>
      <spf><domain>example.test</domain><scope>mfrom</scope><result>pass</result></spf>
    </auth_results>
  </record>
</feedback>
""".encode()

TLS = json.dumps({
    "organization-name": "Company-X",
    "date-range": {"start-datetime": "2025-12-01T00:00:00Z",
                   "end-datetime": "2025-12-01T23:59:59Z"},
    "contact-info": "sts-reporting@company-x.test",
    "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "policies": [{
        "policy": {"policy-type": "sts", "policy-string": ["version: STSv1", "mode: testing"],
                   "policy-domain": "example.test", "mx-host": ["mx.example.test"]},
        "summary": {"total-successful-session-count": 5326,
                    "total-failure-session-count": 303},
        "failure-details": [
            {"result-type": "certificate-expired", "sending-mta-ip": "2001:db8:abcd:0012::1",
             "receiving-mx-hostname": "mx.example.test", "failed-session-count": 100},
            {"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8:abcd:0013::1",
             "receiving-mx-hostname": "mx.example.test", "receiving-ip": "203.0.113.56",
             "failed-session-count": 200},
            {"result-type": "validation-failure", "sending-mta-ip": "198.51.100.62",
             "receiving-ip": "203.0.113.58", "failed-session-count": 3,
             "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"},
        ],
    }],
}).encode()


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def message(*attachments: tuple[bytes, str, str]) -> bytes:
    """A report email as a receiver sends it: a text part and the attachments."""
    mail = EmailMessage()
    mail["From"] = "noreply-dmarc-support@google.test"
    mail["To"] = "dmarc@example.test"
    mail["Subject"] = "Report domain: example.test Submitter: google.com"
    mail.set_content("This is an aggregate report from google.com.")
    for data, ctype, filename in attachments:
        maintype, subtype = ctype.split("/")
        mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return bytes(mail)


# 1 GiB of zeros, deflated without compressing a gigabyte: after a full
# flush the compressor's state is fresh, so one 16 MiB block's output
# repeated 64 times is the deflate stream of 64 such blocks.
_CHUNK = 1 << 24
GIB = 1 << 30


def _deflated_zeros(size: int) -> tuple[bytes, int]:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(_CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(_CHUNK)
    for _ in range(size // _CHUNK):
        crc = zlib.crc32(zeros, crc)
    return block * (size // _CHUNK) + compressor.flush(), crc


def gzip_bomb() -> bytes:
    """A well-formed gzip member (RFC 1952) of 1 GiB of zeros, about 1 MiB."""
    deflated, crc = _deflated_zeros(GIB)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflated + struct.pack("<II", crc, GIB)


def zip_bomb(declared: int = GIB) -> bytes:
    """A zip (APPNOTE 4.3) of one entry inflating to 1 GiB, declaring ``declared`` bytes."""
    deflated, crc = _deflated_zeros(GIB)
    name = b"report.xml"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(deflated),
                        declared, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc,
                          len(deflated), declared, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central),
                      len(local) + len(deflated), 0)
    return local + deflated + central + end


class ReportsTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(
            self.directory, {"reports": "dmarc@example.test",
                             "domains": {"example.test": {"mailboxes": ["alice", "bob", "dmarc"]}}}
        )
        self.maildir = self.directory / "mail" / "example.test" / "dmarc"
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        self.count = 0

    def deliver(self, data: bytes) -> Path:
        """A message in the reports Maildir's new/, as mailx files it."""
        self.count += 1
        path = self.maildir / "new" / f"{1764547200 + self.count}.M{self.count}P1.mx.example.test"
        path.write_bytes(data)
        return path

    def file(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-c", str(self.config), "reports", "--no-dns", *argv])
        return code, out.getvalue(), err.getvalue()

    def summary(self, *argv: str) -> tuple[int, dict, str]:
        code, out, err = self.cli("--json", *argv)
        return code, json.loads(out), err


class ReceiverFormatTests(ReportsTestCase):
    def test_google_zip_in_the_reports_maildir(self) -> None:
        """Without paths: the reports: address's Maildir; a .zip attachment of a message."""
        self.deliver(message((zipped("google.com!example.test!1764547200!1764633599.xml",
                                     google()), "application/zip",
                              "google.com!example.test!1764547200!1764633599.zip")))
        code, out, err = self.cli()
        self.assertEqual((code, err), (0, ""))
        self.assertIn("example.test: 1 DMARC report from google.com", out)
        self.assertIn("192.0.2.10: 30 messages, dmarc=pass, spf=pass (aligned 30),"
                      " dkim=pass (aligned 30), disposition=none", out)
        self.assertIn("verdict: all 30 messages from 1 source pass DMARC:"
                      " safe to move to p=reject", out)

    def test_microsoft_gzip_with_bom_and_envelope_to(self) -> None:
        self.deliver(message((gzip.compress(MICROSOFT), "application/gzip",
                              "enterprise.protection.outlook.com!example.test!1!2.xml.gz")))
        code, data, err = self.summary()
        self.assertEqual((code, err), (0, ""))
        (domain,) = data["domains"]
        self.assertEqual(domain["reporters"], ["Outlook.com"])
        (source,) = domain["sources"]
        self.assertEqual((source["ip"], source["messages"], source["fail"]), ("198.51.100.7", 4, 4))
        self.assertEqual((source["dkim"], source["spf"]), ({"pass": 4}, {"pass": 4}))
        self.assertIn("likely a forwarder or mailing list: DKIM passes for lists.forwarder.test",
                      domain["verdict"])
        parsed = reports.parse_aggregate(MICROSOFT)
        self.assertEqual(parsed.records[0].envelope_to, "example.test")
        self.assertEqual(parsed.policy["fo"], "0")

    def test_yahoo_xml_gz_file_lists_a_forger(self) -> None:
        path = self.file("yahoo.com!example.test!1764547200!1764633599.xml.gz",
                         gzip.compress(YAHOO))
        code, out, err = self.cli(path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("12 of 12 messages fail DMARC; would be refused under p=reject:", out)
        self.assertIn("203.0.113.5 12 messages, spf=fail dkim=none:"
                      " likely forgery: nothing authenticates it", out)

    def test_dmarcbis_namespace(self) -> None:
        report = reports.parse_aggregate(DMARCBIS)
        self.assertEqual(report.domain, "example.test")
        self.assertEqual((report.policy["np"], report.policy["testing"],
                          report.policy["discovery_method"]), ("reject", "n", "treewalk"))
        self.assertNotIn("pct", report.policy)
        code, out, _ = self.cli(self.file("bis.xml", DMARCBIS))
        self.assertEqual(code, 0)
        self.assertIn("2001:db8::25: 3 messages, dmarc=pass", out)
        self.assertIn("p=reject already applies", out)

    def test_all_three_together_per_domain(self) -> None:
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        self.deliver(message((gzip.compress(MICROSOFT), "application/gzip", "m.xml.gz")))
        self.deliver(message((gzip.compress(YAHOO), "application/gzip", "y.xml.gz")))
        code, data, _ = self.summary()
        self.assertEqual(code, 0)
        (domain,) = data["domains"]
        self.assertEqual(domain["reporters"], ["Outlook.com", "Yahoo", "google.com"])
        self.assertEqual((domain["messages"], domain["pass"], domain["fail"]), (46, 30, 16))
        self.assertEqual([s["ip"] for s in domain["sources"]],
                         ["192.0.2.10", "203.0.113.5", "198.51.100.7"])

    def test_same_report_twice_counts_once(self) -> None:
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        _, data, _ = self.summary()
        self.assertEqual(data["domains"][0]["messages"], 30)

    def test_since_keeps_recent_reports(self) -> None:
        now = int(time.time())
        self.deliver(message((zipped("old.xml", google(begin=now - 30 * 86400, report_id="old")),
                              "application/zip", "old.zip")))
        self.deliver(message((zipped("new.xml", google(begin=now - 86400, report_id="new")),
                              "application/zip", "new.zip")))
        _, everything, _ = self.summary()
        _, recent, _ = self.summary("--since", "7d")
        self.assertEqual(everything["domains"][0]["reports"], 2)
        self.assertEqual(recent["domains"][0]["reports"], 1)

    def test_a_bad_since_is_a_usage_error(self) -> None:
        code, _, err = self.cli("--since", "lately", self.file("g.xml", google()))
        self.assertEqual(code, 2)
        self.assertIn("is not a duration", err)

    def test_tls_report(self) -> None:
        self.deliver(message((gzip.compress(TLS), "application/tlsrpt+gzip",
                              "company-x.test!example.test!1764547200!1764633599!001.json.gz")))
        code, out, err = self.cli()
        self.assertEqual((code, err), (0, ""))
        self.assertIn("example.test: 1 TLS report from Company-X (sts)", out)
        self.assertIn("5326 sessions succeeded, 303 failed", out)
        self.assertIn("200 starttls-not-supported at mx.example.test: the MX offered no"
                      " STARTTLS", out)
        self.assertIn("100 certificate-expired at mx.example.test: renew the certificate", out)
        self.assertIn("3 validation-failure", out)


class ForeignDomainTests(ReportsTestCase):
    def test_a_domain_not_ours_is_named_and_left_out(self) -> None:
        bad = record("203.0.113.66", 9, dkim="fail", spf="fail", header_from="other.test")
        path = self.file("other.xml", google("other.test", bad, report_id="other-1"))
        code, out, _ = self.cli(path, self.file("ours.xml", google()))
        self.assertEqual(code, 0)
        self.assertIn("other.test: 1 DMARC report from google.com", out)
        self.assertIn("not one of our domains: left out", out)
        self.assertNotIn("203.0.113.66", out)
        self.assertIn("all 30 messages from 1 source pass DMARC", out)

    def test_a_subdomain_of_ours_is_ours(self) -> None:
        bad = record("203.0.113.9", 2, dkim="fail", spf="fail", header_from="news.example.test")
        code, out, _ = self.cli(self.file("sub.xml", google("News.Example.Test.", bad)))
        self.assertEqual(code, 0)
        self.assertIn("news.example.test: 1 DMARC report", out)
        self.assertIn("203.0.113.9 2 messages, spf=none dkim=none: likely forgery", out)

    def test_a_unicode_domain_matches_its_a_labels(self) -> None:
        config = write_config(self.directory / "idn", {"domains": {"bücher.test": {
            "mailboxes": ["alice"], "aliases": {"postmaster": "alice"}}}})
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-c", str(config), "reports", "--no-dns",
                         self.file("idn.xml", google("bücher.test"))])
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertIn("xn--bcher-kva.test: 1 DMARC report", out.getvalue())
        self.assertIn("safe to move to p=reject", out.getvalue())

    def test_domain_option_shows_it(self) -> None:
        bad = record("203.0.113.66", 9, dkim="fail", spf="fail", header_from="other.test")
        code, out, _ = self.cli("--domain", "other.test", self.file("o.xml", google("other.test", bad, report_id="o-1")),
                                self.file("ours.xml", google()))
        self.assertEqual(code, 0)
        self.assertIn("203.0.113.66: 9 messages, dmarc=fail", out)
        self.assertNotIn("192.0.2.10", out)


class HostileReportTests(ReportsTestCase):
    def assertRefused(self, path: str, reason: str, code_out: tuple[int, str, str]) -> None:
        code, out, err = code_out
        self.assertEqual(code, 1)
        self.assertIn(f"mailxctl reports: {path}: ", err)
        self.assertIn(reason, err)
        # The other report is still summarized.
        self.assertIn("all 30 messages from 1 source pass DMARC", out)

    def test_malformed_xml_is_an_error_line_and_the_rest_is_summarized(self) -> None:
        bad = self.file("bad.xml", google()[:-40])
        good = self.file("good.xml", google())
        self.assertRefused(bad, "malformed XML", self.cli(bad, good))

    def test_xxe_is_refused_without_reading_the_file(self) -> None:
        secret = self.directory / "secret"
        secret.write_text("TOPSECRET-42")
        xxe = (f'<?xml version="1.0"?>\n<!DOCTYPE feedback [<!ENTITY x SYSTEM "file://{secret}">]>'
               "\n<feedback><report_metadata><org_name>&x;</org_name></report_metadata>"
               "</feedback>").encode()
        bad = self.file("xxe.xml", xxe)
        code, out, err = self.cli(bad, self.file("good.xml", google()))
        self.assertRefused(bad, "DTD", (code, out, err))
        self.assertNotIn("TOPSECRET", out + err)

    def test_external_dtd_is_refused(self) -> None:
        xxe = b'<?xml version="1.0"?>\n<!DOCTYPE feedback SYSTEM "file:///etc/passwd">\n<feedback/>'
        bad = self.file("dtd.xml", xxe)
        self.assertRefused(bad, "DTD", self.cli(bad, self.file("good.xml", google())))

    def test_billion_laughs_is_refused(self) -> None:
        entities = '<!ENTITY lol "lol">' + "".join(
            f'<!ENTITY lol{i} "{"&lol%s;" % (i - 1 if i > 1 else "") * 10}">' for i in range(1, 10)
        )
        bomb = (f'<?xml version="1.0"?>\n<!DOCTYPE feedback [{entities}]>\n'
                "<feedback>&lol9;</feedback>").encode()
        bad = self.file("laughs.xml", gzip.compress(bomb))
        started = time.monotonic()
        self.assertRefused(bad, "DTD", self.cli(bad, self.file("good.xml", google())))
        self.assertLess(time.monotonic() - started, 10)

    def _peak_growth(self, call) -> tuple[tuple[int, str, str], int]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = call()
        return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024

    def test_gigabyte_gzip_bomb_is_refused_quickly_in_bounded_memory(self) -> None:
        bomb = gzip_bomb()
        self.assertLess(len(bomb), 2 * 1024 * 1024)
        bad = self.file("bomb.xml.gz", bomb)
        started = time.monotonic()
        result, growth = self._peak_growth(lambda: self.cli(bad, self.file("g.xml", google())))
        self.assertRefused(bad, "gzip: decompresses to more than", result)
        self.assertLess(time.monotonic() - started, 20)
        self.assertLess(growth, 256 * 1024 * 1024)

    def test_gigabyte_zip_bomb_declaring_its_size_is_refused_unread(self) -> None:
        bomb = message((zip_bomb(), "application/zip", "bomb.zip"))
        bad = str(self.deliver(bomb))
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        started = time.monotonic()
        self.assertRefused(bad, "declares 1073741824 bytes", self.cli())
        self.assertLess(time.monotonic() - started, 10)

    def test_gigabyte_zip_bomb_lying_about_its_size_is_refused_in_bounded_memory(self) -> None:
        bad = self.file("liar.zip", zip_bomb(declared=1000))
        started = time.monotonic()
        result, growth = self._peak_growth(lambda: self.cli(bad, self.file("g.xml", google())))
        self.assertRefused(bad, "zip:", result)
        self.assertLess(time.monotonic() - started, 20)
        self.assertLess(growth, 256 * 1024 * 1024)

    def test_streaming_cap_holds_when_the_declared_size_is_not_checked(self) -> None:
        """The second line of defence on its own: a lying size, read through the cap."""
        with self.assertRaises(reports.ReportError) as caught:
            reports.unzip(zipped("big.xml", bytes(4 << 20)), limit=1 << 20)
        self.assertIn("declares", str(caught.exception))
        archive = zipped("big.xml", bytes(4 << 20))
        # Declare 100 bytes in both headers: zipfile then stops at 100 bytes
        # and the CRC does not match.
        liar = archive.replace(struct.pack("<I", 4 << 20), struct.pack("<I", 100))
        with self.assertRaises(reports.ReportError):
            reports.unzip(liar, limit=1 << 20)

    def test_an_archive_inside_an_archive_is_not_opened(self) -> None:
        bad = self.file("nested.zip", zipped("inner.xml.gz", gzip.compress(google())))
        self.assertRefused(bad, "an archive inside an archive is not opened",
                           self.cli(bad, self.file("g.xml", google())))

    def test_too_many_zip_entries(self) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for i in range(reports.MAX_ZIP_ENTRIES + 1):
                archive.writestr(f"{i}.xml", google())
        bad = self.file("many.zip", buffer.getvalue())
        self.assertRefused(bad, "entries, at most", self.cli(bad, self.file("g.xml", google())))

    def test_a_file_over_the_bound_is_not_parsed(self) -> None:
        self.patch(reports, "MAX_FILE", 4096)
        bad = self.file("huge.eml", b"Subject: x\n\n" + b"a" * 5000)
        self.assertRefused(bad, "larger than 4096 bytes, not read",
                           self.cli(bad, self.file("g.xml", google())))

    def test_a_missing_file_is_an_error_line(self) -> None:
        missing = str(self.directory / "nothing.xml")
        self.assertRefused(missing, "no such file", self.cli(missing, self.file("g.xml", google())))

    def test_an_email_without_a_report(self) -> None:
        bad = str(self.deliver(message()))
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        self.assertRefused(bad, "no DMARC or TLS report attached", self.cli())

    def test_deeply_nested_json_is_an_error(self) -> None:
        bad = self.file("deep.json", b'{"policies": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
        self.assertRefused(bad, "malformed JSON", self.cli(bad, self.file("g.xml", google())))

    def test_a_bad_count_is_an_error(self) -> None:
        bad_row = record("192.0.2.1", 1, dkim="pass", spf="pass").replace(
            "<count>1</count>", "<count>lots</count>")
        bad = self.file("count.xml", google("example.test", bad_row))
        self.assertRefused(bad, "row/count is not a number",
                           self.cli(bad, self.file("g.xml", google())))

    def test_too_many_records(self) -> None:
        self.patch(reports, "MAX_RECORDS", 5)
        rows = [record(f"192.0.2.{i}", 1, dkim="pass", spf="pass") for i in range(6)]
        bad = self.file("rows.xml", google("example.test", *rows, report_id="rows"))
        self.assertRefused(bad, "more than 5 records", self.cli(bad, self.file("g.xml", google())))

    def test_a_record_with_too_many_elements_is_refused_as_it_grows(self) -> None:
        auth = "<dkim><domain>x.test</domain><result>fail</result></dkim>" * 400
        row = record("192.0.2.1", 1, dkim="fail", spf="fail", auth=auth)
        bad = self.file("wide.xml", google("example.test", row, report_id="wide"))
        self.assertRefused(bad, "over 1000 elements", self.cli(bad, self.file("g.xml", google())))

    def test_many_records_are_read_one_at_a_time(self) -> None:
        """5,000 rows: each becomes a Record and leaves the tree."""
        rows = "".join(record(f"198.51.{i // 250}.{i % 250}", 1, dkim="pass", spf="pass")
                       for i in range(5_000))
        report = reports.parse_aggregate(google("example.test", rows))
        self.assertEqual(len(report.records), 5_000)

    def test_terminal_escapes_in_a_report_are_shown_escaped(self) -> None:
        # XML 1.0 forbids C0 controls even as character references; C1 and
        # bidi controls are allowed, and would reach the terminal.
        report = google().replace(b"<org_name>google.com", "<org_name>evil\u202egoogle".encode())
        code, out, _ = self.cli(self.file("e.xml", report))
        self.assertEqual(code, 0)
        self.assertIn("evil\\u202egoogle", out)
        self.assertNotIn("\u202e", out)


class DefaultMaildirTests(ReportsTestCase):
    def test_no_reports_address_is_explained(self) -> None:
        config = write_config(self.directory / "other", {})
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-c", str(config), "reports"])
        self.assertEqual(code, 1)
        self.assertIn("no reports: address in the configuration", err.getvalue())

    def test_paths_without_a_configuration(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "MAILX_CONFIG"})
        self.assertFalse(os.path.exists("mailx.yaml"))
        path = self.file("g.xml", google("anything.test"))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["reports", "--no-dns", path])
        self.assertEqual(code, 0)
        self.assertIn("anything.test", out.getvalue())
        self.assertIn("safe to move to p=reject", out.getvalue())

    def test_tmp_is_not_read(self) -> None:
        (self.maildir / "tmp" / "partial").write_bytes(b"half a message")
        self.deliver(message((zipped("g.xml", google()), "application/zip", "g.zip")))
        code, _, err = self.cli()
        self.assertEqual((code, err), (0, ""))


class DeliveredReportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_report_mailed_to_the_server_is_summarized_from_its_maildir(self) -> None:
        """The whole path: a receiver mails its report over SMTP, mailx files it,
        and ``mailxctl reports`` with the server's own configuration finds it."""
        server = start_server(self, {
            "reports": "dmarc@example.test",
            "domains": {"example.test": {"mailboxes": ["alice", "bob", "dmarc"]}},
        })
        report = message((zipped("g.xml", google()), "application/zip", "g.zip"))
        refused = yield send_mail(server.port, "noreply-dmarc-support@google.test",
                                  ["dmarc@example.test"], report.replace(b"\n", b"\r\n"))
        self.assertEqual(refused, {})
        config = server.config.paths.mail.parent / "mailx.yaml"
        self.assertTrue(config.exists())

        def run() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["-c", str(config), "reports", "--no-dns"])
            return code, out.getvalue(), err.getvalue()

        code, out, err = yield deferToThread(run)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("192.0.2.10: 30 messages, dmarc=pass", out)


class PTRTests(ReportsTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.dns = serve_for_test(self, {
            "5.113.0.203.in-addr.arpa": {"PTR": ["mail.example.net"]},
        })
        self.dns.timeout("7.100.51.198.in-addr.arpa")
        self.config = write_config(self.directory, {
            "reports": "dmarc@example.test",
            "domains": {"example.test": {"mailboxes": ["alice", "bob", "dmarc"]}},
            "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "1s"},
        })

    @defer.inlineCallbacks
    def test_failing_sources_are_named_by_ptr_and_a_silent_server_is_bounded(self) -> None:
        self.deliver(message((gzip.compress(YAHOO), "application/gzip", "y.xml.gz")))
        self.deliver(message((gzip.compress(MICROSOFT), "application/gzip", "m.xml.gz")))

        def run() -> tuple[int, str, str, float]:
            out, err = io.StringIO(), io.StringIO()
            started = time.monotonic()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["-c", str(self.config), "reports"])
            return code, out.getvalue(), err.getvalue(), time.monotonic() - started

        code, out, err, took = yield deferToThread(run)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("203.0.113.5 (mail.example.net) 12 messages, spf=fail dkim=none", out)
        self.assertIn("198.51.100.7 4 messages", out)  # timed out: no name, no wait
        self.assertLess(took, 15)
        self.assertIn(("5.113.0.203.in-addr.arpa", "PTR"), self.dns.queries)

