# -*- test-case-name: tests.test_dnssetup -*-
"""The DNS records a domain needs, rendered for people, and checked live.

``mailxctl dns DOMAIN`` prints what to publish; ``--check`` compares it
with what DNS answers; the running server repeats the check (`dnswatch`).
Three layers, kept apart:

- `plan`: the configuration in, the `Expected` records out.  No DNS;
  the only I/O is reading the DKIM key file to derive its public half.
- `zone_fragment`, `web_table`, `plan_json`: renderings of a plan.
- `check_plan`: looks each record up (blocking, through `mailx.dns`)
  and returns one `Finding` per record: ok, missing, wrong, or error (the
  lookup failed, so nothing can be said).  Anything required and not ok
  makes `failed` true and ``mailxctl`` exit 1.

What is required: MX, the host's addresses and their reverse DNS, SPF,
DMARC, and DKIM once a key is configured; without these, big receivers
junk or refuse the mail we send or forward.  MTA-STS and TLS-RPT are
recommended: they protect mail coming in, and nothing breaks without them.

Checks go beyond string equality where the owner has latitude: an SPF
record is right when there is exactly one (RFC 7208 4.5), it parses, needs
at most 10 DNS lookups (RFC 7208 4.6.4) and gives ``pass`` for our sending
addresses, whatever its wording; a DMARC record when there is exactly one
(RFC 7489 6.6.3) with a policy.  Our own receiving code (`mailx.checks`)
judges them, so the check and the server can never disagree.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.name
import dns.reversename

from mailx.address import normalize_domain, parse_address
from mailx.config import Config, is_fqdn
from mailx.dns import DNSTemporaryError, DNSVoidError, Resolver
from mailx.outbound import dkimkeys

__all__ = [
    "MAX_SPF_LOOKUPS",
    "Expected",
    "Finding",
    "Plan",
    "SPFSyntaxError",
    "autoconfig_xml",
    "endpoint_port",
    "check_config",
    "check_plan",
    "count_spf_lookups",
    "failed",
    "finding_json",
    "mta_sts_id",
    "mta_sts_policy",
    "parse_spf",
    "plan",
    "plan_json",
    "render_findings",
    "render_plan",
    "resolver_for",
    "txt_strings",
    "web_table",
    "zone_fragment",
    "zone_line",
]

OK, MISSING, WRONG, ERROR = "ok", "missing", "wrong", "error"

# RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect, 10 in total.
MAX_SPF_LOOKUPS = 10
# RFC 1035 3.3.14: a TXT character-string holds at most 255 octets.
MAX_TXT_STRING = 255
MX_PREFERENCE = 10
COMMENT_WIDTH = 78
# RFC 8461 3.2: max_age in seconds.  A day while in testing mode, so a
# change reaches senders quickly; raise it (a week or more) with enforce.
MTA_STS_MAX_AGE = 86400
# RFC 6409 (587, STARTTLS); RFC 8314 (465, TLS from the first byte).
SUBMISSION_PORT, SUBMISSIONS_PORT = 587, 465


# ---------------------------------------------------------------------------
# What to publish


@dataclass(frozen=True)
class Expected:
    """One record we want to see in DNS.

    ``value`` is the record data in presentation form, a TXT value whole and
    unquoted.  A ``placeholder`` has no known value (the host's address when
    no ``--ip`` or ``public_addresses`` says it, a DKIM key not generated
    yet): rendered as a comment, checked for presence only.  ``in_zone`` is
    False for PTR records, which the owner of the address block publishes.
    """

    record: str  # what people call it: MX, A, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, PTR...
    name: str  # owner name, no final dot
    type: str  # DNS type
    value: str
    required: bool
    purpose: str  # why it matters, one or two sentences
    fix: str  # what to do when it is missing or wrong
    in_zone: bool = True
    placeholder: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything ``mailxctl dns DOMAIN`` prints, and what ``--check`` needs."""

    domain: str
    hostname: str
    addresses: tuple[str, ...]  # this server's public addresses, when known
    records: tuple[Expected, ...]
    mta_sts_policy: str
    notes: tuple[str, ...]
    smarthost: str | None = None  # the relay's host name or address
    dkim_key: str | None = None  # the configured key file
    dkim_error: str | None = None  # why the DKIM record could not be derived
    autoconfig: str | None = None  # the Thunderbird config-v1.1.xml, when IMAP is known

    @property
    def mta_sts_url(self) -> str:
        # RFC 8461 3.3: the policy is fetched from this well-known URL.
        return f"https://mta-sts.{self.domain}/.well-known/mta-sts.txt"

    @property
    def autoconfig_urls(self) -> tuple[str, str]:
        """Where Thunderbird looks for the file, in its order (Mozilla's autoconfig
        documentation): the autoconfig host first, then the domain's well-known path."""
        return (
            f"https://autoconfig.{self.domain}/mail/config-v1.1.xml",
            f"https://{self.domain}/.well-known/autoconfig/mail/config-v1.1.xml",
        )


def mta_sts_policy(hostname: str, mode: str = "testing") -> str:
    """The MTA-STS policy file (RFC 8461 3.2) naming our MX host.

    ``testing``: senders that support MTA-STS deliver anyway when TLS fails
    and send a TLS-RPT report; switch to ``enforce`` once reports are clean.
    """
    return f"version: STSv1\nmode: {mode}\nmx: {hostname}\nmax_age: {MTA_STS_MAX_AGE}\n"


def mta_sts_id(policy: str) -> str:
    """The ``id=`` of the ``_mta-sts`` record: changes exactly when the policy does.

    RFC 8461 3.1: 1 to 32 letters or digits; senders refetch the policy when
    it changes.  Hex of the SHA-256 of the policy text, shortened.
    """
    return hashlib.sha256(policy.encode("utf-8")).hexdigest()[:20]


def smarthost_host(endpoint: str | None) -> str | None:
    """The host of a client endpoint string (``tcp:relay.example.net:587``)."""
    if not endpoint:
        return None
    parts = re.split(r"(?<!\\):", endpoint)[1:]
    positional = [p for p in parts if "=" not in p]
    named = dict(p.split("=", 1) for p in parts if "=" in p)
    host = named.get("host") or (positional[0] if positional else None)
    return host.replace("\\:", ":").strip("[]").lower() if host else None


def _spf_value(smarthost: str | None) -> str:
    """``mx`` covers this server (it is our MX); a relay is named by address or host."""
    if smarthost is None:
        return "v=spf1 mx -all"
    return f"v=spf1 mx {_spf_term(smarthost)} -all"


def _spf_term(smarthost: str) -> str:
    """``ip4:192.0.2.1``, ``ip6:...`` or ``a:relay.example.net`` (RFC 7208 5.3, 5.6)."""
    try:
        address = ipaddress.ip_address(smarthost)
    except ValueError:
        return f"a:{smarthost}"
    return f"ip{address.version}:{address.compressed}"


