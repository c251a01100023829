"""The network-namespace lab: N simulated k3s nodes x M pods on one machine.

A switch namespace holds the underlay bridge; each node is a namespace joined to it by a
veth pair; pods are namespaces wired by real CNI plugins run from their node's namespace.
The lab registers every resource in an undo stack as soon as it exists and removes all of
them on `close()`, also after a partial failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.dataplane import cgroups
from agent.lab.cni import CniRuntime

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
UNDERLAY_PREFIX = "10.250.0"
CNI_NETWORK_NAME = "pinion-lab"
_CLONE_NEWNET = 0x40000000
_MAX_NETNS_NAME = 40
_STOP_GRACE_SECONDS = 5.0
_RUN_ID = re.compile(r"[a-z0-9]{1,12}")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class LabError(RuntimeError):
    """A lab step failed; the message names the failing command and carries its stderr."""


# ---------------------------------------------------------------- undo and processes


@dataclass(frozen=True)
class _UndoStep:
    what: str
    action: Callable[[], object]
    best_effort: bool = False


class _UndoStack:
    """Resources registered right after creation, released in reverse order."""

    def __init__(self) -> None:
        self._steps: list[_UndoStep] = []

    def push(self, what: str, action: Callable[[], object], best_effort: bool = False) -> None:
        self._steps.append(_UndoStep(what, action, best_effort))

    def unwind(self) -> list[tuple[_UndoStep, Exception]]:
        """Run every step (even after failures); return the failures. Idempotent."""
        failures: list[tuple[_UndoStep, Exception]] = []
        while self._steps:
            step = self._steps.pop()
            try:
                step.action()
            except Exception as error:
                failures.append((step, error))
        return failures


def _settle(failures: list[tuple[_UndoStep, Exception]], strict: bool) -> None:
    """Log every teardown failure; raise if one matters (any of them when strict)."""
    for step, error in failures:
        log.warning("lab teardown: %s: %s", step.what, error)
    fatal = [(step, error) for step, error in failures if strict or not step.best_effort]
    if fatal:
        summary = "; ".join(f"{step.what}: {error}" for step, error in fatal)
        raise LabError(f"teardown failed: {summary}") from fatal[0][1]


class _ProcessSet:
    """Processes the lab started; stopped by PID only: terminate, wait, then kill."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[Any]] = []

    def track(self, process: subprocess.Popen[Any]) -> None:
        self._processes.append(process)

    def stop_all(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        processes, self._processes = self._processes, []
        stop_processes(processes, grace)


def stop_processes(processes: Sequence[subprocess.Popen[Any]], grace: float = _STOP_GRACE_SECONDS) -> None:
    """Stop processes we started, by PID only: SIGTERM all, wait up to `grace`, then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_GRACE_SECONDS)


# ---------------------------------------------------------------- commands and namespaces


def _command(argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run a setup command; raise LabError with its stderr when it fails."""
    try:
        completed = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LabError(f"{shlex.join(argv)}: {error}") from error
    if completed.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed (exit {completed.returncode}): {completed.stderr.strip()}")
    return completed.stdout


def _ip(*args: str) -> str:
    return _command(["ip", *args])


def _remove_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        _ip("netns", "del", name)


def _add_netns(undo: _UndoStack, name: str) -> str:
    """Create a named netns with lo up; registered for removal. Returns its path."""
    _ip("netns", "add", name)
    undo.push(f"netns {name}", lambda: _remove_netns(name))
    _ip("-n", name, "link", "set", "lo", "up")
    return str(NETNS_DIR / name)


@contextlib.contextmanager
def _entering(
    netns_path: str, cgroup: Path | None, then: Callable[[], object] | None = None
) -> Iterator[Callable[[], None]]:
    """A preexec_fn that joins `cgroup` (if any), then the network namespace at netns_path."""
    libc = ctypes.CDLL(None, use_errno=True)
    procs_path = str(cgroup / "cgroup.procs") if cgroup is not None else None
    netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if procs_path is not None:
            procs_fd = os.open(procs_path, os.O_WRONLY)
            try:
                os.write(procs_fd, str(os.getpid()).encode())
            finally:
                os.close(procs_fd)
        if libc.setns(netns_fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns({netns_path}): {os.strerror(code)}")
        if then is not None:
            then()

    try:
        yield enter
    finally:
        os.close(netns_fd)


def _spawn_in(
    netns_path: str, cgroup: Path | None, argv: Sequence[str], popen_kw: dict[str, Any]
) -> subprocess.Popen[Any]:
    with _entering(netns_path, cgroup, popen_kw.pop("preexec_fn", None)) as enter:
        return subprocess.Popen(list(argv), preexec_fn=enter, **popen_kw)


def _run_in(
    netns_path: str,
    cgroup: Path | None,
    argv: Sequence[str],
    check: bool,
    timeout: float,
    run_kw: dict[str, Any],
) -> subprocess.CompletedProcess[Any]:
    if "stdout" not in run_kw and "stderr" not in run_kw:
        run_kw.setdefault("capture_output", True)
    run_kw.setdefault("text", True)
    with _entering(netns_path, cgroup, run_kw.pop("preexec_fn", None)) as enter:
        return subprocess.run(list(argv), preexec_fn=enter, check=check, timeout=timeout, **run_kw)


def cgroup2_mount() -> Path | None:
    """Where this host's cgroup v2 hierarchy is mounted, if anywhere."""
    return cgroups.cgroup2_mount(Path("/proc/mounts").read_text())


def _make_cgroup(undo: _UndoStack, path: Path) -> Path:
    path.mkdir()
    undo.push(f"cgroup {path}", lambda: _remove_cgroup(path))
    return path


def _remove_cgroup(path: Path, attempts: int = 50) -> None:
    """rmdir a lab cgroup; leftovers in it (descendants of lab processes) are killed first."""
    if not path.exists():
        return
    if (path / "cgroup.procs").read_text().strip() and (path / "cgroup.kill").exists():
        (path / "cgroup.kill").write_text("1")
    for _ in range(attempts - 1):
        try:
            path.rmdir()
            return
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
        time.sleep(0.05)
    path.rmdir()


def _first_ipv4(result: Mapping[str, Any]) -> str:
    """The first IPv4 address of a CNI result (0.3.x/0.4.0/1.0.0 share the `ips` shape)."""
    for entry in result.get("ips", []):
        address = str(entry.get("address", "")).split("/")[0]
        if address.count(".") == 3:
            return address
    raise LabError(f"the CNI result has no IPv4 address: {result}")


# ---------------------------------------------------------------- nodes and pods


@dataclass(eq=False)
class Node:
    """A simulated k3s node: a netns on the underlay with its own pod CIDR."""

    index: int
    name: str
    netns: str
    netns_path: str
    underlay_ip: str
    pod_cidr: str
    gateway_ip: str
    cgroup_path: Path | None = None  # the node's own cgroup, as a DaemonSet pod has one
    _processes: _ProcessSet = field(default_factory=_ProcessSet, repr=False)

    def spawn(self, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the node netns and cgroup; the lab stops it on close()."""
        process = _spawn_in(self.netns_path, self.cgroup_path, argv, popen_kw)
        self._processes.track(process)
        return process

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 30.0, **run_kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the node netns and wait; output captured as text by default."""
        return _run_in(self.netns_path, None, argv, check, timeout, run_kw)


@dataclass(frozen=True)
class _Attachment:
    """What CNI needs to address one pod's attachment again (DEL, CHECK)."""

    runtime: CniRuntime
    conflist: dict[str, Any]
    container_id: str
    netns_path: str
    args: dict[str, str]
    ifname: str = "eth0"

    def add(self) -> dict[str, Any]:
        return self.runtime.add(self.conflist, self.container_id, self.netns_path, self.ifname, self.args)

    def delete(self, prev_result: Mapping[str, Any]) -> None:
        self.runtime.delete(
            self.conflist, self.container_id, self.netns_path, self.ifname, self.args, prev_result
        )

    def check(self, prev_result: Mapping[str, Any]) -> None:
        self.runtime.check(
            self.conflist, self.container_id, self.netns_path, self.ifname, self.args, prev_result
        )


@dataclass(eq=False)
class Pod:
    """A pod: its own netns (wired by CNI) and cgroup; processes run inside both."""

    name: str
    namespace: str
    uid: str
    node: Node
    container_id: str
    netns: str
    netns_path: str
    ip: str
    cgroup_path: Path | None
    result: dict[str, Any]
    _attachment: _Attachment = field(repr=False)
    _processes: _ProcessSet = field(repr=False)
    _undo: _UndoStack = field(repr=False)

    def spawn(self, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the pod netns and cgroup; stopped when the pod goes away."""
        process = _spawn_in(self.netns_path, self.cgroup_path, argv, popen_kw)
        self._processes.track(process)
        return process

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 30.0, **run_kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the pod netns and cgroup and wait; output captured as text."""
        return _run_in(self.netns_path, self.cgroup_path, argv, check, timeout, run_kw)


# ---------------------------------------------------------------- the lab


class Lab:
    """N nodes on one underlay switch, pods added on demand; removes everything on close()."""

    def __init__(
        self,
        nodes: int = 2,
        run_id: str | None = None,
        pod_cidr_prefix: str = "10.42",
        extra_plugins: Callable[[Node], list[dict[str, Any]]] | None = None,
        workdir: Path | None = None,
    ) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be within 1..200, not {nodes}")
        self.run_id = run_id if run_id is not None else secrets.token_hex(3)
        if not _RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"run_id must be 1-12 of [a-z0-9], not {self.run_id!r}")
        self.switch_netns = f"pn{self.run_id}-sw"
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.cgroup_root: Path | None = None
        self._pod_cidr_prefix = pod_cidr_prefix
        self._extra_plugins = extra_plugins
        self._undo = _UndoStack()
        try:
            self.workdir = self._make_workdir(workdir)
            self.cgroup_root = self._make_cgroup_root()
            self._build_underlay(nodes)
        except BaseException:
            with contextlib.suppress(LabError):
                self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        with contextlib.suppress(LabError):  # already logged; keep the original error
            self.close()

    def close(self) -> None:
        """Remove everything the lab made, newest first. Idempotent."""
        self.pods.clear()
        _settle(self._undo.unwind(), strict=False)

    def on_close(self, what: str, action: Callable[[], object]) -> None:
        """Run `action` when the lab closes (before what existed when it was registered)."""
        self._undo.push(what, action, best_effort=True)

    def conflist(self, node: Node, cni_version: str = "1.0.0") -> dict[str, Any]:
        """The CNI chain pods on `node` get: bridge + host-local, then the extra plugins."""
        bridge: dict[str, Any] = {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": node.pod_cidr, "gateway": node.gateway_ip}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.workdir / "ipam" / node.name),
            },
        }
        extra = self._extra_plugins(node) if self._extra_plugins is not None else []
        return {"cniVersion": cni_version, "name": CNI_NETWORK_NAME, "plugins": [bridge, *extra]}

    def add_pod(
        self,
        node: Node,
        name: str,
        namespace: str = "default",
        args: Mapping[str, str] | None = None,
        cni_version: str = "1.0.0",
    ) -> Pod:
        """Create a pod netns and cgroup and run CNI ADD for it from the node netns."""
        netns = self._pod_netns_name(node, name, namespace)
        if any(pod.netns == netns for pod in self.pods):
            raise ValueError(f"pod {namespace}/{name} already exists on {node.name}")
        undo = _UndoStack()
        self._undo.push(f"pod {namespace}/{name}", lambda: _settle(undo.unwind(), strict=False))
        try:
            pod = self._wire_pod(undo, node, name, namespace, netns, dict(args or {}), cni_version)
        except BaseException:
            with contextlib.suppress(LabError):
                _settle(undo.unwind(), strict=False)
            raise
        self.pods.append(pod)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        """Stop the pod's processes, run CNI DEL, remove its netns and cgroup."""
        if pod in self.pods:
            self.pods.remove(pod)
        _settle(pod._undo.unwind(), strict=True)

    def check_pod(self, pod: Pod) -> None:
        """Run CNI CHECK for the pod's chain with its cached ADD result."""
        pod._attachment.check(pod.result)

    # ------------------------------------------------------------ construction steps

    def _make_workdir(self, workdir: Path | None) -> Path:
        if workdir is None:
            path = Path(tempfile.mkdtemp(prefix=f"pinion-lab-{self.run_id}-"))
            self._undo.push(f"workdir {path}", lambda: shutil.rmtree(path))
        else:
            path = Path(workdir)
            if not path.exists():
                path.mkdir(parents=True)
                self._undo.push(f"workdir {path}", lambda: shutil.rmtree(path))
        ipam = path / "ipam"
        ipam.mkdir(exist_ok=True)
        self._undo.push(f"ipam dir {ipam}", lambda: shutil.rmtree(ipam, ignore_errors=True))
        return path

    def _make_cgroup_root(self) -> Path | None:
        mount = cgroup2_mount()
        if mount is None:
            log.warning("no cgroup v2 mount found: lab pods get no cgroup")
            return None
        return _make_cgroup(self._undo, mount / f"pinion-lab-{self.run_id}")

    def _build_underlay(self, count: int) -> None:
        _add_netns(self._undo, self.switch_netns)
        _ip("-n", self.switch_netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch_netns, "link", "set", "br0", "up")
        for index in range(count):
            self.nodes.append(self._add_node(index))
        for node in self.nodes:
            for peer in self.nodes:
                if peer is not node:
                    _ip("-n", node.netns, "route", "add", peer.pod_cidr, "via", peer.underlay_ip)

    def _add_node(self, index: int) -> Node:
        netns = f"pn{self.run_id}-n{index}"
        prefix = self._pod_cidr_prefix
        node = Node(
            index=index,
            name=f"node{index}",
            netns=netns,
            netns_path=_add_netns(self._undo, netns),
            underlay_ip=f"{UNDERLAY_PREFIX}.{index + 1}",
            pod_cidr=f"{prefix}.{index}.0/24",
            gateway_ip=f"{prefix}.{index}.1",
        )
        self._undo.push(f"processes of {node.name}", node._processes.stop_all)
        port = f"vn{index}"
        _ip(
            "-n",
            self.switch_netns,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            netns,
        )
        _ip("-n", self.switch_netns, "link", "set", port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{node.underlay_ip}/24", "dev", "ul0")
        _ip("-n", netns, "link", "set", "ul0", "up")
        self._node_run(node, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        if self.cgroup_root is not None:
            node.cgroup_path = _make_cgroup(self._undo, self.cgroup_root / node.name)
        return node

    @staticmethod
    def _node_run(node: Node, argv: list[str]) -> None:
        completed = node.run(argv, check=False)
        if completed.returncode != 0:
            raise LabError(f"{shlex.join(argv)} in {node.netns} failed: {completed.stderr.strip()}")

    def _wire_pod(
        self,
        undo: _UndoStack,
        node: Node,
        name: str,
        namespace: str,
        netns: str,
        args: dict[str, str],
        cni_version: str,
    ) -> Pod:
        netns_path = _add_netns(undo, netns)
        cgroup = None
        if self.cgroup_root is not None:
            cgroup = _make_cgroup(undo, self.cgroup_root / node.name / netns[len(node.netns) + 1 :])
        # The API server's uid when a test made the pod object first (Kubernetes mode).
        uid, container_id = args.get("K8S_POD_UID") or str(uuid.uuid4()), secrets.token_hex(32)
        if cgroup is not None and self.cgroup_root is not None:  # as the runtime would know it
            args = {"PINION_CGROUP": f"/{cgroup.relative_to(self.cgroup_root.parent)}", **args}
        cni_args = {
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": namespace,
            "K8S_POD_NAME": name,
            "K8S_POD_UID": uid,
            "K8S_POD_INFRA_CONTAINER_ID": container_id,
            **args,
        }
        attachment = _Attachment(
            CniRuntime(run_in_netns=node.netns),
            self.conflist(node, cni_version),
            container_id,
            netns_path,
            cni_args,
        )
        result = attachment.add()
        undo.push(f"CNI DEL {namespace}/{name}", lambda: attachment.delete(result), best_effort=True)
        processes = _ProcessSet()
        undo.push(f"processes of {namespace}/{name}", processes.stop_all)
        return Pod(
            name=name,
            namespace=namespace,
            uid=uid,
            node=node,
            container_id=container_id,
            netns=netns,
            netns_path=netns_path,
            ip=_first_ipv4(result),
            cgroup_path=cgroup,
            result=result,
            _attachment=attachment,
            _processes=processes,
            _undo=undo,
        )

    @staticmethod
    def _pod_netns_name(node: Node, name: str, namespace: str) -> str:
        """`<node netns>-<pod>`, hashed and truncated when unsafe or too long."""
        if not name:
            raise ValueError("a pod needs a name")
        key = name if namespace == "default" else f"{namespace}-{name}"
        safe = _SAFE_NAME.sub("-", key)
        room = _MAX_NETNS_NAME - len(node.netns) - 1
        if safe == key and safe.strip(".") and len(safe) <= room:
            return f"{node.netns}-{safe}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        return f"{node.netns}-{safe[: max(0, room - 9)]}-{digest}"
