# -*- test-case-name: tests.test_accounts -*-
"""Accounts for authenticated submission (SPEC section 11): who may log in, and
what each account may send as.

Two sources of accounts, one interface (`IAccounts`):

- `PasswdFileAccounts` reads a file in Dovecot's passwd-file format
  (``alice@example.test:{ARGON2ID}$argon2id$...``), so Dovecot can use the
  very same file as its passdb and IMAP and submission share one password.
  The file is re-read when its inode, size, mtime or ctime change: a
  running server picks up ``mailxctl passwd`` without a restart or reload.
- `DovecotAuthAccounts` asks Dovecot's auth service instead, over its
  auth-client protocol (as Postfix's ``smtpd_sasl_type = dovecot`` does).

Hash checks cost tens of milliseconds of CPU (Argon2: 64 MiB of memory
too) and never run on the reactor thread: they run in a small pool of their
own, whose size bounds the memory and CPU that logins can take.  An
unknown user is checked against a hash like the file's own (`decoy_hash`),
so timing does not tell which accounts exist.

Send-as (`addresses_for`, `may_send_as`) is a pure function of the
configuration: the account's mailbox address and its subaddresses, every
mailbox or alias name whose expansion delivers to it (in its domain and in
any other of ours, ``alias_of`` domains included), and its
``accounts.send_as`` entries; never through a catch-all.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mailx.address import AddressError, parse_address, split_subaddress
from mailx.inbound.routing import MailboxDestination, Router

if TYPE_CHECKING:
    from mailx.config import Config

log = Logger()


# ---------------------------------------------------------------------------
# The seam


@dataclass(frozen=True)
class Account:
    """An authenticated account: a mailbox's full address, normalized
    (local part and domain lower case, domain as IDNA A-labels)."""

    address: str


class AccountsUnavailable(Exception):
    """The accounts cannot be checked just now (Dovecot down, file unreadable,
    too many checks waiting): a temporary failure, 454 4.7.0 (RFC 4954 6)."""


class IAccounts(Interface):
    """Where submission checks a username and password."""

    def authenticate(username: str, password: str, remote_ip: str | None = None) -> Any:
        """A Deferred firing with the `Account`, or None for a wrong user or
        password; failing with `AccountsUnavailable` for a temporary failure.
        ``remote_ip`` is the client's address, for the backend's own logs."""


def normalize_username(username: str) -> str | None:
    """The account name a login means: the address, normalized as routing
    normalizes addresses (Dovecot's default ``auth_username_format = %Lu``
    lower-cases the name as well); None if it is not an address."""
    try:
        address = parse_address(username)
    except AddressError:
        return None
    if address.domain.startswith("["):
        return None
    return str(address)


# ---------------------------------------------------------------------------
# Password hashes: the schemes Dovecot writes


# What `mailxctl passwd` writes: doveadm pw's own ARGON2ID parameters
# (t=3, 64 MiB, one lane), which every Dovecot build verifies; RFC 9106 4
# recommends these as its second choice, for memory-constrained servers.
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 65536
ARGON2_PARALLELISM = 1

# Accepted when reading.  Weaker schemes that Dovecot also knows (PLAIN,
# CRYPT's DES, MD5-CRYPT, SHA, SSHA, ...) are refused: a stolen file of such
# hashes gives the passwords away.  `mailxctl check` names the lines.
SCHEMES = ("ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT")

# A hash without "{SCHEME}" is Dovecot's default_pass_scheme, CRYPT: libc's
# crypt(3), which recognizes the modern hashes by their prefix.
_CRYPT_PREFIXES = (
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
    ("$2y$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2a$", "BLF-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
)


def hash_scheme(stored: str) -> tuple[str, str]:
    """(scheme, hash) of a passwd-file password field, the scheme upper case;
    the scheme is "" when it cannot be told."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 0:
            scheme = stored[1:end].upper()
            # Dovecot's ".b64"/".hex" encodings are for digest schemes, which we refuse.
            return scheme, stored[end + 1 :]
    for prefix, scheme in _CRYPT_PREFIXES:
        if stored.startswith(prefix):
            return scheme, stored
    return "", stored


