"""The fake apiserver keeps the apiserver's contract, checked over raw HTTP (and once
through the official typed client), so the Secret sink's tests mean something."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakeapi import FakeApiServer

NS = "team-a"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def call(
    server: FakeApiServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": "Bearer anything"}
        if payload is not None:
            headers["Content-Type"] = content_type
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def secret(name: str = "app", **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {key: b64(value) for key, value in data.items()},
    }


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer((NS,), user=f"system:serviceaccount:{NS}:sa") as fake:
        yield fake


def create(server: FakeApiServer, **data: str) -> dict[str, Any]:
    status, body = call(server, "POST", SECRETS, secret(**data))
    assert status == 201, body
    return body


def assert_status(body: dict[str, Any], code: int, reason: str) -> None:
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["code"] == code
    assert body["reason"] == reason
    assert body["message"]


def test_create_sets_server_fields(server: FakeApiServer) -> None:
    """POST stores the Secret with uid, creationTimestamp, a string resourceVersion, type Opaque."""
    body = create(server, k="v")
    meta = body["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert isinstance(meta["resourceVersion"], str)
    assert meta["namespace"] == NS
    assert body["type"] == "Opaque"
    status, fetched = call(server, "GET", f"{SECRETS}/app")
    assert status == 200
    assert fetched == body


def test_every_write_changes_resource_version_but_a_no_op_does_not(server: FakeApiServer) -> None:
    """resourceVersion changes on each real write; a PUT of identical content keeps it."""
    first = create(server, k="v")
    changed = {**first, "data": {"k": b64("w")}}
    status, second = call(server, "PUT", f"{SECRETS}/app", changed)
    assert status == 200
    assert second["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    status, third = call(server, "PUT", f"{SECRETS}/app", second)
    assert status == 200
    assert third["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


def test_put_with_stale_resource_version_is_conflict(server: FakeApiServer) -> None:
    """A PUT carrying an old resourceVersion gets 409 reason Conflict, details naming the Secret."""
    first = create(server, k="v")
    call(server, "PUT", f"{SECRETS}/app", {**first, "data": {"k": b64("w")}})
    status, body = call(server, "PUT", f"{SECRETS}/app", {**first, "data": {"k": b64("x")}})
    assert status == 409
    assert_status(body, 409, "Conflict")
    assert body["details"] == {"name": "app", "kind": "secrets"}
    assert server.secret_data(NS, "app") == {"k": b"w"}


def test_put_without_resource_version_is_unconditional(server: FakeApiServer) -> None:
    """Secrets allow an unconditional update: no resourceVersion, no precondition."""
    create(server, k="v")
    status, _ = call(server, "PUT", f"{SECRETS}/app", secret(k="w"))
    assert status == 200
    assert server.secret_data(NS, "app") == {"k": b"w"}


def test_put_of_missing_secret_is_not_found(server: FakeApiServer) -> None:
    """Secrets do not allow create-on-update: PUT of a missing one is 404 NotFound."""
    status, body = call(server, "PUT", f"{SECRETS}/app", secret(k="v"))
    assert status == 404
    assert_status(body, 404, "NotFound")


def test_post_of_existing_name_is_already_exists(server: FakeApiServer) -> None:
    """A second POST of one name is 409 like a conflict, told apart by reason AlreadyExists."""
    create(server, k="v")
    status, body = call(server, "POST", SECRETS, secret(k="w"))
    assert status == 409
    assert_status(body, 409, "AlreadyExists")
    assert body["message"] == 'secrets "app" already exists'


def test_missing_secret_and_missing_namespace(server: FakeApiServer) -> None:
    """GET of a missing Secret names secrets; POST into a missing namespace names namespaces."""
    status, body = call(server, "GET", f"{SECRETS}/nope")
    assert status == 404
    assert_status(body, 404, "NotFound")
    assert body["details"] == {"name": "nope", "kind": "secrets"}
    status, body = call(server, "POST", "/api/v1/namespaces/ghost/secrets", secret(k="v"))
    assert status == 404
    assert body["message"] == 'namespaces "ghost" not found'
    assert body["details"] == {"name": "ghost", "kind": "namespaces"}
    assert call(server, "GET", "/api/v1/namespaces/ghost")[0] == 404
    status, namespace = call(server, "GET", f"/api/v1/namespaces/{NS}")
    assert status == 200
    assert namespace["kind"] == "Namespace"


def test_forbidden_verb_has_the_apiserver_message(server: FakeApiServer) -> None:
    """A forbidden verb is 403 Forbidden, worded like the apiserver's RBAC denial."""
    create(server, k="v")
    server.forbid("update", "secrets", "app")
    status, body = call(server, "PUT", f"{SECRETS}/app", secret(k="w"))
    assert status == 403
    assert_status(body, 403, "Forbidden")
    assert body["message"] == (
        f'secrets "app" is forbidden: User "system:serviceaccount:{NS}:sa" cannot update '
        f'resource "secrets" in API group "" in the namespace "{NS}"'
    )
    server.forbid("create")
    status, body = call(server, "POST", SECRETS, secret("other", k="v"))
    assert status == 403
    assert body["message"].startswith('secrets is forbidden: User "')
    assert call(server, "GET", f"{SECRETS}/app")[0] == 200  # only the named verbs are denied


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (secret("Bad_Name", k="v"), 'metadata.name: Invalid value: "Bad_Name"'),
        ({"metadata": {"name": "app"}, "data": {"k": "not base64!"}}, "data[k]"),
        ({"metadata": {"name": "app"}, "data": {"bad/key": b64("v")}}, "data[bad/key]"),
    ],
)
def test_invalid_objects_are_rejected(
    server: FakeApiServer, obj: dict[str, Any], fragment: str
) -> None:
    """Bad names, bad data keys and non-base64 data are 422 Invalid, naming the field."""
    status, body = call(server, "POST", SECRETS, obj)
    assert status == 422
    assert_status(body, 422, "Invalid")
    assert fragment in body["message"]
    assert server.secrets == {}


