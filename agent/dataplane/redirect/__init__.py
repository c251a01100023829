"""Traffic-capture backends: a Plan (rules as data) rendered by iptables or nftables."""

from __future__ import annotations

import logging
from typing import Protocol

from agent.dataplane.redirect.plan import Plan

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


def make_backend(name: str) -> Backend:
    if name == "nftables":
        from agent.dataplane.redirect.nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables":
        from agent.dataplane.redirect.iptables import IptablesBackend

        return IptablesBackend()
    if name == "ebpf":
        raise RedirectError("the ebpf redirect backend is not available in this build; "
                            "use --redirect nftables or iptables")
    raise RedirectError(f"unknown redirect backend {name!r}")


def choose_backend(requested: str) -> Backend:
    """`auto` follows the node, as Istio does: whichever backend holds the node's own rules
    (counted in the calling thread's netns, the agent's = the node's). nftables on a tie."""
    if requested != "auto":
        return make_backend(requested)
    nft = make_backend("nftables")
    nft_rules = nft.count_rules()
    try:
        ipt = make_backend("iptables")
        legacy_rules = ipt.count_rules()
    except (OSError, ImportError, RuntimeError) as exc:
        log.info("redirect: nftables (legacy iptables unavailable: %s)", exc)
        return nft
    chosen = ipt if legacy_rules > nft_rules else nft
    log.info("redirect: %s (node has %d legacy iptables rules, %d nftables rules)",
             chosen.name, legacy_rules, nft_rules)
    return chosen
