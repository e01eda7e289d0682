# -*- test-case-name: tests.test_dkim -*-
"""DKIM (RFC 6376, RFC 8463) verification of every signature, one by one.

dkimpy parses signatures and canonicalizes and hashes the header fields;
`mailx.checks.bodyhash` hashes the body, once for all signatures and
streaming from the spool (dkimpy would copy the whole body into memory and
hash it again for each signature); this module decides what each outcome
means.  A signature whose ``bh=`` does not match fails before its key is
looked up or any public-key work is done.

dkimpy's own key handling is bypassed because it cannot tell the outcomes
apart that RFC 8601 reports differently: a DNS timeout becomes a
plain ``False`` (we need temperror), a missing or revoked key is a logged
error, and Ed25519 needs PyNaCl.  So `_Verifier` fetches the key through
our resolver, classifies it, and verifies Ed25519 (RFC 8463) with
``cryptography``, which mailx already depends on.

dkimpy's own parsing is bypassed too where it is not linear in a stranger's
bytes, and its regular expressions hold the GIL, so one message would stall
every session: `rfc822_parse` grows a folded field one line at a time
(``bytes +=``: 17 s for a 996 KiB field), the ``h=`` split
(``\\s*:\\s*``), the ``b=`` check and the ``b=`` removal before hashing
(``RE_BTAG``) backtrack quadratically over runs of white space (24 KB: 8 s),
and its header selection scans every field for each name in ``h=``.
`_Verifier` replaces each with a linear equivalent that gives the same
result; tests.test_dkim compares them with dkimpy's on many inputs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypedDict

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import (
    HASH_ALGORITHMS,
    DigestTooLargeError,
    RSASSA_PKCS1_v1_5_verify,
    UnparsableKeyError,
    parse_public_key,
)
from dkim.util import InvalidTagValueList, parse_tag_value

from mailx import headers as header_syntax
from mailx.checks.bodyhash import BodyHashes, BodyHashKey, body_hashes
from mailx.dns import DNSTemporaryError, DNSVoidError, Resolver

__all__ = ["DKIM_RESULTS", "DKIMResult", "MAX_REPORTED", "MAX_SIGNATURES", "verify_dkim"]

# RFC 8601 2.7.1.
DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
# RFC 6376 6.1: verifiers MAY limit the signatures they try, or a message
# with a thousand signatures costs a thousand DNS lookups and body hashes.
# OpenDKIM verifies 3 by default (MaximumSignaturesToVerify); real mail
# carries one to three (author, ESP, mailing list): 5 leaves room for that.
MAX_SIGNATURES = 5
# Signatures reported at all, one Authentication-Results entry each: a 1 MiB
# header holds 20 000 tiny ones, and their header.b prefixes are compared
# with each other.  The last one reported says how many more there were.
MAX_REPORTED = 2 * MAX_SIGNATURES
# Characters kept of b= (header.b shows a prefix, RFC 6008; a 16384-bit RSA
# signature is 2731) and of a reason quoting a library's error, which may
# quote a tag value of any size.
MAX_B = 4096
MAX_REASON = 200
# RFC 8301 3.2: RSA keys shorter than 1024 bits MUST NOT be considered valid.
MIN_RSA_BITS = 1024


@dataclass(frozen=True)
class DKIMResult:
    """The verdict on one DKIM-Signature header field."""

    result: str  # pass, fail, policy, neutral, temperror, permerror
    domain: str | None  # d=, lower case
    selector: str | None  # s=
    algorithm: str | None  # a=
    b: str | None  # b= without whitespace; header.b shows a prefix (RFC 6008)
    reason: str
    identity: str | None = None  # i=
    body_length: int | None = None  # l=: only that many body octets are signed
    unsigned_octets: int = 0  # canonical body octets after l=, not covered

    @property
    def passed(self) -> bool:
        return self.result == "pass"


class _Outcome(Exception):
    """A verdict reached before the signature itself is checked."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class _Verifier(dkim.DKIM):
    """dkimpy's DKIM with our key lookup, RFC 8463 Ed25519, and linear parsing."""

    def __init__(self, header: bytes, resolver: Resolver) -> None:
        # The header section only: the body is hashed by `body_hashes`.
        super().__init__(header, minkey=MIN_RSA_BITS)
        self._resolver = resolver
        self.body_hashes: BodyHashes | None = None

    def set_message(self, message: bytes | None) -> None:
        """dkimpy's, with `_header_fields` for its quadratic `rfc822_parse`."""
        super().set_message(None)  # resets what the last verification left
        self.headers = _header_fields(message or b"")
        self.body = b""
        self._by_name: dict[bytes, list[int]] | None = None

    def verify_headerprep(self, idx: int = 0):  # noqa: ANN201
        """dkimpy's, without its two backtracking regular expressions.

        ``re.split(rb"\\s*:\\s*", h)`` and ``re.match(rb"[\\s...]+[\\s=]*$", b)``
        are quadratic over a run of white space (40 KB: 5 s and 18 s); the
        ``h=`` split here and `_base64_ok` give the same answers linearly.
        """
        sigheaders = [(x, y) for x, y in self.headers if x.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        try:
            sig = parse_tag_value(sigheaders[idx][1])
            self.signature_fields = sig
        except InvalidTagValueList as e:
            raise dkim.MessageFormatError(e) from None
        if b"b" in sig and not _base64_ok(sig[b"b"]):
            raise dkim.ValidationError("b= value is not valid base64")
        dkim.validate_signature_fields(sig)
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        # parse_tag_value stripped the value, so stripping each name is
        # what splitting at "\\s*:\\s*" does.
        include_headers = [x.strip().lower() for x in sig[b"h"].split(b":")]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders

    def _select(self, include_headers: list[bytes]) -> list[tuple[bytes, bytes]]:
        """dkimpy's `select_headers` (RFC 6376 5.4.2: the last unused instance
        of each name in ``h=``, from the bottom up), through an index by name:
        dkimpy scans every field for each name, fields times names in all."""
        if self._by_name is None:
            self._by_name = {}
            for i, (name, _) in enumerate(self.headers):
                self._by_name.setdefault(name.lower(), []).append(i)
        left: dict[bytes, int] = {}
        selected = []
        for name in include_headers:
            at = self._by_name.get(name, ())
            n = left.get(name, len(at))
            if n > 0:
                n -= 1
                selected.append(self.headers[at[n]])
            left[name] = n
        return selected

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):  # noqa: ANN001, ANN201
        # The body hash first: a mismatch costs neither DNS nor public-key work.
        key = _body_hash_key(sig)
        if key is None or self.body_hashes is None or key not in self.body_hashes.digests:
            raise dkim.ValidationError("signature tags are not usable")
        if self.body_hashes.truncated and (
            key.length is None or key.length > self.body_hashes.canonical_length[key.relaxed]
        ):
            raise _Outcome("policy", "body larger than mailx verifies")
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (binascii.Error, ValueError):
            raise dkim.MessageFormatError("bh= is not valid base64") from None
        if self.body_hashes.digests[key] != expected:
            raise dkim.ValidationError("body hash mismatch")
        self.pk, self.keysize, self.ktag = self._load_key(sig)
        self.seqtlsrpt = False
        # Without bh= dkimpy checks only the header hash and signature.
        unhashed = {k: v for k, v in sig.items() if k != b"bh"}
        return self.verify_sig_process(unhashed, include_headers, sig_header, dnsfunc)

    def _load_key(self, sig: dict[bytes, bytes]) -> tuple[object, int, bytes]:
        """Fetch and check the key record (RFC 6376 3.6.1, 6.1.2)."""
        name = f"{_text(sig[b's'])}._domainkey.{_text(sig[b'd'])}"
        try:
            records = self._resolver.txt_bytes(name)
        except DNSVoidError:
            raise _Outcome("permerror", f"no key for signature at {name}") from None
        except DNSTemporaryError as e:
            raise _Outcome("temperror", f"key lookup failed: {e}") from None
        tags = None
        for record in records:
            try:
                candidate = parse_tag_value(record)
            except InvalidTagValueList:
                continue
            if b"p" in candidate:
                tags = candidate
                break
        if tags is None:
            raise _Outcome("permerror", f"no valid key record at {name}")
        if tags.get(b"v", b"DKIM1") != b"DKIM1":
            raise _Outcome("permerror", "key record has an unknown version")
        p = re.sub(rb"\s+", b"", tags[b"p"])
        if not p:
            # RFC 6376 3.6.1: "An empty value means that this public key
            # has been revoked."
            raise _Outcome("fail", "key revoked")
        ktype = tags.get(b"k", b"rsa").lower()
        algorithm = sig[b"a"].lower()
        if not algorithm.startswith(ktype + b"-"):
            raise _Outcome(
                "permerror", f"key type {_text(ktype)} does not match a={_text(algorithm)}"
            )
        hashes = tags.get(b"h")
        if hashes is not None:
            allowed = {h.strip().lower() for h in hashes.split(b":")}
            if algorithm.split(b"-", 1)[1] not in allowed:
                raise _Outcome("permerror", "key does not allow the signature's hash")
        services = tags.get(b"s")
        if services is not None:
            kinds = {s.strip().lower() for s in services.split(b":")}
            if not kinds & {b"*", b"email"}:
                raise _Outcome("permerror", "key is not for email")
        flags = {f.strip().lower() for f in tags.get(b"t", b"").split(b":")}
        if b"s" in flags and b"i" in sig:
            # RFC 6376 3.6.1 t=s: i= must not be a subdomain of d=.
            if sig[b"i"].rpartition(b"@")[2].lower() != sig[b"d"].lower():
                raise _Outcome("permerror", "i= is a subdomain of d= but the key forbids it")
        try:
            raw = base64.b64decode(p, validate=True)
        except (binascii.Error, ValueError):
            raise _Outcome("permerror", "key is not valid base64") from None
        if ktype == b"ed25519":
            if len(raw) != 32:
                raise _Outcome("permerror", "Ed25519 key is not 32 octets (RFC 8463 4.2)")
            return Ed25519PublicKey.from_public_bytes(raw), 256, b"ed25519"
        if ktype != b"rsa":
            raise _Outcome("permerror", f"unknown key type k={_text(ktype)}")
        try:
            key = parse_public_key(raw)
        except (UnparsableKeyError, TypeError, ValueError, IndexError):
            raise _Outcome("permerror", "RSA key cannot be parsed") from None
        bits = key["modulus"].bit_length()
        if bits < MIN_RSA_BITS:
            raise _Outcome("policy", f"RSA key of {bits} bits is too short (RFC 8301 3.2)")
        return key, bits, b"rsa"

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):  # noqa: ANN001, ANN201, ARG002
        """dkimpy's header hash and signature check (RFC 6376 3.7), linear: our
        `_select` and `_B_TAG`; and Ed25519 (RFC 8463 3) with ``cryptography``.
        The body hash was compared in `verify_sig`."""
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
        hasher = HASH_ALGORITHMS[sig[b"a"]]
        if b"from" in include_headers:
            include_headers.append(b"from")  # as dkimpy: extra From fields break it
        h = dkim.HashThrough(hasher())
        # Canonicalizing field by field, only the selected ones need it.
        signed = canon.canonicalize_headers(self._select(include_headers))
        self.signed_headers = signed
        name, value = canon.canonicalize_headers(
            [(sig_header[0], _B_TAG.sub(rb"\1", sig_header[1]))]
        )[0]
        # RFC 6376 3.7: the signature field is hashed without its final CRLF
        # (dkimpy strips any trailing white space).
        for x, y in [*signed, (name, value.rstrip())]:
            h.update(x)
            h.update(b":")
            h.update(y)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        if self.ktag == b"ed25519":
            try:
                self.pk.verify(signature, h.digest())
            except InvalidSignature:
                return False
            return True
        try:
            ok = RSASSA_PKCS1_v1_5_verify(h, signature, self.pk)
        except (TypeError, DigestTooLargeError) as e:
            raise dkim.KeyFormatError(f"digest too large for modulus: {e}") from None
        if ok and self.keysize < self.minkey:
            raise dkim.KeyFormatError(f"public key too small: {self.keysize}")
        return ok


