"""Sidecar injection: the pure function shared by `refresher inject` and the webhook.

Nothing here does I/O or imports the refresher's pipeline, so the CLI and the
admission webhook cannot drift: both call `inject_pod`.
"""

from refresher.inject.documents import TEMPLATE_PATHS, Report, describe, inject_documents
from refresher.inject.patch import json_patch
from refresher.inject.pod import (
    CONTAINER,
    CREDENTIALS_VOLUME,
    LABEL,
    PREFIX,
    PROBE_PORT,
    STATUS,
    TOKEN_VOLUME,
    Options,
    Outcome,
    Refused,
    inject_pod,
    opted_in,
)

__all__ = [
    "CONTAINER",
    "CREDENTIALS_VOLUME",
    "LABEL",
    "PREFIX",
    "PROBE_PORT",
    "STATUS",
    "TEMPLATE_PATHS",
    "TOKEN_VOLUME",
    "Options",
    "Outcome",
    "Refused",
    "Report",
    "describe",
    "inject_documents",
    "inject_pod",
    "json_patch",
    "opted_in",
]