def _publicly_visible(smarthost: str) -> bool:
    """False for a loopback, private or link-local relay: the world cannot check it."""
    try:
        return ipaddress.ip_address(smarthost).is_global
    except ValueError:
        return smarthost != "localhost" and not smarthost.endswith(".localhost")


def _reverse_name(address: str) -> str:
    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


def _dkim_expected(config: Config, domain: str) -> tuple[Expected, str | None]:
    """The DKIM record from the configured key; a placeholder without one."""
    dkim_config = config.domains[domain].dkim
    keygen = f"mailxctl dkim keygen {domain}"
    if dkim_config is None:
        missing = Expected(
            "DKIM",
            f"<selector>._domainkey.{domain}",
            "TXT",
            "v=DKIM1; k=rsa; p=<public key>",
            required=False,
            purpose="signs the mail mailx sends itself (bounces, notices) so that it"
            " passes DMARC (RFC 6376); no key is configured for this domain.",
            fix=f"run `{keygen}`, add the dkim: line it prints to mailx.yaml and publish"
            " the record it prints",
            placeholder=True,
        )
        return missing, None
    name = f"{dkim_config.selector}._domainkey.{domain}"
    purpose = (
        f"the public half of {dkim_config.key}, the key mailx signs the mail it sends"
        " itself with, so that it passes DMARC (RFC 6376)."
    )
    try:
        value = dkimkeys.dns_record(dkimkeys.load_key(dkim_config.key))
    except dkimkeys.KeyFileError as e:
        unreadable = Expected(
            "DKIM",
            name,
            "TXT",
            "v=DKIM1; p=<public key>",
            required=True,
            purpose=purpose,
            fix=f"run `{keygen}` to create the key, then publish the record it prints",
            placeholder=True,
        )
        return unreadable, str(e)
    record = Expected(
        "DKIM", name, "TXT", value, required=True, purpose=purpose, fix="publish our key"
    )
    return record, None


@dataclass(frozen=True)
class MailService:
    """A service mail clients find through SRV (RFC 6186) and autoconfig."""

    service: str  # the SRV service label: submissions, submission, imaps
    host: str
    port: int
    socket: str  # autoconfig's socketType: SSL (TLS from the first byte) or STARTTLS
    priority: int


def endpoint_port(endpoint: str) -> tuple[int | None, str | None]:
    """The port and interface of a server endpoint string (``tcp:587:interface=::``).

    ``(None, None)`` for an endpoint that names no port (``systemd:``,
    ``unix:``).  Parsed by hand, as `smarthost_host` is: Twisted parses
    these strings only inside ``serverFromString``, which keeps the port in
    private attributes.  A ``haproxy:`` prefix is looked through.
    """
    parts = re.split(r"(?<!\\):", endpoint)
    while parts and parts[0].lower() == "haproxy":
        parts = parts[1:]
    if not parts or parts[0].lower() not in ("tcp", "tcp6", "ssl"):
        return None, None
    positional = [p for p in parts[1:] if "=" not in p]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = named.get("port") or (positional[0] if positional else None)
    interface = named.get("interface")
    return (
        int(port) if port and port.isdigit() else None,
        interface.replace("\\:", ":") if interface else None,
    )


def _is_loopback(interface: str | None) -> bool:
    try:
        return interface is not None and ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return interface == "localhost"


def _submission_services(config: Config, notes: list[str]) -> list[MailService]:
    """The submission listeners as clients should find them, submissions first.

    RFC 8314 prefers TLS from the first byte to STARTTLS, and a client
    picks among a protocol's SRV services by priority (RFC 6186 3, with
    RFC 8314 5.1 adding ``_submissions``): 0 for submissions, 1 for
    submission.
    """
    services = []
    for priority, (kind, standard, socket) in enumerate(
        (("submissions", SUBMISSIONS_PORT, "SSL"), ("submission", SUBMISSION_PORT, "STARTTLS"))
    ):
        endpoints = getattr(config, kind)
        if not endpoints:
            continue
        parsed = [(e, *endpoint_port(e)) for e in endpoints]
        endpoint, port, interface = next((x for x in parsed if x[1] == standard), parsed[0])
        behind_proxy = endpoint.lower().startswith("haproxy:")
        if port is None or behind_proxy:
            # The public port is the proxy's or whoever passed us the socket.
            notes.append(
                f"listen.{kind} {endpoint}: the port clients reach is not in the endpoint;"
                f" the {kind} SRV record and autoconfig name the standard port {standard}."
                " Change them if your proxy or port forward listens on another."
            )
            port = standard
        elif port != standard:
            # SRV names the port clients connect to (RFC 2782).  Without a
            # NAT that is the listener's; with one forwarding the standard
            # port here, it is the standard one: only the owner knows.
            notes.append(
                f"listen.{kind} is on port {port}, not the standard {standard}: the SRV record"
                f" and autoconfig name {port}, where clients connect directly. If a NAT or"
                f" firewall forwards {standard} to {port}, publish {standard} instead: clients"
                " see the public port."
            )
        if _is_loopback(interface):
            notes.append(
                f"listen.{kind} listens on {interface} only: mail clients elsewhere reach it"
                " only through a proxy or port forward."
            )
        services.append(MailService(kind, config.hostname, port, socket, priority))
    return services


def autoconfig_xml(
    domain: str, incoming: Sequence[MailService], outgoing: Sequence[MailService]
) -> str:
    """Thunderbird's ``config-v1.1.xml`` (Mozilla's autoconfig format), first listed first.

    The user name is the whole address (``%EMAILADDRESS%``): accounts are
    addresses (SPEC 11); PLAIN/LOGIN inside TLS is ``password-cleartext``.
    Built with ElementTree, so a name is always escaped right.
    """
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = domain
    ET.SubElement(provider, "displayShortName").text = domain
    for tag, kind, services in (
        ("incomingServer", "imap", incoming),
        ("outgoingServer", "smtp", outgoing),
    ):
        for service in services:
            server = ET.SubElement(provider, tag, type=kind)
            for name, text in (
                ("hostname", service.host),
                ("port", str(service.port)),
                ("socketType", service.socket),
                ("authentication", "password-cleartext"),
                ("username", "%EMAILADDRESS%"),
            ):
                ET.SubElement(server, name).text = text
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _srv_records(
    config: Config, domain: str, notes: list[str]
) -> tuple[list[Expected], str | None]:
    """RFC 6186 SRV records for what we offer, and the autoconfig file when it can be whole."""
    outgoing = _submission_services(config, notes)
    incoming = []
    if config.imap is not None:
        incoming.append(MailService("imaps", *config.imap, "SSL", 0))
    records = []
    for service in (*outgoing, *incoming):
        how = "TLS from the first byte" if service.socket == "SSL" else "STARTTLS"
        what = "send mail" if service.service.startswith("submission") else "read mail"
        records.append(
            Expected(
                "SRV",
                f"_{service.service}._tcp.{domain}",
                "SRV",
                f"{service.priority} 1 {service.port} {service.host}",
                required=False,
                purpose=f"mail clients set up with an @{domain} address find where to"
                f" {what}: {service.host} port {service.port}, {how} (RFC 6186).",
                fix=f"publish it in the zone of {domain}",
            )
        )
    if incoming:
        # RFC 2782: target "." says the service is decidedly not available;
        # RFC 8314 wants clients off cleartext IMAP, so say so.
        records.append(
            Expected(
                "SRV",
                f"_imap._tcp.{domain}",
                "SRV",
                "0 0 0 .",
                required=False,
                purpose="says IMAP without TLS (port 143) is not offered, so that clients"
                " use _imaps only (RFC 2782, RFC 8314).",
                fix=f"publish it in the zone of {domain}",
            )
        )
    if not outgoing and not incoming:
        notes.append(
            "Mail clients: no submission listener (listen.submission, listen.submissions)"
            " and no imap: server is configured, so no SRV records (RFC 6186) nor"
            " Thunderbird autoconfig file are printed."
        )
    elif not incoming:
        notes.append(
            "Set imap: in mailx.yaml to the IMAP server your users read mail from (Dovecot,"
            " for example) to get its _imaps._tcp record and a Thunderbird autoconfig file."
        )
    elif not outgoing:
        notes.append(
            "No submission listener (listen.submission, listen.submissions): no"
            " _submission(s)._tcp records nor autoconfig file; clients cannot send through"
            " this server."
        )
    xml = autoconfig_xml(domain, incoming, outgoing) if incoming and outgoing else None
    return records, xml


