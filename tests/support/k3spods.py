"""Pods on a simulated k3s node, made through CRI as kubelet makes them: the DaemonSet's
agent pod (the `cni-installer` and `agent` containers from the image), and workload pods
whose network the CNI chain sets up, with containers from the same image for servers.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.lab.agents import ADMIN_PORT, Metrics, admin_get
from tests.support import daemonset
from tests.support.containerd import IMAGE, K3sNode, cgroup_mounts
from tests.support.cri import CONTAINER_RUNNING, Container, CriError, Mount

IDENTITY_MOUNT = "/var/lib/pinion-identity"


def cri_log_text(path: Path) -> str:
    """The text of a CRI log file ("<time> <stream> <F|P> <text>" lines)."""
    if not path.exists():
        return ""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        lines.append(parts[3] if len(parts) == 4 else line)
    return "\n".join(lines)


@dataclass(frozen=True)
class KubeAccess:
    """What kubelet gives the agent pod in a cluster: the API server's address (the env it
    injects), the service-account token and CA (automounted), the issuer's projected token,
    the trust bundle ConfigMap; and where the issuer answers (its Service name does not
    resolve here)."""

    host: str
    port: int
    ca_pem: bytes
    token: str
    issuer_token: str
    trust_bundle: bytes
    issuer_url: str


class AgentPod:
    """The DaemonSet's pod on one node: `cni-installer` then `agent`, both from the image.
    Standalone (`identity_dir`: certificates from a shared anchor) or in a cluster (`kube`)."""

    def __init__(self, node: K3sNode, redirect: str, bpf_dir: str, *,
                 identity_dir: Path | None = None, kube: KubeAccess | None = None) -> None:
        self.node = node
        self.uid = str(uuid.uuid4())
        # Burstable, as the DaemonSet's requests below its limits make it: kubepods/burstable/
        self.sandbox = node.pod(f"pinion-agent-{node.node.name}", self.uid, "pinion-system",
                                host_network=True, qos="burstable")
        self.sandbox_id = ""
        self.admin = (node.node.underlay_ip, ADMIN_PORT)
        self.containers: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        socket_in_host = str(node.run_pinion / "cni.sock")
        agent_args = [f"--bpf-dir={bpf_dir}"]  # a node has its own bpffs; here they share one
        agent_mounts: list[Mount] = []
        installer_mounts = [Mount(f"/host{node.run_pinion}", str(node.run_pinion), readonly=True)]
        env: dict[str, str] = {}
        api_volumes: dict[str, Path] = {}
        if identity_dir is not None:  # standalone: pod certificates from a shared anchor
            agent_args.append(f"--identity-dir={IDENTITY_MOUNT}")
            agent_mounts.append(Mount(IDENTITY_MOUNT, str(identity_dir), readonly=True))
        if kube is not None:
            env, api_volumes, account = self._kube_volumes(kube)
            agent_args.append(f"--issuer-url={kube.issuer_url}")
            agent_mounts.append(account)
            installer_mounts.append(account)
        self.overrides = daemonset.Overrides(
            node_root=node.root, node_name=node.node.name, host_ip=node.node.underlay_ip,
            pod_uid=self.uid, config={"redirect": redirect},
            log_directory=Path(self.sandbox.log_directory), env=env, api_volumes=api_volumes,
            # two nodes share this host's /run: the plugin must find this node's agent
            extra_args={"agent": agent_args, "cni-installer": [f"--agent-socket={socket_in_host}"]},
            extra_mounts={"agent": agent_mounts, "cni-installer": installer_mounts})
        for path in daemonset.host_paths(self.overrides):
            path.mkdir(parents=True, exist_ok=True)  # kubelet: DirectoryOrCreate

    def _kube_volumes(self, kube: KubeAccess) -> tuple[dict[str, str], dict[str, Path], Mount]:
        """kubelet's volumes for this pod, under the node's var/lib/kubelet/pods/<uid>."""
        volumes = self.node.root / "var/lib/kubelet/pods" / self.uid / "volumes"
        files = {"kube-api-access": {"token": kube.token.encode(), "ca.crt": kube.ca_pem,
                                     "namespace": b"pinion-system"},
                 "issuer-token": {"token": kube.issuer_token.encode()},
                 "trust-bundle": {"trust-bundle.crt": kube.trust_bundle}}
        for volume, contents in files.items():
            (volumes / volume).mkdir(parents=True, exist_ok=True)
            for name, data in contents.items():
                (volumes / volume / name).write_bytes(data)
        env = {"KUBERNETES_SERVICE_HOST": kube.host, "KUBERNETES_SERVICE_PORT": str(kube.port)}
        account = Mount("/var/run/secrets/kubernetes.io/serviceaccount",
                        str(volumes / "kube-api-access"), readonly=True)
        return env, {"issuer-token": volumes / "issuer-token",
                     "trust-bundle": volumes / "trust-bundle"}, account

    def boot(self) -> None:
        """As kubelet starts the DaemonSet's pod: the sandbox, the installer until it has
        written the chain, then the agent (its readiness is `wait_ready`)."""
        self.run_sandbox()
        self.start("cni-installer")
        self.wait_installed()
        self.start("agent")

    def run_sandbox(self) -> None:
        with self.node.cri() as cri:
            self.sandbox_id = cri.run_pod_sandbox(self.sandbox)

    def start(self, name: str) -> str:
        """CreateContainer + StartContainer for the DaemonSet's container `name` (as kubelet
        does after a crash too: a new container, attempt + 1)."""
        attempt = self.attempts.get(name, -1) + 1
        self.attempts[name] = attempt
        spec = dataclasses.replace(daemonset.container(name, IMAGE, self.overrides), attempt=attempt,
                                   log_path=f"{name}/{attempt}.log")
        with self.node.cri() as cri:
            container_id = cri.create_container(self.sandbox_id, spec, self.sandbox)
            cri.start_container(container_id)
        self.containers[name] = container_id
        return container_id

    def stop(self, name: str, grace: int = 10) -> None:
        """As kubelet stops a container: SIGTERM, `grace` seconds, then SIGKILL; removed."""
        with self.node.cri() as cri:
            cri.stop_container(self.containers[name], timeout=grace)
            cri.remove_container(self.containers.pop(name))

    def kill(self, name: str) -> None:
        """The container's processes SIGKILLed (a crash, or an OOM kill), then removed."""
        with self.node.cri() as cri:
            cri.stop_container(self.containers[name], timeout=0)
            cri.remove_container(self.containers.pop(name))

    def running(self, name: str) -> bool:
        with self.node.cri() as cri:
            return cri.container_status(self.containers[name]).integer(3) == CONTAINER_RUNNING

    def pid(self, name: str) -> int:
        with self.node.cri() as cri:
            return cri.container_pid(self.containers[name])

    def rss_kib(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid(name)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cgroup(self) -> Path:
        """The agent pod's cgroup in the v2 hierarchy (its getsockopt program hangs there)."""
        return unified_cgroup_mount() / self.sandbox.cgroup_parent.lstrip("/")

    def log(self, name: str) -> str:
        return cri_log_text(Path(self.sandbox.log_directory) / name / f"{self.attempts.get(name, 0)}.log")

    def wait_log(self, name: str, text: str, timeout: float = 30.0) -> None:
        """Until the current container `name` has logged `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} never logged {text!r}: {self.log(name)[-2000:]}")

    def wait_installed(self, timeout: float = 30.0) -> Path:
        """The installer's conflist in k3s' conf dir (the primary + pinion-cni)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in sorted(self.node.conf_dir.glob("*.conflist")):
                if "pinion-cni" in path.read_text():
                    return path
            time.sleep(0.1)
        raise TimeoutError(f"no pinion conflist in {self.node.conf_dir}: "
                           f"{self.log('cni-installer')[-2000:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            if not self.running("agent"):
                break
            time.sleep(0.2)
        raise TimeoutError(f"agent on {self.node.node.name} not ready: {self.log('agent')[-3000:]}")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        return admin_get(self.node.node, self.admin, path, timeout)

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        assert status == 200, body
        return Metrics(body)


class WorkloadPod:
    """A pod whose sandbox the CNI chain wires: its IP, netns path and cgroup come from the
    runtime. `serve` runs a container in it; `enter` is a process joining it from the host
    (as `kubectl exec` would: the pod's netns and a cgroup under the pod's)."""

    def __init__(self, node: K3sNode, name: str, namespace: str = "default", uid: str = "") -> None:
        self.node = node
        self.name = name
        self.namespace = namespace
        self.uid = uid or str(uuid.uuid4())
        self.sandbox = node.pod(name, self.uid, namespace)
        self.sandbox_id = ""
        self.ip = ""
        self.netns_path = ""

    def run(self) -> WorkloadPod:
        with self.node.cri() as cri:
            self.sandbox_id = cri.run_pod_sandbox(self.sandbox)
            self.ip = cri.pod_sandbox_status(self.sandbox_id).message(5).text(1)
            info = json.loads(cri.pod_sandbox_info(self.sandbox_id))
        self.netns_path = next(ns["path"] for ns in info["runtimeSpec"]["linux"]["namespaces"]
                               if ns["type"] == "network")
        return self

    def stop(self) -> None:
        with self.node.cri() as cri:
            cri.stop_pod_sandbox(self.sandbox_id)

    def remove(self) -> None:
        with self.node.cri() as cri:
            cri.remove_pod_sandbox(self.sandbox_id)

    def cgroup(self) -> Path:
        """The pod's cgroup in the v2 hierarchy (kubelet's, where eBPF capture attaches)."""
        return unified_cgroup_mount() / self.sandbox.cgroup_parent.lstrip("/")

    def serve(self, argv: Sequence[str], name: str = "server") -> str:
        """A container of the image in this pod running `argv`; waits for "listening"."""
        spec = Container(name=name, image=IMAGE, command=list(argv), log_path=f"{name}/0.log",
                         mounts=[])
        (Path(self.sandbox.log_directory) / name).mkdir(parents=True, exist_ok=True)
        with self.node.cri() as cri:
            container_id = cri.create_container(self.sandbox_id, spec, self.sandbox)
            cri.start_container(container_id)
        log = Path(self.sandbox.log_directory) / name / "0.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "listening" in cri_log_text(log):
                return container_id
            time.sleep(0.1)
        raise TimeoutError(f"{name} in {self.name}: {cri_log_text(log)[-2000:]}")


def unified_cgroup_mount() -> Path:
    return next(mount for mount in cgroup_mounts() if (mount / "cgroup.controllers").exists())


def sandbox_gone(node: K3sNode, sandbox_id: str) -> bool:
    with node.cri() as cri:
        try:
            cri.pod_sandbox_status(sandbox_id)
        except CriError as error:
            return "NotFound" in str(error) or "NOT_FOUND" in str(error)
    return False
