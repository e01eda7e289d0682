# -*- test-case-name: tests.test_reports -*-
"""DMARC aggregate and TLS reports about our domains (SPEC section 15).

Reports are written by strangers (anyone can send a "report" to the
``reports:`` address) and arrive compressed, so everything here is
bounded: a file is read up to `MAX_FILE`, an attachment is decompressed
by streaming up to `MAX_DECOMPRESSED` (a zip entry's declared size is
checked first, and then not trusted), a zip holds at most
`MAX_ZIP_ENTRIES`, an archive inside an archive is not opened, a report
holds at most `MAX_RECORDS` rows.  XML goes through defusedxml with DTDs
forbidden: no entities (billion laughs), no external resources (XXE).

The module has three layers: `extract` turns one file's bytes into report
payloads (MIME, gzip, zip), `parse_aggregate` / `parse_tls` turn a
payload into values, `summarize` turns the values into the per-domain
summary and its verdict.  Only `read_paths` touches files and
`lookup_ptrs` the network; `mailxctl reports` (mailx.admin.cli) wires them.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import email
import email.policy
import io
import ipaddress
import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree as SafeET

from mailx.address import AddressError, normalize_domain

__all__ = [
    "AggregateReport",
    "Record",
    "ReportError",
    "TLSReport",
    "extract",
    "parse_aggregate",
    "parse_payload",
    "parse_tls",
    "read_paths",
    "render",
    "summarize",
]

# Google's, Microsoft's and Yahoo's reports are a few KiB compressed; the
# largest receivers' reports for a busy domain reach a few MiB of XML.
MAX_FILE = 16 * 1024 * 1024  # one message or report file as stored
MAX_DECOMPRESSED = 32 * 1024 * 1024  # one attachment, uncompressed
MAX_ZIP_ENTRIES = 8  # a report zip holds one XML file
MAX_ATTACHMENTS = 16  # report payloads taken from one message
MAX_RECORDS = 100_000  # rows in one aggregate report
MAX_ELEMENTS = 1000  # XML elements in one record (or report_metadata)
MAX_FILES = 100_000  # files read from Maildirs in one run
_CHUNK = 64 * 1024

# RFC 7489 Appendix C and draft-ietf-dmarc-aggregate-reporting (DMARCbis:
# namespace urn:ietf:params:xml:ns:dmarc-2.0): elements are matched by
# local name, so both (and reporters' stray namespaces) parse alike.
_REPORT_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "application/x-zip-compressed",
    "application/xml",
    "text/xml",
    "application/tlsrpt+gzip",  # RFC 8460 5.3
    "application/tlsrpt+json",
    "application/json",
    "application/octet-stream",  # some reporters label the .zip only by name
}
_REPORT_SUFFIXES = (".xml", ".gz", ".zip", ".json", ".xml.gz", ".json.gz")


class ReportError(Exception):
    """A file or payload that is not a report we can read; the message says why."""


# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class AuthResult:
    """One ``auth_results`` entry: what the receiver saw, before alignment."""

    method: str  # "dkim" or "spf"
    domain: str
    result: str
    selector: str = ""  # DKIM
    scope: str = ""  # SPF: mfrom or helo


@dataclass(frozen=True)
class Record:
    """One ``record``: a source IP and what happened to its messages."""

    source_ip: str
    count: int
    disposition: str
    dkim: str  # policy_evaluated: pass means aligned DKIM pass
    spf: str  # policy_evaluated: pass means aligned SPF pass
    header_from: str
    envelope_from: str = ""
    envelope_to: str = ""
    reasons: tuple[str, ...] = ()
    auth: tuple[AuthResult, ...] = ()

    @property
    def passes(self) -> bool:
        """RFC 7489 3.1 and 6.6.2: DMARC passes on aligned DKIM or aligned SPF."""
        return self.dkim == "pass" or self.spf == "pass"


@dataclass(frozen=True)
class AggregateReport:
    """A DMARC aggregate report (RFC 7489 Appendix C, or DMARCbis)."""

    org_name: str
    email: str
    report_id: str
    begin: int  # date_range, seconds since the epoch
    end: int
    domain: str  # policy_published/domain: whose report this is
    policy: dict[str, str]  # p, sp, np, adkim, aspf, pct, testing...
    records: tuple[Record, ...]
    source: str = ""  # the file it came from


@dataclass(frozen=True)
class TLSFailure:
    result_type: str
    count: int
    receiving_mx: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""


@dataclass(frozen=True)
class TLSPolicy:
    policy_type: str  # sts, tlsa, no-policy-found
    domain: str
    mx_hosts: tuple[str, ...]
    successful: int
    failed: int
    failures: tuple[TLSFailure, ...]


@dataclass(frozen=True)
class TLSReport:
    """An SMTP TLS report (RFC 8460 4.4)."""

    org_name: str
    report_id: str
    begin: int
    end: int
    policies: tuple[TLSPolicy, ...]
    source: str = ""


Report = AggregateReport | TLSReport


# ---------------------------------------------------------------------------
# Bytes to payloads: MIME, gzip, zip, all bounded


def gunzip(data: bytes, limit: int | None = None) -> bytes:
    """``data`` decompressed, refusing past ``limit`` bytes without producing them.

    Streaming with ``max_length``: a 1 GiB bomb costs ``limit`` bytes of
    memory and the time to inflate them, not a gigabyte.  (``gzip.decompress``
    has no bound.)
    """
    limit = MAX_DECOMPRESSED if limit is None else limit
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # RFC 1952 framing
    out = bytearray()
    pending = data
    while pending and not inflater.eof:
        out += inflater.decompress(pending, limit + 1 - len(out))
        if len(out) > limit:
            raise ReportError(f"gzip: decompresses to more than {limit} bytes")
        pending = inflater.unconsumed_tail
    if not inflater.eof:
        raise ReportError("gzip: truncated")
    return bytes(out)


def unzip(data: bytes, limit: int | None = None) -> list[tuple[str, bytes]]:
    """The files of a zip, each checked by declared size and then by streaming.

    A zip's central directory states each entry's size, and a bomb may lie
    about it; so the declared size is refused first and the inflated bytes
    are counted as they come.
    """
    limit = MAX_DECOMPRESSED if limit is None else limit
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ReportError(f"zip: {e}") from None
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        if len(entries) > MAX_ZIP_ENTRIES:
            raise ReportError(f"zip: {len(entries)} entries, at most {MAX_ZIP_ENTRIES} are read")
        files = []
        for info in entries:
            if info.file_size > limit:
                raise ReportError(
                    f"zip: {info.filename} declares {info.file_size} bytes,"
                    f" more than {limit}"
                )
            out = bytearray()
            try:
                with archive.open(info) as stream:
                    while chunk := stream.read(min(_CHUNK, limit + 1 - len(out))):
                        out += chunk
                        if len(out) > limit:
                            raise ReportError(
                                f"zip: {info.filename} decompresses to more than {limit} bytes"
                            )
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                    RuntimeError, ValueError) as e:
                # RuntimeError: encrypted; NotImplementedError: unknown method.
                raise ReportError(f"zip: {info.filename}: {e}") from None
            files.append((info.filename, bytes(out)))
    return files


def _kind(data: bytes) -> str:
    """What a payload is, by its first bytes (names and MIME types lie)."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"<":
        return "xml"
    if head[:1] == b"{":
        return "json"
    return "other"


