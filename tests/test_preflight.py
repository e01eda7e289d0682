# -*- test-case-name: tests.test_preflight -*-
"""Start-up checks for the user mailx runs as (mailx.admin.preflight), and ``mailxctl check --user``.

The tests run as root; they check for ``nobody``, which cannot read a
0600 root file, as the server's user cannot after twistd's --uid/--gid.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from mailx.admin import cli, preflight
from mailx.config import load_config
from mailx.testing.server import write_config
from mailx.testing.tls import make_certificate

NOBODY = preflight.RunAs(65534, 65534, frozenset([65534]))


class AccessTests(unittest.TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to make files another user cannot read")
        # Outside the checkout: trial's temp dirs and the checkout itself
        # (CI clones into a 0700 mktemp directory) may be unsearchable for
        # nobody, which would be a problem in every test here.
        self.directory = Path(tempfile.mkdtemp(prefix="mailx-preflight-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.chmod(self.directory, 0o755)
        self.cert, self.key = make_certificate(self.directory, "mx.example.test")
        os.chmod(self.key, 0o600)
        self.dkim = self.directory / "example.test.key"
        from mailx.outbound import dkimkeys

        dkimkeys.write_key(dkimkeys.generate_key("ed25519"), self.dkim)
        self.path = write_config(
            self.directory,
            {
                "tls": {"certificate": str(self.cert), "key": str(self.key)},
                "domains": {"example.test": {"dkim": {"selector": "s1", "key": str(self.dkim)}}},
            },
        )
        self.config = load_config(self.path)
        for sub in ("mail", "spool"):
            (self.directory / sub).mkdir(mode=0o700)

    def test_root_owned_key_spool_and_mail_are_each_one_line(self) -> None:
        found = preflight.access_problems(self.config, NOBODY)
        self.assertEqual(len(found), 4, found)
        key, dkim, spool, mail = found
        self.assertTrue(key.startswith(f"tls.key: {self.key} is not readable by user nobody"), key)
        self.assertIn("mode 0600", key)
        self.assertIn(f"fix: chgrp nogroup {self.key} && chmod g+r {self.key}", key)
        self.assertTrue(dkim.startswith("domains.example.test.dkim.key: "), dkim)
        self.assertIn(f"paths.spool: {self.directory / 'spool'} is not writable", spool)
        self.assertIn(f"fix: chown -R nobody:nogroup {self.directory / 'spool'}", spool)
        self.assertTrue(mail.startswith("paths.mail: "), mail)
        self.assertTrue(all("\n" not in line for line in found))

    def test_group_readable_key_and_owned_directories_pass(self) -> None:
        for key in (self.key, self.dkim):
            os.chown(key, 0, 65534)
            os.chmod(key, 0o640)
        for sub in ("mail", "spool"):
            os.chown(self.directory / sub, 65534, 65534)
        self.assertEqual(preflight.access_problems(self.config, NOBODY), [])

    def test_missing_spool_and_mail_are_created_for_the_user(self) -> None:
        for sub in ("mail", "spool"):
            (self.directory / sub).rmdir()
        made = preflight.create_owned(self.config, NOBODY)
        self.assertEqual(made, [self.directory / "spool", self.directory / "mail"])
        for path in made:
            self.assertEqual((path.stat().st_uid, path.stat().st_gid), (65534, 65534))
        found = preflight.access_problems(self.config, NOBODY)
        self.assertFalse([p for p in found if p.startswith("paths.")], found)

    def test_existing_directories_are_left_alone(self) -> None:
        self.assertEqual(preflight.create_owned(self.config, NOBODY), [])
        self.assertEqual((self.directory / "spool").stat().st_uid, 0)

    def test_root_is_never_refused(self) -> None:
        self.assertEqual(preflight.access_problems(self.config, preflight.run_as(0, 0)), [])

    def test_unsearchable_parent_is_named(self) -> None:
        os.chmod(self.key, 0o644)
        os.chown(self.dkim, 65534, 65534)
        for sub in ("mail", "spool"):
            os.chown(self.directory / sub, 65534, 65534)
        os.chmod(self.directory, 0o700)
        self.addCleanup(os.chmod, self.directory, 0o755)
        found = preflight.access_problems(self.config, NOBODY)
        self.assertTrue(found)
        self.assertIn(f"{self.directory} cannot be searched", found[0])

    def test_mailxctl_check_user_reports_them_and_exits_1(self) -> None:
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = cli.main(["check", "-c", str(self.path), "--user", "nobody"])
        self.assertEqual(status, 1)
        out = stdout.getvalue()
        self.assertIn("as user nobody (uid 65534, gid 65534): 4 problem(s)", out)
        self.assertIn(f"  tls.key: {self.key} is not readable", out)

    def test_mailxctl_check_as_root_checks_for_the_spools_owner(self) -> None:
        os.chown(self.directory / "spool", 65534, 65534)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", io.StringIO())
        status = cli.main(["check", "-c", str(self.path)])
        self.assertEqual(status, 1)
        self.assertIn(f"  tls.key: {self.key} is not readable by user nobody", stdout.getvalue())

    def test_mailxctl_check_unknown_user_exits_2(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", stderr)
        status = cli.main(["check", "-c", str(self.path), "--user", "no-such-user-here"])
        self.assertEqual(status, 2)
        self.assertIn("no-such-user-here", stderr.getvalue())


class ListenTests(unittest.TestCase):
    def test_endpoint_addresses(self) -> None:
        import socket

        cases = {
            "tcp:25": (socket.AF_INET, "", 25),
            "tcp:2525:interface=127.0.0.1": (socket.AF_INET, "127.0.0.1", 2525),
            "haproxy:tcp:port=26:interface=127.0.0.1": (socket.AF_INET, "127.0.0.1", 26),
            "tcp6:25:interface=\\:\\:1": (socket.AF_INET6, "::1", 25),
            "ssl:465:privateKey=k.pem:certKey=c.pem": (socket.AF_INET, "", 465),
            "unix:/run/mailx.sock": None,
        }
        for description, expected in cases.items():
            self.assertEqual(preflight.endpoint_address(description), expected, description)
