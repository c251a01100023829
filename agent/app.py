"""Composition root: build every component from the Config, run them, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import prometheus_client

from agent.config import Config
from agent.controlplane.cni_server import CniServer, replay_pending
from agent.controlplane.state import PodStateStore
from agent.core.telemetry import Telemetry
from agent.dataplane.inpod import PodManager
from agent.dataplane.netns import NetNs, NetnsSwitch
from agent.dataplane.proxy import Proxy
from agent.dataplane.redirect import choose_backend
from agent.dataplane.sockets import SocketFactory
from agent.observability.admin import AdminServer
from agent.observability.metrics import build_registry

log = logging.getLogger("pinion")


async def run_agent(config: Config, cleanup: bool = False) -> int:
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    switch = NetnsSwitch(NetNs.current())
    backend = choose_backend(config.redirect, config)
    backend.prepare()
    telemetry = Telemetry(time.monotonic, config.metrics_grace_seconds)
    registry, metrics = build_registry(telemetry)
    sockets = SocketFactory(switch, config.proxy_mark)
    proxy = Proxy(sockets, telemetry, metrics, config.connect_timeout_seconds,
                  config.write_buffer_high)
    store = PodStateStore(config.state_dir)
    store.prepare()
    identities = _identities(config, proxy, sockets, registry, metrics)
    pods = PodManager(config, switch, sockets, backend, proxy, store, telemetry, metrics, identities)
    admin = AdminServer(config.admin_host, config.admin_port, registry,
                        lambda: _pods_view(pods))
    cni = CniServer(config.cni_socket, pods, metrics)

    await admin.start()
    await pods.adopt()
    await cni.start()
    await replay_pending(config.pending_dir, pods)
    admin.ready = True
    log.info("agent %s serving: admin %s:%d, cni %s, redirect %s, %d pods", config.node_name,
             config.admin_host, config.admin_port, config.cni_socket, backend.name,
             len(pods.pods()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as tasks:
        sweeper = tasks.create_task(_sweep_forever(config, pods, proxy))
        renewer = tasks.create_task(identities.run()) if identities is not None else None
        await stop.wait()
        log.info("draining: %s", "removing all capture rules" if cleanup else
                 "pods stay captured (fail closed) until the agent returns")
        admin.ready = False
        sweeper.cancel()
        if renewer is not None:
            renewer.cancel()
        await cni.close()
        await pods.shutdown(cleanup)
        await proxy.close()
        await admin.close()
    return 0


def _identities(config: Config, proxy: Proxy, sockets: SocketFactory, registry: Any,
                metrics: Any) -> Any:
    """With --identity-dir: per-pod certificates and the mTLS tunnel; else None (plain TCP)."""
    if config.identity_dir is None:
        log.info("identity: none configured (--identity-dir): port 15008 refuses connections "
                 "and node-to-node traffic is plain TCP")
        return None
    from agent.controlplane.identity.setup import standalone_identities
    from agent.dataplane.mesh import MeshClient, MeshSettings, TunnelAcceptor
    from agent.observability.metrics import IdentityCollector

    identities = standalone_identities(config)
    registry.register(IdentityCollector(identities))
    settings = MeshSettings(port=config.ports.tunnel, idle_timeout=config.tunnel_idle_seconds,
                            networks=config.mesh_networks)
    proxy.mesh = MeshClient(sockets, identities, metrics, settings)
    proxy.acceptor = TunnelAcceptor(identities, metrics, settings, proxy)
    return identities


async def _sweep_forever(config: Config, pods: PodManager, proxy: Proxy) -> None:
    while True:
        await asyncio.sleep(config.sweep_interval_seconds)
        try:
            if proxy.mesh is not None:
                proxy.mesh.reap_idle()
            await pods.sweep()
            await replay_pending(config.pending_dir, pods)
        except Exception:  # a sweep must never take the agent down; say why and go on
            log.exception("periodic sweep failed")


def _pods_view(pods: PodManager) -> list[dict[str, Any]]:
    return [{**c.pod.to_json(), "backend": pods.backend_name,
             "listening": all(s.is_serving() for s in c.servers), **pods.programs(c)}
            for c in pods.pods()]