def plan(config: Config, domain: str, addresses: Sequence[str] | None = None) -> Plan:
    """The records ``domain`` needs; ``addresses`` override ``public_addresses``.

    Raises ValueError if ``domain`` is not configured or an address is bad.
    """
    domain = normalize_domain(domain)
    if domain not in config.domains:
        raise ValueError(
            f"{domain} is not a configured domain (configured: {', '.join(config.domains)})"
        )
    host = config.hostname
    if not is_fqdn(host):
        # load_config refuses such a hostname; a Config built otherwise must
        # not get an MX to "localhost." printed for the owner to publish.
        raise ValueError(
            f"hostname '{host}' is not a fully qualified domain name: an MX cannot point at it"
        )
    ips = tuple(
        ipaddress.ip_address(a).compressed
        for a in (config.public_addresses if addresses is None else addresses)
    )
    relay = smarthost_host(config.outbound.smarthost)
    notes: list[str] = []
    if relay is not None and not _publicly_visible(relay):
        # A local relay (a Postfix on 127.0.0.1, a VPN peer) sends to the world
        # from its own public address, which only its owner knows.
        notes.append(
            f"The smarthost {relay} is a loopback or private address, which means nothing"
            f" in public DNS: it is left out of SPF. Add the public address (ip4:/ip6:) or"
            f" the SPF include: of the relay's own outgoing server to the SPF record."
        )
        relay = None
    records = [
        Expected(
            "MX",
            domain,
            "MX",
            f"{MX_PREFERENCE} {host}",
            required=True,
            purpose=f"senders deliver mail for {domain} to {host}, this server.",
            fix=f"point the MX of {domain} at {host}, and remove MX records pointing"
            " anywhere else (unless they are backups that forward here)",
        )
    ]
    for ip in ips:
        kind = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
        records.append(
            Expected(
                kind,
                host,
                kind,
                ip,
                required=True,
                purpose=f"the address of {host}, where senders connect.",
                fix=f"publish the address (in the zone that holds {host})",
            )
        )
    if not ips:
        records.append(
            Expected(
                "A",
                host,
                "A",
                "<this server's IPv4 address>",
                required=True,
                purpose=f"the address of {host}, where senders connect.",
                fix=f"publish {host}'s A (and AAAA) records; pass --ip/--ipv6, or set"
                " public_addresses in mailx.yaml, to get them printed",
                placeholder=True,
            )
        )
        notes.append(
            f"The address of {host} is unknown: pass --ip (and --ipv6), or set"
            " public_addresses in mailx.yaml, to get the A/AAAA and PTR records."
        )
    spf_purpose = (
        f"the hosts allowed to send mail from @{domain} (RFC 7208): mx is this"
        " server, -all refuses everyone else."
    )
    if relay is not None:
        spf_purpose += (
            f" Mail leaves through the smarthost {relay}: if your relay provider documents"
            f" an SPF include (include:_spf.provider.example), use it instead of"
            f" {_spf_term(relay)}."
        )
    records.append(
        Expected(
            "SPF",
            domain,
            "TXT",
            _spf_value(relay),
            required=True,
            purpose=spf_purpose,
            fix=f"publish exactly one TXT record starting v=spf1 at {domain}",
        )
    )
    dkim_record, dkim_error = _dkim_expected(config, domain)
    records.append(dkim_record)
    if dkim_error is not None:
        notes.append(f"DKIM: {dkim_error}")
    elif dkim_record.placeholder:
        notes.append(
            f"No DKIM key for {domain}: run `mailxctl dkim keygen {domain}` and publish the"
            " record it prints; mailx then signs the mail it sends itself."
        )
    dmarc = "v=DMARC1; p=quarantine"
    if config.reports:
        dmarc += f"; rua=mailto:{config.reports}"
    records.append(
        Expected(
            "DMARC",
            f"_dmarc.{domain}",
            "TXT",
            dmarc,
            required=True,
            purpose=f"what receivers do with mail claiming to be from @{domain} that passes"
            " neither SPF nor DKIM for it (RFC 7489). p=quarantine to start: forgeries go"
            " to the junk folder, and a mistake in your own setup costs a trip to the"
            " junk folder rather than a bounce. Move to p=reject once the reports show"
            " all your mail passing.",
            fix=f"publish exactly one TXT record starting v=DMARC1 at _dmarc.{domain}",
        )
    )
    if not config.reports:
        notes.append(
            "Set `reports:` in mailx.yaml to an address of yours to receive DMARC aggregate"
            " reports (rua): they show who sends mail as your domain."
        )
    report_address = config.reports or f"postmaster@{domain}"
    report_domain = parse_address(report_address).domain
    if config.reports and report_domain != domain:
        records.append(
            Expected(
                "DMARC-REPORTS",
                f"{domain}._report._dmarc.{report_domain}",
                "TXT",
                "v=DMARC1",
                required=False,
                purpose=f"{report_domain} agrees to receive the DMARC reports about {domain};"
                " without it, receivers send none (RFC 7489 7.1).",
                fix=f"publish it in the zone of {report_domain}",
            )
        )
    policy = mta_sts_policy(host)
    records.append(
        Expected(
            "MTA-STS",
            f"_mta-sts.{domain}",
            "TXT",
            f"v=STSv1; id={mta_sts_id(policy)}",
            required=False,
            purpose=f"tells senders to insist on TLS to {host} (RFC 8461). The policy"
            f" file below must be served at https://mta-sts.{domain}/.well-known/mta-sts.txt"
            f" by an HTTPS server with a certificate for mta-sts.{domain}; the id changes"
            " whenever the policy does.",
            fix=f"publish it, and serve the policy file (printed by `mailxctl dns {domain}`)"
            f" at https://mta-sts.{domain}/.well-known/mta-sts.txt",
        )
    )
    if config.tls is None:
        notes.append(
            "tls: is not configured, so this server offers no STARTTLS: senders following"
            " the MTA-STS policy will report every delivery as failing. Configure tls: first."
        )
    records.append(
        Expected(
            "TLS-RPT",
            f"_smtp._tls.{domain}",
            "TXT",
            f"v=TLSRPTv1; rua=mailto:{report_address}",
            required=False,
            purpose="where senders report failures to reach us over TLS (RFC 8460).",
            fix=f"publish exactly one TXT record starting v=TLSRPTv1 at _smtp._tls.{domain}",
        )
    )
    for ip in ips:
        records.append(
            Expected(
                "PTR",
                _reverse_name(ip),
                "PTR",
                host,
                required=True,
                purpose=f"the reverse DNS of {ip}: receivers check that it names {host} and"
                f" that {host} resolves back to {ip} (forward-confirmed reverse DNS), and"
                " many refuse mail otherwise.",
                fix=f"ask your hosting provider (the owner of {ip}) to set its reverse DNS"
                f" (PTR) to {host}; it is not published in your own zone",
                in_zone=False,
            )
        )
    srv, autoconfig = _srv_records(config, domain, notes)
    records.extend(srv)
    dkim_config = config.domains[domain].dkim
    return Plan(
        domain,
        host,
        ips,
        tuple(records),
        policy,
        tuple(notes),
        relay,
        str(dkim_config.key) if dkim_config else None,
        dkim_error,
        autoconfig,
    )