def _unpack(label: str, data: bytes) -> list[tuple[str, bytes]]:
    """A payload, decompressed one level: nested archives are not followed."""
    kind = _kind(data)
    if kind == "gzip":
        inner = [(label, gunzip(data))]
    elif kind == "zip":
        inner = [(f"{label}:{name}", content) for name, content in unzip(data)]
    else:
        return [(label, data)]
    for name, content in inner:
        if _kind(content) in ("gzip", "zip"):
            raise ReportError(f"{name}: an archive inside an archive is not opened")
    return inner


def extract(data: bytes, label: str = "") -> list[tuple[str, bytes]]:
    """The report payloads (XML or JSON bytes) in one file's ``data``.

    The file is a report itself (XML, JSON, gzip, zip) or an email message
    (RFC 5322, as Maildir stores it) whose attachments are.
    """
    if len(data) > MAX_FILE:
        raise ReportError(f"{len(data)} bytes, more than {MAX_FILE}")
    if _kind(data) != "other":
        return _unpack(label, data)
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    if not message.keys():
        raise ReportError("neither a report nor an email message")
    payloads: list[tuple[str, bytes]] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type().lower()
        filename = (part.get_filename() or "").lower()
        if ctype not in _REPORT_TYPES and not filename.endswith(_REPORT_SUFFIXES):
            continue
        if len(payloads) >= MAX_ATTACHMENTS:
            raise ReportError(f"more than {MAX_ATTACHMENTS} report attachments")
        content = part.get_payload(decode=True)
        if not isinstance(content, bytes) or not content:
            continue
        name = f"{label}:{part.get_filename() or ctype}"
        if _kind(content) == "other":
            continue  # a text/xml-labelled signature or a stray octet-stream
        payloads.extend(_unpack(name, content))
    if not payloads:
        raise ReportError("no DMARC or TLS report attached")
    return payloads


