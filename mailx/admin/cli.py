# -*- test-case-name: tests.test_cli -*-
"""``mailxctl``: the owner's command-line tool (SPEC section 9).

Each subcommand is one function registered with `command` in `COMMANDS`;
adding one (``dns``, ``dkim``, ``queue``...) means writing a function and
its argument setup, nothing else.  A command returns its exit status:
0 success, 1 when what was checked is wrong (bad configuration, unroutable
address), 2 usage errors (argparse's own convention).  Output is for people;
``--json`` gives the same information for scripts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from mailx.address import AddressError, domain_to_unicode, normalize_domain
from mailx.config import Config, ConfigError, load_config, new_secret
from mailx.inbound.routing import ForwardDestination, MailboxDestination, Router, RouteRefused
from mailx.smtp import replies
from mailx.text import printable, printable_lines, safe_json

EXIT_OK = 0
EXIT_WRONG = 1  # what was checked is wrong
EXIT_USAGE = 2  # argparse exits with 2 too

DEFAULT_CONFIG = "mailx.yaml"
CONFIG_ENVIRONMENT = "MAILX_CONFIG"


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument setup and body."""

    name: str
    help: str
    run: Callable[[Context], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[Context], int]], Callable[[Context], int]]:
    """Register the decorated function as subcommand ``name``."""

    def register(run: Callable[[Context], int]) -> Callable[[Context], int]:
        COMMANDS[name] = Command(name, help, run, arguments)
        return run

    return register


