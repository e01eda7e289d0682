"""Throw-away TLS certificates for tests: made by the test, never committed."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def certificate_pem(
    hostname: str = "mx.example.test",
    valid_for: datetime.timedelta = datetime.timedelta(days=30),
    passphrase: bytes | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``hostname``: (certificate PEM, key PEM).

    ``valid_for`` from now (negative: expired that long ago); ``passphrase``
    encrypts the key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    ends = now + valid_for
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, ends) - datetime.timedelta(days=1))
        .not_valid_after(ends)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_certificate(
    directory: Path, hostname: str = "mx.example.test", **kwargs: Any
) -> tuple[Path, Path]:
    """`certificate_pem` written to ``directory``; returns (certificate, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = certificate_pem(hostname, **kwargs)
    cert_path = directory / "fullchain.pem"
    key_path = directory / "privkey.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path
