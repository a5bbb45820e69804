# syntax=docker/dockerfile:1
#
# ims-token-refresher image: a venv built in one stage, copied into a clean
# runtime stage of the same Python image (a venv is only portable to the same
# interpreter at the same path, so both stages use PYTHON_IMAGE).
#
# Why python:*-slim and not distroless: distroless/python3 follows Debian's
# interpreter (no way to pin a Python minor release by tag) and has no shell
# for `kubectl exec` debugging; slim is pinned by tag, has no compilers, and
# with the hardening below (non-root, read-only root, no capabilities) the
# extra surface of a shell is small. Pin a digest too (`@sha256:...`) in a
# release pipeline that updates it automatically.
ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# .dockerignore admits only what the wheel is built from (an allowlist).
COPY . .

# The venv gets no pip of its own: the base image's pip installs into it
# (`--python`), so the runtime has no package installer and no pip cache.
# Byte-compile with unchecked hashes: the root filesystem is read-only at run
# time, so Python could never write a .pyc there, and COPY may change mtimes.
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/refresher \
 && pip --python /opt/refresher/bin/python install --no-cache-dir --no-compile /dist/*.whl \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/refresher

FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ims-token-refresher" \
      org.opencontainers.image.description="Kubernetes sidecar that keeps an Adobe IMS access token fresh in a shared directory and/or a Secret" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/ims-token-refresher" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.12-slim-trixie"

# The official image deletes the standard library's .pyc files; compile them
# once here so that startup under a read-only root filesystem does not
# recompile the stdlib in memory every time. A fixed UID/GID 65532 (the
# distroless "nonroot" convention) lets manifests say runAsUser: 65532 and
# lets runAsNonRoot be verified by the kubelet; the passwd entry keeps
# getpass/pwd lookups working.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nonroot

COPY --from=builder /opt/refresher /opt/refresher

# PYTHONDONTWRITEBYTECODE: never try to write .pyc files into the read-only
# root. PYTHONUNBUFFERED: one JSON log line reaches `kubectl logs` as soon as
# it is written. No TMPDIR: the refresher writes temporary files only inside
# --token-dir, next to the files they replace.
ENV PATH=/opt/refresher/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532
EXPOSE 9876
ENTRYPOINT ["refresher"]
CMD ["run"]
