# -*- test-case-name: tests.test_jsonlog -*-
"""``logging.format: json``: every line a JSON object, one per event (SPEC section 13)."""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
from pathlib import Path

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailx.observe.jsonlog import event_as_line
from mailx.testing.server import TWISTD, ServerProcess, free_port, message, write_config


def events_of(logger_call: callable) -> list[dict]:  # type: ignore[valid-type]
    captured: list[dict] = []
    logger = Logger(namespace="mailx.test", observer=captured.append)
    logger_call(logger)
    return captured


class EventAsLineTests(unittest.TestCase):
    def test_flat_object_with_the_text_and_the_fields(self) -> None:
        [event] = events_of(
            lambda log: log.info("{qid}: to=<{rcpt}> accepted", qid="Q1", rcpt="a@b")
        )
        line = event_as_line(event)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["msg"], "Q1: to=<a@b> accepted")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["system"], "mailx.test")
        self.assertEqual((record["qid"], record["rcpt"]), ("Q1", "a@b"))
        self.assertTrue(record["time"].endswith("Z"))
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_a_traceback_is_one_error_field_on_one_line(self) -> None:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            failure = Failure()
        [event] = events_of(lambda log: log.failure("{qid}: delivery failed", failure, qid="Q2"))
        line = event_as_line(event)
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["error"])
        self.assertIn("Traceback", record["error"])

    def test_line_breaks_and_escapes_in_fields_stay_inside_the_line(self) -> None:
        hostile = "evil\r\nforged line\u2028\u202e\x1b]52;c;x\x07\x85"
        [event] = events_of(lambda log: log.info("helo={helo}", helo=hostile))
        line = event_as_line(event)
        self.assertEqual(line.splitlines(), [line.rstrip("\n")])
        self.assertEqual(json.loads(line)["helo"], hostile)
        for raw in ("\x1b", "\u2028", "\u202e", "\x85", "\r"):
            self.assertNotIn(raw, line)

    def test_field_named_like_a_core_key_is_kept_beside_it(self) -> None:
        [event] = events_of(lambda log: log.warn("{msg}", msg="hello", error=3))
        record = json.loads(event_as_line(event))
        self.assertEqual((record["msg"], record["msg_"], record["error_"]), ("hello", "hello", 3))
        self.assertEqual(record["level"], LogLevel.warn.name)


class TwistdJSONLogTests(unittest.TestCase):
    timeout = 90

    def test_every_line_of_a_running_server_is_json(self) -> None:
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        config = write_config(
            directory,
            {
                "listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]},
                "logging": {"format": "json"},
            },
        )
        server = ServerProcess(config, port)
        server.start()
        self.addCleanup(server.kill)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("someone@sender.test")
            self.assertEqual(client.rcpt("nobody@example.test")[0], 550)
            self.assertEqual(client.rcpt("alice@example.test")[0], 250)
            code, reply = client.data(message("json"))
            self.assertEqual(code, 250)
        qid = reply.split()[-1].decode()
        server.terminate()  # SIGTERM: a graceful stop, logged too
        lines = server.log_path.read_text().splitlines()
        self.assertTrue(lines)
        records = [json.loads(line) for line in lines]  # each line one object
        for record in records:
            self.assertLessEqual({"time", "level", "system", "msg"}, set(record))
        ours = [r for r in records if r.get("qid") == qid]
        self.assertIn(("rcpt", "accepted"), [(r.get("event"), r.get("result")) for r in ours])
        [accepted] = [r for r in ours if r.get("event") == "message"]
        self.assertEqual(accepted["result"], "accepted")
        self.assertTrue(accepted["msg"].startswith(f"{qid}: accepted size="))
        refused = [r for r in records if r.get("event") == "rcpt" and r.get("result") == "refused"]
        self.assertEqual([r["code"] for r in refused], ["5.1.1"])
        self.assertTrue(any(r["msg"].startswith("mailx ready") for r in records))

    def test_port_in_use_is_still_one_line(self) -> None:
        busy = socket.socket()
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        listen = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        directory = Path(self.mktemp()).absolute()
        config = write_config(
            directory, {"listen": {"smtp": [listen]}, "logging": {"format": "json"}}
        )
        result = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "mailx", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=directory,
            timeout=60,
        )
        output = (result.stdout + result.stderr).strip()
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertEqual(len(output.splitlines()), 1, output)
        self.assertIn(f"cannot listen on {listen}: address already in use", output)
