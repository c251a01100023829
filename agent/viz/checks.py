"""`pinion check`: is each agent reachable, live, ready, exporting parseable metrics, listening
in every pod it meshes, with a sane clock; and (`--pre`) can an agent run on this host.
The decisions are pure functions of replies and probe results; `ask_agent` and HostProbes are
the only I/O."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.viz.render import CHECK, CROSS, section
from agent.viz.scrape import AgentError, Reply, get, parse_metrics, parse_pods
from agent.viz.stats import Sample

CLOCK_SKEW_LIMIT = 60.0   # seconds an agent's process may seem to have started in the future
BPFFS = "/sys/fs/bpf"
# Read-only commands that fail unless the kernel can do nftables / iptables (nat) rules.
NETFILTER_PROBES = (("nft", "list", "tables"), ("iptables-legacy", "-t", "nat", "-S"))


@dataclass(frozen=True)
class CheckResult:
    title: str
    ok: bool
    detail: tuple[str, ...] = ()
    hint: str | None = None

    def lines(self) -> list[str]:
        lines = [f"{CHECK if self.ok else CROSS} {self.title}"]
        lines += [f"    {line}" for line in self.detail]
        if not self.ok and self.hint:
            lines.append(f"    hint: {self.hint}")
        return lines


def render_results(sections: Sequence[tuple[str, Sequence[CheckResult]]]) -> str:
    blocks = [section(title) + "".join(f"{line}\n" for r in results for line in r.lines())
              for title, results in sections]
    ok = all(r.ok for _, results in sections for r in results)
    return "\n".join(blocks) + f"\nStatus check results are {CHECK if ok else CROSS}\n"


def all_ok(sections: Sequence[tuple[str, Sequence[CheckResult]]]) -> bool:
    return all(r.ok for _, results in sections for r in results)


# --- agents ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentReplies:
    """What an agent answered: a Reply per path, or why there was none."""

    agent: str
    unreachable: str | None = None
    replies: dict[str, Reply | str] = field(default_factory=dict)


def ask_agent(agent: str, timeout: float) -> AgentReplies:
    replies: dict[str, Reply | str] = {}
    for path in ("/live", "/ready", "/metrics", "/pods"):
        try:
            replies[path] = get(agent, path, timeout)
        except AgentError as exc:
            if not replies:
                return AgentReplies(agent, unreachable=str(exc))
            replies[path] = str(exc)
    return AgentReplies(agent, None, replies)


def _status_check(replies: AgentReplies, path: str, hint: str) -> CheckResult:
    reply = replies.replies.get(path, "not asked")
    title = f"{path} returns 200"
    if isinstance(reply, str):
        return CheckResult(title, False, (reply,), hint)
    first_line = reply.text.strip().splitlines()[0] if reply.text.strip() else ""
    detail = () if reply.status == 200 else (f"got {reply.status}: {first_line}".rstrip(": "),)
    return CheckResult(title, reply.status == 200, detail, hint)


def _body(replies: AgentReplies, path: str) -> tuple[bytes | None, str | None]:
    reply = replies.replies.get(path, "not asked")
    if isinstance(reply, str):
        return None, reply
    if reply.status != 200:
        return None, f"GET {path} answered {reply.status}"
    return reply.body, None


def _metrics_check(replies: AgentReplies) -> tuple[CheckResult, Sequence[Sample]]:
    title, hint = "metrics parse", "GET /metrics must serve Prometheus text format"
    body, problem = _body(replies, "/metrics")
    if body is None:
        return CheckResult(title, False, (str(problem),), hint), ()
    try:
        samples = parse_metrics(body.decode("utf-8", "replace"))
    except ValueError as exc:
        return CheckResult(title, False, (str(exc),), hint), ()
    return CheckResult(title, True), samples


EXPIRY = "pinion_identity_certificate_expiry_timestamp_seconds"
RENEWAL_MARGIN = 300.0  # a certificate this close to its end should have been renewed long ago


def certificates_check(samples: Sequence[Sample], now: float) -> CheckResult | None:
    """Every workload certificate the agent holds is valid for a while yet (None: it holds
    none: no --identity-dir, or no meshed pod)."""
    title = "workload certificates are valid"
    expiries = {s.labels.get("identity", "?"): s.value for s in samples if s.name == EXPIRY}
    if not expiries:
        return None
    failures = sum(s.value for s in samples if s.name == "pinion_identity_renewals_total"
                   and s.labels.get("result") == "failure")
    bad = [f"{identity} {'expired' if when <= now else 'expires'} "
           f"{abs(when - now):.0f}s {'ago' if when <= now else 'from now'}"
           for identity, when in sorted(expiries.items()) if when - now < RENEWAL_MARGIN]
    detail = [f"{len(expiries)} identities, soonest expiry in "
              f"{(min(expiries.values()) - now) / 3600:.1f} h"]
    if failures:
        detail.append(f"{failures:.0f} renewal failures so far")
    return CheckResult(title, not bad, tuple(bad or detail),
                       "renewals are failing: is the issuer reachable and valid? see the agent log")


def _pods_check(replies: AgentReplies) -> CheckResult:
    title = "every meshed pod is listening"
    hint = "the agent could not open its ports in these pods' network namespaces; see its log"
    body, problem = _body(replies, "/pods")
    if body is None:
        return CheckResult(title, False, (str(problem),), hint)
    try:
        pods = parse_pods(body)
    except ValueError as exc:
        return CheckResult(title, False, (str(exc),), hint)
    deaf = [f"{p.get('namespace', '?')}/{p.get('name', '?')} is not listening"
            for p in pods if p.get("listening") is not True]
    return CheckResult(title, not deaf, tuple(deaf), hint)


def _programs_check(replies: AgentReplies) -> CheckResult | None:
    """eBPF capture: every pod's programs are attached to its cgroup (says where). None when
    the agent captures with netfilter only."""
    body, _ = _body(replies, "/pods")
    try:
        pods = parse_pods(body) if body is not None else []
    except ValueError:
        return None  # _pods_check has said so
    with_programs = [p for p in pods if isinstance(p.get("programs"), list)]
    if not with_programs:
        return None
    detail, ok = [], True
    for pod in with_programs:
        name = f"{pod.get('namespace', '?')}/{pod.get('name', '?')}"
        programs = [p for p in pod["programs"] if isinstance(p, dict)]
        missing = [str(p.get("attach")) for p in programs if p.get("attached") is not True]
        ok = ok and bool(programs) and not missing
        # The cgroup is shown to callers on the agent's host only (the public /pods view).
        where = f" on {programs[0]['cgroup']}" if programs and programs[0].get("cgroup") else ""
        attached = ", ".join(str(p.get("attach")) for p in programs if p.get("attached") is True)
        detail.append(f"{name}: {attached or 'nothing'}{where}"
                      + (f" (NOT attached: {', '.join(missing)})" if missing else ""))
    return CheckResult("every meshed pod's eBPF programs are attached", ok, tuple(detail),
                       "re-announce the pod (CNI ADD) or restart the agent; see its log")


def clock_check(unlabelled: dict[str, float] | None, now: float) -> CheckResult:
    """The agent's process must not have started more than CLOCK_SKEW_LIMIT s in our future."""
    title = "agent clock is sane"
    hint = ("synchronise the clocks (NTP); a node without a real-time clock (a Raspberry Pi) "
            "can boot with a wrong time, and certificates depend on it")
    if unlabelled is None:
        return CheckResult(title, False, ("no metrics to read process_start_time_seconds from",), hint)
    started = unlabelled.get("process_start_time_seconds")
    if started is None:
        return CheckResult(title, False, ("process_start_time_seconds is not in /metrics",), hint)
    ahead = started - now
    if ahead > CLOCK_SKEW_LIMIT:
        return CheckResult(title, False, (f"the agent started {ahead:.0f}s in the future "
                                          f"(more than {CLOCK_SKEW_LIMIT:.0f}s ahead of this host)",), hint)
    return CheckResult(title, True)