# ---------------------------------------------------------------------------
# Payloads to reports


def _local(tag: Any) -> str:
    """An element's name without its namespace: ``{urn:...dmarc-2.0}row`` is ``row``."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _child(element: Any, name: str) -> Any:
    if element is None:
        return None
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _children(element: Any, name: str) -> Iterator[Any]:
    if element is not None:
        for child in element:
            if _local(child.tag) == name:
                yield child


def _text(element: Any, *path: str) -> str:
    for name in path:
        element = _child(element, name)
    if element is None or element.text is None:
        return ""
    return element.text.strip()


def _integer(text: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ReportError(f"{what} is not a number: {text[:40]!r}") from None
    if value < 0:
        raise ReportError(f"{what} is negative")
    return value


def _domain(text: str) -> str:
    """A reported domain as mailx keeps its own (A-labels, lower case), or as written."""
    name = text.strip().rstrip(".")
    try:
        return normalize_domain(name)
    except AddressError:
        return name.lower()


def _is_ours(name: str, ours: set[str] | None) -> bool:
    """One of our domains, or a subdomain of one (whose mail its ``sp`` governs)."""
    if ours is None:
        return True
    labels = name.split(".")
    return any(".".join(labels[i:]) in ours for i in range(len(labels)))


def parse_aggregate(data: bytes, source: str = "") -> AggregateReport:
    """A DMARC aggregate report from its XML; `ReportError` if it is not one."""
    # Microsoft's reports have been seen with a BOM or blank lines before the
    # XML declaration, which XML forbids (XML 1.0 2.8); nothing is lost by
    # dropping them.
    data = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    try:
        root, metadata, published, records = _stream_feedback(data)
    except defusedxml.DTDForbidden:
        raise ReportError("XML with a DTD (entities, external files) is refused") from None
    except (defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden):
        raise ReportError("XML with entities or external references is refused") from None
    except SafeET.ParseError as e:
        raise ReportError(f"malformed XML: {e}") from None
    if metadata is None or published is None:
        raise ReportError("DMARC report without report_metadata or policy_published")
    domain = _domain(_text(published, "domain"))
    if not domain:
        raise ReportError("DMARC report without policy_published/domain")
    policy = {
        _local(e.tag): (e.text or "").strip()
        for e in published
        if _local(e.tag) != "domain" and len(e) == 0
    }
    return AggregateReport(
        org_name=_text(metadata, "org_name"),
        email=_text(metadata, "email"),
        report_id=_text(metadata, "report_id"),
        begin=_integer(_text(metadata, "date_range", "begin") or "0", "date_range/begin"),
        end=_integer(_text(metadata, "date_range", "end") or "0", "date_range/end"),
        domain=domain,
        policy=policy,
        records=tuple(records),
        source=source,
    )


def _stream_feedback(data: bytes) -> tuple[Any, Any, Any, list[Record]]:
    """``<feedback>`` read element by element: each record becomes a `Record`
    and is dropped from the tree, so memory holds one record at a time, and
    a record (or the metadata) of more than `MAX_ELEMENTS` elements is
    refused as it grows rather than after."""
    root = metadata = published = None
    records: list[Record] = []
    depth = elements = 0
    events = SafeET.iterparse(io.BytesIO(data), events=("start", "end"), forbid_dtd=True)
    for event, element in events:
        if event == "start":
            depth += 1
            elements += 1
            if root is None:
                root = element
                if _local(root.tag) != "feedback":
                    raise ReportError(
                        f"XML but not a DMARC report (root element <{_local(root.tag)}>)"
                    )
            elif elements > MAX_ELEMENTS:
                raise ReportError(f"an element of <feedback> with over {MAX_ELEMENTS} elements")
            continue
        depth -= 1
        if depth != 1:
            continue
        elements = 1  # only the root is still held
        name = _local(element.tag)
        if name == "record":
            if len(records) >= MAX_RECORDS:
                raise ReportError(f"more than {MAX_RECORDS} records")
            records.append(_record(element))
            assert root is not None
            root.remove(element)
        elif name == "report_metadata" and metadata is None:
            metadata = element
        elif name == "policy_published" and published is None:
            published = element
        else:  # <version>, extensions, repeats: not used
            assert root is not None
            root.remove(element)
    return root, metadata, published, records


def _record(element: Any) -> Record:
    row = _child(element, "row")
    evaluated = _child(row, "policy_evaluated")
    identifiers = _child(element, "identifiers")
    ip_text = _text(row, "source_ip")
    try:
        source_ip = str(ipaddress.ip_address(ip_text))
    except ValueError:
        raise ReportError(f"record with a bad source_ip: {ip_text[:60]!r}") from None
    auth: list[AuthResult] = []
    results = _child(element, "auth_results")
    for method in ("dkim", "spf"):
        for entry in _children(results, method):
            auth.append(
                AuthResult(
                    method=method,
                    domain=_domain(_text(entry, "domain")),
                    result=_text(entry, "result").lower() or "none",
                    selector=_text(entry, "selector"),
                    scope=_text(entry, "scope"),
                )
            )
    return Record(
        source_ip=source_ip,
        count=_integer(_text(row, "count") or "0", "row/count"),
        disposition=_text(evaluated, "disposition").lower() or "none",
        dkim=_text(evaluated, "dkim").lower() or "none",
        spf=_text(evaluated, "spf").lower() or "none",
        header_from=_domain(_text(identifiers, "header_from")),
        envelope_from=_domain(_text(identifiers, "envelope_from")),
        envelope_to=_domain(_text(identifiers, "envelope_to")),
        reasons=tuple(
            _text(r, "type").lower() for r in _children(evaluated, "reason") if _text(r, "type")
        ),
        auth=tuple(auth),
    )


def _timestamp(text: Any, what: str) -> int:
    """RFC 8460 4.4: date-range values are RFC 3339 date-times."""
    if not isinstance(text, str):
        raise ReportError(f"{what} is missing")
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{what} is not a date-time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{what} is not a count")
    return value


def parse_tls(data: bytes, source: str = "") -> TLSReport:
    """An SMTP TLS report from its JSON (RFC 8460 4.4); `ReportError` if it is not one."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ReportError(f"malformed JSON: {str(e)[:100]}") from None
    if not isinstance(document, dict) or not isinstance(document.get("policies"), list):
        raise ReportError("JSON but not a TLS report (no policies)")
    dates = document.get("date-range")
    if not isinstance(dates, dict):
        raise ReportError("TLS report without date-range")
    policies = []
    for entry in document["policies"][:MAX_RECORDS]:
        if not isinstance(entry, dict):
            raise ReportError("TLS report with a policy that is not an object")
        policy: dict[str, Any] = entry["policy"] if isinstance(entry.get("policy"), dict) else {}
        summary: dict[str, Any] = entry["summary"] if isinstance(entry.get("summary"), dict) else {}
        details = entry.get("failure-details")
        failures = []
        for detail in details[:MAX_RECORDS] if isinstance(details, list) else ():
            if not isinstance(detail, dict):
                continue
            failures.append(
                TLSFailure(
                    result_type=str(detail.get("result-type", "unknown"))[:100],
                    count=_count(detail.get("failed-session-count", 0), "failed-session-count"),
                    receiving_mx=str(detail.get("receiving-mx-hostname", ""))[:255],
                    receiving_ip=str(detail.get("receiving-ip", ""))[:64],
                    sending_ip=str(detail.get("sending-mta-ip", ""))[:64],
                )
            )
        if not policy.get("policy-domain"):
            raise ReportError("TLS report with a policy without policy-domain")
        mx_hosts = policy.get("mx-host", [])
        policies.append(
            TLSPolicy(
                policy_type=str(policy.get("policy-type", ""))[:40],
                domain=_domain(str(policy.get("policy-domain", ""))[:255]),
                mx_hosts=tuple(str(h)[:255] for h in mx_hosts[:100])
                if isinstance(mx_hosts, list)
                else (),
                successful=_count(
                    summary.get("total-successful-session-count", 0),
                    "total-successful-session-count",
                ),
                failed=_count(
                    summary.get("total-failure-session-count", 0), "total-failure-session-count"
                ),
                failures=tuple(failures),
            )
        )
    return TLSReport(
        org_name=str(document.get("organization-name", ""))[:255],
        report_id=str(document.get("report-id", ""))[:255],
        begin=_timestamp(dates.get("start-datetime"), "start-datetime"),
        end=_timestamp(dates.get("end-datetime"), "end-datetime"),
        policies=tuple(policies),
        source=source,
    )