# dkimpy's rfc822_parse, linearly: lines end at CRLF or LF, the header section
# at the first empty line; a field name is printable ASCII up to the colon.
_LINE_END = re.compile(rb"\r?\n")
_NEXT_FIELD = re.compile(rb"\r\n(?=[^ \t])")
_DKIMPY_NAME = re.compile(rb"([\x21-\x7e]+?):")
# dkimpy's RE_BTAG (the b= value, emptied before hashing the signature field)
# with each FWS, ``(?:(?:\s*\r?\n)?\s+)?``, as ``\s*``: the same strings (\s
# takes CR and LF), and the same match, since every FWS here lies between
# fixed characters that are not white space; but no backtracking among the
# ways to split a run of white space between its two parts (24 KB: 8 s).
_B_TAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")
_BASE64_HEAD = re.compile(rb"[\s0-9A-Za-z+/]+")
_BASE64_TAIL = re.compile(rb"[\s=]*")


def _header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs dkimpy's `rfc822_parse` makes of a header section.

    The same pairs and the same `dkim.MessageFormatError`, in linear time:
    one substitution for the line ends, one search for the field starts,
    one slice per field (dkimpy's ``+=`` per continuation line is quadratic,
    and its IndexError for a continuation line before any field is an error
    here too).  Values keep their folding, each line ending in CRLF.
    """
    text = _LINE_END.sub(b"\r\n", header)
    if not text or text.startswith(b"\r\n"):
        return []
    end = text.find(b"\r\n\r\n")
    if end >= 0:
        text = text[: end + 2]
    elif not text.endswith(b"\r\n"):
        text += b"\r\n"
    starts = [0, *(m.end() for m in _NEXT_FIELD.finditer(text))]
    fields: list[tuple[bytes, list[bytes]]] = []
    for start, stop in zip(starts, [*starts[1:], len(text)], strict=True):
        piece = text[start:stop]
        m = _DKIMPY_NAME.match(piece)
        if piece[:1] in (b" ", b"\t"):
            rest = piece  # only the first piece: a continuation line with no field
        elif m is not None:
            fields.append((m.group(1), [piece[m.end() :]]))
            continue
        elif piece.startswith(b"From "):
            # An mbox "From " line is skipped; dkimpy adds its continuation
            # lines to the field before it.
            rest = piece[piece.index(b"\r\n") + 2 :]
        else:
            line = piece[: piece.index(b"\r\n")]
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line[:40]!r}")
        if rest:
            if not fields:
                raise dkim.MessageFormatError("continuation line before any header field")
            fields[-1][1].append(rest)
    return [(name, b"".join(parts)) for name, parts in fields]


def _base64_ok(value: bytes) -> bool:
    """dkimpy's ``re.match(rb"[\\s0-9A-Za-z+/]+[\\s=]*$", value)``: the longest
    prefix of the first class leaves a rest of the second class exactly when
    some split does, so no split needs trying."""
    m = _BASE64_HEAD.match(value)
    return m is not None and _BASE64_TAIL.fullmatch(value, m.end()) is not None


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace")


class _Described(TypedDict):
    """A signature's own tags, as DKIMResult fields."""

    domain: str | None
    selector: str | None
    algorithm: str | None
    b: str | None
    identity: str | None
    body_length: int | None


