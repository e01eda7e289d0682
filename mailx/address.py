# -*- test-case-name: tests.test_routing -*-
"""Address syntax (RFC 5321 4.1.2, RFC 5322 3.4.1): a leaf, standard library plus idna.

What an address and a domain are, parsed and written back, in one place for
every stage: the SMTP session's paths, routing, the checks' domains, the
configuration, DSNs and SRS.  Domains are IDNA2008 A-labels, lower-cased;
our recipients' local parts case-folded on request.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from types import ModuleType

_idna: ModuleType | None
try:
    # IDNA2008 with UTS #46 mapping; twisted[tls] depends on it.
    import idna as _idna
except ImportError:  # pragma: no cover - exercised only without the idna package
    _idna = None


class AddressError(ValueError):
    """Text that is not a mailbox address (RFC 5321 section 4.1.2)."""


# RFC 5322 3.2.3: atext; RFC 5321 4.1.2: Dot-string = Atom *("." Atom).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str]; RFC 1035 2.3.4: 63 octets.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# RFC 5321 4.5.3.1.1 and 4.5.3.1.2.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255


def is_dot_atom(text: str) -> bool:
    """True for an unquoted RFC 5321 local part (``first.last``, ``a+b``)."""
    return bool(_DOT_ATOM.match(text))


def normalize_domain(text: str) -> str:
    """A domain name as mailx keeps it: IDNA A-labels, lower-case.

    Unicode is converted with the ``idna`` package (IDNA2008 plus the UTS #46
    mapping, as browsers and MTAs do); without it, Python's built-in codec
    (IDNA2003) is the fallback.  Punycode input is checked, not trusted.
    """
    if not text:
        raise AddressError("empty domain")
    if text.isascii():
        name = text.lower()
    else:
        try:
            if _idna is not None:
                name = _idna.encode(text, uts46=True).decode("ascii")
            else:  # pragma: no cover
                name = text.encode("idna").decode("ascii").lower()
        except UnicodeError as e:
            raise AddressError(f"invalid internationalized domain {text!r}: {e}") from None
    if len(name) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    for label in name.split("."):
        if not _LABEL.match(label):
            why = "empty label" if not label else f"bad label {label!r}"
            raise AddressError(f"invalid domain {text!r}: {why}")
        if label.startswith("xn--"):
            try:
                domain_to_unicode(label)
            except UnicodeError:
                raise AddressError(f"invalid domain {text!r}: bad A-label {label!r}") from None
    return name


def domain_to_unicode(name: str) -> str:
    """The U-label form of a normalized domain, for people to read."""
    if "xn--" not in name:
        return name
    if _idna is not None:
        return str(_idna.decode(name))
    return name.encode("ascii").decode("idna")  # pragma: no cover


@dataclass(frozen=True)
class Address:
    """A parsed mailbox address: local part case-folded, domain normalized."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"


def quote_local(local: str) -> str:
    """The local part as it must be written on the wire (RFC 5321 4.1.2)."""
    if is_dot_atom(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def quote_path(address: str) -> str:
    """``local@domain`` with its local part unquoted (as senders are kept) as the wire writes it.

    The local part is everything before the last "@" (``a@b@x`` is the
    local part ``a@b``); RFC 5321 4.1.2 quotes it unless it is a Dot-string.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{quote_local(local)}@{domain}"


def _parse_quoted(text: str) -> tuple[str, int]:
    """Decode the Quoted-string at the start of text; return it and its length."""
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            # RFC 5321 4.1.2: quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= len(text) or not 32 <= ord(text[i + 1]) <= 126:
                raise AddressError("bad quoted pair in local part")
            out.append(text[i + 1])
            i += 2
            continue
        if not 32 <= ord(c) <= 126:
            raise AddressError("local part must be ASCII (SMTPUTF8 is not supported)")
        out.append(c)
        i += 1
    raise AddressError("unterminated quoted local part")


def _parse_literal(text: str) -> str:
    """RFC 5321 4.1.3 address literal, normalized (``[192.0.2.1]``, ``[IPv6:…]``)."""
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"bad address literal {text!r}") from None


def parse_address(text: str, fold_case: bool = True) -> Address:
    """Parse ``local@domain`` (no angle brackets) into an `Address`.

    The local part may be quoted; ``"alice"@x`` and ``alice@x`` are the same
    mailbox (RFC 5321 4.1.2 asks for the unquoted form where possible).
    Local parts are case-folded (SPEC section 3: they match
    case-insensitively); domains become IDNA A-labels.  Address literals are
    parsed but are never one of our domains.  ``fold_case=False`` keeps the
    local part as written: a sender's local part belongs to its own domain
    (RFC 5321 2.4), and SPF macros and bounces must see it unchanged.
    """
    if not isinstance(text, str):
        raise AddressError(f"expected text, got {type(text).__name__}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise AddressError("control character (CR, LF, NUL, ...) in address")
    if not text:
        raise AddressError("empty address")
    if text.startswith('"'):
        local, end = _parse_quoted(text)
        wire_local, rest = text[:end], text[end:]
        if not rest.startswith("@"):
            raise AddressError("expected '@' after the quoted local part")
        domain_text = rest[1:]
    else:
        wire_local, at, domain_text = text.rpartition("@")
        if not at:
            raise AddressError(f"no '@' in {text!r}")
        if not wire_local:
            raise AddressError("empty local part")
        if not wire_local.isascii():
            raise AddressError("local part must be ASCII (SMTPUTF8 is not supported)")
        if not is_dot_atom(wire_local):
            raise AddressError(f"bad local part {wire_local!r}")
        local = wire_local
    if not local:
        raise AddressError("empty local part")
    if len(wire_local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")
    if not domain_text:
        raise AddressError("empty domain")
    if domain_text.startswith("[") and domain_text.endswith("]"):
        domain = _parse_literal(domain_text)
    else:
        domain = normalize_domain(domain_text)
    return Address(local.lower() if fold_case else local, domain)


def split_subaddress(local: str, delimiters: str | None) -> tuple[str, str]:
    """Split ``alice+news`` into (``alice``, ``+news``).

    Each character of delimiters is a delimiter and the first one found
    splits, as Postfix's recipient_delimiter does.  A delimiter in first
    position does not split: the base would be empty.
    """
    if delimiters:
        for i, c in enumerate(local):
            if c in delimiters and i > 0:
                return local[:i], local[i:]
    return local, ""