# ---------------------------------------------------------------------------
# Rendering


def txt_strings(value: str) -> list[str]:
    """``value`` cut into strings of at most 255 octets (RFC 1035 3.3.14).

    Receivers join them without separators (RFC 7208 3.3, RFC 6376
    3.6.2.2).  Our values are ASCII, so octets and characters coincide.
    """
    data = value.encode("utf-8")
    if not data:
        return [""]
    return [
        data[i : i + MAX_TXT_STRING].decode("utf-8") for i in range(0, len(data), MAX_TXT_STRING)
    ]


def _quoted(text: str) -> str:
    # RFC 1035 5.1: within quotes, \ and " are escaped with a backslash.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rdata(record: Expected, indent: int) -> str:
    if record.type == "TXT":
        strings = [_quoted(s) for s in txt_strings(record.value)]
        if len(strings) == 1:
            return strings[0]
        pad = "\n" + " " * (indent + 2)
        return "( " + pad.join(strings) + " )"
    if record.type == "MX":
        preference, exchange = record.value.split()
        return f"{preference} {exchange}."
    if record.type in ("PTR", "CNAME"):
        return f"{record.value}."
    if record.type == "SRV":
        # RFC 2782: priority weight port target; "." alone is the root.
        *numbers, target = record.value.split()
        return " ".join(numbers) + " " + (target if target == "." else f"{target}.")
    return record.value


def zone_line(record: Expected, width: int = 0) -> str:
    """One record in zone-file syntax (RFC 1035 5.1); absolute names."""
    head = f"{record.name + '.':<{width}} IN {record.type:<5} "
    return head + _rdata(record, len(head))


def _comment(text: str) -> list[str]:
    return _wrap(text, "; ", ";   ")


def _wrap(text: str, first: str, rest: str) -> list[str]:
    # URLs and record values must not be cut at their hyphens, nor "RFC 7208"
    # at its space (a no-break space while wrapping).
    lines = textwrap.wrap(
        text.replace("RFC ", "RFC\u00a0"),
        COMMENT_WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_on_hyphens=False,
        break_long_words=False,
    )
    return [line.replace("\u00a0", " ") for line in lines]


def zone_fragment(p: Plan) -> str:
    """The records as a zone-file fragment, one comment above each.

    PTR records are shown commented out: they live in the hosting
    provider's reverse zone, not the owner's.  So are placeholders.
    """
    width = min(max(len(r.name) + 1 for r in p.records if r.in_zone and not r.placeholder), 40)
    lines = [
        f"; DNS records for {p.domain}, mail server {p.hostname} (mailxctl dns).",
        "; Names end with a dot: absolute, correct in any zone.",
    ]
    for record in p.records:
        need = "required" if record.required else "recommended"
        lines.append("")
        lines.extend(_comment(f"{record.record} ({need}): {record.purpose}"))
        line = zone_line(record, width)
        if record.placeholder:
            lines.append(f"; {line}")
            lines.extend(_comment(f"-> {record.fix}"))
        elif not record.in_zone:
            lines.append("; Set by your hosting provider, not in your zone:")
            lines.append(f"; {line}")
        else:
            lines.append(line)
    return "\n".join(lines)


def _web_value(record: Expected) -> str:
    if record.type == "MX":
        preference, exchange = record.value.split()
        return f"{exchange}  (priority {preference})"
    if record.type == "SRV":
        priority, weight, port, target = record.value.split()
        if target == ".":
            return ".  (priority 0, weight 0, port 0: not offered)"
        return f"{target}  (priority {priority}, weight {weight}, port {port})"
    return record.value


