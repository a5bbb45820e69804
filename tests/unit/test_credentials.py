"""refresher.credentials: every shape, every key form, not-ready versus permanent, no leaks."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.credentials import (
    MAX_FILE_BYTES,
    Credentials,
    change_signature,
    load_credentials,
    load_settled,
)
from refresher.errors import EXIT_USAGE, CredentialsError, CredentialsNotReady
from tests.support import keys
from tests.support.leaks import assert_no_leak

# `make fuzz` sets FUZZ_EXAMPLES=10000; the default keeps the suite fast.
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # the first example of a run pays for one RSA key check (~50 ms)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="session")
def pair() -> keys.KeyPair:
    return keys.rsa_keypair()


@pytest.fixture(scope="session")
def other_pair() -> keys.KeyPair:
    return keys.rsa_keypair("other")


@pytest.fixture(scope="session")
def encrypted_pems(pair: keys.KeyPair) -> keys.SecretMap:
    # Serialised once: encryption salts differ per call, and leak checks need the exact text.
    return keys.SecretMap(
        pkcs8=pair.pkcs8_pem(passphrase=keys.PASSPHRASE),
        pkcs1=pair.pkcs1_pem(passphrase=keys.PASSPHRASE),
    )


@pytest.fixture(scope="session")
def all_secrets(pair: keys.KeyPair, encrypted_pems: keys.SecretMap) -> keys.SecretTexts:
    return keys.SECRETS.plus(*pair.secrets(), *encrypted_pems.values())


def same_key(creds: Credentials, pair: keys.KeyPair) -> bool:
    assert creds.private_key is not None
    return creds.private_key.public_key().public_numbers() == pair.key.public_key().public_numbers()


def failure(
    path: Path,
    secrets: keys.SecretTexts,
    kind: type[CredentialsError] = CredentialsError,
    **kwargs: Any,
) -> CredentialsError:
    """Load, expect `kind` exactly, and check the message is one leak-free line."""
    with pytest.raises(CredentialsError) as info:
        load_credentials(path, **kwargs)
    error = info.value
    message = str(error)
    assert_no_leak(message, secrets)  # first: the checks below print the message
    assert_no_leak(repr(error), secrets)
    assert type(error) is kind, f"{type(error).__name__}: {error}"
    assert "\n" not in message and "\r" not in message
    # No library exception carrying input bytes rides along into a traceback.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


# --- shapes ----------------------------------------------------------------------------------


def test_aem_service_credentials_load_as_jwt(tmp_path: Path, pair: keys.KeyPair) -> None:
    """The AEM Developer Console JSON yields every JWT field, the key and the certificate expiry."""
    path = keys.write_json(tmp_path / "aem.json", keys.aem_document(pair))
    creds = load_credentials(path)
    assert creds.flow == "jwt"
    assert creds.source == str(path)
    assert creds.client_id == keys.CLIENT_ID
    assert creds.client_secrets == (keys.CLIENT_SECRET,)
    assert creds.ims_endpoint == keys.IMS_HOST
    assert creds.org_id == keys.ORG_ID
    assert creds.technical_account_id == keys.TECHNICAL_ACCOUNT_ID
    assert creds.metascopes == keys.METASCOPES
    assert creds.scopes == ()
    assert same_key(creds, pair)
    assert creds.key_size == 2048
    assert creds.certificate_not_after == keys.NOT_AFTER
    assert creds.certificate_not_after is not None and creds.certificate_not_after.tzinfo


def test_bare_integration_object_is_accepted(tmp_path: Path, pair: keys.KeyPair) -> None:
    """The `integration` object on its own reads like the wrapped download."""
    path = keys.write_json(tmp_path / "i.json", keys.aem_document(pair, wrapped=False))
    creds = load_credentials(path)
    assert (creds.flow, creds.client_id, creds.org_id) == ("jwt", keys.CLIENT_ID, keys.ORG_ID)


def test_aem_metascopes_as_list_or_urls(tmp_path: Path) -> None:
    """metascopes may be a list, and legacy full-URL metascopes reduce to their name."""
    doc = keys.aem_document(
        metascopes=["ent_aem_cloud_api", "https://ims-na1.adobelogin.com/s/ent_cloudmgr_sdk"]
    )
    creds = load_credentials(keys.write_json(tmp_path / "a.json", doc))
    assert creds.metascopes == ("ent_aem_cloud_api", "ent_cloudmgr_sdk")


def test_aem_ok_false_is_rejected(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """A download that says ok=false is reported as such, not as missing fields."""
    doc = keys.aem_document()
    doc["ok"] = False
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert error.field == "ok"


def test_oauth_json_dedupes_secrets_in_order(tmp_path: Path) -> None:
    """client_secrets keeps the given order, drops duplicates, and flow is OAuth without a key."""
    doc = keys.oauth_document(
        client_secrets=[keys.OTHER_CLIENT_SECRET, keys.CLIENT_SECRET, keys.OTHER_CLIENT_SECRET],
        ims_endpoint="https://ims-eu1.adobelogin.com",
    )
    creds = load_credentials(keys.write_json(tmp_path / "o.json", doc))
    assert creds.flow == "oauth"
    assert creds.client_secrets == (keys.OTHER_CLIENT_SECRET, keys.CLIENT_SECRET)
    assert creds.scopes == keys.SCOPES
    assert creds.ims_endpoint == "https://ims-eu1.adobelogin.com"
    assert (creds.private_key, creds.key_size, creds.certificate_not_after) == (None, None, None)


def test_oauth_json_client_secret_and_scope_string(tmp_path: Path) -> None:
    """`client_secret` and a comma-separated `scope` string work; both secret forms merge."""
    doc = {
        "client_id": keys.CLIENT_ID,
        "client_secret": keys.CLIENT_SECRET,
        "client_secrets": [keys.OTHER_CLIENT_SECRET],
        "scope": "openid, AdobeID,read_organizations,,",
        "unknown_field": {"ignored": True},
    }
    creds = load_credentials(keys.write_json(tmp_path / "o.json", doc))
    assert creds.scopes == keys.SCOPES
    assert creds.client_secrets == (keys.CLIENT_SECRET, keys.OTHER_CLIENT_SECRET)
    assert creds.org_id is None and creds.ims_endpoint is None


def test_developer_console_project_json(tmp_path: Path) -> None:
    """The project download's oauth_server_to_server entry is used, org id from project.org."""
    doc = keys.project_document(client_secrets=[keys.CLIENT_SECRET, keys.OTHER_CLIENT_SECRET])
    creds = load_credentials(keys.write_json(tmp_path / "project.json", doc))
    assert creds.flow == "oauth"
    assert creds.client_id == keys.CLIENT_ID
    assert creds.client_secrets == (keys.CLIENT_SECRET, keys.OTHER_CLIENT_SECRET)
    assert creds.org_id == keys.ORG_ID
    assert creds.technical_account_id == keys.TECHNICAL_ACCOUNT_ID
    assert creds.scopes == keys.SCOPES


