#!/bin/bash
# `make test-arm64`: the unit suite on arm64, under qemu-user. The project is copied into the
# cached arm64 rootfs (tools/arm64/rootfs.sh), installed into a venv there as the image does
# (`pip install '.[fast]'`: python-iptables builds with the rootfs's gcc), the keeper and the
# eBPF object are built with the rootfs's compilers, and pytest runs in a chroot.
#
#   tools/arm64/test.sh [pytest args]     default: -q -p no:cacheprovider tests/unit
#   PINION_ARM64_PREPARE_ONLY=1 tools/arm64/test.sh    everything but pytest (for smoke.sh)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "test-arm64 needs root (chroot, mounts)" >&2; exit 1; }

ROOTFS=$("$HERE/rootfs.sh")
if [ -z "${PINION_ARM64_LOCKED:-}" ]; then  # smoke.sh holds it already
  exec 9>"$ROOTFS.lock"
  flock -w 3600 9 || { echo "test-arm64: $ROOTFS is busy (another run holds $ROOTFS.lock)" >&2; exit 1; }
fi

# The checkout as a clean clone would have it: tracked files plus new ones not ignored.
rm -rf "$ROOTFS/src" && mkdir -p "$ROOTFS/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
   | tar --null -T - -cf -) | tar -xf - -C "$ROOTFS/src"
rm -f "$ROOTFS/src/keeper/pinion-keeper" "$ROOTFS/src/cni/pinion-cni" "$ROOTFS"/src/bpf/*.o  # built below
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"  # pip reaches PyPI from the chroot
# ...trusting what the host trusts (a TLS-inspecting proxy's CA, where there is one)
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/pinion-host-ca.crt"

# Inside the chroot, in a private mount namespace: every mount goes with it.
inside() {
  unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o size=2g tmpfs "$root/tmp"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
      LANG=C.UTF-8 CI="${CI:-}" PIP_DISABLE_PIP_VERSION_CHECK=1 \
      PIP_CERT=/etc/ssl/pinion-host-ca.crt "$@"' inside "$ROOTFS" "$@"
}

# The venv: created once per pyproject.toml (dependencies); the project reinstalled each run.
key=$(sha256sum "$REPO/pyproject.toml" | cut -c1-12)
venv=/opt/pinion/venv-$key
if [ ! -e "$ROOTFS$venv/.installed" ]; then
  rm -rf "$ROOTFS/opt/pinion"/venv-*
  start=$SECONDS
  inside /bin/sh -ec "cd /src && python3 -m venv $venv && $venv/bin/pip install -q --upgrade pip \
    && $venv/bin/pip install -q '.[fast]' && $venv/bin/pip install -q '.[dev]' && touch $venv/.installed"
  echo "test-arm64: venv with .[fast] and .[dev] installed in $((SECONDS - start)) s" >&2
else
  inside /bin/sh -ec "cd /src && $venv/bin/pip install -q --no-deps --force-reinstall ."
fi

start=$SECONDS
inside /bin/sh -ec "cd /src && uname -m && $venv/bin/python -c 'import platform; print(platform.machine(), platform.python_version())' \
  && make -s keeper cni bpf PY=$venv/bin/python"
echo "test-arm64: keeper, pinion-cni and bpf/capture.o built in $((SECONDS - start)) s" >&2

[ -z "${PINION_ARM64_PREPARE_ONLY:-}" ] || exit 0  # smoke.sh: the rootfs is ready to boot

start=$SECONDS
status=0
inside /bin/sh -ec "cd /src && $venv/bin/python -m pytest ${*:--q -p no:cacheprovider tests/unit}" || status=$?
echo "test-arm64: pytest on arm64 (qemu-user) took $((SECONDS - start)) s, exit $status" >&2
exit $status
