"""The Secret sink, through a kubeconfig, the official client's HTTP layer and the fake
apiserver on a real socket (tests/support/fakeapi.py)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher.errors import ConfigError, PublishError
from refresher.sinks.secret import SecretSink, _held_token
from refresher.token import AccessToken
from tests.support.fakeapi import FakeApiServer
from tests.support.fakes import FakeClock
from tests.support.tls import self_signed_loopback

NS = "team-a"
NAME = "adobe-ims-token"
USER = f"system:serviceaccount:{NS}:ims-token-refresher"
T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[2]


def make_token(
    value: str, *, hours: float = 24, issued_h: float = 0, client_id: str = "client-1"
) -> AccessToken:
    issued = T0 + dt.timedelta(hours=issued_h)
    return AccessToken(
        value=value,
        issued_at=issued,
        expires_at=issued + dt.timedelta(hours=hours),
        flow="oauth",
        client_id=client_id,
        ims_endpoint="https://ims-na1.adobelogin.com",
    )


# Long, distinctive values so a leak into a message or a log line cannot hide.
OURS = make_token("eyOURS-" + "o" * 40, issued_h=1)
THEIRS_NEWER = make_token("eyTHEIRS-" + "t" * 40, issued_h=2)
THEIRS_OLDER = make_token("eyOLDER-" + "d" * 40, issued_h=-1)
OTHER_CLIENT = make_token("eyOTHER-" + "c" * 40, issued_h=2, client_id="client-2")
VALUES = (OURS.value, THEIRS_NEWER.value, THEIRS_OLDER.value, OTHER_CLIENT.value)


def secret_holding(token: AccessToken, **extra: Any) -> dict[str, Any]:
    """A Secret as another replica of ours would have written it."""
    files = token.published_files()
    return {
        "metadata": {
            "name": NAME,
            "labels": {"app.kubernetes.io/managed-by": "ims-token-refresher"},
        },
        "type": "Opaque",
        "data": {key: base64.b64encode(content).decode() for key, content in files.items()},
        **extra,
    }


def holds(server: FakeApiServer, token: AccessToken) -> bool:
    data = server.secret_data(NS, NAME)
    return data["access_token"] == token.value.encode() and data == token.published_files()


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer((NS,), user=USER) as fake:
        yield fake
        # Never delete-and-create: readers must never see the Secret vanish.
        assert fake.requests["DELETE"] == 0


@pytest.fixture
def clock() -> FakeClock:
    # After every issue time below: a token issued in the future is never adopted.
    return FakeClock(T0 + dt.timedelta(hours=2, minutes=1))


@pytest.fixture
def kubeconfig(server: FakeApiServer, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig", NS)


@pytest.fixture
def make_sink(kubeconfig: Path, clock: FakeClock, tmp_path: Path) -> Callable[..., SecretSink]:
    def build(namespace: str | None = NS, **kwargs: Any) -> SecretSink:
        kwargs.setdefault("kubeconfig", kubeconfig)
        kwargs.setdefault("in_cluster", False)
        kwargs.setdefault("service_account_dir", tmp_path / "no-service-account")
        return SecretSink(NAME, namespace, clock=clock, **kwargs)

    return build


@pytest.fixture
def sink(make_sink: Callable[..., SecretSink]) -> SecretSink:
    return make_sink()


@pytest.fixture(autouse=True)
def _no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for value in VALUES:
        assert value not in caplog.text


def publish_error(action: Callable[[], object]) -> str:
    """Run `action`, expect PublishError, check it is one line without a token; return it."""
    with pytest.raises(PublishError) as caught:
        action()
    message = str(caught.value)
    assert caught.value.sink == "secret"
    assert "\n" not in message
    for value in VALUES:
        assert value not in message
        assert value not in repr(caught.value)
    return message


# --- writes -------------------------------------------------------------------------


def test_creates_missing_secret_with_spec_content(
    server: FakeApiServer, sink: SecretSink, clock: FakeClock
) -> None:
    """A missing Secret is created: Opaque, the three published files, label and annotations."""
    assert sink.publish(OURS) is OURS
    stored = server.secret(NS, NAME)
    assert stored is not None
    assert stored["type"] == "Opaque"
    assert server.secret_data(NS, NAME) == OURS.published_files()
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "ims-token-refresher"}
    assert stored["metadata"]["annotations"] == {
        "ims-token-refresher/expires-at": "2026-11-27T13:00:00Z",
        "ims-token-refresher/refreshed-at": "2026-11-26T14:01:00Z",
    }
    assert server.requests == {"GET": 1, "POST": 1}


def test_update_carries_the_resource_version_it_read(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """An existing Secret is replaced by PUT with the resourceVersion of the object just read."""
    read_version = server.put_secret(secret_holding(THEIRS_OLDER), NS)["metadata"][
        "resourceVersion"
    ]
    assert sink.publish(OURS) is OURS
    puts = [body for method, _, body in server.bodies if method == "PUT"]
    assert len(puts) == 1
    assert puts[0]["metadata"]["resourceVersion"] == read_version
    assert holds(server, OURS)
    assert server.requests["POST"] == 0


def test_republishing_the_held_token_writes_nothing(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """Publishing the token the Secret already holds is a read, not a write."""
    sink.publish(OURS)
    version = server.secret(NS, NAME)["metadata"]["resourceVersion"]  # type: ignore[index]
    assert sink.publish(OURS) is OURS
    assert server.secret(NS, NAME)["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert server.requests == {"GET": 2, "POST": 1}


def test_user_keys_labels_and_annotations_are_preserved(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """Keys, labels and annotations that users put on the Secret survive our writes."""
    server.put_secret(
        {
            "metadata": {
                "name": NAME,
                "labels": {"team": "a"},
                "annotations": {"owner": "platform", "ims-token-refresher/expires-at": "old"},
            },
            "data": {"user-key": base64.b64encode(b"keep me").decode()},
        },
        NS,
    )
    sink.publish(OURS)
    sink.publish(THEIRS_NEWER)
    stored = server.secret(NS, NAME)
    assert stored is not None
    assert server.secret_data(NS, NAME) == {
        "user-key": b"keep me",
        **THEIRS_NEWER.published_files(),
    }
    assert stored["metadata"]["labels"] == {
        "team": "a",
        "app.kubernetes.io/managed-by": "ims-token-refresher",
    }
    assert stored["metadata"]["annotations"]["owner"] == "platform"
    assert stored["metadata"]["annotations"]["ims-token-refresher/expires-at"] == (
        "2026-11-27T14:00:00Z"
    )


def test_conflict_adopts_a_newer_valid_token(server: FakeApiServer, sink: SecretSink) -> None:
    """On 409 Conflict, a valid token of our client outliving ours is returned, not overwritten."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.bump_before_next_write(NS, NAME, lambda obj: obj.update(secret_holding(THEIRS_NEWER)))
    adopted = sink.publish(OURS)
    assert adopted == THEIRS_NEWER
    assert holds(server, THEIRS_NEWER)
    assert server.requests["PUT"] == 1  # the conflicting one; no overwrite after it


