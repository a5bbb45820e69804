"""Attacks on sidecar injection, each kept as a bounded regression test.

A hostile or careless pod author (annotations that smuggle arguments, paths that
hide the application's own files, a pod that shares its processes or the node's
network), a hostile client on the webhook's port (log injection through the
review), and a manifest that `refresher inject` would turn into one that
`kubectl` reads differently (YAML 1.1 scalars) or that it cannot read at all
(an endless file, nesting past the stack).
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import jsonpatch
import pytest
import yaml

from refresher.inject import CONTAINER, LABEL, PREFIX, Refused, json_patch
from refresher.inject_cli import DEFAULT_IMAGE, dump_documents
from refresher.injector import admit
from tests.support.injection import inject_pod, one_line, pod, refresher, review

Obj = dict[str, Any]


def refused(template: Obj) -> str:
    with pytest.raises(Refused) as caught:
        inject_pod(template)
    return str(caught.value)


def with_spec(template: Obj, **spec: Any) -> Obj:
    return {**template, "spec": {**template["spec"], **spec}}


# --- annotations that smuggle something into the refresher's command line -------


@pytest.mark.parametrize(
    "endpoint",
    [
        # Kubernetes expands $(VAR) in args from the container's environment, which
        # always holds KUBERNETES_SERVICE_HOST: the credentials would go to the API server.
        "https://$(KUBERNETES_SERVICE_HOST)",
        "https://ims.example/$(HOME)",
        "$(IMS):443",
        # Credentials in an annotation are readable by anyone who can get the pod.
        "https://user:secret@ims.example",
        "user@ims.example",
        # Ports the refresher could never connect to.
        "ims.example:0",
        "ims.example:99999",
        "https://ims.example:0",
        # A homograph: a Cyrillic letter where Adobe's host has a Latin one.
        "https://ims-na1.\u0430dobelogin.com",
    ],
)
def test_ims_endpoint_that_would_not_do_what_it_says_is_refused(endpoint: str) -> None:
    """An ims-endpoint with $(VAR), userinfo or an impossible port is refused, naming it."""
    message = refused(pod(credentials_secret="c", ims_endpoint=endpoint))
    assert f"{PREFIX}ims-endpoint" in message


@pytest.mark.parametrize("endpoint", ["ims.example", "ims.example:8443", "https://[::1]:8443"])
def test_plain_ims_endpoints_still_work(endpoint: str) -> None:
    """Hosts, host:port and https URLs with a valid port are still passed as --ims-endpoint."""
    args = inject_pod(pod(credentials_secret="c", ims_endpoint=endpoint)).pod["spec"][
        "initContainers"
    ][0]["args"]
    assert args[-2:] == ["--ims-endpoint", endpoint]


# --- token-path values that hide what the application or the kubelet needs -----


@pytest.mark.parametrize(
    "path",
    [
        "/etc",  # the application's own /etc, hidden by an empty read-only directory
        "/usr",
        "/tmp",
        "/var",
        "/var/run",  # hides /var/run/secrets/kubernetes.io/serviceaccount
        "/var/run/secrets",
        "/var/run/secrets/kubernetes.io/serviceaccount",  # replaces the API token
        "/run/secrets/kubernetes.io",
        "/proc/adobe",  # the runtime refuses mounts in /proc, /sys and /dev
        "/sys",
        "/dev/shm/adobe",
    ],
)
def test_token_path_over_system_or_kubelet_paths_is_refused(path: str) -> None:
    """A token-path that would hide system directories or the kubelet's mounts is refused."""
    message = refused(pod(credentials_secret="c", token_path=path))
    assert f"{PREFIX}token-path" in message and path in message


def test_token_path_over_the_termination_message_path_is_refused() -> None:
    """A token-path above a selected container's terminationMessagePath is refused."""
    template = pod(credentials_secret="c", token_path="/app/run")
    template["spec"]["containers"][0]["terminationMessagePath"] = "/app/run/termination-log"
    message = refused(template)
    assert "terminationMessagePath" in message and "app" in message


@pytest.mark.parametrize("path", ["/var/run/adobe-ims", "/secrets/adobe", "/opt/app/token"])
def test_ordinary_token_paths_still_work(path: str) -> None:
    """Application paths, including a one-level one that is no system directory, work."""
    app = inject_pod(pod(credentials_secret="c", token_path=path)).pod["spec"]["containers"][0]
    assert app["volumeMounts"][-1]["mountPath"] == path


