# -*- test-case-name: tests.test_srs -*-
"""The Sender Rewriting Scheme, on srslib, with its weaknesses closed.

A forwarded message keeps its sender's domain in the envelope only at the
price of failing SPF at the destination; SRS rewrites the envelope sender to
an address at one of our domains that encodes the original (``SRS0=HHHHHH=
TT=sender.example=alice@example.test``), signed so that only we can mint
addresses that we will forward back.  Bounces then come to us and are sent on
to the original sender.

srslib does the encoding (it follows libsrs2 and the Guarded scheme), but
its ``check_hash`` compares only as many characters as the address carries,
so a one-character hash passes about one time in 35 (research notes 8), and
compares in variable time.  `SRS` below overrides the check:

- the hash must be at least `HASH_LENGTH` characters, and is compared in
  constant time (`hmac.compare_digest`) against every secret;
- case is folded before comparing, as libsrs2 does: local parts are
  case-insensitive in practice (we fold them ourselves, ``routing``), so a
  base64 hash carries about 5.25 bits a character, not 6;
- several secrets: the first signs, all verify (rotation without losing the
  bounces of mail forwarded under the old one);
- the fields are hashed with a NUL between them: srslib's bare
  concatenation lets ``host=co, local=mvictim`` and ``host=com,
  local=victim`` share a hash.  Addresses minted with the old input still
  reverse while their timestamp is valid (21 days), so an upgrade loses no
  bounce; only the new form is minted;
- the clock is injectable for tests.

`HASH_LENGTH` is 6, not srslib's 4: 38^6, about 3e9 guesses for one
forgery instead of 2e6, for two more characters in a local part.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import srslib

from mailx.address import AddressError, normalize_domain, parse_address, quote_local
from mailx.inbound.routing import ForwardDestination, Route
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError

if TYPE_CHECKING:
    from mailx.config import Config

__all__ = ["HASH_LENGTH", "SRS", "SRSError", "is_srs", "srs_route"]

HASH_LENGTH = 6
# libsrs2 and postsrsd: a rewritten address can be reversed for 21 days,
# far longer than any queue keeps a message (RFC 5321 4.5.4.1: 4-5 days).
VALIDITY_DAYS = 21

# "SRS0" or "SRS1" and a separator (the Guarded scheme accepts = + -).
_SRS_LOCAL = re.compile(r"\Asrs[01][-+=]", re.IGNORECASE)


class SRSError(ValueError):
    """An SRS address we did not make, made too long ago, or malformed."""


def is_srs(address: str) -> bool:
    """True when the local part of ``address`` claims to be SRS0 or SRS1."""
    return bool(_SRS_LOCAL.match(address))


class _Guarded(srslib.SRS):
    """srslib with the hash input and check replaced (see the module docstring).

    srslib hashes ``ts + host + local`` (SRS0) and ``host + opaque`` (SRS1)
    with nothing between the fields, so a genuine ``…=victim.co=mvictim@`` and
    ``…=victim.com=victim@`` share a hash, and a bounce can be redirected to a
    domain of the attacker's choosing.  srslib has no hook for the hash input
    (it concatenates inside ``generate_srs0_address``), so the minting and
    the reversal are done here, on srslib's own regexes and timestamps.
    """

    def generate_srs0_address(self, orig_host: str, orig_local_part: str, alias_host: str) -> str:
        ts = self.generate_ts()
        h = _bound_hash(self._secret, self._hash_length, ts, orig_host, orig_local_part)
        return f"SRS0={h}={ts}={orig_host}={orig_local_part}@{alias_host}"

    def generate_srs1_address(
        self, first_hop_host: str, first_hop_local_part: str, alias_host: str
    ) -> str:
        h = _bound_hash(self._secret, self._hash_length, first_hop_host, first_hop_local_part)
        return f"SRS1={h}={first_hop_host}={first_hop_local_part}@{alias_host}"

    def reverse(self, srs_addr: str) -> str:
        local, host = self._split_addr(srs_addr)
        m = self._SRS1.match(local)
        if m:
            # The opaque part is the first hop's SRS0 tail, whose timestamp
            # bounds how long a legacy (unseparated) hash is honoured.
            inner = _OPAQUE_TS.match(m[3])
            legacy_ok = inner is not None and self._ts_valid(inner[1])
            self._check(m[1], (m[2], m[3]), legacy_ok, srs_addr)
            return f"SRS0{m[3]}@{m[2]}"
        m = self._SRS0.match(local)
        if m:
            self.check_ts(m[2], srs_addr)  # first: a legacy hash is only honoured in the window
            self._check(m[1], (m[2], m[3], m[4]), True, srs_addr)
            return f"{m[4]}@{m[3]}"
        raise srslib.InvalidAddressError(f"unrecognized SRS address {srs_addr!r}")

    def _ts_valid(self, ts: str) -> bool:
        try:
            self.check_ts(ts, "")
        except srslib.InvalidTimestampError:
            return False
        return True

    def _check(self, h: str, fields: tuple[str, ...], legacy_ok: bool, addr: str) -> None:
        """The hash against every secret, in the bound form, and in srslib's
        unseparated form for addresses minted before (``legacy_ok``: their
        timestamp is still valid, so the old form dies out with them)."""
        if len(h) < self._hash_length:
            raise srslib.InvalidHashError(f"hash too short in SRS address {addr!r}")
        given = h.lower().encode("ascii", "replace")
        ok = False
        for secret in [self._secret, *self._prev_secrets]:
            candidates = [_bound_hash(secret, len(h), *fields)]
            if legacy_ok:
                candidates.append(self.generate_hash("".join(fields), secret, len(h)))
            for expected in candidates:
                # No short-circuit: the time taken does not depend on which one matched.
                ok |= hmac.compare_digest(given, expected.lower().encode("ascii"))
        if not ok:
            raise srslib.InvalidHashError(f"invalid hash in SRS address {addr!r}")


# An SRS1 opaque part: the first hop's "=HHH=TT=host=local" (Guarded scheme).
_OPAQUE_TS = re.compile(r"\A[-+=][^=]+=([^=]{2})=")


def _bound_hash(secret: bytes, length: int, *fields: str) -> str:
    """HMAC-SHA1 (as srslib and libsrs2) over the lower-cased fields joined by NUL.

    NUL cannot occur in an address we accept (``routing`` refuses control
    characters), so no two splits of the same text hash alike.
    """
    text = "\0".join(fields).lower().encode("utf-8")
    digest = hmac.new(secret, text, hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")[:length]


class SRS:
    """Forward and reverse SRS addresses with our secrets (first signs, all verify)."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        hash_length: int = HASH_LENGTH,
        validity_days: int = VALIDITY_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        if hash_length < HASH_LENGTH:
            raise ValueError(f"an SRS hash shorter than {HASH_LENGTH} characters is forgeable")
        self._srs = _Guarded(
            secrets[0],
            list(secrets[1:]),
            validity_days=validity_days,
            hash_length=hash_length,
        )
        self._srs._time_fn = clock

    def forward(self, sender: str, domain: str) -> str:
        """The envelope sender to use when forwarding mail from ``sender`` via ``domain``.

        The null sender stays null: a bounce is forwarded as a bounce and
        must never be answered (RFC 5321 4.5.5).  An SRS0 address of another
        forwarder becomes SRS1 (bounces go back through it), an SRS1 keeps
        its first hop.
        """
        if not sender:
            return ""
        try:
            return self._srs.forward(sender, domain)
        except srslib.Error as e:
            raise SRSError(str(e)) from None

    def reverse(self, address: str) -> str:
        """The address a bounce to our SRS ``address`` goes to; `SRSError` if not ours or expired.

        SRS0 gives the original sender; SRS1 the first hop's SRS0 address.
        """
        try:
            original = self._srs.reverse(address)
        except srslib.Error as e:
            raise SRSError(str(e)) from None
        return _decoded(address, original)


