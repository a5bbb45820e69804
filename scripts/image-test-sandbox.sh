#!/usr/bin/env bash
# The pod-like half of scripts/image-test.sh; it runs as root inside fresh
# mount, network and PID namespaces (unshare), and is not meant to be run by
# hand. Arguments: the image's root filesystem, the pod's UID/GID, then the
# image's ENV entries.
#
# What a restricted pod gets, and nothing more: the image read-only, loopback
# only, /proc of its own PID namespace, a minimal /dev, memory-backed volumes,
# and processes running as UID/GID 65532 with supplementary group 65532 (the
# fsGroup), no capabilities at all and no_new_privs.
set -euo pipefail
image_root="$1"
uid="$2"
shift 2
image_env=("$@")

fail() { echo "image-test: FAIL: $*" >&2; exit 1; }
ok() { echo "image-test:   ok: $*"; }

ip link set lo up
[[ "$(ip -o link show | wc -l)" == 1 ]] || fail "the sandbox has interfaces besides loopback"
mount --make-rprivate /

root="$(mktemp -d)"
mount --bind "$image_root" "$root"
mount -o remount,bind,ro,nosuid,nodev "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o nosuid,noexec,mode=0755,size=64k tmpfs "$root/dev"
for device in null zero random urandom; do
  touch "$root/dev/$device"
  mount --bind "/dev/$device" "$root/dev/$device"
done
# emptyDir {medium: Memory} volumes, group-owned by the fsGroup with setgid.
for volume in /run/adobe-ims /run/ims-emulator; do
  mount -t tmpfs -o "nosuid,nodev,noexec,size=8m,mode=2770,gid=$uid" tmpfs "$root$volume"
done
mount -t tmpfs -o "nosuid,nodev,noexec,size=1m,mode=0755" tmpfs "$root/etc/adobe-ims"

# Every process of the "pod": through setpriv, with the image's environment
# only (plus HOME from its passwd entry, as the kubelet sets it).
# An array, not a function: `"${as_pod[@]}" cmd &` makes $! the command
# itself (chroot, setpriv and env each exec the next), so a signal reaches it.
as_pod=(
  chroot "$root" /usr/bin/setpriv --reuid="$uid" --regid="$uid" --groups="$uid"
  --inh-caps=-all --bounding-set=-all --no-new-privs --
  /usr/bin/env -i "${image_env[@]}" HOME=/nonexistent
)

# --- the sandbox is what it claims -----------------------------------------------
if touch "$root/usr/probe" 2>/dev/null; then fail "the root filesystem is writable"; fi
"${as_pod[@]}" python -c '
import errno, os
try:
    os.mkdir("/opt/refresher/probe")
except OSError as error:
    assert error.errno in (errno.EROFS, errno.EACCES), error
else:
    raise SystemExit("the root filesystem is writable")
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
    assert int(status[key], 16) == 0, (key, status[key])
assert status["NoNewPrivs"].strip() == "1", status["NoNewPrivs"]
assert (os.getuid(), os.getgid(), os.getgroups()) == (65532, 65532, [65532]), os.getgroups()
import socket
try:
    socket.create_connection(("192.0.2.1", 443), timeout=2)
except OSError:
    pass
else:
    raise SystemExit("the sandbox reaches a network beyond loopback")
' || fail "the sandbox is not a restricted pod"
ok "read-only root, uid/gid $uid, no capabilities, no_new_privs, loopback only"

# --- the Secret sink's client: whole, though the Dockerfile deletes kubernetes.aio -----------
"${as_pod[@]}" python -c '
import importlib, importlib.util
# Every module the Secret sink loads (refresher/sinks/secret.py), and the package itself.
for name in ("kubernetes", "kubernetes.client", "kubernetes.client.configuration",
             "kubernetes.client.rest", "kubernetes.client.exceptions",
             "kubernetes.config.config_exception", "kubernetes.config.incluster_config",
             "kubernetes.config.kube_config", "kubernetes.watch", "kubernetes.stream"):
    importlib.import_module(name)
assert importlib.util.find_spec("kubernetes.aio") is None, "kubernetes.aio is in the image"
' || fail "the kubernetes client does not import in the image"
ok "the Secret sink's kubernetes client imports; kubernetes.aio is not shipped"

# --- the emulator, from the same image ---------------------------------------------
"${as_pod[@]}" refresher emulator --port 0 --port-file /run/ims-emulator/port \
  --write-credentials /run/ims-emulator/credentials --token-ttl 120 \
  >"$root/run/ims-emulator/log" 2>&1 &
for _ in $(seq 100); do [[ -s "$root/run/ims-emulator/port" ]] && break; sleep 0.2; done
[[ -s "$root/run/ims-emulator/port" ]] || fail "the emulator did not start: $(tail -n 5 "$root/run/ims-emulator/log")"
endpoint="http://127.0.0.1:$(cat "$root/run/ims-emulator/port")"

# The credentials as a Secret volume presents them: root-owned, 0440, group
# 65532 (fsGroup), on a read-only mount.
credentials=/etc/adobe-ims/aem-service-credentials.json
cp "$root/run/ims-emulator/credentials/aem-service-credentials.json" "$root$credentials"
chown "0:$uid" "$root$credentials"
chmod 0440 "$root$credentials"
mount -o remount,ro,bind "$root/etc/adobe-ims"
common=(--credentials "$credentials" --ims-endpoint "$endpoint" --allow-insecure-http)

# --- check, once, run ---------------------------------------------------------------------
"${as_pod[@]}" refresher check "${common[@]}" >/dev/null || fail "refresher check exited $?"
ok "check: the credentials are valid"

"${as_pod[@]}" refresher once "${common[@]}" --token-dir /run/adobe-ims --log-format text \
  || fail "refresher once exited $?"
for name in access_token expires_at token.json; do
  read -r mode owner group < <(stat -L -c '%a %u %g' "$root/run/adobe-ims/$name")
  [[ "$mode $owner $group" == "440 $uid $uid" ]] \
    || fail "$name is mode $mode owner $owner:$group, not 440 $uid:$uid"
done
[[ -s "$root/run/adobe-ims/access_token" ]] || fail "once published an empty token"
ok "once: token files published, 0440, owned by $uid:$uid"

"${as_pod[@]}" refresher run "${common[@]}" --token-dir /run/adobe-ims --listen 127.0.0.1:9876 \
  --log-format text >"$root/run/ims-emulator/run.log" 2>&1 &
run_pid=$!
"${as_pod[@]}" python -c '
import time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:9876/readyz", timeout=2) as response:
            assert response.status == 200
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
metrics = urllib.request.urlopen("http://127.0.0.1:9876/metrics", timeout=2).read().decode()
assert "refresher_token_expiry_timestamp_seconds" in metrics
' || fail "run: /readyz never answered 200: $(tail -n 5 "$root/run/ims-emulator/run.log")"
ok "run: /readyz answers 200 and /metrics reports the token's expiry"
kill -TERM "$run_pid"
status=0
wait "$run_pid" || status=$?
[[ "$status" == 0 ]] || fail "refresher run exited $status after SIGTERM"
ok "run: exits 0 on SIGTERM"