@pytest.mark.parametrize(
    "path",
    [
        "/var/run//adobe-ims",
        "/var/run/x/../adobe-ims/",
        "//var/run/adobe-ims/sub",
        "var/run/adobe-ims",
    ],
)
def test_a_mount_at_token_path_written_another_way_is_refused(path: str) -> None:
    """The collision check compares normalized paths, as the runtime does."""
    template = pod(credentials_secret="c")
    template["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": path}]
    assert "already mounts volume v" in refused(template)


def test_a_block_device_at_token_path_is_refused() -> None:
    """A volumeDevices entry at token-path collides like a mount."""
    template = pod(credentials_secret="c")
    template["spec"]["containers"][0]["volumeDevices"] = [
        {"name": "disk", "devicePath": "/var/run/adobe-ims"}
    ]
    assert "already mounts volume disk" in refused(template)


@pytest.mark.parametrize("volume", ["ims-token-refresher-credentials", "ims-token-refresher-token"])
@pytest.mark.parametrize("key", ["initContainers", "containers"])
def test_a_container_that_mounts_an_injected_volume_is_refused(volume: str, key: str) -> None:
    """A template naming an injected volume would get the credentials, or the token writable."""
    template = pod(credentials_secret="c")
    container = {
        "name": "sneaky",
        "image": "x",
        "volumeMounts": [{"name": volume, "mountPath": "/x"}],
    }
    template["spec"][key] = [*template["spec"].get(key, []), container]
    message = refused(template)
    assert f"volume name {volume} is already taken" in message and "sneaky" in message


# --- pods whose process or network namespace breaks the refresher's isolation ---


@pytest.mark.parametrize("field", ["shareProcessNamespace", "hostPID"])
def test_sidecar_in_a_shared_process_namespace_is_refused(field: str) -> None:
    """The application could read the refresher's credentials through /proc: refused."""
    message = refused(with_spec(pod(credentials_secret="c"), **{field: True}))
    assert f"spec.{field}" in message and f"{PREFIX}mode" in message


@pytest.mark.parametrize("field", ["shareProcessNamespace", "hostPID"])
def test_init_mode_in_a_shared_process_namespace_is_allowed(field: str) -> None:
    """In init mode the refresher has exited before the application starts: allowed."""
    outcome = inject_pod(with_spec(pod(credentials_secret="c", mode="init"), **{field: True}))
    assert outcome.result == "injected"


def test_sidecar_on_the_host_network_is_refused() -> None:
    """hostNetwork would bind the probe port 9876 on the node itself: refused in sidecar mode."""
    message = refused(with_spec(pod(credentials_secret="c"), hostNetwork=True))
    assert "spec.hostNetwork" in message and "9876" in message
    init = with_spec(pod(credentials_secret="c", mode="init"), hostNetwork=True)
    assert inject_pod(init).result == "injected"


def test_a_windows_pod_is_refused() -> None:
    """The refresher is a Linux image with Linux-only hardening: a Windows pod is refused."""
    template = with_spec(pod(credentials_secret="c"), os={"name": "windows"})
    assert "spec.os.name" in refused(template)
    assert inject_pod(with_spec(pod(credentials_secret="c"), os={"name": "linux"})).result


def test_false_namespace_sharing_fields_are_fine() -> None:
    """hostNetwork, hostPID and shareProcessNamespace set to false change nothing."""
    template = with_spec(
        pod(credentials_secret="c"), hostNetwork=False, hostPID=False, shareProcessNamespace=False
    )
    assert inject_pod(template).result == "injected"


def test_an_explicit_null_fs_group_gets_the_refresher_group() -> None:
    """`fsGroup: null` is no fsGroup: the 0440 token files need one, so it is set."""
    template = with_spec(pod(credentials_secret="c"), securityContext={"fsGroup": None})
    outcome = inject_pod(template)
    assert outcome.pod["spec"]["securityContext"]["fsGroup"] == 65532
    patch = json_patch(template, outcome.pod)
    assert jsonpatch.apply_patch(template, patch) == outcome.pod


# --- messages and logs stay one line --------------------------------------------


def test_refusals_quote_names_from_the_pod_on_one_line() -> None:
    """A container, volume or annotation name with a newline cannot forge a second line."""
    template = pod(credentials_secret="c", token_path="/app/token")
    template["spec"]["containers"][0] = {
        "name": "app\nERROR forged",
        "image": "x",
        "volumeMounts": [{"name": "v\nforged", "mountPath": "/app/token"}],
    }
    assert "\n" not in refused(template)
    typo = pod(credentials_secret="c")
    typo["metadata"]["annotations"][PREFIX + "x\nERROR forged" + "y" * 5000] = "1"
    message = refused(typo)
    assert "\n" not in message and len(message) < 400


