# -*- test-case-name: tests.test_cli -*-
"""``mailxctl check`` and ``mailxctl route`` (SPEC section 9): mailx.admin.cli."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from mailx import config as config_module
from mailx.admin import cli
from mailx.testing import SRS_SECRET

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT = str(REPOSITORY / "mailx.yaml")

GOOD = """\
hostname: mx.example.test
domains:
  example.test:
    mailboxes: [alice, bob]
    aliases:
      postmaster: alice
      team: [alice, bob]
      "*": bob
  bücher.example:
    alias_of: example.test
"""

# Two problems: line 3 and line 5.
BAD = """\
hostname: mx.example.test
limits:
  recipients: lots
domains:
  example.test:
    mailboxes: [alice]
    aliases:
      postmaster: alise
"""


class CLITestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.patch(
            os, "environ", {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENVIRONMENT}
        )

    def write(self, text: str, name: str = "mailx.yaml") -> str:
        path = self.directory / name
        path.write_text(text)
        return str(path)

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """main(argv) in-process: (exit status, stdout, stderr)."""
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = cli.main(list(argv))
        return status, stdout.getvalue(), stderr.getvalue()

    def json_of(self, *argv: str) -> tuple[int, dict]:
        status, out, _ = self.run_cli(*argv, "--json")
        return status, json.loads(out)


class CheckTests(CLITestCase):
    def test_repository_default_is_ok(self) -> None:
        status, out, err = self.run_cli("check", "-c", DEFAULT)
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"{DEFAULT}: OK", out)

    def test_summary_names_hostname_and_listen(self) -> None:
        _, out, _ = self.run_cli("check", "-c", DEFAULT)
        self.assertIn("hostname: mx.example.test", out)
        self.assertIn("listen: tcp:2525:interface=127.0.0.1", out)

    def test_summary_lists_mailboxes_and_alias_expansion(self) -> None:
        _, out, _ = self.run_cli("check", "-c", self.write(GOOD))
        self.assertIn("  mailboxes: alice, bob", out)
        self.assertIn(
            "    team → alice, bob  (delivers to alice@example.test, bob@example.test)", out
        )

    def test_summary_shows_catch_all(self) -> None:
        _, out, _ = self.run_cli("check", "-c", self.write(GOOD))
        self.assertIn("  catch-all:\n    * → bob  (delivers to bob@example.test)", out)

    def test_summary_shows_alias_of_domain_in_both_forms(self) -> None:
        _, out, _ = self.run_cli("check", "-c", self.write(GOOD))
        self.assertIn("domain xn--bcher-kva.example (bücher.example): alias of example.test", out)

    def test_summary_shows_where_bare_postmaster_goes(self) -> None:
        _, out, _ = self.run_cli("check", "-c", self.write(GOOD))
        self.assertIn("bare <postmaster>: postmaster@example.test", out)

    def test_json(self) -> None:
        status, data = self.json_of("check", "-c", self.write(GOOD))
        self.assertEqual(status, 0)
        self.assertEqual(data["hostname"], "mx.example.test")
        domain = data["domains"][0]
        self.assertEqual(
            domain["aliases"]["team"],
            {
                "targets": ["alice", "bob"],
                "delivers_to": ["alice@example.test", "bob@example.test"],
            },
        )
        self.assertEqual(
            domain["catch_all"], {"targets": ["bob"], "delivers_to": ["bob@example.test"]}
        )
        self.assertEqual(data["domains"][1]["alias_of"], "example.test")

    def test_bad_config_exits_1(self) -> None:
        status, _, _ = self.run_cli("check", "-c", self.write(BAD))
        self.assertEqual(status, 1)

    def test_bad_config_prints_each_problem_on_stderr(self) -> None:
        path = self.write(BAD)
        _, out, err = self.run_cli("check", "-c", path)
        self.assertEqual(out, "")
        self.assertEqual(
            err.splitlines(),
            [
                f"{path}:3: limits.recipients: expected a whole number, got 'lots'",
                f"{path}:8: domains.example.test.aliases.postmaster: unknown mailbox 'alise'"
                " (did you mean 'alice'?)",
            ],
        )

    def test_bad_config_json_lists_problems(self) -> None:
        path = self.write(BAD)
        status, data = self.json_of("check", "-c", path)
        self.assertEqual(status, 1)
        self.assertEqual(data["ok"], False)
        self.assertEqual(
            [(p["file"], p["line"], p["key"]) for p in data["problems"]],
            [(path, 3, "limits.recipients"), (path, 8, "domains.example.test.aliases.postmaster")],
        )

    def test_missing_config_exits_1_without_traceback(self) -> None:
        status, _, err = self.run_cli("check", "-c", str(self.directory / "nope.yaml"))
        self.assertEqual(status, 1)
        self.assertIn("nope.yaml: no configuration file here (given with -c)", err)
        self.assertNotIn("Traceback", err)


class SRSSecretTests(CLITestCase):
    def test_check_refuses_the_sample_secret_with_a_fresh_one(self) -> None:
        status, out, err = self.run_cli(
            "check", "-c", self.write(GOOD + "outbound: {srs_secret: change-me}\n")
        )
        self.assertEqual(status, cli.EXIT_WRONG)
        self.assertIn("outbound.srs_secret: 'change-me' is a sample value", err)
        offered = err.strip().rsplit("e.g. ", 1)[1]
        self.assertIsNone(config_module.secret_weakness(offered))

    def test_srs_secret_prints_a_strong_secret_without_a_configuration(self) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)  # no mailx.yaml here
        status, out, err = self.run_cli("srs-secret")
        self.assertEqual((status, err), (0, ""))
        secret = out.strip()
        self.assertIsNone(config_module.secret_weakness(secret))
        self.assertNotEqual(secret, self.run_cli("srs-secret")[1].strip())

    def test_the_printed_secret_passes_check(self) -> None:
        _, out, _ = self.run_cli("srs-secret")
        text = GOOD + f"outbound: {{srs_secret: '{out.strip()}'}}\n"
        self.assertEqual(self.run_cli("check", "-c", self.write(text))[0], 0)


class DKIMKeyModeTests(CLITestCase):
    def test_check_refuses_a_world_readable_dkim_key(self) -> None:
        key = self.directory / "example.test.key"
        key.write_text("key")
        key.chmod(0o644)
        text = GOOD.replace(
            "      \"*\": bob\n", "      \"*\": bob\n    dkim: {selector: mx1, key: example.test.key}\n"
        )
        status, _, err = self.run_cli("check", "-c", self.write(text))
        self.assertEqual(status, cli.EXIT_WRONG)
        self.assertIn(
            f"domains.example.test.dkim.key: every user of this machine can use {key} (mode 0644)", err
        )
        key.chmod(0o600)
        self.assertEqual(self.run_cli("check", "-c", self.write(text))[0], cli.EXIT_OK)


class ConfigFileChoiceTests(CLITestCase):
    def test_option_before_the_command(self) -> None:
        status, out, _ = self.run_cli("-c", self.write(GOOD), "check")
        self.assertEqual(status, 0)
        self.assertIn("example.test", out)

    def test_environment_variable(self) -> None:
        os.environ[cli.CONFIG_ENVIRONMENT] = self.write(GOOD, "from-env.yaml")
        _, out, _ = self.run_cli("check")
        self.assertIn("from-env.yaml: OK", out)

    def test_option_beats_environment(self) -> None:
        os.environ[cli.CONFIG_ENVIRONMENT] = str(self.directory / "nope.yaml")
        status, out, _ = self.run_cli("check", "-c", self.write(GOOD, "chosen.yaml"))
        self.assertEqual(status, 0)
        self.assertIn("chosen.yaml: OK", out)

    def test_current_directory_by_default(self) -> None:
        self.write(GOOD)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        _, out, _ = self.run_cli("check")
        self.assertIn(f"{self.directory / 'mailx.yaml'}: OK", out)


class HostnameTests(CLITestCase):
    def test_dns_never_prints_an_mx_to_localhost(self) -> None:
        config = self.write(GOOD.replace("mx.example.test", "localhost"))
        status, out, err = self.run_cli("dns", "-c", config, "example.test", "--ip", "192.0.2.25")
        self.assertEqual(status, 1)
        self.assertNotIn("MX", out)
        self.assertIn("'localhost' is not a fully qualified domain name", err)

    def test_dns_plan_refuses_a_config_built_with_a_bare_hostname(self) -> None:
        import dataclasses

        from mailx import config as config_module
        from mailx.admin import dnssetup

        config = config_module.load_config(self.write(GOOD))
        bare = dataclasses.replace(config, hostname="localhost")
        error = self.assertRaises(ValueError, dnssetup.plan, bare, "example.test")
        self.assertIn("not a fully qualified domain name", str(error))


class RouteTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = self.write(GOOD)

    def test_mailbox(self) -> None:
        status, out, _ = self.run_cli("route", "-c", self.config, "alice+news@Example.Test")
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "alice+news@example.test",
                "  example.test is a local domain",
                "  'alice+news' → 'alice' (subaddress '+news' stripped)",
                f"  alice@example.test is a mailbox → {self.directory}/var/mail/example.test/alice",
                "delivers to:",
                f"  mailbox alice@example.test: {self.directory}/var/mail/example.test/alice",
                "250 2.1.5 Recipient OK",
            ],
        )

    def test_alias_lists_every_maildir(self) -> None:
        _, out, _ = self.run_cli("route", "-c", self.config, "team@xn--bcher-kva.example")
        self.assertIn(
            f"  mailbox alice@example.test: {self.directory}/var/mail/example.test/alice", out
        )
        self.assertIn(
            f"  mailbox bob@example.test: {self.directory}/var/mail/example.test/bob", out
        )

    def test_bare_postmaster(self) -> None:
        status, out, _ = self.run_cli("route", "-c", self.config, "postmaster")
        self.assertEqual(status, 0)
        self.assertIn("mailbox alice@example.test", out)

    def test_angle_brackets_are_accepted(self) -> None:
        status, _, _ = self.run_cli("route", "-c", self.config, "<alice@example.test>")
        self.assertEqual(status, 0)

    def test_foreign_domain_exits_1_with_the_reply(self) -> None:
        status, out, _ = self.run_cli("route", "-c", self.config, "alice@elsewhere.test")
        self.assertEqual(status, 1)
        self.assertEqual(out.splitlines()[-1], "550 5.7.1 Relaying denied")

    def test_postmaster_fallback_is_said(self) -> None:
        config = self.write(GOOD + "  lone.test:\n    mailboxes: [zed]\n")
        status, out, _ = self.run_cli("route", "-c", config, "postmaster@lone.test")
        self.assertEqual(status, 0)
        self.assertIn(
            "  lone.test has no postmaster: postmaster@lone.test goes to the first domain's,"
            " postmaster@example.test (SPEC section 4, RFC 5321 section 4.5.1)",
            out.splitlines(),
        )
        self.assertIn("  mailbox alice@example.test: ", out)

    def test_check_summary_names_the_postmaster_fallback(self) -> None:
        config = self.write(GOOD + "  lone.test:\n    mailboxes: [zed]\n")
        status, out, _ = self.run_cli("check", "-c", config)
        self.assertEqual(status, 0)
        self.assertIn(
            "  postmaster → alice@example.test  (the first domain's: none of its own)",
            out.splitlines(),
        )
        self.assertEqual(out.count("none of its own"), 1)

    def test_unknown_recipient_exits_1_with_the_reply(self) -> None:
        config = self.write(GOOD.replace('      "*": bob\n', ""), "no-catch-all.yaml")
        status, out, _ = self.run_cli("route", "-c", config, "zed@example.test")
        self.assertEqual(status, 1)
        self.assertEqual(
            out.splitlines(),
            [
                "zed@example.test",
                "  example.test is a local domain",
                "  'zed' is not a mailbox or alias of example.test, and there is no catch-all",
                "550 5.1.1 No such user here",
            ],
        )

    def test_bad_syntax_exits_1_with_the_reply(self) -> None:
        status, out, _ = self.run_cli("route", "-c", self.config, "not an address")
        self.assertEqual(status, 1)
        self.assertEqual(out.splitlines()[-1], "501 5.1.3 Bad recipient address syntax")

    def test_json(self) -> None:
        status, data = self.json_of("route", "-c", self.config, "team@example.test")
        self.assertEqual(status, 0)
        self.assertEqual(
            (data["accepted"], data["reply"]["code"], [d["address"] for d in data["destinations"]]),
            (True, 250, ["alice@example.test", "bob@example.test"]),
        )
        self.assertEqual(
            data["destinations"][0]["maildir"], f"{self.directory}/var/mail/example.test/alice"
        )
        self.assertIn("team@example.test is an alias → alice, bob", data["trace"])

    def test_json_refusal(self) -> None:
        status, data = self.json_of("route", "-c", self.config, "alice@elsewhere.test")
        self.assertEqual(status, 1)
        self.assertEqual(
            (data["accepted"], data["reply"]),
            (False, {"code": 550, "enhanced": "5.7.1", "text": "Relaying denied"}),
        )

    def test_bad_config_exits_1(self) -> None:
        status, _, err = self.run_cli(
            "route", "-c", self.write(BAD, "bad.yaml"), "alice@example.test"
        )
        self.assertEqual(status, 1)
        self.assertIn("limits.recipients", err)


class MissingConfigTests(CLITestCase):
    def test_default_file_missing_names_the_path_and_how_to_choose(self) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        status, _, err = self.run_cli("check")
        self.assertEqual(status, 1)
        self.assertIn(f"{self.directory / 'mailx.yaml'}: no configuration file here", err)
        self.assertIn("the default, ./mailx.yaml in the current directory", err)
        self.assertIn("-c FILE or $MAILX_CONFIG", err)

    def test_environment_file_missing_says_it_came_from_there(self) -> None:
        os.environ[cli.CONFIG_ENVIRONMENT] = str(self.directory / "gone.yaml")
        status, _, err = self.run_cli("route", "alice@example.test")
        self.assertEqual(status, 1)
        self.assertIn(f"{self.directory / 'gone.yaml'}: no configuration file here (from $MAILX_CONFIG)", err)


class ReloadPermissionTests(CLITestCase):
    def test_server_of_another_user_is_one_line(self) -> None:
        config = self.write(GOOD)
        spool = self.directory / "var" / "spool"
        spool.mkdir(parents=True)
        (spool / "mailx.pid").write_text("4242\n")

        def kill(pid: int, signum: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "kill", kill)
        status, out, err = self.run_cli("reload", "-c", config)
        self.assertEqual(status, 1)
        self.assertIn("cannot reach mailx: permission denied", out)
        self.assertNotIn("Traceback", out + err)


class RouteSRSTests(CLITestCase):
    """``route`` reverses our SRS addresses as the server does at RCPT."""

    SECRET = SRS_SECRET

    def setUp(self) -> None:
        super().setUp()
        self.config = self.write(
            GOOD.replace('      "*": bob\n', "")
            + f"outbound:\n  srs_secret: {self.SECRET}\n"
        )

    def test_valid_srs_address_goes_to_the_original_sender(self) -> None:
        from mailx.outbound.srs import SRS

        address = SRS([self.SECRET]).forward("carol@sender.test", "example.test")
        status, out, _ = self.run_cli("route", "-c", self.config, address)
        self.assertEqual(status, 0, out)
        self.assertIn("is an SRS address of ours → bounce to carol@sender.test", out)
        self.assertIn("  forward to carol@sender.test", out)

    def test_forged_srs_address_is_refused_and_says_why(self) -> None:
        status, out, _ = self.run_cli(
            "route", "-c", self.config, "SRS0=abcdef=AB=sender.test=carol@example.test"
        )
        self.assertEqual(status, 1)
        self.assertIn("is an SRS address at one of our domains, but not a valid one", out)
        self.assertEqual(out.splitlines()[-1], "550 5.7.1 Invalid SRS address")


class UsageTests(CLITestCase):
    def test_no_command_exits_2(self) -> None:
        status, _, err = self.run_cli()
        self.assertEqual(status, 2)
        self.assertIn("usage: mailxctl", err)

    def test_unknown_command_exits_2(self) -> None:
        self.assertEqual(self.run_cli("frobnicate")[0], 2)

    def test_route_without_address_exits_2(self) -> None:
        self.assertEqual(self.run_cli("route")[0], 2)

    def test_unknown_option_exits_2(self) -> None:
        self.assertEqual(self.run_cli("check", "--frobnicate")[0], 2)

    def test_help_exits_0(self) -> None:
        status, out, _ = self.run_cli("--help")
        self.assertEqual(status, 0)
        self.assertIn("check", out)
        self.assertIn("route", out)

    def test_a_registered_command_becomes_a_subcommand(self) -> None:
        def arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("word")

        def echo(context: cli.Context) -> int:
            print(context.args.word)
            return 0

        self.addCleanup(cli.COMMANDS.pop, "echo")
        cli.command("echo", "print a word", arguments)(echo)
        self.assertEqual(self.run_cli("echo", "hello"), (0, "hello\n", ""))


class EntryPointTests(unittest.TestCase):
    def run_module(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        env.pop(cli.CONFIG_ENVIRONMENT, None)
        return subprocess.run(
            [sys.executable, "-m", "mailx.admin.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPOSITORY,
            timeout=60,
        )

    def test_module_runs_check_on_the_default_config(self) -> None:
        result = self.run_module("check")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("mailx.yaml: OK", result.stdout)

    def test_module_exit_status_of_an_unroutable_address(self) -> None:
        result = self.run_module("route", "zed@example.test")
        self.assertEqual(result.returncode, 1)
        self.assertIn("550 5.1.1", result.stdout)