def _describe(value: bytes) -> _Described:
    """What can be reported of a signature even when it is malformed."""
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList:
        tags = {}
    length = tags.get(b"l")
    return {
        "domain": _text(tags[b"d"]).strip().rstrip(".").lower() if b"d" in tags else None,
        "selector": _text(tags[b"s"]).strip() if b"s" in tags else None,
        "algorithm": _text(tags[b"a"]).strip().lower() if b"a" in tags else None,
        "b": _text(re.sub(rb"\s+", b"", tags[b"b"])[:MAX_B]) if b"b" in tags else None,
        "identity": _text(tags[b"i"]).strip() if b"i" in tags else None,
        "body_length": int(length) if length is not None and length.isdigit() else None,
    }


def _body_hash_key(sig: dict[bytes, bytes]) -> BodyHashKey | None:
    """The body hash a signature's tags call for; None when they are unusable."""
    try:
        canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return None
    algorithm = sig.get(b"a", b"").strip().lower()
    if algorithm not in HASH_ALGORITHMS or b"bh" not in sig:
        return None
    length = sig.get(b"l")
    if length is not None and not re.fullmatch(rb"\d{1,76}", length.strip()):
        return None  # RFC 6376 3.5: l= is at most 76 decimal digits
    return BodyHashKey(
        relaxed=canon.body_algorithm.name == b"relaxed",
        hash=algorithm.rpartition(b"-")[2].decode("ascii"),
        length=None if length is None else int(length),
    )


