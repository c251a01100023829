"""Composition root: build every component from the Config, run them, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.core.compiled import counters_build, loaded_builds, tunnel_build
from agent.core.telemetry import Telemetry
from agent.dataplane.budget import MIN_CONNECTIONS, ConnectionBudget, sized_for
from agent.dataplane.inbound import InboundProxy
from agent.dataplane.mesh import MeshClient, MeshSettings, TunnelAcceptor
from agent.dataplane.netns import NetNs, NetnsSwitch
from agent.dataplane.outbound import OutboundProxy
from agent.dataplane.redirect import CgroupBackend, choose_backend
from agent.dataplane.relay import RelaySettings
from agent.dataplane.sockets import SocketFactory
from agent.dataplane.tls import tls_transport_build
from agent.dataplane.tunnel import sync_lanes
from agent.inpod.cni_server import Admission, CniServer, StandaloneAdmission, replay_pending
from agent.inpod.keeper import ListenerHold
from agent.inpod.manager import PodManager, Proxies
from agent.inpod.state import PodStateStore
from agent.memory import (
    BurstEnd,
    CgroupCpu,
    CgroupMemory,
    give_back_memory,
    resident_bytes,
    settle_for_serving,
)
from agent.observability.admin import AdminServer
from agent.observability.exposition import CollectorRegistry
from agent.observability.metrics import AgentMetrics, EbpfCollector, build_registry
from agent.observability.tap import NodeOrToken, TapAuthorizer, TapCollector, TapEndpoint

if TYPE_CHECKING:
    from agent.controlplane.cluster.state import ClusterState
    from agent.controlplane.cluster.watching import KubernetesMode
    from agent.identity.store import IdentityManager

log = logging.getLogger("pinion")


async def run_agent(config: Config, cleanup: bool = False) -> int:
    switch = NetnsSwitch(NetNs.current())
    backend = choose_backend(config.redirect, config)
    backend.prepare()
    telemetry = Telemetry(time.monotonic, config.metrics_grace_seconds)
    telemetry.on_scrape(sync_lanes)  # bytes the tunnel's lanes moved, counted before a scrape
    registry, metrics = build_registry(telemetry)
    if isinstance(backend, CgroupBackend):
        registry.register(EbpfCollector(backend.map_bytes))
    sockets = SocketFactory(switch, config.proxy_mark)

    def damaged(store: str) -> None:  # a state file set aside at start
        metrics.state_damaged.labels(store).inc()

    store = PodStateStore(config.state_dir, on_damaged=damaged)
    store.prepare()
    identities = _identities(config, registry)
    mesh_settings = MeshSettings(port=config.ports.tunnel, idle_timeout=config.tunnel_idle_seconds,
                                 networks=config.mesh_networks,
                                 gateways=frozenset(config.gateway_identities))
    mesh = MeshClient(sockets, identities, metrics, mesh_settings) if identities is not None else None
    state = _cluster_state(config, identities)
    relay = RelaySettings(config.connect_timeout_seconds, config.write_buffer_high)
    outbound = OutboundProxy(sockets, telemetry, metrics, relay, mesh=mesh, router=state)
    inbound = InboundProxy(sockets, telemetry, metrics, relay, mesh_settings.gateways)
    acceptor = None
    if identities is not None:  # the acceptor hands each stream it accepts to `inbound`
        acceptor = TunnelAcceptor(identities, metrics, mesh_settings, inbound)
        _gauge_handshakes(acceptor, metrics)
    hold = ListenerHold(config.keeper_socket)
    memory = CgroupMemory()
    budget = ConnectionBudget(config.max_connections or sized_for(memory.limit, memory.usage()))
    log.info("connection budget: %d%s", budget.limit, "" if config.max_connections else
             f" (memory limit {memory.limit // 2**20} MiB)" if memory.limit else "")
    budget.when_exhausted(metrics.budget_pauses.inc, lambda: None)
    metrics.accepting.set_function(lambda: 0.0 if budget.exhausted else 1.0)
    metrics.budget.labels("limit").set_function(lambda: budget.allowed)
    metrics.budget.labels("paced").set_function(lambda: budget.paced)
    metrics.budget.labels("ceiling").set_function(lambda: budget.ceiling)
    metrics.budget.labels("open").set_function(lambda: budget.live)
    pods = PodManager(config, switch, sockets, backend, Proxies(outbound, inbound, acceptor),
                      store, telemetry, metrics, identities, hold, budget)
    cluster = _kubernetes(config, pods, state, damaged)
    admission: Admission = cluster.admission if cluster is not None else StandaloneAdmission(pods)
    tap = _tap_endpoint(config, telemetry)
    registry.register(TapCollector(tap))
    admin = AdminServer(config.admin_host, config.admin_port, registry,
                        lambda: _pods_view(pods), metrics.admin, tap=tap)
    cni = CniServer(config.cni_socket, pods, metrics, admission)

    await admin.start()
    await pods.adopt()
    if cluster is not None:
        cluster.admission.load()
    await cni.start()
    await replay_pending(config.pending_dir, admission)
    admin.ready = cluster is None  # in Kubernetes mode: once this node's pods are listed
    log.info("agent %s serving: admin %s:%d, cni %s, redirect %s, %d pods", config.node_name,
             config.admin_host, config.admin_port, config.cni_socket, backend.name,
             len(pods.pods()))
    log.info("tunnel framing: %s", tunnel_build())  # the mypyc build, or Python (agent.core.compiled)
    log.info("counters: %s", counters_build())
    log.info("relay and tunnel shell: %s", loaded_builds().get("agent.dataplane.relay"))
    log.info("tunnel TLS records: %s", tls_transport_build())
    settle_for_serving()  # start-up's objects out of the collector's way
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as tasks:
        # without a memory limit there is no memory watch: the sweep sees a burst end instead
        unwatched = budget if memory.limit is None else None
        background = [tasks.create_task(_sweep_forever(config, pods, mesh, admission, unwatched))]
        if identities is not None:
            background.append(tasks.create_task(identities.run()))
        if identities is not None and config.identity_dir is None:  # the issuer's mounted bundle
            from agent.identity.remote import follow_trust_bundle

            background.append(tasks.create_task(follow_trust_bundle(config.trust_bundle, identities)))
        metrics.memory.labels("cgroup_limit").set(memory.limit or 0)
        metrics.memory.labels("cgroup_usage").set_function(memory.usage)
        metrics.memory.labels("rss").set_function(resident_bytes)
        def count_buffers() -> None:  # one pass over the connections per scrape
            relays, tunnels = pods.buffered()
            metrics.memory.labels("relay_buffers").set(relays)
            metrics.memory.labels("tunnel_buffers").set(tunnels)

        telemetry.on_scrape(count_buffers)
        if memory.limit is not None:
            background.append(tasks.create_task(_watch_memory(memory, memory.limit, budget,
                                                                  CgroupCpu())))
        if cluster is not None:
            background.append(tasks.create_task(cluster.run()))
            background.append(tasks.create_task(_ready_when_synced(cluster, admin)))
        await stop.wait()
        log.info("draining: %s", "removing all capture rules" if cleanup else
                 "pods stay captured until the agent returns: " +
                 ("new connections wait at the keeper" if hold.connected else "fail closed"))
        admin.ready = False
        for task in background:
            task.cancel()
        if cluster is not None:
            await cluster.close()
        await cni.close()
        pods.stop_accepting()
        await pods.drain(config.drain_seconds)
        await pods.shutdown(cleanup)
        if mesh is not None:
            mesh.close_all()
        if acceptor is not None:
            await acceptor.close()
        await outbound.close()
        await inbound.close()
        await admin.close()
    return 0


def _identities(config: Config, registry: CollectorRegistry) -> IdentityManager | None:
    """Per-pod certificates for the mTLS tunnel: signed by this agent with --identity-dir,
    by the issuer service in Kubernetes mode; else None (plain TCP)."""
    if config.identity_dir is None and config.kubernetes is None:
        log.info("identity: none configured (--identity-dir): port 15008 refuses connections "
                 "and node-to-node traffic is plain TCP")
        return None
    from agent.identity.setup import standalone_identities
    from agent.observability.metrics import IdentityCollector

    if config.identity_dir is not None:
        identities = standalone_identities(config)
    else:
        from agent.identity.setup import issuer_identities

        identities = issuer_identities(config)
    registry.register(IdentityCollector(identities))
    return identities


def _tap_endpoint(config: Config, telemetry: Telemetry) -> TapEndpoint:
    """Who may tap: Kubernetes RBAC in Kubernetes mode, else this node or the token holder."""
    telemetry.tap.max_taps = config.max_taps
    authorizer: TapAuthorizer
    if config.kubernetes is not None:
        from agent.controlplane.kube.tapauth import kube_tap_authorizer

        authorizer = kube_tap_authorizer(config.kubernetes)
    else:
        token = None
        if config.tap_token_file is not None:
            token = config.tap_token_file.read_text().strip() or None
            if token is None:
                raise ValueError(f"--tap-token-file {config.tap_token_file} is empty")
        authorizer = NodeOrToken(token)
    return TapEndpoint(telemetry.tap, authorizer)


def _gauge_handshakes(acceptor: TunnelAcceptor, metrics: AgentMetrics) -> None:
    gate = acceptor.gate
    metrics.handshakes_in_progress.labels("waiting").set_function(lambda: gate.pending - gate.tls)
    metrics.handshakes_in_progress.labels("tls").set_function(lambda: gate.tls)


def _cluster_state(config: Config, identities: IdentityManager | None) -> ClusterState | None:
    """Kubernetes mode: what the watches know of the cluster, by which the outbound proxy
    routes Service VIPs and knows meshed pods; else None."""
    if config.kubernetes is None:
        return None
    from agent.controlplane.cluster.state import ClusterState

    return ClusterState(identities.trust_domain if identities is not None else config.trust_domain)


def _kubernetes(config: Config, pods: PodManager, state: ClusterState | None,
                damaged: Callable[[str], None]) -> KubernetesMode | None:
    """Kubernetes mode: watches decide who is meshed and feed `state`; else None."""
    if config.kubernetes is None or state is None:
        return None
    from agent.controlplane.cluster.watching import KubernetesMode

    cluster = KubernetesMode(config, pods, state, damaged)
    log.info("kubernetes mode: %s, node %s", config.kubernetes, config.node_name)
    return cluster


async def _ready_when_synced(cluster: KubernetesMode, admin: AdminServer) -> None:
    await cluster.admission.synced.wait()
    admin.ready = True


async def _sweep_forever(config: Config, pods: PodManager, mesh: MeshClient | None,
                         admission: Admission, budget: ConnectionBudget | None = None) -> None:
    """`budget`: also give back what a burst of its connections left once it is over (an agent
    without a memory limit, which `_watch_memory` does not watch; seen at each sweep)."""
    burst = BurstEnd(MIN_CONNECTIONS)
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.sweep_interval_seconds)
        if budget is not None and burst.over(budget.live, loop.time()):
            give_back_memory(full=True)
        try:
            if mesh is not None:
                mesh.reap_idle()
            await pods.sweep()
            await admission.sweep()
            await replay_pending(config.pending_dir, admission)
        except Exception:  # a sweep must never take the agent down; say why and go on
            log.exception("periodic sweep failed")


async def _watch_memory(memory: CgroupMemory, limit: int, budget: ConnectionBudget,
                        cpu: CgroupCpu | None = None, high: float = 0.8, low: float = 0.7,
                        every: float = 0.1) -> None:
    """Memory pressure is backpressure too. With the cgroup 80 % full (after giving back what
    can be), the agent stops taking new connections (`ConnectionBudget`) and lowers its
    budget to what fit, less a fifth; under 70 % it takes them again, and every 5 s with room
    the budget grows by a tenth back towards where it started. What a connection costs
    (heap, and kernel memory a v1 cgroup also charges) is learnt, not assumed; far cheaper
    than the OOM killer, which takes every connection of the node with it. A CPU that
    cannot keep up (the loop running late) lowers the budget the same way
    (`ConnectionBudget.loop_lag`), and a cpu cgroup out of its quota paces it
    (`ConnectionBudget.cpu_throttled`). And once a burst of connections is over, what it left
    is collected and given back."""
    burst = BurstEnd(MIN_CONNECTIONS)
    calm_since = 0.0
    loop = asyncio.get_running_loop()
    due = loop.time() + every
    throttled = cpu.throttled() if cpu is not None else 0
    while True:
        await asyncio.sleep(every)
        now = loop.time()
        if cpu is not None and (seen := cpu.throttled()) != throttled:
            throttled = seen
            budget.cpu_throttled(now)
        budget.loop_lag(now - due, now)
        due = now + every
        if burst.over(budget.live, now):
            give_back_memory(full=True)
        used = memory.usage() / limit
        if used >= high or budget.cpu_busy:
            calm_since = now
        if used >= high:
            if not budget.pressure:
                give_back_memory()
                if memory.usage() / limit >= high:
                    budget.shrink()
                    budget.under_pressure(True)
        elif used < low:
            if budget.pressure:
                budget.under_pressure(False)
            elif now - calm_since >= 5.0 and budget.limit < budget.ceiling:
                budget.grow()
                calm_since = now
        elif budget.pressure and budget.live == 0:
            # nothing open to wait for: what stays is the heap's own (refusing gains nothing)
            give_back_memory()
            budget.under_pressure(False)


def _pods_view(pods: PodManager) -> list[dict[str, Any]]:
    return [{**c.pod.to_json(), "backend": pods.backend_name,
             "listening": all(s.is_serving() for s in c.servers), **pods.programs(c)}
            for c in pods.pods()]
