"""The ebpf backend: cgroup programs capture each meshed pod's outbound connects, netfilter
(nftables or iptables, whichever the node uses) keeps the inbound and reply-routing rules.

Programs and maps (bpf/capture.c, compiled ahead of time) are loaded once per agent and
pinned under <bpf dir>/<object digest>/, so a restarted agent adopts them: it attaches
nothing twice and leaks nothing. Per pod, the same programs are attached to the pod's
cgroup and its policy is written into maps keyed by the pod's netns cookie. The agent's own
cgroup gets the getsockopt program that answers the proxy's SO_ORIGINAL_DST."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.dataplane import cgroups
from agent.dataplane.redirect import Backend, RedirectError, bpfmaps, libbpf
from agent.dataplane.redirect.plan import Plan
from agent.model import Pod

log = logging.getLogger(__name__)

DEFAULT_OBJECT = Path(__file__).resolve().parents[3] / "bpf" / "capture.o"
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/pinion")
BPFFS = Path("/sys/fs/bpf")
_ID_SIZE = 16


@dataclass(frozen=True, slots=True)
class EbpfSettings:
    object_path: Path
    pin_dir: Path  # this agent's: <root>/<node>-<hash of its state dir>
    pod_uid: str = ""  # the agent's own pod (DaemonSet: downward API), to find its cgroup
    max_pods: int = 256
    max_connections: int = 8192

    @classmethod
    def from_config(cls, config: Config) -> EbpfSettings:
        root = config.bpf_dir or DEFAULT_PIN_ROOT
        state = hashlib.sha256(str(config.state_dir.resolve()).encode()).hexdigest()[:8]
        return cls(config.bpf_object or DEFAULT_OBJECT, root / f"{config.node_name}-{state}",
                   config.pod_uid, config.bpf_max_pods, config.bpf_max_connections)

    def map_sizes(self) -> dict[str, int]:
        return bpfmaps.map_sizes(self.max_pods, self.max_connections)


@dataclass(slots=True)
class _Attached:
    """One pod's share: where its programs hang and which plan rules they stand for."""

    container_id: str
    netns_cookie: int
    cgroup: Path
    rule_names: frozenset[str] = field(default_factory=frozenset)


