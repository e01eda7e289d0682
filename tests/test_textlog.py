"""mailx.observe.textlog: twistd's text log lines, the timestamp formatted once a second."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEventAsClassicLogText, formatTime, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailx.observe.textlog import classic_line, text_observer
from mailx.service import _log_observer

BASE = 1796221662.25


def events() -> list[dict]:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    common = {"log_namespace": "mailx.delivery", "log_level": LogLevel.info}
    return [
        {**common, "log_format": "{qid}: accepted size={size}", "qid": "6B1", "size": 1024,
         "log_time": BASE},
        {**common, "log_format": "{qid}: to=<{rcpt}>", "qid": "6B1", "rcpt": "élan@example.test",
         "log_time": BASE + 0.5},
        {**common, "log_format": "next second", "log_time": BASE + 1.0},
        {**common, "log_format": "no time at all"},
        {**common, "log_format": "an hour later", "log_time": BASE + 3600.75,
         "log_system": "SMTP,3,127.0.0.1"},
        {**common, "log_format": "before 1970", "log_time": -0.5},
        {**common, "log_level": LogLevel.error, "log_format": "{qid}: delivery failed",
         "qid": "6B2", "log_failure": failure, "log_time": BASE + 2},
        {**common, "log_format": "{missing} field", "log_time": BASE + 2},
        {**common, "log_format": None, "log_time": BASE + 2},
    ]


class TextObserverTests(unittest.TestCase):
    def test_the_lines_are_twisteds_byte_for_byte(self) -> None:
        ours, twisteds = io.StringIO(), io.StringIO()
        observe_ours, observe_twisteds = text_observer(ours), textFileLogObserver(twisteds)
        for event in events():
            observe_ours(dict(event))
            observe_twisteds(dict(event))
        self.assertEqual(ours.getvalue(), twisteds.getvalue())
        self.assertIn("ZeroDivisionError", ours.getvalue())
        self.assertIn("élan@example.test", ours.getvalue())
        self.assertIn("\n- [mailx.delivery#info] no time at all\n", ours.getvalue())

    def test_a_new_second_gets_its_own_stamp(self) -> None:
        out = io.StringIO()
        observe = text_observer(out)
        for offset in (0.0, 0.7, 1.1, 61.0):
            observe({"log_format": "x", "log_namespace": "n", "log_level": LogLevel.info,
                     "log_time": BASE + offset})
        stamps = [line.split(" ", 1)[0] for line in out.getvalue().splitlines()]
        expected = [formatTime(BASE + offset) for offset in (0.0, 0.7, 1.1, 61.0)]
        self.assertEqual(stamps, expected)
        self.assertEqual(len(set(stamps)), 3)


class ObserverChoiceTests(unittest.TestCase):
    """What makeService gives twistd (the application's ILogObserver component)."""

    class Options(dict):
        def __init__(self, **parent: object) -> None:
            super().__init__()
            self.parent = parent

    def test_text_and_json_to_stdout_in_the_foreground(self) -> None:
        for log_format in ("text", "json"):
            self.assertIsNotNone(_log_observer(self.Options(nodaemon=True), log_format))

    def test_syslog_and_a_logger_of_the_users_are_left_to_twistd(self) -> None:
        self.assertIsNone(_log_observer(self.Options(nodaemon=True, syslog=True), "text"))
        self.assertIsNone(_log_observer(self.Options(logger="my.observer"), "json"))


# Fields a format may name, and what an event may hold under them.
_NAMES = ("qid", "rcpt", "size", "items", "thing", "log_namespace", "missing")
_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["a", "0", "real"]), st.text(max_size=5), max_size=2),
    st.just(lambda: "called"),
)
_FIELD = st.builds(
    lambda name, access, conversion, spec: "{" + name + access + conversion + spec + "}",
    st.sampled_from(_NAMES + ("0", "")),
    st.sampled_from(["", "()", ".real", "[0]", "[a]", ".nope"]),
    st.sampled_from(["", "!r", "!s", "!a", "!x"]),
    st.sampled_from(["", ":>6", ":d", ":.2f", ":{size}", ":%"]),
)
_FORMATS = st.lists(
    st.one_of(_FIELD, st.text(alphabet="ab \n{}#é", max_size=6)), max_size=5
).map("".join)


class ClassicLineProperties(unittest.TestCase):
    """classic_line is Twisted's formatEventAsClassicLogText, whatever the event."""

    @settings(max_examples=400, deadline=None)
    @given(
        fmt=st.one_of(_FORMATS, st.none(), st.just(b"{qid} bytes")),
        fields=st.dictionaries(st.sampled_from(_NAMES[:-1]), _VALUES),
        level=st.sampled_from([None, LogLevel.info, LogLevel.error]),
        system=st.sampled_from([None, "SMTP,3,127.0.0.1"]),
        when=st.one_of(st.none(), st.floats(min_value=-1e9, max_value=4e9)),
    )
    def test_the_same_line_as_twisted(self, fmt, fields, level, system, when) -> None:
        event = dict(fields)
        for key, value in (("log_format", fmt), ("log_level", level),
                           ("log_system", system), ("log_time", when)):
            if value is not None:
                event[key] = value
        self.assertEqual(
            classic_line(dict(event), formatTime),
            formatEventAsClassicLogText(dict(event), formatTime=formatTime),
        )