class Context:
    """What a command gets: its arguments, the configuration on demand, and output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @property
    def config_path(self) -> str:
        """``-c FILE``, else ``$MAILX_CONFIG``, else ``./mailx.yaml`` (SPEC section 9)."""
        return self.args.config or os.environ.get(CONFIG_ENVIRONMENT) or DEFAULT_CONFIG

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def config_origin(self) -> str:
        """How `config_path` was chosen, for a message about a missing file."""
        if self.args.config:
            return "given with -c"
        if os.environ.get(CONFIG_ENVIRONMENT):
            return f"from ${CONFIG_ENVIRONMENT}"
        return f"the default, ./{DEFAULT_CONFIG} in the current directory"

    def load_config(self) -> Config:
        """The configuration; a `ConfigError` escapes to `main`, which reports it."""
        path = os.path.abspath(self.config_path)
        if not os.path.exists(path):
            # Name the file looked for and why that one: a mailxctl run from
            # another directory otherwise just says "mailx.yaml: not found".
            from mailx.config import Problem

            raise ConfigError(
                [
                    Problem(
                        path,
                        None,
                        None,
                        f"no configuration file here ({self.config_origin});"
                        f" choose one with -c FILE or ${CONFIG_ENVIRONMENT}",
                    )
                ]
            )
        return load_config(self.config_path)

    def emit(self, data: dict[str, Any], text: str) -> None:
        """Print ``data`` as JSON under ``--json``, else ``text``.

        Both with every control character escaped (`mailx.text`): queue
        entries show strangers' header fields and remote replies, and an
        escape sequence in them must not reach the owner's terminal.
        """
        if self.json:
            print(safe_json(data))
        else:
            print(printable_lines(text))


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS if suppress else None,
        help=f"configuration file (default: ${CONFIG_ENVIRONMENT}, else ./{DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output, same information",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser, with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="mailxctl", description="Inspect and manage a mailx mail exchanger."
    )
    _common_options(parser, suppress=False)
    # The options also work after the command (``mailxctl check -c FILE``);
    # SUPPRESS keeps a subparser from overwriting what came before it.
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in COMMANDS.values():
        sub = subparsers.add_parser(
            entry.name, help=entry.help, description=entry.help, parents=[common]
        )
        if entry.arguments is not None:
            entry.arguments(sub)
    return parser


def _problems_json(error: ConfigError) -> dict[str, Any]:
    return {
        "ok": False,
        "problems": [
            {"file": p.file, "line": p.line, "key": p.key, "message": p.message}
            for p in error.problems
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run mailxctl; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    context = Context(args)
    try:
        return COMMANDS[args.command].run(context)
    except ConfigError as e:
        for problem in e.problems:
            print(printable(str(problem)), file=sys.stderr)
        if context.json:
            print(safe_json(_problems_json(e)))
        return EXIT_WRONG


# ---------------------------------------------------------------------------
# check


def _destination_json(config: Config, destination: Any) -> dict[str, Any]:
    if isinstance(destination, MailboxDestination) and destination.lmtp is not None:
        return {
            "type": "mailbox",
            "address": destination.address,
            "domain": destination.domain,
            "mailbox": destination.mailbox,
            "lmtp": destination.lmtp,
        }
    if isinstance(destination, MailboxDestination):
        return {
            "type": "mailbox",
            "address": destination.address,
            "domain": destination.domain,
            "mailbox": destination.mailbox,
            "maildir": str(destination.maildir_path(config)),
        }
    assert isinstance(destination, ForwardDestination)
    return {"type": "forward", "address": destination.address}


def _delivery_json(lmtp: str | None) -> dict[str, Any]:
    """How a domain's mail is filed (SPEC 14); for a ``unix:`` LMTP socket, whether
    it is there now (Dovecot not running yet is worth a word, not an error)."""
    if lmtp is None:
        return {"type": "maildir"}
    found: dict[str, Any] = {"type": "lmtp", "endpoint": lmtp}
    if lmtp.startswith("unix:"):
        import stat

        path = lmtp[len("unix:") :].split(":", 1)[0].removeprefix("path=")
        try:
            found["socket"] = "present" if stat.S_ISSOCK(os.stat(path).st_mode) else "not a socket"
        except OSError as e:
            found["socket"] = f"missing ({e.strerror})"
    return found


def summarize(config: Config) -> dict[str, Any]:
    """Everything ``mailxctl check`` reports, as plain data (the ``--json`` form)."""
    router = Router(config)
    domains = []
    for name, domain in config.domains.items():
        canonical = domain.alias_of or name

        def expansion(alias: str, canonical: str = canonical) -> list[str]:
            return [d.address for d in router.expansion(canonical, alias)]

        domains.append(
            {
                "name": name,
                "unicode": domain_to_unicode(name),
                "alias_of": domain.alias_of,
                "mailboxes": sorted(domain.mailboxes),
                "aliases": {
                    alias: {"targets": list(targets), "delivers_to": expansion(alias)}
                    for alias, targets in sorted(domain.aliases.items())
                    if alias != "*"
                },
                "catch_all": (
                    {"targets": list(domain.aliases["*"]), "delivers_to": expansion("*")}
                    if "*" in domain.aliases
                    else None
                ),
                "subaddress_delimiter": domain.subaddress_delimiter,
                "dkim": (
                    {"selector": domain.dkim.selector, "key": str(domain.dkim.key)}
                    if domain.dkim
                    else None
                ),
                "postmaster": [d.address for d in router.route(f"postmaster@{name}").destinations],
                "postmaster_fallback": router.postmaster_falls_back(name),
                "delivery": _delivery_json(domain.lmtp),
            }
        )
    limits = config.limits
    return {
        "ok": True,
        "file": str(config.source),
        "hostname": config.hostname,
        "listen": list(config.listen),
        "tls": (
            {"certificate": str(config.tls.certificate), "key": str(config.tls.key)}
            if config.tls
            else None
        ),
        "paths": {"mail": str(config.paths.mail), "spool": str(config.paths.spool)},
        "limits": {
            "message_size": limits.message_size,
            "recipients": limits.recipients,
            "connections": limits.connections,
            "connections_per_ip": limits.connections_per_ip,
            "connection_rate_per_ip": limits.connection_rate_per_ip,
            "idle_timeout": limits.idle_timeout,
            "session_timeout": limits.session_timeout,
            "error_limit": limits.error_limit,
        },
        "authentication": {
            "spf": config.authentication.spf,
            "dkim": config.authentication.dkim,
            "dmarc": config.authentication.dmarc,
        },
        "bare_postmaster": f"postmaster@{config.first_domain}",
        "domains": domains,
        "warnings": [str(w) for w in config.warnings],
    }


def _targets_line(name: str, entry: dict[str, Any]) -> str:
    line = f"    {name} → {', '.join(entry['targets'])}"
    if entry["delivers_to"] != entry["targets"]:
        line += f"  (delivers to {', '.join(entry['delivers_to'])})"
    return line


def render_summary(summary: dict[str, Any]) -> str:
    """The human form of `summarize`."""
    on = {True: "on", False: "off"}
    limits = summary["limits"]
    auth = summary["authentication"]
    tls = summary["tls"]
    lines = [
        f"{summary['file']}: OK",
        *(f"warning: {w}" for w in summary.get("warnings", ())),
        f"hostname: {summary['hostname']}",
        f"listen: {', '.join(summary['listen'])}",
        f"tls: {tls['certificate']}, {tls['key']}" if tls else "tls: off (STARTTLS not offered)",
        f"mail: {summary['paths']['mail']}",
        f"spool: {summary['paths']['spool']}",
        "limits: "
        + ", ".join(
            [
                f"message_size {limits['message_size']} bytes",
                f"recipients {limits['recipients']}",
                f"connections {limits['connections']} ({limits['connections_per_ip']} per IP,"
                f" {limits['connection_rate_per_ip'] or 'unlimited'} new per minute per IP)",
                f"idle_timeout {limits['idle_timeout']:g}s",
                f"session_timeout {limits['session_timeout']:g}s",
                f"error_limit {limits['error_limit']}",
            ]
        ),
        f"authentication: spf {on[auth['spf']]}, dkim {on[auth['dkim']]}, dmarc {auth['dmarc']}",
        f"bare <postmaster>: {summary['bare_postmaster']}",
    ]
    for domain in summary["domains"]:
        name = domain["name"]
        shown = name if domain["unicode"] == name else f"{name} ({domain['unicode']})"
        lines.append("")
        if domain["alias_of"]:
            lines.append(f"domain {shown}: alias of {domain['alias_of']}")
        else:
            lines.append(f"domain {shown}")
            lines.append(f"  mailboxes: {', '.join(domain['mailboxes']) or '(none)'}")
            if domain["aliases"]:
                lines.append("  aliases:")
                lines.extend(_targets_line(a, e) for a, e in domain["aliases"].items())
            else:
                lines.append("  aliases: (none)")
            if domain["catch_all"]:
                lines.append("  catch-all:")
                lines.append(_targets_line("*", domain["catch_all"]))
            else:
                lines.append("  catch-all: none (unknown local parts get 550 5.1.1)")
            delimiter = domain["subaddress_delimiter"]
            lines.append(
                f"  subaddress delimiter: {delimiter!r}" if delimiter else "  subaddresses: off"
            )
        fallback = "  (the first domain's: none of its own)" if domain.get("postmaster_fallback") else ""
        lines.append(f"  postmaster → {', '.join(domain['postmaster'])}{fallback}")
        delivery = domain.get("delivery") or {"type": "maildir"}
        if delivery["type"] == "lmtp":
            socket = f" (socket {delivery['socket']})" if "socket" in delivery else ""
            lines.append(f"  delivery: LMTP {delivery['endpoint']}{socket}")
        if domain["dkim"]:
            lines.append(
                f"  dkim: selector {domain['dkim']['selector']}, key {domain['dkim']['key']}"
            )
    return "\n".join(lines)


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns",
        action="store_true",
        help="also look up every domain's DNS records and compare them (mailxctl dns --check)",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="check that user NAME (twistd's --uid) can read and write every file mailx"
        " needs once running (default: as root, the owner of paths.spool; else yourself)",
    )


@command(
    "check", "validate the configuration and summarize domains and addresses", _check_arguments
)
def check(context: Context) -> int:
    """``mailxctl check``: a bad configuration exits 1 with one line per problem (via main)."""
    from mailx.admin import preflight

    config = context.load_config()
    summary = summarize(config)
    if context.args.user is not None:
        try:
            user = preflight.user_named(context.args.user)
        except KeyError:
            print(f"mailxctl: no user {context.args.user!r} on this system", file=sys.stderr)
            return EXIT_USAGE
    else:
        user = preflight.likely_server_user(config)
    # What the server will meet after twistd's --uid/--gid (start-up checks it too).
    problems = preflight.access_problems(config, user)
    summary = {
        **summary,
        "ok": not problems,
        "files": {"user": user.name, "uid": user.uid, "problems": problems},
    }
    if context.args.dns:
        return _check_dns(context, config, summary)
    text = render_summary(summary)
    if problems:
        text += f"\n\nfiles, as {user.describe()}: {len(problems)} problem(s)\n"
        text += "\n".join(f"  {p}" for p in problems)
    else:
        text += f"\nfiles: every file and directory is usable by {user.describe()}"
    accounts = accounts_summary(config)
    if accounts is not None:
        summary["accounts"] = accounts
        text = "\n".join([text, *render_accounts(accounts)])
    context.emit(summary, text)
    return EXIT_WRONG if problems else EXIT_OK


# ---------------------------------------------------------------------------
# route


def _route_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address", help="recipient address, e.g. alice+news@example.test or postmaster"
    )


def _reply_json(reply: replies.Reply) -> dict[str, Any]:
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


@command("route", "show where a message to ADDRESS would go, and why", _route_arguments)
def route(context: Context) -> int:
    """``mailxctl route ADDRESS``: the trace and destinations, or the refusal at RCPT."""
    config = context.load_config()
    text = context.args.address
    if text.startswith("<") and text.endswith(">"):  # as written in RCPT TO:<...>
        text = text[1:-1]
    try:
        # The server reverses our SRS addresses before ordinary routing; so do we.
        result = _srs_route(config, text) or Router(config).route(text)
    except AddressError as e:
        return _refused(context, text, replies.BAD_RECIPIENT_SYNTAX, (f"bad address: {e}",))
    except RouteRefused as e:
        return _refused(context, text, e.reply, e.trace)
    reply = replies.RECIPIENT_OK
    data: dict[str, Any] = {
        "address": str(result.address),
        "accepted": True,
        "reply": _reply_json(reply),
        "trace": list(result.trace),
        "destinations": [_destination_json(config, d) for d in result.destinations],
    }
    lines = [str(result.address), *(f"  {step}" for step in result.trace), "delivers to:"]
    for destination in data["destinations"]:
        if destination["type"] == "mailbox" and "lmtp" in destination:
            lines.append(f"  mailbox {destination['address']}: LMTP {destination['lmtp']}")
        elif destination["type"] == "mailbox":
            lines.append(f"  mailbox {destination['address']}: {destination['maildir']}")
        else:
            lines.append(f"  forward to {destination['address']}")
    lines.append(str(reply))
    context.emit(data, "\n".join(lines))
    return EXIT_OK


def _srs_route(config: Config, text: str) -> Any:
    """The route of one of our SRS addresses (as `mailx.outbound.srs.srs_route`), None otherwise.

    A forged or expired one raises `RouteRefused` with why, as the server refuses it.
    """
    from mailx.outbound.srs import SRS, srs_route
    from mailx.smtp.replies import SMTPReplyError

    secrets = config.outbound.srs_secrets if config.outbound is not None else ()
    if not secrets:
        return None
    try:
        return srs_route(SRS(secrets), config, text)
    except SMTPReplyError as e:
        why = str(e.__cause__) if e.__cause__ is not None else "does not verify"
        raise RouteRefused(
            e.reply,
            (
                f"{text} is an SRS address at one of our domains, but not a valid one"
                f" (a forged or altered hash, or older than its validity): {why}",
            ),
        ) from None


def _refused(context: Context, address: str, reply: replies.Reply, trace: Sequence[str]) -> int:
    data = {
        "address": address,
        "accepted": False,
        "reply": _reply_json(reply),
        "trace": list(trace),
        "destinations": [],
    }
    context.emit(data, "\n".join([address, *(f"  {step}" for step in trace), str(reply)]))
    return EXIT_WRONG


# ---------------------------------------------------------------------------
# reload


def signal_server(config: Config, signum: int) -> int | None:
    """Send ``signum`` to the running server of ``config``; its pid, or None if not running.

    `PermissionError` escapes: the server runs as a user we may not signal.
    """
    from mailx.service import pid_path

    try:
        pid = int(pid_path(config).read_text().strip())
        os.kill(pid, signum)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


# How long `reload` waits for the server's verdict; a reload takes milliseconds.
RELOAD_WAIT = 10.0


@command("reload", "make the running server re-read its configuration, and report its verdict")
def reload(context: Context) -> int:
    """``mailxctl reload``: check the file first, so a typo is reported here, not in a log;
    then SIGHUP, and wait for the server's own verdict (``reload.status`` in the spool).
    Exit 1 when the server refused the new configuration or did not answer."""
    import time

    from mailx.service import read_reload_status

    config = context.load_config()
    before = read_reload_status(config)
    try:
        pid = signal_server(config, signal.SIGHUP)
    except PermissionError as e:
        # The pid file in a spool we may not read, or a server of another user.
        what = e.filename or "the server process"
        text = (
            f"mailxctl: cannot reach mailx: permission denied ({what}); run mailxctl reload"
            " as root or as the user mailx runs as"
        )
        context.emit({"reloaded": False, "reason": "permission denied"}, text)
        return EXIT_WRONG
    if pid is None:
        context.emit({"reloaded": False, "reason": "not running"}, "mailx is not running")
        return EXIT_WRONG
    def answered(status: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
        """A verdict of this process newer than the one before our signal."""
        if status is None or status.get("pid") != pid:
            return False
        seen = before.get("generation", 0) if before and before.get("pid") == pid else 0
        return int(status.get("generation", 0)) > seen

    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        status = read_reload_status(config)
        if answered(status):
            break
        time.sleep(0.05)
    else:
        text = (
            f"sent SIGHUP to mailx (pid {pid}), but it gave no verdict within"
            f" {RELOAD_WAIT:g} s; see its log"
        )
        context.emit({"reloaded": False, "pid": pid, "reason": "no answer"}, text)
        return EXIT_WRONG
    problems = [str(p) for p in status.get("problems", [])]
    if status.get("ok"):
        context.emit(
            {"reloaded": True, "pid": pid},
            f"mailx (pid {pid}) reloaded {config.source}",
        )
        return EXIT_OK
    text = "\n".join(
        [f"mailx (pid {pid}) refused the new configuration and keeps the old one:"]
        + [f"  {p}" for p in problems]
    )
    context.emit({"reloaded": False, "pid": pid, "reason": "refused", "problems": problems}, text)
    return EXIT_WRONG


@command("srs-secret", "print a fresh random secret for outbound.srs_secret")
def srs_secret(context: Context) -> int:
    """``mailxctl srs-secret``: what to paste; needs no configuration (a sample one is refused)."""
    secret = new_secret()
    context.emit({"srs_secret": secret}, secret)
    return EXIT_OK


# ---------------------------------------------------------------------------
# dns, dkim keygen, check --dns (SPEC section 9; mailx.admin.dnssetup, mailx.outbound.dkimkeys)


def _address_of(version: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise argparse.ArgumentTypeError(f"'{text}' is not an IPv{version} address")
        return address.compressed

    return parse


def _dns_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", help="one of the configured domains")
    parser.add_argument(
        "--check",
        action="store_true",
        help="look the records up and say, record by record, what is right and what to fix",
    )
    parser.add_argument(
        "--ip",
        action="append",
        type=_address_of(4),
        metavar="A",
        help="this server's public IPv4 address (repeatable; default: public_addresses)",
    )
    parser.add_argument(
        "--ipv6",
        action="append",
        type=_address_of(6),
        metavar="A",
        help="this server's public IPv6 address (repeatable; default: public_addresses)",
    )
    parser.add_argument(
        "--autoconfig",
        action="store_true",
        help="print only the Thunderbird autoconfig file (config-v1.1.xml), to save and serve",
    )


@command(
    "dns", "the DNS records to publish for DOMAIN; --check compares the live ones", _dns_arguments
)
def dns_command(context: Context) -> int:
    """``mailxctl dns DOMAIN [--check]``: exit 1 when a required record is missing or wrong."""
    from mailx.admin import dnssetup

    config = context.load_config()
    args = context.args
    addresses = [*(args.ip or []), *(args.ipv6 or [])] or None
    try:
        plan = dnssetup.plan(config, args.domain, addresses)
    except ValueError as e:
        context.emit({"ok": False, "error": str(e)}, f"mailxctl dns: {e}")
        return EXIT_WRONG
    data = dnssetup.plan_json(plan)
    if args.autoconfig:
        if plan.autoconfig is None:
            message = (
                f"mailxctl dns: no autoconfig file for {plan.domain}: it needs imap: and a"
                " submission listener (listen.submission or listen.submissions) in mailx.yaml"
            )
            context.emit({"ok": False, "error": message}, message)
            return EXIT_WRONG
        context.emit(data["autoconfig"], plan.autoconfig.rstrip("\n"))
        return EXIT_OK
    if not args.check:
        context.emit(data, dnssetup.render_plan(plan))
        return EXIT_OK
    findings = dnssetup.check_plan(plan, dnssetup.resolver_for(config))
    bad = dnssetup.failed(findings)
    data.update(ok=not bad, findings=[dnssetup.finding_json(f) for f in findings])
    context.emit(data, dnssetup.render_findings(plan.domain, findings))
    return EXIT_WRONG if bad else EXIT_OK


def _check_dns(context: Context, config: Config, summary: dict[str, Any]) -> int:
    """``mailxctl check --dns``: the summary, then every domain's DNS check."""
    from mailx.admin import dnssetup

    results = dnssetup.check_config(config)
    bad = any(dnssetup.failed(findings) for findings in results.values())
    summary = {
        **summary,
        "ok": not bad,
        "dns": {
            domain: {
                "ok": not dnssetup.failed(findings),
                "findings": [dnssetup.finding_json(f) for f in findings],
            }
            for domain, findings in results.items()
        },
    }
    text = [render_summary(summary)]
    files = summary.get("files", {}).get("problems", [])
    bad = bad or bool(files)
    summary["ok"] = not bad
    if files:
        text += ["", f"files, as user {summary['files']['user']}: {len(files)} problem(s)"]
        text += [f"  {p}" for p in files]
    for domain, findings in results.items():
        text += ["", f"DNS of {domain}:", dnssetup.render_findings(domain, findings)]
    context.emit(summary, "\n".join(text))
    return EXIT_WRONG if bad else EXIT_OK