def web_table(p: Plan) -> str:
    """Type, name and whole value per record, for a DNS provider's web form.

    PTR records are left out: the hosting provider sets them (`render_plan`
    lists them apart).
    """
    rows = [
        (r.type, r.name, "required" if r.required else "recommended", _web_value(r))
        for r in p.records
        if r.in_zone and not r.placeholder
    ]
    header = ("TYPE", "NAME", "NEED", "VALUE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]

    return "\n".join(line(r) for r in [header, *rows])


def render_plan(p: Plan) -> str:
    """The whole human output of ``mailxctl dns DOMAIN``."""
    out = [zone_fragment(p), ""]
    out.extend(
        _wrap(
            "For a DNS provider's web form (whole values, without quotes; some forms want"
            f" the name without .{p.domain}, or @ for {p.domain} itself):",
            "",
            "",
        )
    )
    out += ["", web_table(p), "", f"MTA-STS policy file, to serve at {p.mta_sts_url}:", ""]
    out.extend(f"    {line}" for line in p.mta_sts_policy.splitlines())
    if p.autoconfig is not None:
        first, second = p.autoconfig_urls
        out += [""]
        out.extend(
            _wrap(
                f"Thunderbird autoconfig file, to serve at {first} (with a certificate for"
                f" autoconfig.{p.domain}) or at {second}:",
                "",
                "",
            )
        )
        out += [""]
        out.extend(f"    {line}" for line in p.autoconfig.splitlines())
    ptrs = [r for r in p.records if r.type == "PTR"]
    if ptrs:
        out += ["", "Reverse DNS (PTR), to ask of your hosting provider:"]
        for r in ptrs:
            address = dns.reversename.to_address(dns.name.from_text(r.name))
            out.append(f"    {address} -> {r.value}")
    if p.notes:
        out += ["", "Notes:"]
        for note in p.notes:
            out.extend(_wrap(note, "  - ", "    "))
    return "\n".join(out)


def plan_json(p: Plan) -> dict[str, Any]:
    """The ``--json`` form of a plan."""
    return {
        "domain": p.domain,
        "hostname": p.hostname,
        "addresses": list(p.addresses),
        "records": [
            {
                "record": r.record,
                "name": r.name,
                "type": r.type,
                "value": None if r.placeholder else r.value,
                "strings": None if r.placeholder or r.type != "TXT" else txt_strings(r.value),
                "required": r.required,
                "in_zone": r.in_zone,
                "purpose": r.purpose,
                "fix": r.fix,
            }
            for r in p.records
        ],
        "mta_sts_policy": {"url": p.mta_sts_url, "text": p.mta_sts_policy},
        "autoconfig": None
        if p.autoconfig is None
        else {"urls": list(p.autoconfig_urls), "text": p.autoconfig},
        "notes": list(p.notes),
    }


# ---------------------------------------------------------------------------
# SPF syntax and lookup counting (RFC 7208)


class SPFSyntaxError(ValueError):
    """The record does not parse: receivers return permerror (RFC 7208 4.6)."""


@dataclass(frozen=True)
class SPFTerm:
    kind: str  # "mechanism" | "modifier"
    name: str  # lower case
    value: str | None  # domain-spec, network, or modifier value
    qualifier: str = "+"


_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z")
_MECHANISM = re.compile(r"([+\-?~]?)([A-Za-z][A-Za-z0-9_.-]*)(?::(.*?))?(/\d+(?://\d+)?|//\d+)?\Z")
# RFC 7208 4.6.4: the terms that cost a DNS query.
_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")


def is_spf(text: str) -> bool:
    """RFC 7208 4.5: exactly "v=spf1", then a space or the end."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


def parse_spf(text: str) -> list[SPFTerm]:
    """The terms of an SPF record; `SPFSyntaxError` for what RFC 7208 12 forbids."""
    if not is_spf(text):
        raise SPFSyntaxError("does not start with v=spf1")
    terms: list[SPFTerm] = []
    seen_modifiers: set[str] = set()
    for word in text[6:].split(" "):
        if not word:
            continue
        modifier = _MODIFIER.match(word)
        mechanism = _MECHANISM.match(word)
        if modifier and not (mechanism and mechanism[2].lower() in _MECHANISMS):
            name = modifier[1].lower()
            if name in ("redirect", "exp"):
                if name in seen_modifiers:  # RFC 7208 6: at most once each
                    raise SPFSyntaxError(f"{name}= appears twice")
                if not modifier[2]:
                    raise SPFSyntaxError(f"{name}= without a domain")
                seen_modifiers.add(name)
            terms.append(SPFTerm("modifier", name, modifier[2]))
            continue
        if mechanism is None or mechanism[2].lower() not in _MECHANISMS:
            raise SPFSyntaxError(f"unknown term {word!r}")
        qualifier, name, value, cidr = (
            mechanism[1] or "+",
            mechanism[2].lower(),
            mechanism[3],
            mechanism[4],
        )
        if name in ("include", "exists", "ip4", "ip6") and not value:
            raise SPFSyntaxError(f"{name} needs a value ({word!r})")
        if name == "all" and (value is not None or cidr):
            raise SPFSyntaxError(f"bad term {word!r}")
        if name in ("ip4", "ip6"):
            try:
                network = ipaddress.ip_network(value + (cidr or ""), strict=False)
            except ValueError:
                raise SPFSyntaxError(f"bad address in {word!r}") from None
            if network.version != int(name[-1]):
                raise SPFSyntaxError(f"{word!r}: not an IPv{name[-1]} address")
        terms.append(SPFTerm("mechanism", name, value, qualifier))
    return terms


@dataclass
class SPFCount:
    """The result of walking an SPF record and everything it includes."""

    lookups: int = 0
    problems: list[str] = field(default_factory=list)
    temporary: str | None = None  # a lookup failed: the count is incomplete


def count_spf_lookups(
    domain: str, fetch: Callable[[str], list[str]], limit: int = MAX_SPF_LOOKUPS
) -> SPFCount:
    """Count the DNS-querying terms of ``domain``'s SPF record, includes and
    redirects followed (RFC 7208 4.6.4), stopping once over ``limit``.

    Every term is counted, as if evaluation reached it: a receiver stops at
    the first match, but a sender from an address late in the record needs
    them all.  ``fetch`` returns a name's TXT strings; it raises
    `DNSVoidError` or `DNSTemporaryError` as `Resolver.txt` does.  A domain
    with a macro (``%{i}``) cannot be followed without a message; it counts
    one.
    """
    count = SPFCount()

    def walk(name: str, via: str) -> None:
        try:
            records = [t for t in fetch(name) if is_spf(t)]
        except DNSVoidError:
            records = []
        except DNSTemporaryError as e:
            count.temporary = str(e)
            return
        if len(records) != 1:
            # RFC 7208 5.2: an include target without exactly one record
            # is a permerror; so is a redirect (6.1).
            what = "no SPF record" if not records else f"{len(records)} SPF records"
            count.problems.append(f"{via} leads to {name}, which has {what} (permerror)")
            return
        try:
            terms = parse_spf(records[0])
        except SPFSyntaxError as e:
            count.problems.append(f"the SPF record of {name} ({via}) does not parse: {e}")
            return
        has_all = any(t.name == "all" for t in terms if t.kind == "mechanism")
        for term in terms:
            if term.name not in _LOOKUP_TERMS or (term.kind == "modifier") != (
                term.name == "redirect"
            ):
                continue
            if term.name == "redirect" and has_all:
                continue  # RFC 7208 6.1: ignored when "all" is present
            count.lookups += 1
            if count.lookups > limit:
                return
            if term.name in ("include", "redirect") and term.value and "%" not in term.value:
                walk(term.value.rstrip(".").lower(), f"{term.name}:{term.value}")
                if count.lookups > limit or count.temporary:
                    return

    walk(domain, "the record")
    return count


# ---------------------------------------------------------------------------
# Checking


@dataclass(frozen=True)
class Finding:
    """What DNS says about one expected record."""

    record: str  # MX, A, SPF... as in `Expected.record`
    name: str
    type: str
    status: str  # ok | missing | wrong | error
    required: bool
    expected: str
    found: tuple[str, ...] = ()
    detail: str = ""  # what is right or wrong, in a sentence
    fix: str = ""  # empty when ok

    @property
    def ok(self) -> bool:
        return self.status == OK

    def message(self) -> str:
        """One line naming the record, what is wrong and the fix (for logs)."""
        text = f"{self.record} {self.name}: {self.status}"
        if self.detail:
            text += f": {self.detail}"
        if not self.ok and self.fix:
            text += f"; fix: {self.fix}"
        return text


def failed(findings: Sequence[Finding]) -> bool:
    """True when anything required is not ok: exit status 1."""
    return any(f.required and not f.ok for f in findings)


def _finding(
    e: Expected, status: str, detail: str, found: Sequence[str] = (), fix: str | None = None
) -> Finding:
    if fix is None:
        fix = "" if status == OK else _publish_fix(e)
    return Finding(e.record, e.name, e.type, status, e.required, e.value, tuple(found), detail, fix)


def _publish_fix(e: Expected) -> str:
    if e.placeholder or not e.in_zone:
        return e.fix
    one_line = f"{e.name}. IN {e.type} " + (
        " ".join(_quoted(s) for s in txt_strings(e.value)) if e.type == "TXT" else _rdata(e, 0)
    )
    return f"{e.fix}: {one_line}"


def _starts_with(prefix: str) -> Callable[[str], bool]:
    """Records whose first tag is ``prefix`` (whitespace around "=" allowed), as
    RFC 7489 6.3, RFC 8461 3.1 and RFC 8460 3 select theirs; SPF has its own rule."""
    if prefix == "v=spf1":
        return is_spf
    return lambda text: re.sub(r"\s+", "", text.split(";", 1)[0]) == prefix


class _Checker:
    """The live comparison of one plan, memoizing the lookups the checks share."""

    def __init__(self, p: Plan, resolver: Resolver, spf_check: Callable[..., Any]) -> None:
        self.plan = p
        self.resolver = resolver
        self.spf_check = spf_check
        self._addresses: dict[str, list[str] | Exception] = {}

    def run(self) -> list[Finding]:
        findings: list[Finding] = []
        for e in self.plan.records:
            if e.type == "PTR":
                continue  # checked together below, forward-confirmed
            check = getattr(self, "check_" + e.record.lower().replace("-", "_"))
            result = check(e)
            findings.extend(result if isinstance(result, list) else [result])
        findings.extend(self.check_reverse())
        return findings

    def _txt(self, e: Expected, prefix: str) -> list[str] | Finding:
        """The records at e.name starting with ``prefix``, or the finding that ends the check."""
        try:
            texts = self.resolver.txt(e.name)
        except DNSVoidError:
            texts = []
        except DNSTemporaryError as err:
            return _finding(e, ERROR, f"lookup failed: {err}", fix="check again later")
        ours = [t for t in texts if _starts_with(prefix)(t)]
        if not ours:
            others = f" ({len(texts)} other TXT record(s) there)" if texts else ""
            return _finding(e, MISSING, f"no {prefix} record at {e.name}{others}", texts)
        return ours

    def host_addresses(self, kind: str) -> list[str] | Exception:
        """The hostname's A or AAAA records (or the error), looked up once."""
        if kind not in self._addresses:
            lookup = self.resolver.a if kind == "A" else self.resolver.aaaa
            try:
                self._addresses[kind] = lookup(self.plan.hostname)
            except (DNSVoidError, DNSTemporaryError) as err:
                self._addresses[kind] = err
        return self._addresses[kind]

    def known_host_addresses(self) -> list[str]:
        found: list[str] = []
        for kind in ("A", "AAAA"):
            result = self.host_addresses(kind)
            if isinstance(result, list):
                found.extend(ipaddress.ip_address(a).compressed for a in result)
        return found

    # -- MX -------------------------------------------------------------------

    def check_mx(self, e: Expected) -> Finding:
        domain, host = self.plan.domain, self.plan.hostname
        try:
            mxs = self.resolver.mx(domain)
        except DNSVoidError:
            return _finding(e, MISSING, f"no MX record: senders cannot find {host}")
        except DNSTemporaryError as err:
            return _finding(e, ERROR, f"lookup failed: {err}", fix="check again later")
        found = [f"{m.preference} {m.exchange}" for m in mxs]
        hosts = [m.exchange for m in mxs]
        if all(h in (".", "") for h in hosts):
            return _finding(
                e,
                WRONG,
                f"{domain} publishes a null MX (RFC 7505): it says it accepts no mail",
                found,
                f"replace the null MX: {e.fix}: {domain}. IN MX {e.value}.",
            )
        if host not in hosts:
            return _finding(
                e,
                WRONG,
                f"MX points to {', '.join(hosts)}, not {host}",
                found,
                f"{e.fix}: {domain}. IN MX {_rdata(e, 0)}",
            )
        others = [h for h in hosts if h != host]
        detail = f"mail for {domain} goes to {host}"
        if others:
            detail += f"; also to {', '.join(others)} (backup MX: make sure it forwards here)"
        return _finding(e, OK, detail, found)

    # -- addresses ------------------------------------------------------------

    def check_a(self, e: Expected) -> list[Finding]:
        return self._check_address(e)

    def check_aaaa(self, e: Expected) -> list[Finding]:
        return self._check_address(e)

    def _check_address(self, e: Expected) -> list[Finding]:
        host = self.plan.hostname
        if e.placeholder:
            found = self.known_host_addresses()
            if found:
                return [_finding(e, OK, f"{host} has address {', '.join(found)}", found)]
            errors = [
                r
                for r in (self.host_addresses("A"), self.host_addresses("AAAA"))
                if isinstance(r, DNSTemporaryError)
            ]
            if errors:
                return [_finding(e, ERROR, f"lookup failed: {errors[0]}", fix="check again later")]
            return [_finding(e, MISSING, f"{host} has no A or AAAA record")]
        result = self.host_addresses(e.type)
        if isinstance(result, DNSTemporaryError):
            return [_finding(e, ERROR, f"lookup failed: {result}", fix="check again later")]
        if isinstance(result, Exception):
            return [_finding(e, MISSING, f"{host} has no {e.type} record")]
        found = [ipaddress.ip_address(a).compressed for a in result]
        findings = []
        if e.value in found:
            findings.append(_finding(e, OK, f"{host} {e.type} {e.value}", found))
        else:
            findings.append(
                _finding(e, WRONG, f"{host} {e.type} is {', '.join(found)}, not {e.value}", found)
            )
        # Addresses of this type nobody declared: reported once, with the
        # last expected record of the type (a stale address gets mail lost).
        mine = [r.value for r in self.plan.records if r.type == e.type and not r.placeholder]
        extra = [a for a in found if a not in mine]
        if extra and e.value == mine[-1]:
            findings.append(
                Finding(
                    e.record,
                    e.name,
                    e.type,
                    WRONG,
                    e.required,
                    " ".join(mine),
                    tuple(found),
                    f"{host} also has {e.type} {', '.join(extra)}, which is not this server's",
                    f"remove {host} {e.type} {', '.join(extra)}, or add it to public_addresses"
                    " (or --ip/--ipv6) if it is this server too",
                )
            )
        return findings

    # -- reverse DNS ------------------------------------------------------------

    def check_reverse(self) -> list[Finding]:
        """FCrDNS: each address -> PTR names the host -> the host resolves back to it."""
        host = self.plan.hostname
        expected = {r.name: r for r in self.plan.records if r.type == "PTR"}
        if self.plan.addresses:
            addresses = list(self.plan.addresses)
        else:
            addresses = self.known_host_addresses()
        forward = self.known_host_addresses()
        findings = []
        for address in addresses:
            name = _reverse_name(address)
            e = expected.get(name) or Expected(
                "PTR",
                name,
                "PTR",
                host,
                True,
                f"reverse DNS of {address}",
                f"ask your hosting provider (the owner of {address}) to set its reverse DNS"
                f" (PTR) to {host}",
                in_zone=False,
            )
            try:
                names = self.resolver.ptr(address)
            except DNSVoidError:
                findings.append(_finding(e, MISSING, f"{address} has no reverse DNS (PTR)"))
                continue
            except DNSTemporaryError as err:
                findings.append(
                    _finding(e, ERROR, f"lookup failed: {err}", fix="check again later")
                )
                continue
            if host not in names:
                findings.append(
                    _finding(
                        e,
                        WRONG,
                        f"reverse DNS of {address} is {', '.join(names)}, not {host}"
                        " (forward-confirmed reverse DNS fails)",
                        names,
                    )
                )
            elif address not in forward:
                findings.append(
                    _finding(
                        e,
                        WRONG,
                        f"reverse DNS of {address} is {host}, but {host} does not resolve"
                        f" to {address} (forward-confirmed reverse DNS fails)",
                        names,
                        f"publish {host} {'A' if ':' not in address else 'AAAA'} {address}",
                    )
                )
            else:
                findings.append(
                    _finding(e, OK, f"{address} -> {host} -> {address} (forward-confirmed)", names)
                )
        return findings

    # -- SPF --------------------------------------------------------------------

    def check_spf(self, e: Expected) -> Finding:
        ours = self._txt(e, "v=spf1")
        if isinstance(ours, Finding):
            return ours
        domain = self.plan.domain
        if len(ours) > 1:
            return _finding(
                e,
                WRONG,
                f"{len(ours)} SPF records at {domain}: receivers then return permerror"
                " (RFC 7208 4.5), as if there were no SPF at all",
                ours,
                f"delete all but one; keep a single record: {domain}. IN TXT {_quoted(e.value)}",
            )
        record = ours[0]
        try:
            terms = parse_spf(record)
        except SPFSyntaxError as err:
            return _finding(e, WRONG, f"the SPF record does not parse ({err}): permerror", ours)

        def fetch(name: str) -> list[str]:
            return self.resolver.txt(name)

        count = count_spf_lookups(domain, fetch)
        if count.temporary:
            return _finding(
                e, ERROR, f"lookup failed: {count.temporary}", ours, "check again later"
            )
        if count.lookups > MAX_SPF_LOOKUPS:
            return _finding(
                e,
                WRONG,
                f"the SPF record needs more than {MAX_SPF_LOOKUPS} DNS lookups (include, a, mx,"
                " ptr, exists, redirect, counted through includes): receivers return"
                " permerror (RFC 7208 4.6.4)",
                ours,
                "remove includes you no longer need, or replace a:/mx: terms with ip4:/ip6:"
                f" networks; for this server alone: {domain}. IN TXT {_quoted(e.value)}",
            )
        if count.problems:
            return _finding(e, WRONG, "; ".join(count.problems), ours)
        if any(t.kind == "mechanism" and t.name == "all" and t.qualifier == "+" for t in terms):
            return _finding(
                e,
                WRONG,
                "+all allows every host on the internet to send as you",
                ours,
                f"end the record with -all: {domain}. IN TXT {_quoted(e.value)}",
            )
        return self._spf_authorizes(e, ours, count.lookups)

    def _senders(self) -> tuple[list[str], str]:
        """The addresses our mail leaves from, and what they are, for the SPF check."""
        relay = self.plan.smarthost
        if relay is not None:
            try:
                return [ipaddress.ip_address(relay).compressed], f"the smarthost {relay}"
            except ValueError:
                pass
            found = []
            for lookup in (self.resolver.a, self.resolver.aaaa):
                try:
                    found += lookup(relay)
                except (DNSVoidError, DNSTemporaryError):
                    pass
            return found, f"the smarthost {relay}"
        return list(self.plan.addresses) or self.known_host_addresses(), self.plan.hostname

    def _spf_authorizes(self, e: Expected, ours: list[str], lookups: int) -> Finding:
        domain = self.plan.domain
        senders, what = self._senders()
        refused = []
        for address in senders:
            result = self.spf_check(
                self.resolver, address, self.plan.hostname, f"postmaster@{domain}"
            )
            if result.result == "temperror":
                return _finding(
                    e, ERROR, f"lookup failed: {result.reason}", ours, "check again later"
                )
            if result.result != "pass":
                refused.append(f"{address} ({result.result})")
        if refused:
            if self.plan.smarthost and "include:" in ours[0]:
                return _finding(
                    e,
                    OK,
                    f"{lookups} of {MAX_SPF_LOOKUPS} lookups; assuming its include: covers"
                    f" {what}, whose own address is not authorized",
                    ours,
                )
            return _finding(
                e,
                WRONG,
                f"the SPF record does not authorize {what}: {', '.join(refused)}",
                ours,
                f"authorize it; for example: {domain}. IN TXT {_quoted(e.value)}",
            )
        checked = f"authorizes {what}" if senders else "parses"
        return _finding(e, OK, f"{checked}; {lookups} of {MAX_SPF_LOOKUPS} DNS lookups", ours)

    # -- DKIM -------------------------------------------------------------------

    def check_dkim(self, e: Expected) -> Finding:
        if e.placeholder:
            if self.plan.dkim_error is not None:
                return _finding(e, ERROR, self.plan.dkim_error, fix=e.fix)
            return _finding(e, MISSING, f"no DKIM key configured for {self.plan.domain}", fix=e.fix)
        try:
            texts = self.resolver.txt(e.name)
        except DNSVoidError:
            texts = []
        except DNSTemporaryError as err:
            return _finding(e, ERROR, f"lookup failed: {err}", fix="check again later")
        keys = [t for t in texts if re.search(r"(^|;)\s*p\s*=", t)]
        if not keys:
            return _finding(e, MISSING, f"no DKIM key record at {e.name}", texts)
        if len(keys) > 1:
            return _finding(
                e,
                WRONG,
                f"{len(keys)} key records at {e.name}: verifiers may pick either"
                " (RFC 6376 3.6.2.2)",
                keys,
                f"keep one: {_publish_fix(e)}",
            )
        published, mine = _dkim_tags(keys[0]), _dkim_tags(e.value)
        p = re.sub(r"\s+", "", published.get("p", ""))
        if not p:
            return _finding(e, WRONG, "the published key is empty: revoked (RFC 6376 3.6.1)", keys)
        if p != mine["p"] or published.get("k", "rsa").lower() != mine["k"]:
            return _finding(
                e,
                WRONG,
                f"the published key is not the public half of our key {self.plan.dkim_key}",
                keys,
                f"replace the record: {_publish_fix(e).split(': ', 1)[1]}",
            )
        return _finding(e, OK, f"matches our key {self.plan.dkim_key}", keys)

    # -- SRV (RFC 6186) ---------------------------------------------------------

    def check_srv(self, e: Expected) -> Finding:
        try:
            answer = self.resolver.query(e.name, "SRV").records
        except DNSVoidError:
            return _finding(e, MISSING, f"no SRV record at {e.name}")
        except DNSTemporaryError as err:
            return _finding(e, ERROR, f"lookup failed: {err}", fix="check again later")
        records = sorted(
            (r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True).lower())
            for r in answer
        )
        found = [f"{pr} {w} {port} {t or '.'}" for pr, w, port, t in records]
        _, _, want_port, want_target = e.value.split()
        # RFC 2782: the root (".") as target means "not offered".
        offered = [(port, t) for _, _, port, t in records if t not in ("", ".")]
        if want_target == ".":
            if offered:
                return _finding(
                    e,
                    WRONG,
                    f"{e.name} names {', '.join(f'{t}:{port}' for port, t in offered)}:"
                    " clients may use it without TLS",
                    found,
                    f"replace it: {_publish_fix(e).split(': ', 1)[1]}",
                )
            return _finding(e, OK, "says the service is not offered", found)
        if (int(want_port), want_target) in offered:
            return _finding(e, OK, f"clients find {want_target} port {want_port}", found)
        if not offered:
            detail = 'says the service is not offered (target ".", RFC 2782)'
        else:
            detail = (
                f"points to {', '.join(f'{t}:{port}' for port, t in offered)},"
                f" not {want_target}:{want_port}"
            )
        return _finding(e, WRONG, detail, found, f"replace it: {_publish_fix(e).split(': ', 1)[1]}")

    # -- DMARC ------------------------------------------------------------------

    def check_dmarc(self, e: Expected) -> Finding:
        from mailx.checks.dmarc import parse_record

        ours = self._txt(e, "v=DMARC1")
        if isinstance(ours, Finding):
            return ours
        if len(ours) > 1:
            return _finding(
                e,
                WRONG,
                f"{len(ours)} DMARC records: receivers then apply no policy at all"
                " (RFC 7489 6.6.3)",
                ours,
                f"delete all but one; keep a single record: {e.name}. IN TXT {_quoted(e.value)}",
            )
        parsed = parse_record(ours[0])
        if parsed.p is None:
            return _finding(
                e, WRONG, "the DMARC record has no valid p= policy: receivers ignore it", ours
            )
        detail = f"policy p={parsed.p}"
        if parsed.p == "none":
            detail += " (monitoring only: forgeries are delivered; move to quarantine)"
        wanted = re.search(r"rua=(\S+)", e.value)
        if wanted and wanted[1] not in parsed.rua:
            detail += f"; reports go to {', '.join(parsed.rua) or 'nobody'}, not {wanted[1]}"
        return _finding(e, OK, detail, ours)

    def check_dmarc_reports(self, e: Expected) -> Finding:
        ours = self._txt(e, "v=DMARC1")
        if isinstance(ours, Finding):
            return ours
        return _finding(e, OK, "reports about this domain are accepted there", ours)

    # -- MTA-STS and TLS-RPT --------------------------------------------------------

    def check_mta_sts(self, e: Expected) -> Finding:
        ours = self._txt(e, "v=STSv1")
        if isinstance(ours, Finding):
            return ours
        if len(ours) > 1:
            return _finding(
                e,
                WRONG,
                f"{len(ours)} MTA-STS records: senders then use no policy (RFC 8461 3.1)",
                ours,
            )
        found_id = re.search(r"(?:^|;)\s*id=([^;\s]*)", ours[0])
        if found_id is None or not re.fullmatch(r"[A-Za-z0-9]{1,32}", found_id[1]):
            return _finding(
                e, WRONG, "no valid id= (1 to 32 letters or digits, RFC 8461 3.1)", ours
            )
        detail = "present"
        wanted = e.value.rsplit("=", 1)[1]
        if found_id[1] != wanted:
            detail += (
                f" (id={found_id[1]}, ours is {wanted}: fine if you serve another policy;"
                " change the id whenever the policy file changes)"
            )
        return _finding(e, OK, detail, ours)

    def check_tls_rpt(self, e: Expected) -> Finding:
        ours = self._txt(e, "v=TLSRPTv1")
        if isinstance(ours, Finding):
            return ours
        if len(ours) > 1:
            return _finding(
                e, WRONG, f"{len(ours)} TLS-RPT records: senders ignore them all (RFC 8460 3)", ours
            )
        if not re.search(r"(?:^|;)\s*rua=\s*(mailto:|https:)", ours[0]):
            return _finding(e, WRONG, "no rua= with a mailto: or https: address (RFC 8460 3)", ours)
        return _finding(e, OK, "present", ours)


