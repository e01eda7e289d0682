# -*- test-case-name: tests.test_dkimkeys -*-
"""DKIM signing keys: generate, store, publish, and sign the mail mailx writes itself.

mailx originates little mail (delivery status notifications, notices about
forwarding), but what it sends must pass DMARC at the receiver, so it is
signed with the key of the ``From`` domain (`sign_if_configured`).

Keys (``mailxctl dkim keygen``):

- RSA 2048 by default: RFC 8301 3.2 requires at least 1024 bits and
  recommends 2048; every verifier understands it.  Ed25519 (RFC 8463) is
  offered, but many receivers still ignore it, so it is best published
  beside an RSA key under another selector, not instead of one.
- Files are PEM: RSA as PKCS#1 (``BEGIN RSA PRIVATE KEY``, what OpenDKIM
  and dkimpy read), Ed25519 as PKCS#8.  dkimpy's own Ed25519 format (the
  32-octet seed in base64) is read too.
- A key is created with ``O_EXCL`` and mode 0600 and never overwritten:
  replacing a published key breaks every signature still in transit.

Signing uses dkimpy's canonicalization and header hashing.  Ed25519 is
signed with ``cryptography`` rather than PyNaCl, which dkimpy would need
and mailx does not depend on (`mailx.checks.dkim` verifies it the same way).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailx import headers
from mailx.address import AddressError, normalize_domain
from mailx.text import Logger

if TYPE_CHECKING:
    from mailx.config import Config

__all__ = [
    "ALGORITHMS",
    "default_selector",
    "KeyExistsError",
    "KeyFileError",
    "PrivateKey",
    "dns_record",
    "generate_key",
    "key_algorithm",
    "load_key",
    "public_key_data",
    "sign",
    "sign_if_configured",
    "signing_domain",
    "write_key",
]

log = Logger(namespace="mailx.dkimkeys")

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

ALGORITHMS = ("rsa", "ed25519")
# RFC 8301 3.2: signers MUST use at least 1024 bits and SHOULD use 2048.
RSA_BITS = 2048
RSA_EXPONENT = 65537

# The header fields signed when present (RFC 6376 5.4.1 lists From as the one
# that MUST be signed and recommends these; Auto-Submitted marks our notices
# as automatic, RFC 3834, and a receiver may rely on it).
SIGNED_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "auto-submitted",
)
# RFC 6376 8.15: sign From once more than it occurs, so a second From
# cannot be added without breaking the signature.
OVERSIGNED_HEADERS = ("from",)


class KeyFileError(Exception):
    """A key file cannot be read or is not a private key we can use."""


class KeyExistsError(KeyFileError):
    """The key file exists already; keys are never overwritten."""


# ---------------------------------------------------------------------------
# Keys


def generate_key(algorithm: str = "rsa") -> PrivateKey:
    """A new signing key: RSA 2048 (RFC 8301) or Ed25519 (RFC 8463)."""
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(
        f"unknown DKIM key algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}"
    )


def default_selector(today: datetime.date | None = None) -> str:
    """``mx`` and the year and month: a new name at each rotation, as M3AAWG's DKIM
    key rotation practice advises, so old and new keys can be published side by side."""
    return f"mx{(today or datetime.date.today()):%Y%m}"


def key_algorithm(key: PrivateKey) -> str:
    """The ``k=`` tag value of a key: ``rsa`` or ``ed25519``."""
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"


def _pem(key: PrivateKey) -> bytes:
    # PKCS#1 for RSA: the format OpenDKIM and dkimpy's signer read.
    fmt = (
        serialization.PrivateFormat.PKCS8
        if isinstance(key, ed25519.Ed25519PrivateKey)
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def write_key(key: PrivateKey, path: str | os.PathLike[str]) -> Path:
    """Write ``key`` to a new file of mode 0600; `KeyExistsError` if ``path`` exists.

    The directory is created (mode 0700) if missing.  The file and its
    directory are fsynced before this returns: the record printed next must
    not outlive its key.
    """
    from mailx.storage.maildir import fsync_directory, make_directories

    target = Path(path)
    make_directories(target.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise KeyExistsError(
            f"{target} already exists; mailx never overwrites a key (a published key may"
            " still be verifying mail in transit): choose another --selector or --output"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot create {target}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask says
        data = _pem(key)
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {target}: {e.strerror}") from None
    os.close(fd)
    fsync_directory(target.parent)  # the name, not only the bytes, must survive a power cut
    return target


def load_key(path: str | os.PathLike[str]) -> PrivateKey:
    """The private key in ``path`` (PEM, or dkimpy's base64 Ed25519 seed).

    Read again only when the file changed (another inode, size, mtime or
    ctime): every submitted message is signed, and opening and reading the
    key file cost it as much as the RSA signature (profile in bench/README).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyFileError(f"cannot read DKIM key {path}: {e.strerror}") from None
    return _read_key(
        os.fspath(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    )


@functools.lru_cache(maxsize=32)
def _read_key(path: str, identity: tuple[int, ...]) -> PrivateKey:
    """`load_key` of the file as ``identity`` (its stat) describes it; errors are not cached."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read DKIM key {path}: {e.strerror}") from None
    if b"-----BEGIN" in data:
        try:
            key = _load_pem(data)
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"{path}: not a usable private key: {e}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{path}: DKIM keys are RSA or Ed25519, not {type(key).__name__}")
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyFileError(f"{path}: not a PEM private key nor a base64 Ed25519 seed")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


@functools.lru_cache(maxsize=32)
def _load_pem(data: bytes) -> PrivateKey:
    """Parse a PEM key once per content: cryptography checks an RSA key on
    load (~100 ms for 2048 bits), which every submitted message would pay.
    Keyed by the file's bytes, so a rotated key is parsed afresh."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__} cannot sign DKIM (RSA or Ed25519 only)")
    return key


def public_key_data(key: PrivateKey) -> str:
    """The ``p=`` value: base64 of the public key.

    RSA: the DER SubjectPublicKeyInfo, as every DKIM signer publishes it
    (RFC 6376 3.6.1).  Ed25519: the bare 32 octets (RFC 8463 4.2).
    """
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def dns_record(key: PrivateKey) -> str:
    """The TXT record to publish at ``<selector>._domainkey.<domain>`` (RFC 6376 3.6.1)."""
    return f"v=DKIM1; k={key_algorithm(key)}; p={public_key_data(key)}"


# ---------------------------------------------------------------------------
# Signing


class _Ed25519Adapter:
    """What dkimpy's ``gen_header`` expects of a PyNaCl key: ``sign(digest).signature``.

    RFC 8463 3: the Ed25519 signature is over the SHA-256 hash of the
    canonicalized header fields, exactly the digest dkimpy hands over.
    """

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> SimpleNamespace:
        return SimpleNamespace(signature=self._key.sign(digest))


class _RSAAdapter:
    """RSASSA-PKCS1-v1_5 over an already computed SHA-256 digest (RFC 6376 3.3.1)."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> SimpleNamespace:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        signature = self._key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return SimpleNamespace(signature=signature)


@functools.cache
def _signer_class() -> Any:
    """dkimpy's DKIM, subclassed at the first signature: dkimpy and what it
    imports (dnspython's resolver, authres) load only in a server that signs."""
    import dkim
    from dkim.canonicalization import CanonicalizationPolicy
    from dkim.crypto import HASH_ALGORITHMS

    class _Signer(dkim.DKIM):
        """dkimpy's DKIM, signing with a ``cryptography`` key of either type."""

        def signature_header(
            self, domain: str, selector: str, key: PrivateKey, timestamp: int | None
        ) -> bytes:
            """The DKIM-Signature field (with CRLF) for this message."""
            if isinstance(key, ed25519.Ed25519PrivateKey):
                self.signature_algorithm = b"ed25519-sha256"
                signer: object = _Ed25519Adapter(key)
            else:
                self.signature_algorithm = b"rsa-sha256"
                # cryptography's RSA (OpenSSL) rather than dkimpy's pure-Python
                # one: 0.5 ms instead of ~20 ms a signature for 2048 bits, which
                # every submitted message pays.  Handed to gen_header through its
                # Ed25519 branch (``pk.sign(digest)``, the same SHA-256 digest of
                # the same canonical headers); a= is set below, before the switch.
                signer = _RSAAdapter(key)
            canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
            present = {name.lower() for name, _ in self.headers}
            if b"from" not in present:
                raise dkim.ParameterError(
                    "the message has no From field (RFC 6376 5.4: it MUST be signed)"
                )
            include = [
                name.lower() for name, _ in self.headers if name.lower().decode() in SIGNED_HEADERS
            ]
            include += [h.encode() for h in OVERSIGNED_HEADERS]
            self.include_headers = tuple(include)
            self.hasher = HASH_ALGORITHMS[self.signature_algorithm]
            body_hash = base64.b64encode(self.hasher(canon.canonicalize_body(self.body)).digest())
            fields = [
                (b"v", b"1"),
                (b"a", self.signature_algorithm),
                (b"c", canon.to_c_value()),
                (b"d", domain.encode("ascii")),
                (b"s", selector.encode("ascii")),
                (b"h", b" : ".join(include)),
                (b"bh", body_hash),
                # dkimpy's trick: a placeholder puts b= on its own folded line,
                # so adding the signature does not refold the tags before it.
                (b"b", b"0" * 60),
            ]
            if timestamp is not None:
                fields.insert(5, (b"t", str(int(timestamp)).encode("ascii")))
            algorithm = self.signature_algorithm
            if isinstance(signer, _RSAAdapter):
                self.signature_algorithm = b"ed25519-sha256"  # the branch that calls pk.sign(digest)
            try:
                value = self.gen_header(
                    fields, self.include_headers, canon, b"DKIM-Signature", signer
                )
            finally:
                self.signature_algorithm = algorithm
            return b"DKIM-Signature: " + value

    return _Signer


def sign(
    message: bytes,
    domain: str,
    selector: str,
    key_path: str | os.PathLike[str] | PrivateKey,
    *,
    timestamp: int | None = None,
) -> bytes:
    """``message`` with a DKIM-Signature prepended (relaxed/relaxed, RFC 6376 3.4).

    ``key_path`` is a key file or an already loaded key.  ``timestamp`` (t=,
    seconds) defaults to now; RFC 6376 3.5 makes it optional but receivers
    use it to judge replays.  Raises `KeyFileError` for an unusable key and
    ``dkim.DKIMException`` for a message that cannot be signed.
    """
    key = (
        key_path
        if isinstance(key_path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
        else load_key(key_path)
    )
    signer = _signer_class()(message, linesep=b"\r\n")
    when = int(time.time()) if timestamp is None else timestamp
    header = signer.signature_header(normalize_domain(domain), selector, key, when)
    return header + message


def _from_domain(message: bytes) -> str | None:
    """The domain of the one From address, or None if there is not exactly one."""
    values, count = headers.field_values(headers.header_section(message), b"from", limit=1)
    if count != 1:
        return None
    domains = headers.mailbox_domains(values[0].decode("utf-8", "replace"))
    if len(domains) != 1 or domains[0] is None:
        return None
    try:
        return normalize_domain(domains[0])
    except AddressError:
        return None


def signing_domain(config: Config, author_domain: str) -> str | None:
    """The configured domain whose key signs mail from ``author_domain``.

    The author domain itself, else its nearest configured parent: a DSN
    comes from ``MAILER-DAEMON@mx.example.test`` and a ``d=example.test``
    signature is aligned with it under DMARC's default relaxed alignment
    (RFC 7489 3.1.1).  None when no such domain has a DKIM key configured.
    """
    labels = author_domain.split(".")
    for i in range(len(labels) - 1):
        candidate = ".".join(labels[i:])
        domain = config.domains.get(candidate)
        if domain is not None and domain.dkim is not None:
            return candidate
    return None


def sign_if_configured(config: Config, message: bytes) -> bytes:
    """Sign mail mailx originates with its From domain's key; unchanged if none.

    A missing or broken key file is logged and the message goes out
    unsigned: a bounce that arrives unsigned is better than one never sent.
    """
    author = _from_domain(message)
    name = signing_domain(config, author) if author else None
    if name is None:
        return message
    dkim_config = config.domains[name].dkim
    assert dkim_config is not None
    import dkim  # for its exception; sign() has loaded it

    try:
        return sign(message, name, dkim_config.selector, dkim_config.key)
    except (KeyFileError, dkim.DKIMException) as e:
        log.warn("not DKIM-signing a message from {author}: {error}", author=author, error=str(e))
        return message
