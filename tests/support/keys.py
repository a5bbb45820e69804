"""Test-only key material and credential files in every shape `refresher.credentials` reads.

The one credentials generator of the suite: the session's credentials (the
`credentials_template` fixture) come from `write_credentials()` too. Import it as
``from tests.support import keys``. Everything is deterministic except the RSA
keys themselves, which are generated once per process and cached
(``rsa_keypair()``: RSA 2048 generation costs ~100 ms).

Values:   CLIENT_ID, CLIENT_SECRET, OTHER_CLIENT_SECRET, ORG_ID,
          TECHNICAL_ACCOUNT_ID, IMS_HOST, METASCOPES, SCOPES, PASSPHRASE, NOT_AFTER
Keys:     rsa_keypair(name="default") -> KeyPair (.key, .certificate, .not_after,
          .pkcs1_pem(), .pkcs8_pem(), .certificate_pem(), .base64_pem());
          ec_private_key_pem(), ed25519_private_key_pem()
Shapes:   aem_document(), oauth_document(), project_document(), jwt_fields(), oauth_fields()
Files:    write_credentials() (the AEM and OAuth files the emulator and the CLI read),
          write_json(), write_fields(), write_kubelet_secret(), swap_kubelet_secret()
Secrets:  SecretTexts / SecretMap: containers whose repr hides their content (pytest
          prints test arguments on failure); the scanner is tests/support/leaks.py
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE

CLIENT_ID = "cm-p12345-e678901-integration-0a1b2c"
CLIENT_SECRET = "p8e-TestSecret-Q9v2XkL7mN4pR8sT1uW3yZ6a"
OTHER_CLIENT_SECRET = "p8e-RotatedSecret-H5j8K2m4N7q9S1v3X6z8B0d"
ORG_ID = "0123456789ABCDEF01234567@AdobeOrg"
TECHNICAL_ACCOUNT_ID = "FEDCBA9876543210FEDCBA98@techacct.adobe.com"
IMS_HOST = "ims-na1.adobelogin.com"
METASCOPES = ("ent_aem_cloud_api",)
SCOPES = ("openid", "AdobeID", "read_organizations")
PASSPHRASE = "Correct-Horse-Battery-Staple-42"
NOT_AFTER = datetime(2027, 11, 26, 12, 0, 0, tzinfo=UTC)
# The OAuth client of write_credentials(): another client than the AEM one, two secrets as
# during a rotation in the Developer Console.
OAUTH_CLIENT_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
OAUTH_CLIENT_SECRETS = (
    "p8e-OAuthSecret-B7c9D1f3G5h7J9k1L3m5N7p9",
    "p8e-OAuthSecret2-R2t4V6x8Z0b2D4f6H8j0K2",
)


class SecretTexts(tuple[str, ...]):
    """Secret strings whose repr hides them: pytest prints test arguments on failure."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} secret texts>"

    def plus(self, *more: str) -> SecretTexts:
        return SecretTexts((*self, *more))


class SecretMap(dict[str, str]):
    """A dict of secret strings whose repr shows only the keys."""

    def __repr__(self) -> str:
        return f"<secret texts {sorted(self)}>"


# What never may appear in output, for `leaked()` (the PEMs are added per key pair).
SECRETS = SecretTexts((CLIENT_SECRET, OTHER_CLIENT_SECRET, PASSPHRASE, *OAUTH_CLIENT_SECRETS))


