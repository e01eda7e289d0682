# -*- test-case-name: tests.test_accounts -*-
"""Accounts for submission (SPEC section 11): mailx.smtp.accounts, ``mailxctl passwd``,
the send-as rules, and a real Dovecot sharing the passwd-file."""

from __future__ import annotations

import base64
import grp
import imaplib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailx.config import ConfigError, load_config_text
from mailx.inbound.routing import Router, RouteRefused, route
from mailx.smtp import accounts
from mailx.smtp.accounts import (
    Account,
    AccountsUnavailable,
    DovecotAuthAccounts,
    DovecotAuthProtocol,
    PasswdFileAccounts,
    account_mailbox,
    addresses_for,
    hash_password,
    may_send_as,
    parse_passwd,
    passwd_problems,
    set_password_text,
    verify_password,
)
from mailx.testing.server import free_port

REPOSITORY = Path(__file__).resolve().parent.parent

# Written by Debian's dovecot-core 2.3.19: doveadm pw -s SCHEME -p PASSWORD.
DOVEADM = {
    "correct horse": [
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$eRyh9yO37MLaJH+19UpeWg$PZAZri6XsyFdQheRblhdcT7XI5hDgeJjP/gnlBbE4ww",
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$pSYZyn7lzol51h9VeAqNlw$Bbtw9nDW7Mza7Bn3E28rShHm4JSUfkE7ZjP7EutoXu4",
        "{BLF-CRYPT}$2y$05$.P4U0pZjPmJ6/xayTzhKqeh2aFIid15EOxqmaws650VZ5NrAYeY0e",
        "{SHA512-CRYPT}$6$e5xW3LhOJTsyJ89H$xeMSDOj.rESeyaOE4nf/7cvHnrCDxv8cPTNo8RGAxlDxyVTE0tNLp0BM/GlFNzUvQaIoaIXBf72fb09OZumL/0",
        "{SHA256-CRYPT}$5$.ZzLJqrzmhHNnjZw$NF7azvkv/Xm3nRIgVkJhh9Eosy6LdmxMQVz0XxenoK5",
    ],
    "pässwörd": [
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$rGYuqyocQ309ScGB4QcFxQ$Zwgwo6LLV863p3uXQcqc29yB5Nocs1bTMJhJYtP4nD0",
        "{BLF-CRYPT}$2y$05$Ob.2pw90muN6b18JDo7tFOZkO.n/xvkCQJWNzsqwMKkXeRTwGFTQC",
        "{SHA512-CRYPT}$6$.bPvl/dP6n3AT2Vk$zY0rxZBXJWDsdRWByvnx/etE4sh1Xtdxn444zFz6lmbiHuXUkv.AqhtRQkOK0.fxzTPutWHz6tiEkjs.AIYPj0",
    ],
}
# doveadm pw -s BLF-CRYPT -p "$(printf 'a%.0s' {1..80})": crypt_blowfish uses 72 octets.
LONG_BCRYPT = "{BLF-CRYPT}$2y$05$JfEA8rCu/HhoeI7LNAOLTuLZPmHpEkIRF7eIsUSmXDKRslhDPw0iu"

CONFIG = """\
hostname: mx.example.test
domains:
  example.test:
    mailboxes: [alice, bob, carol]
    aliases:
      postmaster: alice
      team: [alice, bob]
      sales: team
      info: [carol, someone@elsewhere.test]
      "*": alice
  example.org:
    alias_of: example.test
  example.net:
    mailboxes: [dave]
    aliases:
      postmaster: dave
      friends: [alice@example.test, dave]
outbound:
  srs_secret: {secret}
accounts:
  passwords: passwd
  send_as: {{carol@example.test: [press@example.net]}}
"""


def make_config(directory: Path, text: str | None = None) -> Any:
    from mailx.testing import SRS_SECRET

    body = (text or CONFIG).format(secret=SRS_SECRET)
    path = directory / "mailx.yaml"
    path.write_text(body)
    return load_config_text(body, path)


