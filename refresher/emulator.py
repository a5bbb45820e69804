"""A local Adobe IMS: checks token requests the way IMS does and answers in IMS's shapes.

It is the independent check on the client, so it imports nothing from the
refresher package (see `.importlinter`): a misreading of IMS shared by both
sides would otherwise pass every test. Only the standard library's
`http.server`, PyJWT and cryptography.

What it serves:

- `POST /ims/exchange/jwt` (the legacy JWT exchange; `expires_in` in
  milliseconds) and `POST /ims/token/v3` (OAuth client_credentials;
  `expires_in` in seconds), with IMS's error bodies and an `x-debug-id` header on
  every response;
- fault injection (5xx, 429 with Retry-After, delays, dropped connections,
  malformed bodies, revocation) from a queue and/or at a seeded random rate;
- a control API under `/__emulator/` (loopback peers only) for tests that run
  it as a subprocess; `Emulator` is the same thing in-process.

Limits: tokens are signed with a key generated at each start (nothing here
verifies them against IMS's published keys), and there is one IMS region.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import hmac
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "AEM_CREDENTIALS_FILE",
    "CA_FILE",
    "FAULT_KINDS",
    "OAUTH_CREDENTIALS_FILE",
    "Emulator",
    "add_arguments",
    "run",
    "write_credentials",
]

_log = logging.getLogger(__name__)

AEM_CREDENTIALS_FILE = "aem-service-credentials.json"
OAUTH_CREDENTIALS_FILE = "oauth-server-to-server.json"
CA_FILE = "ca.pem"
_CA_KEY_FILE = "ca-key.pem"

JWT_PATHS = frozenset({"/ims/exchange/jwt", "/ims/exchange/jwt/"})
OAUTH_PATH = "/ims/token/v3"
CONTROL_PREFIX = "/__emulator/"

# Every kind of injected fault. `invalid_client` is a permanent rejection
# (revocation), so it is not in the default random mix of transient faults.
FAULT_KINDS = (
    "500",
    "502",
    "503",
    "504",
    "429",
    "delay",
    "drop",
    "badjson",
    "html",
    "invalid_client",
)
DEFAULT_FAULT_MIX = ("500", "502", "503", "504", "429", "delay", "drop", "badjson", "html")

_FORM = "application/x-www-form-urlencoded"
# IMS also takes multipart forms: Adobe's own `@adobe/jwt-auth` posts with `form-data`.
_MULTIPART = "multipart/form-data"
_JSON = "application/json;charset=utf-8"  # what IMS sends: clients must not compare equality
_HTML = "text/html;charset=utf-8"
_MAX_BODY_BYTES = 64 * 1024
_MAX_JWT_AHEAD_S = 24 * 3600  # IMS refuses assertions that expire more than a day ahead
_METASCOPE_CLAIM = re.compile(r"^https?://[^/]+/s/")
_AEM_METASCOPES = ("ent_aem_cloud_api",)
_OAUTH_SCOPES = ("openid", "AdobeID", "read_organizations")


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class _Client:
    """A registered integration. JWT needs a certificate; OAuth needs scopes."""

    client_id: str
    client_secrets: tuple[str, ...] = field(repr=False)
    certificate: x509.Certificate | None = field(default=None, repr=False)
    org: str = ""
    technical_account_id: str = ""
    metascopes: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()

    def secret_matches(self, candidate: str) -> bool:
        # Compare every secret in constant time; two may be valid during a rotation.
        return any(hmac.compare_digest(candidate.encode(), s.encode()) for s in self.client_secrets)


def _names(value: Sequence[str] | str | None) -> frozenset[str]:
    """Scopes or metascopes given as a list or as a comma-separated string."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    if not all(isinstance(item, str) for item in items):
        raise ValueError("scopes and metascopes must be strings")
    return frozenset(item.strip() for item in items if item.strip())


def _load_certificate(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError("certificate_pem is not a PEM X.509 certificate") from exc
    if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
        raise TypeError("certificate_pem must hold an RSA public key (the exchange is RS256)")
    return certificate


# --------------------------------------------------------------------------- credentials


def _crlf(pem: bytes) -> str:
    # The AEM Developer Console ships PEM blocks with CRLF line endings.
    return pem.decode("ascii").replace("\n", "\r\n")


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with an explicit mode: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask must not widen or narrow it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _write_aem_credentials(directory: Path, ims_endpoint: str, cert_days: float) -> Path:
    client_id = f"cm-p{secrets.randbelow(90000) + 10000}-e{secrets.randbelow(900000) + 100000}"
    client_id += f"-integration-{secrets.token_hex(3)}"
    key, certificate = _self_signed_rsa(client_id, cert_days)
    account = f"{secrets.token_hex(12).upper()}@techacct.adobe.com"
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
            "privateKey": _crlf(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as Adobe ships it
                    serialization.NoEncryption(),
                )
            ),
            "publicKey": _crlf(certificate.public_bytes(serialization.Encoding.PEM)),
            "certificateExpirationDate": certificate.not_valid_after_utc.strftime(
                "%Y-%m-%dT%H:%M:%S.000Z"
            ),
        },
        "statusCode": 200,
    }
    path = directory / AEM_CREDENTIALS_FILE
    _write_file(path, json.dumps(document, indent=2).encode(), 0o600)
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
    _write_file(path, json.dumps(document, indent=2).encode(), 0o600)
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


