"""The private key and the certificate: PEM as people paste it, RSA only, the passphrase,
and whether the key matches the certificate. Nothing here puts key material in a message."""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Final, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
    x448,
    x25519,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from refresher.credentials.shapes import Raw, json_type
from refresher.errors import CredentialsNotReady

_PEM_BLOCK: Final = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_LEGACY_HEADERS: Final = re.compile(r"\s*Proc-Type:\s*(\S+)\s+DEK-Info:\s*(\S+)\s+")
_KNOWN_LABELS: Final = ("CERTIFICATE", "PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE REQUEST")


def _pem_blocks(raw: Raw, canonical: str) -> list[tuple[str, str]]:
    """Every PEM block in the field as (label, canonical PEM text).

    Undoes what copy and paste does to a PEM: CRLF, literal backslash-n escapes
    (from env vars), lost line breaks, indentation, or base64 around the whole.
    """
    value = raw.values[canonical]
    if not isinstance(value, str):
        raise raw.error(f"must be a string, got {json_type(value)}", canonical)
    text = _unescape(value)
    if "-----BEGIN" not in text:
        text = _unescape(_unbase64(text))
    blocks = [_canonical_pem(match) for match in _PEM_BLOCK.finditer(text)]
    if not blocks:
        if "-----BEGIN" in text and raw.from_files:
            raise CredentialsNotReady(
                "has a BEGIN line but no END line (half-written?)",
                source=raw.source,
                field=raw.names[canonical],
            )
        what = "PEM" if "-----BEGIN" in text else "PEM (nor base64 of a PEM)"
        raise raw.error(f"is not {what}", canonical)
    return blocks


def _canonical_pem(match: re.Match[str]) -> tuple[str, str]:
    label, body = match.group(1), match.group(2)
    headers = ""
    legacy = _LEGACY_HEADERS.match(body)
    if legacy:  # encrypted PKCS#1 carries RFC 1421 headers before the base64
        headers = f"Proc-Type: {legacy.group(1)}\nDEK-Info: {legacy.group(2)}\n\n"
        body = body[legacy.end() :]
    b64 = "".join(body.split())
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return label, f"-----BEGIN {label}-----\n{headers}{lines}\n-----END {label}-----\n"


def _unescape(text: str) -> str:
    text = text.strip()
    if "\\n" in text or "\\r" in text:
        text = text.replace("\\r", "").replace("\\n", "\n")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unbase64(text: str) -> str:
    try:
        decoded = base64.b64decode("".join(text.split()), validate=True)
        return decoded.decode("ascii")
    except (binascii.Error, ValueError):
        return ""


def private_key(raw: Raw) -> rsa.RSAPrivateKey:
    """The one RSA private key in `private_key`, decrypted with the passphrase if needed."""
    label, pem = _private_block(raw)
    encrypted = label == "ENCRYPTED PRIVATE KEY" or "Proc-Type: 4,ENCRYPTED" in pem
    passphrase = raw.text("private_key_passphrase")
    if encrypted and passphrase is None:
        raise raw.error("is missing; the private key is encrypted", "private_key_passphrase")
    password = passphrase.encode() if encrypted and passphrase is not None else None
    try:
        key = _load_pem_private_key(pem.encode("ascii"), password)
    except (ValueError, TypeError, UnicodeEncodeError):
        if encrypted:
            raise raw.error(
                "does not decrypt the private key (wrong passphrase?)", "private_key_passphrase"
            ) from None
        raise raw.error("is not a valid PEM private key", "private_key") from None
    except UnsupportedAlgorithm:
        raise raw.error("uses an unsupported key algorithm, expected RSA", "private_key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        _reject_type(_key_type(key), raw)
    return key


def _private_block(raw: Raw) -> tuple[str, str]:
    """The field's one PRIVATE KEY block, refused early when its label alone says why."""
    found = _pem_blocks(raw, "private_key")
    blocks = [(label, pem) for label, pem in found if "PRIVATE KEY" in label]
    if not blocks:
        known = sorted({label for label, _ in found}.intersection(_KNOWN_LABELS))
        what = f"a {known[0]}" if known else "no PRIVATE KEY block"
        raise raw.error(f"holds {what}, expected an RSA private key", "private_key")
    if len(blocks) > 1:
        raise raw.error(f"holds {len(blocks)} private keys, expected one", "private_key")
    label, pem = blocks[0]
    if label == "OPENSSH PRIVATE KEY":
        raise raw.error(
            "is in OpenSSH format; convert it to PEM (ssh-keygen -p -m PKCS8 -f FILE)",
            "private_key",
        )
    if label in ("EC PRIVATE KEY", "DSA PRIVATE KEY"):
        # Known from the label alone, so even an encrypted one gets the real reason.
        _reject_type(label.split()[0], raw)
    return label, pem


def _reject_type(kind: str, raw: Raw) -> NoReturn:
    raise raw.error(f"private key is {kind}, the IMS JWT exchange needs RSA (RS256)", "private_key")


def _key_type(key: PrivateKeyTypes) -> str:
    kinds: tuple[tuple[type, str], ...] = (
        (ec.EllipticCurvePrivateKey, "EC"),
        (ed25519.Ed25519PrivateKey, "Ed25519"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (dsa.DSAPrivateKey, "DSA"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    )
    return next((kind for cls, kind in kinds if isinstance(key, cls)), type(key).__name__)


@functools.lru_cache(maxsize=8)
def _load_pem_private_key(pem: bytes, password: bytes | None) -> PrivateKeyTypes:
    """Parse once per distinct key. The cache holds what memory already holds (the
    loaded key); exceptions are not cached, so a fixed passphrase takes effect on the
    next read.

    OpenSSL's full RSA consistency check is the costliest step of a first start by far
    (docs/benchmarks.md). It guards against keys an attacker crafted; this key is our
    own, from our own Secret. It is skipped, and replaced by what matters here, a
    sign-and-verify round trip: a key that cannot produce a signature its own public key
    verifies is refused now, not by IMS later.
    """
    key = serialization.load_pem_private_key(
        pem, password=password, unsafe_skip_rsa_key_validation=True
    )
    if isinstance(key, rsa.RSAPrivateKey):
        probe = b"ims-token-refresher key self-test"
        signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
        try:
            key.public_key().verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ValueError("inconsistent RSA key") from None
    return key


def certificate(raw: Raw) -> x509.Certificate | None:
    """The integration's own certificate (the first block; any others are a chain)."""
    if raw.values.get("certificate") in (None, ""):
        return None
    blocks = [pem for label, pem in _pem_blocks(raw, "certificate") if label == "CERTIFICATE"]
    if not blocks:
        raise raw.error("holds no CERTIFICATE block, expected an X.509 certificate", "certificate")
    try:
        return x509.load_pem_x509_certificate(blocks[0].encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise raw.error("is not a valid X.509 certificate", "certificate") from None


def same_public_key(cert: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    return (
        isinstance(public, rsa.RSAPublicKey)
        and public.public_numbers() == key.public_key().public_numbers()
    )
