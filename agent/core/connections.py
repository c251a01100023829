"""The proxy's per-connection decisions, sans-IO: whether a connection is refused (and under
which `pinion_proxy_errors_total` reason), whether its bytes are observed (L7) or opaque,
where it really goes (a Service VIP resolved to an endpoint) and by which path.

Data in, a decision out: the asyncio shells (`agent.dataplane.outbound`, `.inbound`) read
the facts off their sockets, call one of these functions once per connection and carry out
what it returns. Nothing here touches a socket, a task or a clock."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Protocol

from agent.core.telemetry import PLAINTEXT, PeerLabels
from agent.model import InboundPolicy


@dataclass(frozen=True, slots=True)
class Route:
    """Where an outbound connection goes, and what its metrics say about the destination."""

    destination: tuple[str, int]
    labels: PeerLabels
    meshed: bool  # the destination is a pod whose agent serves the mesh tunnel
    identity: str  # its SPIFFE ID when meshed ("" otherwise)
    target: str = ""  # a mirrored Service: `destination` is its cluster's gateway, and this
    #                   the Service there (`<namespace>/<name>`) the stream asks for


class Router(Protocol):
    """Where an outbound connection really goes (a Service VIP resolved to an endpoint),
    whether that is a meshed pod and whom it must prove to be, and its dst_* labels."""

    def route(self, destination: tuple[str, int]) -> Route: ...


class PodFacts(Protocol):
    """What the decisions need to know of the pod a connection belongs to."""

    @property
    def own_ports(self) -> frozenset[int]: ...  # the proxy's own listeners in the pod
    @property
    def opaque_ports(self) -> frozenset[int]: ...  # declared opaque: relay bytes, parse nothing
    @property
    def identity(self) -> str | None: ...  # its certificate's key; None: not in the tunnel
    @property
    def ip(self) -> str | None: ...
    @property
    def inbound(self) -> InboundPolicy: ...


class Path(enum.Enum):
    """How the bytes reach the destination."""

    PLAIN = "plain"  # TCP from the pod's netns to the destination
    TUNNEL = "tunnel"  # a stream of a mesh tunnel (a pooled session, else one dialed);
    #                   a failure is refused, never downgraded to plaintext
    PROBE = "probe"  # the tunnel if the destination answers on 15008, else plain TCP


@dataclass(frozen=True, slots=True)
class Refuse:
    """Reset the client: counted under `reason`, logged with `detail`."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay the connection to `destination` by `path`."""

    destination: tuple[str, int]
    path: Path
    observe: bool  # sniff and account HTTP; False: the port is declared opaque
    labels: PeerLabels = PLAINTEXT  # the dst_* labels of its metrics (outbound)
    identity: str = ""  # the SPIFFE ID the tunnel's server must prove ("" = not checked)
    target: str = ""  # through a multicluster gateway: the remote Service (`<ns>/<name>`)
    target_port: int = 0  # and its port (the one the app dialled)


Decision = Refuse | Forward

NOT_REDIRECTED = Refuse("not_redirected", "connection was not redirected to the proxy")
MESH_ONLY = Refuse("policy_plaintext", "plaintext refused: the pod's inbound policy is mesh-only")


def _captured(original_destination: tuple[str, int] | None, pod: PodFacts) -> Refuse | None:
    """A connection a capture rule sent to 15001/15006: refused if it has no original
    destination (it was not redirected) or if that is one of the proxy's own ports."""
    if original_destination is None:
        return NOT_REDIRECTED
    host, port = original_destination
    if port in pod.own_ports:
        return Refuse("loop", f"original destination {host}:{port} is a proxy port")
    return None


def outbound(original_destination: tuple[str, int] | None, pod: PodFacts,
             router: Router | None, mesh: bool) -> Decision:
    """A pod's own connection out, captured on 15001. `router`: Kubernetes mode (Service
    VIPs, what is meshed); `mesh`: this agent speaks the mesh tunnel.

    Opaque is judged on the port the app dialled (a Service port), before routing."""
    refused = _captured(original_destination, pod)
    if refused is not None:
        return refused
    assert original_destination is not None
    observe = original_destination[1] not in pod.opaque_ports
    if router is None:
        path = Path.PROBE if mesh and pod.identity is not None else Path.PLAIN
        return Forward(original_destination, path, observe)
    route = router.route(original_destination)
    if route.target and (not mesh or pod.identity is None):  # a gateway takes mTLS only
        return Refuse("no_identity", f"{route.target} is in another cluster: only a pod with a "
                      "mesh identity reaches it (through its gateway)")
    if mesh and pod.identity is not None and route.meshed:
        return Forward(route.destination, Path.TUNNEL, observe, route.labels, route.identity,
                       route.target, original_destination[1] if route.target else 0)
    return Forward(route.destination, Path.PLAIN, observe, route.labels)


def inbound_plaintext(original_destination: tuple[str, int] | None, pod: PodFacts) -> Decision:
    """A plaintext connection into the pod, captured on 15006: only if its policy allows."""
    refused = _captured(original_destination, pod)
    if refused is not None:
        return refused
    if not pod.inbound.plaintext_allowed:
        return MESH_ONLY
    assert original_destination is not None
    return Forward(original_destination, Path.PLAIN, original_destination[1] not in pod.opaque_ports)


def inbound_stream(port: int, pod: PodFacts, labels: PeerLabels, forwarded: str = "") -> Decision:
    """A tunnel stream to the pod's `port` (arrived on its 15008), from a client whose
    proven identity `labels` carry; never to the proxy's own ports. `forwarded`: the stream
    came through this cluster's multicluster gateway for that caller (another cluster's),
    who is then the client: in the metrics and for the pod's allow-list."""
    if port in pod.own_ports or pod.ip is None:
        return Refuse("loop", f"tunnel stream to the proxy's own port {port}")
    if forwarded:
        if not pod.inbound.admits(forwarded):
            return Refuse("not_allowed", f"{forwarded} (through the gateway) is not in the "
                          "pod's allowed clients")
        labels = dataclasses.replace(labels, client_id=forwarded)
    return Forward((pod.ip, port), Path.PLAIN, port not in pod.opaque_ports, labels)