def _ensure_credentials(directory: Path, ims_endpoint: str, cert_days: float) -> dict[str, Path]:
    """Write whichever credential file is missing; keep existing ones (a restart accepts them)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    aem = directory / AEM_CREDENTIALS_FILE
    oauth = directory / OAUTH_CREDENTIALS_FILE
    if not aem.exists():
        _write_aem_credentials(directory, ims_endpoint, cert_days)
    if not oauth.exists():
        _write_oauth_credentials(directory, ims_endpoint)
    return {"aem": aem, "oauth": oauth}


def _clients_from_files(paths: Iterable[Path]) -> list[_Client]:
    """Read the emulator's own credential files back into clients. Raises ValueError."""
    clients = []
    for path in paths:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise TypeError(f"{path}: not a JSON object")
        integration = document.get("integration", document)
        if isinstance(integration, dict) and "technicalAccount" in integration:
            account = integration["technicalAccount"]
            clients.append(
                _Client(
                    client_id=str(account["clientId"]),
                    client_secrets=(str(account["clientSecret"]),),
                    certificate=_load_certificate(str(integration["publicKey"])),
                    org=str(integration["org"]),
                    technical_account_id=str(integration["id"]),
                    metascopes=_names(integration["metascopes"]),
                )
            )
        elif "client_id" in document:
            raw_secrets = document.get("client_secrets") or [document["client_secret"]]
            clients.append(
                _Client(
                    client_id=str(document["client_id"]),
                    client_secrets=tuple(str(s) for s in raw_secrets),
                    org=str(document.get("org_id", "")),
                    technical_account_id=str(document.get("technical_account_id", "")),
                    scopes=_names(document.get("scopes") or document.get("scope", "")),
                )
            )
        else:
            raise ValueError(f"{path}: neither AEM nor OAuth credentials")
    return clients


# --------------------------------------------------------------------------- TLS


