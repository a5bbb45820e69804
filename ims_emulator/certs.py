"""One X.509 certificate builder for the emulator: the integrations' self-signed RSA
certificates (credentials) and the local CA's TLS certificates (tls) differ only in
names, keys, validity and extensions."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)

__all__ = ["issue"]


def issue(
    subject: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    *,
    issuer: x509.Name,
    signer: CertificateIssuerPrivateKeyTypes,
    valid: tuple[datetime, datetime],
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A certificate for `public_key` named `subject`, signed (SHA-256) by `signer` as
    `issuer`, valid from `valid[0]` to `valid[1]`; each extension with its criticality."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())
