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
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mailx import replies
from mailx.config import Config, ConfigError, load_config
from mailx.routing import (
    AddressError,
    ForwardDestination,
    MailboxDestination,
    Router,
    RouteRefused,
    domain_to_unicode,
)

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

    def load_config(self) -> Config:
        """The configuration; a `ConfigError` escapes to `main`, which reports it."""
        return load_config(self.config_path)

    def emit(self, data: dict[str, Any], text: str) -> None:
        """Print ``data`` as JSON under ``--json``, else ``text``."""
        if self.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            print(text)


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
            print(problem, file=sys.stderr)
        if context.json:
            print(json.dumps(_problems_json(e), indent=2, ensure_ascii=False))
        return EXIT_WRONG


# ---------------------------------------------------------------------------
# check


def _destination_json(config: Config, destination: Any) -> dict[str, Any]:
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
        lines.append(f"  postmaster → {', '.join(domain['postmaster'])}")
        if domain["dkim"]:
            lines.append(
                f"  dkim: selector {domain['dkim']['selector']}, key {domain['dkim']['key']}"
            )
    return "\n".join(lines)


@command("check", "validate the configuration and summarize domains and addresses")
def check(context: Context) -> int:
    """``mailxctl check``: a bad configuration exits 1 with one line per problem (via main)."""
    summary = summarize(context.load_config())
    context.emit(summary, render_summary(summary))
    return EXIT_OK


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
        result = Router(config).route(text)
    except AddressError as e:
        return _refused(context, text, replies.BAD_RECIPIENT_SYNTAX, (f"bad address: {e}",))
    except RouteRefused as e:
        return _refused(context, text, e.reply, e.trace)
    reply = replies.RECIPIENT_OK
    data = {
        "address": str(result.address),
        "accepted": True,
        "reply": _reply_json(reply),
        "trace": list(result.trace),
        "destinations": [_destination_json(config, d) for d in result.destinations],
    }
    lines = [str(result.address), *(f"  {step}" for step in result.trace), "delivers to:"]
    for destination in data["destinations"]:
        if destination["type"] == "mailbox":
            lines.append(f"  mailbox {destination['address']}: {destination['maildir']}")
        else:
            lines.append(f"  forward to {destination['address']}")
    lines.append(str(reply))
    context.emit(data, "\n".join(lines))
    return EXIT_OK


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
    """Send ``signum`` to the running server of ``config``; its pid, or None if not running."""
    from mailx.service import pid_path

    try:
        pid = int(pid_path(config).read_text().strip())
        os.kill(pid, signum)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


@command("reload", "make the running server re-read its configuration (SIGHUP)")
def reload(context: Context) -> int:
    """``mailxctl reload``: check the file first, so a typo is reported here, not in a log."""
    config = context.load_config()
    pid = signal_server(config, signal.SIGHUP)
    if pid is None:
        context.emit({"reloaded": False, "reason": "not running"}, "mailx is not running")
        return EXIT_WRONG
    context.emit({"reloaded": True, "pid": pid}, f"sent SIGHUP to mailx (pid {pid})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
