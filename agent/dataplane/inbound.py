"""The inbound proxy: connections into a pod, either plaintext ones captured on its 15006
or streams of a mesh tunnel that arrived on its 15008 (handed over by the
`TunnelAcceptor`). Each is decided once (`agent.core.connections`) and, unless refused,
relayed as plain TCP to the pod's own port from inside its netns, with the client's
address as the source the app sees."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from agent.core import connections
from agent.core.multicluster import forwarded_client
from agent.core.telemetry import Telemetry
from agent.core.tunnel_frames import ErrorCode
from agent.dataplane.budget import out_of_budget
from agent.dataplane.context import PodContext
from agent.dataplane.relay import PlainUpstream, Relay, RelaySettings, protocol_factory
from agent.dataplane.sockets import SocketFactory, original_destination
from agent.dataplane.tunnel import TunnelSession
from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)


class InboundProxy:
    """15006 in every captured pod, and the streams its 15008 accepts (`InboundStreams`)."""

    def __init__(self, sockets: SocketFactory, telemetry: Telemetry, metrics: AgentMetrics,
                 settings: RelaySettings, gateways: frozenset[str] = frozenset()) -> None:
        self.telemetry = telemetry
        self._gateways = gateways  # multicluster gateways: they forward callers' identities
        self._settings = settings
        self._metrics = metrics
        self._plain = PlainUpstream(sockets, metrics, settings.connect_timeout)

    def protocol_factory(self, pod: PodContext) -> Callable[[], asyncio.Protocol]:
        return protocol_factory(self, pod, "inbound", self._settings.buffer_high)

    def tunneled(self, pod: PodContext, session: TunnelSession, stream_id: int, port: int,
                 metadata: Mapping[str, str]) -> None:
        """A stream opened on the pod's 15008: relay it to the pod's own `port`."""
        if out_of_budget(pod.relays):  # the agent holds all it may: the client tries again
            self._metrics.proxy_errors.labels("inbound", "over_capacity").inc()
            session.refuse(stream_id, ErrorCode.REFUSED_STREAM)
            return
        forwarded = ""
        if session.peer_id in self._gateways:
            forwarded = forwarded_client(session.peer_id, metadata, self._gateways)
        decision = connections.inbound_stream(port, pod, session.labels, forwarded)
        if isinstance(decision, connections.Refuse):
            self._metrics.proxy_errors.labels("inbound", decision.reason).inc()
            session.refuse(stream_id, ErrorCode.CONNECT_ERROR)
            return
        # Nothing a peer sends waits in our memory acknowledged: the app's socket pauses the
        # stream as soon as it cannot take a chunk whole (the session bounds the rest).
        relay = Relay(self, pod, "inbound", buffer_high=0)
        relay.destination = decision.destination
        relay.source = session.peername  # the client pod's own IP, as the app should see it
        relay.peer_labels = decision.labels
        relay.peer_pod = (metadata.get("namespace", ""), metadata.get("pod", ""),
                          metadata.get("workload_kind", ""), metadata.get("workload_name", ""))
        if not decision.observe:
            relay.observer = None  # declared opaque: relay bytes, parse nothing
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tunnel stream %d from %s (%s) to %s/%s:%d", stream_id, session.peer_id,
                      metadata.get("pod", "?"), pod.namespace, pod.name, port)
        session.attach(stream_id, relay.client)

    def accepted(self, relay: Relay) -> None:
        relay.pod.relays.add(relay)
        destination = relay.destination
        if destination is None:  # captured on 15006, not a tunnel stream: decide it now
            client = relay.client.transport
            assert client is not None
            try:
                destination = original_destination(client.get_extra_info("socket"))
            except OSError:
                destination = None
            decision = connections.inbound_plaintext(destination, relay.pod)
            if isinstance(decision, connections.Refuse):
                self._plain.refuse(relay, decision.reason, decision.detail)
                return
            destination = relay.destination = decision.destination
            relay.source = client.get_extra_info("peername")
            if not decision.observe:
                relay.observer = None
        relay.open_record(relay.peer_labels)
        self._plain.start(relay, destination)

    async def close(self) -> None:
        await self._plain.close()
