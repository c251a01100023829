"""`pinion multicluster gateway`: the program a cluster runs so linked clusters reach its
Services (Linkerd's linkerd-gateway). It watches this cluster's pods, namespaces, Services
and EndpointSlices (as an agent does, to resolve a Service to a ready endpoint and know
whether it is meshed), holds one workload certificate of its own, and serves the tunnel port
(`agent.dataplane.gateway`) plus an admin port: /metrics, /ready, /live."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.config import DEFAULT_ISSUER_URL, DEFAULT_TOKEN_FILE, DEFAULT_TRUST_BUNDLE
from agent.controlplane.cluster.objects import project_namespace, project_pod, project_service, project_slice
from agent.controlplane.cluster.state import ClusterState
from agent.controlplane.kube.client import KubeClient
from agent.controlplane.kube.config import KubeConfig
from agent.controlplane.kube.reflector import Reflector
from agent.core import multicluster
from agent.core.connections import Route
from agent.core.limits import HandshakeLimits
from agent.core.telemetry import Telemetry
from agent.dataplane.context import PodContext
from agent.dataplane.gateway import GatewayAcceptor, GatewayCounts, GatewayStreams
from agent.dataplane.mesh import MeshClient, MeshSettings
from agent.dataplane.netns import NetNs, NetnsSwitch
from agent.dataplane.sockets import SocketFactory
from agent.identity.authority import LocalSigner
from agent.identity.files import TRUST_BUNDLE, read_trust_domain
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityManager
from agent.identity.tls import choose_suites
from agent.observability.admin import AdminServer
from agent.observability.exposition import Collector, CounterMetricFamily, GaugeMetricFamily
from agent.observability.metrics import build_registry

log = logging.getLogger("pinion.gateway")
T = TypeVar("T")
GATEWAY_KEY = "gateway"  # the key of the gateway's own certificate in its IdentityManager


@dataclass(frozen=True)
class GatewayConfig:
    listen: tuple[str, int]
    admin: tuple[str, int]
    kubeconfig: str | None  # None: in-cluster
    identity_dir: Path | None  # signs its own certificate; None: from the issuer service
    linked_domains: frozenset[str]
    namespace: str = multicluster.GATEWAY_NAMESPACE
    service_account: str = multicluster.GATEWAY_SERVICE_ACCOUNT
    proxy_mark: int = 0  # its pod is not captured: its sockets need no mark (nor NET_ADMIN)
    max_streams: int = 4096  # streams forwarded at once; beyond, refused (over_capacity)
    issuer_url: str = DEFAULT_ISSUER_URL
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    trust_bundle: Path = Path(DEFAULT_TRUST_BUNDLE)
    trust_domain: str = "cluster.local"


class StateResolver:
    """A target Service to one of its ready endpoints, as an agent resolves its VIP; only
    Services this cluster exports (`exported`, by key) are reachable through the gateway."""

    def __init__(self, state: ClusterState, exported: Mapping[str, object]) -> None:
        self._state = state
        self._exported = exported

    def resolve(self, namespace: str, name: str, port: int) -> Route | None:
        key = f"{namespace}/{name}"
        record = self._state.service(key)
        if key not in self._exported or record is None or not record.cluster_ips or \
                all(p.port != port for p in record.ports):
            return None
        vip = record.cluster_ips[0]
        route = self._state.route((vip, port))
        return None if route.destination == (vip, port) else route  # no ready endpoint


class GatewayCollector(Collector):
    def __init__(self, counts: GatewayCounts, mesh: Callable[[], int], active: Callable[[], int]) -> None:
        self._counts = counts
        self._mesh = mesh
        self._active = active

    def collect(self) -> Iterable[Any]:
        streams = CounterMetricFamily("pinion_gateway_streams", "Streams from linked clusters, by "
                                      "outcome and target Service", labels=["outcome", "target"])
        for (outcome, target), count in sorted(self._counts.streams.items()):
            streams.add_metric([outcome, target], count)
        data = CounterMetricFamily("pinion_gateway_bytes", "Stream bytes through the gateway",
                                   labels=["direction"])
        data.add_metric(["from_linked"], self._counts.bytes_in)
        data.add_metric(["to_linked"], self._counts.bytes_out)
        yield from (streams, data)
        sessions = GaugeMetricFamily("pinion_gateway_tunnels",
                                     "Tunnel connections of the gateway (from linked clusters, to pods)")
        sessions.add_metric([], self._mesh())
        yield sessions
        active = GaugeMetricFamily("pinion_gateway_active_streams", "Streams being forwarded now")
        active.add_metric([], self._active())
        yield active


def gateway_settings(port: int) -> MeshSettings:
    """The tunnel acceptor's limits, for callers behind NAT: a linked site's pods all come from
    its one public address, and replicas of a workload share their identity, so the per-source
    and per-(identity, address) limits an agent's 15008 has would refuse their replicas."""
    return MeshSettings(port=port, max_peer_connections=512, max_peer_connections_node=512,
                        handshakes=HandshakeLimits(connections=1024, per_source=256, tls=64,
                                                   tls_per_source=32, rate=100.0, burst=512.0))