def test_top_level_oauth_server_to_server_object(tmp_path: Path) -> None:
    """`{"oauth_server_to_server": {...}}` on its own is accepted."""
    doc = {"oauth_server_to_server": keys.oauth_document(), "org_id": "ignored-when-inner-has-one"}
    creds = load_credentials(keys.write_json(tmp_path / "o.json", doc))
    assert (creds.client_id, creds.org_id) == (keys.CLIENT_ID, keys.ORG_ID)


@pytest.mark.parametrize("count", [0, 2])
def test_project_json_needs_exactly_one_s2s_credential(
    tmp_path: Path, count: int, all_secrets: keys.SecretTexts
) -> None:
    """Zero or several OAuth S2S credentials in a project JSON is an error, never a guess."""
    doc: Any = keys.project_document()
    entries = doc["project"]["workspace"]["details"]["credentials"]
    doc["project"]["workspace"]["details"]["credentials"] = entries * count
    error = failure(keys.write_json(tmp_path / "p.json", doc), all_secrets)
    assert error.field == "project.workspace.details.credentials"
    assert f"holds {count} oauth_server_to_server" in str(error)


def test_field_directory_jwt(tmp_path: Path, pair: keys.KeyPair) -> None:
    """A directory of one file per field gives JWT credentials with values stripped."""
    directory = keys.write_fields(tmp_path / "s", keys.jwt_fields(pair, ims_endpoint=" ims-x \n"))
    creds = load_credentials(directory)
    assert creds.flow == "jwt"
    assert creds.client_id == keys.CLIENT_ID
    assert creds.client_secrets == (keys.CLIENT_SECRET,)
    assert creds.org_id == keys.ORG_ID
    assert creds.technical_account_id == keys.TECHNICAL_ACCOUNT_ID
    assert creds.ims_endpoint == "ims-x"
    assert same_key(creds, pair)
    assert creds.certificate_not_after == keys.NOT_AFTER


def test_field_directory_oauth_with_secret_per_line(tmp_path: Path) -> None:
    """Without private_key the directory is OAuth; client_secrets holds one secret per line."""
    files = keys.oauth_fields(
        client_secrets=f"{keys.CLIENT_SECRET}\n{keys.OTHER_CLIENT_SECRET}\n", README="ignored"
    )
    creds = load_credentials(keys.write_fields(tmp_path / "s", files))
    assert creds.flow == "oauth"
    assert creds.client_secrets == (keys.CLIENT_SECRET, keys.OTHER_CLIENT_SECRET)
    assert creds.scopes == keys.SCOPES


def test_directory_with_one_json_file(tmp_path: Path, encrypted_pems: keys.SecretMap) -> None:
    """A directory holding one *.json is read as that file; a passphrase file beside it is used."""
    doc = keys.aem_document(private_key=encrypted_pems["pkcs8"])
    directory = keys.write_fields(
        tmp_path / "s",
        {
            "creds.json": json.dumps(doc),
            "private_key_passphrase": keys.PASSPHRASE + "\n",
            "notes.txt": "x",
        },
    )
    creds = load_credentials(directory)
    assert creds.source == str(directory / "creds.json")
    assert creds.flow == "jwt" and creds.key_size == 2048


