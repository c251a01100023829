"""Pod lifecycle on this node: capture (rules + in-pod listeners), keep, release, re-adopt.

Setting a pod up is all-or-nothing: if any step fails, or the pod's netns disappears while
we work, every step already taken is undone and the caller gets a CaptureError."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.core.telemetry import TcpLabels, Telemetry
from agent.dataplane.budget import ConnectionBudget, RelaySet
from agent.dataplane.context import PodContext
from agent.dataplane.inbound import InboundProxy
from agent.dataplane.listening import serve_pod
from agent.dataplane.mesh import Listener, TunnelAcceptor, serve_tunnel
from agent.dataplane.netns import NetNs, NetnsError, NetnsSwitch
from agent.dataplane.outbound import OutboundProxy
from agent.dataplane.redirect import Backend, CgroupBackend, RedirectError, make_backend, routing
from agent.dataplane.redirect.plan import Plan, build_plan
from agent.dataplane.relay import reap_idle
from agent.dataplane.sockets import SocketFactory
from agent.dataplane.tunnel import sync_lanes
from agent.inpod.errors import CNI_CONTAINER_UNKNOWN, CNI_IO_FAILURE, CNI_TRY_AGAIN_LATER, CaptureError
from agent.inpod.keeper import ListenerHold, listener_key
from agent.inpod.state import PodStateStore
from agent.memory import give_back_memory
from agent.model import Pod
from agent.observability.metrics import AgentMetrics

if TYPE_CHECKING:
    from agent.identity.store import IdentityManager

log = logging.getLogger(__name__)
DRAIN_QUIET_SECONDS = 1.0


@dataclass(slots=True)
class CapturedPod:
    pod: Pod
    netns: NetNs
    plan: Plan
    context: PodContext
    servers: list[Listener]
    keys: list[str] = dataclasses.field(default_factory=list)  # its listeners, at the keeper
    # 15001 and 15006: (index in servers, our own duplicate, protocol factory), to stop and
    # start accepting when the connection budget runs out and comes back
    accepting: list[tuple[int, socket.socket, Callable[[], asyncio.Protocol]]] = \
        dataclasses.field(default_factory=list)


class _Waiting:
    """15001/15006 listeners the connection budget closed, watched for what waits in their
    backlogs in one epoll set of our own. While the budget is out that set is not in the
    event loop; once it is back, the set's one fd is, and only a listener with a
    connection waiting is served again. A budget that runs out and comes back many times
    a second (a node at its limit) so costs a create_server per pod with traffic, not one
    per listener of every pod, and no server is re-made for a pod nobody calls."""

    __slots__ = ("_epoll", "_keys", "_on_ready", "armed")

    def __init__(self, on_ready: Callable[[tuple[str, int]], None]) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, tuple[str, int]] = {}  # fd -> (container id, server index)
        self._on_ready = on_ready
        self.armed = False

    def __contains__(self, fd: int) -> bool:
        return fd in self._keys

    def watch(self, fd: int, key: tuple[str, int]) -> None:
        if fd not in self._keys:
            self._epoll.register(fd, select.EPOLLIN)  # level-triggered: a backlog stays ready
            self._keys[fd] = key

    def forget(self, fd: int) -> None:
        if self._keys.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.armed:
            loop.add_reader(self._epoll.fileno(), self._ready)
            self.armed = True

    def disarm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.armed:
            loop.remove_reader(self._epoll.fileno())
            self.armed = False

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0, 64):
            key = self._keys.get(fd)
            if key is not None:
                self.forget(fd)
                self._on_ready(key)


@dataclass(frozen=True, slots=True)
class Proxies:
    """What serves a captured pod's three listeners: 15001, 15006 and 15008 (None: this
    agent has no identities, and 15008 refuses every connection)."""

    outbound: OutboundProxy
    inbound: InboundProxy
    tunnel: TunnelAcceptor | None = None


class PodManager:
    def __init__(self, config: Config, switch: NetnsSwitch, sockets: SocketFactory,
                 backend: Backend, proxies: Proxies, store: PodStateStore,
                 telemetry: Telemetry, metrics: AgentMetrics,
                 identities: IdentityManager | None = None,
                 hold: ListenerHold | None = None,
                 budget: ConnectionBudget | None = None) -> None:
        self._config = config
        self._hold = hold if hold is not None else ListenerHold(None)
        self._budget = budget
        self._accepting = True  # False once draining: the budget never re-opens listeners
        if budget is not None:
            budget.when_exhausted(self._budget_exhausted, self._budget_back)
        self._identities = identities
        self._switch = switch
        self._sockets = sockets
        self._backend = backend
        self._cgroups = backend if isinstance(backend, CgroupBackend) else None
        netfilter = self._cgroups.netfilter if self._cgroups is not None else backend
        self._others = _other_backends(netfilter.name)  # ebpf's inbound rules are netfilter's
        self._proxies = proxies
        self._store = store
        self._telemetry = telemetry
        self._metrics = metrics
        self._pods: dict[str, CapturedPod] = {}
        self._lock = asyncio.Lock()  # one pod change at a time; each takes milliseconds
        self._kernel_seen: dict[str, tuple[int, int, int, int]] = {}  # container id -> counts
        self._tunnels_seen = 0  # tunnel connections at the last sweep
        self._waiting = _Waiting(self._serve_again)  # listeners the budget closed
        if self._cgroups is not None:
            telemetry.on_scrape(self._count_in_kernel)

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def pods(self) -> list[CapturedPod]:
        return list(self._pods.values())

    def captured(self, container_id: str) -> CapturedPod | None:
        return self._pods.get(container_id)

    async def add(self, pod: Pod) -> None:
        async with self._lock:
            current = self._pods.get(pod.container_id)
            if current is not None and current.netns.still_at_path():
                await self._in_netns(current.netns, lambda: self._install(current.plan, current.pod))
                return  # a repeated ADD: rules re-asserted, listeners already up
            for stale in [c for c in self._pods.values() if c.pod.key == pod.key]:
                await self._release(stale)  # an older sandbox of the same pod
            if current is not None:
                await self._release(current)
            self._pods[pod.container_id] = await self._capture(pod)
            self._metrics.meshed_pods.set(len(self._pods))
            log.info("captured pod %s (netns %s, %s)", pod.key, pod.netns_path, self._backend.name)

    async def delete(self, container_id: str) -> bool:
        async with self._lock:
            captured = self._pods.get(container_id)
            if captured is None:
                self._store.delete(container_id)
                return False
            await self._release(captured)
            log.info("released pod %s", captured.pod.key)
            return True

    async def check(self, container_id: str) -> list[str]:
        """What is missing for this pod to be fully captured (empty = all in place)."""
        captured = self._pods.get(container_id)
        if captured is None:
            return [f"pod with container id {container_id} is not captured by this agent"]
        if not captured.netns.still_at_path():
            return [f"network namespace {captured.netns.path} is gone"]
        installed = await self._in_netns(captured.netns, self._backend.installed)
        problems = [f"rule {name} missing" for name in sorted(captured.plan.names() - installed)]
        problems += [f"{what} missing" for what in
                     await self._in_netns(captured.netns, lambda: routing.missing(captured.plan))]
        paused = self._budget is not None and self._budget.exhausted
        watched = {index for index, sock, _ in captured.accepting if sock.fileno() in self._waiting}
        problems += [f"listener {s.sockets[0].getsockname() if s.sockets else '?'} closed"
                     for index, s in enumerate(captured.servers)
                     if not s.is_serving() and not paused and index not in watched]
        return problems

    async def adopt(self) -> None:
        """Re-capture the pods a previous run of the agent had (rules and listeners again;
        the listeners themselves, with what waits in their backlogs, from the keeper)."""
        held = self._hold.start()
        for pod in self._store.load_all():
            try:
                await self.add(pod)
            except CaptureError as exc:
                log.warning("not re-adopting %s: %s", pod.key, exc.msg)
                self._store.delete(pod.container_id)
        unclaimed = self._hold.settle()
        if held:
            log.info("keeper: %d listeners taken back, %d of pods gone meanwhile closed",
                     held - unclaimed, unclaimed)

    async def sweep(self) -> None:
        """Reset relays idle past their pod's timeout; release pods whose netns vanished
        without a CNI DEL (bounded memory)."""
        now = time.monotonic()
        tunnels = sum(len(c.context.tunnels) for c in self._pods.values())
        if tunnels < self._tunnels_seen:
            # tunnel connections ended (a burst's spares reaped, peers gone): each held TLS
            # state and buffers the allocator keeps unless asked to give them back
            give_back_memory()
        self._tunnels_seen = tunnels
        sync_lanes()  # what the tunnel's lanes moved: the relays' activity is current
        for captured in self._pods.values():
            context = captured.context
            if context.relays:
                reset = reap_idle(context.relays, context.idle_timeout, now)
                if reset:
                    give_back_memory()
                    self._metrics.relay_idle_resets.inc(reset)
                    log.info("pod %s: %d connections idle for %.0f s reset", captured.pod.key,
                             reset, context.idle_timeout)
        async with self._lock:
            for captured in [c for c in self._pods.values() if not c.netns.still_at_path()]:
                log.info("pod %s: netns %s is gone; releasing", captured.pod.key,
                         captured.netns.path)
                await self._release(captured)
        self._hold.refresh()

    def stop_accepting(self) -> None:
        """Close our listeners (a keeper's copies keep them listening: what arrives now
        waits for the next agent); connections already accepted go on."""
        self._accepting = False
        self._waiting.disarm(asyncio.get_running_loop())
        for captured in self._pods.values():
            for server in captured.servers:
                server.close()

    def buffered(self) -> tuple[int, int]:
        """Bytes the agent holds for its connections now: (relays: bytes waiting for an
        upstream and in send buffers; tunnels: frames queued and in TLS send buffers). Read
        at scrape time, one pass over the connections."""
        relays = tunnels = 0
        for captured in self._pods.values():
            for relay in captured.context.relays:
                relays += sum(map(len, relay.early))
                for side in (relay.client, relay.upstream):
                    size = getattr(side.transport, "get_write_buffer_size", None)
                    relays += size() if size is not None else 0
            for session in captured.context.tunnels:
                tunnels += session.connection.queued_data
                if session.transport is not None:
                    tunnels += session.transport.get_write_buffer_size()
        return relays, tunnels

    # ------------------------------------------------------------ the connection budget

    def _budget_exhausted(self) -> None:
        """Too many connections open: stop accepting on 15001/15006 (our duplicate keeps
        each listener, and its backlog, alive; `_Waiting` watches it). Tunnel streams into
        this node are refused meanwhile (`agent.dataplane.inbound`); tunnel connections stay
        read, as the streams already open on them need their bytes to finish."""
        self._waiting.disarm(asyncio.get_running_loop())
        for captured in self._pods.values():
            for index, sock, _ in captured.accepting:
                server = captured.servers[index]
                if server.is_serving():
                    server.close()
                    self._waiting.watch(sock.fileno(), (captured.pod.container_id, index))

    def _budget_back(self) -> None:
        if self._accepting:
            self._waiting.arm(asyncio.get_running_loop())

    def _serve_again(self, key: tuple[str, int]) -> None:
        """A closed listener has a connection waiting and the budget is back: serve it."""
        captured = self._pods.get(key[0])
        if captured is not None and self._accepting:
            asyncio.get_running_loop().create_task(self._accept_again(captured, key[1]))

    async def _accept_again(self, captured: CapturedPod, index: int) -> None:
        _, sock, factory = next(entry for entry in captured.accepting if entry[0] == index)
        if self._budget is not None and self._budget.exhausted:
            self._waiting.watch(sock.fileno(), (captured.pod.container_id, index))
            return  # out again meanwhile
        server = await serve_pod(factory, sock.dup())
        if self._pods.get(captured.pod.container_id) is not captured or not self._accepting:
            server.close()  # released (or the agent stopping) meanwhile
            return
        captured.servers[index] = server
        if self._budget is not None and self._budget.exhausted:
            self._budget_exhausted()  # ran out while the server was being made

    async def drain(self, seconds: float, quiet: float = DRAIN_QUIET_SECONDS) -> int:
        """SIGTERM, after `stop_accepting`: let what is in flight finish, for at most
        `seconds`. Each relay ends at its next clean point (HTTP/1: right after the response
        in flight, or now if between requests, as a server closes an idle keep-alive
        connection); tunnel peers are told to open no new streams here (GOAWAY; any they
        open meanwhile are refused, and they move them). Ends once nothing is left, or once
        what is left is quiet: no byte either way for `quiet` seconds and no HTTP/1 request
        in flight (an idle pooled connection, an HTTP/2 or opaque stream between messages:
        they have no clean point to wait for). Returns how many connections it reset."""
        for captured in self._pods.values():
            for relay in list(captured.context.relays):
                relay.drain()
            for session in list(captured.context.tunnels):
                session.go_away()
        loop = asyncio.get_running_loop()
        start = loop.time()
        seen: dict[int, tuple[int, float]] = {}
        while True:
            relays = [r for c in self._pods.values() for r in c.context.relays]
            now = loop.time()
            if not relays or now - start >= seconds:
                break
            busy = False
            for relay in relays:
                activity, since = seen.get(id(relay), (-1, now))
                if activity != relay.activity:
                    seen[id(relay)] = (relay.activity, now)
                    busy = True
                elif now - since < quiet or relay.mid_request():
                    busy = True
            if not busy:
                break
            await asyncio.sleep(0.05)
        for relay in relays:
            relay.abort()
        if relays:
            self._metrics.drain_resets.inc(len(relays))
            log.info("drain: %d connections still open after %.1f s reset", len(relays),
                     loop.time() - start)
        return len(relays)

    async def shutdown(self, cleanup: bool) -> None:
        """Stop serving. Rules stay (pods fail closed until we return) unless cleanup."""
        async with self._lock:
            for captured in list(self._pods.values()):
                await self._release(captured, remove_rules=cleanup, forget=cleanup)
            if self._cgroups is not None:
                self._cgroups.close(cleanup)
            self._hold.forget_all()

    def programs(self, captured: CapturedPod) -> dict[str, Any]:
        """What /pods shows of a pod's eBPF programs (nothing for netfilter backends)."""
        if self._cgroups is None:
            return {}
        return {"programs": self._cgroups.programs(captured.pod)}

    def _count_in_kernel(self) -> None:
        """Fold the eBPF programs' counts of connections the proxy does not terminate
        (excluded ports and CIDRs) into the pods' outbound TCP series, as deltas."""
        assert self._cgroups is not None
        try:
            stats = self._cgroups.stats()
        except OSError as exc:
            log.warning("reading in-kernel TCP counts: %s", exc)
            return
        for container_id, now in stats.items():
            captured = self._pods.get(container_id)
            if captured is None:
                continue
            counts = (now.opened, now.closed, now.read_bytes, now.write_bytes)
            before = self._kernel_seen.get(container_id, (0, 0, 0, 0))
            self._kernel_seen[container_id] = counts
            if counts != before:
                pod = captured.pod
                labels = TcpLabels("outbound", pod.key.namespace, pod.key.name,
                                   owner_kind=pod.owner_kind, owner_name=pod.owner_name)
                self._telemetry.counted_elsewhere(labels, *(a - b for a, b in zip(counts, before,
                                                                                 strict=True)))

    async def _capture(self, pod: Pod) -> CapturedPod:
        try:
            netns = NetNs(pod.netns_path)
        except NetnsError as exc:
            raise CaptureError(CNI_CONTAINER_UNKNOWN, str(exc.strerror)) from None
        capture = pod.capture
        if self._config.probe_sources:
            sources = tuple(dict.fromkeys(capture.probe_sources + self._config.probe_sources))
            capture = dataclasses.replace(capture, probe_sources=sources)
        plan = build_plan(self._config.ports, self._config.proxy_mark, self._config.reply_mark,
                          capture, self._config.tunnel_syn_rate)
        ports = self._config.ports
        context = PodContext(pod.key.namespace, pod.key.name, netns,
                             frozenset((ports.outbound, ports.inbound, ports.tunnel)),
                             frozenset(pod.opaque_ports), ip=pod.ipv4, inbound=pod.inbound,
                             metadata=_tunnel_metadata(pod, self._config.node_name),
                             owner_kind=pod.owner_kind, owner_name=pod.owner_name,
                             idle_timeout=pod.idle_timeout or self._config.relay_idle_timeout_seconds,
                             relays=RelaySet(self._budget))
        captured = CapturedPod(pod, netns, plan, context, [])
        try:
            context.identity = await self._certify(pod)
            await self._in_netns(netns, lambda: self._install(plan, pod))
            await self._listen(captured)
            if not netns.still_at_path():
                raise CaptureError(CNI_CONTAINER_UNKNOWN,
                                   f"pod network namespace {netns.path} vanished during setup")
            self._store.save(pod)
        except BaseException as exc:
            await self._release(captured)
            if isinstance(exc, CaptureError):
                raise
            if isinstance(exc, (OSError, RedirectError, RuntimeError)):
                raise CaptureError(CNI_IO_FAILURE, f"capturing pod {pod.key}: {exc}") from exc
            raise
        self._telemetry.pod_added(pod.key.namespace, pod.key.name, pod.owner_kind, pod.owner_name,
                                  time.time())
        return captured

    async def _certify(self, pod: Pod) -> str | None:
        """The pod's own certificate (key in memory only); None without identities."""
        if self._identities is None:
            return None
        from agent.identity.spiffe import SpiffeId

        identity = SpiffeId(self._identities.trust_domain, pod.key.namespace, pod.service_account)
        try:
            await self._identities.ensure(str(pod.key), identity)
        except Exception as exc:  # the signer's failure: the pod must not start unmeshed
            raise CaptureError(CNI_TRY_AGAIN_LATER, f"pod {pod.key}: no certificate for "
                               f"{identity}: {exc}") from exc
        return str(pod.key)

    def _install(self, plan: Plan, pod: Pod) -> None:
        """In the pod netns: never mix backends; then replace our rules atomically."""
        for other in self._others:
            if other.installed():
                log.warning("removing %s rules left in this netns before using %s",
                            other.name, self._backend.name)
                other.remove()
        routing.ensure(plan)  # replies find their way back before anything is captured
        self._backend.apply(plan)
        if self._cgroups is not None:
            self._cgroups.attach(pod, plan)

    def _uninstall(self, plan: Plan) -> None:
        self._backend.remove()
        routing.remove(plan)

    async def _listen(self, captured: CapturedPod) -> None:
        ports, netns, context = self._config.ports, captured.netns, captured.context
        proxies = self._proxies
        wanted = (("127.0.0.1", ports.outbound, proxies.outbound.protocol_factory(context)),
                  ("0.0.0.0", ports.inbound, proxies.inbound.protocol_factory(context)),
                  ("0.0.0.0", ports.tunnel, None))
        for host, port, factory in wanted:
            key = listener_key(captured.pod.container_id, port)
            sock = self._hold.take(key, netns.inode, port)
            if sock is None:
                try:
                    sock = self._sockets.listener(netns, host, port)
                except OSError as exc:
                    hint = " (is the pod's loopback up?)" if exc.errno == errno.EADDRNOTAVAIL else ""
                    raise CaptureError(CNI_IO_FAILURE, f"pod {captured.pod.key}: cannot listen on "
                                       f"{host}:{port} in its netns: {exc.strerror}{hint}") from None
                self._hold.register(key, sock)
            captured.keys.append(key)
            if factory is None:
                captured.servers.append(await serve_tunnel(proxies.tunnel, context, sock,
                                                           self._metrics))
            else:
                own = sock.dup()
                captured.accepting.append((len(captured.servers), own, factory))
                server = await serve_pod(factory, sock)
                if self._budget is not None and self._budget.exhausted:
                    server.close()  # the budget is out: accepted once it is back
                    self._waiting.watch(own.fileno(), (captured.pod.container_id,
                                                       len(captured.servers)))
                captured.servers.append(server)

    async def _release(self, captured: CapturedPod, remove_rules: bool = True,
                       forget: bool = True) -> None:
        for server in captured.servers:
            server.close()
        for _, sock, _ in captured.accepting:
            self._waiting.forget(sock.fileno())
            sock.close()
        captured.accepting.clear()
        for relay in list(captured.context.relays):
            relay.abort()
        for session in list(captured.context.tunnels):
            session.close()
        if self._identities is not None and captured.context.identity is not None:
            self._identities.forget(captured.context.identity)
        if remove_rules and self._cgroups is not None:
            try:  # programs hang on the cgroup and maps: no netns needed, it may be gone
                await asyncio.to_thread(self._cgroups.detach, captured.pod)
            except (OSError, RuntimeError) as exc:
                log.warning("pod %s: could not detach eBPF programs: %s", captured.pod.key, exc)
        if remove_rules and captured.netns.still_at_path():
            try:
                await self._in_netns(captured.netns, lambda: self._uninstall(captured.plan))
            except (OSError, RuntimeError) as exc:
                log.warning("pod %s: could not remove rules: %s", captured.pod.key, exc)
        captured.netns.close()
        if self._pods.get(captured.pod.container_id) is captured:
            del self._pods[captured.pod.container_id]
            self._metrics.meshed_pods.set(len(self._pods))
        self._kernel_seen.pop(captured.pod.container_id, None)
        if forget:
            self._store.delete(captured.pod.container_id)
            self._hold.release(captured.keys)
        self._telemetry.pod_removed(captured.pod.key.namespace, captured.pod.key.name)

    async def _in_netns(self, netns: NetNs, fn):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._switch.call, netns, fn)


def _other_backends(chosen: str) -> list[Backend]:
    others = []
    for name in ("nftables", "iptables"):
        if name == chosen:
            continue
        try:
            other = make_backend(name)
            if other.count_rules():  # the node uses it: ready it in our own netns, now
                other.prepare()
            others.append(other)
        except (OSError, ImportError, RedirectError, RuntimeError) as exc:
            log.debug("backend %s unavailable for the mixing guard: %s", name, exc)
    return others


def _tunnel_metadata(pod: Pod, node: str) -> dict[str, str]:
    """What each tunnel stream tells the server side about its client pod."""
    metadata = {"namespace": pod.key.namespace, "pod": pod.key.name,
                "service_account": pod.service_account, "node": node}
    if pod.owner_kind:
        metadata.update(workload_kind=pod.owner_kind, workload_name=pod.owner_name)
    return metadata