def scheme_problem(stored: str) -> str | None:
    """Why a stored password cannot be used, or None."""
    scheme, hashed = hash_scheme(stored)
    if not scheme:
        return "no {SCHEME} prefix and not a crypt hash mailx knows"
    if scheme not in SCHEMES:
        return f"scheme {scheme} is not accepted (use {', '.join(SCHEMES)}; mailxctl passwd writes ARGON2ID)"
    expected = {
        "ARGON2ID": "$argon2id$",
        "ARGON2I": "$argon2i$",
        "SHA512-CRYPT": "$6$",
        "SHA256-CRYPT": "$5$",
    }.get(scheme)
    if expected is not None and not hashed.startswith(expected):
        return f"a {scheme} hash starts with {expected}"
    if scheme == "BLF-CRYPT" and not hashed.startswith(("$2y$", "$2b$", "$2a$")):
        return "a BLF-CRYPT hash starts with $2y$"
    return None


def hash_password(password: str) -> str:
    """The passwd-file field for ``password``: ``{ARGON2ID}$argon2id$...``.  Blocking."""
    from argon2 import PasswordHasher

    hasher = PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_KIB,
        parallelism=ARGON2_PARALLELISM,
    )
    return "{ARGON2ID}" + hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the passwd-file field ``stored``.  Blocking
    (tens of milliseconds of CPU); the libraries compare in constant time."""
    if scheme_problem(stored) is not None:
        return False
    scheme, hashed = hash_scheme(stored)
    secret = password.encode("utf-8")
    try:
        if scheme in ("ARGON2ID", "ARGON2I"):
            from argon2.exceptions import InvalidHashError, VerificationError
            from argon2.low_level import Type, verify_secret

            kind = Type.ID if scheme == "ARGON2ID" else Type.I
            try:
                return verify_secret(hashed.encode("ascii"), secret, kind)
            except (VerificationError, InvalidHashError):
                return False
        if scheme == "BLF-CRYPT":
            import bcrypt

            # crypt_blowfish (Dovecot's BLF-CRYPT) uses the first 72 octets and
            # ignores the rest; bcrypt 5 refuses longer input instead.
            return bcrypt.checkpw(secret[:72], hashed.encode("ascii"))
        # SHA-crypt: Python 3.13 has no crypt module; libpass (the maintained
        # fork of passlib) implements it by Drepper's specification.
        from passlib.hash import sha256_crypt, sha512_crypt

        handler = sha512_crypt if scheme == "SHA512-CRYPT" else sha256_crypt
        return bool(handler.verify(secret, hashed))
    except (ValueError, TypeError, UnicodeError):
        return False  # a malformed hash is a wrong password, never a crash


def decoy_hash(table: Mapping[str, str]) -> str:
    """What an unknown user's password is checked against, result unused, so
    that it costs what a known user's check costs: a hash of the file's most
    common scheme and parameters (one of its own entries), else `_dummy`.
    A file of one kind (mailxctl passwd writes only Argon2id) leaks nothing;
    a mixed one tells its rarer schemes' users apart from unknown ones."""
    kinds: dict[str, list[str]] = {}
    for stored in table.values():
        if scheme_problem(stored) is None:
            scheme, hashed = hash_scheme(stored)
            # Scheme and cost: "$argon2id$v=19$m=65536,t=3,p=1", "$2y$05", "$6$rounds=N".
            cost = hashed.rsplit("$", 2)[0] if scheme.startswith("ARGON2") else hashed[:7]
            kinds.setdefault(f"{scheme} {cost}", []).append(stored)
    if not kinds:
        return _dummy()
    return max(kinds.values(), key=len)[0]


# A real hash of a random password, made once: an unknown user costs what a
# known one does (same scheme and parameters as mailxctl passwd writes).
_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def _dummy() -> str:
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = hash_password(base64.b64encode(os.urandom(18)).decode())
        return _dummy_hash


# ---------------------------------------------------------------------------
# The passwd-file


# A passwd-file line is about 150 octets: 16 MiB is 100,000 accounts.
MAX_PASSWD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class PasswdEntry:
    line: int
    username: str  # normalized, or as written when it is not an address
    password: str
    address: bool  # whether username is an address


def parse_passwd(data: bytes) -> list[PasswdEntry]:
    """Dovecot passwd-file lines, ``user:password:uid:gid:gecos:home:shell:extra``;
    only the first two fields matter here.  Blank lines and ``#`` comments skipped."""
    entries = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, _, rest = line.partition(":")
        password = rest.split(":", 1)[0]
        normal = normalize_username(user)
        entries.append(PasswdEntry(number, normal or user, password, normal is not None))
    return entries