def test_type_is_immutable_and_string_data_is_folded(server: FakeApiServer) -> None:
    """stringData is folded into data on write; changing the type is 422."""
    status, body = call(
        server, "POST", SECRETS, {"metadata": {"name": "app"}, "stringData": {"k": "v"}}
    )
    assert status == 201
    assert "stringData" not in body
    assert server.secret_data(NS, "app") == {"k": b"v"}
    status, body = call(server, "PUT", f"{SECRETS}/app", {**body, "type": "kubernetes.io/tls"})
    assert status == 422
    assert "type: Invalid value" in body["message"]


def test_patch_is_not_implemented(server: FakeApiServer) -> None:
    """PATCH is 405 with a Status and changes nothing: the Secret sink writes by PUT only."""
    create(server, k="v")
    status, body = call(
        server, "PATCH", f"{SECRETS}/app", {"data": {"k": b64("w")}}, "application/merge-patch+json"
    )
    assert status == 405
    assert_status(body, 405, "MethodNotAllowed")
    assert server.secret_data(NS, "app") == {"k": b"v"}


def test_fail_next_and_request_counters(server: FakeApiServer) -> None:
    """fail_next answers the next N requests with that status; requests counts every verb."""
    server.fail_next(2, status=503)
    assert call(server, "GET", f"{SECRETS}/app")[0] == 503
    _, body = call(server, "GET", f"{SECRETS}/app")
    assert_status(body, 503, "ServiceUnavailable")
    assert call(server, "GET", f"{SECRETS}/app")[0] == 404
    create(server, k="v")
    call(server, "DELETE", f"{SECRETS}/app")
    assert server.requests == {"GET": 3, "POST": 1, "DELETE": 1}
    assert server.secrets == {}


def test_drop_next_closes_without_answer(server: FakeApiServer) -> None:
    """drop_next closes the connection without a response line."""
    server.drop_next(1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(server, "GET", f"{SECRETS}/app")
    assert call(server, "GET", f"{SECRETS}/app")[0] == 404


def test_down_refuses_connections_until_up(server: FakeApiServer) -> None:
    """down() refuses connections on the same port; up() serves again with state kept."""
    create(server, k="v")
    server.down()
    with pytest.raises(ConnectionRefusedError):
        call(server, "GET", f"{SECRETS}/app")
    server.up()
    assert call(server, "GET", f"{SECRETS}/app")[0] == 200


def test_bump_before_next_write_makes_the_write_conflict(server: FakeApiServer) -> None:
    """The concurrent-writer hook changes the Secret between a GET and the next PUT."""
    create(server, k="v")
    server.bump_before_next_write(NS, "app", lambda obj: obj["data"].update(k=b64("theirs")))
    _, read = call(server, "GET", f"{SECRETS}/app")
    status, body = call(server, "PUT", f"{SECRETS}/app", {**read, "data": {"k": b64("ours")}})
    assert status == 409
    assert body["reason"] == "Conflict"
    assert server.secret_data(NS, "app") == {"k": b"theirs"}
    status, _ = call(server, "PUT", f"{SECRETS}/app", {**read, "data": {"k": b64("ours")}})
    assert status == 409  # the hook fired once; the stored version is still newer than ours


def test_official_client_reads_through_kubeconfig(server: FakeApiServer, tmp_path: Path) -> None:
    """The typed official client accepts the fake's objects and Status errors via a kubeconfig."""
    from kubernetes.client import ApiClient, Configuration, CoreV1Api
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.kube_config import load_kube_config

    create(server, k="v")
    configuration = Configuration()
    load_kube_config(
        config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig", NS)),
        client_configuration=configuration,
        persist_config=False,
    )
    with ApiClient(configuration) as client:
        api = CoreV1Api(client)
        fetched = api.read_namespaced_secret("app", NS, _request_timeout=5)
        assert fetched.data == {"k": b64("v")}
        assert fetched.metadata.resource_version
        with pytest.raises(ApiException) as caught:
            api.read_namespaced_secret("nope", NS, _request_timeout=5)
    assert caught.value.status == 404
    assert server.authorizations[-1] == "Bearer fake-service-account-token"
