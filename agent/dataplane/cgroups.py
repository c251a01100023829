"""Where cgroup v2 is, which cgroup a process is in, and which one is a pod's.

A pod's cgroup exists before CNI ADD (kubelet creates the pod-level cgroup first). It is
named by a CNI arg (PINION_CGROUP: the lab, or any runtime that knows it) or found from the
pod UID in the kubelet layouts (systemd and cgroupfs drivers, as k3s uses them too)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

QOS_CLASSES = ("", "burstable", "besteffort")  # "" = guaranteed: directly under kubepods


class CgroupError(RuntimeError):
    pass


def cgroup2_mount(mounts_text: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid layout), if anywhere."""
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def own_cgroup(proc_cgroup_text: str, mount: Path) -> Path:
    """The calling process's cgroup v2 directory, from /proc/self/cgroup ("0::/path")."""
    for line in proc_cgroup_text.splitlines():
        if line.startswith("0::"):
            return mount / line[3:].strip().lstrip("/")
    raise CgroupError("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")


def kubelet_candidates(uid: str) -> list[str]:
    """The pod-level cgroup's path relative to the v2 mount, for every driver and QoS class."""
    underscored = uid.replace("-", "_")
    paths = []
    for qos in QOS_CLASSES:
        if qos:
            paths.append(f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice")
            paths.append(f"kubepods/{qos}/pod{uid}")
        else:
            paths.append(f"kubepods.slice/kubepods-pod{underscored}.slice")
            paths.append(f"kubepods/pod{uid}")
    return paths


def pod_cgroup(mount: Path, explicit: str, uid: str, roots: Iterable[str] = ("",)) -> Path:
    """The pod's cgroup directory. `explicit` (PINION_CGROUP) is a path in the v2 hierarchy
    ("/kubepods/pod…", as /proc/<pid>/cgroup shows it) or an absolute path under the mount.
    `roots` are parents the kubelet tree may sit under (k3s in a container: "k3s")."""
    if explicit:
        path = Path(explicit)
        if not path.is_relative_to(mount):
            path = mount / explicit.lstrip("/")
        if ".." in path.parts or not path.is_dir():
            raise CgroupError(f"PINION_CGROUP={explicit}: no such cgroup under {mount}")
        return path
    if not uid:
        raise CgroupError("no PINION_CGROUP and no K8S_POD_UID: cannot find the pod's cgroup")
    tried = [mount / root / candidate for root in roots for candidate in kubelet_candidates(uid)]
    for path in tried:
        if path.is_dir():
            return path
    raise CgroupError(f"no cgroup for pod uid {uid} under {mount} (tried the kubelet "
                      f"systemd and cgroupfs layouts, e.g. {tried[0]})")
