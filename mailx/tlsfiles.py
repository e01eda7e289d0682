# -*- test-case-name: tests.test_tls.CertificateCheckTests -*-
"""Is ``tls:``'s certificate and key a pair mailx can serve?  Said in words.

OpenSSL's own answer to a mismatched pair is
``[('x509 certificate routines', '', 'key values mismatch')]``, and it
comes only when the server builds its TLS context.  `check_pair` answers
first, with what to do about it, for the configuration loader: so
``mailxctl check``, start-up and reload refuse a bad pair with the same
line.  It uses ``cryptography`` (already a dependency) and reads the files
once; it does not verify the chain against a trust store, which is the
senders' business.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["EXPIRY_WARNING", "PairFinding", "check_pair"]

# Let's Encrypt renews 30 days before expiry; a certificate this close to
# its end has missed its renewal, and warrants a word from `mailxctl check`.
EXPIRY_WARNING = datetime.timedelta(days=14)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class PairFinding:
    """One thing about the pair: ``error`` stops start-up, ``warning`` is said and goes on."""

    level: str  # "error" | "warning"
    key: str  # "tls.certificate" | "tls.key"
    message: str


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [
            str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return san.value.get_values_for_type(x509.DNSName)


def _covers(pattern: str, hostname: str) -> bool:
    """RFC 6125 6.4.3: a wildcard stands for exactly the left-most label."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern.startswith("*.") and "." in hostname:
        return hostname.split(".", 1)[1] == pattern[2:]
    return pattern == hostname


def check_pair(
    certificate: Path,
    key: Path,
    hostname: str | None = None,
    now: datetime.datetime | None = None,
) -> list[PairFinding]:
    """What is wrong with (or worth knowing about) this certificate file and key file."""
    now = now or datetime.datetime.now(datetime.UTC)
    found: list[PairFinding] = []
    cert_data, key_data = certificate.read_bytes(), key.read_bytes()
    blocks = _PEM_CERTIFICATE.findall(cert_data)
    if not blocks:
        hint = (
            " (it holds a private key: are certificate and key swapped?)"
            if b"PRIVATE KEY-----" in cert_data
            else ""
        )
        return [
            PairFinding("error", "tls.certificate", f"no PEM certificate in {certificate}{hint}")
        ]
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        return [
            PairFinding("error", "tls.certificate", f"{certificate} holds a damaged certificate: {e}")
        ]
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        return [
            PairFinding(
                "error",
                "tls.key",
                f"{key} is protected by a passphrase, which a server cannot type: write it"
                f" without one (openssl pkey -in {key} -out {key}.new) and keep it mode 0600",
            )
        ]
    except ValueError as e:
        hint = (
            " (it holds a certificate: are certificate and key swapped?)"
            if b"BEGIN CERTIFICATE" in key_data
            else ""
        )
        return [PairFinding("error", "tls.key", f"{key} is not a usable PEM private key{hint}: {e}")]
    leaf = chain[0]
    mine = _public(private.public_key())
    if _public(leaf.public_key()) != mine:
        others = [i for i, c in enumerate(chain[1:], 2) if _public(c.public_key()) == mine]
        if others:
            why = (
                f"it belongs to certificate {others[0]} of {len(chain)} in {certificate}:"
                " the server's own certificate must come first, then the chain"
            )
        else:
            why = (
                f"the certificate in {certificate} was issued for another key: install the key"
                " made with this certificate, or the certificate issued for this key"
            )
        found.append(PairFinding("error", "tls.key", f"{key} does not match the certificate; {why}"))
    subject = leaf.subject.rfc4514_string() or "(no subject)"
    ends = leaf.not_valid_after_utc
    if ends <= now:
        found.append(
            PairFinding(
                "warning",
                "tls.certificate",
                f"{certificate} ({subject}) expired on {ends:%Y-%m-%d}: senders that verify"
                " (MTA-STS, DANE) will not deliver; renew it",
            )
        )
    elif ends - now <= EXPIRY_WARNING:
        found.append(
            PairFinding(
                "warning",
                "tls.certificate",
                f"{certificate} ({subject}) expires on {ends:%Y-%m-%d}, in"
                f" {(ends - now).days} days: renew it",
            )
        )
    if leaf.not_valid_before_utc > now:
        found.append(
            PairFinding(
                "warning",
                "tls.certificate",
                f"{certificate} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        )
    names = _names(leaf)
    if hostname is not None and not any(_covers(n, hostname) for n in names):
        found.append(
            PairFinding(
                "warning",
                "tls.certificate",
                f"{certificate} is for {', '.join(names) or 'no name'}, not for the hostname"
                f" {hostname}: senders that verify it will refuse it",
            )
        )
    # 0640 with a group such as Debian's ssl-cert is a normal setup; a key
    # every local user can read lets any of them pose as this server.  The
    # same rule, and words, as for DKIM keys (config._Loader.private_key).
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o007:
        found.append(
            PairFinding(
                "error",
                "tls.key",
                f"every user of this machine can use {key} (mode {mode:04o}): chmod 600 {key}",
            )
        )
    return found
