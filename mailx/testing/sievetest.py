"""Run Pigeonhole's ``sieve-test`` and our interpreter, reduce both to one shape.

The differential tests compare the two on a corpus; a person can run
``mailxctl sieve test`` beside ``sieve-test`` and read the same listing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mailx.filters import Envelope, Message, Result, SieveError, compile_script, run

SIEVE_TEST = shutil.which("sieve-test")

_CONFIG = """\
protocols =
mail_location = maildir:{home}/mail
plugin {{
  sieve_extensions = +vacation-seconds +encoded-character
  sieve_vacation_min_period = 1d
  sieve_max_redirects = 4
}}
"""

Canonical = tuple


class Pigeonhole:
    """A private ``sieve-test`` setup in a temporary directory."""

    def __init__(self) -> None:
        if SIEVE_TEST is None:
            raise RuntimeError("sieve-test is not installed (Debian: dovecot-sieve)")
        self.home = Path(tempfile.mkdtemp(prefix="mailx-sieve-"))
        (self.home / "mail").mkdir()
        (self.home / "dovecot.conf").write_text(_CONFIG.format(home=self.home))
        self.count = 0
        self._open()

    def _open(self) -> None:
        for path in [self.home, *self.home.rglob("*")]:
            os.chmod(path, 0o777 if path.is_dir() else 0o666)

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def run(self, script: bytes, message: bytes, envelope: Envelope) -> Canonical:
        """The canonical outcome of sieve-test on script and message."""
        self.count += 1
        s = self.home / f"s{self.count}.sieve"
        m = self.home / f"m{self.count}.eml"
        s.write_bytes(script)
        m.write_bytes(message)
        os.chmod(s, 0o666)
        os.chmod(m, 0o666)
        if SIEVE_TEST is None:
            raise RuntimeError("sieve-test is not installed (Debian: dovecot-sieve)")
        argv = [
            SIEVE_TEST, "-c", str(self.home / "dovecot.conf"),
            # sieve-test cannot express the null sender (-f "<>" is refused).
            "-f", envelope.mail_from, "-r", envelope.mailbox or envelope.rcpt_to,
            "-a", envelope.rcpt_to, str(s), str(m),
        ]
        if os.getuid() == 0:
            # sieve-test will not run as root without mail_uid; nobody reads 0666 files.
            argv = ["runuser", "-u", "nobody", "--", *argv]
        proc = subprocess.run(argv, capture_output=True, timeout=60, text=True, errors="replace")
        for p in (s, m, s.with_suffix(".svbin")):
            p.unlink(missing_ok=True)
        output = proc.stdout + proc.stderr
        if "Fatal:" in output and "failed to compile" not in output:
            raise RuntimeError(f"sieve-test failed: {output.strip()}")
        return canonical_pigeonhole(output)


def canonical_pigeonhole(output: str) -> Canonical:
    if "failed to compile" in output:
        m = re.search(r": line (\d+): error", output)
        return ("compile-error", int(m.group(1)) if m else 0)
    if "final result: failed" in output:
        return ("runtime-error",)
    explicit: list[list] = []
    implicit: list[list] = []
    section = None
    for line in output.splitlines():
        if line.startswith("Performed actions:"):
            section = explicit
        elif line.startswith("Implicit keep:"):
            section = implicit
        elif section is None:
            continue
        elif line.startswith(" * store message in folder: "):
            section.append(["store", line.split(": ", 1)[1], ()])
        elif line.startswith("        + add IMAP flags: "):
            flags = line.split(": ", 1)[1].split()
            section[-1][2] = tuple(sorted(f.lower() for f in flags))
        elif line.startswith(" * redirect message to: "):
            section.append(["redirect", line.split(": ", 1)[1].strip("<>").lower()])
        elif line.startswith(" * reject message with reason: "):
            section.append(["reject", line.split(": ", 1)[1]])
        elif line.startswith(" * discard"):
            section.append(["discard"])
        elif line.startswith(" * send vacation message"):
            section.append(["vacation", 0])
        elif line.startswith("    => seconds : "):
            section[-1][1] = int(line.split(": ", 1)[1])
        elif line.startswith(" * ") and section is not None:
            section.append(["unknown", line])
    return ("ok", tuple(map(tuple, explicit)), tuple(map(tuple, implicit)))


def canonical_ours(script: bytes, message: bytes, envelope: Envelope) -> Canonical:
    try:
        commands = compile_script(script)
    except SieveError as e:
        return ("compile-error", e.line)
    return canonical_result(run(commands, Message.from_bytes(message), envelope))


def canonical_result(result: Result) -> Canonical:
    if result.error:
        return ("runtime-error",)
    explicit: list[tuple[Any, ...]] = []
    implicit: list[tuple[Any, ...]] = []
    for a in result.actions:
        into = implicit if a.implicit else explicit
        if a.kind in ("keep", "fileinto"):
            into.append(("store", a.target, tuple(sorted(f.lower() for f in a.flags))))
        elif a.kind == "redirect":
            into.append(("redirect", a.target.lower()))
        elif a.kind == "reject":
            into.append(("reject", a.target))
        elif a.kind == "discard":
            into.append(("discard",))
        elif a.kind == "vacation":
            into.append(("vacation", a.seconds))
    return ("ok", tuple(explicit), tuple(implicit))