@dataclass(frozen=True)
class KeyPair:
    """An RSA key and a self-signed certificate for it (the AEM `publicKey`)."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    not_after: datetime

    def pkcs1_pem(self, *, crlf: bool = False, passphrase: str | None = None) -> str:
        """`-----BEGIN RSA PRIVATE KEY-----` as AEM ships it; legacy-encrypted with a passphrase."""
        return _pem(self.key, serialization.PrivateFormat.TraditionalOpenSSL, crlf, passphrase)

    def pkcs8_pem(self, *, crlf: bool = False, passphrase: str | None = None) -> str:
        """`-----BEGIN PRIVATE KEY-----`, or `ENCRYPTED PRIVATE KEY` with a passphrase."""
        return _pem(self.key, serialization.PrivateFormat.PKCS8, crlf, passphrase)

    def certificate_pem(self, *, crlf: bool = False) -> str:
        text = self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return text.replace("\n", "\r\n") if crlf else text

    def base64_pem(self) -> str:
        """Base64 of the whole PKCS#1 PEM, one line (how some people store it in a Secret)."""
        return base64.b64encode(self.pkcs1_pem().encode("ascii")).decode("ascii")

    def secrets(self) -> SecretTexts:
        """Texts whose content must never appear in output (for `leaked()`)."""
        return SecretTexts((self.pkcs1_pem(), self.pkcs8_pem(), self.base64_pem()))


def _pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    fmt: serialization.PrivateFormat,
    crlf: bool,
    passphrase: str | None,
) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase is not None
        else serialization.NoEncryption()
    )
    text = key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode("ascii")
    return text.replace("\n", "\r\n") if crlf else text


