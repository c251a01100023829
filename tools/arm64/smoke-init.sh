#!/bin/bash
# PID 1 of the arm64 kernel smoke (tools/arm64/smoke.sh boots Debian's arm64 kernel with
# init=this): mount what a node has (proc, sys, cgroup2, bpffs), run the netns tests named in
# /src/.smoke-tests with CI=true (a missing capability fails), print the result, power off.
# With /src/.smoke-command instead (smoke.sh --run), run that shell command, with cgroup2's cpu
# and memory controllers enabled for child groups as on a k3s node, and print the files it left
# in $PINION_RESULT_DIR between markers for smoke.sh to copy out.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
       LANG=C.UTF-8 CI=true PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc 2>/dev/null  # the initramfs moved /proc, /sys, /dev here already
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run && mount -t tmpfs -o size=1g tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
hostname pinion-arm64
ip link set lo up

echo "pinion-smoke: kernel $(uname -r) $(uname -m); $(nproc) CPUs;" \
     "$(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo); booted in $(cut -d' ' -f1 /proc/uptime) s"
venv=$(ls -d /opt/pinion/venv-* | head -1)
cd /src || exit 1
"$venv/bin/python" -c 'import platform, ssl; print("pinion-smoke:", platform.machine(), "Python",
  platform.python_version(), ssl.OPENSSL_VERSION)'
# Every instruction is emulated (TCG): what takes milliseconds natively takes seconds here.
# The lab gives an agent 20 s to be ready; the first runs here saw some miss it (empty logs:
# still importing) while the same tests passed in the next run. 90 s, and the import time shown.
export PINION_LAB_READY_TIMEOUT=90
import_start=$(cut -d' ' -f1 /proc/uptime)
"$venv/bin/python" -c 'import agent.app'
echo "pinion-smoke: python -c 'import agent.app' took" \
     "$(awk -v a="$import_start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN {printf "%.1f", b - a}') s"

run_command() {  # smoke.sh --run: the command, then the files it wrote, between markers
  # A node's systemd (or k3s) gives child cgroups these; the root group's processes (this
  # script) stay where they are: the no-internal-processes rule spares the root.
  echo "+cpu +memory" > /sys/fs/cgroup/cgroup.subtree_control
  echo "pinion-smoke: cgroup2 controllers $(cat /sys/fs/cgroup/cgroup.controllers);" \
       "enabled for children: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
  dmesg -n 1  # the kernel's own lines (an OOM kill's among them) stay off the command's output
  local levels=emerg,alert,crit,err,warn kernel_lines
  kernel_lines=$(dmesg --level=$levels | wc -l)
  export PINION_RESULT_DIR=/tmp/pinion-result PATH="$venv/bin:$PATH"
  mkdir -p "$PINION_RESULT_DIR"
  echo "pinion-smoke: running: $(cat /src/.smoke-command)"
  timeout 5400 bash -c "$(cat /src/.smoke-command)" 2>&1
  status=$?
  echo "pinion-smoke: the kernel's warnings and errors during the command (dmesg, the last 40):"
  dmesg --level=$levels | tail -n +$((kernel_lines + 1)) | tail -40
  for file in "$PINION_RESULT_DIR"/*; do
    [ -f "$file" ] || continue
    echo "pinion-smoke: file ${file##*/} follows"
    cat "$file"; [ -z "$(tail -c1 "$file")" ] || echo  # the marker on a line of its own
    echo "pinion-smoke: end of file ${file##*/}"
  done
  return "$status"
}

start=$(cut -d' ' -f1 /proc/uptime)
if [ -s /src/.smoke-command ]; then
  run_command
  status=$?
  what="the command"
else
  read -r -a tests < /src/.smoke-tests
  timeout 5400 "$venv/bin/python" -m pytest -v --color=no -p no:cacheprovider -o timeout=1200 "${tests[@]}" 2>&1
  status=$?
  what=pytest
fi
end=$(cut -d' ' -f1 /proc/uptime)
echo "pinion-smoke: $what took $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%d", b - a}') s"
echo "pinion-smoke: exit $status"
sync
echo o > /proc/sysrq-trigger  # power off: qemu exits
sleep 60
