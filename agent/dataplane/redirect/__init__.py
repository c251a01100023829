"""Traffic-capture backends: a Plan (rules as data) rendered by iptables or nftables, or
split by ebpf into cgroup programs (outbound) and the node's netfilter backend (inbound)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.dataplane.redirect.plan import Plan

if TYPE_CHECKING:
    from agent.config import Config
    from agent.model import Pod

log = logging.getLogger(__name__)


class RedirectError(RuntimeError):
    pass


class Backend(Protocol):
    """Acts on the calling thread's network namespace."""

    name: str

    def prepare(self) -> None: ...
    def render(self, plan: Plan) -> str: ...
    def apply(self, plan: Plan) -> None: ...
    def remove(self) -> None: ...
    def installed(self) -> set[str]: ...
    def count_rules(self) -> int: ...


@runtime_checkable
class CgroupBackend(Backend, Protocol):
    """A backend that also attaches programs to each pod's cgroup (ebpf)."""

    netfilter: Backend

    def attach(self, pod: Pod, plan: Plan) -> None: ...  # in the pod's netns
    def detach(self, pod: Pod) -> None: ...
    def programs(self, pod: Pod) -> list[dict[str, Any]]: ...
    def stats(self) -> dict[str, Any]: ...  # container id -> in-kernel TcpStats
    def map_bytes(self) -> dict[str, int]: ...  # map -> kernel memory it holds
    def close(self, cleanup: bool) -> None: ...


def make_backend(name: str) -> Backend:
    if name == "nftables":
        from agent.dataplane.redirect.nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables":
        from agent.dataplane.redirect.iptables import IptablesBackend

        return IptablesBackend()
    raise RedirectError(f"unknown redirect backend {name!r}")


def choose_backend(requested: str, config: Config | None = None) -> Backend:
    """`auto` prefers eBPF where the kernel takes our programs (cgroup v2, bpffs, a load of
    the object succeeds); the netfilter side follows the node, as Istio does. If eBPF cannot
    load, `auto` and `ebpf` fall back to netfilter, with one log line saying why."""
    if requested in ("nftables", "iptables"):
        return make_backend(requested)
    if requested not in ("auto", "ebpf"):
        raise RedirectError(f"unknown redirect backend {requested!r}")
    netfilter, why = follow_the_node()
    if config is None:
        log.info("redirect: %s (%s)", netfilter.name, why)
        return netfilter
    try:
        from agent.dataplane.redirect.ebpf import EbpfBackend, EbpfSettings

        backend = EbpfBackend(netfilter, EbpfSettings.from_config(config))
        backend.load()
    except (OSError, ImportError, RedirectError) as exc:
        level = logging.WARNING if requested == "ebpf" else logging.INFO
        log.log(level, "redirect: %s, not ebpf: eBPF capture is unavailable: %s (%s)",
                netfilter.name, exc, why)
        return netfilter
    log.info("redirect: ebpf (outbound: cgroup programs; inbound: %s, %s)", netfilter.name, why)
    return backend


def follow_the_node() -> tuple[Backend, str]:
    """Whichever netfilter backend holds the node's own rules (counted in the calling
    thread's netns, the agent's = the node's); nftables on a tie. Returns it and why."""
    nft = make_backend("nftables")
    nft_rules = nft.count_rules()
    try:
        ipt = make_backend("iptables")
        legacy_rules = ipt.count_rules()
    except (OSError, ImportError, RuntimeError) as exc:
        return nft, f"legacy iptables unavailable: {exc}"
    chosen = ipt if legacy_rules > nft_rules else nft
    return chosen, f"node has {legacy_rules} legacy iptables rules, {nft_rules} nftables rules"
