# -*- test-case-name: tests.test_text -*-
"""mailx.text: no stranger's text reaches a terminal as control characters."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEvent
from twisted.trial import unittest

from mailx.text import Logger, printable, printable_lines, safe_json

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # writes "echo pwned" to the clipboard


class PrintableTests(unittest.TestCase):
    def test_osc_52_is_escaped(self) -> None:
        self.assertEqual(printable(f"hi{OSC52}"), "hi\\x1b]52;c;ZWNobyBwd25lZA==\\x07")

    def test_c1_controls_are_escaped(self) -> None:
        # U+009B is CSI and U+009D OSC to a terminal in 8-bit mode.
        self.assertEqual(printable("a\x9b31mb\x9d0;x\x9c"), "a\\x9b31mb\\x9d0;x\\x9c")

    def test_line_breaks_and_del_are_escaped(self) -> None:
        self.assertEqual(printable("a\r\nb\x7f\u2028c"), "a\\x0d\\x0ab\\x7f\\u2028c")

    def test_bidi_overrides_are_escaped(self) -> None:
        self.assertEqual(printable("evil\u202eelpmaxe.test"), "evil\\u202eelpmaxe.test")
        self.assertEqual(printable("\u2066x\u2069\u200f"), "\\u2066x\\u2069\\u200f")

    def test_undecodable_bytes_show_as_themselves(self) -> None:
        text = b"caf\xe9".decode("utf-8", "surrogateescape")
        self.assertEqual(printable(text), "caf\\xe9")

    def test_ordinary_unicode_is_kept(self) -> None:
        for text in ("bücher.example", "Grüße aus Köln", "日本語", "a\\b", "→"):
            self.assertEqual(printable(text), text)

    def test_lines_keep_line_feeds_and_tabs(self) -> None:
        self.assertEqual(printable_lines(f"a\n\tb{OSC52}\r"), "a\n\tb\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x0d")

    @given(st.text())
    def test_output_has_no_unsafe_character(self, text: str) -> None:
        out = printable(text)
        self.assertFalse(any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out))
        self.assertFalse(any(0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 for c in out))


class SafeJSONTests(unittest.TestCase):
    def test_same_data_no_raw_controls(self) -> None:
        data = {"reply": f"550 {OSC52} \x9b2J \u202e", "name": "bücher"}
        text = safe_json(data)
        self.assertEqual(json.loads(text), data)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x9b", text)
        self.assertNotIn("\u202e", text)
        self.assertIn("bücher", text)

    def test_undecodable_bytes_survive(self) -> None:
        data = {"h": b"caf\xe9".decode("utf-8", "surrogateescape")}
        self.assertEqual(json.loads(safe_json(data)), data)
        safe_json(data).encode("utf-8")  # printable on a UTF-8 terminal


class LoggerTests(unittest.TestCase):
    def test_text_fields_are_escaped_before_any_observer(self) -> None:
        events: list[dict] = []
        log = Logger(namespace="test", observer=events.append)
        log.info("{qid}: remote said {reply} ({raw})", qid="Q1", reply=f"250 ok{OSC52}\r\nfake", raw=b"\x1b[2J")
        self.assertEqual(
            formatEvent(events[0]),
            "Q1: remote said 250 ok\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x0d\\x0afake (\\x1b[2J)",
        )

    def test_other_fields_are_left_alone(self) -> None:
        events: list[dict] = []
        log = Logger(namespace="test", observer=events.append)
        log.info("{n} {f}", n=3, f=1.5)
        self.assertEqual(formatEvent(events[0]), "3 1.5")
