# -*- test-case-name: tests.test_preflight -*-
"""Start-up checks that turn tracebacks into one line with the fix.

twistd calls ``makeService`` before it daemonizes and before ``--uid/--gid``
take effect, with the terminal still attached: the last moment an error can
be shown to the person who typed the command.  After that, a daemon's
errors reach the terminal only as twistd's 100-byte ``repr``, and files the
server cannot read or write as its user show up later, one message at a
time (a reload refused, a bounce sent unsigned, a 451).  So before anything
starts:

- `listen_problems`: every TCP endpoint is bound once and released (a port
  in use, a privileged port without root, an address not on this machine);
- `access_problems`: every file and directory mailx reads or writes after
  dropping privileges, checked for the user it will run as (`Need`).

The access check reads modes and owners (``os.stat``) rather than calling
``os.access``, which answers for the real uid of the caller (root, at
start-up), not for the user the server will become.
"""

from __future__ import annotations

import errno
import grp
import itertools
import os
import pwd
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Queue entries checked at start-up, of possibly very many.
QUEUE_SAMPLE = 20


@dataclass(frozen=True)
class RunAs:
    """The user the server runs as after the privilege drop."""

    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def describe(self) -> str:
        return f"user {self.name} (uid {self.uid}, gid {self.gid})"


def run_as(uid: int | None = None, gid: int | None = None) -> RunAs:
    """twistd's rule: ``--uid`` without ``--gid`` takes the user's primary group,
    and the supplementary groups are the user's (twisted.python.util.switchUID
    calls initgroups).  Neither: the current process's effective ids."""
    if uid is None:
        uid = os.geteuid()
        if gid is None:
            return RunAs(uid, os.getegid(), frozenset([os.getegid(), *os.getgroups()]))
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    if gid is None:
        gid = entry.pw_gid if entry is not None else os.getegid()
    groups = {gid}
    if entry is not None:
        groups.update(os.getgrouplist(entry.pw_name, gid))
    return RunAs(uid, gid, frozenset(groups))


def likely_server_user(config: Any) -> RunAs:
    """Whom ``mailxctl check`` checks for without ``--user``: as root, the owner of an
    existing spool (the server made or was given it), else whoever runs the check."""
    if os.geteuid() == 0:
        try:
            owner = Path(config.paths.spool).stat().st_uid
        except OSError:
            owner = 0
        if owner != 0:
            return run_as(owner)
    return run_as()


def user_named(name: str) -> RunAs:
    """`run_as` for a user name or number (``mailxctl check --user``); KeyError if unknown."""
    uid = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    return run_as(uid)


# --- what mailx touches after the drop -------------------------------------------


@dataclass(frozen=True)
class Need:
    """A path the running server reads (``"read"``) or creates files in (``"write"``)."""

    what: str  # the configuration key, for the message
    path: Path
    access: str  # "read" | "write"


def needs(config: Any) -> list[Need]:
    """Every path the server needs after the privilege drop, and why."""
    found = [Need("configuration file (re-read on reload)", Path(config.source), "read")]
    if config.tls is not None:
        # Loaded as root at start-up, but re-read as the server's user on reload.
        found.append(Need("tls.certificate", config.tls.certificate, "read"))
        found.append(Need("tls.key", config.tls.key, "read"))
    for name, domain in config.domains.items():
        if domain.dkim is not None:
            # Read at each signing (bounces, DSNs), long after the drop.
            found.append(Need(f"domains.{name}.dkim.key", domain.dkim.key, "read"))
    passwords = config.accounts.passwords
    if passwords is not None and passwords.exists():
        # Re-read as the server's user at the first login after each change
        # (missing: no accounts yet, mailxctl passwd creates it).
        found.append(Need("accounts.passwords", passwords, "read"))
    spool = config.paths.spool
    found.append(Need("paths.spool", spool, "write"))
    for sub in ("incoming", "queue"):
        if (spool / sub).exists():
            found.append(Need("paths.spool", spool / sub, "write"))
    queue = spool / "queue"
    if queue.is_dir():
        # One file per queued message, read at each attempt (and one
        # directory each, the layout start-up converts, rewritten there): a
        # sample, since ownership is all or none in practice (one chown -R).
        sample = itertools.islice(
            (p for p in queue.iterdir() if not p.name.startswith(".")), QUEUE_SAMPLE
        )
        found.extend(
            Need("paths.spool", p, "write" if p.is_dir() else "read") for p in sorted(sample)
        )
    trace = getattr(config, "trace", None)
    if trace is not None and trace.keep_days and trace.path is not None:
        # Outside the spool: its own directory (made at start, as the server's user).
        target = trace.path if trace.path.exists() else trace.path.parent
        found.append(Need("logging.trace.path", target, "write"))
    mail = config.paths.mail
    found.append(Need("paths.mail", mail, "write"))
    for name, domain in config.domains.items():
        if domain.lmtp is not None:
            continue  # filed by the LMTP server (SPEC 14): no Maildir of ours
        for mailbox in sorted(domain.mailboxes):
            box = mail / name / mailbox
            found.append(Need("paths.mail", box, "write"))
            for sub in ("tmp", "new", "cur"):
                if (box / sub).exists():
                    found.append(Need("paths.mail", box / sub, "write"))
    return found


