#!/bin/bash
# `make image-arm64-check`: the arm64 image (`make image ARCH=arm64`, built here under
# qemu-user) is what a Pi would pull. Asserted, each a line of output:
#   - it is linux/arm64, labelled with this checkout's sources digest, and the host's own tag
#     (localhost/pinion:dev) is still the host's architecture: the two builds did not clobber;
#   - `pinion --help` and `pinion identity init` run in it (podman run --arch arm64, emulated),
#     the keys it wrote load with the image's own cryptography, the C keeper starts and binds;
#   - every compiled part in it is aarch64 (`file` on the host, from a copy of /opt/pinion):
#     pinion-keeper, agent.core._http1fast and every other .so in the venv, the interpreter;
#     bpf/capture.o is eBPF.
# Nothing is published: the containers are --network none and removed; the copy is a temp dir.
#
#   tools/arm64/image-check.sh            IMAGE=localhost/pinion:dev-arm64 by default
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
IMAGE=${IMAGE:-localhost/pinion:dev-arm64}
HOST_IMAGE=${HOST_IMAGE:-localhost/pinion:dev}
[ "$(id -u)" = 0 ] || { echo "image-arm64-check needs root (podman's root storage, where make image builds)" >&2; exit 1; }

fail() { echo "image-arm64-check: FAIL: $*" >&2; exit 1; }
ok() { echo "image-arm64-check: ok: $*"; }
# Everything that runs arm64 code is emulated: niced so the host's other work keeps its CPU.
# podman's default rlimits (nofile 1048576) are above what a root without CAP_SYS_RESOURCE (a
# CI container) may set: runc fails with EPERM. These are ample for what runs here.
run() {
  nice -n 15 ionice -c3 podman run --rm --arch arm64 --network none \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "$@"
}

platform=$(podman image inspect --format '{{.Os}}/{{.Architecture}}' "$IMAGE" 2>/dev/null) \
  || fail "no image $IMAGE (sudo make image ARCH=arm64)"
[ "$platform" = linux/arm64 ] || fail "$IMAGE is $platform, not linux/arm64"
label=$(podman image inspect --format '{{index .Labels "io.pinion.sources"}}' "$IMAGE")
[ "$label" = "$(python3 "$REPO/deploy/image/sources-digest")" ] \
  || fail "$IMAGE was built from other sources than this checkout's (sudo make image ARCH=arm64)"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
ok "$IMAGE is $platform, built from this checkout, $size bytes"
if podman image exists "$HOST_IMAGE"; then
  host_platform=$(podman image inspect --format '{{.Os}}/{{.Architecture}}' "$HOST_IMAGE")
  [ "$host_platform" = "linux/$(dpkg --print-architecture)" ] \
    || fail "$HOST_IMAGE is $host_platform: an arm64 build took the host's tag"
  ok "$HOST_IMAGE is still $host_platform"
fi

machine=$(run "$IMAGE" uname -m)
[ "$machine" = aarch64 ] || fail "uname -m in $IMAGE says $machine"
help=$(run "$IMAGE" pinion --help)
grep -q '^usage: pinion' <<<"$help" || fail "pinion --help: $help"
ok "pinion --help on $machine: $(head -1 <<<"$help")"

identity=$(run --tmpfs /identity:rw,size=1m,mode=0700 "$IMAGE" /bin/sh -ec '
  pinion identity init --dir /identity >/dev/null
  ls /identity | tr "\n" " "; echo
  python -c "from pathlib import Path
from agent.identity.crypto import cert_info, key_matches, load_private_key, signed_by
d = Path(\"/identity\")
anchor, issuer = (d / \"trust-anchor.crt\").read_bytes(), (d / \"issuer.crt\").read_bytes()
assert signed_by(issuer, anchor) and key_matches(issuer, load_private_key((d / \"issuer.key\").read_bytes()))
for name, pem in ((\"trust-anchor.crt\", anchor), (\"issuer.crt\", issuer)):
    info = cert_info(pem)
    print(f\"{name}: {info.subject}, issuer {info.issuer}, CA {info.is_ca}\")
print(\"issuer.crt is signed by the anchor and matches issuer.key (libcrypto through ctypes)\")"')
for file in trust-anchor.key issuer.key trust-anchor.crt issuer.crt trust-bundle.crt trust-domain; do
  grep -qw "$file" <<<"$(head -1 <<<"$identity")" || fail "pinion identity init wrote no $file: $identity"
done
ok "pinion identity init into a tmpfs: $(head -1 <<<"$identity")"
tail -n +2 <<<"$identity" | sed 's/^/    /'

fast=$(run "$IMAGE" python -c 'import agent.core._http1fast as m, platform; print(m.__file__, platform.machine())')
ok "agent.core._http1fast imports on arm64: $fast"
keeper=$(run "$IMAGE" /bin/sh -c 'timeout -s TERM 3 pinion-keeper --socket /tmp/keeper.sock 2>&1; true')
grep -q 'keeper on /tmp/keeper.sock' <<<"$keeper" || fail "pinion-keeper did not start: $keeper"
ok "pinion-keeper starts and binds: $(head -1 <<<"$keeper")"

# The compiled parts, read on the host from a copy of the image's /opt/pinion and interpreter.
work=$(mktemp -d /tmp/pinion-image-check.XXXXXX)
container=$(podman create --arch arm64 "$IMAGE")
trap 'podman rm -f "$container" >/dev/null; rm -rf "$work"' EXIT
podman cp "$container:/opt/pinion" "$work/opt-pinion"
podman cp "$container:/usr/bin/python3.11" "$work/python3.11"
elves=("$work/opt-pinion/bin/pinion-keeper" "$work/python3.11")
mapfile -t -O 2 elves < <(find "$work/opt-pinion/venv" -name '*.so' | sort)
printf '%s\n' "${elves[@]}" | grep -q '/_http1fast[^/]*\.so$' || fail "no _http1fast .so in the venv"
for elf in "${elves[@]}"; do
  description=$(file -b "$elf")
  [[ $description == *"ARM aarch64"* ]] || fail "${elf#"$work"/} is not aarch64: $description"
done
ok "${#elves[@]} compiled files are aarch64 (file(1)), among them:"
for elf in "${elves[0]}" "$(printf '%s\n' "${elves[@]}" | grep '/_http1fast')"; do
  echo "    ${elf#"$work"/}: $(file -b "$elf" | cut -d, -f1-2), $(readelf -h "$elf" | awk -F': *' '/Machine:/ {print $2}')"
done
bpf=$(file -b "$work/opt-pinion/bpf/capture.o")
[[ $bpf == *"eBPF"* ]] || fail "bpf/capture.o is not eBPF: $bpf"
ok "bpf/capture.o: $(cut -d, -f1-2 <<<"$bpf")"
