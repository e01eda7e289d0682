# -*- test-case-name: tests.test_bench_abuse -*-
"""A smoke test of ``bench/abuse.py``: it imports, and its pure pieces say what they should.

The bench itself (servers, loads, attacks) runs only by hand:
``python3 bench/abuse.py --quick``; it is not part of the suite's time.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

from twisted.trial import unittest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load() -> ModuleType:
    """bench/ is scripts, not a package: load abuse.py by path (it imports run.py beside it)."""
    name = "mailx_bench_abuse"
    if name not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.append(str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / "abuse.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


abuse = _load()


class AbuseBenchTests(unittest.TestCase):
    def test_every_attack_has_a_unique_name_and_number(self) -> None:
        names = [a.name for a in abuse.ATTACKS]
        numbers = [a.number for a in abuse.ATTACKS]
        self.assertEqual(len(set(names)), len(names))
        self.assertEqual(len(set(numbers)), len(numbers))
        self.assertEqual(sorted(numbers), [0, *range(5, 14)])

    def test_slow_spf_record_costs_ten_lookups(self) -> None:
        record = abuse.slow_txt("m7.slow.attack.test")
        includes = [t[len("include:"):] for t in record.split() if t.startswith("include:")]
        self.assertEqual(len(includes), 9)  # with the record itself: RFC 7208 4.6.4's 10
        for name in includes:
            self.assertEqual(abuse.slow_txt(name), "v=spf1 ?all")
        self.assertIsNone(abuse.slow_txt("_dmarc.m7.slow.attack.test"))

    def target(self, **seen: int) -> object:
        t = abuse.Target(0, Path("."), threading.Event(), time.monotonic())
        for code, count in seen.items():
            t.saw(code.strip("_"), count)
        return t

    def test_replies_as_expected_only_when_all_are_and_one_came(self) -> None:
        self.assertTrue(abuse.codes_verdict(self.target(_250=2), {"250"}).ok)
        self.assertFalse(abuse.codes_verdict(self.target(_250=2, _451=1), {"250"}).ok)
        self.assertFalse(abuse.codes_verdict(self.target(), {"250"}).ok)