def parse_payload(data: bytes, source: str = "") -> Report:
    """A decompressed payload: XML is an aggregate report, JSON a TLS report."""
    kind = _kind(data)
    if kind == "xml":
        return parse_aggregate(data, source)
    if kind == "json":
        return parse_tls(data, source)
    raise ReportError("neither XML nor JSON")


# ---------------------------------------------------------------------------
# Files


@dataclass
class Collected:
    """What `read_paths` found: the reports and one error line per unreadable file."""

    reports: list[Report] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def _files(path: Path) -> Iterator[Path]:
    """A file as is; a Maildir's messages (cur/ and new/, not tmp/); a folder's files."""
    if not path.is_dir():
        yield path
        return
    folders = [path / "cur", path / "new"]
    if not any(f.is_dir() for f in folders):
        folders = [path]
    for folder in folders:
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if entry.is_file() and not entry.name.startswith("."):
                    yield entry


def read_file(path: Path, limit: int | None = None) -> bytes:
    """At most ``limit`` bytes of ``path``; a larger file is a `ReportError`, unread."""
    limit = MAX_FILE if limit is None else limit
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size > limit:
            raise ReportError(f"larger than {limit} bytes, not read")
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ReportError(f"larger than {limit} bytes, not read")
    return data


def read_paths(paths: Iterable[Path]) -> Collected:
    """Every report in ``paths`` (files, Maildirs); the unreadable ones as errors."""
    collected = Collected()
    seen: set[tuple[str, str, str, int]] = set()
    count = 0
    for path in paths:
        if not path.exists():
            collected.errors.append((str(path), "no such file or directory"))
            continue
        for file in _files(path):
            count += 1
            if count > MAX_FILES:
                collected.errors.append((str(file), f"more than {MAX_FILES} files, stopped"))
                return collected
            try:
                reports = [
                    parse_payload(payload, name)
                    for name, payload in extract(read_file(file), str(file))
                ]
            except ReportError as e:
                collected.errors.append((str(file), str(e)))
                continue
            except OSError as e:
                collected.errors.append((str(file), e.strerror or str(e)))
                continue
            for report in reports:
                # A report delivered twice (a retried delivery, a copy in
                # two folders) counts once.
                key = (type(report).__name__, report.org_name, report.report_id,
                       report.begin)
                if report.report_id and key in seen:
                    continue
                seen.add(key)
                collected.reports.append(report)
    return collected