def agent_results(replies: AgentReplies, now: float) -> list[CheckResult]:
    """The ✓/✗ results for one agent; after an unreachable one nothing else is judged."""
    if replies.unreachable is not None:
        return [CheckResult("agent is reachable", False, (replies.unreachable,),
                            f"is `pinion agent --admin-addr {replies.agent}` running and "
                            "reachable from here?")]
    metrics, samples = _metrics_check(replies)
    unlabelled = {s.name: s.value for s in samples if not s.labels}
    programs = _programs_check(replies)
    return [CheckResult("agent is reachable", True),
            _status_check(replies, "/live", "the admin endpoint answers but is not live"),
            _status_check(replies, "/ready", "the agent answers 503 until it serves; see its log"),
            metrics,
            _pods_check(replies),
            *([programs] if programs is not None else []),
            clock_check(unlabelled if metrics.ok else None, now),
            *filter(None, [certificates_check(samples, now)])]


# --- this host (--pre) ----------------------------------------------------------------------

def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def _read_mounts() -> str:
    return _read_text("/proc/self/mounts") or ""


def _succeeds(argv: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass(frozen=True)
class CniConfig:
    """Where this host's CNI configs are (k3s or standard) and the primary one, if any."""

    flavour: str
    conf_dir: str
    primary: str | None
    problem: str | None = None


def _cni_config(host_root: Path = Path("/")) -> CniConfig:
    from agent.controlplane.cni_install import detect_layout
    from agent.controlplane.cni_install.layout import scan_conf_dir

    layout = detect_layout(host_root)
    try:
        primary = scan_conf_dir(layout.conf_dir).primary
    except FileNotFoundError:
        return CniConfig(layout.flavour, str(layout.conf_dir), None, "the directory does not exist")
    except OSError as exc:
        return CniConfig(layout.flavour, str(layout.conf_dir), None, str(exc))
    return CniConfig(layout.flavour, str(layout.conf_dir), primary)


@dataclass(frozen=True)
class HostProbes:
    """How --pre looks at this host; tests pass their own."""

    euid: Callable[[], int] = os.geteuid
    which: Callable[[str], str | None] = shutil.which
    mounts: Callable[[], str] = _read_mounts
    read_text: Callable[[str], str | None] = _read_text
    kernel_release: Callable[[], str] = lambda: os.uname().release
    cni_config: Callable[[], CniConfig] = _cni_config
    succeeds: Callable[[Sequence[str]], bool] = _succeeds


HOST_PROBES = HostProbes()


def _kernel_module(probes: HostProbes, module: str) -> str | None:
    """How the kernel has `module`: "loaded", "built in", "a module", or None."""
    loaded = probes.read_text("/proc/modules") or ""
    if any(line.split()[0] == module for line in loaded.splitlines() if line.strip()):
        return "loaded"
    modules = f"/lib/modules/{probes.kernel_release()}"
    for index, how in (("modules.builtin", "built in"), ("modules.dep", "a module")):
        if f"/{module}.ko" in (probes.read_text(f"{modules}/{index}") or ""):
            return how
    return None


def _netfilter(probes: HostProbes) -> CheckResult:
    """Kernel support, seen in the module lists, or else proven by a host tool that works."""
    found = [f"{module} ({how})" for module in ("nf_tables", "ip_tables")
             if (how := _kernel_module(probes, module))]
    if not found:  # no module lists (a kernel without /proc/modules, /lib/modules): ask a tool
        found = [f"`{' '.join(argv)}` works" for argv in NETFILTER_PROBES
                 if probes.which(argv[0]) and probes.succeeds(argv)][:1]
    return CheckResult("nftables or iptables is usable", bool(found), tuple(found),
                       "the agent writes capture rules with nftables or iptables: load nf_tables "
                       "(modprobe nf_tables) or use a kernel that has it")


def _mounted(probes: HostProbes, fstype: str) -> list[str]:
    """Where filesystems of `fstype` are mounted."""
    return [fields[1] for fields in (line.split() for line in probes.mounts().splitlines())
            if len(fields) > 2 and fields[2] == fstype]


def _cgroup2(probes: HostProbes) -> CheckResult:
    where = _mounted(probes, "cgroup2")
    return CheckResult("cgroup v2 is mounted", bool(where), tuple(f"at {path}" for path in where[:1]),
                       "boot with systemd.unified_cgroup_hierarchy=1 (Raspberry Pi OS: append it to "
                       "cmdline.txt); eBPF capture attaches to pods' cgroup v2")


def _memory_cgroup(probes: HostProbes) -> CheckResult:
    """/proc/cgroups ("memory <hierarchy> <cgroups> <enabled>", cgroup v1 and v2 alike), or where
    a kernel has dropped it, the controllers of the cgroup v2 root."""
    rows = [line.split() for line in (probes.read_text("/proc/cgroups") or "").splitlines()]
    memory = [row for row in rows if len(row) >= 4 and row[0] == "memory"]
    if memory:
        enabled = memory[0][3] == "1"
    else:
        roots = _mounted(probes, "cgroup2")[:1]
        enabled = any("memory" in (probes.read_text(f"{root}/cgroup.controllers") or "").split()
                      for root in roots)
    return CheckResult("the memory cgroup controller is enabled", enabled, (),
                       "k3s needs it: on Raspberry Pi OS append `cgroup_memory=1 cgroup_enable=memory` "
                       "to /boot/firmware/cmdline.txt (older: /boot/cmdline.txt) and reboot")


def _bpffs(probes: HostProbes) -> CheckResult:
    mounted = BPFFS in _mounted(probes, "bpf")
    return CheckResult(f"bpffs is mounted at {BPFFS}", mounted, (),
                       f"`mount -t bpf bpf {BPFFS}` (systemd mounts it at boot): the agent pins its "
                       "eBPF programs there; without it `--redirect auto` uses netfilter")


def _cni(probes: HostProbes) -> CheckResult:
    found = probes.cni_config()
    title = f"a primary CNI config in {found.conf_dir} ({found.flavour})"
    detail = (found.primary,) if found.primary else ((found.problem,) if found.problem else ())
    return CheckResult(title, found.primary is not None, detail,
                       "pinion-cni is chained after the node's network plugin: on k3s, flannel writes "
                       "10-flannel.conflist when k3s starts; elsewhere install a CNI network first")


def host_results(probes: HostProbes) -> list[CheckResult]:
    """--pre: what running an agent on this host (a k3s node, or standalone) needs."""
    return [CheckResult("running as root", probes.euid() == 0, (),
                        "run the agent as root: it writes netfilter rules and enters pods' "
                        "network namespaces"),
            _netfilter(probes),
            _cgroup2(probes),
            _memory_cgroup(probes),
            _bpffs(probes),
            _cni(probes)]  # no python3: pinion-cni is a static binary