@pytest.mark.parametrize(
    ("concurrent", "why"),
    [
        (THEIRS_OLDER, "expires before ours"),
        (OTHER_CLIENT, "another client"),
    ],
    ids=["older", "other-client"],
)
def test_conflict_retries_when_the_other_token_is_not_better(
    server: FakeApiServer, sink: SecretSink, concurrent: AccessToken, why: str
) -> None:
    """On 409 with an older or foreign token in place, the write is retried on the new version."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.bump_before_next_write(NS, NAME, lambda obj: obj.update(secret_holding(concurrent)))
    assert sink.publish(OURS) is OURS, why
    assert holds(server, OURS)
    assert server.requests["PUT"] == 2


def test_conflict_does_not_adopt_an_expired_token(
    server: FakeApiServer, sink: SecretSink, clock: FakeClock
) -> None:
    """A conflicting token that outlives ours on paper but is expired now is overwritten."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.bump_before_next_write(NS, NAME, lambda obj: obj.update(secret_holding(THEIRS_NEWER)))
    clock.advance(30 * 3600)  # both tokens expired: ours is still the one to publish
    assert sink.publish(OURS) is OURS
    assert holds(server, OURS)


def test_conflict_where_only_metadata_changed_retries(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A concurrent edit of something else (a user's label) is kept and our write retried."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.bump_before_next_write(
        NS, NAME, lambda obj: obj["metadata"]["labels"].update({"edited": "by-user"})
    )
    assert sink.publish(OURS) is OURS
    stored = server.secret(NS, NAME)
    assert stored is not None
    assert stored["metadata"]["labels"]["edited"] == "by-user"
    assert holds(server, OURS)


def test_already_exists_race_adopts_the_concurrent_creation(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A concurrent create (POST 409 AlreadyExists) is re-read and its newer token adopted."""
    server.before_next("POST", lambda fake: fake.put_secret(secret_holding(THEIRS_NEWER), NS))
    assert sink.publish(OURS) == THEIRS_NEWER
    assert holds(server, THEIRS_NEWER)
    assert server.requests == {"GET": 2, "POST": 1}


def test_already_exists_race_updates_over_an_older_creation(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """After AlreadyExists with an older token inside, our token is written with a PUT."""
    server.before_next("POST", lambda fake: fake.put_secret(secret_holding(THEIRS_OLDER), NS))
    assert sink.publish(OURS) is OURS
    assert holds(server, OURS)
    assert server.requests == {"GET": 2, "POST": 1, "PUT": 1}


def test_secret_deleted_between_read_and_write_is_created_again(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A 404 on PUT (deleted since our read) re-reads and creates the Secret."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.before_next("PUT", lambda fake: fake.remove_secret(NS, NAME))
    assert sink.publish(OURS) is OURS
    assert holds(server, OURS)
    assert server.requests == {"GET": 2, "PUT": 1, "POST": 1}


def test_gives_up_on_a_secret_that_keeps_changing(server: FakeApiServer, sink: SecretSink) -> None:
    """Endless conflicts end in one PublishError after a bounded number of writes."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    for _ in range(10):
        server.before_next("PUT", lambda fake: fake.bump(NS, NAME))
    message = publish_error(lambda: sink.publish(OURS))
    assert message == (
        "secret sink: gave up after 5 conflicting writes on secrets/adobe-ims-token in namespace "
        '"team-a": another writer keeps changing it'
    )
    assert server.requests["PUT"] == 5
    assert holds(server, THEIRS_OLDER)


# --- reads --------------------------------------------------------------------------


def test_read_current_returns_the_published_token(server: FakeApiServer, sink: SecretSink) -> None:
    """read_current decodes token.json of a Secret another replica wrote (adoption at start)."""
    assert sink.read_current() is None
    server.put_secret(secret_holding(THEIRS_NEWER), NS)
    assert sink.read_current() == THEIRS_NEWER


@pytest.mark.parametrize(
    "mangle",
    [
        lambda obj: obj["metadata"].pop("labels"),
        lambda obj: obj["data"].pop("token.json"),
        lambda obj: obj["data"].update({"token.json": "!!not-base64"}),
        lambda obj: obj["data"].update({"token.json": base64.b64encode(b"{").decode()}),
        lambda obj: obj["data"].update(
            {"token.json": base64.b64encode(json.dumps({"access_token": ""}).encode()).decode()}
        ),
    ],
    ids=["not-ours", "no-token-json", "not-base64", "not-json", "no-token"],
)
def test_read_current_ignores_foreign_or_garbled_secrets(
    server: FakeApiServer, sink: SecretSink, mangle: Callable[[dict[str, Any]], object]
) -> None:
    """A Secret without our label, or with a missing or garbled token.json, holds no token."""
    obj = secret_holding(THEIRS_NEWER)
    mangle(obj)
    server.put_secret(obj, NS)
    assert sink.read_current() is None


# --- another writer of the Secret plants a forgery --------------------------------------
# Anyone with "update" on the Secret (another workload's service account, a careless
# kubectl) can write anything into it. Nothing it writes may be adopted unless it is
# a plausible, complete set, and nothing it writes may crash the sink.


def _b64(raw: bytes | str) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def _document(**changes: object) -> str:
    document = {**THEIRS_NEWER.to_document(), **changes}
    return _b64(json.dumps(document))


def _forge_data(**data: object) -> Callable[[dict[str, Any]], object]:
    return lambda obj: obj["data"].update(data)


FORGERIES: dict[str, Callable[[dict[str, Any]], object]] = {
    "year-9999-expiry": _forge_data(**{"token.json": _document(expires_at="9999-12-31T23:59:59Z")}),
    "issued-in-the-future": _forge_data(
        **{
            "token.json": _document(
                issued_at="2026-11-27T12:00:00Z", expires_at="2026-11-28T12:00:00Z"
            )
        }
    ),
    "lifetime-over-48h": _forge_data(
        **{
            "token.json": _document(
                issued_at="2026-11-26T12:00:00Z", expires_at="2026-11-30T12:00:00Z"
            )
        }
    ),
    "data-is-a-list": lambda obj: obj.update(data=["token.json"]),
    "data-is-a-string": lambda obj: obj.update(data="token.json"),
    "labels-is-a-list": lambda obj: obj["metadata"].update(labels=["ims-token-refresher"]),
    "label-removed": lambda obj: obj["metadata"].pop("labels"),
    "label-other-value": lambda obj: obj["metadata"].update(
        labels={"app.kubernetes.io/managed-by": "helm"}
    ),
    "token-json-a-number": _forge_data(**{"token.json": 42}),
    "token-json-an-object": _forge_data(**{"token.json": {"access_token": "x"}}),
    "token-json-wrong-types": _forge_data(
        **{"token.json": _b64(json.dumps({"access_token": 42, "issued_at": 7, "expires_at": []}))}
    ),
    "token-json-a-list": _forge_data(**{"token.json": _b64("[1, 2]")}),
    "token-json-deep-nesting": _forge_data(**{"token.json": _b64("[" * 200_000)}),
    "token-json-huge": _forge_data(**{"token.json": _document(padding="p" * 300_000)}),
    "access-token-key-disagrees": _forge_data(access_token=_b64("eyFORGED-" + "f" * 40)),
    "access-token-key-missing": lambda obj: obj["data"].pop("access_token"),
    "access-token-key-not-base64": _forge_data(access_token="!!!"),
    "access-token-key-a-number": _forge_data(access_token=7),
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_forged_secret_is_never_adopted_and_never_crashes(
    server: FakeApiServer, sink: SecretSink, forge: Callable[[dict[str, Any]], object]
) -> None:
    """A forged or garbled Secret (absurd expiry, wrong types, huge token.json, no label, keys
    that disagree) holds no token for us, and our publish replaces it with a valid set."""
    obj = secret_holding(THEIRS_NEWER)
    forge(obj)
    server.put_secret(obj, NS)
    assert sink.read_current() is None
    assert sink.publish(OURS) is OURS
    assert holds(server, OURS)
    stored = server.secret(NS, NAME)
    assert stored is not None
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ims-token-refresher"


@pytest.mark.parametrize(
    "obj",
    [
        {"metadata": "not-an-object", "data": {}},
        {"metadata": {"labels": "x"}, "data": None},
        {"metadata": None},
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "ims-token-refresher"}}},
        {
            "metadata": {"labels": {"app.kubernetes.io/managed-by": "ims-token-refresher"}},
            "data": {"token.json": None, "access_token": None},
        },
    ],
    ids=["metadata-string", "labels-string", "metadata-null", "no-data", "null-values"],
)
def test_objects_no_apiserver_would_store_hold_no_token(obj: dict[str, Any]) -> None:
    """Shapes the fake apiserver cannot even store (a proxy could still answer them) hold no
    token and raise nothing."""
    assert _held_token(obj, T0) is None


