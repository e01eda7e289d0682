# -*- test-case-name: tests.test_bench_run -*-
"""``bench/run.py``'s run directories: kept until the end, deletions forgotten.

The benches themselves run only by hand (``python3 bench/run.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial import unittest

from tests.test_bench_abuse import abuse

run = abuse.run


class RunSpaceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.forgotten: list[Path] = []
        self.patch(run, "forget_deletions", lambda path: self.forgotten.append(path) or "")
        self.parent = Path(self.mktemp())
        self.parent.mkdir()

    def test_every_run_stays_until_the_end_then_all_go_at_once(self) -> None:
        made = self.parent / "space"
        self.patch(run.tempfile, "mkdtemp", lambda prefix, dir: (made.mkdir(), str(made))[1])
        space = run.RunSpace(None, "x-")
        self.assertEqual(space.root, made)
        with space:
            self.assertEqual(self.forgotten, [space.root])
            first = space.run_dir("one")
            first.mkdir()
            (first / "message").write_bytes(b"x")
            second = space.run_dir("two")
            second.mkdir()
            self.assertTrue((first / "message").exists())
        self.assertFalse(space.root.exists())
        # The deletions are forgotten once made, for whatever runs next.
        self.assertEqual(self.forgotten, [space.root, self.parent])

    def test_a_given_directory_keeps_itself_and_what_is_not_a_run(self) -> None:
        other = self.parent / "helper.log"
        other.write_text("")
        with run.RunSpace(self.parent, "x-") as space:
            space.run_dir("one").mkdir()
        self.assertEqual(os.listdir(self.parent), ["helper.log"])

    def test_keep_keeps_everything(self) -> None:
        with run.RunSpace(self.parent, "x-", keep=True) as space:
            space.run_dir("one").mkdir()
        self.assertEqual(os.listdir(self.parent), ["one"])
        self.assertEqual(self.forgotten, [self.parent])


class JournalTests(unittest.TestCase):
    def journal_less(self, fstype: str, journals: list[str]) -> bool:
        self.patch(run, "_mount_of", lambda path: (fstype, "253:0"))
        self.patch(os.path, "realpath", lambda p: "/sys/devices/virtual/block/vda")
        self.patch(os, "listdir", lambda p: journals)
        return run.journal_less_ext4(Path("/var/tmp"))

    def test_ext4_whose_device_has_a_jbd2_entry_has_a_journal(self) -> None:
        self.assertFalse(self.journal_less("ext4", ["vda-8", "vdb1-8"]))

    def test_ext4_without_an_entry_for_its_device_has_none(self) -> None:
        self.assertTrue(self.journal_less("ext4", ["vdab-8", "vdb-8"]))

    def test_other_filesystems_are_not_asked(self) -> None:
        self.assertFalse(self.journal_less("xfs", []))

    def test_the_real_mount_table_names_proc(self) -> None:
        self.assertEqual(run.filesystem_of(Path("/proc")), "proc")
        self.assertFalse(run.journal_less_ext4(Path("/proc")))


class PairedLineTests(unittest.TestCase):
    def test_each_repeat_is_its_own_pair_and_a_failed_run_drops_its_pair(self) -> None:
        results = {
            "mailx": [{"msgs_per_s": 100.0}, {"msgs_per_s": None}, {"msgs_per_s": 300.0}],
            "postfix": [{"msgs_per_s": 200.0}, {"msgs_per_s": 100.0}, {"msgs_per_s": 100.0}],
        }
        line = run.paired_line(results, "mailx", "postfix", "goal >= 1x")
        # Pairs 0.5 and 3.0 (the failed repeat has none): median 1.75;
        # medians 200 / 100 = 2.00.
        self.assertEqual(
            line, "mailx / postfix: 1.75x paired (2.00x of medians; goal >= 1x); per repeat 0.50 3.00"
        )

    def test_no_repeat_with_both(self) -> None:
        results = {"a": [{"msgs_per_s": None}], "b": [{"msgs_per_s": 5.0}]}
        self.assertEqual(run.paired_line(results, "a", "b"), "a / b: no repeat where both delivered")
