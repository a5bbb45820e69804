"""Credentials: generate them in the Developer Console's shapes, and read them back as clients.

Generated: an AEM service credentials JSON (JWT flow: a PKCS#1 key and its
self-signed certificate, CRLF PEM as Adobe ships it) and an OAuth
Server-to-Server JSON with two valid secrets. Read back from a directory: those
two, and any Developer Console project JSON
(`project.workspace.details.credentials[].oauth_server_to_server`), so users
can point the emulator at what they downloaded.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ims_emulator.certs import issue
from ims_emulator.files import write_file
from ims_emulator.specs import ClientSpec

__all__ = [
    "AEM_CREDENTIALS_FILE",
    "OAUTH_CREDENTIALS_FILE",
    "clients_in",
    "ensure_credentials",
    "existing_credentials",
    "write_credentials",
]

_log = logging.getLogger(__name__)

AEM_CREDENTIALS_FILE = "aem-service-credentials.json"
OAUTH_CREDENTIALS_FILE = "oauth-server-to-server.json"
_GENERATED = {"aem": AEM_CREDENTIALS_FILE, "oauth": OAUTH_CREDENTIALS_FILE}
_AEM_METASCOPES = ("ent_aem_cloud_api",)
_OAUTH_SCOPES = ("openid", "AdobeID", "read_organizations")
_MAX_FILE_BYTES = 1024 * 1024


# --- generation


def _crlf(pem: bytes) -> str:
    # The AEM Developer Console ships PEM blocks with CRLF line endings.
    return pem.decode("ascii").replace("\n", "\r\n")


def _self_signed_rsa(
    common_name: str, cert_days: float
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    not_after = now + timedelta(days=cert_days)
    # A negative or tiny cert_days makes an already-expired certificate; keep
    # not_before before not_after so it is still a well-formed certificate.
    not_before = min(now - timedelta(minutes=1), not_after - timedelta(minutes=1))
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Adobe IMS emulator"),
        ]
    )
    certificate = issue(
        name, key.public_key(), issuer=name, signer=key, valid=(not_before, not_after)
    )
    return key, certificate


def _write_aem_credentials(directory: Path, ims_endpoint: str, cert_days: float) -> Path:
    client_id = f"cm-p{secrets.randbelow(90000) + 10000}-e{secrets.randbelow(900000) + 100000}"
    client_id += f"-integration-{secrets.token_hex(3)}"
    key, certificate = _self_signed_rsa(client_id, cert_days)
    account = f"{secrets.token_hex(12).upper()}@techacct.adobe.com"
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as Adobe ships it
        serialization.NoEncryption(),
    )
    document = {
        "ok": True,
        "integration": {
            "imsEndpoint": ims_endpoint,
            "metascopes": ",".join(_AEM_METASCOPES),
            "technicalAccount": {
                "clientId": client_id,
                "clientSecret": f"p8e-{secrets.token_urlsafe(24)}",
            },
            "email": account,
            "id": account,
            "org": f"{secrets.token_hex(12).upper()}@AdobeOrg",
            "privateKey": _crlf(private_pem),
            "publicKey": _crlf(certificate.public_bytes(serialization.Encoding.PEM)),
            "certificateExpirationDate": certificate.not_valid_after_utc.strftime(
                "%Y-%m-%dT%H:%M:%S.000Z"
            ),
        },
        "statusCode": 200,
    }
    path = directory / AEM_CREDENTIALS_FILE
    write_file(path, json.dumps(document, indent=2).encode(), 0o600)
    return path


def _write_oauth_credentials(directory: Path, ims_endpoint: str) -> Path:
    document = {
        "client_id": secrets.token_hex(16),
        # Two valid secrets, as during a rotation in the Developer Console.
        "client_secrets": [f"p8e-{secrets.token_urlsafe(24)}" for _ in range(2)],
        "scopes": list(_OAUTH_SCOPES),
        "org_id": f"{secrets.token_hex(12).upper()}@AdobeOrg",
        "technical_account_id": f"{secrets.token_hex(12).upper()}@techacct.adobe.com",
        "ims_endpoint": ims_endpoint,
    }
    path = directory / OAUTH_CREDENTIALS_FILE
    write_file(path, json.dumps(document, indent=2).encode(), 0o600)
    return path


def write_credentials(
    directory: Path, *, ims_endpoint: str, cert_days: float = 365
) -> dict[str, Path]:
    """Generate fresh AEM (JWT) and OAuth credentials in `directory`, mode 0600.

    `ims_endpoint` is `host:port` without a scheme, as in the AEM JSON. Returns
    `{"aem": path, "oauth": path}`. Overwrites existing files.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return {
        "aem": _write_aem_credentials(directory, ims_endpoint, cert_days),
        "oauth": _write_oauth_credentials(directory, ims_endpoint),
    }