def passwd_problems(data: bytes) -> list[str]:
    """What `mailxctl check` warns about in a passwd-file: bad names, refused
    schemes, duplicates (Dovecot, as we do, uses the first)."""
    problems = []
    seen: dict[str, int] = {}
    for entry in parse_passwd(data):
        if not entry.address:
            problems.append(f"line {entry.line}: '{entry.username}' is not an address")
            continue
        if entry.username in seen:
            problems.append(
                f"line {entry.line}: {entry.username} again (line {seen[entry.username]} is used)"
            )
            continue
        seen[entry.username] = entry.line
        problem = scheme_problem(entry.password)
        if problem:
            problems.append(f"line {entry.line}: {entry.username}: {problem}")
    return problems


def _table(data: bytes) -> dict[str, str]:
    table: dict[str, str] = {}
    for entry in parse_passwd(data):
        if entry.address:
            table.setdefault(entry.username, entry.password)
    return table


def read_passwd(path: Path) -> bytes:
    """The file's bytes, at most MAX_PASSWD_BYTES; ValueError if larger."""
    with open(path, "rb") as f:
        data = f.read(MAX_PASSWD_BYTES + 1)
    if len(data) > MAX_PASSWD_BYTES:
        raise ValueError(f"{path} is larger than {MAX_PASSWD_BYTES // 2**20} MiB")
    return data


def set_password_text(data: bytes, username: str, field: str) -> bytes:
    """The file ``data`` with ``username``'s password field set to ``field``:
    its other fields, every other line and comment kept; appended if new."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        if text.lstrip().startswith("#"):
            continue
        user, colon, rest = raw.partition(b":")
        if normalize_username(user.decode("utf-8", "replace")) == username:
            tail = rest.split(b":", 1)[1:] if colon else []
            lines[i] = b":".join([user, field.encode("ascii"), *tail])
            break
    else:
        lines.append(f"{username}:{field}".encode("ascii"))
    return b"\n".join(lines) + b"\n"


def write_passwd(path: Path, data: bytes) -> None:
    """Replace the file atomically (a temporary file, fsync, rename, fsync of
    the directory): a reader sees the old file or the new, never half.  An
    existing file keeps its mode and owner; a new one is 0640 (SPEC 11), so
    Dovecot's group can read it and other users cannot."""
    directory = path.parent
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if old is not None:
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file stays ours, as it was if we could write it
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        else:
            os.fchmod(fd, 0o640)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_password(path: Path, username: str, field: str) -> None:
    """Set ``username``'s password field in the file at ``path`` (created if
    missing).  Two at once do not lose each other's change: the read, edit
    and rename happen under an exclusive lock on the directory (the file
    itself is replaced, so a lock on it would guard the old one)."""
    import fcntl

    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            data = read_passwd(path)
        except FileNotFoundError:
            data = b""
        write_passwd(path, set_password_text(data, username, field))
    finally:
        os.close(dir_fd)  # releases the lock