def _identities(config: GatewayConfig) -> IdentityManager:
    """Its certificate from the issuer service (the gateway's own service-account token gets
    the gateway's identity, agent.controlplane.issuer.decisions), or signed by itself with
    an identity dir (standalone labs)."""
    directory = config.identity_dir
    if directory is None:
        from agent.identity.remote import kubernetes_identities

        suites, _ = choose_suites(None)
        return kubernetes_identities(config.issuer_url, None, config.token_file, config.trust_bundle,
                                     config.trust_domain, suites)
    try:
        trust_domain = read_trust_domain(directory)
        signer = LocalSigner.from_dir(directory)
        bundle = (directory / TRUST_BUNDLE).read_bytes()
    except OSError as exc:
        raise SystemExit(f"identity dir {directory}: {exc}") from None
    suites, why = choose_suites(None)
    log.info("gateway identity: trust domain %s, TLS 1.3 suites %s (%s)", trust_domain, suites, why)
    return IdentityManager(signer, bundle, trust_domain, suites)


def _watch(client: KubeClient, path: str, project: Callable[[dict[str, Any]], T | None],
           upsert: Callable[[T], None], delete: Callable[[str], None]) -> Reflector[T]:
    def on_event(kind: str, key: str, old: T | None, new: T | None) -> None:
        if new is None:
            delete(key)
        else:
            upsert(new)
    return Reflector(client, path, project, on_event=on_event)


async def run_gateway(config: GatewayConfig) -> int:
    registry, metrics = build_registry(Telemetry(time.monotonic, 60.0))
    identities = _identities(config)
    identity = SpiffeId(identities.trust_domain, config.namespace, config.service_account)
    await identities.ensure(GATEWAY_KEY, identity)
    netns = NetNs.current()
    sockets = SocketFactory(NetnsSwitch(netns), config.proxy_mark)
    own = PodContext(namespace=config.namespace, name="gateway", netns=netns,
                     own_ports=frozenset({config.listen[1]}), identity=GATEWAY_KEY,
                     metadata={"namespace": config.namespace, "pod": "gateway"})
    state = ClusterState(identities.trust_domain)
    client = KubeClient(KubeConfig.load(config.kubeconfig))
    reflectors: list[Reflector[Any]] = [
        _watch(client, "/api/v1/pods", project_pod, state.upsert_pod, state.delete_pod),
        _watch(client, "/api/v1/namespaces", project_namespace, state.upsert_namespace,
               state.delete_namespace),
        _watch(client, "/api/v1/services", project_service, state.upsert_service, state.delete_service),
        _watch(client, "/apis/discovery.k8s.io/v1/endpointslices", project_slice, state.upsert_slice,
               state.delete_slice)]
    exported = Reflector(client, "/api/v1/services", multicluster.exported)  # what may be reached
    reflectors.append(exported)
    mesh = MeshClient(sockets, identities, metrics, MeshSettings())
    counts = GatewayCounts({})
    streams = GatewayStreams(StateResolver(state, exported.store), mesh, sockets, own, counts,
                             max_streams=config.max_streams)
    acceptor = GatewayAcceptor(identities, metrics, gateway_settings(config.listen[1]), streams,
                               linked_domains=config.linked_domains)
    registry.register(GatewayCollector(counts, lambda: len(own.tunnels), lambda: streams.active))
    admin = AdminServer(config.admin[0], config.admin[1], registry, lambda: [], metrics.admin)
    listener = acceptor.serve(own, sockets.listener(netns, *config.listen))
    await admin.start()
    log.info("gateway %s serving on %s:%d for %s; admin %s:%d", identity, *config.listen,
             ", ".join(sorted(config.linked_domains)), *config.admin)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(r.run()) for r in reflectors]
            background.append(tasks.create_task(identities.run()))
            if config.identity_dir is None:  # the mounted ConfigMap: anchors rotate
                from agent.identity.remote import follow_trust_bundle

                background.append(tasks.create_task(follow_trust_bundle(config.trust_bundle, identities)))
            background.append(tasks.create_task(_reap(mesh)))
            await asyncio.gather(*(r.synced.wait() for r in reflectors))
            admin.ready = True
            await stop.wait()
            admin.ready = False
            for task in background:
                task.cancel()
    finally:
        listener.close()
        mesh.close_all()
        await acceptor.close()
        await streams.close()
        await client.close()
        await admin.close()
    return 0


async def _reap(mesh: MeshClient) -> None:
    while True:
        await asyncio.sleep(10)
        mesh.reap_idle()
