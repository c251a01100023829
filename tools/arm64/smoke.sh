#!/bin/bash
# `make smoke-arm64`: Debian's arm64 kernel (linux-image-arm64, from the cached rootfs) booted
# under qemu-system-aarch64 (TCG: no KVM for another architecture), the rootfs with the project
# as its virtio disk, tools/arm64/smoke-init.sh as PID 1 running a small set of netns tests:
# capture with nftables, iptables and eBPF, meshed requests across two lab nodes, through the
# mTLS tunnel, metrics counted. The console goes to stdout and to $SMOKE_LOG.
#
#   tools/arm64/smoke.sh [pytest node ids]       default: $DEFAULT_TESTS below
#   tools/arm64/smoke.sh --run 'COMMAND'         a shell command instead of pytest, run in /src
#                                                with the venv first on PATH and cgroup2's cpu and
#                                                memory controllers enabled (`make overload-arm64`)
#
# What the command writes into $PINION_RESULT_DIR (in the VM) is printed on the console between
# markers and copied out to $SMOKE_RESULTS (a directory on the host) when that is set.
# SMOKE_BOOT_LOCK names a file held (flock) for the boot alone: the VM takes both host CPUs, so
# a measuring run shares the host's benchmark lock; preparing the rootfs does not hold it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SMOKE_LOG=${SMOKE_LOG:-$REPO/docs/arm64-smoke.txt}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-5400}  # seconds for the whole boot + tests + power-off
SMOKE_RESULTS=${SMOKE_RESULTS:-}
SMOKE_BOOT_LOCK=${SMOKE_BOOT_LOCK:-}
DEFAULT_TESTS=(
  "tests/netns/test_capture.py::test_meshed_to_meshed_across_nodes_is_counted_on_both_agents"
  "tests/netns/test_mesh_tunnel.py::test_node_to_node_bytes_are_tls_and_the_server_sees_the_client_pods_ip"
  "tests/netns/test_mesh_tunnel.py::test_tunnel_traffic_is_labelled_tls_with_the_peers_identities"
  # The socket keeper, Python and the compiled C one (keeper/keeper.c, built with the rootfs's
  # gcc): listeners passed over SCM_RIGHTS and back, a successor keeper taking them over, a
  # restarted keeper re-adopting them, and SIOCGSKNS, which qemu-user cannot emulate.
  "tests/unit/test_keeper.py"
)
[ "$(id -u)" = 0 ] || { echo "smoke-arm64 needs root (chroot, the rootfs cache)" >&2; exit 1; }
command -v qemu-system-aarch64 >/dev/null || {
  echo "smoke-arm64: qemu-system-aarch64 is missing (make deps-arm64 installs it)" >&2; exit 1; }

ROOTFS=$("$HERE/rootfs.sh")
exec 9>"$ROOTFS.lock"  # held while the rootfs is prepared and copied: a test-arm64 run waits
flock -w 3600 9 || { echo "smoke-arm64: $ROOTFS is busy (another run holds $ROOTFS.lock)" >&2; exit 1; }
PINION_ARM64_LOCKED=1 PINION_ARM64_PREPARE_ONLY=1 "$HERE/test.sh"  # source, venv, keeper, capture.o
if [ "${1:-}" = --run ]; then
  [ $# = 2 ] && [ -n "$2" ] || { echo "smoke-arm64: --run takes one command (quote it)" >&2; exit 2; }
  printf '%s\n' "$2" > "$ROOTFS/src/.smoke-command"
  run_label="--run '$2'"
else
  run_label="(pytest)"
  [ $# -gt 0 ] && tests=("$@") || tests=("${DEFAULT_TESTS[@]}")
  echo "${tests[*]}" > "$ROOTFS/src/.smoke-tests"
fi

kernel=$(ls "$ROOTFS"/boot/vmlinuz-*-arm64 | sort -V | tail -1)
initrd=$ROOTFS/boot/initrd.img-${kernel##*/vmlinuz-}
[ -e "$initrd" ] || { echo "smoke-arm64: no initramfs for $kernel" >&2; exit 1; }

work=$(mktemp -d /var/tmp/pinion-arm64-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The rootfs as an ext4 image (mkfs.ext4 -d: no loop device, no mount), room to spare.
size_mib=$(( $(du -sm "$ROOTFS" | cut -f1) + 1536 ))
start=$SECONDS
mkfs.ext4 -q -F -L pinion-arm64 -d "$ROOTFS" "$work/disk.img" "${size_mib}M"
echo "smoke-arm64: ${size_mib} MiB disk image made in $((SECONDS - start)) s" >&2
exec 9>&-  # the VM runs on its own copy

# cortex-a72: a Raspberry Pi 4's core (and cheaper to emulate than -cpu max's pointer auth).
if [ -n "$SMOKE_BOOT_LOCK" ]; then  # held on fd 8 until the VM is gone
  start=$SECONDS
  exec 8>>"$SMOKE_BOOT_LOCK"
  flock 8
  echo "smoke-arm64: $SMOKE_BOOT_LOCK held after $((SECONDS - start)) s waiting" >&2
fi
start=$SECONDS
status=0
timeout "$SMOKE_TIMEOUT" qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 3072 \
  -nographic -no-reboot -nic none \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyAMA0 root=/dev/vda rw rootwait init=/src/tools/arm64/smoke-init.sh panic=-1 loglevel=4" \
  -drive if=virtio,format=raw,file="$work/disk.img" \
  < /dev/null 2>&1 | stdbuf -oL tr -d '\r' > "$work/console.txt" || status=$?  # line by line: tail -f it
elapsed=$((SECONDS - start))
[ -z "$SMOKE_BOOT_LOCK" ] || exec 8>&-

{
  echo "# tools/arm64/smoke.sh ${run_label}, $(date -u +%Y-%m-%dT%H:%MZ): host $(uname -m), $(nproc) CPUs," \
       "qemu-system-aarch64 $(qemu-system-aarch64 --version | head -1 | awk '{print $4}') (TCG)," \
       "-cpu cortex-a72 -smp 2 -m 3072; wall clock ${elapsed} s"
  echo "# kernel ${kernel##*/}; the console follows"
  cat "$work/console.txt"
} > "$SMOKE_LOG"
cat "$SMOKE_LOG"
result=$(grep -o 'pinion-smoke: exit [0-9]*' "$work/console.txt" | tail -1 | awk '{print $3}')
if [ "$status" = 124 ]; then
  echo "smoke-arm64: timed out after $SMOKE_TIMEOUT s" >&2; exit 1
elif [ -z "$result" ]; then
  echo "smoke-arm64: the VM stopped without a result (qemu exit $status)" >&2; exit 1
fi
if [ -n "$SMOKE_RESULTS" ]; then  # the result files, from between their markers
  mkdir -p "$SMOKE_RESULTS"
  awk -v dir="$SMOKE_RESULTS" -f "$HERE/console-files.awk" "$work/console.txt"
  echo "smoke-arm64: result files in $SMOKE_RESULTS:" $(ls "$SMOKE_RESULTS") >&2
fi
echo "smoke-arm64: exit $result, ${elapsed} s in the VM; console in $SMOKE_LOG" >&2
exit "$result"
