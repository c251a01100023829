"""The proxy's view of a pod: plain data shared by the proxies, the mesh tunnel and pod
lifecycle, so that none of them imports another for it. (A route and the router are
`agent.core.connections`': the per-connection decisions take them.)"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from agent.core.tap import TapSwitch
from agent.core.telemetry import MAX_AUTHORITIES, HttpLabels, PeerLabels, TcpLabels
from agent.dataplane.budget import RelaySet
from agent.dataplane.netns import NetNs
from agent.model import InboundPolicy

if TYPE_CHECKING:
    from agent.dataplane.tunnel import TunnelSession


@dataclass(slots=True)
class PodContext:
    """What the proxy needs of a pod: where to make sockets, what to call it in metrics."""

    namespace: str
    name: str
    netns: NetNs
    own_ports: frozenset[int]
    opaque_ports: frozenset[int] = frozenset()
    ip: str | None = None
    identity: str | None = None  # the key of its certificate; None: not in the mesh tunnel
    inbound: InboundPolicy = field(default_factory=InboundPolicy)
    metadata: dict[str, str] = field(default_factory=dict)  # sent with each tunnel stream
    owner_kind: str = ""  # its workload (Kubernetes mode), for deployment="web" labels
    owner_name: str = ""
    idle_timeout: float = 3600.0  # a relay with no byte either way this long is reset
    tap: TapSwitch | None = None  # its tap switch, from the tap hub at its first relay
    # a RelaySet, typed as one: the relay (compiled) calls its own discard, not set's
    relays: RelaySet = field(default_factory=RelaySet)
    tunnels: set[TunnelSession] = field(default_factory=set)
    # the label sets of its series, built once per (direction, peer) and not per connection
    series_labels: dict[tuple[str, PeerLabels], tuple[TcpLabels, HttpLabels]] = \
        field(default_factory=dict)
    # the authority label values this pod's series carry, per direction (at most
    # MAX_AUTHORITIES each: a client cannot mint series by sending new Host headers)
    authorities: dict[str, set[str]] = field(default_factory=dict)
    # and the HTTP label sets that carry one, built once, not per connection (bounded as
    # series_labels is)
    authority_labels: dict[tuple[str, PeerLabels, str], HttpLabels] = \
        field(default_factory=dict)

    def labels(self, direction: str, peer: PeerLabels) -> tuple[TcpLabels, HttpLabels]:
        key = (direction, peer)
        found = self.series_labels.get(key)
        if found is None:
            if len(self.series_labels) >= 32:  # bounded: peers come and go
                self.series_labels.clear()
            owner = self.owner_kind, self.owner_name
            found = self.series_labels[key] = (
                TcpLabels(direction, self.namespace, self.name, peer, owner_kind=owner[0],
                          owner_name=owner[1]),
                HttpLabels(direction, self.namespace, self.name, peer, *owner))
        return found

    def http_labels(self, direction: str, peer: PeerLabels, authority: str) -> HttpLabels:
        """The HTTP series of a connection whose first request named `authority` (already a
        valid label value, or ""); past the per-pod bound it is counted without one."""
        if not authority:
            return self.labels(direction, peer)[1]
        key = (direction, peer, authority)
        found = self.authority_labels.get(key)
        if found is not None:
            return found
        labels = self.labels(direction, peer)[1]
        known = self.authorities.setdefault(direction, set())
        if authority not in known:
            if len(known) >= MAX_AUTHORITIES:
                return labels
            known.add(authority)
        if len(self.authority_labels) >= 64:  # bounded: peers come and go
            self.authority_labels.clear()
        found = self.authority_labels[key] = replace(labels, authority=authority)
        return found