# ---------------------------------------------------------------------------
# Summary


def _aligned(record: Record, result: AuthResult, strict: bool) -> bool:
    """RFC 7489 3.1.1/3.1.2, approximately: same domain, or a subdomain in relaxed mode.

    Approximate because the organizational domain needs the public suffix
    list; a hint for a person, not a verdict (the receiver's is in
    policy_evaluated).
    """
    ours, theirs = record.header_from, result.domain
    if not ours or not theirs:
        return False
    if ours == theirs:
        return True
    return not strict and (ours.endswith("." + theirs) or theirs.endswith("." + ours))


def diagnose(record: Record, policy: dict[str, str]) -> str:
    """Why a failing source fails, in words: forwarder, unaligned service, or forger."""
    dkim_pass = [a for a in record.auth if a.method == "dkim" and a.result == "pass"]
    spf_pass = [a for a in record.auth if a.method == "spf" and a.result == "pass"]
    if set(record.reasons) & {"forwarded", "mailing_list", "trusted_forwarder"}:
        return "the receiver says it was forwarded (or a mailing list)"
    if dkim_pass and not any(_aligned(record, a, policy.get("adkim") == "s") for a in dkim_pass):
        signers = ", ".join(sorted({a.domain for a in dkim_pass}))
        return f"likely a forwarder or mailing list: DKIM passes for {signers}, not aligned"
    if any(a.method == "dkim" and a.domain == record.header_from for a in record.auth):
        return (
            "likely a forwarder or mailing list that changed the message:"
            " your DKIM signature no longer verifies"
        )
    if spf_pass:
        senders = ", ".join(sorted({a.domain for a in spf_pass}))
        return (
            f"a service sending as you with its own envelope domain ({senders}):"
            " give it a DKIM key of yours, or ignore it if you do not use it"
        )
    return "likely forgery: nothing authenticates it"


