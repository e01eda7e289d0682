# -*- test-case-name: tests.test_rfc7208_suite -*-
"""The openspf RFC 7208 test suite as data: cases, and zones to serve them.

``rfc7208-tests.yml`` (release 2014.04, as shipped with pyspf) holds
scenarios; each has DNS zone data and cases (client IP, HELO, MAIL FROM,
the allowed results).  This module turns a scenario's zone data into
`mailx.testing.dnsserver` zones with the suite's conventions, so any
runner can serve it: the direct one in ``tests.test_rfc7208_suite``, or
one that sends each case through a running server.

Suite conventions (those of pyspf's own driver, ``testspf.py``):

- an ``SPF`` record is served as type 99 and, unless the name has a
  ``TXT`` entry, also as TXT (RFC 4408 scenarios were written for both);
- ``TXT: NONE`` means no TXT records at all (and stops that duplication);
- ``TIMEOUT`` makes every query for a type the name has no data of time
  out, while types with data are answered;
- a name absent from the zone data does not exist (NXDOMAIN).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailx.testing.dnsserver import LoopbackDNS, start_dns_server

__all__ = [
    "NOT_APPLICABLE",
    "QUERIED_TYPES",
    "SPFCase",
    "Scenario",
    "ZoneData",
    "cases",
    "find_suite",
    "install_cases",
    "load_suite",
    "serve",
]

SUITE_NAME = "rfc7208-tests.yml"

# The types an SPF check asks for: TIMEOUT applies to each one a name lacks.
QUERIED_TYPES = ("TXT", "SPF", "A", "AAAA", "MX", "PTR")

# Cases that cannot apply to mailx, by name, with the reason (a skip).
NOT_APPLICABLE: Mapping[str, str] = {}


@dataclass(frozen=True)
class ZoneData:
    """A scenario's DNS: records for the loopback server, names that time out."""

    records: Mapping[str, Mapping[str, tuple[Any, ...]]]
    timeouts: tuple[tuple[str, str], ...]  # (name, type) pairs never answered


@dataclass(frozen=True)
class SPFCase:
    """One case: who connects, what they claim, what SPF may answer."""

    name: str
    scenario: str
    spec: str
    description: str
    client_ip: str
    helo: str
    mail_from: str
    results: tuple[str, ...]  # every acceptable result; the first is preferred
    explanation: str | None  # expected exp= text, "DEFAULT" for the default
    zone: ZoneData


@dataclass(frozen=True)
class Scenario:
    description: str
    zone: ZoneData
    cases: tuple[SPFCase, ...]


def find_suite() -> Path | None:
    """Where ``rfc7208-tests.yml`` is: $MAILX_RFC7208_SUITE, else ``tests/data/``.

    The suite is vendored in the checkout with its licence, so that a plain
    clone runs it; the variable lets an installed mailx.testing find a copy.
    """
    candidates = []
    if os.environ.get("MAILX_RFC7208_SUITE"):
        candidates.append(Path(os.environ["MAILX_RFC7208_SUITE"]))
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo / "tests" / "data" / SUITE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    return None


def zone_data(zonedata: Mapping[str, list[Any]]) -> ZoneData:
    """Translate one scenario's ``zonedata`` (see the module docstring)."""
    records: dict[str, dict[str, list[Any]]] = {}
    timeouts: list[tuple[str, str]] = []
    for name, entries in zonedata.items():
        name = name.lower()
        types: dict[str, list[Any]] = {}
        timeout = False
        txt_given = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            ((rtype, value),) = entry.items()
            types.setdefault(rtype, [])
            if rtype == "TXT":
                txt_given = True
            if value == "NONE":
                continue
            if rtype == "MX":
                value = (int(value[0]), str(value[1]))
            elif rtype in ("TXT", "SPF"):
                value = tuple(value) if isinstance(value, list) else (value,)
            types[rtype].append(value)
        if not txt_given and types.get("SPF"):
            types["TXT"] = list(types["SPF"])
        records[name] = {t: v for t, v in types.items() if v}
        if timeout:
            timeouts.extend((name, t) for t in QUERIED_TYPES if not records[name].get(t))
    frozen = {n: {t: tuple(v) for t, v in ts.items()} for n, ts in records.items()}
    return ZoneData(frozen, tuple(timeouts))


def _results(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def load_suite(path: Path | None = None) -> list[Scenario]:
    """Every scenario of the suite, in file order."""
    import yaml

    path = path or find_suite()
    if path is None:
        raise FileNotFoundError(f"{SUITE_NAME} not found (set MAILX_RFC7208_SUITE)")
    scenarios = []
    with open(path, "rb") as f:
        for doc in yaml.safe_load_all(f):
            zone = zone_data(doc.get("zonedata") or {})
            cases = tuple(
                SPFCase(
                    name=name,
                    scenario=doc["description"],
                    spec=str(case.get("spec", "")),
                    description=str(case.get("description", "")).strip(),
                    client_ip=str(case["host"]),
                    helo=str(case["helo"]),
                    mail_from=str(case["mailfrom"]),
                    results=_results(case["result"]),
                    explanation=case.get("explanation"),
                    zone=zone,
                )
                for name, case in doc["tests"].items()
            )
            scenarios.append(Scenario(doc["description"], zone, cases))
    return scenarios


def cases(path: Path | None = None) -> Iterator[SPFCase]:
    for scenario in load_suite(path):
        yield from scenario.cases


def serve(zone: ZoneData, **kwargs: Any) -> LoopbackDNS:
    """Start a loopback DNS server answering as the scenario says."""
    server = start_dns_server(zone.records, **kwargs)
    for name, rtype in zone.timeouts:
        server.timeout(name, rtype)
    return server


def _method_name(case: SPFCase) -> str:
    return "test_" + re.sub(r"\W", "_", case.name)


def install_cases(cls: type, path: Path | None = None) -> type:
    """Give a trial TestCase one ``test_<case>`` method per suite case.

    Each method returns ``self.check_case(case)`` (a Deferred or None), the
    runner's own check: direct SPF, or through a running server.  Cases in
    `NOT_APPLICABLE` are skipped with their reason; a missing suite file
    gives a single *failing* test saying where it was looked for: a skip
    would let a checkout without the suite report a pass.
    """
    path = path or find_suite()
    if path is None:

        def test_suite_missing(self: Any) -> None:
            raise AssertionError(
                f"{SUITE_NAME} not found: it belongs in tests/data/ "
                "(or set MAILX_RFC7208_SUITE to a copy)"
            )

        cls.test_suite_missing = test_suite_missing  # type: ignore[attr-defined]
        return cls
    for case in cases(path):
        name = _method_name(case)
        if hasattr(cls, name):
            raise ValueError(f"two suite cases named {case.name!r}")

        def test(self: Any, case: SPFCase = case) -> Any:
            return self.check_case(case)

        test.__name__ = name
        test.__doc__ = f"{case.scenario}: {case.name} (RFC 7208 {case.spec})"
        if case.name in NOT_APPLICABLE:
            test.skip = NOT_APPLICABLE[case.name]  # type: ignore[attr-defined]
        setattr(cls, name, test)
    return cls