def create_owned(config: Any, user: RunAs) -> list[Path]:
    """As root, create a missing spool or mail directory owned by ``user``.

    Only directories that do not exist yet: an existing one is the owner's
    to arrange (`access_problems` says what is wrong with it).  Missing
    parents are made as root, mode 0755, as ``install -d`` would.
    """
    if os.geteuid() != 0 or user.uid == 0:
        return []
    made = []
    for path in (config.paths.spool, config.paths.mail):
        path = Path(os.path.abspath(path))
        if path.exists() or not path.parent.is_dir() and path.parent.exists():
            continue
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
            os.chown(path, user.uid, user.gid)
        except OSError:
            continue  # access_problems names what is in the way
        made.append(path)
    return made


def access_problems(config: Any, user: RunAs) -> list[str]:
    """One line per path ``user`` cannot use as the server will, with the fix.

    Paths are handled as strings here: pathlib's overhead made a few
    thousand Maildirs take seconds.
    """
    problems = []
    seen: set[tuple[str, str]] = set()
    # Directories already reported: one line for each, not one per file below
    # it (the fix given, chown -R or chmod, covers those too).
    reported: set[str] = set()
    searchable: dict[str, bool] = {}
    for need in needs(config):
        path = os.path.abspath(need.path)
        if (path, need.access) in seen or path in reported:
            continue
        ancestors = _ancestors(path)
        if reported and any(a in reported for a in ancestors):
            continue
        seen.add((path, need.access))
        blocked = _unsearchable(ancestors, user, searchable)
        if blocked is not None:
            reported.add(blocked)
            problems.append(
                _message(need, user, Path(blocked), "cannot be searched (entered)", "search")
            )
            continue
        problem = _check(need, path, user)
        if problem is not None:
            problems.append(problem)
            if need.access == "write":
                reported.add(path)
    return problems


def _ancestors(path: str) -> list[str]:
    """The directories above an absolute ``path``, from the root down."""
    found = []
    head = os.path.dirname(path)
    while True:
        found.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    found.reverse()
    return found


def _unsearchable(ancestors: list[str], user: RunAs, cache: dict[str, bool]) -> str | None:
    """The first of ``ancestors`` that ``user`` cannot enter (a missing one is fine).

    ``cache`` remembers directories already looked at: a few thousand
    Maildirs share most of their ancestors.
    """
    for ancestor in ancestors:
        ok = cache.get(ancestor)
        if ok is None:
            ok = not os.path.exists(ancestor) or _allowed(ancestor, user, stat.S_IXUSR)
            cache[ancestor] = ok
        if not ok:
            return ancestor
    return None


def check(need: Need, user: RunAs) -> str | None:
    """Why ``user`` cannot read or write ``need.path``, or None if it can."""
    path = os.path.abspath(need.path)
    blocked = _unsearchable(_ancestors(path), user, {})
    if blocked is not None:
        return _message(need, user, Path(blocked), "cannot be searched (entered)", "search")
    return _check(need, path, user)


def _check(need: Need, path: str, user: RunAs) -> str | None:
    """`check` once the ancestors are known to be searchable."""
    existing = path
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    if need.access == "read":
        if existing != path:
            return f"{need.what}: {path}: does not exist"
        if not _allowed(path, user, stat.S_IRUSR):
            return _message(need, user, Path(path), "is not readable", "read")
        return None
    if not os.path.isdir(existing):
        if existing == path:
            return f"{need.what}: {path}: is not a directory"
        return f"{need.what}: {path}: {existing} is not a directory"
    if not _allowed(existing, user, stat.S_IWUSR | stat.S_IXUSR):
        what = (
            "is not writable"
            if existing == path
            else f"cannot be created: {existing} is not writable"
        )
        return _message(need, user, Path(existing), what, "write")
    return None


