"""The proxy's per-connection decisions, one story per row: what a captured connection or a
tunnel stream is (refused under which metric reason, observed or opaque, where it really
goes, by which path), decided from plain data with no socket and no event loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from agent.core import connections
from agent.core.connections import Decision, Forward, Path, Refuse, Route
from agent.core.telemetry import PLAINTEXT, PeerLabels
from agent.model import InboundPolicy

OWN_PORTS = frozenset((15001, 15006, 15008))
WEB = PeerLabels(dst_namespace="shop", dst_pod="web-1")
WEB_VIA_SERVICE = PeerLabels(dst_namespace="shop", dst_pod="web-1", dst_service="web")
DB = PeerLabels(dst_namespace="shop", dst_pod="db-0")
CLIENT = PeerLabels(tls="true", client_id="spiffe://cluster.local/ns/shop/sa/front")
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"


@dataclass(frozen=True)
class Pod:
    own_ports: frozenset[int] = OWN_PORTS
    opaque_ports: frozenset[int] = frozenset()
    identity: str | None = "shop/front-1"
    ip: str | None = "10.42.0.5"
    inbound: InboundPolicy = field(default_factory=InboundPolicy)


class Registry:
    """A router over a fixed table: a Service VIP resolves to its endpoint."""

    ROUTES: ClassVar[dict[tuple[str, int], Route]] = {
        ("10.43.0.10", 80): Route(("10.42.1.7", 8080), WEB_VIA_SERVICE, True, WEB_ID),
        ("10.42.1.7", 8080): Route(("10.42.1.7", 8080), WEB, True, WEB_ID),
        ("10.42.1.9", 5432): Route(("10.42.1.9", 5432), DB, False, ""),
    }

    def route(self, destination: tuple[str, int]) -> Route:
        return self.ROUTES.get(destination, Route(destination, PLAINTEXT, False, ""))


KUBERNETES, STANDALONE = Registry(), None
OPAQUE_81 = Pod(opaque_ports=frozenset({81, 5432}))
NO_IDENTITY = Pod(identity=None)
MESH_ONLY = Pod(inbound=InboundPolicy(mode="mesh-only"))


OUTBOUND = [
    # story, original destination, pod, router, mesh, expected decision (or a refusal reason)
    ("a connection no rule redirected has nowhere to go",
     None, Pod(), STANDALONE, True, "not_redirected"),
    ("an app dialling the proxy's own port would loop",
     ("10.42.0.5", 15001), Pod(), STANDALONE, True, "loop"),
    ("without identities on this agent everything goes as plain TCP",
     ("10.42.1.7", 8080), Pod(), STANDALONE, False, Forward(("10.42.1.7", 8080), Path.PLAIN, True)),
    ("standalone with the mesh: try the destination's 15008, plain TCP if it refuses",
     ("10.42.1.7", 8080), Pod(), STANDALONE, True, Forward(("10.42.1.7", 8080), Path.PROBE, True)),
    ("a pod without a certificate cannot use the tunnel",
     ("10.42.1.7", 8080), NO_IDENTITY, STANDALONE, True, Forward(("10.42.1.7", 8080), Path.PLAIN, True)),
    ("a declared opaque port is relayed without parsing",
     ("10.42.1.7", 81), OPAQUE_81, STANDALONE, True, Forward(("10.42.1.7", 81), Path.PROBE, False)),
    ("a Service VIP becomes its endpoint, a meshed pod that must prove its identity",
     ("10.43.0.10", 80), Pod(), KUBERNETES, True,
     Forward(("10.42.1.7", 8080), Path.TUNNEL, True, WEB_VIA_SERVICE, WEB_ID)),
    ("a meshed pod dialled by IP keeps its dst labels and the identity to prove",
     ("10.42.1.7", 8080), Pod(), KUBERNETES, True,
     Forward(("10.42.1.7", 8080), Path.TUNNEL, True, WEB, WEB_ID)),
    ("an unmeshed pod is plain TCP, never probed, but labelled",
     ("10.42.1.9", 5432), Pod(), KUBERNETES, True, Forward(("10.42.1.9", 5432), Path.PLAIN, True, DB)),
    ("opaque is judged on the port the app dialled, not the endpoint's",
     ("10.42.1.9", 5432), OPAQUE_81, KUBERNETES, True,
     Forward(("10.42.1.9", 5432), Path.PLAIN, False, DB)),
    ("a Service port opaque to the app stays opaque after the VIP is resolved",
     ("10.43.0.10", 80), Pod(opaque_ports=frozenset({80})), KUBERNETES, True,
     Forward(("10.42.1.7", 8080), Path.TUNNEL, False, WEB_VIA_SERVICE, WEB_ID)),
    ("outside the cluster: where it was going, unlabelled, plain",
     ("93.184.216.34", 443), Pod(), KUBERNETES, True,
     Forward(("93.184.216.34", 443), Path.PLAIN, True)),
    ("a meshed destination from a pod without a certificate goes plain",
     ("10.43.0.10", 80), NO_IDENTITY, KUBERNETES, True,
     Forward(("10.42.1.7", 8080), Path.PLAIN, True, WEB_VIA_SERVICE)),
    ("Kubernetes mode without identities: routed and labelled, plain",
     ("10.43.0.10", 80), Pod(), KUBERNETES, False,
     Forward(("10.42.1.7", 8080), Path.PLAIN, True, WEB_VIA_SERVICE)),
]


@pytest.mark.parametrize(("destination", "pod", "router", "mesh", "expected"),
                         [row[1:] for row in OUTBOUND], ids=[row[0] for row in OUTBOUND])
def test_outbound(destination: tuple[str, int] | None, pod: Pod, router: Registry | None,
                  mesh: bool, expected: Decision | str) -> None:
    assert_decision(connections.outbound(destination, pod, router, mesh), expected)


INBOUND_PLAINTEXT = [
    ("a connection no rule redirected is refused", None, Pod(), "not_redirected"),
    ("a connection to the proxy's own port would loop", ("10.42.0.5", 15006), Pod(), "loop"),
    ("a loop is refused as a loop even when the policy is mesh-only",
     ("10.42.0.5", 15008), MESH_ONLY, "loop"),
    ("a mesh-only pod refuses plaintext", ("10.42.0.5", 8080), MESH_ONLY, "policy_plaintext"),
    ("a permissive pod takes plaintext to the port it was sent to",
     ("10.42.0.5", 8080), Pod(), Forward(("10.42.0.5", 8080), Path.PLAIN, True)),
    ("an opaque port is relayed unparsed",
     ("10.42.0.5", 81), OPAQUE_81, Forward(("10.42.0.5", 81), Path.PLAIN, False)),
]


@pytest.mark.parametrize(("destination", "pod", "expected"), [row[1:] for row in INBOUND_PLAINTEXT],
                         ids=[row[0] for row in INBOUND_PLAINTEXT])
def test_inbound_plaintext(destination: tuple[str, int] | None, pod: Pod,
                           expected: Decision | str) -> None:
    assert_decision(connections.inbound_plaintext(destination, pod), expected)


INBOUND_STREAM = [
    ("a stream to the app's port goes to the pod's own IP, labelled with the client's proof",
     8080, Pod(), Forward(("10.42.0.5", 8080), Path.PLAIN, True, CLIENT)),
    ("a mesh-only pod takes streams: they are the mesh",
     8080, MESH_ONLY, Forward(("10.42.0.5", 8080), Path.PLAIN, True, CLIENT)),
    ("a stream to an opaque port is relayed unparsed",
     81, OPAQUE_81, Forward(("10.42.0.5", 81), Path.PLAIN, False, CLIENT)),
    ("a stream to the proxy's own port would loop", 15008, Pod(), "loop"),
    ("a pod without an IP has nowhere to take a stream", 8080, Pod(ip=None), "loop"),
]


@pytest.mark.parametrize(("port", "pod", "expected"), [row[1:] for row in INBOUND_STREAM],
                         ids=[row[0] for row in INBOUND_STREAM])
def test_inbound_stream(port: int, pod: Pod, expected: Decision | str) -> None:
    assert_decision(connections.inbound_stream(port, pod, CLIENT), expected)


def assert_decision(decision: Decision, expected: Decision | str) -> None:
    if isinstance(expected, str):  # a refusal: its reason is the metric label
        assert isinstance(decision, Refuse) and decision.reason == expected and decision.detail
    else:
        assert decision == expected


def test_refusal_reasons_are_the_metric_labels_the_proxies_always_used() -> None:
    """pinion_proxy_errors_total{reason=...}: dashboards and alerts depend on these."""
    assert connections.NOT_REDIRECTED.reason == "not_redirected"
    assert connections.MESH_ONLY.reason == "policy_plaintext"
    loop = connections.outbound(("10.42.0.5", 15008), Pod(), None, True)
    assert loop == Refuse("loop", "original destination 10.42.0.5:15008 is a proxy port")