def _selector(text: str) -> str:
    # RFC 6376 3.1: selector = sub-domain *( "." sub-domain )
    try:
        return normalize_domain(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(f"'{text}' is not a DKIM selector: {e}") from None


def _dkim_arguments(parser: argparse.ArgumentParser) -> None:
    from mailx.outbound.dkimkeys import ALGORITHMS

    actions = parser.add_subparsers(dest="dkim_action", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen",
        help="create a signing key for DOMAIN and print its DNS record",
        description="Create a DKIM signing key for DOMAIN (never overwriting one) and print"
        " the TXT record to publish and the mailx.yaml line to add.",
    )
    _common_options(keygen, suppress=True)
    keygen.add_argument("domain", help="one of the configured domains")
    keygen.add_argument(
        "--selector",
        type=_selector,
        help="the selector (default: the configured one, else mx<YEAR><MONTH>)",
    )
    keygen.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="rsa",
        help="rsa (2048 bits, understood everywhere; the default) or ed25519 (RFC 8463)",
    )
    keygen.add_argument(
        "--output",
        metavar="PATH",
        help="where to write the key (default: the configured dkim.key, else"
        " dkim/DOMAIN.SELECTOR.key beside the configuration file)",
    )


@command(
    "dkim", "DKIM keys: `dkim keygen DOMAIN` creates one and prints its record", _dkim_arguments
)
def dkim_command(context: Context) -> int:
    """``mailxctl dkim keygen DOMAIN``: exit 1 if the domain is not ours or the key exists."""
    from mailx.admin import dnssetup
    from mailx.outbound import dkimkeys

    config = context.load_config()
    args = context.args
    try:
        domain = normalize_domain(args.domain)
        problem = None
    except AddressError as e:
        domain, problem = args.domain, f"'{args.domain}' is not a domain name: {e}"
    if problem is None and domain not in config.domains:
        problem = f"{domain} is not a configured domain (configured: {', '.join(config.domains)})"
    if problem:
        context.emit({"ok": False, "error": problem}, f"mailxctl dkim keygen: {problem}")
        return EXIT_WRONG
    configured = config.domains[domain].dkim
    selector = args.selector or (configured.selector if configured else None)
    selector = selector or dkimkeys.default_selector()
    if args.output:
        path = Path(os.path.abspath(os.path.expanduser(args.output)))
    elif configured is not None and configured.selector == selector:
        path = configured.key
    else:
        path = config.source.parent / "dkim" / f"{domain}.{selector}.key"
    key = dkimkeys.generate_key(args.algorithm)
    try:
        dkimkeys.write_key(key, path)
    except dkimkeys.KeyFileError as e:
        context.emit({"ok": False, "error": str(e)}, f"mailxctl dkim keygen: {e}")
        return EXIT_WRONG
    record = dnssetup.Expected(
        "DKIM",
        f"{selector}._domainkey.{domain}",
        "TXT",
        dkimkeys.dns_record(key),
        required=True,
        purpose="",
        fix="",
    )
    try:
        shown_path = str(path.relative_to(config.source.parent))
    except ValueError:
        shown_path = str(path)
    snippet = f"dkim: {{selector: {selector}, key: {shown_path}}}"
    in_config = configured is not None and (configured.selector, configured.key) == (
        selector,
        path,
    )
    algorithm = f"rsa-{dkimkeys.RSA_BITS}" if args.algorithm == "rsa" else args.algorithm
    data = {
        "ok": True,
        "domain": domain,
        "selector": selector,
        "algorithm": args.algorithm,
        "key": str(path),
        "name": record.name,
        "record": record.value,
        "strings": dnssetup.txt_strings(record.value),
        "zone": dnssetup.zone_line(record),
        "config": None if in_config else snippet,
    }
    text = [
        f"wrote a new {algorithm} DKIM key for {domain}: {path} (mode 0600)",
        "",
        "Publish this record (zone file):",
        "",
        data["zone"],
        "",
        f"or in a DNS provider's web form: type TXT, name {record.name}, value:",
        "",
        record.value,
        "",
    ]
    if in_config:
        text.append(f"{config.source.name} already names this key under domains.{domain}.")
    else:
        text += [
            f"Then add this line to {config.source.name} under domains -> {domain}"
            " (replacing any dkim: line there):",
            "",
            f"    {snippet}",
        ]
    text += ["", f"and check it with: mailxctl dns {domain} --check"]
    context.emit(data, "\n".join(text))
    return EXIT_OK


