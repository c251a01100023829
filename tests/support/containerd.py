"""A k3s node's container runtime, for the tests: a real containerd (Debian's, with its CRI
plugin) started in a lab node's network namespace, on a directory laid out as k3s lays out a
node, with the CNI conf and bin dirs where k3s keeps them and a bridge + host-local primary
conflist where k3s writes flannel's. Images come from podman's storage (`make image`,
`make pause-image`): nothing is pulled.

Everything it makes (the node's directory, containerd, the shims and mounts it leaves, the
pod cgroups kubelet would make) is removed by `close()`, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.lab.topology import Node
from tests.support.cri import CriClient, CriError, PodSandbox

IMAGE = os.environ.get("PINION_IMAGE", "localhost/pinion:dev")
PAUSE_IMAGE = os.environ.get("PINION_PAUSE_IMAGE", "localhost/pause:3.9")
K3S_CONF_DIR = "var/lib/rancher/k3s/agent/etc/cni/net.d"
K3S_BIN_DIR = "var/lib/rancher/k3s/data/cni"
PRIMARY_CONFLIST = "10-flannel.conflist"  # the name k3s gives its own (flannel) conflist
HOST_PLUGINS = Path("/usr/lib/cni")  # containernetworking-plugins
KUBEPODS = "kubepods"  # kubelet's cgroupfs layout: kubepods/<qos>/pod<uid>


class ContainerdError(RuntimeError):
    """containerd did not start, or a `ctr` step failed; the message carries its output."""


def _lacks_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << 24)  # CAP_SYS_RESOURCE
    return True


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers and v2), for kubelet's pod dirs."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[1]))
    return mounts


def make_pod_cgroup(uid: str, qos: str) -> str:
    """The pod-level cgroup kubelet makes (cgroupfs driver) before RunPodSandbox: it exists
    when the CNI chain runs, so eBPF capture can attach to it. Returns the cgroup_parent."""
    relative = f"{KUBEPODS}/{qos}/pod{uid}"
    for mount in cgroup_mounts():
        (mount / relative).mkdir(parents=True, exist_ok=True)
    return "/" + relative


def remove_pod_cgroup(uid: str, qos: str) -> None:
    """rmdir the pod's cgroup in every hierarchy (kubelet does, runc does not), and the
    kubepods parents when nothing else is left in them."""
    for mount in cgroup_mounts():
        pod = mount / KUBEPODS / qos / f"pod{uid}"
        for path in [*sorted((p for p in pod.glob("*") if p.is_dir()), reverse=True), pod,
                     pod.parent, pod.parent.parent]:
            for _ in range(40):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if path in (pod.parent, pod.parent.parent):
                        break  # another pod's, or not ours to remove
                    time.sleep(0.05)


class K3sNode:
    """One simulated node's runtime: `root` stands for that node's own /, holding what k3s
    keeps on disk; containerd runs in the lab node's netns (the node's network)."""

    def __init__(self, node: Node, root: Path) -> None:
        self.node = node
        self.root = root
        self.conf_dir = root / K3S_CONF_DIR
        self.bin_dir = root / K3S_BIN_DIR
        self.run_pinion = root / "run/pinion"  # the agent socket's dir (the DaemonSet's hostPath)
        self.state_dir = root / "var/lib/pinion"
        self.logs = root / "var/log/pods"
        self.containerd_root = root / "var/lib/rancher/k3s/agent/containerd"
        self.containerd_state = root / "run/k3s/containerd"
        self.socket = self.containerd_state / "containerd.sock"
        self.log_path = root / "containerd.log"
        self.process: subprocess.Popen[Any] | None = None
        self.pod_uids: list[tuple[str, str]] = []  # (uid, QoS class) of every pod cgroup made
        for directory in (self.conf_dir, self.bin_dir, self.run_pinion, self.state_dir, self.logs,
                          root / "etc/cni/net.d", root / "opt/cni/bin", root / "ipam"):
            directory.mkdir(parents=True, exist_ok=True)
        self.run_pinion.chmod(0o700)
        for plugin in ("bridge", "host-local", "loopback", "portmap"):  # k3s ships these
            shutil.copy2(HOST_PLUGINS / plugin, self.bin_dir / plugin)
        self.write_primary()
        (root / "containerd.toml").write_text(self.config())

    # ------------------------------------------------------------ configuration

    def write_primary(self) -> None:
        """k3s' primary conflist, bridge + host-local in place of flannel."""
        node = self.node
        conflist = {"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(self.root / "ipam"),
                      "ranges": [[{"subnet": node.pod_cidr, "gateway": node.gateway_ip}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}
        (self.conf_dir / PRIMARY_CONFLIST).write_text(json.dumps(conflist, indent=2))

    def config(self) -> str:
        """containerd's config.toml as k3s writes it, for this node's directories."""
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{self.containerd_root}"
state = "{self.containerd_state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.containerd_state}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root}/opt/containerd"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Not k3s' setting: this machine's root lacks CAP_SYS_RESOURCE, so kubelet's oom_score_adj
  # (-998 for a sandbox) cannot be set; keep every container's at or above containerd's own.
  restrict_oom_score_adj = {'true' if _lacks_sys_resource() else 'false'}
[{cri}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{self.conf_dir}"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
"""

    # ------------------------------------------------------------ containerd itself

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it after spawn
        self.process = self.node.spawn(["containerd", "--config", str(self.root / "containerd.toml")],
                                       stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerdError(f"containerd exited: {self.log()[-3000:]}")
            if self.socket.exists():
                with contextlib.suppress(CriError), self.cri(timeout=2) as cri:
                    if cri.version()[0] == "containerd":
                        return
            time.sleep(0.1)
        raise ContainerdError(f"containerd not serving CRI after {timeout}s: {self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop containerd by its PID; its shims, and so the pods, keep running."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @contextlib.contextmanager
    def cri(self, timeout: float = 60.0) -> Iterator[CriClient]:
        client = CriClient(str(self.socket), timeout)
        try:
            yield client
        finally:
            client.close()

    def ctr(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def import_images(self, archives: list[Path]) -> None:
        for archive in archives:
            self.ctr("images", "import", "--no-unpack", str(archive))

    # ------------------------------------------------------------ pods, as kubelet makes them

    def pod(self, name: str, uid: str, namespace: str = "default", host_network: bool = False,
            attempt: int = 0, qos: str = "besteffort") -> PodSandbox:
        """A sandbox config with kubelet's pod cgroup made for it (removed by close())."""
        if (uid, qos) not in self.pod_uids:
            self.pod_uids.append((uid, qos))
        log_directory = self.logs / f"{namespace}_{name}_{uid}"
        log_directory.mkdir(parents=True, exist_ok=True)
        return PodSandbox(name=name, uid=uid, namespace=namespace, attempt=attempt,
                          host_network=host_network, cgroup_parent=make_pod_cgroup(uid, qos),
                          log_directory=str(log_directory))

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every sandbox containerd knows (their containers go with them)."""
        errors = []
        with self.cri() as cri:
            for sandbox in cri.list_pod_sandboxes():
                for step in (cri.stop_pod_sandbox, cri.remove_pod_sandbox):
                    try:
                        step(sandbox)
                    except CriError as error:
                        errors.append(str(error))
        return errors

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Pods, containerd, the shims it left, its mounts, kubelet's cgroups, the directory."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(CriError, OSError):
                self.remove_all_pods()
        self.stop()
        for pid in self._shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in self._mounts_under_root():
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        for uid, qos in self.pod_uids:
            remove_pod_cgroup(uid, qos)
        shutil.rmtree(self.root, ignore_errors=True)

    def _shims(self) -> list[int]:
        """containerd-shim processes serving this node's containerd (their -address says so)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                    pids.append(int(proc.name))
        return pids

    def _mounts_under_root(self) -> list[str]:
        root = str(self.root) + "/"
        targets = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        return sorted((t for t in targets if t.startswith(root)), key=len, reverse=True)