def mailxctl(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    return subprocess.run(
        [sys.executable, "-m", "mailx.admin.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


class HashTests(unittest.TestCase):
    """Reading the schemes Dovecot writes (SPEC 11)."""

    def test_doveadm_hashes_verify(self) -> None:
        for password, hashes in DOVEADM.items():
            for stored in hashes:
                self.assertTrue(verify_password(stored, password), stored)

    def test_wrong_passwords_fail(self) -> None:
        for password, hashes in DOVEADM.items():
            for stored in hashes:
                self.assertFalse(verify_password(stored, password + "x"), stored)
                self.assertFalse(verify_password(stored, ""), stored)

    def test_bcrypt_uses_72_octets_as_dovecot(self) -> None:
        self.assertTrue(verify_password(LONG_BCRYPT, "a" * 80))
        self.assertTrue(verify_password(LONG_BCRYPT, "a" * 72 + "different tail"))
        self.assertFalse(verify_password(LONG_BCRYPT, "a" * 71))

    def test_hash_without_scheme_prefix_is_crypt(self) -> None:
        stored = DOVEADM["correct horse"][3].removeprefix("{SHA512-CRYPT}")
        self.assertTrue(verify_password(stored, "correct horse"))

    def test_weak_schemes_refused_even_with_the_right_password(self) -> None:
        for stored in ("{PLAIN}secret", "secret", "{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69"):
            self.assertFalse(verify_password(stored, "secret"), stored)
        self.assertIn("PLAIN is not accepted", accounts.scheme_problem("{PLAIN}secret"))

    def test_malformed_hashes_fail_without_error(self) -> None:
        for stored in (
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$short",
            "{ARGON2ID}$argon2i$v=19$m=32768,t=4,p=1$pSYZyn7lzol51h9VeAqNlw$Bbtw",
            "{BLF-CRYPT}$2y$05$tooshort",
            "{SHA512-CRYPT}$6$",
            "{ARGON2ID}",
            "{",
        ):
            self.assertFalse(verify_password(stored, "correct horse"), stored)

    def test_written_hash_is_argon2id_and_verifies(self) -> None:
        stored = hash_password("pässwörd")
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"))
        self.assertTrue(verify_password(stored, "pässwörd"))
        self.assertFalse(verify_password(stored, "passwörd"))

    def test_written_hash_verifies_in_doveadm(self) -> None:
        if shutil.which("doveadm") is None:
            raise unittest.SkipTest("doveadm (dovecot-core) not installed")
        stored = hash_password("correct horse")
        result = subprocess.run(
            ["doveadm", "pw", "-t", stored, "-p", "correct horse"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertIn("(verified)", result.stdout + result.stderr)


class PasswdFormatTests(unittest.TestCase):
    def test_fields_comments_and_case(self) -> None:
        data = (
            b"# accounts\n\n"
            b"Alice@EXAMPLE.test:{PLAIN}a:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G\r\n"
            b"  # indented comment\n"
            b"bob@example.test:{PLAIN}b\n"
            b"notanaddress:{PLAIN}c\n"
        )
        entries = parse_passwd(data)
        self.assertEqual(
            [(e.line, e.username, e.password, e.address) for e in entries],
            [
                (3, "alice@example.test", "{PLAIN}a", True),
                (5, "bob@example.test", "{PLAIN}b", True),
                (6, "notanaddress", "{PLAIN}c", False),
            ],
        )

    def test_problems_name_lines(self) -> None:
        good = DOVEADM["correct horse"][0]
        data = (
            f"a@example.test:{good}\nb@example.test:{{PLAIN}}x\nx:{good}\nA@example.test:{good}\n"
        )
        problems = passwd_problems(data.encode())
        self.assertEqual(len(problems), 3)
        self.assertTrue(problems[0].startswith("line 2: b@example.test: scheme PLAIN"))
        self.assertTrue(problems[1].startswith("line 3: 'x' is not an address"))
        self.assertTrue(problems[2].startswith("line 4: a@example.test again (line 1 is used)"))

    def test_set_password_keeps_other_fields_and_lines(self) -> None:
        data = b"# c\nalice@example.test:old:1000:1000::/home/a::extra\nbob@example.test:b\n"
        self.assertEqual(
            set_password_text(data, "alice@example.test", "{ARGON2ID}new"),
            b"# c\nalice@example.test:{ARGON2ID}new:1000:1000::/home/a::extra\nbob@example.test:b\n",
        )
        self.assertEqual(
            set_password_text(data, "carol@example.test", "{X}y"),
            data + b"carol@example.test:{X}y\n",
        )
        self.assertEqual(set_password_text(b"", "a@example.test", "p"), b"a@example.test:p\n")


class PasswdFileAccountsTests(unittest.TestCase):
    """The passwd-file backend against real files, its checks in its own threads."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.path = self.directory / "passwd"
        self.write({"alice@example.test": DOVEADM["correct horse"][2]})
        self.accounts = PasswdFileAccounts(self.path, reactor)
        self.addCleanup(self.accounts.close)

    def write(self, entries: dict[str, str]) -> None:
        text = "".join(f"{user}:{stored}\n" for user, stored in entries.items())
        accounts.write_passwd(self.path, text.encode())

    def test_no_thread_before_the_first_login(self) -> None:
        """twistd daemonizes (forks) after building the services: threads
        started then would be gone."""
        self.assertFalse(PasswdFileAccounts(self.path, reactor).pool.started)

    @defer.inlineCallbacks
    def test_right_password(self) -> Any:
        account = yield self.accounts.authenticate("Alice@Example.Test", "correct horse")
        self.assertEqual(account, Account("alice@example.test"))

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user(self) -> Any:
        self.assertIsNone((yield self.accounts.authenticate("alice@example.test", "wrong")))
        self.assertIsNone((yield self.accounts.authenticate("bob@example.test", "correct horse")))
        self.assertIsNone((yield self.accounts.authenticate("not an address", "x")))

    @defer.inlineCallbacks
    def test_unknown_user_costs_a_hash_check(self) -> Any:
        """Timing must not tell which accounts exist: an unknown user's password
        is checked against a hash like the file's own (result unused)."""
        checked: list[str] = []
        real = accounts.verify_password

        def spy(stored: str, password: str) -> bool:
            checked.append(stored)
            return real(stored, password)

        self.patch(accounts, "verify_password", spy)
        # The right password of another account: still no one.
        self.assertIsNone(
            (yield self.accounts.authenticate("nobody@example.test", "correct horse"))
        )
        self.assertEqual(checked, [DOVEADM["correct horse"][2]])  # the file's bcrypt
        self.path.unlink()
        yield self.accounts.authenticate("nobody@example.test", "correct horse")
        self.assertTrue(checked[1].startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"))

    def test_decoy_is_the_most_common_kind(self) -> None:
        argon, argon_i, bcrypt_hash, sha512 = (DOVEADM["correct horse"][i] for i in (0, 1, 2, 3))
        table = {
            "a@x.test": bcrypt_hash,
            "b@x.test": argon,
            "c@x.test": DOVEADM["pässwörd"][0],  # same Argon2id parameters as b
            "d@x.test": sha512,
            "e@x.test": "{PLAIN}x",
            "f@x.test": "{PLAIN}y",
            "g@x.test": "{PLAIN}z",
        }
        self.assertEqual(accounts.decoy_hash(table), argon)
        self.assertEqual(accounts.decoy_hash({"a@x.test": argon_i}), argon_i)
        self.assertTrue(accounts.decoy_hash({"e@x.test": "{PLAIN}x"}).startswith("{ARGON2ID}"))

    @defer.inlineCallbacks
    def test_changed_file_is_read_without_restart(self) -> Any:
        self.assertTrue((yield self.accounts.authenticate("alice@example.test", "correct horse")))
        self.write({"alice@example.test": DOVEADM["pässwörd"][0]})
        self.assertIsNone((yield self.accounts.authenticate("alice@example.test", "correct horse")))
        self.assertTrue((yield self.accounts.authenticate("alice@example.test", "pässwörd")))

    @defer.inlineCallbacks
    def test_edit_in_place_is_read(self) -> Any:
        """Same inode, same size, another mtime: an editor that writes in place."""
        self.assertTrue((yield self.accounts.authenticate("alice@example.test", "correct horse")))
        with open(self.path, "r+b") as f:
            data = f.read()
            f.seek(0)
            f.write(data.replace(b"alice@", b"carol@"))
        os.utime(self.path, ns=(time.time_ns(), time.time_ns() + 10**9))
        self.assertIsNone((yield self.accounts.authenticate("alice@example.test", "correct horse")))
        self.assertTrue((yield self.accounts.authenticate("carol@example.test", "correct horse")))

    @defer.inlineCallbacks
    def test_missing_file_is_no_accounts(self) -> Any:
        self.path.unlink()
        self.assertIsNone((yield self.accounts.authenticate("alice@example.test", "correct horse")))

    @defer.inlineCallbacks
    def test_oversized_file_is_a_temporary_failure(self) -> Any:
        self.patch(accounts, "MAX_PASSWD_BYTES", 100)
        self.write({f"u{i}@example.test": "{PLAIN}x" for i in range(20)})
        yield self.assertFailure(
            self.accounts.authenticate("alice@example.test", "x"), AccountsUnavailable
        )

    @defer.inlineCallbacks
    def test_checks_run_off_the_reactor_thread(self) -> Any:
        threads: list[threading.Thread] = []
        real = accounts.verify_password

        def spy(stored: str, password: str) -> bool:
            threads.append(threading.current_thread())
            return real(stored, password)

        self.patch(accounts, "verify_password", spy)
        reactor_thread = threading.current_thread()
        # While four Argon2 checks run, the reactor keeps turning.
        ticks: list[float] = []
        loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        loop.start(0.01)
        self.write({"alice@example.test": DOVEADM["correct horse"][0]})
        results = yield defer.gatherResults(
            [self.accounts.authenticate("alice@example.test", "correct horse") for _ in range(4)]
        )
        loop.stop()
        self.assertEqual(results, [Account("alice@example.test")] * 4)
        self.assertEqual(len(threads), 4)
        self.assertNotIn(reactor_thread, threads)
        self.assertGreater(len(ticks), 2)
        self.assertLess(max(b - a for a, b in zip(ticks, ticks[1:], strict=False)), 2.0)

    @defer.inlineCallbacks
    def test_too_many_waiting_checks_are_refused_at_once(self) -> Any:
        pool = ThreadPool(minthreads=0, maxthreads=1, name="test-auth")
        pool.start()
        self.addCleanup(pool.stop)
        gate = threading.Event()
        self.addCleanup(gate.set)
        slow = PasswdFileAccounts(self.path, reactor, pool)
        self.patch(accounts, "verify_password", lambda stored, password: gate.wait(10) or False)
        waiting = [
            slow.authenticate("alice@example.test", "x") for _ in range(accounts.MAX_PENDING)
        ]
        yield self.assertFailure(slow.authenticate("alice@example.test", "x"), AccountsUnavailable)
        gate.set()
        yield defer.gatherResults(waiting)
        # The queue drained: checks are accepted again.
        self.assertTrue((yield slow.authenticate("alice@example.test", "x")))


class AccountsConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)

    def problems(self, text: str) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            make_config(self.directory, text)
        return [str(p) for p in caught.exception.problems]

    def test_defaults(self) -> None:
        config = make_config(self.directory, CONFIG.split("accounts:")[0])
        self.assertIsNone(config.accounts.passwords)
        self.assertIsNone(config.accounts.dovecot)
        self.assertEqual(dict(config.accounts.send_as), {})
        self.assertEqual((config.limits.auth_failures, config.limits.send_per_hour), (5, 200))

    def test_passwords_relative_to_the_file(self) -> None:
        config = make_config(self.directory)
        self.assertEqual(config.accounts.passwords, self.directory / "passwd")
        self.assertEqual(
            dict(config.accounts.send_as), {"carol@example.test": ("press@example.net",)}
        )

    def test_passwords_and_dovecot_exclude_each_other(self) -> None:
        text = CONFIG.replace("  passwords: passwd\n", '  passwords: p\n  dovecot: "unix:/x"\n')
        [problem] = self.problems(text)
        self.assertIn("accounts.dovecot: accounts.passwords and accounts.dovecot exclude", problem)

    def test_send_as_checked_at_start_up(self) -> None:
        text = CONFIG.replace(
            "{{carol@example.test: [press@example.net]}}",
            "{{team@example.test: [x@example.test], carol@example.test: [a@elsewhere.test],"
            " alice@example.org: [x@example.test]}}",
        )
        problems = self.problems(text)
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("'team@example.test' is not a mailbox of example.test", problems[0])
        self.assertIn("elsewhere.test is not one of our domains", problems[1])
        self.assertIn("'alice@example.org' is not a mailbox of example.test", problems[2])

    def test_limits_validated(self) -> None:
        text = CONFIG + "limits:\n  auth_failures: 0\n  send_per_hour: lots\n"
        problems = self.problems(text)
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("limits.auth_failures: must be at least 1", problems[0])
        self.assertIn("limits.send_per_hour: expected a whole number", problems[1])

    def test_server_user_must_read_the_passwords_file(self) -> None:
        from mailx.admin import preflight

        config = make_config(self.directory)
        self.assertNotIn("accounts.passwords", [n.what for n in preflight.needs(config)])
        (self.directory / "passwd").write_text("")
        needs = [n for n in preflight.needs(config) if n.what == "accounts.passwords"]
        self.assertEqual([(n.path, n.access) for n in needs], [(self.directory / "passwd", "read")])

    def test_repository_yaml_documents_the_keys(self) -> None:
        text = (REPOSITORY / "mailx.yaml").read_text()
        for line in ("auth_failures: 5", "send_per_hour: 200", "passwords: null", "dovecot: null"):
            self.assertIn(line, text)


class SendAsTests(unittest.TestCase):
    """SPEC 11: the mailbox, its subaddresses, aliases that deliver to it, alias_of
    domains and send_as entries; never through a catch-all."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.config = make_config(directory)

    def test_rules(self) -> None:
        allowed = {
            "alice@example.test": [
                "alice@example.test",
                "ALICE@Example.Test",
                "alice+news@example.test",
                "team@example.test",
                "team+x@example.test",
                "sales@example.test",  # an alias of an alias
                "postmaster@example.test",
                "alice@example.org",  # alias_of
                "team@example.org",
                "friends@example.net",  # another domain's alias that includes her
            ],
            "carol@example.test": ["info@example.test", "press@example.net", "carol@example.org"],
        }
        refused = {
            "alice@example.test": [
                "bob@example.test",
                "carol@example.test",
                "info@example.test",
                "unknown@example.test",  # only the catch-all delivers it to her
                "dave@example.net",
                "alice@elsewhere.test",
                "<>",
                "",
                "press@example.net",
            ],
            "carol@example.test": ["press+x@example.net", "team@example.test"],
            "team@example.test": ["team@example.test"],  # an alias is no account
        }
        # Without a router (tools) and with the delivery context's one (the server).
        for router in (None, Router(self.config)):
            for account, addresses in allowed.items():
                for address in addresses:
                    self.assertTrue(
                        may_send_as(self.config, account, address, router), (account, address)
                    )
            for account, addresses in refused.items():
                for address in addresses:
                    self.assertFalse(
                        may_send_as(self.config, account, address, router), (account, address)
                    )

    def test_addresses_for(self) -> None:
        self.assertEqual(
            addresses_for(self.config, Account("alice@example.test")),
            {
                f"{name}@{domain}"
                for name in ("alice", "team", "sales", "postmaster")
                for domain in ("example.test", "example.org")
            }
            | {"friends@example.net"},
        )
        self.assertEqual(addresses_for(self.config, "team@example.test"), frozenset())

    def test_account_must_be_a_mailbox(self) -> None:
        self.assertIsNotNone(account_mailbox(self.config, "Alice@example.test"))
        for name in ("team@example.test", "alice@example.org", "alice+x@example.test", "x"):
            self.assertIsNone(account_mailbox(self.config, name), name)


_names = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def _domains(draw: Any) -> str:
    mailboxes = sorted(draw(st.sets(_names, min_size=1, max_size=3)))
    others = [n for n in ["a", "b", "c", "d", "e", "f", "g"] if n not in mailboxes]
    alias_names = draw(st.lists(st.sampled_from(others), unique=True, max_size=3))
    lines = ["hostname: mx.example.test", "domains:", "  one.test:"]
    lines.append(f"    mailboxes: [{', '.join(mailboxes)}]")
    lines.append("    aliases:")
    lines.append(f"      postmaster: {mailboxes[0]}")
    defined = list(mailboxes)
    for name in alias_names:
        # Targets among names defined so far: no loops, nothing dangling.
        targets = draw(st.lists(st.sampled_from(defined), min_size=1, max_size=3, unique=True))
        lines.append(f"      {name}: [{', '.join(targets)}]")
        defined.append(name)
    if draw(st.booleans()):
        lines.append(f'      "*": {mailboxes[-1]}')
    lines += ["  two.test:", "    alias_of: one.test"]
    return "\n".join(lines) + "\n"


class SendAsPropertyTests(unittest.TestCase):
    """The send-as rules agree with routing: an address is the account's exactly
    when routing it, without the catch-all, delivers to the account's mailbox."""

    @settings(max_examples=60, deadline=None)
    @given(_domains(), _names, st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "x"]))
    def test_agrees_with_routing(self, text: str, account_name: str, local: str) -> None:
        config = load_config_text(text, "mailx.yaml")
        no_catch_all = load_config_text(
            "\n".join(line for line in text.splitlines() if '"*"' not in line) + "\n",
            "mailx.yaml",
        )
        account = f"{account_name}@one.test"
        mailbox = account_mailbox(config, account)
        for domain in ("one.test", "two.test"):
            for address in (f"{local}@{domain}", f"{local}+tag@{domain}"):
                try:
                    delivers = mailbox in route(no_catch_all, address).destinations
                except RouteRefused:
                    delivers = False
                self.assertEqual(
                    may_send_as(config, account, address), mailbox is not None and delivers
                )
        listed = addresses_for(config, account)
        self.assertEqual(addresses_for(config, account, Router(config)), listed)
        for address in listed:
            self.assertTrue(may_send_as(config, account, address))
        self.assertEqual(
            may_send_as(config, account, f"{local}@one.test"), f"{local}@one.test" in listed
        )


class PasswdCommandTests(unittest.TestCase):
    """``mailxctl passwd ADDRESS`` (SPEC 11)."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        make_config(self.directory)
        self.config_file = str(self.directory / "mailx.yaml")
        self.path = self.directory / "passwd"

    def passwd(self, address: str, stdin: str) -> subprocess.CompletedProcess:
        return mailxctl("passwd", address, "-c", self.config_file, stdin=stdin)

    def stored(self, user: str) -> str:
        table = {e.username: e.password for e in parse_passwd(self.path.read_bytes())}
        return table[user]

    def test_stdin_line_sets_a_new_file_0640(self) -> None:
        result = self.passwd("Alice@Example.Test", "correct horse\nignored second line\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("alice@example.test: password set", result.stdout)
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o640)
        self.assertTrue(verify_password(self.stored("alice@example.test"), "correct horse"))
        self.assertEqual([p.name for p in self.directory.iterdir()], ["mailx.yaml", "passwd"])

    def test_only_the_newline_is_stripped(self) -> None:
        self.assertEqual(self.passwd("alice@example.test", " spaced pass \n").returncode, 0)
        self.assertTrue(verify_password(self.stored("alice@example.test"), " spaced pass "))

    def test_existing_file_keeps_mode_owner_and_other_lines(self) -> None:
        other = f"bob@example.test:{DOVEADM['correct horse'][2]}:1000:1000::/home/bob::\n"
        self.path.write_text("# managed by mailxctl\n" + other)
        os.chmod(self.path, 0o600)
        owner = None
        if os.getuid() == 0:
            owner = (65534, 65534)
            os.chown(self.path, *owner)
        result = self.passwd("alice@example.test", "new one\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        status = self.path.stat()
        self.assertEqual(status.st_mode & 0o777, 0o600)
        if owner is not None:
            self.assertEqual((status.st_uid, status.st_gid), owner)
        text = self.path.read_text()
        self.assertTrue(text.startswith("# managed by mailxctl\n" + other))
        self.assertTrue(verify_password(self.stored("alice@example.test"), "new one"))

    def test_concurrent_updates_are_all_kept(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        users = ["alice", "bob", "carol"]
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "mailx.admin.cli", "passwd", f"{user}@example.test"]
                + ["-c", self.config_file],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
            )
            for user in users
        ]
        for user, process in zip(users, processes, strict=True):
            process.stdin.write(f"{user} pw\n".encode())
            process.stdin.close()
        for process in processes:
            self.assertEqual(process.wait(timeout=120), 0)
        for user in users:
            self.assertTrue(verify_password(self.stored(f"{user}@example.test"), f"{user} pw"))

    def test_not_a_mailbox_exits_1(self) -> None:
        for address in ("team@example.test", "alice@elsewhere.test", "nobody@example.test", "x"):
            result = self.passwd(address, "pw\n")
            self.assertEqual(result.returncode, 1, address)
            self.assertIn("is not a mailbox", result.stderr)
        self.assertFalse(self.path.exists())

    def test_empty_password_refused(self) -> None:
        result = self.passwd("alice@example.test", "\n")
        self.assertEqual(result.returncode, 1)
        self.assertFalse(self.path.exists())

    def test_terminal_asks_twice(self) -> None:
        output, status = self.on_terminal(["correct horse", "correct horse"])
        self.assertEqual(status, 0, output)
        self.assertIn(b"New password:", output)
        self.assertIn(b"Again:", output)
        self.assertNotIn(b"correct horse", output)  # not echoed
        self.assertTrue(verify_password(self.stored("alice@example.test"), "correct horse"))

    def test_terminal_mismatch_refused(self) -> None:
        output, status = self.on_terminal(["correct horse", "correct hose"])
        self.assertEqual(status, 1, output)
        self.assertIn(b"do not match", output)
        self.assertFalse(self.path.exists())

    def on_terminal(self, answers: list[str]) -> tuple[bytes, int]:
        """Run mailxctl passwd on a pseudo-terminal, answering each prompt."""
        env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        argv = [sys.executable, "-m", "mailx.admin.cli", "passwd", "alice@example.test"]
        argv += ["-c", self.config_file]
        pid, fd = pty.fork()
        if pid == 0:  # the child: its controlling terminal is the pty
            os.execve(sys.executable, argv, env)
        output = b""
        pending = list(answers)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 1)
                if not ready:
                    continue
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                # Answer each prompt once it is shown (getpass has turned
                # echo off and flushed input by then), never twice.
                prompts = output.count(b"New password: ") + output.count(b"Again: ")
                while pending and len(answers) - len(pending) < prompts:
                    os.write(fd, pending.pop(0).encode() + b"\n")
        finally:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        return output, os.waitstatus_to_exitcode(status)


class CheckCommandTests(unittest.TestCase):
    def test_check_lists_what_each_account_may_send_as(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        make_config(directory)
        (directory / "passwd").write_text(
            f"alice@example.test:{DOVEADM['correct horse'][0]}\n"
            "carol@example.test:{PLAIN}secret\n"
        )
        result = mailxctl("check", "-c", str(directory / "mailx.yaml"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(
            "  alice@example.test sends as: alice@example.org, alice@example.test,"
            " friends@example.net, postmaster@example.org",
            result.stdout,
        )
        self.assertIn("  carol@example.test sends as: carol@example.org,", result.stdout)
        self.assertIn("press@example.net", result.stdout)
        self.assertIn("line 2: carol@example.test: scheme PLAIN is not accepted", result.stdout)
        data = mailxctl("check", "--json", "-c", str(directory / "mailx.yaml"))
        self.assertIn('"send_as"', data.stdout)


# ---------------------------------------------------------------------------
# The auth-client protocol, line by line


class DovecotProtocolTests(unittest.TestCase):
    HANDSHAKE = (
        b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
        b"SPID\t1\nCUID\t2\nCOOKIE\tabc\nDONE\n"
    )

    def connect(self) -> tuple[DovecotAuthProtocol, StringTransport]:
        protocol = DovecotAuthProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_handshake_then_auth_plain(self) -> None:
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
        protocol.dataReceived(self.HANDSHAKE)
        self.assertTrue(protocol.ready.called)
        transport.clear()
        d = protocol.authenticate("alice@example.test", "pw", "192.0.2.1")
        response = base64.b64encode(b"\0alice@example.test\0pw").decode()
        self.assertEqual(
            transport.value().decode(),
            f"AUTH\t1\tPLAIN\tservice=smtp\tsecured\trip=192.0.2.1\tresp={response}\n",
        )
        protocol.dataReceived(b"OK\t1\tuser=Alice@example.test\n")
        self.assertEqual(self.successResultOf(d), Account("alice@example.test"))

    def test_fail_and_temporary_fail(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(self.HANDSHAKE)
        wrong = protocol.authenticate("a@example.test", "x", None)
        temp = protocol.authenticate("a@example.test", "x", None)
        protocol.dataReceived(b"FAIL\t1\tuser=a@example.test\n")
        protocol.dataReceived(b"FAIL\t2\tuser=a@example.test\tcode=temp_fail\n")
        self.assertIsNone(self.successResultOf(wrong))
        self.failureResultOf(temp, AccountsUnavailable)

    def test_no_plain_mechanism(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"VERSION\t1\t2\nMECH\tCRAM-MD5\nDONE\n")
        failure = self.failureResultOf(protocol.ready, AccountsUnavailable)
        self.assertIn("PLAIN", str(failure.value))
        self.assertTrue(transport.disconnecting)

    def test_overlong_line_disconnects(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"VERSION\t1\t2\nMECH\t" + b"x" * 20000 + b"\n")
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_fails_pending(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(self.HANDSHAKE)
        d = protocol.authenticate("a@example.test", "x", None)
        protocol.connectionLost(None)
        self.failureResultOf(d, AccountsUnavailable)


class FakeDovecot:
    """An endpoint whose connections are StringTransports, handshake answered."""

    def __init__(self) -> None:
        self.protocols: list[DovecotAuthProtocol] = []

    def connect(self, factory: Any) -> defer.Deferred:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(DovecotProtocolTests.HANDSHAKE)
        self.protocols.append(protocol)
        return defer.succeed(protocol)


class DovecotClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.auth = DovecotAuthAccounts("unix:/nonexistent", self.clock)
        self.fake = FakeDovecot()
        self.auth.endpoint = self.fake

    def test_requests_share_one_connection(self) -> None:
        first = self.auth.authenticate("a@example.test", "x")
        second = self.auth.authenticate("b@example.test", "y")
        [protocol] = self.fake.protocols
        protocol.dataReceived(b"FAIL\t2\tuser=b@example.test\nOK\t1\tuser=a@example.test\n")
        self.assertEqual(self.successResultOf(first), Account("a@example.test"))
        self.assertIsNone(self.successResultOf(second))

    def test_in_flight_bounded(self) -> None:
        waiting = [
            self.auth.authenticate("a@example.test", "x") for _ in range(accounts.MAX_PENDING)
        ]
        self.failureResultOf(self.auth.authenticate("a@example.test", "x"), AccountsUnavailable)
        self.clock.advance(self.auth.timeout + 1)  # they time out; the bound frees up
        for d in waiting:
            self.failureResultOf(d, AccountsUnavailable)
        self.assertEqual(self.fake.protocols[0].requests, {})
        self.assertNoResult(self.auth.authenticate("a@example.test", "x"))

    def test_nul_in_credentials_never_sent(self) -> None:
        self.assertIsNone(self.successResultOf(self.auth.authenticate("a@example.test\0b", "x")))
        self.assertIsNone(self.successResultOf(self.auth.authenticate("a@example.test", "x\0y")))
        self.assertEqual(self.fake.protocols, [])

    def test_accounts_from_config(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        config = make_config(directory)
        chosen = accounts.accounts_from_config(config, reactor)
        self.assertIsInstance(chosen, PasswdFileAccounts)
        text = CONFIG.replace(
            "  passwords: passwd\n", '  dovecot: "unix:/run/dovecot/auth-client"\n'
        )
        chosen = accounts.accounts_from_config(make_config(directory, text), reactor)
        self.assertIsInstance(chosen, DovecotAuthAccounts)
        self.assertIsNone(
            accounts.accounts_from_config(make_config(directory, CONFIG.split("accounts:")[0]))
        )


class DovecotTimeoutTests(unittest.TestCase):
    def test_silent_server_times_out(self) -> None:
        """A service that accepts and never answers costs a timeout, not a hang."""
        clock = task.Clock()
        server = StringTransport()
        protocols: list[DovecotAuthProtocol] = []

        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred:
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(server)
                protocols.append(protocol)
                return defer.succeed(protocol)

        auth = DovecotAuthAccounts("unix:/nonexistent", clock)
        auth.endpoint = Endpoint()
        d = auth.authenticate("a@example.test", "x")
        clock.advance(auth.timeout + 1)
        self.failureResultOf(d, AccountsUnavailable)
        self.assertTrue(server.disconnecting)
        # The next request connects afresh.
        server.disconnecting = False
        protocols[0].connectionLost(None)
        d2 = auth.authenticate("a@example.test", "x")
        self.assertEqual(len(protocols), 2)
        protocols[1].dataReceived(DovecotProtocolTests.HANDSHAKE + b"FAIL\t1\n")
        self.assertIsNone(self.successResultOf(d2))


# ---------------------------------------------------------------------------
# A real Dovecot sharing the file mailxctl passwd wrote


DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
mail_location = maildir:{d}/mail/%d/%n
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid=root gid=root home={d}/mail/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0600
  }}
}}
service anvil {{
  chroot =
}}
"""


class RealDovecotTests(unittest.TestCase):
    """Dovecot's passdb reads the file mailxctl passwd writes; mailx asks Dovecot."""

    def setUp(self) -> None:
        if shutil.which("dovecot") is None or os.getuid() != 0:
            raise unittest.SkipTest("needs dovecot-core, run as root")
        # Dovecot's unprivileged processes must reach the files: not under
        # the worktree (whose parents may be closed), a 0755 directory.
        self.d = Path(tempfile.mkdtemp(prefix="mailx-dovecot-"))
        self.addCleanup(shutil.rmtree, self.d, True)
        self.d.chmod(0o755)
        for sub in ("run", "state", "mail"):
            (self.d / sub).mkdir()
        make_config(self.d)
        self.config_file = str(self.d / "mailx.yaml")
        self.passwd = self.d / "passwd"
        result = mailxctl(
            "passwd", "alice@example.test", "-c", self.config_file, stdin="tr0ub4dor\n"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        # The usual set-up: the file's group is Dovecot's, 0640 (SPEC 11).
        os.chown(self.passwd, 0, grp.getgrnam("dovecot").gr_gid)
        self.imap_port = free_port()
        conf = self.d / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(d=self.d, passwd=self.passwd, imap_port=self.imap_port))
        # In the foreground, in a session of its own: its pid is ours to stop,
        # and it holds none of the test runner's pipes.
        self.dovecot = subprocess.Popen(
            ["dovecot", "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.addCleanup(self.stop_dovecot)
        self.socket = self.d / "run" / "auth-client"
        deadline = time.monotonic() + 30
        while not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.auth = DovecotAuthAccounts(f"unix:{self.socket}", reactor)
        self.addCleanup(self.auth.close)

    def stop_dovecot(self) -> None:
        """SIGTERM to the master; its whole process group (only the Dovecot
        this test started) is killed if it has not left in 10 seconds."""
        if self.dovecot.poll() is not None:
            return
        self.dovecot.terminate()
        try:
            self.dovecot.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.dovecot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.dovecot.wait(10)

    @defer.inlineCallbacks
    def test_dovecot_checks_the_password_mailxctl_stored(self) -> Any:
        account = yield self.auth.authenticate("Alice@Example.Test", "tr0ub4dor", "127.0.0.1")
        self.assertEqual(account, Account("alice@example.test"))
        self.assertIsNone((yield self.auth.authenticate("alice@example.test", "tr0ub4dor!")))
        self.assertIsNone((yield self.auth.authenticate("bob@example.test", "tr0ub4dor")))

    @defer.inlineCallbacks
    def test_imap_login_with_the_same_password(self) -> Any:
        def login(password: str) -> Any:
            client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
            try:
                return client.login("alice@example.test", password)[0]
            except imaplib.IMAP4.error:
                return "NO"
            finally:
                client.shutdown()

        from twisted.internet.threads import deferToThread

        self.assertEqual((yield deferToThread(login, "tr0ub4dor")), "OK")
        self.assertEqual((yield deferToThread(login, "wrong")), "NO")

    @defer.inlineCallbacks
    def test_mailx_reads_the_same_file(self) -> Any:
        local = PasswdFileAccounts(self.passwd, reactor)
        self.addCleanup(local.close)
        self.assertEqual(
            (yield local.authenticate("alice@example.test", "tr0ub4dor")),
            Account("alice@example.test"),
        )

    def auth_process(self) -> int | None:
        """The pid of our Dovecot's auth process (a child of its master)."""
        master = str(self.dovecot.pid)
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                name = (entry / "comm").read_text().strip()
            except (OSError, IndexError):
                continue
            if fields[1] == master and name == "auth":
                return int(entry.name)
        return None

    @defer.inlineCallbacks
    def test_lost_connection_reconnects(self) -> Any:
        """The auth process dies (Dovecot's master starts another): pending
        checks fail as temporary, the next one connects afresh."""
        self.assertIsNotNone((yield self.auth.authenticate("alice@example.test", "tr0ub4dor")))
        pid = self.auth_process()
        self.assertIsNotNone(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not self.auth._protocol.lost and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        account = yield self.auth.authenticate("alice@example.test", "tr0ub4dor")
        self.assertEqual(account, Account("alice@example.test"))

    @defer.inlineCallbacks
    def test_no_service_is_a_temporary_failure(self) -> Any:
        missing = DovecotAuthAccounts(f"unix:{self.d / 'run' / 'no-such-socket'}", reactor)
        yield self.assertFailure(
            missing.authenticate("alice@example.test", "tr0ub4dor"), AccountsUnavailable
        )