# The pool for hash checks: two threads bound what logins cost (2 x 64 MiB
# for Argon2, two cores' worth of CPU at worst) whatever arrives at once.
AUTH_THREADS = 2
# Checks waiting beyond this are refused at once as temporary failures: a
# flood of logins gets 454 instead of an ever longer queue.
MAX_PENDING = 64


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the file is rewritten or edited in place."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@implementer(IAccounts)
class PasswdFileAccounts:
    """Accounts from a Dovecot passwd-file, re-read whenever it changes."""

    def __init__(self, path: Path, reactor: Any = None, pool: ThreadPool | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = Path(path)
        self.reactor = reactor
        self._own_pool = pool is None
        self.pool = pool or ThreadPool(minthreads=0, maxthreads=AUTH_THREADS, name="mailx-auth")
        self._trigger: Any = None
        self._lock = threading.Lock()
        self._key: tuple[int, ...] | None = None
        self._table: dict[str, str] = {}
        self._decoy: str | None = None
        self._pending = 0

    def _start(self) -> None:
        """Start our pool at the first login, not at construction: twistd
        builds services before it daemonizes, and a fork keeps no threads."""
        if self._own_pool and not self.pool.started:
            self.pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)

    def close(self) -> None:
        """Stop the pool this object made (at reactor shutdown, or by a test)."""
        if self._own_pool and self.pool.started:
            self.pool.stop()
            if self._trigger is not None:
                try:
                    self.reactor.removeSystemEventTrigger(self._trigger)
                except (ValueError, KeyError):
                    pass
                self._trigger = None

    def authenticate(
        self, username: str, password: str, remote_ip: str | None = None
    ) -> defer.Deferred:
        if self._pending >= MAX_PENDING:
            log.warn(
                "authentication refused: {pending} checks already waiting",
                pending=self._pending,
            )
            return defer.fail(AccountsUnavailable("too many authentication checks at once"))
        self._pending += 1
        self._start()
        d = deferToThreadPool(self.reactor, self.pool, self._check, username, password)

        def done(result: Any) -> Any:
            self._pending -= 1
            return result

        return d.addBoth(done)

    # -- in the pool -------------------------------------------------------

    def _check(self, username: str, password: str) -> Account | None:
        table, decoy = self._current()
        name = normalize_username(username)
        stored = table.get(name) if name is not None else None
        if name is None or stored is None or scheme_problem(stored) is not None:
            verify_password(decoy, password)
            return None
        return Account(name) if verify_password(stored, password) else None

    def _current(self) -> tuple[dict[str, str], str]:
        """The table and its decoy hash, re-read if the file changed since the
        last look (a stat)."""
        with self._lock:
            try:
                key = _stat_key(os.stat(self.path))
            except FileNotFoundError:
                if self._key != ():
                    log.warn(
                        "accounts file {path} does not exist: no accounts", path=str(self.path)
                    )
                self._key, self._table, self._decoy = (), {}, None
                return self._table, _dummy()
            except OSError as e:
                log.error(
                    "cannot read accounts file {path}: {error}",
                    path=str(self.path),
                    error=e.strerror,
                )
                raise AccountsUnavailable(str(e)) from None
            if key != self._key:
                try:
                    data = read_passwd(self.path)
                except (OSError, ValueError) as e:
                    error = e.strerror if isinstance(e, OSError) else str(e)
                    log.error(
                        "cannot read accounts file {path}: {error}",
                        path=str(self.path),
                        error=error,
                    )
                    raise AccountsUnavailable(error) from None
                self._table = _table(data)
                self._decoy = decoy_hash(self._table)
                self._key = key
                log.info(
                    "accounts file {path} read: {count} accounts",
                    path=str(self.path),
                    count=len(self._table),
                )
            return self._table, self._decoy or _dummy()


# ---------------------------------------------------------------------------
# Dovecot's auth service


def tab_unescape(text: str) -> str:
    """Dovecot's tab-escaping: \\001 then 0 (NUL), 1 (\\001), t, r, n (or l)."""
    if "\x01" not in text:
        return text
    out = []
    it = iter(text)
    for c in it:
        if c != "\x01":
            out.append(c)
            continue
        nxt = next(it, "")
        out.append(
            {"0": "\0", "1": "\x01", "t": "\t", "r": "\r", "n": "\n", "l": "\n"}.get(nxt, nxt)
        )
    return "".join(out)


def tab_escape(text: str) -> str:
    return (
        text.replace("\x01", "\x011")
        .replace("\0", "\x010")
        .replace("\t", "\x01t")
        .replace("\r", "\x01r")
        .replace("\n", "\x01n")
    )


