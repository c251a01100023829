"""The proxy's view of a pod: plain data shared by the proxies, the mesh tunnel and pod
lifecycle, so that none of them imports another for it. (A route and the router are
`agent.core.connections`': the per-connection decisions take them.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.core.telemetry import HttpLabels, PeerLabels, TcpLabels
from agent.dataplane.netns import NetNs
from agent.model import InboundPolicy

if TYPE_CHECKING:
    from agent.dataplane.relay import Relay
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
    relays: set[Relay] = field(default_factory=set)
    tunnels: set[TunnelSession] = field(default_factory=set)
    # the label sets of its series, built once per (direction, peer) and not per connection
    series_labels: dict[tuple[str, PeerLabels], tuple[TcpLabels, HttpLabels]] = \
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