def test_a_secret_answer_past_the_size_cap_is_refused_unread(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A Secret inflated past what any Secret can hold (3 MiB of junk) is one clear error from
    read_current and publish, never parsed into memory, and never overwritten blindly."""
    obj = secret_holding(THEIRS_NEWER)
    obj["data"]["junk"] = _b64(b"j" * (3 * 1024 * 1024))
    server.put_secret(obj, NS)
    assert "larger than" in publish_error(sink.read_current)
    assert "larger than" in publish_error(lambda: sink.publish(OURS))
    assert server.requests["PUT"] == 0


def test_a_relabelled_secret_is_taken_back(server: FakeApiServer, sink: SecretSink) -> None:
    """Our own valid token, with the managed-by label removed by someone, is not adopted (it
    may not be ours); the next publish writes ours and restores the label, keeping user keys."""
    obj = secret_holding(THEIRS_NEWER)
    obj["metadata"]["labels"] = {"team": "a"}
    obj["data"]["user-key"] = _b64("keep me")
    server.put_secret(obj, NS)
    assert sink.read_current() is None
    assert sink.publish(OURS) is OURS
    stored = server.secret(NS, NAME)
    assert stored is not None
    assert stored["metadata"]["labels"] == {
        "team": "a",
        "app.kubernetes.io/managed-by": "ims-token-refresher",
    }
    assert server.secret_data(NS, NAME)["user-key"] == b"keep me"


def test_a_conflicting_writer_with_a_forged_expiry_is_not_adopted(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """On a 409, a year-9999 token the other writer left is overwritten, not returned."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.bump_before_next_write(NS, NAME, FORGERIES["year-9999-expiry"])
    assert sink.publish(OURS) is OURS
    assert holds(server, OURS)


# --- errors -------------------------------------------------------------------------


def test_forbidden_update_names_verb_resource_and_namespace(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A 403 on update says which verb on which Secret in which namespace, and where RBAC lives."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.forbid("update", "secrets", NAME)
    assert publish_error(lambda: sink.publish(OURS)) == (
        'secret sink: RBAC forbids "update" on secrets/adobe-ims-token in namespace "team-a": '
        "grant it to the ServiceAccount (see manifests/base/rbac.yaml)"
    )
    assert holds(server, THEIRS_OLDER)  # the previous token survives the failure


def test_forbidden_create_and_get(server: FakeApiServer, sink: SecretSink) -> None:
    """A 403 on create names the collection (create cannot be scoped by name); get, the Secret."""
    server.forbid("create")
    assert publish_error(lambda: sink.publish(OURS)) == (
        'secret sink: RBAC forbids "create" on secrets in namespace "team-a": '
        "grant it to the ServiceAccount (see manifests/base/rbac.yaml)"
    )
    server.forbid("get")
    assert publish_error(sink.read_current).startswith(
        'secret sink: RBAC forbids "get" on secrets/adobe-ims-token in namespace "team-a"'
    )


def test_missing_namespace(server: FakeApiServer, make_sink: Callable[..., SecretSink]) -> None:
    """Publishing into a namespace that does not exist says so in one line."""
    sink = make_sink("ghost")
    assert sink.read_current() is None  # a GET there is a plain "secret not found"
    assert publish_error(lambda: sink.publish(OURS)) == 'secret sink: namespace "ghost" not found'


def test_unreachable_api_server(server: FakeApiServer, sink: SecretSink) -> None:
    """A refused connection names the API URL and the short reason, for the caller to retry."""
    server.down()
    message = publish_error(lambda: sink.publish(OURS))
    assert message == (
        f"secret sink: Kubernetes API unreachable at {server.url}: "
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    server.up()
    assert sink.publish(OURS) is OURS


@pytest.mark.parametrize(
    ("status", "reason"),
    [(503, "ServiceUnavailable"), (500, "InternalError"), (429, "TooManyRequests")],
)
def test_server_errors_read_as_unreachable(
    server: FakeApiServer, sink: SecretSink, status: int, reason: str
) -> None:
    """5xx and 429 are reported as a (retryable) unreachable API with the status."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.before_next("PUT", lambda fake: fake.fail_next(1, status))
    assert publish_error(lambda: sink.publish(OURS)) == (
        f"secret sink: Kubernetes API unreachable at {server.url}: HTTP {status} {reason}"
    )
    assert holds(server, THEIRS_OLDER)


def test_dropped_connection(server: FakeApiServer, sink: SecretSink) -> None:
    """A connection closed without an answer is reported, not resent (the write may have landed)."""
    server.put_secret(secret_holding(THEIRS_OLDER), NS)
    server.before_next("PUT", lambda fake: fake.drop_next(1))
    assert publish_error(lambda: sink.publish(OURS)) == (
        f"secret sink: Kubernetes API unreachable at {server.url}: "
        "Connection aborted: Remote end closed connection without response"
    )
    assert server.requests["PUT"] == 1


def test_every_request_has_a_timeout(
    server: FakeApiServer, make_sink: Callable[..., SecretSink]
) -> None:
    """A hung API server fails the publish after the read timeout instead of hanging it."""
    sink = make_sink(timeout_s=(0.5, 0.3))
    server.delay_next(1, 5.0)
    started = time.monotonic()
    message = publish_error(lambda: sink.publish(OURS))
    assert time.monotonic() - started < 2.0
    assert message == (
        f"secret sink: Kubernetes API unreachable at {server.url}: "
        "Read timed out. (read timeout=0.3)"
    )


def test_invalid_write_reports_the_apiserver_reason(
    server: FakeApiServer, sink: SecretSink
) -> None:
    """A 422 (here: an immutable Secret) quotes the apiserver's one-line reason."""
    server.put_secret({**secret_holding(THEIRS_OLDER), "immutable": True}, NS)
    assert publish_error(lambda: sink.publish(OURS)) == (
        "secret sink: Kubernetes rejected secrets/adobe-ims-token "
        'in namespace "team-a" as invalid: '
        'Secret "adobe-ims-token" is invalid: data: Forbidden: field is immutable when '
        "`immutable` is set"
    )


def test_rejected_credentials(tmp_path: Path, clock: FakeClock) -> None:
    """A 401 says the API rejected our credentials and where they come from."""
    with FakeApiServer((NS,), token="the-real-one") as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kc", NS, token="a-wrong-one")
        sink = SecretSink(NAME, NS, clock=clock, kubeconfig=kubeconfig, in_cluster=False)
        assert publish_error(sink.read_current) == (
            f"secret sink: Kubernetes API at {fake.url} rejected our credentials "
            "(401 Unauthorized): check the ServiceAccount token or the kubeconfig user"
        )


# --- configuration ------------------------------------------------------------------


def test_namespace_defaults_to_the_pods(
    server: FakeApiServer, make_sink: Callable[..., SecretSink], tmp_path: Path
) -> None:
    """Without --secret-namespace, the service account's namespace file names it."""
    service_account = tmp_path / "sa"
    service_account.mkdir()
    (service_account / "namespace").write_text(NS)
    sink = make_sink(None, service_account_dir=service_account)
    assert sink.namespace == NS
    sink.publish(OURS)
    assert holds(server, OURS)


def test_namespace_is_required_outside_a_cluster(make_sink: Callable[..., SecretSink]) -> None:
    """Outside a cluster, a missing namespace is a configuration error naming the flag."""
    with pytest.raises(ConfigError, match=r"^--secret-namespace is required outside a cluster$"):
        make_sink(None)


@pytest.mark.parametrize("name", ["Bad_Name", "", "x" * 254])
def test_invalid_secret_name_is_a_configuration_error(clock: FakeClock, name: str) -> None:
    """A name the apiserver would reject fails at start, not at the first refresh."""
    with pytest.raises(ConfigError, match="is not a valid Secret name"):
        SecretSink(name, NS, clock=clock, in_cluster=False)


def test_unusable_kubeconfig_is_a_configuration_error(clock: FakeClock, tmp_path: Path) -> None:
    """A missing or broken kubeconfig is a ConfigError naming the file."""
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=f"kubeconfig {missing}"):
        SecretSink(NAME, NS, clock=clock, kubeconfig=missing, in_cluster=False)
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    with pytest.raises(ConfigError, match=f"kubeconfig {broken}"):
        SecretSink(NAME, NS, clock=clock, kubeconfig=broken, in_cluster=False)


def test_in_cluster_without_service_account_is_a_configuration_error(
    clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-cluster mode without a mounted token says so at start."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    with pytest.raises(ConfigError, match="in-cluster config: Service token file does not exist"):
        SecretSink(NAME, NS, clock=clock, in_cluster=True, service_account_dir=tmp_path)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A CA-free self-signed certificate for 127.0.0.1 (what the client will verify)."""
    return self_signed_loopback(directory, "fake-apiserver")


def test_in_cluster_over_tls_with_the_service_account(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod: HTTPS verified against ca.crt, the mounted token as bearer, the pod's namespace."""
    certfile, keyfile = _self_signed(tmp_path)
    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "token").write_text("projected-sa-token")
    (service_account / "ca.crt").write_bytes(certfile.read_bytes())
    (service_account / "namespace").write_text(NS)
    with FakeApiServer(
        (NS,), token="projected-sa-token", certfile=certfile, keyfile=keyfile
    ) as fake:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        sink = SecretSink(NAME, None, clock=clock, service_account_dir=service_account)
        assert sink.host == fake.url
        assert sink.publish(OURS) is OURS
        assert fake.secret_data(NS, NAME) == OURS.published_files()
        assert {auth.lower() for auth in fake.authorizations} == {"bearer projected-sa-token"}


def test_tls_is_verified(tmp_path: Path, clock: FakeClock) -> None:
    """An API server whose certificate is not trusted is unreachable, never silently accepted."""
    certfile, keyfile = _self_signed(tmp_path)
    with FakeApiServer((NS,), certfile=certfile, keyfile=keyfile) as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kc", NS)  # no CA: system trust only
        sink = SecretSink(NAME, NS, clock=clock, kubeconfig=kubeconfig, in_cluster=False)
        message = publish_error(sink.read_current)
        assert message.startswith(f"secret sink: Kubernetes API unreachable at {fake.url}: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message
        assert fake.secrets == {}


# --- import cost --------------------------------------------------------------------


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_kubernetes_is_imported_only_when_a_sink_is_built(kubeconfig: Path) -> None:
    """Importing refresher and the sink module loads no kubernetes; constructing the sink does."""
    out = _run_python(
        f"""
        import sys
        import refresher.cli, refresher.service, refresher.sinks.secret
        from refresher.sinks.secret import SecretSink, _held_token
        from refresher.clock import SystemClock
        print("before", any(m.split(".")[0] == "kubernetes" for m in sys.modules))
        SecretSink("x", "team-a", clock=SystemClock(), kubeconfig={str(kubeconfig)!r},
                   in_cluster=False)
        print("after", "kubernetes" in sys.modules)
        """
    )
    assert out.split() == ["before", "False", "after", "True"]


RSS_PROBE = """
import importlib, json, pkgutil, sys
from datetime import UTC, datetime, timedelta
# kubernetes_validate (a test-only extra) is imported by kubernetes.dynamic when present;
# the product image does not ship it, so measure without it.
sys.modules["kubernetes_validate"] = None

def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

import refresher
for info in pkgutil.walk_packages(refresher.__path__, "refresher."):
    if info.name not in ("refresher.__main__", "refresher.emulator"):
        importlib.import_module(info.name)
from refresher.clock import SystemClock
from refresher.sinks.secret import SecretSink, _held_token
from refresher.token import AccessToken
before = rss_mib()
sink = SecretSink("adobe-ims-token", "team-a", clock=SystemClock(), kubeconfig=sys.argv[1],
                  in_cluster=False)
now = datetime.now(UTC)
for i in range(20):
    sink.publish(AccessToken("probe-%d-" % i + "x" * 1000, now, now + timedelta(hours=24),
                             "oauth", "client", "ims"))
    sink.read_current()
print(json.dumps({
    "before_mib": before,
    "after_mib": rss_mib(),
    "core_v1_api": "kubernetes.client.api.core_v1_api" in sys.modules,
    "models": sum(m.startswith("kubernetes.client.models.") for m in sys.modules),
}))
"""


def test_secret_mode_memory(server: FakeApiServer, kubeconfig: Path) -> None:
    """The sink never loads CoreV1Api or the model classes, and costs well under 20 MiB RSS."""
    result = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(kubeconfig)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    figures = json.loads(result.stdout)
    print(
        f"RSS: refresher {figures['before_mib']:.1f} MiB, "
        f"+ Secret sink and 20 publishes {figures['after_mib']:.1f} MiB"
    )
    assert not figures["core_v1_api"]
    assert figures["models"] == 0
    assert figures["after_mib"] - figures["before_mib"] < 20
