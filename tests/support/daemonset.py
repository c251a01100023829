"""deploy/daemonset.yaml's pod, run through CRI as kubelet runs it: the same commands, args
(with `$(VAR)` expanded from the env), env (fieldRef and pinion-config values), hostPath
mounts with their propagation, and security context (user, capabilities, read-only root, no
privilege escalation, RuntimeDefault seccomp, kubelet's masked and read-only /proc paths).

Resources: requests.cpu as CPU shares and limits.memory as the memory limit, as kubelet maps
them. What differs, each for a stated reason, is passed in by the caller as `Overrides`: the test
runs two simulated nodes on one host, so the per-node host paths live under each node's
directory (`K3sNode.root`); the kernel's own paths (/run/netns, /sys/fs/bpf, /sys/fs/cgroup)
are the host's. The volumes kubelet fills from the API (the projected issuer token, the trust
bundle ConfigMap) are directories the test writes, given in `api_volumes`; without them (a
standalone agent, no API server) they are not mounted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.cri import (
    PROPAGATION_BIDIRECTIONAL,
    PROPAGATION_HOST_TO_CONTAINER,
    PROPAGATION_PRIVATE,
    Container,
    Mount,
)

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
CONFIG = REPO / "deploy" / "config.yaml"
KERNEL_PATHS = ("/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup")  # one per host, whatever the node
KUBERNETES_ONLY_VOLUMES = {"issuer-token", "trust-bundle"}
_PROPAGATION = {None: PROPAGATION_PRIVATE, "None": PROPAGATION_PRIVATE,
                "HostToContainer": PROPAGATION_HOST_TO_CONTAINER,
                "Bidirectional": PROPAGATION_BIDIRECTIONAL}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def daemonset_object() -> dict[str, Any]:
    return next(d for d in _documents(DAEMONSET) if d["kind"] == "DaemonSet")


def pod_spec() -> dict[str, Any]:
    return dict(daemonset_object()["spec"]["template"]["spec"])


def pinion_config() -> dict[str, str]:
    config = next(d for d in _documents(CONFIG) if d["metadata"]["name"] == "pinion-config")
    return {key: str(value) for key, value in config["data"].items()}


@dataclass(frozen=True)
class Overrides:
    """What the test's node supplies in place of a cluster's."""

    node_root: Path                      # this node's "/": per-node hostPaths live under it
    node_name: str
    host_ip: str
    pod_uid: str
    config: Mapping[str, str] = field(default_factory=dict)   # pinion-config values changed
    extra_args: Mapping[str, Sequence[str]] = field(default_factory=dict)  # by container name
    extra_mounts: Mapping[str, Sequence[Mount]] = field(default_factory=dict)
    log_directory: Path | None = None
    api_volumes: Mapping[str, Path] = field(default_factory=dict)  # issuer-token, trust-bundle
    env: Mapping[str, str] = field(default_factory=dict)  # what kubelet adds (KUBERNETES_SERVICE_*)

    def host_path(self, path: str) -> str:
        if any(path == kernel or path.startswith(kernel + "/") for kernel in KERNEL_PATHS):
            return path
        return str(self.node_root / path.lstrip("/"))


def _env(spec: Mapping[str, Any], overrides: Overrides) -> dict[str, str]:
    config = {**pinion_config(), **overrides.config}
    fields = {"spec.nodeName": overrides.node_name, "metadata.uid": overrides.pod_uid,
              "status.hostIP": overrides.host_ip, "status.podIP": overrides.host_ip}
    env: dict[str, str] = {}
    for entry in spec.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = str(entry.get("value", ""))
        elif "fieldRef" in source:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source and source["configMapKeyRef"]["name"] == "pinion-config":
            env[entry["name"]] = config[source["configMapKeyRef"]["key"]]
        else:
            raise ValueError(f"env {entry['name']}: a source this test does not provide: {source}")
    return env


def _expand(text: str, env: Mapping[str, str]) -> str:
    """kubelet's $(VAR) expansion in command and args; $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _mounts(spec: Mapping[str, Any], volumes: Mapping[str, Any], overrides: Overrides) -> list[Mount]:
    mounts = []
    for mount in spec.get("volumeMounts", []):
        name = mount["name"]
        if name in KUBERNETES_ONLY_VOLUMES:
            if name not in overrides.api_volumes:
                continue
            host_path = str(overrides.api_volumes[name])
        elif "hostPath" in volumes[name]:
            host_path = overrides.host_path(volumes[name]["hostPath"]["path"])
        else:
            raise ValueError(f"volume {name}: not a hostPath and not one the test provides")
        mounts.append(Mount(container_path=mount["mountPath"], host_path=host_path,
                            readonly=bool(mount.get("readOnly", False)),
                            propagation=_PROPAGATION[mount.get("mountPropagation")]))
    return mounts


def container(name: str, image: str, overrides: Overrides) -> Container:
    """The CRI ContainerConfig kubelet would send for the DaemonSet's container `name`."""
    spec = pod_spec()
    containers = {c["name"]: c for c in spec["containers"]}
    if name not in containers:
        raise ValueError(f"the DaemonSet has no container {name!r}: {sorted(containers)}")
    c = containers[name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {**overrides.env, **_env(c, overrides)}
    security = c.get("securityContext", {})
    capabilities = security.get("capabilities", {})
    log_path = ""
    if overrides.log_directory is not None:
        log_path = f"{name}/0.log"
        (overrides.log_directory / name).mkdir(parents=True, exist_ok=True)
    return Container(
        name=name, image=image,
        command=[_expand(word, env) for word in c.get("command", [])],
        args=[*(_expand(word, env) for word in c.get("args", [])), *overrides.extra_args.get(name, ())],
        env=env,
        mounts=[*_mounts(c, volumes, overrides), *overrides.extra_mounts.get(name, ())],
        log_path=log_path,
        run_as_user=security.get("runAsUser"),
        readonly_rootfs=bool(security.get("readOnlyRootFilesystem", False)),
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        add_capabilities=list(capabilities.get("add", [])),
        drop_capabilities=list(capabilities.get("drop", [])),
        host_network=bool(spec.get("hostNetwork", False)),
        cpu_shares=_milli(c["resources"]["requests"]["cpu"]) * 1024 // 1000,
        memory_limit_bytes=_bytes(c["resources"]["limits"]["memory"]),
    )


def _milli(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[:-2]) * factor
    return int(quantity)


def host_paths(overrides: Overrides) -> list[Path]:
    """Every per-node hostPath of the pod (kubelet makes the DirectoryOrCreate ones)."""
    paths = []
    for volume in pod_spec()["volumes"]:
        host = volume.get("hostPath")
        if host is not None and overrides.host_path(host["path"]) != host["path"]:
            paths.append(Path(overrides.host_path(host["path"])))
    return paths