def test_directory_with_two_json_files_is_error(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """Two *.json files are ambiguous: the error names both."""
    doc = json.dumps(keys.oauth_document())
    directory = keys.write_fields(tmp_path / "s", {"a.json": doc, "b.json": doc})
    error = failure(directory, all_secrets)
    assert "a.json, b.json" in str(error)


def test_directory_without_credentials_is_error(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """A directory with neither per-field files nor a *.json file is a permanent error."""
    error = failure(keys.write_fields(tmp_path / "s", {"other": "x"}), all_secrets)
    assert "neither per-field files" in str(error)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A UTF-8 byte order mark (Windows editors) is ignored."""
    path = keys.write_json(tmp_path / "o.json", keys.oauth_document(), bom=True)
    assert load_credentials(path).client_id == keys.CLIENT_ID


# --- key forms -------------------------------------------------------------------------------


def _single_line(pem: str) -> str:
    return " ".join(pem.split("\n")).strip()


KEY_FORMS: dict[str, Callable[[keys.KeyPair], str]] = {
    "pkcs1-lf": lambda p: p.pkcs1_pem(),
    "pkcs1-crlf": lambda p: p.pkcs1_pem(crlf=True),
    "pkcs8-lf": lambda p: p.pkcs8_pem(),
    "pkcs8-crlf": lambda p: p.pkcs8_pem(crlf=True),
    "literal-backslash-n": lambda p: p.pkcs1_pem().replace("\n", "\\n"),
    "literal-backslash-r-n": lambda p: p.pkcs8_pem().replace("\n", "\\r\\n"),
    "base64-of-pem": lambda p: p.base64_pem(),
    "base64-of-pem-wrapped": lambda p: "\n".join(
        p.base64_pem()[i : i + 76] for i in range(0, len(p.base64_pem()), 76)
    ),
    "line-breaks-lost": lambda p: _single_line(p.pkcs1_pem()),
    "yaml-indented": lambda p: "\n".join("    " + line for line in p.pkcs8_pem().split("\n")),
    "surrounded-by-blank-lines": lambda p: "\n\n" + p.pkcs8_pem() + "\n\n",
}


@pytest.mark.parametrize("form", sorted(KEY_FORMS))
def test_private_key_forms_in_json(tmp_path: Path, pair: keys.KeyPair, form: str) -> None:
    """Each way a PEM gets mangled in transit still yields the same RSA key."""
    doc = keys.aem_document(pair, private_key=KEY_FORMS[form](pair))
    creds = load_credentials(keys.write_json(tmp_path / "a.json", doc))
    assert same_key(creds, pair)


@pytest.mark.parametrize("form", ["pkcs1-crlf", "literal-backslash-n", "base64-of-pem"])
def test_private_key_forms_in_field_file(tmp_path: Path, pair: keys.KeyPair, form: str) -> None:
    """The per-field private_key file accepts the same forms."""
    files = keys.jwt_fields(pair, private_key=KEY_FORMS[form](pair))
    assert same_key(load_credentials(keys.write_fields(tmp_path / "s", files)), pair)


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_encrypted_key_with_passphrase_in_json(
    tmp_path: Path, pair: keys.KeyPair, encrypted_pems: keys.SecretMap, fmt: str
) -> None:
    """An encrypted key (PKCS#8 or legacy PKCS#1) opens with privateKeyPassphrase."""
    doc: Any = keys.aem_document(pair, private_key=encrypted_pems[fmt])
    doc["integration"]["privateKeyPassphrase"] = keys.PASSPHRASE
    creds = load_credentials(keys.write_json(tmp_path / "a.json", doc))
    assert same_key(creds, pair)


def test_encrypted_key_with_passphrase_file(
    tmp_path: Path, pair: keys.KeyPair, encrypted_pems: keys.SecretMap
) -> None:
    """The per-field shape reads private_key_passphrase (trailing newline stripped)."""
    files = keys.jwt_fields(
        pair, private_key=encrypted_pems["pkcs1"], private_key_passphrase=keys.PASSPHRASE + "\n"
    )
    assert same_key(load_credentials(keys.write_fields(tmp_path / "s", files)), pair)


def test_encrypted_key_with_passphrase_in_flat_json(
    tmp_path: Path, pair: keys.KeyPair, encrypted_pems: keys.SecretMap
) -> None:
    """Flat JSON takes private_key_passphrase, and a literal-\\n encrypted key."""
    doc = dict(keys.jwt_fields(pair))
    doc["private_key"] = encrypted_pems["pkcs1"].replace("\n", "\\n")
    doc["private_key_passphrase"] = keys.PASSPHRASE
    assert same_key(load_credentials(keys.write_json(tmp_path / "f.json", doc)), pair)


def test_wrong_passphrase_is_clear_and_leak_free(
    tmp_path: Path, encrypted_pems: keys.SecretMap, all_secrets: keys.SecretTexts
) -> None:
    """A wrong passphrase names the passphrase field and shows neither it nor the key."""
    wrong = "Wrong-Passphrase-Value-123"
    files = keys.jwt_fields(private_key=encrypted_pems["pkcs8"], private_key_passphrase=wrong)
    error = failure(keys.write_fields(tmp_path / "s", files), all_secrets.plus(wrong))
    assert error.field == "private_key_passphrase"
    assert "wrong passphrase" in str(error)
    assert error.exit_code == EXIT_USAGE


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_missing_passphrase_names_the_field(
    tmp_path: Path, encrypted_pems: keys.SecretMap, all_secrets: keys.SecretTexts, fmt: str
) -> None:
    """An encrypted key without a passphrase asks for the passphrase field by name."""
    doc = keys.aem_document(private_key=encrypted_pems[fmt])
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert error.field == "integration.privateKeyPassphrase"
    assert "encrypted" in str(error)


def test_passphrase_for_unencrypted_key_is_harmless(tmp_path: Path, pair: keys.KeyPair) -> None:
    """A passphrase given for a plain key is ignored rather than failing the load."""
    files = keys.jwt_fields(pair, private_key_passphrase="unused")
    assert same_key(load_credentials(keys.write_fields(tmp_path / "s", files)), pair)


@pytest.mark.parametrize(
    ("pem", "kind"),
    [
        (lambda: keys.ec_private_key_pem(), "EC"),
        (lambda: keys.ec_private_key_pem(pkcs8=True), "EC"),
        (lambda: keys.ed25519_private_key_pem(), "Ed25519"),
    ],
    ids=["ec-sec1", "ec-pkcs8", "ed25519"],
)
def test_non_rsa_keys_are_rejected(
    tmp_path: Path, all_secrets: keys.SecretTexts, pem: Any, kind: str
) -> None:
    """Only RSA can sign RS256: other key types get a message naming the type."""
    text = pem()
    doc = keys.aem_document(private_key=text)
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets.plus(text))
    assert f"private key is {kind}, the IMS JWT exchange needs RSA (RS256)" in str(error)
    assert error.field == "integration.privateKey"


def test_openssh_key_gets_a_conversion_hint(
    tmp_path: Path, pair: keys.KeyPair, all_secrets: keys.SecretTexts
) -> None:
    """An OpenSSH-format key is named as such, with the command that converts it."""
    text = pair.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    files = keys.jwt_fields(pair, private_key=text)
    error = failure(keys.write_fields(tmp_path / "s", files), all_secrets.plus(text))
    assert "OpenSSH" in str(error) and error.field == "private_key"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("certificate", "holds a CERTIFICATE"),
        ("not a key at all", "is not PEM"),
        ("corrupt-body", "is not a valid PEM private key"),
        ("two-keys", "holds 2 private keys"),
    ],
)
def test_unusable_private_key_values(
    tmp_path: Path,
    pair: keys.KeyPair,
    all_secrets: keys.SecretTexts,
    value: str,
    expected: str,
) -> None:
    """A certificate, garbage, a corrupt body or two keys in privateKey each say what is wrong."""
    texts = {
        "certificate": pair.certificate_pem(),
        "not a key at all": "not a key at all",
        "corrupt-body": pair.pkcs1_pem().replace("MII", "M!I", 1),
        "two-keys": pair.pkcs1_pem() + pair.pkcs8_pem(),
    }
    doc = keys.aem_document(pair, private_key=texts[value])
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert expected in str(error)
    assert error.field == "integration.privateKey"


def test_key_not_matching_certificate_is_rejected(
    tmp_path: Path, pair: keys.KeyPair, other_pair: keys.KeyPair, all_secrets: keys.SecretTexts
) -> None:
    """A key that does not match publicKey fails now, as IMS would reject it later."""
    doc = keys.aem_document(pair, certificate=other_pair.certificate_pem(crlf=True))
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert "private key does not match the certificate in publicKey" in str(error)


