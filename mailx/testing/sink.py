# -*- test-case-name: tests.test_outbound -*-
"""An SMTP sink on 127.0.0.1 that plays the outside world's MX in tests and benchmarks.

It records every transaction exactly (envelope, the data as it came over
the wire, dot-stuffing included, and unstuffed) and answers as scripted::

    sink = start_sink()
    sink.script("rcpt", "451 4.2.0 Try again later", address="x@outside.test")
    sink.script("data", "550 5.7.1 No thanks")
    ... # mailx forwards to 127.0.0.1:sink.port
    message = yield sink.wait_for(1)
    yield sink.stop()

Scripted replies are used once each, in order, then the default (a 250 or
the stage's usual code) returns.  ``silent=True`` accepts the connection and
never says anything, for timeout tests; ``tls=True`` offers STARTTLS with a
throw-away self-signed certificate (``broken_tls=True`` offers it and then
answers the handshake with garbage; ``certificate=(cert_pem, key_pem)``
offers it with that certificate, e.g. one from `mailx.testing.tls.TestCA`); ``keep_data=False`` records envelopes
only (benchmarks); ``auth={"user": "password"}`` offers
AUTH PLAIN and LOGIN, after TLS only, and refuses MAIL without it.
``pipelining=False`` leaves PIPELINING out of the EHLO reply;
``data_without_recipients=True`` answers DATA with 354 even when no RCPT
succeeded (RFC 2920 3.1 warns of such servers) and notes in
``sink.unaddressed_data`` how many lines came before the dot.  ``sink.reads`` holds the
commands each read from a client carried, to tell a pipelined group (one
read) from lock-step (a read per command).  Like a real MX it answers RCPT
before MAIL with 503 and hangs up after any 421.

It is deliberately strict where a real MX is: only ``<CRLF>.<CRLF>`` ends
the data, so a client that forgets to dot-stuff is caught.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver

__all__ = [
    "CLOSE",
    "ReceivedMessage",
    "Sink",
    "self_signed_certificate",
    "self_signed_tls",
    "start_sink",
]


@dataclass
class ReceivedMessage:
    """One transaction the sink accepted (or refused at end of data)."""

    helo: str
    mail_from: str
    mail_params: list[str]
    recipients: list[str]
    data: bytes  # after dot-unstuffing, CRLF line ends as received
    raw: bytes  # the data lines exactly as sent, stuffed, up to (not including) ".\r\n"
    tls: bool
    auth: str | None
    accepted: bool  # False when the end of data was answered with an error
    connection: int = 0  # which connection carried it: 1 for the sink's first


@dataclass
class Session:
    helo: str | None = None
    tls: bool = False
    auth: str | None = None
    mail_from: str | None = None
    mail_params: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)


DEFAULTS = {
    "greeting": "220 mx.outside.test ESMTP sink",
    "ehlo": "250 ok",
    "mail": "250 2.1.0 Sender ok",
    "rcpt": "250 2.1.5 Recipient ok",
    "data": "354 Go ahead",
    "end": "250 2.0.0 Ok: queued",
    "rset": "250 2.0.0 Ok",
}
# A scripted reply of this value makes the sink hang up instead of answering.
CLOSE = "<close>"


class _SinkProtocol(LineOnlyReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1024 * 1024
    # A TCP transport (abortConnection, startTLS), set by makeConnection.
    transport: Any

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.session = Session()
        self.in_data = False
        self.lines: list[bytes] = []
        self.auth_state: tuple[str, ...] | None = None
        self.number = 0

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.number = self.sink.connections
        self.sink.open.add(self)
        self.sink.max_open = max(self.sink.max_open, len(self.sink.open))
        if not self.sink.silent:
            self.say(self.sink.next_reply("greeting"))

    def connectionLost(self, reason: Any = None) -> None:
        self.sink.open.discard(self)

    def say(self, reply: str) -> None:
        if reply == CLOSE:
            self.transport.abortConnection()
            return
        self.transport.write(reply.encode() + b"\r\n")
        if reply.startswith("421"):
            # RFC 5321 3.8: 421 announces the close.
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.sink._reads.append([])
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.sink.silent:
            return
        if self.in_data:
            self.data_line(line)
            return
        self.sink.commands.append(line)
        self.sink._reads[-1].append(line)
        if self.auth_state is not None:
            self.auth_step(line)
            return
        verb, _, arg = line.partition(b" ")
        handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None)
        if handler is None:
            self.say("502 5.5.1 Command not implemented")
            return
        handler(arg.decode("utf-8", "replace"))

    def do_EHLO(self, arg: str) -> None:
        self.session = Session(helo=arg, tls=self.session.tls)
        first = self.sink.next_reply("ehlo")
        if not first.startswith("250"):
            self.say(first)
            return
        lines = ["250-mx.outside.test hello", "250-8BITMIME"]
        if self.sink.pipelining:
            lines.append("250-PIPELINING")
        # RFC 1870: SIZE without a number (or 0) announces no fixed limit.
        lines.append("250-SIZE" + (f" {self.sink.size_limit}" if self.sink.size_limit else ""))
        if self.sink.tls_options is not None and not self.session.tls:
            lines.append("250-STARTTLS")
        if self.sink.auth is not None and self.session.tls:
            lines.append(f"250-AUTH {self.sink.auth_mechanisms}")
        lines.append("250 ENHANCEDSTATUSCODES")
        self.transport.write("".join(line + "\r\n" for line in lines).encode())

    def do_HELO(self, arg: str) -> None:
        self.session = Session(helo=arg, tls=self.session.tls)
        self.say("250 mx.outside.test")

    def do_STARTTLS(self, arg: str) -> None:
        if self.sink.tls_options is None or self.session.tls:
            self.say("502 5.5.1 No TLS here")
            return
        reply = self.sink.next_reply("starttls", "220 2.0.0 Ready to start TLS")
        self.say(reply)
        if reply.startswith("220") and self.sink.broken_tls:
            # Not a TLS server hello: the client's handshake fails.
            self.transport.write(b"this is not TLS\r\n" * 10)
            self.transport.loseConnection()
        elif reply.startswith("220"):
            self.transport.startTLS(self.sink.tls_options)
            self.session = Session(tls=True)

    def do_AUTH(self, arg: str) -> None:
        if self.sink.auth is None or not self.session.tls:
            self.say("503 5.5.1 AUTH not available")
            return
        words = arg.split()
        mechanism = words[0].upper() if words else ""
        if mechanism == "PLAIN" and len(words) == 2:
            self.check_plain(words[1])
        elif mechanism == "PLAIN":
            self.auth_state = ("plain",)
            self.say("334 ")
        elif mechanism == "LOGIN":
            self.auth_state = ("login-user",)
            self.say("334 VXNlcm5hbWU6")
        else:
            self.say("504 5.5.4 Unrecognized authentication type")

    def auth_step(self, line: bytes) -> None:
        state = self.auth_state
        self.auth_state = None
        if state == ("plain",):
            self.check_plain(line.decode("ascii", "replace"))
        elif state == ("login-user",):
            self.auth_state = ("login-password", base64.b64decode(line).decode())
            self.say("334 UGFzc3dvcmQ6")
        elif state is not None and state[0] == "login-password":
            self.login(state[1], base64.b64decode(line).decode(), "LOGIN")

    def check_plain(self, token: str) -> None:
        try:
            _, user, password = base64.b64decode(token).decode().split("\0")
        except ValueError:
            self.say("501 5.5.2 Bad PLAIN response")
            return
        self.login(user, password, "PLAIN")

    def login(self, user: str, password: str, mechanism: str) -> None:
        if self.sink.auth is not None and self.sink.auth.get(user) == password:
            self.session.auth = f"{user} ({mechanism})"
            self.say("235 2.7.0 Authentication successful")
        else:
            self.say("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg: str) -> None:
        if self.sink.auth is not None and self.session.auth is None:
            self.say("530 5.7.0 Authentication required")
            return
        path, _, params = arg[5:].partition(">")
        reply = self.sink.next_reply("mail")
        if reply.startswith("250"):
            self.session.mail_from = path.lstrip("<")
            self.session.mail_params = params.split()
            self.session.recipients = []
        self.say(reply)

    def do_RCPT(self, arg: str) -> None:
        address = arg[3:].strip().strip("<>")
        if self.session.mail_from is None:
            self.say("503 5.5.1 MAIL first")
            return
        reply = self.sink.next_reply(f"rcpt:{address}", None) or self.sink.next_reply("rcpt")
        if reply.startswith("250"):
            self.session.recipients.append(address)
        self.say(reply)

    def do_DATA(self, arg: str) -> None:
        if not self.session.recipients and not (
            self.sink.data_without_recipients and self.session.mail_from is not None
        ):
            self.say("503 5.5.1 No valid recipients")
            return
        reply = self.sink.next_reply("data")
        self.say(reply)
        if reply.startswith("354"):
            self.in_data = True
            self.lines = []

    def data_line(self, line: bytes) -> None:
        if line != b".":
            if self.sink.keep_data or not self.session.recipients:
                self.lines.append(line)
            return
        self.in_data = False
        if not self.session.recipients:
            self.sink.unaddressed_data.append(len(self.lines))
            self.lines = []
            self.session.mail_from = None
            self.say("554 5.5.1 No valid recipients")
            return
        if self.sink.keep_data:
            raw = b"".join(x + b"\r\n" for x in self.lines)
            data = b"".join((x[1:] if x.startswith(b".") else x) + b"\r\n" for x in self.lines)
        else:
            raw = data = b""
        self.lines = []
        reply = self.sink.next_reply("end")
        s = self.session
        self.sink.record(
            ReceivedMessage(
                helo=s.helo or "",
                mail_from=s.mail_from or "",
                mail_params=list(s.mail_params),
                recipients=list(s.recipients),
                data=data,
                raw=raw,
                tls=s.tls,
                auth=s.auth,
                accepted=reply.startswith("250"),
                connection=self.number,
            )
        )
        s.mail_from, s.recipients = None, []
        self.say(reply)

    def do_RSET(self, arg: str) -> None:
        self.session.mail_from, self.session.recipients = None, []
        self.say(self.sink.next_reply("rset"))

    def do_NOOP(self, arg: str) -> None:
        self.say("250 2.0.0 Ok")

    def do_QUIT(self, arg: str) -> None:
        self.say("221 2.0.0 Bye")
        self.transport.loseConnection()


class Sink(protocol.ServerFactory):
    """The sink's state: see the module docstring."""

    noisy = False

    def __init__(
        self,
        *,
        silent: bool = False,
        tls: bool = False,
        auth: dict[str, str] | None = None,
        size_limit: int | None = None,
        broken_tls: bool = False,
        keep_data: bool = True,
        certificate: tuple[bytes, bytes] | None = None,
        pipelining: bool = True,
        data_without_recipients: bool = False,
    ) -> None:
        self.silent = silent
        self.pipelining = pipelining
        self.data_without_recipients = data_without_recipients
        self.keep_data = keep_data
        self.broken_tls = broken_tls
        self.tls_options = self_signed_tls() if tls or broken_tls else None
        if certificate is not None:
            from mailx.testing.tls import server_options

            self.tls_options = server_options(*certificate)
        self.auth = auth
        self.auth_mechanisms = "PLAIN LOGIN"  # what EHLO offers
        self.size_limit = size_limit
        self.messages: list[ReceivedMessage] = []
        self.commands: list[bytes] = []
        self._reads: list[list[bytes]] = []
        self.unaddressed_data: list[int] = []
        self.connections = 0
        self.max_open = 0
        self.open: set[_SinkProtocol] = set()
        self._script: dict[str, deque[str]] = {}
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self.port: int = 0
        self._listening: Any = None

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        return _SinkProtocol(self)

    def script(self, stage: str, *replies: str, address: str | None = None) -> None:
        """Queue replies for a stage: greeting, ehlo, starttls, mail, rcpt, data (to DATA), end (to "."), rset;
        `CLOSE` hangs up instead."""
        key = f"{stage}:{address}" if address else stage
        self._script.setdefault(key, deque()).extend(replies)

    def next_reply(self, key: str, default: Any = "") -> Any:
        queued = self._script.get(key)
        if queued:
            return queued.popleft()
        if default == "":
            return DEFAULTS[key.split(":")[0]]
        return default

    @property
    def reads(self) -> list[list[bytes]]:
        """The commands of each read from a client that carried any, in order."""
        return [commands for commands in self._reads if commands]

    @property
    def accepted(self) -> list[ReceivedMessage]:
        return [m for m in self.messages if m.accepted]

    def record(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        count = len(self.accepted)
        ready = [w for w in self._waiters if w[0] <= count]
        self._waiters = [w for w in self._waiters if w[0] > count]
        for _, d in ready:
            d.callback(self.accepted)

    def wait_for(self, count: int) -> defer.Deferred:
        """Fires with the accepted messages once there are ``count`` of them."""
        if len(self.accepted) >= count:
            return defer.succeed(self.accepted)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((count, d))
        return d

    def stop(self) -> defer.Deferred:
        for proto in list(self.open):
            proto.transport.abortConnection()
        return defer.maybeDeferred(self._listening.stopListening)


def start_sink(reactor: Any = None, **options: Any) -> Sink:
    """A `Sink` listening on 127.0.0.1, on an ephemeral port (``sink.port``)."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    sink = Sink(**options)
    sink._listening = reactor.listenTCP(0, sink, interface="127.0.0.1")
    sink.port = sink._listening.getHost().port
    return sink


_TLS_CACHE: dict[str, Any] = {}


def self_signed_tls() -> Any:
    """Server TLS options with a fresh self-signed P-256 certificate (one per process)."""
    if "options" in _TLS_CACHE:
        return _TLS_CACHE["options"]
    from twisted.internet import ssl

    from mailx.testing.tls import certificate_pem

    cert_pem, key_pem = certificate_pem("mx.outside.test")
    pem = cert_pem + key_pem
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original
    )
    _TLS_CACHE["options"] = options
    _TLS_CACHE["pem"] = cert_pem
    return options


def self_signed_certificate() -> bytes:
    """The PEM certificate `self_signed_tls` serves (CN and SAN mx.outside.test), to trust in tests."""
    self_signed_tls()
    return _TLS_CACHE["pem"]