def test_webhook_log_fields_from_the_review_are_one_line() -> None:
    """The uid (echoed to the API server as sent) is logged without its newlines."""
    body = review(pod(credentials_secret="c"), uid="2f0b\nERROR forged")
    answer = admit(json.dumps(body).encode(), "img")
    assert answer.review["response"]["uid"] == "2f0b\nERROR forged"
    assert all("\n" not in str(value) for value in answer.fields.values())


def test_cli_names_a_document_on_one_line(tmp_path: Any) -> None:
    """`inject` names a refused document on one line whatever its metadata.name holds."""
    template = pod(ims_endpoint="x")  # refused: no credentials-secret
    template["metadata"]["name"] = "p\nERROR forged"
    result = refresher("inject", stdin=json.dumps(template))
    assert result.returncode == 2 and "credentials-secret" in one_line(result.stderr)


# --- YAML that kubectl would read differently -----------------------------------

# Strings that PyYAML (YAML 1.1 as it implements it) writes plain, but that
# Kubernetes' reader (go-yaml v2 under sigs.k8s.io/yaml) resolves to a bool or a
# number: an annotation or a ConfigMap value would change type, or be rejected.
GO_YAML_NON_STRINGS = ["y", "Y", "n", "N", "080", "09", "1e3", "1E3", "1.0e3", "0o17", "-1e3"]


@pytest.mark.parametrize("text", GO_YAML_NON_STRINGS)
def test_output_quotes_strings_that_go_yaml_reads_as_other_types(text: str) -> None:
    """A string that go-yaml v2 would read as a bool or a number is written quoted."""
    document = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": text}}
    output = dump_documents([document])
    assert f"k: '{text}'" in output or f'k: "{text}"' in output, output
    assert yaml.safe_load(output) == document


def test_output_keeps_ordinary_strings_plain() -> None:
    """Quantities, names and images stay plain, as kubectl writes them."""
    document = {"cpu": "5m", "memory": "48Mi", "name": "app-1", "image": "busybox:1.37.0"}
    output = dump_documents([document])
    assert "'" not in output and '"' not in output, output


def test_cli_output_round_trips_a_yaml_1_1_minefield() -> None:
    """Every string of the input is a string of the output, through the real CLI."""
    values = {f"k{i}": v for i, v in enumerate([*GO_YAML_NON_STRINGS, "true", "on", "0755"])}
    document = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": values}
    result = refresher("inject", stdin=json.dumps(document))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == document
    for value in values.values():
        assert f": {value}\n" not in result.stdout


def test_cli_reads_plain_scalars_as_kubectl_does() -> None:
    """Plain YAML scalars mean what go-yaml v2 makes of them, in and out of `inject`.

    PyYAML's YAML 1.1 reads `1:20` as 80 (base 60), `=` as an error and reformats
    timestamps; kubectl reads them as the strings written, `y` as true, `080` as 80.
    """
    text = (
        "kind: ConfigMap\nmetadata: {name: c}\n"
        "data: {a: 1:20, b: =, c: 2001-12-14 21:59:43.10 -5, d: 2001-12-14}\n"
        "spec: {e: y, f: 080, g: 0o17, h: 0755, i: 1_000, j: Off}\n"
    )
    result = refresher("inject", stdin=text)
    assert result.returncode == 0, result.stderr
    output = yaml.safe_load(result.stdout)
    assert output["data"] == {
        "a": "1:20",
        "b": "=",
        "c": "2001-12-14 21:59:43.10 -5",
        "d": "2001-12-14",
    }
    assert output["spec"] == {"e": True, "f": 80, "g": 15, "h": 0o755, "i": 1000, "j": False}


@pytest.mark.parametrize(
    "text",
    [
        # A reviewer reads "false"; the parser keeps the last value.
        'kind: Pod\nmetadata:\n  labels:\n    ims-token-refresher.io/inject: "false"\n'
        '    ims-token-refresher.io/inject: "true"\n',
        '{"kind": "Pod",\n "kind": "Deployment"}',
        "a: {y: 1, true: 2}\n",  # one key to kubectl
    ],
)
def test_cli_refuses_a_key_written_twice(text: str) -> None:
    """A mapping with a key twice is ambiguous: exit 2, one line naming the line."""
    result = refresher("inject", stdin=text)
    assert result.returncode == 2 and "appears twice" in one_line(result.stderr)
    assert re.search(r"\bline \d+", result.stderr) and not result.stdout


