# -*- test-case-name: tests.test_auth_results -*-
"""The Authentication-Results header field (RFC 8601), in and out.

Out: `build_header` renders our verdicts with authres and folds the line
to 78 columns (RFC 5322 2.1.1), which authres does not do.  In:
`is_forged_results` recognises a field that claims our authserv-id, so the
SMTP layer can drop it before delivery (RFC 8601 5), and
`strip_forged_results` does that for a whole message in memory.

Everything that came from the sender (addresses, d=, s=, reasons quoting
them) is reduced to printable ASCII and escaped, so no message can end
our header early or smuggle a second one in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import authres
import authres.dmarc

from mailx import headers

if TYPE_CHECKING:
    # Types only: every session strips forged fields (is_forged_results),
    # and a server with the checks off needs no dkimpy, pyspf or PSL for it.
    from mailx.checks.dkim import DKIMResult
    from mailx.checks.dmarc import DMARCResult
    from mailx.checks.spf import SPFResult

__all__ = [
    "FIELD",
    "authserv_id_of",
    "build_header",
    "fold",
    "header_b",
    "is_forged_results",
    "strip_forged_results",
]

FIELD = "Authentication-Results"
WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be no more than 78 characters
HEADER_B_MIN = 8  # RFC 6008 4: at least 8 characters of b=, more if not unique
# A reverse-path safe to show whole: a dot-atom local part.  A quoted one
# (RFC 5321 allows "; dkim=pass; dmarc=pass"@evil.test) is left out for the
# domain alone (RFC 8601 2.7.2): parsers that split at ";" would read it.
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9.-]+")
# RFC 8601 2.7.2 smtp.helo, and the names in our comments: LDH and dots only.
_NAME = re.compile(r"[A-Za-z0-9.-]+")
# Our words for each SPF result (RFC 7208 2.6); the sender's text never
# enters a comment (the reason names the whole MAIL FROM address).
_SPF_COMMENT = {
    "pass": "{ip} is permitted to send for {domain}",
    "fail": "{ip} is not permitted to send for {domain}",
    "softfail": "{ip} is not permitted to send for {domain}",
    "neutral": "{domain} neither permits nor denies {ip}",
    "none": "no SPF record for {domain}",
    "temperror": "temporary DNS error",
    "permerror": "permanent error in the SPF policy of {domain}",
}


def _printable(text: str) -> str:
    """Printable ASCII only: CR, LF and the like cannot reach the header."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _value(text: str) -> str:
    """A property value from sender text: letters, digits and ``.@_+-`` only, so
    no quote, ";" or "=" (nothing a reader could take for another result)."""
    return re.sub(r"[^A-Za-z0-9.@_+-]", "_", text) or "_"


def _reason(text: str) -> str:
    """A reason= value: our sentence, maybe quoting a library's error text.  No ";"
    or "=" either, though quoted: a naive reader splitting the field at ";"
    or matching "dmarc=pass" must not find results in it."""
    text = _printable(text).replace("\\", "/").replace('"', "'")
    return text.replace(";", ",").replace("=", ":")


def _spf_comment(spf: SPFResult) -> str | None:
    """The comment on spf=: generated from the result, the client address and the
    checked domain (when it is a plain domain name), nothing the sender wrote."""
    template = _SPF_COMMENT.get(spf.result)
    if template is None:
        return None
    domain = spf.domain if spf.domain and _NAME.fullmatch(spf.domain) else "the sender"
    ip = spf.client_ip if re.fullmatch(r"[0-9A-Fa-f.:]+", spf.client_ip or "") else "client"
    return template.format(ip=ip, domain=domain)


def header_b(signature_b: str, others: Sequence[str]) -> str:
    """The shortest prefix of b=, at least 8 characters, that no other signature
    of the message shares (RFC 6008 4)."""
    n = HEADER_B_MIN
    while n < len(signature_b) and any(
        o != signature_b and o[:n] == signature_b[:n] for o in others
    ):
        n += 1
    return signature_b[:n]


def _spf(spf: SPFResult) -> authres.SPFAuthenticationResult:
    comment = _spf_comment(spf)
    if spf.identity == "helo":
        helo = spf.helo if spf.helo and _NAME.fullmatch(spf.helo) else _value(spf.helo or "")
        return authres.SPFAuthenticationResult(
            result=spf.result, result_comment=comment, smtp_helo=helo
        )
    # RFC 8601 2.7.2: the domain alone will do when the address would not.
    sender = spf.sender if _ADDRESS.fullmatch(spf.sender) else _value(spf.domain)
    return authres.SPFAuthenticationResult(
        result=spf.result, result_comment=comment, smtp_mailfrom=sender
    )