class DovecotAuthProtocol(LineOnlyReceiver):
    """One connection to Dovecot's auth-client socket: the handshake, then
    AUTH requests multiplexed by id (Dovecot Authentication Protocol 1.x)."""

    delimiter = b"\n"
    # The protocol document expects lines to fit 16384 octets.
    MAX_LENGTH = 16384
    # Set by makeConnection before any callback that uses it.
    transport: ITransport

    def __init__(self) -> None:
        self.ready: defer.Deferred = defer.Deferred(lambda _: self.transport.loseConnection())
        self.lost = False
        self.mechanisms: set[str] = set()
        self.requests: dict[int, tuple[defer.Deferred, str]] = {}
        self._next_id = 1
        self._version_ok = False

    def connectionMade(self) -> None:
        self.sendLine(b"VERSION\t1\t2")
        self.sendLine(f"CPID\t{os.getpid()}".encode("ascii"))

    def lineReceived(self, line: bytes) -> None:
        fields = [tab_unescape(f) for f in line.decode("utf-8", "replace").split("\t")]
        verb = fields[0]
        if not self.ready.called:
            self._handshake(verb, fields)
            return
        if verb in ("OK", "FAIL", "CONT") and len(fields) > 1 and fields[1].isdigit():
            self._reply(verb, int(fields[1]), fields[2:])

    def _handshake(self, verb: str, fields: list[str]) -> None:
        if verb == "VERSION":
            if len(fields) < 2 or fields[1] != "1":
                self._fail_handshake(f"Dovecot speaks auth protocol version {fields[1:]}, not 1")
            self._version_ok = True
        elif verb == "MECH" and len(fields) > 1:
            self.mechanisms.add(fields[1].upper())
        elif verb == "DONE":
            if not self._version_ok:
                self._fail_handshake("no VERSION from Dovecot")
            elif "PLAIN" not in self.mechanisms:
                self._fail_handshake("Dovecot does not offer PLAIN (auth_mechanisms)")
            else:
                self.ready.callback(self)

    def _fail_handshake(self, why: str) -> None:
        if not self.ready.called:
            self.ready.errback(AccountsUnavailable(why))
        self.transport.loseConnection()

    def authenticate(self, username: str, password: str, remote_ip: str | None) -> defer.Deferred:
        request_id = self._next_id
        self._next_id += 1
        # RFC 4616: message = [authzid] NUL authcid NUL passwd
        response = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
        # "secured": submission takes AUTH only over TLS (SPEC 11), which is
        # what Dovecot's disable_plaintext_auth asks for.
        fields = ["AUTH", str(request_id), "PLAIN", "service=smtp", "secured"]
        if remote_ip:
            fields.append(f"rip={tab_escape(remote_ip)}")
        fields.append(f"resp={response}")
        # Cancelled (timed out): forget it, so a late reply finds nothing.
        d: defer.Deferred = defer.Deferred(lambda _: self.requests.pop(request_id, None) and None)
        self.requests[request_id] = (d, username)
        self.sendLine("\t".join(fields).encode("ascii", "replace"))
        return d

    def _reply(self, verb: str, request_id: int, args: list[str]) -> None:
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return
        d, username = entry
        if d.called:  # timed out meanwhile
            return
        options = dict(a.partition("=")[::2] for a in args)
        if verb == "OK":
            name = normalize_username(options.get("user", "")) or username
            d.callback(Account(name))
        elif verb == "FAIL":
            # Dovecot 2.3 says code=temp_fail; older ones a bare "temp".
            if "temp" in options or options.get("code") == "temp_fail":
                d.errback(AccountsUnavailable(options.get("reason") or "temporary failure"))
            else:
                d.callback(None)
        else:  # CONT: PLAIN with an initial response needs no second round
            self.sendLine(f"CANCEL\t{request_id}".encode("ascii"))
            d.callback(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("Dovecot auth: line over {limit} octets; disconnecting", limit=self.MAX_LENGTH)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if not self.ready.called:
            self.ready.errback(AccountsUnavailable("Dovecot closed the connection"))
        requests, self.requests = self.requests, {}
        for d, _ in requests.values():
            if not d.called:
                d.errback(AccountsUnavailable("Dovecot closed the connection"))


@implementer(IAccounts)
class DovecotAuthAccounts:
    """Accounts checked by Dovecot's auth service: one connection, made on
    first use and again after it is lost; each request with a timeout."""

    # Dovecot delays a failure by auth_failure_delay (2 s) and more under
    # its own penalty; 15 s is ample for a healthy service.
    timeout = 15.0

    def __init__(self, endpoint: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.endpoint_string = endpoint
        self.endpoint = clientFromString(reactor, endpoint)
        self._protocol: DovecotAuthProtocol | None = None
        self._waiters: list[defer.Deferred] = []
        self._in_flight = 0

    def _connected(self) -> defer.Deferred:
        """The ready connection: the current one, or a new one once its handshake is done."""
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return defer.succeed(protocol)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            d = self.endpoint.connect(Factory.forProtocol(DovecotAuthProtocol))
            d.addCallback(lambda p: p.ready)
            # A service that accepts but never finishes its handshake is given
            # up on like one that does not answer (the canceller drops it).
            d.addTimeout(self.timeout, self.reactor)
            d.addCallbacks(self._ready, self._unavailable)
        return waiter

    def _ready(self, protocol: DovecotAuthProtocol) -> None:
        self._protocol = protocol
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # not already timed out
                waiter.callback(protocol)

    def _unavailable(self, failure: Any) -> None:
        error = failure.value
        if not isinstance(error, AccountsUnavailable):
            error = AccountsUnavailable(str(error) or type(error).__name__)
        log.error(
            "Dovecot auth at {endpoint} unavailable: {error}",
            endpoint=self.endpoint_string,
            error=str(error),
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error)

    def authenticate(
        self, username: str, password: str, remote_ip: str | None = None
    ) -> defer.Deferred:
        if "\0" in username or "\0" in password:
            return defer.succeed(None)  # PLAIN cannot carry NUL inside a field (RFC 4616 2)
        if self._in_flight >= MAX_PENDING:
            return defer.fail(AccountsUnavailable("too many authentication checks at once"))
        self._in_flight += 1
        d = self._connected()
        d.addCallback(lambda protocol: protocol.authenticate(username, password, remote_ip))

        def timed_out(result: Any, timeout: float) -> None:
            raise AccountsUnavailable(f"Dovecot auth did not answer in {timeout:g}s")

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)

        def done(result: Any) -> Any:
            self._in_flight -= 1
            return result

        return d.addBoth(done)

    def close(self) -> None:
        if self._protocol is not None and not self._protocol.lost:
            self._protocol.transport.loseConnection()


def accounts_from_config(config: Config, reactor: Any = None) -> IAccounts | None:
    """The accounts source ``config.accounts`` names, or None when it names none."""
    accounts = config.accounts
    if accounts.passwords is not None:
        return PasswdFileAccounts(accounts.passwords, reactor)
    if accounts.dovecot is not None:
        return DovecotAuthAccounts(accounts.dovecot, reactor)
    return None


# ---------------------------------------------------------------------------
# Send-as (SPEC 11): pure functions of the configuration


def account_mailbox(config: Config, address: str) -> MailboxDestination | None:
    """The mailbox an account name is, or None: the address must be a mailbox
    of one of our (non-alias) domains, exactly (no alias, no subaddress)."""
    try:
        parsed = parse_address(address)
    except AddressError:
        return None
    domain = config.domains.get(parsed.domain)
    if domain is None or domain.alias_of is not None or parsed.local not in domain.mailboxes:
        return None
    return MailboxDestination(parsed.domain, parsed.local)


def _canonical(config: Config, domain: str) -> str | None:
    found = config.domains.get(domain)
    if found is None:
        return None
    return found.alias_of or domain


def _name_in(config: Config, domain: str, local: str) -> str | None:
    """The mailbox or alias name ``local`` means in canonical ``domain``: as
    written, else with the subaddress stripped; never the catch-all."""
    config_domain = config.domains[domain]

    def names(name: str) -> bool:
        return name in config_domain.mailboxes or (name != "*" and name in config_domain.aliases)

    if names(local):
        return local
    base, tag = split_subaddress(local, config_domain.subaddress_delimiter)
    return base if tag and names(base) else None


def may_send_as(
    config: Config, account: Account | str, address: str, router: Router | None = None
) -> bool:
    """Whether ``account`` may use ``address`` as envelope sender or in From:/Sender:.

    ``router``: ``config``'s (the delivery context's); without it the whole
    configuration is expanded for this one answer (tools, tests).
    """
    name = account.address if isinstance(account, Account) else account
    mailbox = account_mailbox(config, name)
    if mailbox is None:
        return False
    try:
        parsed = parse_address(address)
    except AddressError:
        return False
    if str(parsed) in config.accounts.send_as.get(str(mailbox.address), ()):
        return True
    domain = _canonical(config, parsed.domain)
    if domain is None:
        return False
    found = _name_in(config, domain, parsed.local)
    if found is None:
        return False
    router = router if router is not None else Router(config)
    return mailbox in router.expansion(domain, found)


def addresses_for(
    config: Config, account: Account | str, router: Router | None = None
) -> frozenset[str]:
    """Every address ``account`` may send as, subaddresses aside (each of these
    with a subaddress is allowed too, where its domain has a delimiter).
    ``router`` as for `may_send_as`."""
    name = account.address if isinstance(account, Account) else account
    mailbox = account_mailbox(config, name)
    if mailbox is None:
        return frozenset()
    router = router if router is not None else Router(config)
    found = set(config.accounts.send_as.get(mailbox.address, ()))
    for domain_name in config.domains:
        canonical = _canonical(config, domain_name)
        if canonical is None or canonical not in config.domains:
            continue
        canonical_domain = config.domains[canonical]
        for local in canonical_domain.mailboxes | (canonical_domain.aliases.keys() - {"*"}):
            if mailbox in router.expansion(canonical, local):
                found.add(f"{local}@{domain_name}")
    return frozenset(found)