# ---------------------------------------------------------------------------
# check-message


def _check_message_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the message, as saved (.eml, Maildir file)")
    parser.add_argument("--ip", required=True, help="the client address it came from")
    parser.add_argument("--helo", required=True, help="the name the client gave in HELO/EHLO")
    parser.add_argument(
        "--mail-from", required=True, dest="mail_from", help='the envelope sender ("" for <>)'
    )


@command(
    "check-message",
    "run the SPF, DKIM and DMARC checks on a saved message, as the server would",
    _check_message_arguments,
)
def check_message(context: Context) -> int:
    """Exit 0 when the server would accept the message, 1 when it would refuse or defer it."""
    from mailx.checks import Authenticator
    from mailx.checks.results import strip_forged_results
    from mailx.dns import Resolver

    config = context.load_config()
    args = context.args
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        print(f"mailxctl: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_WRONG
    # Saved messages usually have LF line ends; DKIM is computed over CRLF.
    message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    message = strip_forged_results(message, config.hostname)
    mail_from = args.mail_from.strip("<>")
    resolver = Resolver(config.dns.nameservers, config.dns.timeout)
    authenticator = Authenticator(resolver, config.authentication, config.hostname)
    verdict = authenticator.check_sync(args.ip, args.helo, mail_from, message)
    lines = []
    if verdict.spf is not None:
        lines.append(f"spf={verdict.spf.result} ({verdict.spf.identity} {verdict.spf.sender}): "
                     f"{verdict.spf.reason}")
    if verdict.dkim is not None:
        if not verdict.dkim:
            lines.append("dkim=none: no DKIM-Signature")
        for result in verdict.dkim:
            lines.append(f"dkim={result.result} (d={result.domain} s={result.selector}): "
                         f"{result.reason}")
    if verdict.dmarc is not None:
        lines.append(f"dmarc={verdict.dmarc.result} (header.from={verdict.dmarc.from_domain}, "
                     f"policy={verdict.dmarc.policy}, disposition={verdict.dmarc.disposition}): "
                     f"{verdict.dmarc.reason}")
    outcome = {
        "accept": "accept: delivered to the inbox",
        "junk": "junk: filed into the Junk folder",
        "reject": f"reject: {verdict.reply}",
        "tempfail": f"defer: {verdict.reply}",
    }[verdict.action]
    lines += [f"action={outcome}", "", verdict.header]
    context.emit(verdict.as_dict(), "\n".join(lines))
    return EXIT_OK if verdict.action in ("accept", "junk") else EXIT_WRONG


# ---------------------------------------------------------------------------
# queue (SPEC section 9; mailx.storage.queue)

QUEUE_ACTIONS = ("list", "show", "flush", "remove")


def _queue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", default="list", choices=QUEUE_ACTIONS, help="default: list"
    )
    parser.add_argument("id", nargs="?", metavar="ID", help="queue ID, for show and remove")