class EbpfBackend:
    name = "ebpf"

    def __init__(self, netfilter: Backend, settings: EbpfSettings,
                 mounts: str | None = None, proc_cgroup: str | None = None) -> None:
        self.netfilter = netfilter
        self._settings = settings
        self._mounts = mounts
        self._proc_cgroup = proc_cgroup
        self._mount: Path | None = None
        self._pins: Path | None = None
        self._pinned_now = False  # this load pinned them (else it adopted an earlier agent's)
        self._programs: dict[str, tuple[int, int]] = {}  # name -> (fd, id)
        self._maps: dict[str, int] = {}
        self._stale_ids: set[int] = set()
        self._agent_cgroup: Path | None = None
        self._pods: dict[int, _Attached] = {}  # by netns cookie
        self._lock = threading.Lock()

    # ------------------------------------------------------------ start-up and shutdown

    def load(self) -> None:
        """Check the kernel side, then load (or adopt) the pinned programs and attach the
        getsockopt program to our own cgroup. Idempotent. RedirectError says what is wrong."""
        if self._programs:
            return
        mounts = self._mounts if self._mounts is not None else Path("/proc/self/mounts").read_text()
        self._mount = cgroups.cgroup2_mount(mounts)
        if self._mount is None:
            raise RedirectError("cgroup v2 is not mounted (boot with "
                                "systemd.unified_cgroup_hierarchy=1)")
        object_path = self._settings.object_path
        if not object_path.is_file():
            raise RedirectError(f"no eBPF object at {object_path} (build it: make bpf)")
        _ensure_bpffs(self._settings.pin_dir, mounts)
        digest = pin_version(object_path.read_bytes(), self._settings.map_sizes())
        self._pins = self._settings.pin_dir / digest
        try:
            self._stale_ids = _retire_other_versions(self._settings.pin_dir, digest)
            self._load_or_adopt(object_path)
            self._agent_cgroup = self._own_cgroup(self._mount)
            self._ensure_attached(self._agent_cgroup, (bpfmaps.AGENT_PROGRAM,))
        except (OSError, cgroups.CgroupError) as exc:
            self._close_fds()
            if self._pinned_now and self._pins is not None:  # a fallback leaves no maps pinned
                shutil.rmtree(self._pins, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self._settings.pin_dir.rmdir()
            raise RedirectError(str(exc)) from exc

    def _own_cgroup(self, mount: Path) -> Path:
        """Where the getsockopt program goes: the agent's own cgroup, never the root one.
        In a pod, a cgroup namespace makes /proc/self/cgroup read "0::/"; the pod's real
        cgroup is then found from its uid (PINION_POD_UID, from the downward API)."""
        if self._settings.pod_uid:
            return cgroups.pod_cgroup(mount, "", self._settings.pod_uid, ("", "k3s"))
        proc = self._proc_cgroup or Path("/proc/self/cgroup").read_text()
        own = cgroups.own_cgroup(proc, mount)
        if own == mount:
            raise cgroups.CgroupError(
                "the agent is in the root cgroup (or a cgroup namespace hides its own): its "
                "getsockopt program would run for every process on the node; run it in its own "
                "cgroup, or in a pod give it PINION_POD_UID (downward API metadata.uid)")
        return own

    def _load_or_adopt(self, object_path: Path) -> None:
        assert self._pins is not None
        wanted = [*bpfmaps.MAPS, *bpfmaps.PROGRAMS]
        self._pinned_now = not all((self._pins / name).exists() for name in wanted)
        if self._pinned_now:
            shutil.rmtree(self._pins, ignore_errors=True)  # a half-pinned earlier attempt
            self._pins.mkdir(parents=True)
            try:
                libbpf.load_and_pin(object_path, self._pins, bpfmaps.MAPS, tuple(bpfmaps.PROGRAMS),
                                    self._settings.map_sizes())
            except OSError:
                shutil.rmtree(self._pins, ignore_errors=True)
                raise
            log.info("ebpf: loaded %s, pinned under %s", object_path, self._pins)
        else:
            log.info("ebpf: adopted the programs and maps pinned under %s", self._pins)
        for name in bpfmaps.MAPS:
            self._maps[name] = libbpf.pinned(self._pins / name)
        for name in bpfmaps.PROGRAMS:
            fd = libbpf.pinned(self._pins / name)
            self._programs[name] = (fd, libbpf.program_info(fd).id)

    def prepare(self) -> None:
        self.netfilter.prepare()
        self.load()

    def close(self, cleanup: bool) -> None:
        """Shutdown. With cleanup, detach from our cgroup and unpin everything (the pods were
        released before); without, programs stay so pods fail closed until we return."""
        if cleanup and self._agent_cgroup is not None and self._programs:
            with contextlib.suppress(OSError):
                self._detach_from(self._agent_cgroup, (bpfmaps.AGENT_PROGRAM,))
            shutil.rmtree(self._settings.pin_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self._settings.pin_dir.parent.rmdir()  # the root, if no other agent uses it
        self._close_fds()

    def map_bytes(self) -> dict[str, int]:
        """Kernel memory of each map, as charged to the agent's memory cgroup."""
        return {name: libbpf.map_memory(fd) for name, fd in self._maps.items()}

    def _close_fds(self) -> None:
        for fd in [*self._maps.values(), *(fd for fd, _ in self._programs.values())]:
            os.close(fd)
        self._maps.clear()
        self._programs.clear()

    # ------------------------------------------------------------ the Backend protocol

    def render(self, plan: Plan) -> str:
        netfilter, policy = bpfmaps.split_plan(plan)
        return (self.netfilter.render(netfilter)
                + f"# ebpf on the pod's cgroup: {', '.join(bpfmaps.POD_PROGRAMS)}; outbound TCP "
                f"-> 127.0.0.1:{policy.redirect_port}, except mark {policy.proxy_mark:#x}, "
                f"loopback, own IPs, port 53, ports {list(policy.skip_ports)}, "
                f"CIDRs {list(policy.skip_cidrs)}\n")

    def apply(self, plan: Plan) -> None:
        """In the pod's netns: the netfilter half of the plan (the maps come with attach)."""
        self.netfilter.apply(bpfmaps.split_plan(plan)[0])

    def remove(self) -> None:
        self.netfilter.remove()

    def installed(self) -> set[str]:
        """In the pod's netns: netfilter's rules, plus the outbound rules if this netns's
        policy is in the maps and the programs are attached to its pod's cgroup."""
        names = self.netfilter.installed()
        attached = self._pods.get(bpfmaps.netns_cookie())
        if attached is None or not self._maps:
            return names
        key = bpfmaps.cookie_key(attached.netns_cookie)
        configured = libbpf.map_lookup(self._maps["pod_config"], key, 8) is not None
        if configured and all(p["attached"] for p in self._describe(attached)):
            names |= attached.rule_names
        return names

    def count_rules(self) -> int:
        return self.netfilter.count_rules()

    # ------------------------------------------------------------ per pod

    def attach(self, pod: Pod, plan: Plan) -> None:
        """In the pod's netns: write its policy into the maps, attach the programs to its
        cgroup (each once: what is attached already is kept)."""
        if not self._programs or self._mount is None:
            raise RedirectError("eBPF programs are not loaded")
        _, policy = bpfmaps.split_plan(plan)
        try:
            cgroup = cgroups.pod_cgroup(self._mount, pod.cgroup, pod.uid)
        except cgroups.CgroupError as exc:
            raise RedirectError(str(exc)) from None
        cookie = bpfmaps.netns_cookie()
        with self._lock:
            self._pods[cookie] = _Attached(pod.container_id, cookie, cgroup, policy.rule_names)
            self._write_policy(cookie, policy, pod.ips)
            self._ensure_attached(cgroup, bpfmaps.POD_PROGRAMS)

    def detach(self, pod: Pod) -> None:
        """Detach from the pod's cgroup (if it still exists) and forget its map entries.
        Needs no netns: the pod may be gone already."""
        with self._lock:
            found = [a for a in self._pods.values() if a.container_id == pod.container_id]
            for attached in found:
                if attached.cgroup.is_dir():
                    self._detach_from(attached.cgroup, bpfmaps.POD_PROGRAMS)
                self._forget(attached.netns_cookie)
                del self._pods[attached.netns_cookie]

    def programs(self, pod: Pod) -> list[dict[str, Any]]:
        """What is attached for this pod, for /pods and `pinion check`."""
        found = [a for a in self._pods.values() if a.container_id == pod.container_id]
        return self._describe(found[0]) if found else []

    def _describe(self, attached: _Attached) -> list[dict[str, Any]]:
        current: dict[str, list[int]] = {}
        with contextlib.suppress(OSError, cgroups.CgroupError), _cgroup_fd(attached.cgroup) as fd:
            current = {kind: libbpf.attached_ids(fd, kind) for kind in
                       {bpfmaps.PROGRAMS[name] for name in bpfmaps.POD_PROGRAMS}}
        return [{"program": name, "attach": bpfmaps.PROGRAMS[name], "id": self._programs[name][1],
                 "cgroup": str(attached.cgroup),
                 "attached": self._programs[name][1] in current.get(bpfmaps.PROGRAMS[name], [])}
                for name in bpfmaps.POD_PROGRAMS if name in self._programs]

    def stats(self) -> dict[str, bpfmaps.TcpStats]:
        """Kernel-counted TCP of each attached pod (connections the proxy does not see), by
        container id."""
        found = {}
        for attached in list(self._pods.values()):
            raw = libbpf.map_lookup(self._maps["stats"], bpfmaps.cookie_key(attached.netns_cookie),
                                    bpfmaps.STATS_SIZE)
            if raw is not None:
                found[attached.container_id] = bpfmaps.stats_value(raw)
        return found

    # ------------------------------------------------------------ maps and attachments

    def _write_policy(self, cookie: int, policy: bpfmaps.OutboundPolicy,
                      own_ips: tuple[str, ...]) -> None:
        key = bpfmaps.cookie_key(cookie)
        _replace_entries(self._maps["skip_ports"], bpfmaps.PORT_KEY_SIZE,
                         bpfmaps.cookie_of_port_key, cookie,
                         {bpfmaps.port_key(cookie, p): b"\x01" for p in policy.skip_ports})
        _replace_entries(self._maps["skip_cidrs"], bpfmaps.CIDR_KEY_SIZE,
                         bpfmaps.cookie_of_cidr_key, cookie,
                         bpfmaps.cidr_entries(cookie, policy, own_ips))
        try:  # counters survive a repeated ADD
            libbpf.map_update(self._maps["stats"], key, bpfmaps.ZERO_STATS, libbpf.BPF_NOEXIST)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        libbpf.map_update(self._maps["pod_config"], key, bpfmaps.pod_config_value(policy))

    def _forget(self, cookie: int) -> None:
        key = bpfmaps.cookie_key(cookie)
        libbpf.map_delete(self._maps["pod_config"], key)  # first: capture stops here
        for name, size, cookie_of in (("skip_ports", bpfmaps.PORT_KEY_SIZE, bpfmaps.cookie_of_port_key),
                                      ("skip_cidrs", bpfmaps.CIDR_KEY_SIZE, bpfmaps.cookie_of_cidr_key),
                                      ("by_port", bpfmaps.PORT_KEY_SIZE, bpfmaps.cookie_of_port_key)):
            _replace_entries(self._maps[name], size, cookie_of, cookie, {})
        libbpf.map_delete(self._maps["stats"], key)

    def _ensure_attached(self, cgroup: Path, programs: tuple[str, ...]) -> None:
        with _cgroup_fd(cgroup) as fd:
            for name in programs:
                kind, (prog_fd, prog_id) = bpfmaps.PROGRAMS[name], self._programs[name]
                ids = libbpf.attached_ids(fd, kind)
                for stale in set(ids) & self._stale_ids:  # an older version of ours
                    _detach_id(stale, fd, kind)
                if prog_id not in ids:
                    libbpf.attach(prog_fd, fd, kind)

    def _detach_from(self, cgroup: Path, programs: tuple[str, ...]) -> None:
        with _cgroup_fd(cgroup) as fd:
            for name in programs:
                kind, ours = bpfmaps.PROGRAMS[name], self._stale_ids | {self._programs[name][1]}
                for prog_id in set(libbpf.attached_ids(fd, kind)) & ours:
                    _detach_id(prog_id, fd, kind)


@contextlib.contextmanager
def _cgroup_fd(cgroup: Path) -> Iterator[int]:
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise cgroups.CgroupError(f"cgroup {cgroup}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _detach_id(prog_id: int, cgroup_fd: int, kind: str) -> None:
    fd = libbpf.program_fd_by_id(prog_id)
    try:
        libbpf.detach(fd, cgroup_fd, kind)
    finally:
        os.close(fd)


def _replace_entries(map_fd: int, key_size: int, cookie_of: Any, cookie: int,
                     wanted: dict[bytes, bytes]) -> None:
    """Make the map's entries of this netns cookie exactly `wanted`."""
    for key in libbpf.map_keys(map_fd, key_size):
        if cookie_of(key) == cookie and key not in wanted:
            libbpf.map_delete(map_fd, key)
    for key, value in wanted.items():
        libbpf.map_update(map_fd, key, value)


def pin_version(program_object: bytes, sizes: dict[str, int]) -> str:
    """The name of one version's pin directory: another object, or other map sizes, is
    another version (loaded anew; the old one retired), never adopted."""
    return hashlib.sha256(program_object + repr(sorted(sizes.items())).encode()).hexdigest()[:12]


def _retire_other_versions(pin_dir: Path, digest: str) -> set[int]:
    """Unpin programs and maps of other object versions; return their program ids, to be
    detached wherever they are found attached (our cgroup now, pods as they are adopted)."""
    stale: set[int] = set()
    if not pin_dir.is_dir():
        return stale
    for version in pin_dir.iterdir():
        if version.name == digest:
            continue
        for name in bpfmaps.PROGRAMS:
            with contextlib.suppress(OSError):
                fd = libbpf.pinned(version / name)
                stale.add(libbpf.program_info(fd).id)
                os.close(fd)
        shutil.rmtree(version, ignore_errors=True)
        log.info("ebpf: retired the programs pinned under %s (another object version)", version)
    return stale


def _ensure_bpffs(pin_dir: Path, mounts: str) -> None:
    """The pin directory must be on a bpf filesystem; mount one at /sys/fs/bpf if none."""
    bpf_mounts = [Path(f[1]) for f in (line.split() for line in mounts.splitlines())
                  if len(f) >= 3 and f[2] == "bpf"]
    if any(pin_dir.is_relative_to(m) for m in bpf_mounts):
        return
    if not pin_dir.is_relative_to(BPFFS):
        raise RedirectError(f"{pin_dir} is not on a bpf filesystem (mount -t bpf bpf DIR)")
    libc = ctypes.CDLL(None, use_errno=True)
    BPFFS.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, None) != 0:
        code = ctypes.get_errno()
        raise RedirectError(f"bpffs is not mounted at {BPFFS} and mounting it failed: "
                            f"{os.strerror(code)}")
    log.info("ebpf: mounted a bpf filesystem at %s", BPFFS)