def _ec_key() -> ec.EllipticCurvePrivateKey:
    # EC keys for TLS: generated in microseconds, where RSA takes a noticeable share of a test.
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
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
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_file(key_path, _pem_key(key), 0o600)
    _write_file(ca_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, certificate


def _tls_context(tls_dir: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 / localhost / ::1, signed by the CA in `tls_dir`."""
    ca_key, ca = _certificate_authority(tls_dir)
    key = _ec_key()
    now = datetime.now(UTC)
    # The extensions strict verifiers (Python 3.13's VERIFY_X509_STRICT) insist on.
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files: hand it a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="ims-emulator-tls-") as scratch:
        cert_file, key_file = Path(scratch, "server.pem"), Path(scratch, "server-key.pem")
        _write_file(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o600)
        _write_file(key_file, _pem_key(key), 0o600)
        context.load_cert_chain(cert_file, key_file)
    return context, tls_dir / CA_FILE


# --------------------------------------------------------------------------- state


class _ImsError(Exception):
    """IMS refused the request: the status and the error body it answers with."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.description = description


def _fault_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):  # a bare "503" would otherwise read as "5", "0", "3"
        raise TypeError("expected a list of fault kinds")
    checked = tuple(str(kind).strip() for kind in kinds)
    unknown = [kind for kind in checked if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    return checked


class _State:
    """Everything the request threads share, behind one lock."""

    def __init__(self, *, token_ttl_s: float, tls: bool) -> None:
        if not token_ttl_s > 0:
            raise ValueError("token_ttl_s must be positive")
        self.token_ttl_s = token_ttl_s
        self.tls = tls
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # ends injected delays at shutdown
        # Issued tokens are signed with a key of the emulator's own, never a client's.
        self.token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.clients: dict[str, _Client] = {}
        self.down = False
        self.queue: deque[str] = deque()
        self.fail_rate = 0.0
        self.mix: tuple[str, ...] = DEFAULT_FAULT_MIX
        self.retry_after_s = 1
        self.delay_s = 5.0
        # Fault injection is test noise, not security: a seeded PRNG makes a soak replayable.
        self.rng = random.Random()  # noqa: S311
        self.requests: Counter[str] = Counter()
        self.issued = 0
        self.rejected: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    # -- configuration

    def add_client(self, client: _Client) -> None:
        with self.lock:
            self.clients[client.client_id] = client

    def register_client(
        self,
        client_id: str,
        client_secrets: Sequence[str] | None,
        *,
        certificate_pem: str | bytes | None = None,
        org: str | None = None,
        technical_account_id: str | None = None,
        metascopes: Sequence[str] | str | None = None,
        scopes: Sequence[str] | str | None = None,
    ) -> None:
        """Create a client or update the given fields of an existing one. Raises ValueError."""
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        if client_secrets is not None and (
            isinstance(client_secrets, str)
            or not all(isinstance(s, str) and s for s in client_secrets)
        ):
            raise ValueError("client_secrets must be a list of non-empty strings")
        certificate = None if certificate_pem is None else _load_certificate(certificate_pem)
        with self.lock:
            current = self.clients.get(client_id)
            if current is None:
                if client_secrets is None:
                    raise ValueError("a new client needs client_secrets")
                current = _Client(client_id=client_id, client_secrets=())
            updated = replace(
                current,
                client_secrets=(
                    current.client_secrets if client_secrets is None else tuple(client_secrets)
                ),
                certificate=current.certificate if certificate is None else certificate,
                org=current.org if org is None else str(org),
                technical_account_id=(
                    current.technical_account_id
                    if technical_account_id is None
                    else str(technical_account_id)
                ),
                metascopes=current.metascopes if metascopes is None else _names(metascopes),
                scopes=current.scopes if scopes is None else _names(scopes),
            )
            self.clients[client_id] = updated

    def set_faults(
        self,
        *,
        queue: Sequence[str] | None = None,
        fail_rate: float | None = None,
        mix: Sequence[str] | None = None,
        retry_after: int | None = None,
        delay_seconds: float | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Change the given settings (None leaves one as it is). Raises ValueError."""
        new_queue = None if queue is None else _fault_kinds(queue)
        new_mix = None if mix is None else _fault_kinds(mix)
        if new_mix is not None and not new_mix:
            raise ValueError("the fault mix must name at least one kind")
        if fail_rate is not None and not 0.0 <= float(fail_rate) <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        # Retry-After is delta-seconds: an integer by RFC 9110.
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0
        ):
            raise ValueError("retry_after must be a non-negative integer")
        if delay_seconds is not None and not float(delay_seconds) >= 0:
            raise ValueError("delay_seconds must be non-negative")
        with self.lock:
            if new_queue is not None:
                self.queue = deque(new_queue)
            if fail_rate is not None:
                self.fail_rate = float(fail_rate)
            if new_mix is not None:
                self.mix = new_mix
            if retry_after is not None:
                self.retry_after_s = retry_after
            if delay_seconds is not None:
                self.delay_s = float(delay_seconds)
            if seed is not None:
                self.rng.seed(seed)
            return self._fault_settings()

    def _fault_settings(self) -> dict[str, Any]:
        return {
            "queue": list(self.queue),
            "fail_rate": self.fail_rate,
            "mix": list(self.mix),
            "retry_after": self.retry_after_s,
            "delay_seconds": self.delay_s,
        }

    def set_down(self, down: bool) -> None:
        with self.lock:
            self.down = down

    # -- per request

    def count_request(self, kind: str) -> bool:
        """Count a token request; True if the emulator is down (the request is dropped)."""
        with self.lock:
            self.requests[kind] += 1
            if self.down:
                self.faults["down"] += 1
            return self.down

    def take_fault(self) -> str | None:
        """The fault for this token request: the queue first, then the random rate."""
        with self.lock:
            if self.queue:
                kind: str | None = self.queue.popleft()
            elif self.fail_rate > 0 and self.rng.random() < self.fail_rate:
                kind = self.rng.choice(self.mix)
            else:
                kind = None
            if kind is not None:
                self.faults[kind] += 1
            return kind

    def count_rejected(self, error: str) -> None:
        with self.lock:
            self.rejected[error] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": {"jwt": self.requests["jwt"], "oauth": self.requests["oauth"]},
                "issued": self.issued,
                "rejected": dict(self.rejected),
                "faults": dict(self.faults),
                "down": self.down,
                "queued_faults": len(self.queue),
            }

    def reset_stats(self) -> None:
        with self.lock:
            self.requests.clear()
            self.issued = 0
            self.rejected.clear()
            self.faults.clear()

    # -- the two exchanges

    def known_client(self, client_id: str) -> bool:
        with self.lock:
            return client_id in self.clients

    def _authenticate(self, form: dict[str, str]) -> _Client:
        client_id, secret = _required(form, "client_id"), _required(form, "client_secret")
        with self.lock:
            client = self.clients.get(client_id)
        if client is None:
            raise _ImsError(401, "invalid_client", "invalid client_id parameter")
        if not client.secret_matches(secret):
            raise _ImsError(401, "invalid_client", "invalid client_secret parameter")
        return client

    def exchange_jwt(self, form: dict[str, str], base: str) -> dict[str, Any]:
        """The legacy JWT exchange: `expires_in` in milliseconds."""
        assertion = _required(form, "jwt_token")
        client = self._authenticate(form)
        if client.certificate is None:
            raise _ImsError(400, "unauthorized_client", "client has no certificate binding")
        metascopes = _verify_assertion(assertion, client, base, time.time())
        token, ttl_ms = self._issue(client, client.technical_account_id, ",".join(metascopes))
        return {"token_type": "bearer", "access_token": token, "expires_in": ttl_ms}

    def exchange_oauth(self, form: dict[str, str]) -> dict[str, Any]:
        """OAuth Server-to-Server (client_credentials): `expires_in` in seconds."""
        if form.get("grant_type") != "client_credentials":
            raise _ImsError(400, "unsupported_grant_type", "grant_type must be client_credentials")
        client = self._authenticate(form)
        if not client.scopes:
            raise _ImsError(400, "unauthorized_client", "client_credentials not enabled")
        requested = [s.strip() for s in form.get("scope", "").split(",") if s.strip()]
        if not requested:
            raise _ImsError(400, "invalid_scope", "no scope requested")
        ungranted = sorted(set(requested) - client.scopes)
        if ungranted:
            raise _ImsError(400, "invalid_scope", f"scope not granted: {','.join(ungranted)}")
        user_id = client.technical_account_id or f"{client.client_id}@AdobeID"
        token, _ = self._issue(client, user_id, ",".join(requested))
        # Round down, as IMS does, but never 0: a zero lifetime would be a hot loop.
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": max(1, int(self.token_ttl_s)),
        }

    def _issue(self, client: _Client, user_id: str, scope: str) -> tuple[str, int]:
        now_ms = int(time.time() * 1000)
        ttl_ms = max(1, round(self.token_ttl_s * 1000))
        payload = {
            "id": f"{now_ms}_{uuid.uuid4()}_ue1",
            "type": "access_token",
            "client_id": client.client_id,
            "user_id": user_id,
            "as": "ims-na1",
            "aa_id": user_id,
            # IMS writes both as strings of milliseconds.
            "created_at": str(now_ms),
            "expires_in": str(ttl_ms),
            "scope": scope,
        }
        headers = {"kid": "ims_na1-key-at-1", "x5u": "ims_na1-key-at-1.cer", "itt": "at"}
        token = jwt.encode(payload, self.token_key, algorithm="RS256", headers=headers)
        with self.lock:
            self.issued += 1
        return token, ttl_ms


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise _ImsError(400, "bad_request", f"missing required parameter {name}")
    return value


def _verify_assertion(assertion: str, client: _Client, base: str, now: float) -> list[str]:
    """Check the JWT as IMS does; return the metascopes it asks for. Raises _ImsError."""
    assert client.certificate is not None  # noqa: S101 - the caller checked
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError as exc:
        raise _ImsError(400, "invalid_token", "JWT token is incorrectly formatted") from exc
    if header.get("alg") != "RS256":
        raise _ImsError(400, "invalid_token", "JWT must be signed with RS256")
    # Verify the signature only: the claims are checked below, one IMS error per case.
    public_key = client.certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):  # registration checked it; mypy cannot know
        raise _ImsError(400, "invalid_token", "certificate key is not RSA")
    jws = jwt.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": True})
    try:
        raw = jws.decode(assertion, key=public_key, algorithms=["RS256"])
    except jwt.InvalidSignatureError as exc:
        raise _ImsError(
            400, "invalid_token", "could not match JWT signature to any of the bindings"
        ) from exc
    except jwt.InvalidKeyError as exc:
        raise _ImsError(400, "invalid_token", "certificate key is too short") from exc
    except jwt.InvalidTokenError as exc:
        raise _ImsError(400, "invalid_token", "JWT token is incorrectly formatted") from exc
    if client.certificate.not_valid_after_utc.timestamp() <= now:
        raise _ImsError(400, "invalid_token", "the certificate binding has expired")
    try:
        claims = json.loads(raw)
    except ValueError as exc:
        raise _ImsError(400, "invalid_token", "JWT payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise _ImsError(400, "invalid_token", "JWT payload is not an object")

    if claims.get("iss") != client.org:
        raise _ImsError(400, "invalid_token", "iss does not match the client's organization")
    if claims.get("sub") != client.technical_account_id:
        raise _ImsError(400, "invalid_token", "sub does not match the technical account")
    if claims.get("aud") != f"{base}/c/{client.client_id}":
        raise _ImsError(400, "invalid_token", "aud is not {ims base}/c/{client_id}")
    exp = claims.get("exp")
    # IMS parses exp as a long: 1.7e9 or 1700000000.0 is malformed, not rounded.
    if isinstance(exp, bool) or not isinstance(exp, int):
        raise _ImsError(400, "invalid_token", "exp must be an integer number of seconds")
    if exp <= now:
        raise _ImsError(400, "invalid_token", "JWT token has expired")
    if exp > now + _MAX_JWT_AHEAD_S:
        raise _ImsError(400, "invalid_token", "exp is more than 24 hours ahead")

    prefix = f"{base}/s/"
    requested = []
    for name, value in claims.items():
        if not _METASCOPE_CLAIM.match(name):
            continue
        if not name.startswith(prefix):
            raise _ImsError(400, "invalid_scope", "metascope claim names another IMS host")
        metascope = name[len(prefix) :]
        if value is not True or metascope not in client.metascopes:
            raise _ImsError(400, "invalid_scope", f"metascope not granted: {metascope}")
        requested.append(metascope)
    if not requested:
        raise _ImsError(400, "invalid_scope", "no metascope claim in the JWT")
    return requested


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=50)
    except ValueError as exc:
        raise _ImsError(400, "bad_request", "malformed form body") from exc
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        raise _ImsError(400, "bad_request", f"parameter given more than once: {repeated[0]}")
    return {name: values[0] for name, values in fields.items()}


def _parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """A multipart/form-data body as a flat form (text fields only), via the stdlib's
    email parser (the `cgi` module is gone from Python 3.13)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise _ImsError(400, "bad_request", "malformed multipart body")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            raise _ImsError(400, "bad_request", "malformed multipart field")
        if name in fields:
            raise _ImsError(400, "bad_request", f"parameter given more than once: {name}")
        try:
            fields[name] = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _ImsError(400, "bad_request", "multipart field is not UTF-8") from None
        if len(fields) > 50:
            raise _ImsError(400, "bad_request", "too many fields")
    return fields


# --------------------------------------------------------------------------- HTTP


_HTML_PAGES = {
    200: "<html><head><title>Adobe</title></head><body><h1>Scheduled maintenance</h1>"
    "<p>We'll be back shortly.</p></body></html>",
    502: "<html><head><title>502 Bad Gateway</title></head><body><center>"
    "<h1>502 Bad Gateway</h1></center></body></html>",
    504: "<html><head><title>504 Gateway Time-out</title></head><body><center>"
    "<h1>504 Gateway Time-out</h1></center></body></html>",
}


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like IMS: a client's pooled connection matters
    server_version = "IMS-emulator"
    timeout = 30  # an idle keep-alive connection gives its thread back after this
    server: _Server

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        # Without TCP_NODELAY, a kept-alive exchange stalls ~40 ms on Nagle + delayed ACK.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.request, ssl.SSLSocket):
            # Handshake here, in the connection's own thread, bounded by the timeout:
            # a stalled client must not block the accept loop.
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        # Silenced: the base logs the raw request line; _send logs one safe line instead.
        pass

    # Every method goes through one dispatcher so that each gets IMS's 405 and a debug id.
    def do_GET(self) -> None:
        self._dispatch()

    # http.server looks these names up: N815 does not apply to them.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (malformed request line, oversized headers)
        # get IMS's JSON shape and a debug id like everything else.
        self.close_connection = True
        self._log_client = "-"
        # A garbled request line leaves http.server assuming HTTP/0.9, which has no
        # headers at all; answer as HTTP/1.0 so even this reply carries its debug id.
        if getattr(self, "request_version", "") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"
        description = message or HTTPStatus(code).phrase
        self._send_json(code, {"error": "bad_request", "error_description": description})

    # -- plumbing

    def _dispatch(self) -> None:
        self._log_client = "-"
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            return
        if path in JWT_PATHS:
            self._token_request("jwt", body)
        elif path == OAUTH_PATH:
            self._token_request("oauth", body)
        elif path.startswith(CONTROL_PREFIX):
            self._control(path[len(CONTROL_PREFIX) :].rstrip("/"), body)
        else:
            self._error(404, "not_found", "no such endpoint")

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "bad_request", "a Content-Length is required")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(400, "bad_request", "invalid Content-Length")
            return None
        if length > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would poison the connection
            self._error(413, "bad_request", "request body too large")
            return None
        return self.rfile.read(length)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        outcome: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        debug_id = str(uuid.uuid4())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("x-debug-id", debug_id)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log_outcome(str(status), outcome, debug_id)

    def _log_outcome(self, status: str, outcome: str, debug_id: str) -> None:
        # Method, path without the query, status, outcome, client id if known, debug id:
        # nothing a client sent as a secret can reach this line.
        path = urlsplit(self.path or "").path if getattr(self, "path", None) else "-"
        _log.info(
            "%s %s %s %s client_id=%s debug_id=%s",
            self.command or "-",
            path,
            status,
            outcome,
            getattr(self, "_log_client", "-"),
            debug_id,
        )

    def _send_json(
        self,
        status: int,
        document: dict[str, Any],
        outcome: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        self._send(status, body, _JSON, outcome or str(document.get("error", "ok")), headers)

    def _error(
        self,
        status: int,
        error: str,
        description: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        document = {"error": error, "error_description": description}
        self._send_json(status, document, headers=headers)

    def _reject(self, rejection: _ImsError, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.server.state.count_rejected(rejection.error)
        self._error(rejection.status, rejection.error, rejection.description, headers)

    def _drop(self, outcome: str) -> None:
        """Close the connection without a byte of answer (the client sees a reset/EOF)."""
        self.close_connection = True
        self._log_outcome("-", outcome, "-")
        # The plain socket's shutdown, even under TLS: the point is an abrupt end.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.request, socket.SHUT_RDWR)

    # -- token endpoints

    def _token_request(self, kind: str, body: bytes) -> None:
        state = self.server.state
        if state.count_request(kind):
            self._drop("down")
            return
        if self.command != "POST":
            self._reject(
                _ImsError(405, "method_not_allowed", "only POST is accepted"),
                headers=[("Allow", "POST")],
            )
            return
        content_type = self.headers.get_content_type()
        if content_type not in (_FORM, _MULTIPART):
            self._reject(
                _ImsError(400, "bad_request", f"Content-Type must be {_FORM} or {_MULTIPART}")
            )
            return
        fault = state.take_fault()
        if fault is not None and self._inject(fault):
            return
        try:
            form = (
                _parse_form(body)
                if content_type == _FORM
                else _parse_multipart(body, self.headers.get("Content-Type", ""))
            )
            if state.known_client(form.get("client_id", "")):
                self._log_client = form["client_id"]
            if kind == "jwt":
                answer = state.exchange_jwt(form, self._base_url())
            else:
                answer = state.exchange_oauth(form)
        except _ImsError as rejection:
            self._reject(rejection)
            return
        self._send_json(200, answer, outcome="issued")

    def _base_url(self) -> str:
        """The IMS base as this client reached it: what `aud` and metascope claims must name."""
        scheme = "https" if self.server.state.tls else "http"
        host = self.headers.get("Host") or self.server.authority
        return f"{scheme}://{host}"

    def _inject(self, kind: str) -> bool:
        """Apply one fault; True if it answered (or dropped) the request."""
        state = self.server.state
        outcome = f"fault:{kind}"
        if kind == "delay":
            if state.stopping.wait(state.delay_s):
                self._drop("stopped during delay")
                return True
            return False  # then answer normally, late
        if kind == "drop":
            self._drop(outcome)
        elif kind == "429":
            self._send_json(
                429,
                {"error": "too_many_requests", "error_description": "rate limit exceeded"},
                outcome,
                headers=[("Retry-After", str(state.retry_after_s))],
            )
        elif kind in ("500", "503"):
            # Errors from IMS itself come as JSON; the load balancer's (502, 504) as HTML.
            error = "server_error" if kind == "500" else "temporarily_unavailable"
            description = "internal error" if kind == "500" else "service unavailable"
            document = {"error": error, "error_description": description}
            self._send_json(int(kind), document, outcome)
        elif kind in ("502", "504"):
            self._send(int(kind), _HTML_PAGES[int(kind)].encode(), _HTML, outcome)
        elif kind == "badjson":
            self._send(200, b'{"token_type":"bearer","access_token":', _JSON, outcome)
        elif kind == "html":
            self._send(200, _HTML_PAGES[200].encode(), _HTML, outcome)
        elif kind == "invalid_client":
            document = {"error": "invalid_client", "error_description": "client revoked"}
            self._send_json(401, document, outcome)
        return True

    # -- control API

    def _control(self, route: str, body: bytes) -> None:
        if not _is_loopback(self.client_address[0]):
            self._error(403, "forbidden", "the control API answers loopback peers only")
            return
        state = self.server.state
        if route == "stats":
            if self.command != "GET":
                self._error(405, "method_not_allowed", "use GET", [("Allow", "GET")])
                return
            self._send_json(200, state.stats(), "stats")
            return
        if route not in ("faults", "down", "up", "clients", "reset"):
            self._error(404, "not_found", "no such control endpoint")
            return
        if self.command != "POST":
            self._error(405, "method_not_allowed", "use POST", [("Allow", "POST")])
            return
        try:
            document = json.loads(body or b"{}")
        except ValueError:
            document = None
        if not isinstance(document, dict):
            self._error(400, "bad_request", f"{route}: expected a JSON object")
            return
        try:
            answer = self._control_post(route, document)
        except (ValueError, TypeError, KeyError) as exc:
            self._error(400, "bad_request", f"{route}: {exc}")
            return
        self._send_json(200, answer, route)

    def _control_post(self, route: str, document: dict[str, Any]) -> dict[str, Any]:
        state = self.server.state
        if route == "faults":
            unknown = set(document) - {
                "queue",
                "fail_rate",
                "mix",
                "retry_after",
                "delay_seconds",
                "seed",
            }
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            return state.set_faults(**document)
        if route in ("down", "up"):
            state.set_down(route == "down")
            return {"down": route == "down"}
        if route == "reset":
            state.reset_stats()
            return {"reset": True}
        known = {
            "client_id",
            "client_secrets",
            "certificate_pem",
            "org",
            "technical_account_id",
            "metascopes",
            "scopes",
        }
        # Refuse a typo before changing anything: half an update is worse than none.
        if set(document) - known:
            raise ValueError(f"unknown field(s) {sorted(set(document) - known)}")
        if "client_id" not in document:
            raise ValueError("client_id is required")
        state.register_client(
            document["client_id"],
            document.get("client_secrets"),
            certificate_pem=document.get("certificate_pem"),
            org=document.get("org"),
            technical_account_id=document.get("technical_account_id"),
            metascopes=document.get("metascopes"),
            scopes=document.get("scopes"),
        )
        return {"client_id": document["client_id"], "registered": True}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up shutdown

    def __init__(self, host: str, port: int, state: _State) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def authority(self) -> str:
        host = str(self.server_address[0])
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.server_port}" if ":" in host else f"{host}:{self.server_port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End kept-alive connections too: a stopped emulator must stop answering."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a read timeout, a failed TLS handshake)
        # is routine here: one line, no traceback, and only the exception's type.
        if not self.state.stopping.is_set():
            _log.debug("connection from %s ended: %s", client_address[0], sys.exc_info()[0])


# --------------------------------------------------------------------------- public API


class Emulator:
    """An IMS emulator serving on a real socket from a background thread.

    `Emulator.start(dir)` writes credentials into `dir` unless they are there
    already (then it accepts those), registers them, and listens.
    """

    def __init__(
        self,
        server: _Server,
        state: _State,
        *,
        credentials_dir: Path | None,
        credential_files: dict[str, Path],
        ca_path: Path | None,
    ) -> None:
        self._server = server
        self._state = state
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._stopped = False
        self.credentials_dir = credentials_dir
        self.credential_files = credential_files
        self.ca_path = ca_path
        self.host = str(server.server_address[0])
        self.port: int = server.server_port
        self.endpoint = server.authority  # host:port, as in the AEM JSON's imsEndpoint
        self.base_url = f"{'https' if state.tls else 'http'}://{self.endpoint}"
        self.token_public_key_pem = (
            state.token_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode()
        )

    @classmethod
    def start(
        cls,
        credentials_dir: Path | None,
        *,
        token_ttl_s: float = 86400,
        tls: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_days: float = 365,
        tls_dir: Path | None = None,
        generate: bool = True,
    ) -> Emulator:
        """Bind, register the credentials in `credentials_dir`, and serve in a thread.

        With `generate` (the default) missing credential files are written first;
        without it only existing files are loaded (FileNotFoundError if none).
        Raises OSError if the address cannot be bound, ValueError on bad settings.
        """
        state = _State(token_ttl_s=token_ttl_s, tls=tls)
        ca_path = None
        context = None
        if tls:
            tls_home = tls_dir or credentials_dir
            if tls_home is None:
                raise ValueError("TLS needs a directory for ca.pem (tls_dir or credentials_dir)")
            context, ca_path = _tls_context(tls_home)
        server = _Server(host, port, state)
        try:
            files: dict[str, Path] = {}
            if credentials_dir is not None:
                if generate:
                    files = _ensure_credentials(credentials_dir, server.authority, cert_days)
                else:
                    files = _existing_credentials(credentials_dir)
                for client in _clients_from_files(files.values()):
                    state.add_client(client)
            if context is not None:
                # Handshakes happen in each connection's thread (see _Handler.setup).
                server.socket = context.wrap_socket(
                    server.socket, server_side=True, do_handshake_on_connect=False
                )
        except BaseException:
            server.server_close()
            raise
        emulator = cls(
            server, state, credentials_dir=credentials_dir, credential_files=files, ca_path=ca_path
        )
        emulator._thread.start()
        return emulator

    def __enter__(self) -> Emulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Emulator(base_url={self.base_url!r}, credentials_dir={self.credentials_dir!r})"

    def stats(self) -> dict[str, Any]:
        """Counters: requests per flow, issued, rejected per error code, faults per kind."""
        return self._state.stats()

    def reset_stats(self) -> None:
        self._state.reset_stats()

    def set_faults(
        self,
        *,
        queue: Sequence[str] | None = None,
        fail_rate: float | None = None,
        mix: Sequence[str] | None = None,
        retry_after: int | None = None,
        delay_seconds: float | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Change fault injection; an argument left as None keeps its setting. `queue=[]` clears."""
        return self._state.set_faults(
            queue=queue,
            fail_rate=fail_rate,
            mix=mix,
            retry_after=retry_after,
            delay_seconds=delay_seconds,
            seed=seed,
        )

    def down(self) -> None:
        """From now on drop every token request without an answer (an outage)."""
        self._state.set_down(True)

    def up(self) -> None:
        self._state.set_down(False)

    def register_client(
        self,
        client_id: str,
        client_secrets: Sequence[str] | None = None,
        *,
        certificate_pem: str | bytes | None = None,
        org: str | None = None,
        technical_account_id: str | None = None,
        metascopes: Sequence[str] | str | None = None,
        scopes: Sequence[str] | str | None = None,
    ) -> None:
        """Register a client, or update the given fields of one (e.g. revoke a secret)."""
        self._state.register_client(
            client_id,
            client_secrets,
            certificate_pem=certificate_pem,
            org=org,
            technical_account_id=technical_account_id,
            metascopes=metascopes,
            scopes=scopes,
        )

    def stop(self) -> None:
        """Stop listening, end open connections and injected delays. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)


def _existing_credentials(directory: Path) -> dict[str, Path]:
    files = {
        name: directory / filename
        for name, filename in (("aem", AEM_CREDENTIALS_FILE), ("oauth", OAUTH_CREDENTIALS_FILE))
        if (directory / filename).is_file()
    }
    if not files:
        raise FileNotFoundError(
            f"no {AEM_CREDENTIALS_FILE} or {OAUTH_CREDENTIALS_FILE} in {directory}"
        )
    return files


# --------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _rate(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _fault_mix(text: str) -> list[str]:
    try:
        kinds = list(_fault_kinds(k for k in text.split(",") if k.strip()))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not kinds:
        raise argparse.ArgumentTypeError("name at least one fault kind")
    return kinds


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from exc
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every emulator flag to `parser` (the `refresher emulator` subcommand)."""
    net = parser.add_argument_group("listening")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    net.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    net.add_argument(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="write the bound port to this file (atomically) once listening",
    )
    net.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a generated CA; writes ca.pem into --tls-dir",
    )
    net.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="where ca.pem (and its key, reused on restart) live (default: the credentials dir)",
    )

    creds = parser.add_argument_group("credentials")
    where = creds.add_mutually_exclusive_group()
    where.add_argument(
        "--write-credentials",
        type=Path,
        metavar="DIR",
        help=f"generate {AEM_CREDENTIALS_FILE} and {OAUTH_CREDENTIALS_FILE} in DIR (mode 0600) "
        "and accept them; files already there are kept and accepted",
    )
    where.add_argument(
        "--credentials-dir",
        type=Path,
        metavar="DIR",
        help="accept the credentials already in DIR (written earlier by --write-credentials)",
    )
    creds.add_argument(
        "--cert-days",
        type=float,
        metavar="DAYS",
        default=365.0,
        help="validity of generated certificates in days; fractional or negative for tests "
        "(default: %(default)s)",
    )
    creds.add_argument(
        "--token-ttl",
        type=_positive_float,
        default=86400.0,
        metavar="SECONDS",
        help="lifetime of issued access tokens, fractions allowed (default: %(default)s)",
    )

    faults = parser.add_argument_group("fault injection")
    faults.add_argument(
        "--fault",
        action="append",
        choices=FAULT_KINDS,
        default=[],
        metavar="KIND",
        help="queue a fault for the next token request; repeat to queue several, in order "
        f"({', '.join(FAULT_KINDS)})",
    )
    faults.add_argument(
        "--fail-rate",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="probability (0..1) that a token request gets a random fault from --fault-mix",
    )
    faults.add_argument(
        "--fault-mix",
        type=_fault_mix,
        default=list(DEFAULT_FAULT_MIX),
        metavar="KINDS",
        help="comma-separated fault kinds for --fail-rate "
        f"(default: {','.join(DEFAULT_FAULT_MIX)})",
    )
    faults.add_argument(
        "--seed", type=int, metavar="N", help="seed for the random faults, to replay a run exactly"
    )
    faults.add_argument(
        "--retry-after",
        type=_non_negative_int,
        default=1,
        metavar="SECONDS",
        help="Retry-After sent with 429 faults (default: %(default)s)",
    )
    faults.add_argument(
        "--delay-seconds",
        type=_non_negative_float,
        default=5.0,
        metavar="SECONDS",
        help="how long a delay fault waits before answering (default: %(default)s)",
    )


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or until `stop` is set, if given). Returns an exit code.

    Signal handlers are installed only when `stop` is not given, and the
    previous ones are restored on return.
    """
    credentials_dir: Path | None = args.write_credentials or args.credentials_dir
    if args.tls and (args.tls_dir or credentials_dir) is None:
        print("emulator: --tls needs --tls-dir or a credentials directory", file=sys.stderr)
        return 2

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s emulator %(message)s"))
    previous_level, previous_propagate = _log.level, _log.propagate
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False  # one line per request on stderr, whatever the root logger does
    try:
        try:
            emulator = Emulator.start(
                credentials_dir,
                token_ttl_s=args.token_ttl,
                tls=args.tls,
                host=args.host,
                port=args.port,
                cert_days=args.cert_days,
                tls_dir=args.tls_dir,
                generate=args.credentials_dir is None,
            )
        except FileNotFoundError as exc:
            print(f"emulator: {exc}", file=sys.stderr)
            return 2
        except (OSError, ValueError, TypeError, KeyError) as exc:
            print(f"emulator: cannot start: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, OSError) else 2
        with emulator:
            emulator.set_faults(
                queue=args.fault,
                fail_rate=args.fail_rate,
                mix=args.fault_mix,
                retry_after=args.retry_after,
                delay_seconds=args.delay_seconds,
                seed=args.seed,
            )
            if args.port_file is not None:
                _write_file(args.port_file, str(emulator.port).encode(), 0o644)
            where = (
                f"credentials in {credentials_dir}"
                if credentials_dir
                else "no credentials: register clients with POST /__emulator/clients"
            )
            tls_note = f"; CA certificate {emulator.ca_path}" if emulator.ca_path else ""
            print(
                f"IMS emulator listening on {emulator.base_url} ({where}{tls_note})",
                file=sys.stderr,
                flush=True,
            )
            _wait_for_stop(stop)
        return 0
    finally:
        _log.removeHandler(handler)
        _log.setLevel(previous_level)
        _log.propagate = previous_propagate


def _wait_for_stop(stop: threading.Event | None) -> None:
    if stop is not None:
        stop.wait()
        return
    event = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A short timeout keeps the main thread responsive to signals on every platform.
        while not event.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m refresher.emulator",
        description="A local Adobe IMS emulator (JWT exchange and OAuth Server-to-Server).",
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_main())
