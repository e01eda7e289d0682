"""What Sieve filters cost: mailx with a realistic 20-rule script on the mailbox vs none.

    python3 bench/filters.py                        # 1 KiB, 10 sessions, 3 repeats each
    python3 bench/filters.py --messages 2000 --repeat 5
    python3 bench/filters.py --in-process --messages 5000   # the filters alone, no server

Same run, same machine, interleaved: ``none`` is run.py's mailx on an
empty Maildir; ``sieve`` is the same with the script below active in
``alice``'s home (``sieve/bench.sieve`` and the ``.dovecot.sieve`` link,
Pigeonhole's layout, as ManageSieve leaves it).  19 rules do not match the
benchmark message and the last files it into ``Bench``, so every message
runs all 20 tests and lands in ``.Bench/new`` (run.py counts every ``new/``;
a flag would file it into ``cur/``, where run.py does not look).  Goal (issue 13): sieve costs at most 15% of none's msg/s.

It needs the pipeline that calls `mailx.filters.mailbox.MailboxFilters`
when it files (issue 13 lands the filters, the pipeline branch calls them);
before that, every message stays in INBOX and this script says so rather
than print a figure that measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import run
from run import RunError, Scenario

RULES = """require ["fileinto", "imap4flags", "envelope", "regex", "variables", "body", "copy"];
# A user's filters as Roundcube writes them: lists, shops, people, spam.
if header :contains "list-id" "dev.lists.example" { fileinto "Lists/Dev"; stop; }
if header :contains "list-id" "announce.example" { fileinto "Lists/Announce"; stop; }
if address :is "from" "boss@work.example" { addflag "\\\\Flagged"; }
if address :domain :is "from" ["shop.example", "store.example"] { fileinto "Shopping"; stop; }
if header :matches "subject" "*[SPAM]*" { fileinto "Junk"; stop; }
if header :regex "x-spam-score" "^[5-9]\\\\." { fileinto "Junk"; stop; }
if exists "x-github-reason" { fileinto "GitHub"; stop; }
if envelope :is "from" "noreply@bank.example" { fileinto "Finance"; stop; }
if header :contains "subject" ["invoice", "receipt", "Rechnung"] { fileinto "Finance"; stop; }
if address :localpart :is "to" "newsletter" { fileinto "News"; stop; }
if header :matches "from" "*@family.example*" { fileinto "Family"; stop; }
if size :over 5M { fileinto "Large"; stop; }
if header :is "x-mailer" "BulkMailer 3.0" { discard; stop; }
if header :contains "subject" "meeting" { addflag "$Meeting"; }
if header :regex "subject" "(?i)^re: \\\\[ticket #[0-9]+\\\\]" { fileinto "Support"; stop; }
if address :is ["to", "cc"] "team@work.example" { fileinto "Team"; stop; }
if header :matches "subject" "Out of office*" { fileinto "Auto"; stop; }
if header :contains "from" "calendar-notification" { fileinto "Calendar"; stop; }
if body :contains "unsubscribe-never-in-bench" { fileinto "News"; stop; }
if header :contains "subject" "benchmark" { fileinto "Bench"; }
"""


def sieve_server(run_dir: Path, port: int, scenario: Scenario, args) -> list[str]:
    """run.py's mailx, with the script active in the mailbox's home."""
    home = run_dir / "mail" / run.DOMAIN / run.MAILBOX
    (home / "sieve").mkdir(parents=True)
    (home / "sieve" / "bench.sieve").write_text(RULES)
    os.symlink("sieve/bench.sieve", home / ".dovecot.sieve")
    return run.mailx_command(run_dir, port, scenario, args)


run.SERVERS["mailx-sieve"] = sieve_server
# This checkout's mailx, as run.py gives its servers, for --in-process too.
sys.path.insert(0, str(run.REPO))


def in_process(messages: int) -> None:
    """CPU per message of MailboxFilters.outcome alone, on the benchmark's message.

    Runs before the pipeline calls the filters, and says what a server's run
    will add per message: compare with run.py's mailx CPU ms/msg.
    """
    import time

    from loadgen import SENDER, make_message

    from mailx.config import load_config
    from mailx.filters.mailbox import MailboxFilters
    from mailx.inbound.routing import MailboxDestination
    from mailx.testing.server import write_config

    with tempfile.TemporaryDirectory(prefix="mailx-bench-sieve-") as directory:
        base = Path(directory)
        overrides = {
            "paths": {"mail": str(base / "mail"), "spool": str(base / "spool")},
            "domains": {run.DOMAIN: {"mailboxes": [run.MAILBOX]}},
        }
        config = load_config(write_config(base / "etc", overrides))
        home = base / "mail" / run.DOMAIN / run.MAILBOX
        (home / "sieve").mkdir(parents=True)
        (home / "sieve" / "bench.sieve").write_text(RULES)
        os.symlink("sieve/bench.sieve", home / ".dovecot.sieve")
        from twisted.internet import reactor

        data = make_message(1024)
        cut = data.index(b"\r\n\r\n") + 4
        header, body = data[:cut], data[cut:]
        mailbox = MailboxDestination(run.DOMAIN, run.MAILBOX)
        sender = SENDER
        # Statted per message (no reactor), then kept by inotify as the server does.
        for kind, filters in (("stat", MailboxFilters(config)), ("inotify", MailboxFilters(config, reactor=reactor))):
            filters.needs_thread(mailbox)
            outcome = filters.outcome(mailbox, sender, f"{run.MAILBOX}@{run.DOMAIN}", header, lambda n: body[:n])
            print(f"outcome: {outcome}")
            started = time.process_time()
            for _ in range(messages):
                filters.outcome(mailbox, sender, f"{run.MAILBOX}@{run.DOMAIN}", header, lambda n: body[:n])
            print(f"MailboxFilters.outcome ({kind}): {(time.process_time() - started) / messages * 1000:.3f}"
                  f" CPU ms/msg over {messages} messages")
            filters.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mailx-command", default=run.TWISTD + " -n --pidfile= mailx")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--in-process", action="store_true",
                        help="only time MailboxFilters.outcome in this process (no server)")
    args = parser.parse_args(argv)
    if args.in_process:
        in_process(args.messages)
        return 0
    args.loadgen = "python"
    from mailx.filters import compile_script

    compile_script(RULES)  # a broken script would measure the failure path
    space = run.RunSpace(args.workdir, "mailx-bench-sieve-")
    workdir = space.root
    base = Scenario(f"{args.size}B-c{args.concurrency}", args.size, args.concurrency, args.messages)
    print(f"{args.messages} messages of {args.size} B over {args.concurrency} sessions ({workdir})", flush=True)
    kinds = {"none": "mailx", "sieve": "mailx-sieve"}
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with space:
        for rep in range(args.repeat):
            for kind in list(kinds) if rep % 2 == 0 else list(kinds)[::-1]:
                run_dir = space.run_dir(f"{kind}-{rep + 1}")
                try:
                    result = run.measure(kinds[kind], base, args.messages, run_dir, args)
                    filed = run.count_files([run_dir / "mail" / run.DOMAIN / run.MAILBOX / ".Bench" / "new"])
                except RunError as e:
                    print(f"{kind} #{rep + 1}: {e}", file=sys.stderr)
                    return 1
                if kind == "sieve" and filed < result["delivered"]:
                    print(
                        f"sieve #{rep + 1}: only {filed} of {result['delivered']} messages in .Bench:"
                        " this mailx does not run the filters when it files (the pipeline that calls"
                        " MailboxFilters is not merged yet?)",
                        file=sys.stderr,
                    )
                    return 1
                results[kind].append(result)
                rate = result["msgs_per_s"]
                print(
                    f"  {kind:<6} #{rep + 1}: " + (f"{rate:7.0f} msg/s" if rate else "  FAILED   ")
                    + f"  CPU {result['cpu_per_msg'] * 1000:.2f} ms/msg", flush=True,
                )
    medians = {k: statistics.median(r["msgs_per_s"] for r in v if r["msgs_per_s"]) for k, v in results.items()}
    cpus = {k: statistics.median(r["cpu_per_msg"] * 1000 for r in v) for k, v in results.items()}
    cost = 1 - medians["sieve"] / medians["none"]
    print()
    print("| filters | msg/s median | CPU ms/msg |")
    print("|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {medians[kind]:.0f} | {cpus[kind]:.2f} |")
    print(f"\ncost of the 20-rule script: {cost:.1%} of msg/s (goal: at most 15%)")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "cost": cost}, indent=2))
    return 0 if cost <= 0.15 else 2


if __name__ == "__main__":
    sys.exit(main())
