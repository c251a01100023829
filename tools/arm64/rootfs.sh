#!/bin/bash
# An arm64 Debian bookworm root filesystem, cached: what `make test-arm64` and `make smoke-arm64`
# run in. Built once with mmdebstrap from the Debian archive this machine's apt uses; maintainer
# scripts run under qemu-user (binfmt_misc: tools/arm64/binfmt.sh registers it if the host has not).
#
#   tools/arm64/rootfs.sh            prints the rootfs directory, building it when missing/stale
#
# Built once; a package added to the list below is installed into the cached rootfs on the
# next run (apt-get in the chroot), so the list can grow without a rebuild.
set -euo pipefail

CACHE=${PINION_ARM64_CACHE:-/var/cache/pinion/arm64}
HERE=$(cd "$(dirname "$0")" && pwd)

# What the image's builder and runtime stages hold (deploy/Dockerfile), what the unit suite
# needs besides (make, openssl, curl, tcpdump, the CNI plugins, kubectl, the fuzzer's runtime),
# for the kernel smoke, Debian's arm64 kernel with an initramfs that can mount a virtio disk
# (mount: not Essential, so not in mmdebstrap's apt variant), and for bench/overload.py in that
# VM (tools/arm64/smoke.sh --run) its pods' server and its two load tools: nginx, ab, h2load.
PACKAGES=(
  python3 python3-venv python3-dev gcc libc6-dev libssl-dev make dpkg-dev
  clang llvm libbpf-dev libbpf1 linux-libc-dev
  iptables nftables libnftables1 iproute2 procps openssl ca-certificates curl
  containernetworking-plugins kmod tcpdump mount kubernetes-client libclang-rt-dev
  linux-image-arm64 initramfs-tools
  nginx apache2-utils nghttp2-client
)

mirror() {  # the first Debian archive URI apt on this machine uses
  local uri
  uri=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -o 'http[^ ]*/debian' | head -1)
  echo "${uri:-http://deb.debian.org/debian}"
}

missing_packages() {  # those of PACKAGES the rootfs lacks
  local root=$1 package
  for package in "${PACKAGES[@]}"; do
    chroot "$root" dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' \
      || echo "$package"
  done
}

add_packages() {  # apt-get install in the chroot, in a private mount namespace
  local root=$1; shift
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  sed -i 's/ main bookworm main$/ main/' "$root/etc/apt/sources.list"  # an early build's typo
  # No service starts from a maintainer script: nginx's postinst would run its init script in
  # the chroot, i.e. in the host's network namespace, listening on the host's port 80.
  unshare --mount --propagation private -- /bin/sh -ec '
    root=$1; shift
    printf "#!/bin/sh\nexit 101\n" > "$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
    trap "rm -f \"$root/usr/sbin/policy-rc.d\"" EXIT
    mount -t proc proc "$root/proc"; mount --rbind /dev "$root/dev"
    chroot "$root" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends "$@"
    chroot "$root" apt-get clean' add "$root" "$@" >&2
}

main() {
  "$HERE/binfmt.sh"
  local rootfs="$CACHE/rootfs-bookworm"
  if [ ! -e "$rootfs/.complete" ]; then
    mkdir -p "$CACHE"
    rm -rf "$rootfs" "$rootfs.partial"
    echo "rootfs.sh: building $rootfs (once; ~15 min under emulation)" >&2
    local pkgs
    pkgs=$(IFS=,; echo "${PACKAGES[*]}")
    mmdebstrap --arch=arm64 --variant=apt --include="$pkgs" \
      --aptopt='APT::Install-Recommends "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      bookworm "$rootfs.partial" "deb $(mirror) bookworm main" \
      "deb $(mirror) bookworm-updates main" "deb $(mirror)-security bookworm-security main" >&2
    mv "$rootfs.partial" "$rootfs"
    touch "$rootfs/.complete"
  fi
  local missing
  missing=$(missing_packages "$rootfs")
  if [ -n "$missing" ]; then
    echo "rootfs.sh: adding to $rootfs:" $missing >&2
    # shellcheck disable=SC2086  # one word a package
    add_packages "$rootfs" $missing
  fi
  echo "$rootfs"
}

main "$@"
