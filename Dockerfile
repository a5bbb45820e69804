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
#
# PYTHON_IMAGE is a full reference (registry/name:tag): the runtime stage
# records it as org.opencontainers.image.base.name, and builders that do not
# guess registries (buildah, podman) can pull it. scripts/image-test.sh sets
# it to a local Debian stand-in.
ARG PYTHON_IMAGE=docker.io/library/python:3.12.12-slim-trixie

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies exactly as locked (requirements/*.txt, `make lock`), every
# file checked against its sha256: a changed or substituted package fails the
# build. They come first so their layer is reused while only the source
# changes. The runtime venv gets no pip of its own: a throwaway build venv's
# pip installs into it (`--python`), so the image has no package installer.
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements/build.txt \
 && python -m venv --without-pip /opt/refresher \
 && /opt/build/bin/pip --python /opt/refresher/bin/python install --no-compile \
        --require-hashes --only-binary=:all: -r requirements/runtime.txt

# .dockerignore admits only what the wheel is built from (an allowlist).
COPY . .

# The project's own wheel, built offline by the locked build backend and
# installed without dependencies (all are in place). kubernetes.aio, the
# asyncio copy of the client that nothing in the refresher or the sync client
# imports, is deleted: 41 MiB of source (and 27 MiB more once compiled), an
# eighth of the image; the sandbox of `make image-test` imports what the
# Secret sink imports. Byte-compile with unchecked hashes: the root filesystem
# is read-only at run time, so Python could never write a .pyc there, and COPY
# may change mtimes.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
 && /opt/build/bin/pip --python /opt/refresher/bin/python install --no-deps --no-compile /dist/*.whl \
 && /opt/build/bin/pip --python /opt/refresher/bin/python check \
 && rm -rf /opt/refresher/lib/python3*/site-packages/kubernetes/aio \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/refresher

FROM ${PYTHON_IMAGE} AS runtime

# Re-declared: an ARG before the first FROM is visible only to FROM lines.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ims-token-refresher" \
      org.opencontainers.image.description="Kubernetes sidecar that keeps an Adobe IMS access token fresh in a shared directory and/or a Secret" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/ims-token-refresher" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# The official image deletes the standard library's .pyc files; compile them
# once here so that startup under a read-only root filesystem does not
# recompile the stdlib in memory every time. A fixed UID/GID 65532 (the
# distroless "nonroot" convention) lets manifests say runAsUser: 65532 and
# lets runAsNonRoot be verified by the kubelet; the passwd entry keeps
# getpass/pwd lookups working. -K raises login.defs' SYS_*_MAX (999) so that
# a system account may have that id without a warning.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
 && groupadd --system --gid 65532 -K SYS_GID_MAX=65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 -K SYS_UID_MAX=65532 --no-create-home \
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