def _ago(seconds: float) -> str:
    """``3m12s``, ``2h5m``, ``1d3h``: two units are enough to read a queue."""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return "".join(shown) or "0s"


def _queue_lines(entry: dict[str, Any], now: float) -> list[str]:
    sender = entry["sender"] or "<>"
    kind = "" if entry["kind"] == "forward" else f"  ({entry['kind']} notice)"
    lines = [f"{entry['id']}  {_ago(entry['age']):>6}  {entry['size']:>8}  {sender}{kind}"]
    for r in entry["recipients"]:
        line = f"    {r['address']}  {r['state']}  attempts={r['attempts']}"
        if r.get("transport"):
            line += f"  {r['transport']}"  # SPEC 14: handed to that LMTP server
        if r["next_attempt"] is not None:
            wait = r["next_attempt"] - now
            line += f"  next {'in ' + _ago(wait) if wait > 0 else 'now'}"
        if r["last_reply"]:
            line += f"  ({r['last_reply']})"
        if r["last_host"]:
            line += f"  via {r['last_host']}"
        lines.append(line)
    return lines


def _queue_of(config: Config) -> Any:
    from mailx.storage.queue import Queue

    return Queue(config.paths.spool / "queue")


@command(
    "queue",
    "list, show, flush (retry now) or remove the messages waiting to be forwarded",
    _queue_arguments,
)
def queue_command(context: Context) -> int:
    """``mailxctl queue [list|show ID|flush|remove ID]``.

    It reads the queue directory directly (the server keeps nothing else);
    ``flush`` leaves a request file the running server picks up within a
    second (or at its next start); ``remove`` is safe while it runs.
    """
    import time

    from mailx.storage.queue import QueueError, envelope_summary, valid_id

    args = context.args
    config = context.load_config()
    queue = _queue_of(config)
    now = time.time()
    if args.action in ("show", "remove") and (args.id is None or not valid_id(args.id)):
        print(f"mailxctl: queue {args.action} needs a queue ID", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "list":
        entries = [envelope_summary(e, now) for e in queue.scan()]
        pending = sum(1 for e in entries for r in e["recipients"] if r["state"] == "pending")
        lines = [line for e in entries for line in _queue_lines(e, now)]
        lines.append(
            f"-- {len(entries)} message(s), {pending} recipient(s) pending"
            if entries
            else "the queue is empty"
        )
        context.emit({"messages": entries, "pending": pending}, "\n".join(lines))
        return EXIT_OK
    if args.action == "show":
        try:
            envelope = queue.load(args.id)
            header = queue.read_header(args.id).decode("utf-8", "replace")
        except (QueueError, OSError) as e:
            context.emit({"id": args.id, "found": False}, f"mailxctl: {e}")
            return EXIT_WRONG
        entry = envelope_summary(envelope, now)
        entry["header"] = header
        entry["recipients"] = [
            {**shown, "mail_from": r.mail_from, "status": r.status}
            for shown, r in zip(entry["recipients"], envelope.recipients, strict=True)
        ]
        lines = _queue_lines(entry, now)
        lines.insert(1, f"    arrived {_ago(entry['age'])} ago from {envelope.client or '?'}")
        if envelope.spf or envelope.dmarc:  # they decide whether the sender gets a bounce
            lines.insert(2, f"    spf={envelope.spf or '-'} dmarc={envelope.dmarc or '-'}")
        for r in envelope.recipients:
            lines.append(
                f"    {r.address}: forwarded from <{r.original}> (the address it was sent to),"
                f" envelope sender <{r.mail_from}>"
            )
        lines += ["", header.rstrip("\r\n").replace("\r\n", "\n")]
        context.emit(entry, "\n".join(lines))
        return EXIT_OK
    if args.action == "remove":
        if not queue.remove(args.id):
            context.emit({"id": args.id, "removed": False}, f"no message {args.id} in the queue")
            return EXIT_WRONG
        context.emit({"id": args.id, "removed": True}, f"removed {args.id}")
        return EXIT_OK
    queue.request_flush()
    try:
        pid = signal_server(config, 0)  # signal 0: is it running?
    except PermissionError:  # running, as another user
        pid = -1
    if pid is None:
        text = "mailx is not running: the queue is retried when it starts"
    else:
        text = f"flush requested: mailx (pid {pid}) retries every waiting message now"
    context.emit({"flush": True, "running": pid is not None, "pid": pid}, text)
    return EXIT_OK


# ---------------------------------------------------------------------------
# trace (SPEC section 13; mailx.observe.trace)


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "id", metavar="ID", help="queue ID (of the 250 reply), or Message-ID with its <>"
    )


