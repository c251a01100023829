"""The outbound proxy: a pod's own connections out, captured on its 15001.

Each connection is decided once (`agent.core.connections.outbound`) and the decision is
carried out here: refused (counted, reset), relayed as plain TCP from the pod's netns, or
carried as a stream of a mesh tunnel session to the destination pod's agent. The common
meshed case costs no task: a pooled session takes the stream at once; dialing a tunnel or
connecting upstream waits in the relay's own task."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from agent.core import connections
from agent.core.connections import Forward, Path, Router
from agent.core.multicluster import TARGET_KEY
from agent.core.telemetry import PeerLabels, Telemetry
from agent.dataplane.context import PodContext
from agent.dataplane.mesh import MeshClient, TunnelError
from agent.dataplane.relay import PlainUpstream, Relay, RelaySettings, protocol_factory
from agent.dataplane.sockets import SocketFactory, original_destination
from agent.dataplane.tunnel import TunnelSession
from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)
MAX_MOVES = 3  # a refused stream is moved to another tunnel connection at most this often
MOVE_BACKOFF = 0.1  # seconds, times the attempt, before asking a loaded destination again


class OutboundProxy:
    """15001 in every captured pod. `mesh`: this agent has identities and speaks the mesh
    tunnel; `router`: Kubernetes mode (Service VIPs, which pods are meshed, dst_* labels)."""

    def __init__(self, sockets: SocketFactory, telemetry: Telemetry, metrics: AgentMetrics,
                 settings: RelaySettings, mesh: MeshClient | None = None,
                 router: Router | None = None) -> None:
        self.telemetry = telemetry
        self._settings = settings
        self._mesh = mesh
        self._router = router
        self._plain = PlainUpstream(sockets, metrics, settings.connect_timeout)
        self._metrics = metrics
        self._labels_cache: dict[tuple[PeerLabels, str], PeerLabels] = {}

    def protocol_factory(self, pod: PodContext) -> Callable[[], asyncio.Protocol]:
        return protocol_factory(self, pod, "outbound", self._settings.buffer_high)

    def accepted(self, relay: Relay) -> None:
        relay.pod.relays.add(relay)
        client = relay.client.transport
        assert client is not None
        try:
            destination: tuple[str, int] | None = original_destination(client.get_extra_info("socket"))
        except OSError:
            destination = None
        decision = connections.outbound(destination, relay.pod, self._router, self._mesh is not None)
        if isinstance(decision, connections.Refuse):
            self._plain.refuse(relay, decision.reason, decision.detail)
            return
        relay.destination = decision.destination
        relay.peer_labels = decision.labels
        if not decision.observe:
            relay.observer = None  # declared opaque: relay bytes, parse nothing
        path = decision.path
        if path is Path.PLAIN:
            relay.open_record(relay.peer_labels)
            self._plain.start(relay, decision.destination)
            return
        assert self._mesh is not None
        session = self._mesh.pooled(relay.pod, decision.destination[0], decision.identity)
        if session is not None:  # the common meshed case: a stream now, no task
            self._open_stream(relay, session, decision)
            return
        self._plain.spawn(relay, self._dial(relay, decision))

    async def _dial(self, relay: Relay, decision: Forward, pause: float = 0.0) -> None:
        """A tunnel session to the destination; PROBE: plain TCP if it is not meshed. A
        meshed destination that fails is refused, never downgraded."""
        assert self._mesh is not None
        try:
            if pause:
                await asyncio.sleep(pause)
            session = await self._mesh.session_for(  # a gateway listens on its own port
                relay.pod, decision.destination[0], decision.identity,
                decision.destination[1] if decision.target else 0)
        except TunnelError as exc:  # counted as what it was to be: mTLS, never plaintext
            relay.connecting = None
            relay.peer_labels = self._tunnel_labels(decision.labels, decision.identity)
            self._plain.refuse(relay, exc.reason, str(exc))
            return
        except asyncio.CancelledError:
            relay.connecting = None
            relay.abort()
            return
        relay.connecting = None
        if session is not None:
            self._open_stream(relay, session, decision)
            return
        if relay.moves:  # it was in the mesh: never in plaintext now
            self._plain.refuse(relay, "tunnel_refused", f"{decision.destination[0]} no longer "
                               "takes the mesh tunnel: not falling back to plaintext")
            return
        relay.open_record(relay.peer_labels)
        await self._plain.connect(relay, decision.destination)

    def _open_stream(self, relay: Relay, session: TunnelSession, decision: Forward) -> None:
        client = relay.client.transport
        if client is None or client.is_closing():
            relay.finish()
            return
        labels = session.labels
        if decision.path is Path.TUNNEL:  # what the registry knows of the destination, and the proof
            labels = self._tunnel_labels(decision.labels, labels.server_id)
        if relay.record is None:
            relay.open_record(labels)
        if decision.target:  # to another cluster's gateway: the Service there, and its port
            stream = session.open_stream(relay.upstream, decision.target_port,
                                         {**relay.pod.metadata, TARGET_KEY: decision.target})
        else:
            stream = session.open_stream(relay.upstream, decision.destination[1], relay.pod.metadata)
        stream.on_refused = lambda sent: self._move(relay, decision, sent, session)
        if not relay.upstream.write_blocked:
            client.resume_reading()

    def _move(self, relay: Relay, decision: Forward, sent: list[bytes],
              refused_by: TunnelSession) -> bool:
        """The destination's agent refused the stream (it is going away) or its connection
        ended before accepting it: nothing reached the destination, so the same bytes go
        on a new connection (to the agent that takes over; a keeper holds its listener).
        False (the client gets a reset, as before) past `MAX_MOVES` or with no mesh."""
        client = relay.client.transport
        if self._mesh is None or relay.moves >= MAX_MOVES or client is None or client.is_closing():
            return False
        relay.moves += 1
        self._metrics.streams_moved.inc()
        relay.early[:0] = sent  # first, before anything the client sends meanwhile
        relay.upstream.detach()
        relay.upstream.write_blocked = False
        # A server going away (GOAWAY) has a successor: at once. One that is not refused it
        # for load (its connection budget is out): back off before asking again.
        pause = 0.0 if refused_by.connection.going_away else MOVE_BACKOFF * relay.moves
        self._plain.spawn(relay, self._dial(relay, decision, pause))
        return True

    def _tunnel_labels(self, route_labels: PeerLabels, server_id: str) -> PeerLabels:
        """The registry's dst_* labels with the tunnel's proof, built once per (route, server)."""
        key = (route_labels, server_id)
        labels = self._labels_cache.get(key)
        if labels is None:
            if len(self._labels_cache) >= 4096:  # bounded: pods and Services come and go
                self._labels_cache.clear()
            labels = self._labels_cache[key] = dataclasses.replace(route_labels, tls="true",
                                                                   server_id=server_id)
        return labels

    async def close(self) -> None:
        await self._plain.close()
