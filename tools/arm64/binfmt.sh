#!/bin/bash
# binfmt_misc for arm64 under emulation: mount it and register qemu-aarch64 (flags F: the
# interpreter is opened now, so it works inside a chroot and a container) unless the host has.
# Used by tools/arm64/rootfs.sh and by `make image ARCH=arm64` on a non-arm64 host.
set -euo pipefail
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || {
  command -v qemu-aarch64-static >/dev/null || {
    echo "binfmt.sh: qemu-user-static is missing (make deps-arm64 installs it)" >&2; exit 1; }
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
}
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
  echo "binfmt.sh: binfmt_misc entry qemu-aarch64 is disabled" >&2; exit 1; }
