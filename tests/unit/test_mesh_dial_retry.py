"""A tunnel dial whose handshake the peer cut short (a peer agent's handshake gate refusing a
source's connections beyond its share: one client pod dialling 50 pods of one node at once)
is tried again after a short wait; any other failure is not, and the tries are bounded."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

import pytest

from agent.core.limits import HandshakeLimits
from agent.dataplane.mesh import DIAL_ATTEMPTS, DIALS_PER_POD, MeshClient, MeshSettings, TunnelError


def client_failing_with(reasons: list[str],
                        monkeypatch: pytest.MonkeyPatch) -> tuple[MeshClient, list[float]]:
    none = cast(Any, None)
    client = MeshClient(none, none, none, MeshSettings())
    tries: list[float] = []
    session = object()

    async def dial_once(pod: object, key: tuple[str, str], expected: str, port: int) -> object:
        tries.append(asyncio.get_running_loop().time())
        if len(tries) <= len(reasons):
            raise TunnelError(reasons[len(tries) - 1], f"attempt {len(tries)}: {reasons[len(tries) - 1]}")
        return session

    monkeypatch.setattr(client, "_dial_once", dial_once)
    return client, tries


def dial(client: MeshClient) -> Any:
    return asyncio.run(client._dial(cast(Any, None), ("spiffe://a", "10.42.2.3"), "", 15008))


def test_a_handshake_cut_short_is_tried_again_after_a_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    client, tries = client_failing_with(["tunnel_eof", "tunnel_eof"], monkeypatch)
    assert dial(client) is not None
    assert len(tries) == 3
    # jittered, not at once
    assert all(later - earlier >= 0.015 for earlier, later in itertools.pairwise(tries))


def test_the_tries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    client, tries = client_failing_with(["tunnel_eof"] * 10, monkeypatch)
    with pytest.raises(TunnelError) as raised:
        dial(client)
    assert raised.value.reason == "tunnel_eof" and len(tries) == DIAL_ATTEMPTS


@pytest.mark.parametrize("reason", ["tunnel_refused", "tunnel_timeout", "tunnel_unknown_ca",
                                    "tunnel_unexpected_identity", "tunnel_not_tls"])
def test_other_failures_are_not_tried_again(reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client, tries = client_failing_with([reason], monkeypatch)
    with pytest.raises(TunnelError):
        dial(client)
    assert len(tries) == 1



def test_one_pods_dials_wait_for_a_slot_so_a_peers_gate_never_refuses_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One pod dialling 30 pods of a node at once: at most DIALS_PER_POD are in their
    handshake together (the peer's gate admits HandshakeLimits.per_source), the others wait,
    all get a session; another pod's dials do not wait behind them; nothing is kept after."""
    none = cast(Any, None)
    client = MeshClient(none, none, none, MeshSettings())
    in_flight: dict[str, int] = {"busy": 0, "most": 0}
    other_pod_started: list[int] = []

    async def dial_once(pod: object, key: tuple[str, str], expected: str, port: int) -> object:
        if pod == "other":
            other_pod_started.append(in_flight["busy"])
            return object()
        in_flight["busy"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["busy"])
        await asyncio.sleep(0.01)
        in_flight["busy"] -= 1
        return object()

    monkeypatch.setattr(client, "_dial_once", dial_once)

    async def main() -> list[Any]:
        pod, other = "web", "other"
        dials = [client._dial(cast(Any, pod), ("spiffe://a", f"10.42.2.{n}"), "", 15008)
                 for n in range(30)]
        tasks = [asyncio.ensure_future(dial) for dial in dials]
        await asyncio.sleep(0.002)
        await client._dial(cast(Any, other), ("spiffe://b", "10.42.2.99"), "", 15008)
        return await asyncio.gather(*tasks)

    sessions = asyncio.run(main())
    assert all(session is not None for session in sessions) and len(sessions) == 30
    assert 1 < in_flight["most"] <= DIALS_PER_POD <= HandshakeLimits().per_source // 2
    assert other_pod_started == [DIALS_PER_POD]  # started while web's slots were all taken
    assert client._dial_slots == {}