def test_invalid_certificate_names_public_key(
    tmp_path: Path, pair: keys.KeyPair, all_secrets: keys.SecretTexts
) -> None:
    """A publicKey that is not a certificate is an error naming publicKey."""
    bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    doc = keys.aem_document(pair, certificate=bad)
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert error.field == "integration.publicKey"


def test_certificate_is_optional(tmp_path: Path, pair: keys.KeyPair) -> None:
    """Without a certificate there is no expiry to report and no match to check."""
    files = keys.jwt_fields(pair)
    del files["certificate"]
    creds = load_credentials(keys.write_fields(tmp_path / "s", files))
    assert creds.certificate_not_after is None and same_key(creds, pair)


# --- flow ------------------------------------------------------------------------------------


def test_flat_json_with_private_key_is_jwt(tmp_path: Path, pair: keys.KeyPair) -> None:
    """Auto-detection: a private key present means JWT, whatever the shape."""
    doc = {**keys.jwt_fields(pair), "scopes": ["openid"]}
    creds = load_credentials(keys.write_json(tmp_path / "f.json", doc))
    assert creds.flow == "jwt" and creds.scopes == ()


def test_forced_jwt_without_key_names_private_key(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """--flow jwt on OAuth credentials names the missing private_key (and the other gaps)."""
    path = keys.write_json(tmp_path / "o.json", keys.oauth_document())
    error = failure(path, all_secrets, flow="jwt")
    assert error.field == "private_key"
    assert "JWT flow" in str(error) and "metascopes" in str(error)


def test_forced_oauth_ignores_key_and_certificate(tmp_path: Path) -> None:
    """--flow oauth uses OAuth even with a key, and does not even parse the (broken) key."""
    doc = keys.oauth_document(private_key="garbage", certificate="garbage")
    creds = load_credentials(keys.write_json(tmp_path / "o.json", doc), flow="oauth")
    assert creds.flow == "oauth" and creds.private_key is None
    assert creds.certificate_not_after is None


def test_forced_oauth_on_aem_needs_scopes(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """--flow oauth on AEM credentials asks for scopes where they would go."""
    path = keys.write_json(tmp_path / "a.json", keys.aem_document())
    error = failure(path, all_secrets, flow="oauth")
    assert error.field == "integration.scopes"


def test_auto_oauth_missing_scopes_explains_the_choice(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """Without a key and without scopes, the error says why OAuth was chosen."""
    doc = {
        "client_id": keys.CLIENT_ID,
        "client_secret": keys.CLIENT_SECRET,
        "metascopes": "ent_aem_cloud_api",
    }
    error = failure(keys.write_json(tmp_path / "f.json", doc), all_secrets)
    assert error.field == "scopes" and "no private key was found" in str(error)


# --- missing fields and wrong types ----------------------------------------------------------

AEM_REQUIRED = {
    ("technicalAccount", "clientId"): "integration.technicalAccount.clientId",
    ("technicalAccount", "clientSecret"): "integration.technicalAccount.clientSecret",
    ("org",): "integration.org",
    ("id",): "integration.id",
    ("metascopes",): "integration.metascopes",
    ("privateKey",): "integration.privateKey",
}


@pytest.mark.parametrize("where", list(AEM_REQUIRED), ids=lambda w: ".".join(w))
def test_aem_missing_field_names_field_and_file(
    tmp_path: Path, all_secrets: keys.SecretTexts, where: tuple[str, ...]
) -> None:
    """Dropping any required AEM field reports that field and the file."""
    doc: Any = keys.aem_document()
    target = doc["integration"]
    for step in where[:-1]:
        target = target[step]
    del target[where[-1]]
    path = keys.write_json(tmp_path / "aem.json", doc)
    error = failure(path, all_secrets)
    assert error.field == AEM_REQUIRED[where]
    assert error.source == str(path)
    assert str(path) in str(error) and AEM_REQUIRED[where] in str(error)
    assert "is missing" in str(error)


@pytest.mark.parametrize("name", ["client_id", "client_secrets", "scopes"])
def test_oauth_missing_field_names_field(
    tmp_path: Path, all_secrets: keys.SecretTexts, name: str
) -> None:
    """Dropping any required OAuth field reports it by its JSON name."""
    doc = keys.oauth_document()
    del doc[name]
    error = failure(keys.write_json(tmp_path / "o.json", doc), all_secrets)
    assert error.field == ("client_secret" if name == "client_secrets" else name)


def test_empty_secret_list_says_empty(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """An empty client_secrets list is reported as empty, under its own name."""
    doc = keys.oauth_document(client_secrets=[])
    error = failure(keys.write_json(tmp_path / "o.json", doc), all_secrets)
    assert error.field == "client_secrets" and "is empty" in str(error)


@pytest.mark.parametrize(
    "name", ["client_id", "client_secret", "org_id", "technical_account_id", "metascopes"]
)
def test_directory_missing_file_names_field_and_directory(
    tmp_path: Path, all_secrets: keys.SecretTexts, name: str
) -> None:
    """A missing per-field file is named, with the directory as the source."""
    files = keys.jwt_fields()
    del files[name]
    directory = keys.write_fields(tmp_path / "secret", files)
    error = failure(directory, all_secrets)
    assert (error.field, error.source) == (name, str(directory))


def test_several_missing_fields_are_reported_together(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """All missing fields appear in one message; the first is the error's field."""
    doc: Any = keys.aem_document()
    del doc["integration"]["org"], doc["integration"]["id"]
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert error.field == "integration.org"
    assert "also missing: integration.id" in str(error)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(client_id=12345), "client_id"),
        (lambda d: d.update(client_secrets=[keys.CLIENT_SECRET, 7]), "client_secrets[1]"),
        (lambda d: d.update(client_secrets={"a": keys.CLIENT_SECRET}), "client_secrets"),
        (lambda d: d.update(scopes=["openid", None]), "scopes[1]"),
        (lambda d: d.update(scopes=True), "scopes"),
        (lambda d: d.update(org_id=["x"]), "org_id"),
        (lambda d: d.update(client_secret=False), "client_secret"),
    ],
)
def test_wrong_types_name_the_field(
    tmp_path: Path, all_secrets: keys.SecretTexts, mutate: Any, field: str
) -> None:
    """A value of the wrong JSON type is a permanent error naming the field, not the value."""
    doc = keys.oauth_document()
    mutate(doc)
    error = failure(keys.write_json(tmp_path / "o.json", doc), all_secrets)
    assert error.field == field


def test_technical_account_not_an_object(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """A nested object of the wrong type is named by its path."""
    doc: Any = keys.aem_document()
    doc["integration"]["technicalAccount"] = keys.CLIENT_SECRET
    error = failure(keys.write_json(tmp_path / "a.json", doc), all_secrets)
    assert error.field == "integration.technicalAccount" and "got a string" in str(error)


@pytest.mark.parametrize("document", [[1, 2], "text", 3, None, True])
def test_non_object_json_is_error(
    tmp_path: Path, all_secrets: keys.SecretTexts, document: object
) -> None:
    """A JSON value that is not an object is a permanent error."""
    error = failure(keys.write_json(tmp_path / "x.json", document), all_secrets)
    assert "must be a JSON object" in str(error)


def test_invalid_json_gives_position_not_content(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """Broken JSON reports line and column but no input text (a secret may be nearby)."""
    text = json.dumps(keys.oauth_document(), indent=2).replace(
        f'"{keys.CLIENT_SECRET}"', f"{keys.CLIENT_SECRET}"
    )
    path = tmp_path / "o.json"
    path.write_text(text)
    error = failure(path, all_secrets)
    assert "line 4 column" in str(error)


def test_non_utf8_is_permanent(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """Bytes that are not UTF-8 (before the end) are a permanent error with an offset."""
    path = tmp_path / "o.json"
    path.write_bytes(b'{"client_id": "\xff\xfe"}')
    error = failure(path, all_secrets)
    assert "not UTF-8" in str(error) and "offset 15" in str(error)


def test_oversized_file_is_rejected(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """A file over 1 MiB is not read as credentials."""
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    assert "1 MiB" in str(failure(path, all_secrets))


def test_missing_path_is_permanent(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """A PATH that does not exist at all is a configuration error, not a not-ready."""
    error = failure(tmp_path / "nope.json", all_secrets)
    assert "does not exist" in str(error)


def test_unreadable_file_is_permanent(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """Permission denied is a configuration error (wrong defaultMode / fsGroup)."""
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = keys.write_json(tmp_path / "o.json", keys.oauth_document())
    path.chmod(0)
    assert "cannot be read" in str(failure(path, all_secrets))


# --- not ready -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"  \n\t ", b"\xef\xbb\xbf", b"\xef\xbb"])
def test_empty_file_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts, content: bytes
) -> None:
    """An empty, blank or BOM-only file is a read caught mid-write: retry, never use."""
    path = tmp_path / "o.json"
    path.write_bytes(content)
    failure(path, all_secrets, CredentialsNotReady)


def test_utf8_cut_inside_a_character_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """A file ending in the middle of a multi-byte character is half-written."""
    path = tmp_path / "o.json"
    path.write_bytes('{"client_id": "é'.encode()[:-1])
    failure(path, all_secrets, CredentialsNotReady)


@pytest.mark.parametrize("indent", [None, 2])
def test_every_prefix_of_oauth_json_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts, indent: int | None
) -> None:
    """Any truncation of a valid document is not-ready (exhaustive, small document)."""
    doc = keys.oauth_document(note='é😀 "quoted" \\ back', n=-1.5e-3, flag=False, none=None)
    path = tmp_path / "o.json"
    # Locals, not helper arguments: pytest prints a failing helper's arguments.
    for text in (json.dumps(doc, indent=indent), json.dumps(doc, ensure_ascii=False)):
        for end in range(1, len(text.rstrip())):
            path.write_text(text[:end], encoding="utf-8")
            with pytest.raises(CredentialsNotReady) as info:
                load_credentials(path)
            assert_no_leak(str(info.value), all_secrets)


_AEM_TEXT = json.dumps(keys.aem_document(), indent=2)


@FUZZ
@given(data=st.data())
def test_truncated_aem_json_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts, data: st.DataObject
) -> None:
    """Any truncation of the AEM download (escaped CRLF PEMs and all) is not-ready."""
    text = _AEM_TEXT
    end = data.draw(st.integers(1, len(text.rstrip()) - 1), label="end")
    path = tmp_path / "aem.json"
    path.write_text(text[:end], encoding="utf-8")
    with pytest.raises(CredentialsNotReady) as info:
        load_credentials(path)
    assert_no_leak(str(info.value), all_secrets)


def test_dangling_file_symlink_is_not_ready(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """PATH as a symlink whose target is gone (kubelet mid-swap) is not-ready."""
    link = tmp_path / "creds.json"
    link.symlink_to(tmp_path / "..data" / "creds.json")
    failure(link, all_secrets, CredentialsNotReady)


def test_kubelet_directory_reads_through_data_link(tmp_path: Path, pair: keys.KeyPair) -> None:
    """A Secret volume (..data symlink, key links) loads like a plain directory."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.jwt_fields(pair))
    creds = load_credentials(directory)
    assert creds.flow == "jwt" and same_key(creds, pair)
    assert creds.source == str(directory)


def test_kubelet_json_file_path(tmp_path: Path) -> None:
    """PATH may be the key link inside a Secret volume (creds.json -> ..data/creds.json)."""
    directory = keys.write_kubelet_secret(
        tmp_path / "secret", {"creds.json": json.dumps(keys.oauth_document())}
    )
    assert load_credentials(directory / "creds.json").client_id == keys.CLIENT_ID
    assert load_credentials(directory).source == str(directory / "creds.json")


def test_dangling_data_link_is_not_ready(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """..data pointing at a snapshot that is gone is a swap in progress."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.oauth_fields())
    shutil.rmtree(directory / os.readlink(directory / "..data"))
    failure(directory, all_secrets, CredentialsNotReady)
    failure(directory / "client_id", all_secrets, CredentialsNotReady)


def test_key_link_without_target_in_snapshot_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """A key link whose file is missing from the current snapshot is mid-swap, not missing."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.oauth_fields())
    snapshot = directory / os.readlink(directory / "..data")
    (snapshot / "client_secret").unlink()
    error = failure(directory, all_secrets, CredentialsNotReady)
    assert error.field == "client_secret"


def test_plain_directory_dangling_field_link_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """Without ..data, a field file that is a dangling symlink is still not-ready."""
    directory = keys.write_fields(tmp_path / "s", keys.oauth_fields())
    (directory / "client_secret").unlink()
    (directory / "client_secret").symlink_to(tmp_path / "gone")
    failure(directory, all_secrets, CredentialsNotReady)


@pytest.mark.parametrize("name", ["client_id", "client_secret", "scopes", "private_key"])
def test_empty_required_field_file_is_not_ready(
    tmp_path: Path, all_secrets: keys.SecretTexts, name: str
) -> None:
    """An empty required per-field file (or an empty key, which would flip the flow) waits."""
    files = keys.oauth_fields(**{name: ""})
    error = failure(keys.write_fields(tmp_path / "s", files), all_secrets, CredentialsNotReady)
    assert error.field == name


def test_half_written_key_file_is_not_ready(
    tmp_path: Path, pair: keys.KeyPair, all_secrets: keys.SecretTexts
) -> None:
    """A per-field PEM with BEGIN but no END line is a file caught mid-write."""
    files = keys.jwt_fields(pair, private_key=pair.pkcs8_pem()[:500])
    error = failure(keys.write_fields(tmp_path / "s", files), all_secrets, CredentialsNotReady)
    assert error.field == "private_key"


def test_empty_directory_is_not_ready(tmp_path: Path, all_secrets: keys.SecretTexts) -> None:
    """A mount point with nothing in it yet is not-ready."""
    (tmp_path / "mnt").mkdir()
    failure(tmp_path / "mnt", all_secrets, CredentialsNotReady)


# --- change detection ------------------------------------------------------------------------


def test_kubelet_swap_changes_signature_and_content(tmp_path: Path) -> None:
    """A ..data swap changes the signature, and the next load sees only the new set."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.oauth_fields())
    before = change_signature(directory)
    assert change_signature(directory) == before
    rotated = keys.oauth_fields(client_secret=keys.OTHER_CLIENT_SECRET + "\n")
    keys.swap_kubelet_secret(directory, rotated, version=2)
    assert change_signature(directory) != before
    assert load_credentials(directory).client_secrets == (keys.OTHER_CLIENT_SECRET,)


def test_kubelet_swap_changes_signature_of_file_path(tmp_path: Path) -> None:
    """A swap also changes the signature of a key link given as PATH, even with equal bytes."""
    files = {"creds.json": json.dumps(keys.oauth_document())}
    directory = keys.write_kubelet_secret(tmp_path / "secret", files)
    before = change_signature(directory / "creds.json")
    keys.swap_kubelet_secret(directory, files, version=2)
    assert change_signature(directory / "creds.json") != before


def test_in_place_edit_changes_signature(tmp_path: Path) -> None:
    """Rewriting a plain file (same inode) still changes the signature."""
    path = keys.write_json(tmp_path / "o.json", keys.oauth_document())
    before = change_signature(path)
    with path.open("r+b") as handle:
        handle.seek(0, os.SEEK_END)
        handle.write(b"\n")
    assert change_signature(path) != before


def _retarget(link: Path, target: str) -> None:
    (link.parent / "new-link").symlink_to(target)
    (link.parent / "new-link").replace(link)


def _replace_by_rename(path: Path) -> None:
    (path.parent / "new.json").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (path.parent / "new.json").replace(path)


@pytest.mark.parametrize(
    ("layout", "change"),
    [
        # The watch check stats a plain file once (lstat, whose fields a stat would repeat):
        # a change that only its metadata shows must still be seen.
        ("file", lambda p: p.chmod(0o400)),
        ("file", _replace_by_rename),
        ("file", lambda p: os.utime(p, ns=(1, 1))),
        # PATH a link of its own (not kubelet's): retargeted, or its target edited.
        ("link", lambda p: _retarget(p, "b.json")),
        ("link", lambda p: (p.parent / "a.json").write_text("{}", encoding="utf-8")),
        # PATH a directory: a key appears, or a key's file is replaced.
        ("dir", lambda p: (p / "extra.json").write_text("{}", encoding="utf-8")),
        ("dir", lambda p: _replace_by_rename(p / "creds.json")),
    ],
    ids=["chmod", "rename-over", "mtime", "link-retarget", "link-target-edit", "dir-new-key",
         "dir-key-renamed-over"],
)  # fmt: skip
def test_signature_sees_every_kind_of_change(
    tmp_path: Path, layout: str, change: Callable[[Path], object]
) -> None:
    document = keys.oauth_document()
    if layout == "dir":
        path = tmp_path / "creds"
        path.mkdir()
        keys.write_json(path / "creds.json", document)
    elif layout == "link":
        keys.write_json(tmp_path / "a.json", document)
        keys.write_json(tmp_path / "b.json", document)
        path = tmp_path / "creds.json"
        path.symlink_to("a.json")
    else:
        path = keys.write_json(tmp_path / "creds.json", document)
    before = change_signature(path)
    assert change_signature(path) == before
    assert change_signature(str(path)) == before  # the loop passes a str or a Path alike
    change(path)
    assert change_signature(path) != before


def test_signature_never_raises_and_sees_appearance(tmp_path: Path) -> None:
    """A missing PATH has a signature too, which changes once the file appears."""
    path = tmp_path / "later.json"
    missing = change_signature(path)
    assert change_signature(path) == missing
    keys.write_json(path, keys.oauth_document())
    assert change_signature(path) != missing


def test_signature_does_not_read_content(tmp_path: Path) -> None:
    """change_signature needs no read permission: it only stats."""
    path = keys.write_json(tmp_path / "o.json", keys.oauth_document())
    path.chmod(0)
    try:
        assert change_signature(path) == change_signature(path)
    finally:
        path.chmod(0o600)


# --- redaction -------------------------------------------------------------------------------


def test_repr_and_summary_hold_no_secret(
    tmp_path: Path, pair: keys.KeyPair, all_secrets: keys.SecretTexts
) -> None:
    """repr, str and summary() show the shape of the credentials but never a secret."""
    doc = keys.aem_document(pair)
    doc["integration"]["technicalAccount"]["clientSecret"] = keys.OTHER_CLIENT_SECRET  # type: ignore[index]
    creds = load_credentials(keys.write_json(tmp_path / "a.json", doc))
    for text in (repr(creds), str(creds), f"{creds}", json.dumps(creds.summary())):
        assert_no_leak(text, all_secrets)
    assert "<1 redacted>" in repr(creds) and "<RSA 2048 redacted>" in repr(creds)
    summary = creds.summary()
    assert summary["key_type"] == "RSA" and summary["key_size"] == 2048
    assert summary["certificate_not_after"] == "2027-11-26T12:00:00Z"
    assert summary["metascopes"] == ["ent_aem_cloud_api"]
    assert summary["client_secret_count"] == 1
    assert set(summary) >= {"flow", "client_id", "ims_endpoint", "org_id", "source"}


def test_reload_of_same_content_compares_equal(tmp_path: Path) -> None:
    """Two loads of unchanged credentials are equal (the parsed key is reused, not re-parsed)."""
    path = keys.write_json(tmp_path / "a.json", keys.aem_document())
    assert load_credentials(path) == load_credentials(path)


def test_hand_built_credentials_are_validated(pair: keys.KeyPair) -> None:
    """Constructing JWT credentials without a key is a programming error caught at once."""
    with pytest.raises(ValueError, match="JWT flow needs"):
        Credentials(
            source="x",
            flow="jwt",
            client_id="c",
            client_secrets=("s",),
            ims_endpoint=None,
            org_id="o",
            technical_account_id="t",
            metascopes=("m",),
            scopes=(),
            private_key=None,
            certificate_not_after=None,
            key_size=None,
        )


# --- properties ------------------------------------------------------------------------------


def _check_outcome(path: Path, secrets: keys.SecretTexts) -> None:
    """Loading succeeds with a leak-free repr, or raises a leak-free one-line CredentialsError.

    The fuzzers plant a key-shaped text that is nobody's secret in any field, where it may
    be echoed as that field's value: only the known secrets are looked for (shapes=False).
    """
    try:
        creds = load_credentials(path)
    except CredentialsError as error:
        message = str(error)
        assert_no_leak(message, secrets, shapes=False)
        assert "\n" not in message
    else:
        assert_no_leak(repr(creds), secrets, shapes=False)
        assert_no_leak(json.dumps(creds.summary()), secrets, shapes=False)


@FUZZ
@given(content=st.binary(max_size=2048))
def test_random_bytes_only_raise_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts, content: bytes
) -> None:
    """Arbitrary bytes never escape as anything but CredentialsError."""
    path = tmp_path / "random.json"
    path.write_bytes(content)
    _check_outcome(path, all_secrets)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(document=JSON_VALUES)
def test_random_json_only_raises_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts, document: object
) -> None:
    """Arbitrary JSON values never escape as anything but CredentialsError."""
    _check_outcome(keys.write_json(tmp_path / "random.json", document), all_secrets)


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every key/index path inside a JSON value."""
    found: list[tuple[object, ...]] = []
    items: list[tuple[object, object]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def _documents() -> dict[str, object]:
    pair = keys.rsa_keypair()
    return {
        "aem": keys.aem_document(pair),
        "bare": keys.aem_document(pair, wrapped=False),
        "oauth": keys.oauth_document(),
        "project": keys.project_document(),
        "flat-jwt": keys.jwt_fields(pair),
        "flat-encrypted": {
            **keys.jwt_fields(pair, private_key=pair.pkcs8_pem(passphrase=keys.PASSPHRASE)),
            "private_key_passphrase": keys.PASSPHRASE,
        },
    }


DOCUMENTS = _documents()
REPLACEMENTS: st.SearchStrategy[object] = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.just(1.5)
    | st.text(max_size=8)
    | st.just([])
    | st.just({})
    | st.just(["x", 1])
    | st.just("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
)


@FUZZ
@given(data=st.data())
def test_mutated_documents_only_raise_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts, data: st.DataObject
) -> None:
    """Dropping keys, changing types or cutting valid files yields only CredentialsError."""
    name = data.draw(st.sampled_from(sorted(DOCUMENTS)), label="document")
    document = json.loads(json.dumps(DOCUMENTS[name]))  # a private deep copy
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(document)
        if not paths:
            break
        where = data.draw(st.sampled_from(paths), label="path")
        parent: Any = document
        for step in where[:-1]:
            parent = parent[step]
        if data.draw(st.booleans(), label="drop"):
            del parent[where[-1]]
        else:
            # A copy: st.just() hands out one shared object that later steps would mutate.
            parent[where[-1]] = json.loads(json.dumps(data.draw(REPLACEMENTS, label="value")))
    raw = json.dumps(document, indent=data.draw(st.sampled_from([None, 2]), label="indent"))
    encoded = raw.encode()
    how = data.draw(st.sampled_from(["whole", "cut", "flip"]), label="how")
    if how == "cut":
        encoded = encoded[: data.draw(st.integers(0, len(encoded)), label="cut")]
    elif how == "flip":
        at = data.draw(st.integers(0, len(encoded) - 1), label="at")
        encoded = encoded[:at] + bytes([data.draw(st.integers(0, 255))]) + encoded[at + 1 :]
    path = tmp_path / "mutated.json"
    path.write_bytes(encoded)
    _check_outcome(path, all_secrets.plus(*_secrets_of(DOCUMENTS[name])))


def _secrets_of(document: object) -> tuple[str, ...]:
    text = json.dumps(document)
    return tuple(json.loads(f'"{part}"') for part in text.split('"') if "-----BEGIN" in part)


@FUZZ
@given(data=st.data())
def test_mutated_field_directories_only_raise_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts, data: st.DataObject
) -> None:
    """Dropping, emptying or corrupting per-field files yields only CredentialsError."""
    files: dict[str, str | bytes] = dict(keys.jwt_fields())
    for name in data.draw(st.lists(st.sampled_from(sorted(files)), max_size=3), label="touch"):
        action = data.draw(st.sampled_from(["drop", "empty", "bytes", "cut"]), label=name)
        if action == "drop":
            files.pop(name, None)
        elif action == "empty":
            files[name] = ""
        elif action == "bytes":
            files[name] = data.draw(st.binary(max_size=64), label="content")
        elif isinstance(files.get(name), str):
            text = files[name]
            assert isinstance(text, str)
            files[name] = text[: data.draw(st.integers(0, len(text)), label="cut")]
    directory = tmp_path / "fields"
    shutil.rmtree(directory, ignore_errors=True)  # examples share tmp_path: start clean
    _check_outcome(keys.write_fields(directory, files), all_secrets)


def test_base64_key_round_trip_is_exact(pair: keys.KeyPair) -> None:
    """The helper's base64 form is base64 of the whole PEM (guards the key-form tests above)."""
    assert base64.b64decode(pair.base64_pem()).decode() == pair.pkcs1_pem()


def test_inconsistent_rsa_key_is_refused(pair: keys.KeyPair, tmp_path: Path) -> None:
    """A key whose private exponent does not match its modulus fails the load-time self-test
    (OpenSSL's slow full check is skipped), instead of producing signatures IMS rejects."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    good = serialization.load_pem_private_key(pair.pkcs8_pem().encode(), password=None)
    assert isinstance(good, rsa.RSAPrivateKey)
    n = good.private_numbers()
    broken = rsa.RSAPrivateNumbers(
        p=n.p,
        q=n.q,
        d=n.d + 2,
        dmp1=n.dmp1 + 2,
        dmq1=n.dmq1 + 2,
        iqmp=n.iqmp,
        public_numbers=n.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    pem = broken.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = keys.write_json(
        tmp_path / "aem.json", keys.aem_document(private_key=pem, certificate=None)
    )
    with pytest.raises(CredentialsError, match="not a valid PEM private key") as info:
        load_credentials(path)
    assert pem.splitlines()[1] not in str(info.value)


# --- only regular files; broken versus half-written (issue 10, items 9 and 15) ----------------
# A FIFO opened for a blocking read waits for a writer forever. These run in-process and
# would hang on a regression: each is also run through the CLI, bounded, in
# tests/reliability/test_loop_attacks.py.


def test_fifo_among_field_files_is_a_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """A FIFO where a per-field file should be is refused (not opened for a blocking read)."""
    directory = keys.write_fields(tmp_path / "s", keys.oauth_fields())
    (directory / "client_secret").unlink()
    os.mkfifo(directory / "client_secret")
    error = failure(directory, all_secrets)
    assert "not a regular file" in str(error) and error.field == "client_secret"


def test_fifo_inside_the_kubelet_snapshot_is_a_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """A FIFO inside the ..data snapshot (reached through a key link) is refused too."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.oauth_fields())
    snapshot = directory / os.readlink(directory / "..data")
    (snapshot / "client_id").unlink()
    os.mkfifo(snapshot / "client_id")
    assert "not a regular file" in str(failure(directory, all_secrets))


def test_symlink_inside_the_kubelet_snapshot_is_not_followed(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """kubelet's snapshot holds regular files: a link planted there is not followed."""
    directory = keys.write_kubelet_secret(tmp_path / "secret", keys.oauth_fields())
    snapshot = directory / os.readlink(directory / "..data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("client-from-elsewhere")
    (snapshot / "client_id").unlink()
    (snapshot / "client_id").symlink_to(elsewhere)
    assert "not a regular file" in str(failure(directory, all_secrets))


def test_fifo_as_the_credentials_path_is_a_credentials_error(
    tmp_path: Path, all_secrets: keys.SecretTexts
) -> None:
    """PATH itself a FIFO: refused at once."""
    os.mkfifo(tmp_path / "creds.json")
    failure(tmp_path / "creds.json", all_secrets)


def _never_interrupted(_: float) -> bool:
    return False


def test_settled_load_calls_a_stable_truncation_broken(tmp_path: Path) -> None:
    """A truncated JSON file that reads the same a moment later is a permanent error."""
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(keys.oauth_document())[:40])
    with pytest.raises(CredentialsError) as info:
        load_settled(path, wait=_never_interrupted)
    assert type(info.value) is CredentialsError
    assert "broken, not half-written" in str(info.value)
    assert "(half-written?)" not in str(info.value)


def test_settled_load_calls_a_stable_empty_directory_broken(tmp_path: Path) -> None:
    """An empty directory that stays empty is a permanent error too."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(CredentialsError) as info:
        load_settled(tmp_path / "empty", wait=_never_interrupted)
    assert type(info.value) is CredentialsError
    assert "empty directory" in str(info.value)


def test_settled_load_waits_for_a_writer_that_finishes(tmp_path: Path) -> None:
    """A file completed during the moment loads: half-written, not broken."""
    path = tmp_path / "creds.json"
    text = json.dumps(keys.oauth_document())
    path.write_text(text[:40])
    waits: list[float] = []

    def writer_finishes(seconds: float) -> bool:
        waits.append(seconds)
        path.write_text(text)
        return False

    assert load_settled(path, wait=writer_finishes).client_id == keys.CLIENT_ID
    assert waits == [1.0]


def test_settled_load_keeps_a_changing_read_not_ready(tmp_path: Path) -> None:
    """A file still changing during the moment stays not-ready (retried), not broken."""
    path = tmp_path / "creds.json"
    text = json.dumps(keys.oauth_document())
    path.write_text(text[:40])

    def writer_continues(_: float) -> bool:
        path.write_text(text[:80])
        return False

    with pytest.raises(CredentialsNotReady):
        load_settled(path, wait=writer_continues)


def test_settled_load_interrupted_stays_not_ready(tmp_path: Path) -> None:
    """Shutdown during the moment: the not-ready error as it was, no verdict."""
    path = tmp_path / "creds.json"
    path.write_text("{")
    with pytest.raises(CredentialsNotReady):
        load_settled(path, wait=lambda _: True)


def test_change_signature_never_raises_for_a_path_pathlib_refuses() -> None:
    """A path whose is_dir() raises (ENAMETOOLONG here; EACCES for a non-root user) is a state."""
    too_long = Path("/tmp") / ("x" * 5000)
    first = change_signature(too_long)
    assert first == change_signature(too_long)


@pytest.mark.parametrize(
    "endpoint",
    [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE",
        "ims na1.adobelogin.com",
        "ftp://ims.example",
        "ïms.example",
    ],
)
def test_an_ims_endpoint_that_is_no_host_or_url_is_refused_unquoted(
    tmp_path: Path, endpoint: str
) -> None:
    """imsEndpoint must look like a host or an http(s) URL; what is there is never quoted.

    A key pasted into the wrong field used to reach the credentials' repr and `check`'s
    summary (the credentials fuzzer found it).
    """
    doc = keys.oauth_document(ims_endpoint=endpoint)
    error = failure(keys.write_json(tmp_path / "o.json", doc), [endpoint])
    assert error.field == "ims_endpoint"
    assert "host or an http(s) URL" in str(error)
