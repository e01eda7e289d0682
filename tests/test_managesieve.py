# -*- test-case-name: tests.test_managesieve -*-
"""docs/sieve.md's Dovecot settings, run: a real ManageSieve manages mailx's scripts.

A private Dovecot (its own base_dir, logs and port on 127.0.0.1, stopped by
PID) with the ```dovecot block of docs/sieve.md; sievelib's ManageSieve
client uploads and activates a script as Roundcube would; `MailboxFilters`
then applies it to the next message, from the files Dovecot wrote.  The
full SMTP round-trip is the pipeline's (it calls `MailboxFilters`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from twisted.trial import unittest

from mailx.config import load_config
from mailx.filters.mailbox import MailboxFilters
from mailx.filters.outcome import Copy
from mailx.inbound.routing import MailboxDestination
from mailx.testing import dovecot
from mailx.testing.server import free_port, write_config

from .test_dovecot import chown_tree, vmail_user

REPOSITORY = Path(__file__).resolve().parent.parent
DOVECOT = dovecot.DOVECOT
MANAGESIEVE = Path("/usr/lib/dovecot/managesieve")
PASSWORD = "sieve-secret"

TEST_SETTINGS = """
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 100
userdb {{
  driver = static
  args = uid={uid} gid={gid}
}}
passdb {{
  driver = passwd-file
  args = username_format=%u {base}/users
}}
"""

SCRIPT = """require ["fileinto", "imap4flags"];
if header :contains "subject" "invoice" {
  fileinto :flags "\\\\Flagged" "Finance/Invoices";
  stop;
}
"""


def docs_block() -> str:
    text = (REPOSITORY / "docs" / "sieve.md").read_text()
    match = re.search(r"^```dovecot\n(.*?)^```$", text, re.M | re.S)
    assert match, "docs/sieve.md has no ```dovecot block"
    return match.group(1)


class ManageSieveTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(DOVECOT) or not MANAGESIEVE.exists():
            raise unittest.SkipTest("Dovecot ManageSieve is not installed (apt-get install dovecot-managesieved)")
        if os.geteuid() != 0:
            raise unittest.SkipTest("Dovecot's master process starts as root, as in production")
        try:
            from sievelib import managesieve
        except ImportError:
            raise unittest.SkipTest("sievelib is not installed (pip install .[test])") from None
        self.managesieve = managesieve
        self.vmail = vmail_user()
        # Under /tmp: Dovecot's socket paths must be short, and vmail must reach the home.
        self.base = Path(tempfile.mkdtemp(prefix="mailx-managesieve-"))
        self.base.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.base, True)
        self.mail = self.base / "mail"
        self.home = self.mail / "example.test" / "alice"
        self.home.mkdir(parents=True)
        (self.home / "new").mkdir()
        chown_tree(self.mail, self.vmail.pw_uid, self.vmail.pw_gid)

    def start_dovecot(self) -> int:
        port = free_port()
        (self.base / "users").write_text(f"alice@example.test:{{PLAIN}}{PASSWORD}\n")
        block = docs_block().replace("/srv/mailx/mail", str(self.mail)).replace("port = 4190", f"port = {port}")
        settings = TEST_SETTINGS.format(base=self.base, uid=self.vmail.pw_uid, gid=self.vmail.pw_gid)
        config = self.base / "dovecot.conf"
        config.write_text(settings + block)
        (self.base / "state").mkdir()
        dovecot.launch_for(self, config, [port])
        return port

    def connect(self, port: int):
        """A logged-in ManageSieve client; plaintext on loopback, as Roundcube beside Dovecot."""
        client = self.managesieve.Client("127.0.0.1", port)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Credentials are sent over an unencrypted", UserWarning)
            self.assertTrue(client.connect("alice@example.test", PASSWORD, authmech="PLAIN"), client.errmsg)
        return client

    def filters(self) -> MailboxFilters:
        overrides = {"paths": {"mail": str(self.mail), "spool": str(self.base / "spool")}}
        return MailboxFilters(load_config(write_config(self.base / "etc", overrides)))

    def test_script_uploaded_over_managesieve_applies_to_the_next_message(self) -> None:
        port = self.start_dovecot()
        filters = self.filters()
        alice = MailboxDestination("example.test", "alice")
        header = b"From: shop@vendor.test\r\nTo: alice@example.test\r\nSubject: Your invoice\r\n\r\n"

        def outcome():
            return filters.outcome(alice, "shop@vendor.test", "alice@example.test", header, lambda n: b"")

        self.assertEqual(outcome().copies, (Copy(),))
        client = self.connect(port)
        try:
            self.assertTrue(client.putscript("roundcube", SCRIPT), client.errmsg)
            self.assertTrue(client.setactive("roundcube"), client.errmsg)
            active, others = client.listscripts()
            self.assertEqual(active, "roundcube")
        finally:
            client.logout()
        # Where Pigeonhole keeps it, as mailx reads it.
        self.assertEqual(os.readlink(self.home / ".dovecot.sieve"), "sieve/roundcube.sieve")
        self.assertEqual(outcome().copies, (Copy("Finance.Invoices", "F"),))

        # Changed over ManageSieve while mail flows: the next message sees it.
        client = self.connect(port)
        try:
            self.assertTrue(client.putscript("roundcube", SCRIPT.replace("Finance/Invoices", "Bills")), client.errmsg)
        finally:
            client.logout()
        self.assertEqual(outcome().copies, (Copy("Bills", "F"),))

    def test_mailxctl_vacation_script_is_listed_by_managesieve(self) -> None:
        from mailx.admin import cli

        config = write_config(self.base / "etc", {"paths": {"mail": str(self.mail), "spool": str(self.base / "spool")}})
        body = self.base / "away.txt"
        body.write_text("Away until Monday.\n")
        self.patch(sys, "stdout", io.StringIO())
        status = cli.main(["-c", str(config), "vacation", "alice@example.test", "on", "--subject", "Away", "--body-file", str(body)])
        self.assertEqual(status, 0)
        # mailxctl ran as root: the files belong to the home's owner, whom Dovecot runs as.
        script = self.home / "sieve" / "mailx-vacation.sieve"
        self.assertEqual(script.stat().st_uid, self.vmail.pw_uid)
        port = self.start_dovecot()
        client = self.connect(port)
        try:
            active, _ = client.listscripts()
            self.assertEqual(active, "mailx-vacation")
            self.assertIn("vacation :days 7", client.getscript("mailx-vacation"))
        finally:
            client.logout()