@command("trace", "show the whole story of one message, from the trace record", _trace_arguments)
def trace_command(context: Context) -> int:
    """Exit 0, or 1 when the record has no such message (or no record is kept)."""
    from mailx.observe import trace

    config = context.load_config()
    if not config.trace.keep_days:
        print("mailxctl trace: logging.trace.keep_days is 0: no trace record is kept",
              file=sys.stderr)
        return EXIT_WRONG
    directory = config.trace.directory(config.paths.spool)
    messages = trace.story(directory, context.args.id)
    if not messages:
        context.emit(
            {"messages": [], "id": context.args.id},
            f"no message {context.args.id} in the trace record ({directory};"
            f" it keeps {config.trace.keep_days} day(s))",
        )
        return EXIT_WRONG
    context.emit(trace.as_json(messages), trace.render(messages))
    return EXIT_OK


# ---------------------------------------------------------------------------
# reports (SPEC section 15; mailx.admin.reports)


def _reports_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="report files, messages or Maildirs (default: the reports: address's Maildir)",
    )
    parser.add_argument("--domain", help="only reports about this domain (even if not ours)")
    parser.add_argument("--since", metavar="DURATION", help="only reports of the last 7d, 12h...")
    parser.add_argument("--no-dns", action="store_true", dest="no_dns",
                        help="do not look up the PTR names of the sources")


def _reports_maildirs(config: Config) -> list[Path]:
    """The Maildir(s) the ``reports:`` address is delivered to (SPEC sections 4, 15)."""
    if not config.reports:
        raise ValueError("no reports: address in the configuration; give report files or Maildirs")
    try:
        result = Router(config).route(config.reports)
    except (RouteRefused, AddressError) as e:
        raise ValueError(f"the reports: address {config.reports} is not ours: {e}") from None
    maildirs = [
        d.maildir_path(config) for d in result.destinations if isinstance(d, MailboxDestination)
    ]
    if not maildirs:
        raise ValueError(
            f"the reports: address {config.reports} is not delivered to a mailbox here;"
            " give report files or Maildirs"
        )
    return maildirs


@command(
    "reports",
    "summarize the DMARC aggregate and TLS reports about our domains",
    _reports_arguments,
)
def reports_command(context: Context) -> int:
    """Exit 0, or 1 when any file could not be read (each named on stderr)."""
    import time

    from mailx.admin import reports
    from mailx.config import parse_duration

    args = context.args
    since = None
    if args.since:
        try:
            since = time.time() - parse_duration(args.since)
        except ValueError as e:
            print(f"mailxctl reports: --since: {e}", file=sys.stderr)
            return EXIT_USAGE
    domain = None
    if args.domain:
        try:
            domain = normalize_domain(args.domain)
        except AddressError as e:
            print(printable(f"mailxctl reports: --domain: {e}"), file=sys.stderr)
            return EXIT_USAGE
    # With paths given, the default configuration is optional: reports can
    # be read anywhere; then every domain counts as ours.
    config = None
    if not args.paths or args.config or os.path.exists(context.config_path):
        config = context.load_config()
    if args.paths:
        paths = [Path(p) for p in args.paths]
    else:
        assert config is not None
        try:
            paths = _reports_maildirs(config)
        except ValueError as e:
            print(printable(f"mailxctl reports: {e}"), file=sys.stderr)
            return EXIT_WRONG
    collected = reports.read_paths(paths)
    for path, why in collected.errors:
        print(printable(f"mailxctl reports: {path}: {why}"), file=sys.stderr)
    ours = list(config.domains) if config is not None else None
    summary = reports.summarize(collected.reports, ours, domain=domain, since=since)
    if not args.no_dns:
        from mailx.dns import Resolver

        nameservers = config.dns.nameservers if config is not None else ()
        timeout = min(config.dns.timeout, 2.0) if config is not None else 2.0
        addresses = [
            s["ip"] for d in summary["domains"] if d["shown"] for s in d["sources"]
        ]
        names = reports.lookup_ptrs(Resolver(nameservers, timeout), addresses)
        summary = reports.summarize(
            collected.reports, ours, domain=domain, since=since, ptr=names.get
        )
    summary["errors"] = [{"path": p, "error": why} for p, why in collected.errors]
    context.emit(summary, reports.render(summary))
    return EXIT_WRONG if collected.errors else EXIT_OK