def _unsigned_octets(verifier: _Verifier, sig: dict[bytes, bytes]) -> int:
    """Canonical body octets beyond l= (RFC 6376 8.2: content could be appended)."""
    key = _body_hash_key(sig)
    if key is None or key.length is None or verifier.body_hashes is None:
        return 0
    return max(0, verifier.body_hashes.canonical_length.get(key.relaxed, 0) - key.length)


def _split(message: bytes) -> tuple[bytes, bytes]:
    """Header section (with its empty line) and body of a whole message."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 4], message[end + 4 :]


def verify_dkim(
    resolver: Resolver,
    message: bytes,
    body: Callable[[], Iterable[bytes]] | None = None,
    *,
    max_body: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[DKIMResult, ...]:
    """Verify each DKIM-Signature of ``message``, topmost first.

    ``message`` is the header section and its empty line; ``body()`` gives
    the body in chunks (a `mailx.inbound.spool.SpoolBuffer`'s ``chunks``).  Without
    ``body``, ``message`` is the whole message.  At most ``max_body`` octets
    of body are hashed.  An empty tuple means the message is unsigned
    (dkim=none).  Blocks on DNS: call from a worker thread.  Once ``stop()``
    is true the body hash ends with `mailx.checks.bodyhash.BodyHashStopped`.
    """
    if body is None:
        message, rest = _split(message)
        body = lambda: (rest,)  # noqa: E731
    if not header_syntax.has_field(header_syntax.header_section(message), b"dkim-signature"):
        # Unsigned (most mail): nothing to parse.  A search at C speed, where
        # splitting a megabyte of header into fields costs a Python loop.
        return ()
    header = message if message.endswith(b"\r\n\r\n") else message.rstrip(b"\r\n") + b"\r\n\r\n"
    try:
        verifier = _Verifier(header, resolver)
    except dkim.MessageFormatError as e:
        # Headers dkimpy cannot split: report any signature it would see.
        if re.search(rb"(?im)^dkim-signature\s*:", header):
            return (
                DKIMResult("permerror", None, None, None, None, f"message cannot be parsed: {e}"),
            )
        return ()
    fields = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    if not fields:
        return ()
    keys = set()
    for value in fields[:MAX_SIGNATURES]:
        try:
            key = _body_hash_key(parse_tag_value(value))
        except InvalidTagValueList:
            key = None
        if key is not None:
            keys.add(key)
    verifier.body_hashes = body_hashes(body(), keys, max_body, stop)
    results = []
    for index, value in enumerate(fields[:MAX_REPORTED]):
        about = _describe(value)
        if index >= MAX_SIGNATURES:
            reason = f"not verified: over {MAX_SIGNATURES} signatures"
            if index == MAX_REPORTED - 1 and len(fields) > MAX_REPORTED:
                reason += f"; {len(fields) - MAX_REPORTED} more not reported"
            results.append(DKIMResult("policy", reason=reason, **about))
            continue
        results.append(_verify_one(verifier, index, about))
    return tuple(results)


def _verify_one(verifier: _Verifier, index: int, about: _Described) -> DKIMResult:
    unsigned = 0
    try:
        ok = verifier.verify(idx=index, dnsfunc=verifier._resolver.dkim_dnsfunc)
        unsigned = _unsigned_octets(verifier, verifier.signature_fields)
        if ok:
            result, reason = "pass", "signature verified"
            if unsigned:
                reason += f"; l= leaves {unsigned} body octets unsigned"
        else:
            result, reason = "fail", "signature did not verify"
    except _Outcome as o:
        result, reason = o.result, o.reason
    except dkim.ValidationError as e:
        text = str(e)
        if text.startswith("body hash mismatch"):
            result, reason = "fail", "body hash did not verify"
        elif "x= value is past" in text:
            result, reason = "permerror", "signature expired"  # RFC 6376 3.5 x=
        else:
            result, reason = "permerror", f"invalid signature: {text}"
    except dkim.KeyFormatError as e:
        result, reason = "policy", f"key not acceptable: {e}"
    except dkim.DKIMException as e:
        result, reason = "permerror", f"invalid signature: {e}"
    except (ValueError, TypeError, IndexError, KeyError) as e:
        # dkimpy on hostile input (l= beyond int range, odd bytes) may raise
        # plain errors; a malformed signature is the sender's problem.
        result, reason = "permerror", f"invalid signature: {type(e).__name__}: {e}"
    if result == "pass" and (about.get("algorithm") or "") == "rsa-sha1":
        # RFC 8301 3.1: verifiers MUST NOT consider rsa-sha1 signatures valid.
        result, reason = "policy", "rsa-sha1 is not accepted (RFC 8301)"
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3] + "..."
    return DKIMResult(result=result, reason=reason, unsigned_octets=unsigned, **about)