def _decoded(address: str, original: str) -> str:
    """The decoded address, checked; not `parse_address`, whose 64-octet local-part
    limit (RFC 5321 4.5.3.1.1) an SRS1 address of a long sender exceeds."""
    local, at, domain = original.rpartition("@")
    if not at or not local or any(not 32 <= ord(c) <= 126 for c in local):
        raise SRSError(f"SRS address {address!r} decodes to a bad address {original!r}")
    try:
        return f"{quote_local(local.lower())}@{normalize_domain(domain)}"
    except AddressError as e:
        raise SRSError(f"SRS address {address!r} decodes to a bad domain: {e}") from None


def srs_route(srs: SRS | None, config: Config, recipient: str) -> Route | None:
    """The route of a recipient that is one of our SRS addresses, or None if it is not one.

    Called before ordinary routing: an ``SRS0=``/``SRS1=`` local part at any
    of our domains is a bounce (or a reply) to mail we forwarded, and goes to
    the address it encodes.  A forged or expired one is refused at RCPT with
    550 5.7.1 (SPEC section 8): accepting and then bouncing it would make us
    a backscatter source.  Without SRS configured, such an address is an
    ordinary local part.
    """
    if srs is None:
        return None
    try:
        address = parse_address(recipient)
    except AddressError:
        return None
    # The local part, not the text: a quoted one ("SRS0=...=john smith") is an SRS address too.
    if not is_srs(address.local) or address.domain not in config.domains:
        return None
    try:
        original = srs.reverse(f"{address.local}@{address.domain}")
    except SRSError as e:
        raise SMTPReplyError(replies.SRS_FORGED) from e
    return Route(
        address,
        (ForwardDestination(original),),
        (f"{address} is an SRS address of ours → bounce to {original}",),
    )
