# -*- test-case-name: tests.test_dovecot -*-
"""The README's Dovecot recipe, run with a real Dovecot over IMAP.

Dovecot refuses to serve mail as uid 0 ("userdb returned 0 as uid"), and
mailx creates its Maildir files 0600 and directories 0700 for the user it
runs as; so mailx and Dovecot's userdb share one unprivileged user,
``vmail`` (README, "Read it with Dovecot").  The test takes the Dovecot
settings from the README itself, so the two cannot drift apart, starts a
private Dovecot (its own base_dir, logs and port on 127.0.0.1; nothing of
the system's), has mailx file one message into INBOX and one, by the
sender's DMARC p=quarantine, into Junk, and reads both back with imaplib.
Where vmail can run this interpreter, mailx runs exactly as the README says
(twistd --uid vmail --gid vmail); otherwise in-process, and the test hands
its files to vmail as --uid would have made them.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailx.testing import dovecot
from mailx.testing.dnsserver import serve_for_test
from mailx.testing.server import ServerProcess, free_port, send_mail, start_server, write_config

REPOSITORY = Path(__file__).resolve().parent.parent
DOVECOT = dovecot.DOVECOT
PASSWORD = "imap-secret"

# What a test needs on top of the recipe: its own directories, logs and
# port, no TLS (loopback only), and PLAIN login without TLS for imaplib.
TEST_SETTINGS = """
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def readme_recipe() -> str:
    """The ```dovecot block of the README's Dovecot section."""
    text = (REPOSITORY / "README.md").read_text()
    match = re.search(r"^```dovecot\n(.*?)^```$", text, re.M | re.S)
    assert match, "README.md has no ```dovecot block"
    return match.group(1)


def vmail_user() -> pwd.struct_passwd:
    """The README's vmail user; created (as the README says) on a machine without one."""
    try:
        return pwd.getpwnam("vmail")
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        raise unittest.SkipTest("no vmail user and no useradd to create it")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "vmail"],
        capture_output=True,
    )  # another test run may have created it meanwhile: look again
    return pwd.getpwnam("vmail")


def vmail_can_run_this_python() -> bool:
    """Can an unprivileged user import this interpreter and its packages?"""
    import sys

    import twisted

    # The interpreter (a file to execute) and the directories down to it and
    # to the packages: each needs the "others" execute bit.
    for start in (Path(sys.executable).resolve(), Path(twisted.__file__).resolve().parent):
        for path in [start, *start.parents]:
            if not os.stat(path).st_mode & 0o001:
                return False
    return True


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


class DovecotRecipeTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(DOVECOT):
            raise unittest.SkipTest("Dovecot is not installed (apt-get install dovecot-imapd)")
        if os.geteuid() != 0:
            raise unittest.SkipTest("Dovecot's master process starts as root, as in production")
        self.vmail = vmail_user()
        # Under /tmp, not _trial_temp: Dovecot's sockets need a short path
        # (108 octets), and vmail must be able to walk to the Maildir.
        self.base = Path(tempfile.mkdtemp(prefix="mailx-dovecot-"))
        self.base.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.base, True)
        self.mail = self.base / "mail"

    def start_dovecot(self) -> int:
        port = free_port()
        users = self.base / "users"
        # The recipe's passwd-file, with a password Dovecot need not hash.
        users.write_text(f"alice@example.test:{{PLAIN}}{PASSWORD}\n")
        recipe = readme_recipe().replace("/srv/mailx/mail", str(self.mail))
        recipe = recipe.replace("/etc/dovecot/users", str(users))
        config = self.base / "dovecot.conf"
        config.write_text(TEST_SETTINGS.format(base=self.base, port=port) + recipe)
        (self.base / "state").mkdir()
        dovecot.launch_for(self, config, [port])
        return port

    def imap_subjects(self, port: int, folder: str) -> list[str]:
        client = imaplib.IMAP4("127.0.0.1", port)
        try:
            client.login("alice@example.test", PASSWORD)
            status, data = client.select(folder, readonly=True)
            if status != "OK":
                return [f"SELECT failed: {data}"]
            _, numbers = client.search(None, "ALL")
            subjects = []
            for number in numbers[0].split():
                _, parts = client.fetch(number, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                subjects.append(parts[0][1].decode().strip())
            return subjects
        finally:
            client.logout()

    def overrides(self, dns_port: int) -> dict:
        return {
            "paths": {"mail": str(self.mail), "spool": str(self.base / "spool")},
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "1s"},
            "authentication": {"spf": True, "dkim": True, "dmarc": "enforce"},
        }

    @defer.inlineCallbacks
    def test_dovecot_reads_inbox_and_junk_that_mailx_filed(self) -> None:
        dns = serve_for_test(
            self,
            {
                "shop.test": {"TXT": ["v=spf1 -all"]},
                "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
            },
        )
        as_vmail = vmail_can_run_this_python()
        if as_vmail:
            # The recipe itself: twistd --uid vmail --gid vmail mailx.
            port = free_port()
            config = write_config(
                self.base / "etc",
                {**self.overrides(dns.port), "listen": {"smtp": [f"tcp:{port}:interface=127.0.0.1"]}},
            )
            server = ServerProcess(
                config, port, ["--uid", str(self.vmail.pw_uid), "--gid", str(self.vmail.pw_gid)]
            )
            yield threads.deferToThread(server.start)
            self.addCleanup(server.kill)
        else:
            server = start_server(self, self.overrides(dns.port))
            port = server.port
        yield send_mail(
            port, "friend@sender.test", ["alice@example.test"],
            b"From: friend@sender.test\r\nSubject: hello inbox\r\n\r\nHi.\r\n",
        )
        yield send_mail(
            port, "deals@shop.test", ["alice@example.test"],
            b"From: deals@shop.test\r\nSubject: cheap deals\r\n\r\nBuy.\r\n",
        )
        self.assertEqual(len(list((self.mail / "example.test/alice/.Junk/new").iterdir())), 1)
        port = self.start_dovecot()

        if not as_vmail:
            # mailx ran as root in this process, so its files are root's,
            # 0600 in 0700 directories: what a server run as root leaves,
            # and Dovecot (as vmail) cannot open it.
            self.assertIn("SELECT failed", self.imap_subjects(port, "INBOX")[0])
            # The recipe runs mailx with twistd --uid vmail --gid vmail, which
            # makes vmail the owner of all it writes (the branch above, where
            # vmail can run this interpreter).  Here it lives where vmail
            # cannot import from (pyenv under /root, 0700), so the test hands
            # the tree to vmail as twistd's --uid would have created it.
            chown_tree(self.mail, self.vmail.pw_uid, self.vmail.pw_gid)
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in self.mail.rglob("*")}
        self.assertEqual(owners, {(self.vmail.pw_uid, self.vmail.pw_gid)})
        self.assertEqual(self.imap_subjects(port, "INBOX"), ["Subject: hello inbox"])
        self.assertEqual(self.imap_subjects(port, "Junk"), ["Subject: cheap deals"])
        log = (self.base / "dovecot.log").read_text()
        self.assertIn("user=<alice@example.test>", log)