def _allowed(path: str, user: RunAs, bits: int) -> bool:
    """POSIX permission check for ``user`` (owner, then group, then other bits)."""
    if user.uid == 0:
        return True  # modes do not bind root (CAP_DAC_OVERRIDE)
    try:
        st = os.stat(path)
    except OSError:
        return False
    mode = st.st_mode
    if st.st_uid == user.uid:
        return mode & bits == bits
    if st.st_gid in user.groups:
        return mode & (bits >> 3) == bits >> 3
    return mode & (bits >> 6) == bits >> 6


def _owner(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{owner}:{group}"


def _message(need: Need, user: RunAs, path: Path, what: str, kind: str) -> str:
    st = path.stat()
    shown = f"owned by {_owner(st)}, mode {stat.S_IMODE(st.st_mode):04o}"
    try:
        group = grp.getgrgid(user.gid).gr_name
    except KeyError:
        group = str(user.gid)
    if kind == "read":
        fix = f"chgrp {group} {path} && chmod g+r {path}"
    elif kind == "write":
        fix = f"chown -R {user.name}:{group} {path}"
    else:
        fix = f"chmod o+x {path} (or keep mailx's files outside it)"
    subject = f"{need.path}: " if path != Path(os.path.abspath(need.path)) else ""
    return f"{need.what}: {subject}{path} {what} by {user.describe()} ({shown}); fix: {fix}"


# --- listening ------------------------------------------------------------------


def endpoint_address(description: str) -> tuple[int, str, int] | None:
    """``(family, interface, port)`` of a TCP endpoint string, None for others.

    By hand because Twisted has no public way to read an endpoint's address
    (``serverFromString`` hides it in private attributes).  Grammar as
    twisted.internet.endpoints: colon-separated, backslash escapes,
    positional port, ``port=`` and ``interface=`` keywords.
    """
    if description.startswith("haproxy:"):
        description = description[len("haproxy:") :]
    fields, current, escaped = [], "", False
    for c in description:
        if escaped:
            current, escaped = current + c, False
        elif c == "\\":
            escaped = True
        elif c == ":":
            fields.append(current)
            current = ""
        else:
            current += c
    fields.append(current)
    kind = fields[0] if not fields[0].isdigit() else "tcp"
    args = fields[1:] if not fields[0].isdigit() else fields
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    port_text = keywords.get("port") or (positional[0] if positional else "")
    if not port_text.isdigit():
        return None
    interface = keywords.get("interface", "::" if kind == "tcp6" else "")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    return family, interface, int(port_text)


_LISTEN_ERRORS = {
    errno.EADDRINUSE: "address already in use (another mail server running? change listen.smtp)",
    errno.EACCES: "permission denied (ports below 1024 need root: start twistd as root"
    " with --uid/--gid, or listen on a port above 1024)",
    errno.EADDRNOTAVAIL: "address not available (the interface is not an address of this"
    " machine; change listen.smtp)",
}


def listen_error(description: str, error: OSError) -> str:
    """The one line for an endpoint that cannot be bound."""
    reason = _LISTEN_ERRORS.get(error.errno or 0, error.strerror or str(error))
    return f"cannot listen on {description}: {reason}"


def listen_problems(descriptions: Sequence[str]) -> list[str]:
    """Bind each TCP endpoint once (as twistd will, SO_REUSEADDR) and release it."""
    problems = []
    for description in descriptions:
        address = endpoint_address(description)
        if address is None:
            continue
        family, interface, port = address
        if port == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
                probe.listen(1)
            except OSError as e:
                problems.append(listen_error(description, e))
    return problems


def problems(config: Any, user: RunAs, listen: bool = True) -> list[str]:
    """Everything that would stop or cripple the server, one line each."""
    listeners = (*config.listen, *config.submission, *config.submissions)
    found = listen_problems(listeners) if listen else []
    if listen and config.metrics_listen:
        found += [
            p.replace("listen.smtp", "listen.metrics") for p in listen_problems(config.metrics_listen)
        ]
    return found + access_problems(config, user)


def lines(found: Iterable[str]) -> str:
    return "\n".join(f"mailx: {problem}" for problem in found)