# ---------------------------------------------------------------------------
# passwd, and the accounts part of check (SPEC section 11; mailx.smtp.accounts)


def _passwd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the account: a mailbox's full address")


def read_new_password() -> str | None:
    """The password: asked twice on a terminal; otherwise one line of stdin,
    its newline stripped (SPEC 11).  None, with the reason on stderr, if the
    two differ or it is empty."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            print("mailxctl passwd: the passwords do not match; nothing changed", file=sys.stderr)
            return None
        password = first
    else:
        password = sys.stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
            if password.endswith("\r"):
                password = password[:-1]
    if not password:
        print("mailxctl passwd: empty password; nothing changed", file=sys.stderr)
        return None
    return password


@command("passwd", "set an account's password in accounts.passwords", _passwd_arguments)
def passwd(context: Context) -> int:
    """``mailxctl passwd ADDRESS``: an Argon2id hash into the passwd-file, atomically;
    a running server sees the change at the next login (it watches the file)."""
    from mailx.smtp.accounts import account_mailbox, hash_password, set_password

    config = context.load_config()
    path = config.accounts.passwords
    if path is None:
        message = f"{context.config_path}: accounts.passwords is not set"
        print(printable(f"mailxctl passwd: {message}"), file=sys.stderr)
        return EXIT_WRONG
    mailbox = account_mailbox(config, context.args.address)
    if mailbox is None:
        message = f"{context.args.address} is not a mailbox: an account is a mailbox's full address"
        print(printable(f"mailxctl passwd: {message}"), file=sys.stderr)
        return EXIT_WRONG
    password = read_new_password()
    if password is None:
        return EXIT_WRONG
    try:
        set_password(path, mailbox.address, hash_password(password))
    except (OSError, ValueError) as e:
        error = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(printable(f"mailxctl passwd: cannot update {path}: {error}"), file=sys.stderr)
        return EXIT_WRONG
    context.emit(
        {"account": mailbox.address, "file": str(path), "scheme": "ARGON2ID"},
        f"{mailbox.address}: password set in {path}",
    )
    return EXIT_OK


def accounts_summary(config: Config) -> dict[str, Any] | None:
    """What each account may send as (`mailx.smtp.accounts.addresses_for`), and the
    passwd-file's problems; None when no accounts are configured.  With
    ``accounts.dovecot`` the accounts are Dovecot's: every mailbox is listed."""
    from mailx.smtp.accounts import addresses_for, parse_passwd, passwd_problems, read_passwd

    accounts = config.accounts
    warnings: list[str] = []
    if accounts.passwords is not None:
        source = str(accounts.passwords)
        try:
            data = read_passwd(accounts.passwords)
        except FileNotFoundError:
            data = b""
            warnings.append(f"{source} does not exist yet: no accounts (mailxctl passwd adds one)")
        except (OSError, ValueError) as e:
            data = b""
            warnings.append(f"cannot read {source}: {e}")
        warnings += [f"{source}: {p}" for p in passwd_problems(data)]
        names = list(dict.fromkeys(e.username for e in parse_passwd(data) if e.address))
    elif accounts.dovecot is not None:
        source = f"dovecot {accounts.dovecot}"
        names = [
            f"{m}@{name}"
            for name, domain in config.domains.items()
            if domain.alias_of is None
            for m in sorted(domain.mailboxes)
        ]
    else:
        return None
    entries = []
    router = Router(config)  # once for all the accounts
    for name in names:
        allowed = sorted(addresses_for(config, name, router))
        if not allowed:
            warnings.append(f"{name} is not a mailbox: it can log in to nothing")
        entries.append({"account": name, "send_as": allowed})
    return {"source": source, "accounts": entries, "warnings": warnings}


def render_accounts(summary: dict[str, Any]) -> list[str]:
    lines = ["", f"accounts: {summary['source']}"]
    for entry in summary["accounts"]:
        lines.append(f"  {entry['account']} sends as: {', '.join(entry['send_as']) or '(nothing)'}")
    if not summary["accounts"]:
        lines.append("  (none)")
    if summary["accounts"]:
        lines.append("  (and each of these with a subaddress, where the domain has a delimiter)")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return lines


# ---------------------------------------------------------------------------
# sieve (SPEC section 12; mailx.filters)


def _sieve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check", "test"], help="check: compile; test: run on MESSAGE")
    parser.add_argument("file", metavar="FILE", help="the Sieve script")
    parser.add_argument("message", metavar="MESSAGE", nargs="?", help="the message (sieve test)")
    parser.add_argument("--from", dest="mail_from", default="sender@example.org", help="the envelope sender")
    parser.add_argument(
        "--to", dest="rcpt_to", default="recipient@example.org",
        help="the recipient as the sender wrote it (before subaddress stripping)",
    )


@command("sieve", "compile a Sieve script, or list the actions it takes on a message", _sieve_arguments)
def sieve_command(context: Context) -> int:
    """``check``: FILE:LINE: message and exit 1 on an error; ``test``: sieve-test's listing."""
    from mailx.filters import Envelope, Message, SieveError, compile_script, format_result, run

    args = context.args
    try:
        script = Path(args.file).read_bytes()
    except OSError as e:
        print(f"mailxctl: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_WRONG
    try:
        commands = compile_script(script)
    except SieveError as e:
        context.emit(
            {"file": args.file, "line": e.line, "error": e.message},
            f"{args.file}:{e.line}: {e.message}",
        )
        return EXIT_WRONG
    if args.action == "check":
        context.emit({"file": args.file, "ok": True}, f"{args.file}: ok")
        return EXIT_OK
    if args.message is None:
        print("mailxctl: sieve test needs a MESSAGE", file=sys.stderr)
        return EXIT_USAGE
    try:
        raw = Path(args.message).read_bytes()
    except OSError as e:
        print(f"mailxctl: cannot read {args.message}: {e.strerror}", file=sys.stderr)
        return EXIT_WRONG
    to = args.rcpt_to.strip("<>")
    local, _, domain = to.rpartition("@")
    mailbox = f"{local.partition('+')[0]}@{domain}" if local else to
    result = run(commands, Message.from_bytes(raw), Envelope(args.mail_from.strip("<>"), to, mailbox))
    data = {
        "actions": [
            {k: v for k, v in vars(a).items() if v not in ("", (), None, False, 0)} | {"kind": a.kind}
            for a in result.actions
        ],
        "error": result.error,
    }
    context.emit(data, format_result(result).rstrip("\n"))
    return EXIT_WRONG if result.error else EXIT_OK


# ---------------------------------------------------------------------------
# vacation (SPEC section 12; mailx.filters.autoreply)


def _vacation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="the mailbox, e.g. alice@example.test")
    parser.add_argument("action", choices=["on", "off", "status"])
    parser.add_argument("--subject", help="the replies' subject (on)")
    parser.add_argument("--body-file", metavar="F", help="the replies' text, UTF-8 (on)")
    parser.add_argument("--days", type=int, default=7, help="one reply per sender per N days (on; default 7)")


