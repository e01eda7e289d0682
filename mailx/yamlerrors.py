# -*- test-case-name: tests.test_config.YAMLSyntaxTests -*-
"""A YAML syntax error as its author would put it: what they did, and on which line.

PyYAML reports where its parser *noticed* a problem, in the parser's words
("while parsing a block mapping, expected <block end>, but found
'<block mapping start>'"), which is often lines below the mistake: a
mis-indented key, an unclosed quote or bracket only trip it up later.  This
module looks at the text again, only once parsing has failed, and names the
line the person got wrong:

- a tab in the indentation (YAML allows only spaces there);
- a ``*`` where a name was meant (``*: me``): ``*`` starts a YAML alias;
- a quote or a ``[``/``{`` opened and never closed;
- a key without its ``:``, or a value containing ``: `` unquoted;
- a line indented to no column of the lines around it: found by re-indenting
  each line above the error to a neighbour's column and keeping the change
  that lets the whole file parse.

Everything else keeps PyYAML's words, at PyYAML's line.
"""

from __future__ import annotations

import re
import time

import yaml

__all__ = ["explain"]

# The indentation search re-parses the file up to three times per line of
# the window above the error: bounded by size and by time, so that a large
# broken file still gets an answer at once (PyYAML's words, at worst).
_SEARCH_LIMIT = 64 * 1024
_SEARCH_SECONDS = 1.0
# How far above the reported line the mistake may be.
_WINDOW = 40
# libyaml's parser when PyYAML has it (it does in its wheels): ~10x faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The line breaks PyYAML counts marks by (YAML 1.1 5.4): a mark's line is an
# index into this split, not into str.split("\n").
_YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _mark_line(error: yaml.YAMLError, name: str) -> int | None:
    mark = getattr(error, name, None)
    return None if mark is None else mark.line  # 0-based


