"""The JWT assertion: exactly the claims IMS checks, in its units, signed RS256; and the
IMS base URL the claims are built on."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest

from refresher.assertion import build_claims, sign
from refresher.config import ims_base_url
from refresher.credentials import Credentials, load_credentials
from refresher.errors import ConfigError
from tests.support import keys

NOW = datetime(2026, 11, 26, 12, 0, 0, 750000, tzinfo=UTC)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory = tmp_path_factory.mktemp("assertion")
    document = keys.aem_document(metascopes="ent_aem_cloud_api,ent_cloudmgr_sdk")
    return load_credentials(keys.write_json(Path(directory) / "aem.json", document))


def test_claims_are_exactly_what_ims_checks(credentials: Credentials) -> None:
    """iss=org, sub=technical account, aud={base}/c/{client}, integer exp, one claim per
    metascope, and nothing else."""
    base = "https://ims-na1.adobelogin.com"
    claims = build_claims(credentials, base, NOW, 300)
    assert claims == {
        "iss": keys.ORG_ID,
        "sub": keys.TECHNICAL_ACCOUNT_ID,
        "aud": f"{base}/c/{keys.CLIENT_ID}",
        "exp": int(NOW.timestamp()) + 300,
        f"{base}/s/ent_aem_cloud_api": True,
        f"{base}/s/ent_cloudmgr_sdk": True,
    }
    assert isinstance(claims["exp"], int)


def test_signature_is_rs256_and_verifies(credentials: Credentials) -> None:
    """The signed assertion is RS256 and verifies against the key's public half."""
    base = "https://ims-na1.adobelogin.com"
    token = sign(build_claims(credentials, base, NOW, 300), credentials.private_key)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    decoded = jwt.decode(
        token,
        credentials.private_key.public_key(),
        algorithms=["RS256"],
        audience=f"{base}/c/{keys.CLIENT_ID}",
        options={"verify_exp": False},
    )
    assert decoded["iss"] == keys.ORG_ID


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        (None, "https://ims-na1.adobelogin.com"),
        ("ims-na1.adobelogin.com", "https://ims-na1.adobelogin.com"),
        ("https://ims-na1-stg1.adobelogin.com/", "https://ims-na1-stg1.adobelogin.com"),
        ("https://ims.example:8443/some/path?q=1", "https://ims.example:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ],
)
def test_base_url_is_scheme_and_host(endpoint: str | None, base: str) -> None:
    """{base} is the scheme and host of --ims-endpoint, https by default, as jwt-auth does."""
    assert ims_base_url(endpoint) == base


def test_base_url_rejects_other_schemes() -> None:
    """An ftp:// endpoint is a configuration error."""
    with pytest.raises(ConfigError):
        ims_base_url("ftp://ims.example")
