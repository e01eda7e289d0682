# -*- test-case-name: tests.test_metrics -*-
"""GET /metrics after known traffic: every count exact (SPEC section 13).

A running server with SPF/DKIM/DMARC on, the loopback DNS server, and an
SMTP sink as the outside world's MX; messages with known outcomes
(accepted, refused at RCPT, refused under DMARC p=reject, tempfail on a DNS
timeout, forwarded and answered 250, 451, 550), then one scrape over HTTP,
parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import re
import smtplib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from mailx.observe import metrics
from mailx.testing import SRS_SECRET
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import LineClient, dialogue, in_thread, merge, message, start_server
from mailx.testing.sink import start_sink
from mailx.testing.tls import make_certificate
from tests.test_forwarding import wait_until
from tests.test_tls import client_context

ZONES = {
    # SPF passes for 203.0.113.0/24, DMARC p=reject; bounces go to the sink.
    "good.test": {
        "TXT": ["v=spf1 ip4:203.0.113.0/24 -all"],
        "MX": [(10, "mx.outside.test")],
    },
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    "bank.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    "slow.test": {"TXT": ["v=spf1 -all"]},
    "outside.test": {"MX": [(10, "mx.outside.test")]},
    "mx.outside.test": {"A": ["127.0.0.1"]},
}
CLIENT = "203.0.113.5"


def scrape(port: int) -> defer.Deferred:
    """GET /metrics over HTTP (in a thread): the content type and the samples."""

    def get() -> tuple[str, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.headers["Content-Type"], metrics.samples(response.read().decode())

    return in_thread(get)


def transaction(mail_from: str, rcpt: str, author: str, subject: str) -> list[bytes]:
    body = (
        f"From: {author}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@x.test>\r\n\r\nHello.\r\n."
    ).encode()
    return [
        b"EHLO client.test",
        b"MAIL FROM:<" + mail_from.encode() + b">",
        b"RCPT TO:<" + rcpt.encode() + b">",
        b"DATA",
        body,
        b"QUIT",
    ]


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsAfterKnownTrafficTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dns = serve_for_test(self, ZONES)
        self.dns.timeout("_dmarc.slow.test")
        self.sink = start_sink()
        self.addCleanup(self.sink.stop)
        self.server = start_server(
            self,
            {
                "listen": {
                    "smtp": ["haproxy:tcp:0:interface=127.0.0.1"],
                    "metrics": ["tcp:0:interface=127.0.0.1"],
                },
                "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "1s"},
                "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
                "domains": {
                    "example.test": {
                        "mailboxes": ["alice", "bob"],
                        "aliases": {"postmaster": "alice", "boss": "someone@outside.test"},
                    }
                },
                "outbound": {
                    "srs_secret": [SRS_SECRET],
                    "port": self.sink.port,
                    "retry": ["1s"],
                    "queue_lifetime": "1h",
                    "delay_warning": None,
                },
            },
        )
        self.metrics_port = self.server.service.metrics_ports[0].getHost().port

    def send(self, script: list[bytes]) -> defer.Deferred:
        return in_thread(dialogue, self.server.port, script, CLIENT)

    def good(self, rcpt: str, subject: str) -> list[bytes]:
        return transaction("news@good.test", rcpt, "news@good.test", subject)

    @defer.inlineCallbacks
    def test_counts_are_exact_after_known_traffic(self) -> None:
        out = self.server.service.outbound
        # 1. Accepted into alice's Maildir.
        replies = yield self.send(self.good("alice@example.test", "one"))
        self.assertEqual(replies[5][0], 250)
        # 2. Refused at RCPT: no such mailbox.
        replies = yield self.send(
            [b"EHLO client.test", b"MAIL FROM:<news@good.test>", b"RCPT TO:<nobody@example.test>"]
        )
        self.assertEqual(replies[3][0], 550)
        # 3. Refused at the end of DATA: DMARC p=reject, SPF fails.
        replies = yield self.send(
            transaction("ceo@bank.test", "alice@example.test", "ceo@bank.test", "three")
        )
        self.assertEqual(replies[5][0], 550)
        # 4. Tempfail: the DMARC lookup times out.
        replies = yield self.send(
            transaction("x@slow.test", "alice@example.test", "x@slow.test", "four")
        )
        self.assertEqual(replies[5][0], 451)
        # 5. Forwarded, the sink answers 250.
        replies = yield self.send(self.good("boss@example.test", "five"))
        self.assertEqual(replies[5][0], 250)
        yield self.sink.wait_for(1)
        yield wait_until(lambda: not out.queued())
        # 6. Forwarded, 451 at RCPT, then delivered on the retry.
        self.sink.script("rcpt", "451 4.2.0 try again later")
        replies = yield self.send(self.good("boss@example.test", "six"))
        self.assertEqual(replies[5][0], 250)
        yield self.sink.wait_for(2)
        yield wait_until(lambda: not out.queued())
        # 7. Forwarded, 550 at RCPT: bounced, the notice goes to good.test's MX (the sink).
        self.sink.script("rcpt", "550 5.1.1 no such user")
        replies = yield self.send(self.good("boss@example.test", "seven"))
        self.assertEqual(replies[5][0], 250)
        yield self.sink.wait_for(3)
        yield wait_until(lambda: not out.queued())

        content_type, found = yield scrape(self.metrics_port)
        self.assertTrue(content_type.startswith("text/plain"), content_type)
        expected = {
            ("mailx_smtp_sessions_total", ()): 7,
            ("mailx_recipients_total", (("result", "accepted"),)): 6,
            ("mailx_recipients_total", (("result", "refused"),)): 1,
            ("mailx_recipients_total", (("result", "tempfail"),)): 0,
            ("mailx_messages_received_total", (("result", "accepted"),)): 4,
            ("mailx_messages_received_total", (("result", "refused"),)): 1,
            ("mailx_messages_received_total", (("result", "tempfail"),)): 1,
            ("mailx_refusals_total", (("code", "5.1.1"), ("stage", "rcpt"))): 1,
            ("mailx_refusals_total", (("code", "5.7.1"), ("stage", "data"))): 1,
            ("mailx_deliveries_total", (("kind", "maildir"), ("result", "delivered"))): 1,
            ("mailx_deliveries_total", (("kind", "forward"), ("result", "delivered"))): 2,
            ("mailx_deliveries_total", (("kind", "forward"), ("result", "deferred"))): 1,
            ("mailx_deliveries_total", (("kind", "forward"), ("result", "bounced"))): 1,
            ("mailx_deliveries_total", (("kind", "dsn"), ("result", "delivered"))): 1,
            ("mailx_deliveries_total", (("kind", "dsn"), ("result", "bounced"))): 0,
            ("mailx_queue_messages", ()): 0,
            ("mailx_filing_seconds_count", ()): 4,
            ("mailx_auth_checks_total", (("method", "spf"), ("result", "pass"))): 4,
            ("mailx_auth_checks_total", (("method", "dkim"), ("result", "none"))): 6,
            ("mailx_auth_checks_total", (("method", "dmarc"), ("result", "pass"))): 4,
            ("mailx_auth_checks_total", (("method", "dmarc"), ("result", "fail"))): 1,
        }
        got = {key: found.get(key, 0.0) for key in expected}
        self.assertEqual(got, expected)
        # The tempfailed message's SPF failed; its DMARC lookup erred.
        self.assertEqual(value(found, "mailx_auth_checks_total", method="spf", result="fail"), 2)
        self.assertEqual(value(found, "mailx_delivery_seconds_count", kind="forward"), 3)
        # The DMARC lookup that timed out; every filing of the one engine's
        # batches: the four accepted messages and the bounce (one engine since
        # issue 11; before, only the three forwards' group commits were counted).
        self.assertEqual(value(found, "mailx_dns_failures_total", type="TXT", error="timeout"), 1)
        self.assertEqual(value(found, "mailx_filing_batch_messages_sum"), 5)
        self.assertGreater(value(found, "mailx_dns_lookup_seconds_count", type="MX"), 0)
        # No _created series: noise in the text format.
        self.assertFalse([k for k in found if k[0].endswith("_created")])


class MetricsOffTests(unittest.TestCase):
    def test_no_listener_by_default(self) -> None:
        server = start_server(self)
        self.assertEqual(server.service.metrics_ports, [])
        self.assertEqual(server.config.metrics_listen, ())


DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"


class DashboardTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_metric_in_the_dashboard_is_exported(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [
            target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
        ]
        self.assertTrue(exprs)
        named = {name for expr in exprs for name in re.findall(r"\bmailx_[a-z_]+", expr)}
        server = start_server(self, {"listen": {"metrics": ["tcp:0:interface=127.0.0.1"]}})
        port = server.service.metrics_ports[0].getHost().port
        text = yield in_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
                .read()
                .decode()
            )
        )
        # Families (with or without samples yet) and their samples' names.
        exported = set(re.findall(r"^# TYPE (\S+)", text, re.M))
        for name in re.findall(r"^# TYPE (\S+) histogram", text, re.M):
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
        exported |= set(re.findall(r"^(mailx_[a-z_]+)", text, re.M))
        self.assertEqual(named - exported, set())


class SessionMetricsTests(unittest.TestCase):
    """TLS versions, connection-limit refusals and 452 at RCPT, each counted once."""

    def start(self, overrides: dict) -> Any:
        base = {"listen": {"metrics": ["tcp:0:interface=127.0.0.1"]}}
        server = start_server(self, merge(base, overrides))
        return server, server.service.metrics_ports[0].getHost().port

    @defer.inlineCallbacks
    def test_tls_version_is_counted(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()).absolute())
        server, port = self.start({"tls": {"certificate": str(cert), "key": str(key)}})

        def run() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.starttls(context=client_context())
                client.sendmail("s@sender.test", ["alice@example.test"], message("tls"))

        yield in_thread(run)
        _, found = yield scrape(port)
        versions = {
            dict(k[1])["version"]: v for k, v in found.items() if k[0] == "mailx_tls_sessions_total"
        }
        self.assertEqual(sum(versions.values()), 1)
        self.assertIn(next(iter(versions)), ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_refused_connections_and_too_many_recipients(self) -> None:
        server, port = self.start({"limits": {"connections_per_ip": 1, "recipients": 1}})
        first = yield in_thread(LineClient, server.port)
        self.addCleanup(first.close)
        yield in_thread(first.reply)
        replies = yield in_thread(dialogue, server.port, [])
        self.assertEqual(replies[0][0], 421)
        script = [b"EHLO c.test", b"MAIL FROM:<s@sender.test>"]
        for line in script + [b"RCPT TO:<alice@example.test>", b"RCPT TO:<bob@example.test>"]:
            reply = yield in_thread(first.command, line)
        self.assertEqual(reply[0], 452)
        _, found = yield scrape(port)
        self.assertEqual(
            value(found, "mailx_smtp_connections_refused_total", reason="connections_per_ip"), 1
        )
        self.assertEqual(value(found, "mailx_smtp_sessions_total"), 1)
        self.assertEqual(value(found, "mailx_recipients_total", result="tempfail"), 1)
        self.assertEqual(value(found, "mailx_recipients_total", result="accepted"), 1)
        self.assertEqual(value(found, "mailx_refusals_total", stage="rcpt", code="4.5.3"), 1)

    @defer.inlineCallbacks
    def test_only_metrics_is_served(self) -> None:
        _, port = self.start({})

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        self.assertEqual((yield in_thread(get, "/")), 404)
        self.assertEqual((yield in_thread(get, "/metrics")), 200)


class ConfigTests(unittest.TestCase):
    def load(self, overrides: dict) -> Any:
        from mailx.config import load_config
        from mailx.testing.server import write_config

        return load_config(write_config(Path(self.mktemp()).absolute(), overrides))

    def problems(self, overrides: dict) -> list[str]:
        from mailx.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.load(overrides)
        return [str(p) for p in caught.exception.problems]

    def test_defaults(self) -> None:
        config = self.load({})
        self.assertEqual((config.metrics_listen, config.log_format), ((), "text"))

    def test_given(self) -> None:
        config = self.load(
            {"listen": {"metrics": "tcp:9325:interface=127.0.0.1"}, "logging": {"format": "json"}}
        )
        self.assertEqual(config.metrics_listen, ("tcp:9325:interface=127.0.0.1",))
        self.assertEqual(config.log_format, "json")

    def test_unknown_format_is_one_problem(self) -> None:
        [problem] = self.problems({"logging": {"format": "xml"}})
        self.assertIn("logging.format: must be one of text, json, got", problem)

    def test_bad_endpoint_is_one_problem(self) -> None:
        [problem] = self.problems({"listen": {"metrics": ["nonsense:1"]}})
        self.assertIn("listen.metrics[0]", problem)


class MetricsPortInUseTests(unittest.TestCase):
    def test_start_up_stops_with_one_line_naming_listen_metrics(self) -> None:
        import socket
        import subprocess

        from mailx.testing.server import TWISTD, free_port, write_config

        busy = socket.socket()
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        metrics = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        directory = Path(self.mktemp()).absolute()
        smtp = f"tcp:{free_port()}:interface=127.0.0.1"
        config = write_config(directory, {"listen": {"smtp": [smtp], "metrics": [metrics]}})
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=directory,
            timeout=60,
        )
        output = (result.stdout + result.stderr).strip()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(len(output.splitlines()), 1, output)
        self.assertIn(f"cannot listen on {metrics}: address already in use", output)
        self.assertIn("change listen.metrics", output)