def _dkim(results: Sequence[DKIMResult]) -> list[authres.DKIMAuthenticationResult]:
    if not results:
        return [authres.DKIMAuthenticationResult(result="none")]
    all_b = [r.b for r in results if r.b]
    out = []
    for r in results:
        properties = []
        if r.b:
            # RFC 6008: base64 of the sender's b=; its "=" padding never matters
            # in a prefix, and without it no "x=y" can be spelled here.
            b = re.sub(r"[^A-Za-z0-9+/]", "", header_b(r.b, all_b))
            if b:
                properties.append(authres.AuthenticationResultProperty("header", "b", b))
        out.append(
            authres.DKIMAuthenticationResult(
                result=r.result,
                reason=None if r.passed else _reason(r.reason),
                header_d=_value(r.domain) if r.domain else None,
                header_s=_value(r.selector) if r.selector else None,
                properties=properties,
            )
        )
    return out


def _dmarc(dmarc: DMARCResult, enforced: bool) -> authres.dmarc.DMARCAuthenticationResult:
    comment = None
    if dmarc.record is not None:
        rec = dmarc.record
        parts = [f"p={rec.p}"]
        if rec.sp:
            parts.append(f"sp={rec.sp}")
        if rec.pct != 100:
            parts.append(f"pct={rec.pct}")
        if not enforced and dmarc.disposition != "none":
            parts.append("not enforced")
        comment = " ".join(parts)
    return authres.dmarc.DMARCAuthenticationResult(
        result=dmarc.result,
        result_comment=comment,
        reason=None if dmarc.passed else _reason(dmarc.reason),
        header_from=_value(dmarc.from_domain) if dmarc.from_domain else None,
        policy=dmarc.disposition if dmarc.record is not None else None,
    )


def build_header(
    authserv_id: str,
    spf: SPFResult | None,
    dkim: Sequence[DKIMResult] | None,
    dmarc: DMARCResult | None,
    *,
    enforced: bool = True,
) -> str:
    """The folded ``Authentication-Results:`` field, without the final CRLF.

    A method that was not evaluated (switched off: None) is left out;
    RFC 8601 2.2 "none" if nothing was.  ``enforced`` False (monitor mode)
    notes in the DMARC comment that a disposition was not carried out.
    """
    results: list[object] = []
    if spf is not None:
        results.append(_spf(spf))
    if dkim is not None:
        results.extend(_dkim(dkim))
    if dmarc is not None:
        results.append(_dmarc(dmarc, enforced))
    authserv = _value(authserv_id)
    if not results:
        return fold(f"{FIELD}: {authserv}; none")
    return fold(f"{FIELD}: {authserv}", [str(r) for r in results])


def _tokens(text: str) -> list[str]:
    """Split at spaces that are not inside a quoted string (where folding
    would change the value); spaces inside comments may fold."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == " " and not quoted:
            if current:
                tokens.append("".join(current))
            current = []
            continue
        current.append(c)
    if current:
        tokens.append("".join(current))
    return tokens


def fold(head: str, resinfos: Sequence[str] = (), width: int = WIDTH) -> str:
    """``head``, then each resinfo on its own line, lines of at most ``width``.

    Continuation lines start with a TAB (CRLF TAB); a token longer than a
    line (a very long address) stands alone on an overlong line rather
    than being cut.
    """
    if not resinfos:
        return head
    lines = [head + ";"]
    for i, resinfo in enumerate(resinfos):
        tokens = _tokens(resinfo)
        if i < len(resinfos) - 1:
            tokens[-1] += ";"
        line = "\t" + tokens[0]
        for token in tokens[1:]:
            if len(line) + 1 + len(token) <= width:
                line += " " + token
            else:
                lines.append(line)
                line = "\t" + token
        lines.append(line)
    return "\r\n".join(lines)


def _skip_cfws(text: str, i: int) -> int:
    """Past whitespace and (nested, escaped) comments from position ``i``."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth and c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id_of(value: str | bytes) -> str | None:
    """The authserv-id of an Authentication-Results value, lower case.

    Accepts the value or the whole field; comments, folding, a quoted-
    string id and a version ("mx.example 1;") are handled (RFC 8601 2.2).
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    m = re.match(r"\s*authentication-results\s*:", value, re.IGNORECASE)
    if m:
        value = value[m.end() :]
    i = _skip_cfws(value, 0)
    if i < len(value) and value[i] == '"':
        out, i = [], i + 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\" and i + 1 < len(value):
                i += 1
            out.append(value[i])
            i += 1
        ident = "".join(out)
    else:
        m = re.match(r"[^\s;()\"]+", value[i:])
        ident = m.group(0) if m else ""
    ident = ident.strip().rstrip(".").lower()
    return ident or None


def is_forged_results(header_value: str | bytes, authserv_id: str) -> bool:
    """Does this incoming field claim to come from us (RFC 8601 5)?"""
    return authserv_id_of(header_value) == authserv_id.strip().rstrip(".").lower()


def strip_forged_results(message: bytes, authserv_id: str) -> bytes:
    """``message`` without the Authentication-Results fields claiming our id.

    Only the header section is touched; line endings are kept as found.
    """
    header = headers.header_section(message)
    rest = message[len(header) :]
    kept = [
        f
        for f in headers.split_fields(header)
        if not (
            headers.field_name(f) == b"authentication-results"
            and is_forged_results(headers.field_value(f), authserv_id)
        )
    ]
    return b"".join(kept) + rest
