# -*- test-case-name: tests.test_rfc7208_suite -*-
"""The openspf RFC 7208 suite (198 cases), each served by the loopback DNS
server and checked with mailx.checks.spf.

The case enumeration lives in `mailx.testing.rfc7208`; this module only
says how one case is checked here (directly, result and explanation).  A
runner that sends each case through the SMTP server installs the same
cases on its own TestCase with another ``check_case``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest
from twisted.trial.reporter import TestResult

from mailx.checks.spf import check_spf
from mailx.dns import Resolver
from mailx.testing import rfc7208

# The suite's TIMEOUT names never answer: keep the wait short.
TIMEOUT = 0.3


class RFC7208SuiteTests(unittest.TestCase):
    """One test per case, named after it (``test_<case name>``)."""

    @defer.inlineCallbacks
    def check_case(self, case: rfc7208.SPFCase):
        server = rfc7208.serve(case.zone)
        self.addCleanup(server.stop)
        resolver = Resolver(server.nameservers, TIMEOUT)
        # pyspf's driver sets this default explanation; cases expect it.
        result = yield resolver.call(
            check_spf,
            resolver,
            case.client_ip,
            case.helo,
            case.mail_from,
            default_explanation="DEFAULT",
        )
        self.assertIn(
            result.result,
            case.results,
            f"{case.name} (RFC 7208 {case.spec}): got {result.result} ({result.reason}), "
            f"want one of {case.results}",
        )
        if case.explanation is not None:
            self.assertEqual(result.explanation, case.explanation, f"{case.name}: explanation")


rfc7208.install_cases(RFC7208SuiteTests)


class SuiteLoadingTests(unittest.SynchronousTestCase):
    """The translation of the suite's zone conventions."""

    def test_all_cases_found(self):
        self.assertEqual(len(list(rfc7208.cases())), 198)

    def test_suite_is_vendored_with_its_licence(self):
        """A plain clone runs the suite: it lives in tests/data/, licence beside it."""
        here = Path(__file__).parent / "data"
        self.assertEqual(rfc7208.find_suite(), here / rfc7208.SUITE_NAME)
        self.assertIn("Gathman", (here / "rfc7208-tests.LICENSE").read_text())

    def test_a_missing_suite_fails_rather_than_skips(self):
        class Runner(unittest.SynchronousTestCase):
            pass

        self.patch(rfc7208, "find_suite", lambda: None)
        rfc7208.install_cases(Runner)
        result = TestResult()
        Runner("test_suite_missing").run(result)
        self.assertFalse(result.wasSuccessful())
        self.assertEqual(result.skips, [])

    def test_spf_records_are_copied_to_txt_unless_txt_is_given(self):
        zone = rfc7208.zone_data(
            {
                "a.test": [{"SPF": "v=spf1 -all"}],
                "b.test": [{"SPF": "v=spf1 -all"}, {"TXT": "NONE"}],
                "c.test": [{"SPF": "v=spf1 -all"}, {"TXT": "v=spf1 +all"}],
            }
        )
        self.assertEqual(zone.records["a.test"]["TXT"], (("v=spf1 -all",),))
        self.assertNotIn("TXT", zone.records["b.test"])
        self.assertEqual(zone.records["c.test"]["TXT"], (("v=spf1 +all",),))

    def test_timeout_applies_to_types_without_data(self):
        zone = rfc7208.zone_data({"t.test": [{"TXT": "v=spf1 -all"}, "TIMEOUT"]})
        timed_out = {rtype for name, rtype in zone.timeouts if name == "t.test"}
        self.assertNotIn("TXT", timed_out)
        self.assertIn("A", timed_out)
        self.assertIn("SPF", timed_out)

    def test_multi_string_records_and_mx(self):
        zone = rfc7208.zone_data({"m.test": [{"SPF": ["v=spf1", " mx"]}, {"MX": [0, "x.test"]}]})
        self.assertEqual(zone.records["m.test"]["SPF"], (("v=spf1", " mx"),))
        self.assertEqual(zone.records["m.test"]["MX"], ((0, "x.test"),))