def _dkim_tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def check_plan(
    p: Plan, resolver: Resolver, spf_check: Callable[..., Any] | None = None
) -> list[Finding]:
    """Look up every record of ``p`` and compare; blocks on DNS (use a thread).

    ``spf_check`` is `mailx.checks.spf.check_spf` unless given: SPF is judged
    by the code that judges incoming mail.
    """
    if spf_check is None:
        from mailx.checks.spf import check_spf

        spf_check = check_spf
    return _Checker(p, resolver, spf_check).run()


def resolver_for(config: Config) -> Resolver:
    """A resolver as the ``dns:`` section says."""
    return Resolver(config.dns.nameservers, config.dns.timeout)


def check_config(
    config: Config, resolver: Resolver | None = None, addresses: Sequence[str] | None = None
) -> dict[str, list[Finding]]:
    """Every configured domain's findings, in configuration order (blocking)."""
    resolver = resolver or resolver_for(config)
    return {name: check_plan(plan(config, name, addresses), resolver) for name in config.domains}


def finding_json(f: Finding) -> dict[str, Any]:
    return {
        "record": f.record,
        "name": f.name,
        "type": f.type,
        "status": f.status,
        "required": f.required,
        "expected": f.expected,
        "found": list(f.found),
        "detail": f.detail,
        "fix": f.fix,
    }


_MARK = {OK: "ok", MISSING: "MISSING", WRONG: "WRONG", ERROR: "ERROR"}


def render_findings(domain: str, findings: Sequence[Finding]) -> str:
    """The human form of a check: one block per record, then a verdict line."""
    lines = []
    for f in findings:
        need = "" if f.required else " (recommended)"
        lines.append(f"{_MARK[f.status]:<8} {f.record} {f.name}{need}: {f.detail}")
        if not f.ok:
            if f.found:
                lines.append(f"         found:    {' | '.join(f.found)}")
            if f.expected and f.status != ERROR:
                lines.append(f"         expected: {f.expected}")
            if f.fix:
                lines.append(f"         fix:      {f.fix}")
    bad_required = [f for f in findings if f.required and not f.ok]
    bad_recommended = [f for f in findings if not f.required and not f.ok]
    if bad_required:
        verdict = f"{domain}: {len(bad_required)} required record(s) missing or wrong"
    else:
        verdict = f"{domain}: all required records ok"
    if bad_recommended:
        verdict += f"; {len(bad_recommended)} recommended record(s) to add or fix"
    lines.append(verdict)
    return "\n".join(lines)
