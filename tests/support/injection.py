"""Sidecar injection as the tests drive it: real pod templates (a Deployment with its own
init containers and volumes, a CronJob, a StatefulSet), the pure pod function with the
released image, `refresher inject` as a subprocess, and the AdmissionReview the API
server sends to the webhook."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import yaml

from refresher.inject import LABEL, PREFIX, Outcome
from refresher.inject import inject_pod as _inject_pod
from refresher.inject_cli import DEFAULT_IMAGE

Obj = dict[str, Any]


def inject_pod(template: Obj) -> Outcome:
    """Injection with the released image, as `refresher inject` does without --image."""
    return _inject_pod(template, image=DEFAULT_IMAGE)


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  replicas: 3
  selector:
    matchLabels: {app: orders}
  template:
    metadata:
      labels:
        app: orders
        ims-token-refresher.io/inject: "true"
      annotations:
        ims-token-refresher.io/credentials-secret: orders-adobe
        ims-token-refresher.io/token-path: /var/run/secrets/adobe
        prometheus.io/scrape: "true"
    spec:
      serviceAccountName: orders
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        fsGroup: 2000
      initContainers:
        - name: migrate
          image: registry.example.com/orders:4.2
          args: [migrate, --wait]
          volumeMounts:
            - {name: config, mountPath: /etc/orders}
      containers:
        - name: api
          image: registry.example.com/orders:4.2
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /ready, port: http}
          volumeMounts:
            - {name: config, mountPath: /etc/orders}
            - {name: cache, mountPath: /var/cache/orders}
        - name: worker
          image: registry.example.com/orders:4.2
          args: [worker]
      volumes:
        - name: config
          configMap: {name: orders-config}
        - name: cache
          emptyDir: {}
"""

CRONJOB = """
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly-report
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      backoffLimit: 2
      template:
        metadata:
          labels:
            ims-token-refresher.io/inject: "true"
          annotations:
            ims-token-refresher.io/credentials-secret: reports-adobe
            ims-token-refresher.io/mode: init
            ims-token-refresher.io/containers: report
            ims-token-refresher.io/flow: oauth
        spec:
          restartPolicy: Never
          containers:
            - name: report
              image: registry.example.com/report:1.0
              args: [--token-file, /var/run/adobe-ims/access_token]
            - name: uploader
              image: registry.example.com/uploader:1.0
"""

STATEFULSET = """
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: indexer
spec:
  serviceName: indexer
  selector:
    matchLabels: {app: indexer}
  template:
    metadata:
      labels:
        app: indexer
        ims-token-refresher.io/inject: "true"
      annotations:
        ims-token-refresher.io/credentials-secret: indexer-adobe
        ims-token-refresher.io/ims-endpoint: https://ims-na1-stg1.adobelogin.com
    spec:
      containers:
        - name: indexer
          image: registry.example.com/indexer:7
          volumeMounts:
            - {name: data, mountPath: /data}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources:
          requests: {storage: 1Gi}
"""


def load(text: str) -> Obj:
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def template_of(document: Obj) -> Obj:
    if document["kind"] == "Pod":
        return document
    if document["kind"] == "CronJob":
        return document["spec"]["jobTemplate"]["spec"]["template"]
    return document["spec"]["template"]


def pod(**annotations: str) -> Obj:
    """A minimal opted-in pod with the given annotations (names without the prefix)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "labels": {LABEL: "true"},
            "annotations": {PREFIX + k.replace("_", "-"): v for k, v in annotations.items()},
        },
        "spec": {"containers": [{"name": "app", "image": "busybox:1.37.0"}]},
    }


def refresher(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}
    return subprocess.run(
        [sys.executable, "-m", "refresher", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def review(pod: Obj, *, uid: str = "2f0b3a4e-1", operation: str = "CREATE") -> Obj:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
        },
    }