@functools.cache
def rsa_keypair(
    name: str = "default", key_size: int = 2048, not_after: datetime = NOT_AFTER
) -> KeyPair:
    """A cached RSA key pair; a different `name` gives a different key (for mismatches)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CLIENT_ID}-{name}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=366))  # valid a day before the year
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, certificate, certificate.not_valid_after_utc)


@functools.cache
def ec_private_key_pem(pkcs8: bool = False) -> str:
    """A P-256 key: `EC PRIVATE KEY`, or `PRIVATE KEY` (PKCS#8) so only parsing tells."""
    key = ec.generate_private_key(ec.SECP256R1())
    fmt = (
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return _pem(key, fmt, False, None)


@functools.cache
def ed25519_private_key_pem() -> str:
    return _pem(
        ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8, False, None
    )


# --- documents -------------------------------------------------------------------------------


def aem_document(
    pair: KeyPair | None = None,
    *,
    private_key: str | None = None,
    certificate: str | None = None,
    client_secret: str = CLIENT_SECRET,
    metascopes: str | list[str] = ",".join(METASCOPES),
    wrapped: bool = True,
) -> dict[str, object]:
    """AEM Developer Console service credentials (CRLF PEMs, as downloaded).

    `private_key` / `certificate` override the PEM texts; `wrapped=False` gives
    the bare `integration` object.
    """
    pair = pair or rsa_keypair()
    integration: dict[str, object] = {
        "imsEndpoint": IMS_HOST,
        "metascopes": metascopes,
        "technicalAccount": {"clientId": CLIENT_ID, "clientSecret": client_secret},
        "email": TECHNICAL_ACCOUNT_ID,
        "id": TECHNICAL_ACCOUNT_ID,
        "org": ORG_ID,
        "privateKey": private_key if private_key is not None else pair.pkcs1_pem(crlf=True),
        "publicKey": certificate if certificate is not None else pair.certificate_pem(crlf=True),
        "certificateExpirationDate": pair.not_after.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }
    if not wrapped:
        return integration
    return {"ok": True, "integration": integration, "statusCode": 200}


def oauth_document(
    *,
    client_secrets: Iterable[str] = (CLIENT_SECRET,),
    scopes: Iterable[str] = SCOPES,
    **extra: object,
) -> dict[str, object]:
    """OAuth Server-to-Server JSON: `client_id`, `client_secrets` list, `scopes` list."""
    return {
        "client_id": CLIENT_ID,
        "client_secrets": list(client_secrets),
        "scopes": list(scopes),
        "org_id": ORG_ID,
        "technical_account_id": TECHNICAL_ACCOUNT_ID,
        **extra,
    }


def project_document(*, client_secrets: Iterable[str] = (CLIENT_SECRET,)) -> dict[str, object]:
    """The Developer Console project JSON download with one OAuth S2S credential."""
    return {
        "project": {
            "id": "4566206088345000000",
            "name": "refresher",
            "org": {"id": "1234", "name": "Example", "ims_org_id": ORG_ID},
            "workspace": {
                "id": "4566206088345000001",
                "name": "Production",
                "details": {
                    "credentials": [
                        {
                            "id": "123",
                            "name": "Credential",
                            "integration_type": "oauth_server_to_server",
                            "oauth_server_to_server": {
                                "client_id": CLIENT_ID,
                                "client_secrets": list(client_secrets),
                                "technical_account_email": "x@techacct.adobe.com",
                                "technical_account_id": TECHNICAL_ACCOUNT_ID,
                                "scopes": list(SCOPES),
                            },
                        }
                    ],
                    "services": [{"code": "AdobeIOManagementAPISDK", "name": "I/O Management API"}],
                },
            },
        }
    }


def jwt_fields(pair: KeyPair | None = None, **overrides: str) -> dict[str, str]:
    """The per-file directory shape for JWT (values end with a newline, like `echo`)."""
    pair = pair or rsa_keypair()
    fields = {
        "client_id": CLIENT_ID + "\n",
        "client_secret": CLIENT_SECRET + "\n",
        "org_id": ORG_ID + "\n",
        "technical_account_id": TECHNICAL_ACCOUNT_ID + "\n",
        "metascopes": ",".join(METASCOPES) + "\n",
        "private_key": pair.pkcs8_pem(),
        "certificate": pair.certificate_pem(),
    }
    fields.update(overrides)
    return fields


def oauth_fields(**overrides: str) -> dict[str, str]:
    """The per-file directory shape for OAuth S2S."""
    fields = {
        "client_id": CLIENT_ID + "\n",
        "client_secret": CLIENT_SECRET + "\n",
        "scopes": ",".join(SCOPES) + "\n",
    }
    fields.update(overrides)
    return fields


# --- files -----------------------------------------------------------------------------------


def write_credentials(directory: Path) -> Path:
    """The AEM (JWT) and OAuth credentials files, as the emulator names them, mode 0600, in
    `directory`; the emulator started on `directory` serves both clients. Returns it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A certificate valid for a year from now, as the Developer Console issues it.
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    aem = aem_document(rsa_keypair("credentials", not_after=not_after))
    oauth = oauth_document(client_id=OAUTH_CLIENT_ID, client_secrets=OAUTH_CLIENT_SECRETS)
    for name, document in ((AEM_CREDENTIALS_FILE, aem), (OAUTH_CREDENTIALS_FILE, oauth)):
        write_json(directory / name, document).chmod(0o600)
    return directory


def write_json(path: Path, document: object, *, bom: bool = False, indent: int | None = 2) -> Path:
    """Write `document` as JSON (optionally with a UTF-8 BOM); returns `path`."""
    data = json.dumps(document, indent=indent).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
    return path


def write_fields(directory: Path, files: Mapping[str, str | bytes]) -> Path:
    """A plain directory with one file per key (no kubelet symlinks); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (directory / name).write_bytes(value.encode() if isinstance(value, str) else value)
    return directory


def _snapshot_name(version: int) -> str:
    return f"..2026_01_01_00_00_00.{version:09d}"


def write_kubelet_secret(
    directory: Path, files: Mapping[str, str | bytes], *, version: int = 1
) -> Path:
    """A Secret volume laid out as kubelet's atomic writer does; returns `directory`.

    `directory/..<timestamp>/` holds the files, `..data -> ..<timestamp>`, and
    each key is a symlink `key -> ..data/key`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    swap_kubelet_secret(directory, files, version=version)
    return directory


def swap_kubelet_secret(directory: Path, files: Mapping[str, str | bytes], *, version: int) -> None:
    """Replace the volume's content the way kubelet does (new snapshot, one rename of ..data).

    `version` must differ from the current one (it names the new snapshot).
    """
    snapshot = directory / _snapshot_name(version)
    snapshot.mkdir()
    for name, value in files.items():
        (snapshot / name).write_bytes(value.encode() if isinstance(value, str) else value)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.symlink_to(snapshot.name)
    tmp.replace(data)
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if not entry.name.startswith(".") and entry.name not in files:
            entry.unlink()
    if old is not None:
        shutil.rmtree(directory / old)
