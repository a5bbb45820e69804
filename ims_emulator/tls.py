"""TLS: a local CA (kept in a directory, so a restarted emulator is still trusted) and a
server certificate for 127.0.0.1, ::1 and localhost signed by it."""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ims_emulator.certs import issue
from ims_emulator.files import write_file

__all__ = ["CA_FILE", "server_context"]

CA_FILE = "ca.pem"
_CA_KEY_FILE = "ca-key.pem"


def _ec_key() -> ec.EllipticCurvePrivateKey:
    # EC keys for TLS: generated in microseconds, where RSA takes a noticeable share of a test.
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _certificate_authority(tls_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Reuse the CA in `tls_dir` if there is one, so a restarted emulator is still trusted."""
    ca_path, key_path = tls_dir / CA_FILE, tls_dir / _CA_KEY_FILE
    if ca_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key, x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = _ec_key()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IMS emulator local CA")])
    extensions = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_CA_KEY_USAGE, True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
    ]
    valid = (now - timedelta(minutes=5), now + timedelta(days=3650))
    certificate = issue(
        name, key.public_key(), issuer=name, signer=key, valid=valid, extensions=extensions
    )
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(key_path, _pem_key(key), 0o600)
    write_file(ca_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, certificate


def server_context(tls_dir: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 / localhost / ::1, signed by the CA in `tls_dir`."""
    ca_key, ca = _certificate_authority(tls_dir)
    key = _ec_key()
    now = datetime.now(UTC)
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    # The extensions strict verifiers (Python 3.13's VERIFY_X509_STRICT) insist on.
    extensions = [
        (x509.SubjectAlternativeName(names), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]
    certificate = issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        key.public_key(),
        issuer=ca.subject,
        signer=ca_key,
        valid=(now - timedelta(minutes=5), now + timedelta(days=30)),
        extensions=extensions,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files: hand it a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="ims-emulator-tls-") as scratch:
        cert_file, key_file = Path(scratch, "server.pem"), Path(scratch, "server-key.pem")
        write_file(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o600)
        write_file(key_file, _pem_key(key), 0o600)
        context.load_cert_chain(cert_file, key_file)
    return context, tls_dir / CA_FILE
