"""Sieve filters (RFC 5228 and SPEC 12's extensions), Pigeonhole-compatible.

A leaf package: `compile_script` checks a script, `run` turns (script,
message, envelope) into a `Result` of actions, `format_result` prints it as
Pigeonhole's ``sieve-test`` does.  No I/O; the filing code acts on the result.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .interpreter import (
        MAX_REDIRECTS,
        Action,
        Envelope,
        Message,
        Result,
        compile_script,
        run,
    )
    from .parser import MAX_NESTING, MAX_SCRIPT_SIZE, SieveError, parse

# The parser and the interpreter load at their first use (PEP 562): every
# server imports mailx.filters.mailbox, and only one whose mailboxes have
# Sieve scripts needs them.
_LAZY = {
    **dict.fromkeys(
        ("MAX_REDIRECTS", "Action", "Envelope", "Message", "Result", "compile_script", "run"),
        "interpreter",
    ),
    **dict.fromkeys(("MAX_NESTING", "MAX_SCRIPT_SIZE", "SieveError", "parse"), "parser"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


def format_result(result: Result) -> str:
    """The actions in the shape of ``sieve-test``'s "Performed actions"."""
    lines = ["", "Performed actions:", ""]
    explicit = [a for a in result.actions if not a.implicit]
    if not explicit:
        lines.append("  (none)")
    for a in explicit:
        lines.extend(_describe(a))
    lines += ["", "Implicit keep:", ""]
    implicit = [a for a in result.actions if a.implicit]
    if implicit:
        lines.extend(_describe(implicit[0]))
    else:
        lines.append("  (none)")
    if result.error:
        lines += ["", f"error: {result.error}"]
    return "\n".join(lines) + "\n"


def _describe(a: Action) -> list[str]:
    out: list[str] = []
    if a.kind in ("keep", "fileinto"):
        out.append(f" * store message in folder: {a.target}")
        if a.flags:
            out.append(f"        + add IMAP flags: {' '.join(a.flags)}")
        if a.create:
            out.append("        + create mailbox if it does not exist")
    elif a.kind == "redirect":
        out.append(f" * redirect message to: <{a.target}>")
    elif a.kind == "reject":
        out.append(f" * reject message with reason: {a.target.replace(chr(13) + chr(10), chr(10)).rstrip()}")
    elif a.kind == "discard":
        out.append(" * discard")
    elif a.kind == "vacation":
        out.append(" * send vacation message:")
        out.append(f"    => seconds : {a.seconds}")
        if a.subject is not None:
            out.append(f"    => subject : {a.subject}")
        if a.from_ is not None:
            out.append(f"    => from    : {a.from_}")
        # Pigeonhole's default handle is the reason and the other arguments run together.
        out.append(f"    => handle  : {a.handle or '(from the reason)'}")
        if a.reply_to:
            out.append(f"    => to      : <{a.reply_to}>")
        else:
            out.append(f"    => not sent: {a.skip_reason}")
        out += ["", "START MESSAGE", a.target.replace("\r\n", "\n").rstrip("\n"), "END MESSAGE"]
    if a.copy:
        out.append("        + preserve implicit keep")
    return out


__all__ = [
    "MAX_NESTING",
    "MAX_REDIRECTS",
    "MAX_SCRIPT_SIZE",
    "Action",
    "Envelope",
    "Message",
    "Result",
    "SieveError",
    "compile_script",
    "format_result",
    "parse",
    "run",
]
