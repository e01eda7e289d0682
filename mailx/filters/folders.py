# -*- test-case-name: tests.test_filters_mailbox -*-
"""Sieve folder names and flags as Dovecot stores them in a Maildir++ home.

With the inbox namespace's ``separator = /`` Dovecot shows the folder
``.Work.Clients`` as ``Work/Clients``; non-ASCII names are on disk in IMAP's
modified UTF-7 (RFC 3501 5.1.3).  A name Dovecot would refuse is refused
here too, and no accepted name can leave the mailbox's home: the result is
one path component that starts with "." and holds no "/".
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

SEPARATOR = "/"
# A filename: Linux's NAME_MAX, for the whole ".A.B" component.
MAX_FOLDER_NAME = 255
# RFC 5232 2.3 system flags and the Maildir info letter each is stored as.
SYSTEM_FLAGS = {"\\seen": "S", "\\answered": "R", "\\flagged": "F", "\\deleted": "T", "\\draft": "D"}


class FolderError(ValueError):
    """A Sieve folder name that Dovecot would not accept."""


def mutf7(name: str) -> str:
    """RFC 3501 5.1.3 modified UTF-7.

    Written here because the codec is twenty lines and no library in our
    dependencies has it (the standard library's "utf-7" is RFC 2152's,
    with "+" and "/", which IMAP replaced by "&" and ",").
    """
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            pending.append(c)
    flush()
    return "".join(out)


def maildir_folder(name: str) -> str:
    """The Maildir++ folder for a Sieve folder name, without its leading dot.

    "" is INBOX.  `FolderError` for what Dovecot refuses with a Maildir++
    layout: empty parts (``A//B``, a leading or trailing "/"), "." in a
    part (it is the separator on disk, so ``..`` and ``A.B`` too), control
    characters, and names too long for a file name.
    """
    if name.upper() == "INBOX":
        return ""
    if not name:
        raise FolderError("empty folder name")
    parts = name.split(SEPARATOR)
    for part in parts:
        if not part:
            raise FolderError(f"folder name {name!r} has an empty part")
        if "." in part:
            raise FolderError(f"folder name {name!r} contains '.'")
        if any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 for c in part):
            raise FolderError(f"folder name {name!r} contains a control character")
        if part.startswith("~"):
            # Dovecot refuses a name starting with "~" (home-relative paths).
            raise FolderError(f"folder name {name!r} starts with '~'")
    encoded = ".".join(mutf7(p) for p in parts)
    if len(encoded.encode()) + 1 > MAX_FOLDER_NAME:
        raise FolderError(f"folder name {name!r} is too long")
    return encoded


def maildir_flags(flags: Iterable[str]) -> str:
    """imap4flags' system flags as Maildir info letters, in ASCII order.

    Keywords (flags without a backslash) are left out: Maildir stores them
    as letters mapped in a per-folder dovecot-keywords file that Dovecot
    owns.
    """
    return "".join(sorted({SYSTEM_FLAGS[f.lower()] for f in flags if f.lower() in SYSTEM_FLAGS}))