@command("vacation", "turn a mailbox's vacation reply on or off, or show it", _vacation_arguments)
def vacation_command(context: Context) -> int:
    """Writes the rule into the active Sieve script (keeping the user's rules) or makes one."""
    import time

    from mailx.filters import SieveError, autoreply
    from mailx.filters.mailbox import ACTIVE_LINK, SCRIPT_DIRECTORY
    from mailx.filters.vacation import VacationMemory
    from mailx.smtp.accounts import account_mailbox

    args = context.args
    config = context.load_config()
    mailbox = account_mailbox(config, args.address)
    if mailbox is None:
        print(f"mailxctl: {args.address} is not a mailbox of this server", file=sys.stderr)
        return EXIT_WRONG
    home = mailbox.maildir_path(config)
    link = home / ACTIVE_LINK
    scripts = home / SCRIPT_DIRECTORY
    active: Path | None = None
    if scripts.is_symlink():
        print(f"mailxctl: {scripts} is a link: refusing to write through it", file=sys.stderr)
        return EXIT_WRONG
    if os.path.islink(link):
        # Lexically, as MailboxFilters reads it: a script of sieve/, itself no link.
        target = Path(os.path.normpath(home / os.readlink(link)))
        if target.parent == scripts and target.name.endswith(".sieve") and not target.is_symlink():
            active = target
        else:
            print(f"mailxctl: {link} does not point to a script in {scripts}", file=sys.stderr)
            return EXIT_WRONG
    elif link.exists():
        print(f"mailxctl: {link} is not a link into {scripts}: move it there first", file=sys.stderr)
        return EXIT_WRONG
    text = active.read_text("utf-8") if active is not None and active.exists() else ""
    if args.action == "status":
        rule = autoreply.current_rule(text)
        entries = VacationMemory(home).entries(time.time())
        replied = [{"sender": e.sender, "until": e.until} for e in entries]
        data = {
            "address": mailbox.address,
            "on": rule is not None,
            "subject": rule.subject if rule else None,
            "days": rule.days if rule else None,
            "script": str(active) if active else None,
            "replied": replied,
        }
        lines = [f"vacation for {mailbox.address}: {'on' if rule else 'off'}"]
        if rule:
            lines += [f"  subject: {rule.subject}", f"  days: {rule.days}", f"  script: {active}"]
        lines.append(f"  replied to (not again before the date): {len(replied)}")
        lines += [
            f"    {e.sender} until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(e.until))} UTC"
            for e in entries[-20:]
        ]
        context.emit(data, "\n".join(lines))
        return EXIT_OK
    try:
        if args.action == "on":
            if not args.subject or not args.body_file:
                print("mailxctl: vacation on needs --subject and --body-file", file=sys.stderr)
                return EXIT_USAGE
            if args.days < 1:
                print("mailxctl: --days must be at least 1", file=sys.stderr)
                return EXIT_USAGE
            body = Path(args.body_file).read_text("utf-8")
            new = autoreply.with_rule(text, autoreply.VacationRule(args.subject, body, args.days))
        else:
            new = autoreply.without_rule(text)
    except OSError as e:
        print(f"mailxctl: cannot read {args.body_file}: {e.strerror}", file=sys.stderr)
        return EXIT_WRONG
    except (ValueError, SieveError) as e:
        print(f"mailxctl: {active}: {e}", file=sys.stderr)
        return EXIT_WRONG
    if args.action == "off":
        if active is None or new == text:
            context.emit({"address": mailbox.address, "on": False}, f"vacation for {mailbox.address}: already off")
            return EXIT_OK
        if active.stem == autoreply.OWN_SCRIPT and not new.strip():
            link.unlink()  # our own script and nothing else in it: deactivate
            active.unlink()
        else:
            _write_home_file(home, active, new)
        context.emit({"address": mailbox.address, "on": False}, f"vacation for {mailbox.address}: off")
        return EXIT_OK
    if active is None:
        active = scripts / f"{autoreply.OWN_SCRIPT}.sieve"
        _write_home_file(home, active, new)
        temporary = home / f"{ACTIVE_LINK}.mailxctl"
        temporary.unlink(missing_ok=True)
        # Relative, as Pigeonhole makes it: the home may be mounted elsewhere.
        os.symlink(f"{SCRIPT_DIRECTORY}/{active.name}", temporary)
        os.replace(temporary, link)
        _give_to_owner(home, link)
    else:
        _write_home_file(home, active, new)
    context.emit(
        {"address": mailbox.address, "on": True, "script": str(active)},
        f"vacation for {mailbox.address}: on ({active})",
    )
    return EXIT_OK


def _write_home_file(home: Path, path: Path, text: str) -> None:
    """Write a file of a mailbox's home atomically, owned as the home is.

    mailxctl often runs as root; the server (and Dovecot) as the home's
    owner, who must be able to read and replace the script.
    """
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(missing):
        if not directory.exists():
            directory.mkdir(mode=0o700)
            _give_to_owner(directory.parent, directory)
    temporary = path.with_name(f".{path.name}.mailxctl")
    # Often as root in a directory its user can write: no link is followed.
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    _give_to_owner(home, temporary)
    os.replace(temporary, path)


def _give_to_owner(owner_of: Path, path: Path) -> None:
    if os.geteuid() != 0:
        return
    st = os.stat(owner_of)
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


if __name__ == "__main__":
    sys.exit(main())
