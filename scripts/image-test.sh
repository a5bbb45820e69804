#!/usr/bin/env bash
# `make image-test`: build the Dockerfile without Docker and run the image like a pod.
#
# 1. A stand-in for the Python base image: Debian trixie (minbase, python3,
#    venv, pip, ca-certificates) made by mmdebstrap from this machine's apt
#    mirror and committed as a local image. Its Python is Debian's (3.13), not
#    the official image's 3.12: this proves the Dockerfile's mechanics and the
#    runtime hardening, not the exact base. It is kept between runs.
# 2. `buildah build --isolation chroot --pull=never` of the Dockerfile, with
#    PYTHON_IMAGE pointing at the stand-in.
# 3. `buildah run` under the image's own USER and ENV, then a pod-like sandbox:
#    the image's root filesystem (`buildah mount`) bind-remounted read-only in
#    new mount, network and PID namespaces with only loopback, tmpfs volumes
#    for the token directory (an emptyDir) and the credentials (a Secret
#    volume, 0440 root:65532, read-only), and every process started through
#    setpriv as UID/GID 65532 with no capabilities and no_new_privs. There the
#    image's own `refresher emulator` plays IMS for `check`, `once` and `run`.
#
# Needs root (chroot, mounts, namespaces) and buildah, mmdebstrap, unshare,
# setpriv and ip (Debian: buildah mmdebstrap util-linux iproute2). Without
# root or buildah it prints one line and exits 0, so `make image-test` is safe
# anywhere; .ci/run installs the packages and runs it as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" != 0 ]]; then
  echo "image-test: skipped: needs root (buildah --isolation chroot, mounts, namespaces); CI runs it as root"
  exit 0
fi
if ! command -v buildah >/dev/null; then
  echo "image-test: skipped: buildah is not installed (Debian: apt-get install buildah mmdebstrap)"
  exit 0
fi
for tool in mmdebstrap unshare setpriv ip chroot; do
  command -v "$tool" >/dev/null || { echo "image-test: FAIL: $tool is not installed" >&2; exit 1; }
done

WORK="${IMAGE_TEST_DIR:-/var/tmp/ims-token-refresher-image-test}"
BASE=localhost/ims-token-refresher-standin-python:trixie
IMAGE=localhost/ims-token-refresher:image-test
UID_GID=65532
# Keep the image small: the issue's limit of ~320 MB is 305 MiB; the stand-in
# carries Debian's pip and venv packages, which the official slim base does not.
MAX_SIZE_MIB=305
mkdir -p "$WORK"

# A storage of our own: nothing of the machine's containers is touched, and
# `rm -rf $WORK` removes every trace.
bh() { buildah --root "$WORK/storage" --runroot "$WORK/run" "$@"; }
say() { echo "image-test: $*"; }
fail() { echo "image-test: FAIL: $*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

cleanup() {
  local status=$?
  if [[ -n "${CONTAINER:-}" ]]; then bh rm "$CONTAINER" >/dev/null 2>&1 || true; fi
  bh rmi "$IMAGE" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

apt_mirror() {
  # The first non-security archive apt on this machine is configured with.
  local uri
  # shellcheck disable=SC2016  # $(REPO_URI) is apt's template, not a shell expansion
  uri="$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
    | grep -v -e security -e updates | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian/}"
}

make_base() {
  local started ctr mnt mirror
  started=$(date +%s)
  mirror="$(apt_mirror)"
  say "making the stand-in base $BASE from $mirror (trixie, minbase)"
  ctr="$(bh from scratch)"
  mnt="$(bh mount "$ctr")"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    trixie "$mnt" "deb $mirror trixie main"
  # The machine's own extra trust anchors (a TLS-inspecting egress proxy's CA,
  # say): the build's pip must reach the package index the way the machine
  # does. Only the stand-in gets them; the official base image never does.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$mnt/usr/local/share/ca-certificates/"
    chroot "$mnt" update-ca-certificates >/dev/null 2>&1
  fi
  bh umount "$ctr" >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
  bh commit --quiet --rm "$ctr" "$BASE" >/dev/null
  say "stand-in base ready in $(elapsed "$started")"
}

started_all=$(date +%s)
if bh inspect --type image "$BASE" >/dev/null 2>&1; then
  say "reusing the stand-in base $BASE (rm -rf $WORK to make it anew)"
else
  make_base
fi

started=$(date +%s)
say "building the Dockerfile with buildah"
bh build --quiet --isolation chroot --pull=never \
  --build-arg "PYTHON_IMAGE=$BASE" \
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --tag "$IMAGE" --file Dockerfile . >/dev/null
BUILD_TIME="$(elapsed "$started")"
say "image built in $BUILD_TIME"

user="$(bh inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")"
[[ "$user" == "$UID_GID:$UID_GID" ]] || fail "image USER is '$user', not $UID_GID:$UID_GID"
base_label="$(bh inspect --type image \
  --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.base.name"}}' "$IMAGE")"
[[ "$base_label" == "$BASE" ]] || fail "base.name label is '$base_label', not the PYTHON_IMAGE $BASE"
mapfile -t IMAGE_ENV < <(bh inspect --type image --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')

CONTAINER="$(bh from --pull=never "$IMAGE")"
ids="$(bh run --isolation chroot "$CONTAINER" -- python -c 'import os; print(os.getuid(), os.getgid())')"
[[ "$ids" == "$UID_GID $UID_GID" ]] || fail "buildah run as the image's USER gave uid/gid '$ids'"
bh run --isolation chroot "$CONTAINER" -- refresher --help >/dev/null \
  || fail "refresher --help failed under the image's USER and ENV"
say "buildah run: the image's USER and ENV run refresher as $ids"

ROOTFS="$(bh mount "$CONTAINER")"
size_bytes="$(du -sb --one-file-system "$ROOTFS" | cut -f1)"
SIZE_MIB=$(( (size_bytes + 1048575) / 1048576 ))
venv_mib=$(( ($(du -sb "$ROOTFS/opt/refresher" | cut -f1) + 1048575) / 1048576 ))
say "image size: ${SIZE_MIB} MiB unpacked (the refresher's venv: ${venv_mib} MiB)"
(( SIZE_MIB <= MAX_SIZE_MIB )) || fail "image is ${SIZE_MIB} MiB, over ${MAX_SIZE_MIB} MiB"

# Mount points for the pod's volumes, created in the container's writable
# layer before the root goes read-only, as a container runtime does.
for dir in /run/adobe-ims /etc/adobe-ims /run/ims-emulator; do mkdir -p "$ROOTFS$dir"; done

started=$(date +%s)
say "running check, once and run in the pod-like sandbox"
unshare --mount --net --pid --fork --kill-child -- \
  bash scripts/image-test-sandbox.sh "$ROOTFS" "$UID_GID" "${IMAGE_ENV[@]}"
say "sandbox passed in $(elapsed "$started")"

bh umount "$CONTAINER" >/dev/null
say "PASS: built in $BUILD_TIME, ${SIZE_MIB} MiB, total $(elapsed "$started_all")"