def test_cli_merge_keys_may_be_overridden() -> None:
    """A key that overrides one from a merge (`<<: *base`) is no duplicate."""
    result = refresher("inject", stdin="b: &x {k: 1, j: 1}\nc: {<<: *x, k: 3}\n")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["c"] == {"k": 3, "j": 1}


# --- inputs `refresher inject` cannot hold --------------------------------------


def test_cli_endless_input_is_one_line_exit_2() -> None:
    """`-f /dev/zero` is refused after the size limit, not read until memory runs out."""
    result = refresher("inject", "-f", "/dev/zero")
    assert result.returncode == 2 and "MiB" in one_line(result.stderr)


def test_cli_nesting_too_deep_to_write_is_one_line_exit_2() -> None:
    """JSON that parses but is nested too deeply to write back is exit 2, one line."""
    depth = 1500
    text = '{"a":' * depth + "1" + "}" * depth
    result = refresher("inject", stdin=text)
    assert result.returncode == 2 and "nested too deeply" in one_line(result.stderr)


def test_cli_injects_replication_controllers_and_pod_templates() -> None:
    """The two other core kinds with a pod template are injected, not passed through."""
    template = pod(credentials_secret="c")
    del template["apiVersion"], template["kind"]
    documents = [
        {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc"}}
        | {"spec": {"template": template}},
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "pt"}}
        | {"template": template},
    ]
    result = refresher("inject", stdin=json.dumps({"kind": "List", "items": documents}))
    assert result.returncode == 0, result.stderr
    rc, pt = yaml.safe_load(result.stdout)["items"]
    assert rc["spec"]["template"]["spec"]["initContainers"][0]["name"] == CONTAINER
    assert pt["template"]["spec"]["initContainers"][0]["name"] == CONTAINER


def test_cli_warns_about_an_opted_in_template_of_an_unknown_kind() -> None:
    """An opted-in spec.template of a custom kind is passed through with a warning."""
    rollout = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "web"},
        "spec": {"template": pod(credentials_secret="c")},
    }
    result = refresher("inject", stdin=json.dumps(rollout))
    assert result.returncode == 0 and yaml.safe_load(result.stdout) == rollout
    assert "Rollout/web" in one_line(result.stderr) and "not injected" in result.stderr


# --- admission edge cases that held (kept so they keep holding) -----------------


def test_status_key_is_escaped_as_a_json_pointer() -> None:
    """The status annotation's '/' is '~1' in the patch, and the patch applies."""
    template = {**pod(credentials_secret="c"), "apiVersion": "v1", "kind": "Pod"}
    answer = admit(json.dumps(review(template)).encode(), DEFAULT_IMAGE)
    patch = json.loads(base64.b64decode(answer.review["response"]["patch"]))
    paths = [operation["path"] for operation in patch]
    assert "/metadata/annotations/ims-token-refresher.io~1status" in paths
    assert jsonpatch.apply_patch(template, patch)["metadata"]["annotations"][PREFIX + "status"]


def test_a_bare_pod_gets_every_missing_key_added() -> None:
    """A pod without annotations, initContainers, volumes or securityContext patches cleanly."""
    template = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "labels": {LABEL: "true"}},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
    }
    template["metadata"]["annotations"] = {PREFIX + "credentials-secret": "c"}
    bare = json.loads(json.dumps(template))
    del bare["metadata"]["annotations"]
    assert admit(json.dumps(review(bare)).encode(), "img").result == "refused"
    answer = admit(json.dumps(review(template)).encode(), DEFAULT_IMAGE)
    patch = json.loads(base64.b64decode(answer.review["response"]["patch"]))
    result = jsonpatch.apply_patch(template, patch)
    assert result["spec"]["initContainers"][0]["name"] == CONTAINER
    assert result == inject_pod(template).pod


def test_number_like_values_keep_their_json_type_in_the_patch() -> None:
    """True is not 1 and 1 is not 1.0 for the diff: a changed type is replaced."""
    assert json_patch({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]
    assert json_patch({"a": 1}, {"a": 1.0}) == [{"op": "replace", "path": "/a", "value": 1.0}]
    assert json_patch({"a": math.inf}, {"a": math.inf}) == []