def ensure_credentials(directory: Path, ims_endpoint: str, cert_days: float) -> dict[str, Path]:
    """Write whichever credential file is missing; keep existing ones (a restart accepts them)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (directory / AEM_CREDENTIALS_FILE).exists():
        _write_aem_credentials(directory, ims_endpoint, cert_days)
    if not (directory / OAUTH_CREDENTIALS_FILE).exists():
        _write_oauth_credentials(directory, ims_endpoint)
    return {name: directory / filename for name, filename in _GENERATED.items()}


def existing_credentials(directory: Path) -> dict[str, Path]:
    """The generated files already in `directory`. Raises FileNotFoundError if it holds none
    and no other credentials either."""
    files = {
        name: directory / filename
        for name, filename in _GENERATED.items()
        if (directory / filename).is_file()
    }
    if not files and not any(_other_json(directory)):
        raise FileNotFoundError(
            f"no {AEM_CREDENTIALS_FILE}, {OAUTH_CREDENTIALS_FILE} or Developer Console "
            f"project JSON in {directory}"
        )
    return files


# --- reading back


def clients_in(directory: Path) -> list[ClientSpec]:
    """Every client the credential files in `directory` describe. Raises ValueError.

    The two generated files must parse; any other `*.json` is read if it is a
    credentials shape the emulator knows and skipped (with a log line) if not.
    """
    clients: list[ClientSpec] = []
    for filename in _GENERATED.values():
        path = directory / filename
        if path.is_file():
            found = _clients_of(_read_json(path))
            if not found:
                raise ValueError(f"{path}: neither AEM nor OAuth credentials")
            clients += found
    for path in _other_json(directory):
        try:
            found = _clients_of(_read_json(path))
        except ValueError as exc:
            _log.info("ignored %s: %s", path.name, exc)
            continue
        if not found:
            _log.info("ignored %s: not a credentials shape the emulator knows", path.name)
        clients += found
    return clients


def _other_json(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.json")):
        # is_file() is False for a FIFO or a device: never a hang on a planted one.
        if path.name not in _GENERATED.values() and path.is_file():
            yield path


def _read_json(path: Path) -> Mapping[str, Any]:
    with path.open("rb") as handle:
        data = handle.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError:
        raise ValueError(f"{path}: not JSON") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON object")
    return document


def _clients_of(document: Mapping[str, Any]) -> list[ClientSpec]:
    """The clients in one document, of whichever known shape; [] for an unknown shape."""
    integration = document.get("integration", document)
    if isinstance(integration, dict) and "technicalAccount" in integration:
        return [_aem_client(integration)]
    if isinstance(document.get("project"), dict):
        return _project_clients(document["project"])
    if isinstance(document.get("oauth_server_to_server"), dict):
        return [_oauth_client(document["oauth_server_to_server"], document.get("org_id"))]
    if "client_id" in document:
        return [_oauth_client(document, document.get("org_id"))]
    return []


def _aem_client(integration: Mapping[str, Any]) -> ClientSpec:
    account = integration["technicalAccount"]
    if not isinstance(account, dict):
        raise ValueError("technicalAccount is not an object")
    return ClientSpec.from_mapping(
        {
            "client_id": account.get("clientId"),
            "client_secrets": [account.get("clientSecret")],
            "certificate_pem": integration.get("publicKey"),
            "org": integration.get("org"),
            "technical_account_id": integration.get("id"),
            "metascopes": integration.get("metascopes"),
        }
    )


def _oauth_client(fields: Mapping[str, Any], org: object) -> ClientSpec:
    raw_secrets = fields.get("client_secrets") or [fields.get("client_secret")]
    return ClientSpec.from_mapping(
        {
            "client_id": fields.get("client_id"),
            "client_secrets": raw_secrets,
            "org": org,
            "technical_account_id": fields.get("technical_account_id"),
            "scopes": fields.get("scopes") or fields.get("scope") or "",
        }
    )


def _project_clients(project: Mapping[str, Any]) -> list[ClientSpec]:
    """A Developer Console project download: each OAuth Server-to-Server credential in it."""
    org = project.get("org", {}).get("ims_org_id") if isinstance(project.get("org"), dict) else None
    workspace = project.get("workspace")
    details = workspace.get("details") if isinstance(workspace, dict) else None
    credentials = details.get("credentials") if isinstance(details, dict) else None
    if not isinstance(credentials, list):
        raise ValueError("project JSON without workspace.details.credentials")
    return [
        _oauth_client(credential["oauth_server_to_server"], org)
        for credential in credentials
        if isinstance(credential, dict)
        and isinstance(credential.get("oauth_server_to_server"), dict)
    ]
