# -*- test-case-name: tests.test_session -*-
"""The SMTP dialogue's decisions without a reactor: mailx.smtp.session alone.

``Script`` plays the Twisted protocol's part with the simplest delivery
layer (every address accepted, every message filed), so that these tests
see what the session decides: the table of legal commands, the limits, the
holds and RFC 2920's pipelining rule.  tests/test_smtp.py drives the same
dialogue through MailxESMTP; tests/test_server.py over real sockets.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.smtp import replies
from mailx.smtp.replies import Reply
from mailx.smtp.session import (
    COMMAND_STATES,
    COMMANDS,
    MAX_EARLY_INPUT,
    MAX_HELD_INPUT,
    SMTP,
    SUBMISSION,
    SUBMISSIONS,
    AuthResponse,
    CommandEvent,
    Content,
    ContentRefused,
    EndOfContent,
    HangUp,
    Hold,
    Send,
    SMTPSession,
    StartPause,
    State,
    Violation,
    _has_long_line,
    _longest_line,
)

# Every reply the server may send: the table's, and the few written out in
# mailx/smtp/server.py (banner and EHLO 220/250, HELP 214, AUTH's 334).
KNOWN_CODES = frozenset(
    value.code for value in vars(replies).values() if isinstance(value, Reply)
) | {214, 220, 250, 334}


def limits(**changes: int) -> SimpleNamespace:
    values = dict(message_size=10_000, recipients=3, error_limit=20, junk_commands=100)
    values.update(changes)
    return SimpleNamespace(**values)


class Script:
    """The protocol's part: act on each event as MailxESMTP does on success."""

    def __init__(
        self, kind: str = SMTP, tls: bool = False, greeting_pause: bool = False, **limit: int
    ) -> None:
        self.session = SMTPSession(kind, limits(**limit), greeting_pause)
        self.session.tls = tls
        self.sent: list[bytes] = []
        self.closed = False
        self.pauses: list[float] = []
        self.content: list[bytes] = []
        self.events: list[object] = []
        self.illegal: list[tuple[bytes, State]] = []  # commands handed over where the table forbids them

    def feed(self, data: bytes) -> list[bytes]:
        """Send ``data``; the reply lines it caused."""
        before = len(self.sent)
        self.session.receive(data)
        self.run()
        return self.sent[before:]

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.feed(data) if line[3:4] == b" "]

    def run(self) -> None:
        while True:
            self.carry_out()
            event = self.session.next_event()
            if event is None:
                break
            self.events.append(event)
            self.act(event)
        self.session.compact()
        self.carry_out()

    def carry_out(self) -> None:
        for action in self.session.actions():
            if isinstance(action, Send):
                self.sent.extend(line + b"\r\n" for line in action.data.split(b"\r\n")[:-1])
            elif isinstance(action, StartPause):
                self.pauses.append(action.seconds)
            elif isinstance(action, HangUp):
                self.closed = True

    def end_pause(self) -> None:
        self.session.release(Hold.ERROR_PAUSE)
        self.run()

    def act(self, event: object) -> None:
        session = self.session
        if isinstance(event, CommandEvent):
            rule = COMMANDS[event.verb]
            if session.state not in rule.states:
                self.illegal.append((event.verb, session.state))
            verb = event.verb
            if verb in (b"HELO", b"EHLO"):
                session.helo()
                session.reply(replies.OK)
            elif verb == b"MAIL":
                session.mail_accepted("Q1", "s@sender.test", 0)
                session.reply(replies.SENDER_OK)
            elif verb == b"RCPT":
                if session.too_many_recipients():
                    session.reply(replies.TOO_MANY_RECIPIENTS)
                else:
                    session.rcpt_accepted("bob@example.test")
                    session.reply(replies.RECIPIENT_OK)
            elif verb == b"DATA":
                session.data_started()
                session.send(b"354 " + replies.START_DATA.text.encode() + b"\r\n")
            elif verb == b"RSET":
                session.reset()
                session.reply(replies.RESET_OK)
            elif verb == b"QUIT":
                session.reply(replies.BYE)
                session.close(None)
            elif verb == b"STARTTLS":
                session.reply(replies.TLS_GO_AHEAD)
                session.start_tls()
            elif verb == b"AUTH":
                session.challenge(b"")
            elif verb == b"HELP":
                session.send(b"214 2.0.0 See RFC 5321\r\n")
            else:
                session.reply(replies.OK)
        elif isinstance(event, AuthResponse):
            session.logged_in_as()
            session.reply(replies.AUTH_OK)
        elif isinstance(event, Content):
            self.content.append(event.data)
        elif isinstance(event, EndOfContent):
            if event.refused is not None:
                session.reply(event.refused)
                session.count_error()
            else:
                session.message_answered(replies.OK)
                session.reply(replies.OK)
        elif isinstance(event, Violation):
            session.close(event.reply)
        elif not isinstance(event, ContentRefused):
            raise AssertionError(f"unknown event {event!r}")


TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<bob@example.test>\r\n"


class TableTests(unittest.TestCase):
    """COMMANDS: what is legal where, and what the rest is told."""

    def test_every_command_state_has_an_answer_for_every_command(self) -> None:
        for verb, rule in COMMANDS.items():
            for state in COMMAND_STATES:
                if state not in rule.states:
                    self.assertIn(state, rule.refusals, f"{verb!r} in {state}")
            self.assertLessEqual(set(rule.refusals), set(COMMAND_STATES - rule.states), verb)

    def test_mail_before_helo_is_503(self) -> None:
        script = Script()
        self.assertEqual(script.feed(b"MAIL FROM:<s@sender.test>\r\n"), [b"503 5.5.1 Send HELO/EHLO first\r\n"])
        self.assertEqual(script.session.errors, 1)

    def test_rcpt_before_mail_is_503(self) -> None:
        self.assertEqual(Script().codes(b"EHLO c.test\r\nRCPT TO:<bob@example.test>\r\n"), [250, 503])

    def test_data_before_rcpt_is_need_rcpt(self) -> None:
        script = Script()
        script.feed(b"EHLO c.test\r\nMAIL FROM:<s@sender.test>\r\n")
        self.assertEqual(script.feed(b"DATA\r\n"), [replies.NEED_RCPT.wire()])

    def test_nested_mail_is_503(self) -> None:
        script = Script()
        script.feed(TRANSACTION)
        self.assertEqual(script.feed(b"MAIL FROM:<t@sender.test>\r\n"), [replies.NESTED_MAIL.wire()])

    def test_data_arguments_are_judged_before_the_sequence(self) -> None:
        lines = Script().feed(b"DATA now\r\n")
        self.assertEqual(lines, [b"501 5.5.4 DATA takes no arguments\r\n"])

    def test_auth_is_not_offered_on_port_25_and_not_counted(self) -> None:
        script = Script(SMTP)
        self.assertEqual(script.feed(b"EHLO c.test\r\nAUTH PLAIN\r\n")[1], replies.NOT_IMPLEMENTED.wire())
        self.assertEqual(script.session.errors, 0)

    def test_submission_needs_tls_before_auth_and_mail(self) -> None:
        script = Script(SUBMISSION)
        got = script.feed(b"EHLO c.test\r\nAUTH PLAIN\r\nMAIL FROM:<s@sender.test>\r\n")
        self.assertEqual(got[1:], [replies.MUST_STARTTLS.wire()] * 2)

    def test_submission_mail_needs_a_login(self) -> None:
        script = Script(SUBMISSIONS, tls=True)
        got = script.feed(b"EHLO c.test\r\nMAIL FROM:<s@sender.test>\r\n")
        self.assertEqual(got[1], replies.AUTH_REQUIRED.wire())

    def test_auth_once_logged_in_is_already_authenticated_even_in_a_transaction(self) -> None:
        script = Script(SUBMISSIONS, tls=True)
        script.feed(b"EHLO c.test\r\nAUTH PLAIN\r\ndGVzdA==\r\n" + TRANSACTION[13:])
        self.assertEqual(script.session.state, State.RCPT)
        self.assertEqual(script.feed(b"AUTH PLAIN\r\n"), [replies.AUTH_ALREADY.wire()])

    def test_auth_in_a_transaction_is_refused_uncounted(self) -> None:
        script = Script(SUBMISSIONS, tls=True)
        script.session.greeted = True
        script.session.state = State.MAIL
        self.assertEqual(script.feed(b"AUTH PLAIN\r\n"), [replies.AUTH_IN_TRANSACTION.wire()])
        self.assertEqual(script.session.errors, 0)

    def test_the_auth_response_line_is_not_a_command(self) -> None:
        script = Script(SUBMISSIONS, tls=True)
        script.feed(b"EHLO c.test\r\nAUTH PLAIN\r\n")
        self.assertEqual(script.session.state, State.AUTH)
        script.feed(b"QUIT\r\n")
        self.assertEqual(script.events[-1], AuthResponse(b"QUIT"))

    def test_unknown_verbs_and_twisteds_unknown_are_500(self) -> None:
        self.assertEqual(Script().codes(b"UNKNOWN\r\nFOO bar\r\n\r\n"), [500, 500, 500])

    def test_starttls_discards_what_was_pipelined_after_it(self) -> None:
        script = Script()
        script.feed(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<s@sender.test>\r\n")
        self.assertEqual(script.session.state, State.CONNECTED)
        self.assertEqual(script.session.buffered, 0)
        self.assertTrue(script.session.tls)


class PipeliningTests(unittest.TestCase):
    """RFC 2920: replies in order; DATA ends a group; nothing before the banner."""

    def test_content_sent_with_data_is_554_and_closes(self) -> None:
        script = Script()
        got = script.feed(TRANSACTION + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(got[-1], replies.DATA_PIPELINED.wire())
        self.assertTrue(script.closed)
        self.assertEqual(script.content, [])

    def test_data_alone_gets_354(self) -> None:
        script = Script()
        self.assertEqual(script.codes(TRANSACTION + b"DATA\r\n"), [250, 250, 250, 354])
        self.assertEqual(script.session.state, State.DATA)

    def test_a_refused_data_with_input_after_it_is_only_refused(self) -> None:
        # The rule is for content after an accepted DATA: a 503 is answered, the session goes on.
        self.assertEqual(Script().codes(b"EHLO c.test\r\nDATA\r\nNOOP\r\n"), [250, 503, 250])

    def test_input_waits_while_a_check_holds_it(self) -> None:
        script = Script()
        script.session.hold(Hold.CHECK)
        self.assertEqual(script.feed(b"EHLO c.test\r\nNOOP\r\n"), [])
        self.assertTrue(script.session.reading_wanted())
        script.session.release(Hold.CHECK)
        script.run()
        self.assertEqual([line[:3] for line in script.sent], [b"250", b"250"])

    def test_reading_stops_past_one_read_of_held_input(self) -> None:
        script = Script()
        script.session.hold(Hold.CHECK)
        script.feed(b"NOOP\r\n" * (MAX_HELD_INPUT // 6 + 1))
        self.assertFalse(script.session.reading_wanted())

    def test_a_backlog_stops_reading_at_once(self) -> None:
        script = Script()
        script.session.hold(Hold.BACKLOG)
        self.assertFalse(script.session.reading_wanted())
        self.assertEqual(script.feed(b"NOOP\r\n"), [])

    def test_early_talker_is_refused_and_its_input_bounded(self) -> None:
        script = Script(greeting_pause=True)
        self.assertFalse(script.session.reading_wanted())
        script.feed(b"EHLO c.test\r\n" * 1000)
        self.assertEqual(script.sent, [])
        self.assertLessEqual(script.session.buffered, MAX_EARLY_INPUT)
        self.assertEqual(script.session.banner_due(), replies.EARLY_TALKER)

    def test_a_patient_client_gets_the_banner(self) -> None:
        script = Script(greeting_pause=True)
        self.assertIsNone(script.session.banner_due())
        self.assertEqual(script.session.state, State.CONNECTED)


class LimitTests(unittest.TestCase):
    def test_errors_past_half_the_limit_pause_the_next_command(self) -> None:
        script = Script(error_limit=4)
        self.assertEqual(script.codes(b"BAD\r\nBAD\r\nBAD\r\nNOOP\r\n"), [500, 500, 500])
        self.assertEqual(script.pauses, [1.0])
        self.assertIn(Hold.ERROR_PAUSE, script.session.holds)
        script.end_pause()
        self.assertEqual(script.sent[-1][:3], b"250")

    def test_the_error_limit_closes_with_421(self) -> None:
        script = Script(error_limit=2)
        got = script.feed(b"BAD\r\nBAD\r\nNOOP\r\n")
        self.assertEqual(got[-1], replies.TOO_MANY_ERRORS.wire())
        self.assertTrue(script.closed)

    def test_junk_past_the_limit_closes_and_a_delivery_restarts_the_count(self) -> None:
        script = Script(junk_commands=2)
        script.feed(b"NOOP\r\nNOOP\r\n" + TRANSACTION + b"DATA\r\n")
        script.feed(b"hi\r\n.\r\n")
        self.assertEqual(script.session.junk, 0)
        got = script.feed(b"NOOP\r\nRSET\r\nVRFY x\r\n")
        self.assertEqual(got[-1], replies.TOO_MANY_JUNK.wire())

    def test_command_line_over_512_is_500_and_over_4k_closes(self) -> None:
        script = Script()
        self.assertEqual(script.codes(b"NOOP " + b"x" * 600 + b"\r\n"), [500])
        script.feed(b"x" * 5000)
        self.assertEqual(script.sent[-1], replies.LINE_TOO_LONG.wire())
        self.assertTrue(script.closed)

    def test_nul_in_a_command_is_500(self) -> None:
        self.assertEqual(Script().feed(b"NOOP\0\r\n"), [replies.NUL_IN_COMMAND.wire()])

    def test_the_recipient_limit(self) -> None:
        script = Script(recipients=1)
        script.feed(TRANSACTION)
        self.assertEqual(script.codes(b"RCPT TO:<carol@example.test>\r\n"), [452])

    def test_shutdown_closes_between_transactions_only(self) -> None:
        script = Script()
        script.feed(TRANSACTION + b"DATA\r\n")
        self.assertFalse(script.session.shutdown())
        got = script.feed(b"hi\r\n.\r\n")
        self.assertEqual(got[-1], replies.SHUTTING_DOWN.wire())
        self.assertEqual(script.session.state, State.CLOSING)


class ContentTests(unittest.TestCase):
    def data(self, **limit: int) -> Script:
        script = Script(**limit)
        script.feed(TRANSACTION + b"DATA\r\n")
        return script

    def test_dots_are_unstuffed_and_bare_line_ends_normalised(self) -> None:
        script = self.data()
        script.feed(b"..dot\r\nbare\nlf\rcr\r\n.\r\n")
        self.assertEqual(b"".join(script.content), b".dot\r\nbare\r\nlf\r\ncr\r\n")
        self.assertEqual(script.sent[-1], replies.OK.wire())
        self.assertEqual(script.session.state, State.GREETED)

    def test_only_crlf_dot_crlf_ends_the_message(self) -> None:
        script = self.data()
        script.feed(b"a\n.\nb\r\n")
        self.assertEqual(script.session.state, State.DATA)
        script.feed(b".\r\n")
        self.assertEqual(script.session.state, State.GREETED)

    def test_too_big_is_read_to_the_end_then_552(self) -> None:
        script = self.data(message_size=100)
        script.feed(b"x" * 200 + b"\r\n")
        self.assertIsInstance(script.events[-1], ContentRefused)
        script.feed(b"more\r\n.\r\nNOOP\r\n")
        self.assertEqual([line[:3] for line in script.sent[-2:]], [b"552", b"250"])
        self.assertEqual(script.content, [])

    def test_a_spool_failure_on_the_last_run_refuses_the_end(self) -> None:
        script = self.data()
        script.session.receive(b"hi\r\n.\r\n")
        event = script.session.next_event()
        self.assertEqual(event, Content(b"hi\r\n"))
        script.session.content_refused(replies.LOCAL_ERROR)
        end = script.session.next_event()
        self.assertEqual(end, EndOfContent("Q1", replies.LOCAL_ERROR))

    def test_a_data_line_over_64k_is_a_violation(self) -> None:
        script = self.data(message_size=10**6)
        script.feed(b"y" * (64 * 1024 + 1) + b"\r\n")
        self.assertEqual(script.sent[-1], replies.DATA_LINE_TOO_LONG.wire())

    def test_a_long_line_after_a_64k_run_of_short_ones_is_a_violation(self) -> None:
        script = self.data(message_size=10**6)
        script.feed(b"x" * 76 + b"\r\n" + b"y" * (64 * 1024 + 1) + b"\r\n")
        self.assertEqual(script.sent[-1], replies.DATA_LINE_TOO_LONG.wire())

    @given(st.binary(max_size=200) | st.lists(st.sampled_from([b"x", b"\r", b"\n", b"\r\n"]),
                                             max_size=200).map(b"".join),
           st.integers(min_value=0, max_value=30))
    @settings(max_examples=500)
    def test_the_long_line_check_agrees_with_measuring_every_line(self, region: bytes,
                                                                   limit: int) -> None:
        self.assertEqual(_has_long_line(region, limit), _longest_line(region) > limit)


COMMAND_LINES = [
    b"EHLO c.test", b"HELO c.test", b"EHLO", b"MAIL FROM:<s@sender.test>", b"MAIL FROM:<>",
    b"RCPT TO:<bob@example.test>", b"DATA", b"DATA x", b"RSET", b"NOOP", b"VRFY bob", b"EXPN x",
    b"HELP", b"QUIT", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"BDAT 10", b"FOO", b"",
    b"dGVzdA==", b"*", b"Subject: hi", b".", b"..x", b"NOOP\0", b"x" * 600, b"UNKNOWN",
]


@st.composite
def dialogues(draw: st.DrawFn) -> tuple[str, bool, bool, list[bytes]]:
    kind = draw(st.sampled_from([SMTP, SUBMISSION, SUBMISSIONS]))
    lines = draw(st.lists(st.sampled_from(COMMAND_LINES) | st.binary(max_size=40), max_size=40))
    ending = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    stream = b"".join(line + ending for line in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return kind, draw(st.booleans()), draw(st.booleans()), chunks


class DialoguePropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(dialogues())
    def test_any_dialogue_keeps_the_table_and_the_reply_codes(
        self, dialogue: tuple[str, bool, bool, list[bytes]]
    ) -> None:
        kind, tls, pause, chunks = dialogue
        script = Script(kind, tls=kind == SUBMISSIONS or tls, greeting_pause=pause, error_limit=10)
        if pause:
            script.session.banner_due()
        for chunk in chunks:
            script.feed(chunk)
            if Hold.ERROR_PAUSE in script.session.holds:
                script.end_pause()
            state = script.session.state
            self.assertIsInstance(state, State)
            transaction = script.session.transaction
            if state in (State.MAIL, State.RCPT, State.DATA):
                self.assertIsNotNone(transaction.sender)
            if state in (State.RCPT, State.DATA):
                self.assertTrue(transaction.recipients)
            self.assertLessEqual(len(transaction.recipients), 3)
        self.assertEqual(script.illegal, [])
        for line in script.sent:
            self.assertRegex(line, re.compile(rb"^\d{3}[ -]"))
            self.assertIn(int(line[:3]), KNOWN_CODES, line)
        if script.closed:
            self.assertEqual(script.session.state, State.CLOSING)