def _significant(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _without_comment(line: str) -> str:
    """The line up to a `` #`` comment outside quotes (good enough for one line)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'" and (i == 0 or line[i - 1] in " :[{,-"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _unclosed_quote(line: str) -> str | None:
    """The quote character a value on ``line`` opens and does not close, if any."""
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == "#" and (i == 0 or line[i - 1] in " \t"):
            return None
        if c in "\"'" and (i == 0 or line[i - 1] in " :[{,-?"):
            j = i + 1
            while j < n:
                if c == '"' and line[j] == "\\":
                    j += 2
                    continue
                if line[j] == c:
                    if c == "'" and j + 1 < n and line[j + 1] == "'":
                        j += 2  # '' is a quote inside single quotes
                        continue
                    break
                j += 1
            if j >= n:
                return c
            i = j + 1
            continue
        i += 1
    return None


def _parses(text: str) -> bool:
    try:
        yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return False
    return True


def _empty_blocks(lines: list[str], significant: list[int]) -> int:
    """How many ``key:`` lines open a block that nothing is nested in."""
    count = 0
    for position, i in enumerate(significant):
        if not _without_comment(lines[i]).rstrip().endswith(":"):
            continue
        if position + 1 == len(significant):
            count += 1
            continue
        following = lines[significant[position + 1]]
        here, there = _indent(lines[i]), _indent(following)
        if there < here or (there == here and not following.lstrip().startswith("- ")):
            count += 1
    return count


def _indentation_culprit(lines: list[str], upto: int) -> int | None:
    """The line (0-based) whose re-indentation to a neighbour's column makes the file parse.

    A change that leaves a ``key:`` with nothing nested under it is not a
    fix.  Among several, the one leaving fewest such keys wins, then the one
    to the column most lines of the file use (a mis-indented line is the odd
    one out), then the topmost.
    """
    significant = [i for i, line in enumerate(lines) if _significant(line)]
    empty = _empty_blocks(lines, significant)
    deadline = time.monotonic() + _SEARCH_SECONDS
    columns: dict[int, int] = {}
    for i in significant:
        columns[_indent(lines[i])] = columns.get(_indent(lines[i]), 0) + 1
    found: list[tuple[int, int, int, int]] = []
    # Nearest the error first: if time runs out, the likeliest were tried.
    window = [(pos, i) for pos, i in enumerate(significant) if upto - _WINDOW <= i <= upto]
    for position, i in reversed(window):
        here = _indent(lines[i])
        prev = _indent(lines[significant[position - 1]]) if position > 0 else 0
        after = (
            _indent(lines[significant[position + 1]]) if position + 1 < len(significant) else 0
        )
        for column in dict.fromkeys((after, prev, prev + 2)):
            if column == here:
                continue
            if time.monotonic() > deadline:
                return min(found)[2] if found else None
            trial = list(lines)
            trial[i] = " " * column + lines[i].lstrip(" ")
            left_empty = _empty_blocks(trial, significant)
            if left_empty <= empty and _parses("\n".join(trial)):
                found.append((left_empty, -(columns.get(column, 0)), i, column))
    if not found:
        return None
    return min(found)[2]


def _spaces(n: int) -> str:
    return "1 space" if n == 1 else f"{n} spaces"


def _neighbour_columns(lines: list[str], index: int) -> str:
    above = next((lines[i] for i in range(index - 1, -1, -1) if _significant(lines[i])), None)
    below = next((lines[i] for i in range(index + 1, len(lines)) if _significant(lines[i])), None)
    parts = []
    if above is not None:
        parts.append(f"the line above has {_indent(above)}")
    if below is not None:
        parts.append(f"the line below {_indent(below)}" if parts else f"the line below has {_indent(below)}")
    return ", ".join(parts)


def explain(error: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line, message) for a YAML error in ``text``, in the author's terms."""
    problem = getattr(error, "problem", None) or ""
    context = getattr(error, "context", None) or ""
    problem_line = _mark_line(error, "problem_mark")
    context_line = _mark_line(error, "context_mark")
    reported = problem_line if problem_line is not None else context_line
    lines = _YAML_LINE_BREAK.split(text)
    upto = reported if reported is not None else len(lines) - 1

    # A tab in the indentation: PyYAML says "found character '\t' that cannot
    # start any token", often lines later, or parses it as part of a value.
    for i, line in enumerate(lines[: upto + 1]):
        lead = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in lead and line.strip():
            return i + 1, "a tab in the indentation: YAML needs spaces"

    # `*: me` or `key: *`: an alias without a name.
    if "while scanning an alias" in context and context_line is not None:
        shown = lines[context_line].strip()
        fixed = shown.replace("*", '"*"', 1)
        return context_line + 1, (
            f"'*' starts a YAML alias; to mean a literal *, quote it: {fixed}"
        )
    if problem.startswith("found undefined alias"):
        name = problem.rsplit(" ", 1)[-1].strip("'")
        return upto + 1, (
            f"'*{name}' refers to an anchor '&{name}' that is not defined above;"
            f" to mean the text, quote it: \"*{name}\""
        )

    # A quote opened and not closed: the error comes where the string ends.
    for i, line in enumerate(lines[: upto + 1]):
        if _significant(line):
            quote = _unclosed_quote(line)
            if quote is not None:
                return i + 1, f"the quote {quote} opened on this line is not closed"

    # [ or { opened and not closed: PyYAML's context mark is the opening one.
    for kind, opener, closer in (("sequence", "[", "]"), ("mapping", "{", "}")):
        if f"while parsing a flow {kind}" in context and context_line is not None:
            return context_line + 1, f"the {opener} opened on this line is not closed with {closer}"

    # A key without its colon runs into the next line as one plain scalar.
    if "could not find expected ':'" in problem and context_line is not None:
        shown = _without_comment(lines[context_line]).strip()
        return context_line + 1, f"'{shown}' has no ':' after its key (write key: value)"
    if reported is not None and (
        problem == "mapping values are not allowed here" or "expected <block end>" in problem
    ):
        here = _without_comment(lines[reported])
        above = next(
            (i for i in range(reported - 1, -1, -1) if _significant(lines[i])), None
        )
        if above is not None:
            shown = _without_comment(lines[above]).strip()
            if ":" not in shown and not shown.startswith(("-", "[", "{")):
                return above + 1, f"'{shown}' has no ':' after its key (write key: value)"
        if problem == "mapping values are not allowed here" and re.search(r":\s.*:(\s|$)", here):
            return reported + 1, (
                "a value containing ': ' must be quoted, e.g. key: \"a: b\""
            )
        for opener, closer in ("[]", "{}"):
            if here.count(closer) > here.count(opener):
                return reported + 1, f"a {closer} on this line closes no {opener}"

    if "expected <block end>, but found '-'" in f"{context}, {problem}":
        return upto + 1, (
            "a list item ('- ') where a key was expected: write key: [a, b],"
            " or put the items under a key of their own"
        )

    if len(text) <= _SEARCH_LIMIT and reported is not None:
        culprit = _indentation_culprit(lines, upto)
        if culprit is not None:
            return culprit + 1, (
                f"wrong indentation ({_spaces(_indent(lines[culprit]))};"
                f" {_neighbour_columns(lines, culprit)}): the keys of one block start in the"
                " same column, a block nested under a key further right"
            )

    if "cannot start any token" in problem and reported is not None:
        char = re.search(r"found character '(.+?)'", problem)
        if char:
            return reported + 1, (
                f"a value cannot start with {char.group(1)} in YAML: quote it"
            )

    if "expected <block end>" in problem or "expected <block end>" in context:
        return (None if reported is None else reported + 1), (
            "this line does not fit the block above it: check its indentation"
            " and that the line above ends as it should"
        )

    message = f"{context}, {problem}" if context and problem else problem or context or str(error)
    return (None if reported is None else reported + 1), f"YAML syntax error: {message}"
