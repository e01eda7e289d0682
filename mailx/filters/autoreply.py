# -*- test-case-name: tests.test_vacation -*-
"""``mailxctl vacation``: a vacation rule in the active script, for users who write no Sieve.

The rule is a marked block in the active script, so the user's own rules
keep running (an ``include`` of a separate script would need Pigeonhole's
include extension, which SPEC 12 does not list).  The block goes after the
script's ``require`` commands (RFC 5228 3.2: they come first) and before
its first rule, so that no ``stop`` of the user's skips it:

    # BEGIN mailx vacation (mailxctl vacation off removes this block)
    require "vacation";
    vacation :days 7 :subject "Away" "I am away until Monday.";
    # END mailx vacation

Without an active script the block alone is ``sieve/mailx-vacation.sieve``,
activated.  Pure text functions; the command in `mailx.admin.cli` does the
files.
"""

from __future__ import annotations

from dataclasses import dataclass

from .interpreter import compile_script
from .parser import SieveError

BEGIN = "# BEGIN mailx vacation (mailxctl vacation off removes this block)"
END = "# END mailx vacation"
OWN_SCRIPT = "mailx-vacation"


@dataclass(frozen=True)
class VacationRule:
    subject: str
    body: str
    days: int


def quoted(text: str) -> str:
    """A Sieve quoted string (RFC 5228 2.4.2): only backslash and quote are escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def block(rule: VacationRule) -> str:
    body = rule.body.replace("\r\n", "\n")
    if END in body or BEGIN in body:
        raise ValueError("the body may not contain mailx's marker lines")
    return (
        f"{BEGIN}\n"
        'require "vacation";\n'
        f"vacation :days {rule.days} :subject {quoted(' '.join(rule.subject.split()))} {quoted(body)};\n"
        f"{END}\n"
    )


def without_rule(script: str) -> str:
    """The script with mailx's block taken out (unchanged if it has none)."""
    start = script.find(BEGIN + "\n")
    if start < 0:
        return script
    end = script.find("\n" + END + "\n", start)
    if end < 0:
        raise ValueError("the vacation block has no END line: edit the script by hand")
    return script[:start] + script[end + len(END) + 2 :]


def with_rule(script: str, rule: VacationRule) -> str:
    """The script with the block (replacing an earlier one), which must compile."""
    script = without_rule(script)
    commands = compile_script(script) if script.strip() else []
    lines = script.splitlines(keepends=True)
    first_rule = next((c for c in commands if c.name != "require"), None)
    if first_rule is None:
        at = len(lines)
    else:
        at = first_rule.line - 1
        if any(c.name == "require" and c.line == first_rule.line for c in commands):
            raise ValueError(
                f"line {first_rule.line} has a require and a rule: put the rule on a line of its own"
            )
    if lines and at == len(lines) and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    new = "".join(lines[:at]) + block(rule) + "".join(lines[at:])
    compile_script(new)  # SieveError if our block broke it
    return new


def current_rule(script: str) -> VacationRule | None:
    """The rule in mailx's block, if the script has one."""
    start = script.find(BEGIN + "\n")
    end = script.find("\n" + END + "\n", start)
    if start < 0 or end < 0:
        return None
    try:
        commands = compile_script(script[start : end + 1])
    except SieveError:
        return None
    for c in commands:
        if c.name == "vacation":
            tags = c.extra["tags"]
            return VacationRule(tags.get("subject", ""), c.extra["pos"][0], int(tags.get("days", 7)))
    return None