def _results(record: Record, method: str) -> str:
    values = sorted({a.result for a in record.auth if a.method == method})
    return "/".join(values) or "none"


def summarize(
    reports: Sequence[Report],
    our_domains: Iterable[str] | None = None,
    *,
    domain: str | None = None,
    since: float | None = None,
    ptr: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """The per-domain summary as plain data (the ``--json`` form, and what `render` shows).

    ``our_domains`` None means every domain is ours (no configuration);
    otherwise a report about another domain is listed as not ours and kept
    out of the verdicts, unless ``domain`` names it.  ``since`` keeps the
    reports whose date range ends at or after it (epoch seconds).
    """
    ours = None if our_domains is None else {_domain(d) for d in our_domains}
    wanted = _domain(domain) if domain else None
    domains: dict[str, dict[str, Any]] = {}
    tls: dict[str, dict[str, Any]] = {}
    for report in reports:
        if since is not None and report.end < since:
            continue
        if isinstance(report, AggregateReport):
            if wanted and report.domain != wanted:
                continue
            _add_aggregate(domains, report)
        else:
            for policy in report.policies:
                if wanted and policy.domain != wanted:
                    continue
                _add_tls(tls, report, policy)
    result_domains = []
    for name in sorted(domains):
        entry = domains[name]
        entry["ours"] = _is_ours(name, ours)
        # A domain not ours is summarized only when --domain asks for it.
        entry["shown"] = entry["ours"] or name == wanted
        _finish(entry, ptr if entry["shown"] else None)
        result_domains.append(entry)
    tls_entries = []
    for name in sorted(tls):
        entry = tls[name]
        entry["ours"] = _is_ours(name, ours)
        entry["shown"] = entry["ours"] or name == wanted
        entry["failures"] = [
            {"result_type": t, "receiving_mx": mx, "count": n}
            for (t, mx), n in sorted(entry.pop("_failures").items(), key=lambda i: -i[1])
        ]
        entry["reporters"] = sorted(entry["reporters"])
        tls_entries.append(entry)
    return {"domains": result_domains, "tls": tls_entries}


def _add_aggregate(domains: dict[str, dict[str, Any]], report: AggregateReport) -> None:
    entry = domains.setdefault(
        report.domain,
        {
            "domain": report.domain,
            "reports": 0,
            "reporters": set(),
            "begin": report.begin,
            "end": report.end,
            "policy": {},
            "_policy_end": -1,
            "_sources": {},
        },
    )
    entry["reports"] += 1
    entry["reporters"].add(report.org_name or report.email or "unnamed reporter")
    entry["begin"] = min(entry["begin"], report.begin)
    entry["end"] = max(entry["end"], report.end)
    if report.end >= entry["_policy_end"]:  # the newest report's view of the policy
        entry["policy"], entry["_policy_end"] = dict(report.policy), report.end
    for record in report.records:
        source = entry["_sources"].setdefault(
            record.source_ip,
            {
                "ip": record.source_ip,
                "messages": 0,
                "pass": 0,
                "fail": 0,
                "disposition": Counter(),
                "spf": Counter(),
                "dkim": Counter(),
                "spf_aligned": 0,
                "dkim_aligned": 0,
                "_diagnoses": Counter(),
            },
        )
        source["messages"] += record.count
        source["pass" if record.passes else "fail"] += record.count
        source["disposition"][record.disposition] += record.count
        source["spf"][_results(record, "spf")] += record.count
        source["dkim"][_results(record, "dkim")] += record.count
        source["spf_aligned"] += record.count if record.spf == "pass" else 0
        source["dkim_aligned"] += record.count if record.dkim == "pass" else 0
        if not record.passes:
            source["_diagnoses"][diagnose(record, report.policy)] += record.count


def _finish(entry: dict[str, Any], ptr: Callable[[str], str | None] | None) -> None:
    """Sources sorted by volume, counters to plain dicts, and the verdict."""
    entry.pop("_policy_end")
    entry["reporters"] = sorted(entry["reporters"])
    sources = sorted(entry.pop("_sources").values(), key=lambda s: (-s["messages"], s["ip"]))
    for source in sources:
        diagnoses = source.pop("_diagnoses")
        source["why"] = diagnoses.most_common(1)[0][0] if diagnoses else None
        for key in ("disposition", "spf", "dkim"):
            source[key] = dict(source[key].most_common())
        source["ptr"] = ptr(source["ip"]) if ptr is not None else None
    entry["sources"] = sources
    entry["messages"] = sum(s["messages"] for s in sources)
    entry["pass"] = sum(s["pass"] for s in sources)
    entry["fail"] = sum(s["fail"] for s in sources)
    entry["verdict"] = _verdict(entry) if entry["shown"] else "not one of our domains"


def _verdict(entry: dict[str, Any]) -> str:
    sources = entry["sources"]
    policy = entry["policy"].get("p", "none")
    if not entry["messages"]:
        return "no messages reported"
    if not entry["fail"]:
        already = policy == "reject"
        return (
            f"all {_n(entry['messages'], 'message')} from {_n(len(sources), 'source')} pass DMARC"
            + (": p=reject already applies" if already else ": safe to move to p=reject")
        )
    failing = [s for s in sources if s["fail"]]
    lines = [
        f"{entry['fail']} of {_n(entry['messages'], 'message')} fail DMARC;"
        + (" refused under p=reject:" if policy == "reject" else " would be refused under p=reject:")
    ]
    for source in failing:
        name = f" ({source['ptr']})" if source["ptr"] else ""
        spf = "/".join(source["spf"])
        dkim = "/".join(source["dkim"])
        lines.append(
            f"  {source['ip']}{name} {_n(source['fail'], 'message')}, spf={spf} dkim={dkim}:"
            f" {source['why']}"
        )
    return "\n".join(lines)


def _add_tls(tls: dict[str, dict[str, Any]], report: TLSReport, policy: TLSPolicy) -> None:
    entry = tls.setdefault(
        policy.domain,
        {
            "domain": policy.domain,
            "reports": 0,
            "reporters": set(),
            "policy_types": [],
            "successful": 0,
            "failed": 0,
            "_failures": Counter(),
        },
    )
    entry["reports"] += 1
    entry["reporters"].add(report.org_name or "unnamed reporter")
    if policy.policy_type and policy.policy_type not in entry["policy_types"]:
        entry["policy_types"].append(policy.policy_type)
    entry["successful"] += policy.successful
    entry["failed"] += policy.failed
    for failure in policy.failures:
        entry["_failures"][(failure.result_type, failure.receiving_mx)] += failure.count


# RFC 8460 4.3: the result types, and what the owner can do about each.
TLS_HINTS = {
    "starttls-not-supported": "the MX offered no STARTTLS: is tls: configured?",
    "certificate-host-mismatch": "the certificate does not name the MX host",
    "certificate-expired": "renew the certificate",
    "certificate-not-trusted": "serve the full chain from a public CA",
    "validation-failure": "the certificate chain did not validate",
    "sts-policy-fetch-error": "https://mta-sts.<domain>/.well-known/mta-sts.txt could not be fetched",
    "sts-policy-invalid": "the MTA-STS policy file does not parse",
    "sts-webpki-invalid": "the mta-sts.<domain> web server's certificate is not trusted",
    "tlsa-invalid": "a TLSA record is malformed",
    "dnssec-invalid": "DNSSEC validation failed for the TLSA records",
    "dane-required": "DANE is required but no usable TLSA record was found",
}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _day(timestamp: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime(
            "%Y-%m-%d"
        )
    except (OverflowError, OSError, ValueError):
        return str(timestamp)


def _counts(counter: dict[str, int]) -> str:
    if len(counter) == 1:
        return next(iter(counter))
    return ",".join(f"{k}:{n}" for k, n in counter.items())


def render(summary: dict[str, Any]) -> str:
    """The summary for a person (the caller escapes it for the terminal)."""
    blocks = []
    for entry in summary["domains"]:
        reporters = ", ".join(entry["reporters"])
        head = (
            f"{entry['domain']}: {_n(entry['reports'], 'DMARC report')} from {reporters},"
            f" {_day(entry['begin'])} to {_day(entry['end'])}"
        )
        if not entry["shown"]:
            blocks.append(f"{head}\n  not one of our domains: left out")
            continue
        if not entry["ours"]:
            head += " (not one of our domains)"
        policy = " ".join(f"{k}={v}" for k, v in entry["policy"].items() if v)
        lines = [
            head,
            f"  published: {policy or 'no policy'}",
            f"  {_n(entry['messages'], 'message')} from {_n(len(entry['sources']), 'source')}:"
            f" {entry['pass']} pass DMARC, {entry['fail']} fail",
        ]
        for s in entry["sources"]:
            name = f" ({s['ptr']})" if s["ptr"] else ""
            dmarc = "pass" if not s["fail"] else ("fail" if not s["pass"] else "partly fails")
            lines.append(
                f"  {s['ip']}{name}: {_n(s['messages'], 'message')}, dmarc={dmarc},"
                f" spf={_counts(s['spf'])} (aligned {s['spf_aligned']}),"
                f" dkim={_counts(s['dkim'])} (aligned {s['dkim_aligned']}),"
                f" disposition={_counts(s['disposition'])}"
            )
        lines.append(f"  verdict: {entry['verdict']}".replace("\n", "\n  "))
        blocks.append("\n".join(lines))
    for entry in summary["tls"]:
        if not entry["shown"]:
            blocks.append(f"{entry['domain']}: TLS reports\n  not one of our domains: left out")
            continue
        lines = [
            f"{entry['domain']}: {_n(entry['reports'], 'TLS report')} from"
            f" {', '.join(entry['reporters'])} ({', '.join(entry['policy_types']) or 'no policy'})",
            f"  {entry['successful']} sessions succeeded, {entry['failed']} failed",
        ]
        for failure in entry["failures"]:
            mx = f" at {failure['receiving_mx']}" if failure["receiving_mx"] else ""
            hint = TLS_HINTS.get(failure["result_type"], "").replace("<domain>", entry["domain"])
            lines.append(
                f"  {failure['count']} {failure['result_type']}{mx}" + (f": {hint}" if hint else "")
            )
        if not entry["failed"]:
            lines.append("  verdict: every sender reached us over TLS")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no reports"


# ---------------------------------------------------------------------------
# PTR names, bounded


def lookup_ptrs(
    resolver: Any, addresses: Iterable[str], deadline: float = 10.0, workers: int = 8
) -> dict[str, str]:
    """The first PTR name of each address, within ``deadline`` seconds in all.

    A few threads at once (dnspython blocks); an address whose lookup fails
    or is late simply has no name.
    """
    names: dict[str, str] = {}
    unique = list(dict.fromkeys(addresses))[:1000]
    if not unique:
        return names
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(resolver.ptr, a): a for a in unique}
        done, _ = concurrent.futures.wait(futures, timeout=deadline)
        for future in done:
            try:
                found = future.result()
            except Exception:  # noqa: BLE001 - no name is the answer to any failure
                continue
            if found:
                names[futures[future]] = found[0]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return names
