"""The issuer's bounded listener and rate limit over real loopback sockets (Kubernetes faked): over the
connection cap a socket is reset at once, silent and stalled clients are reset at the handshake
deadline, a legitimate handshake waits for a TLS slot, a source over its rate gets 429 without a
TokenReview, every refusal is counted, and nothing is left behind. The admin port is bounded too."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path

import pytest

from agent.controlplane.issuer.limits import ListenerLimits
from agent.core.limits import RateLimit
from agent.identity.remote import IssuerRefused
from agent.observability.exposition import CollectorRegistry
from tests.unit.test_issuer_decisions import CART
from tests.unit.test_issuer_server import Running, csr_for, identity_dir, insecure_client, raw, serve

__all__ = ["identity_dir"]  # the fixture


def refused(registry: CollectorRegistry, reason: str, listener: str = "issuer") -> float:
    value = registry.get_sample_value("pinion_issuer_connections_refused_total",
                                      {"listener": listener, "reason": reason})
    return value or 0.0


async def silent_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def ended_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True if the server closed or reset the connection within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


def test_over_the_connection_cap_a_socket_is_reset_at_once(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        held = [await silent_connection(issuer.port) for _ in range(3)]
        assert await until(lambda: issuer.server.listener.held == 3, 2)

        reader, writer = await silent_connection(issuer.port)
        assert await ended_by_server(reader, 1.0)
        writer.close()
        assert refused(issuer.registry, "too_many_connections") == 1

        held.pop()[1].close()  # a slot frees: the next agent is served
        assert await until(lambda: issuer.server.listener.held == 2, 2)
        await issuer.signer().sign(csr_for(CART), CART, 3600)
        for _, other in held:
            other.close()

    serve(identity_dir, tmp_path, scenario, limits=ListenerLimits(max_connections=3, max_tls=3))


def test_silent_clients_are_reset_at_the_deadline_and_nothing_is_left(identity_dir: Path,
                                                                      tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        tasks_before = len(asyncio.all_tasks())
        held = [await silent_connection(issuer.port) for _ in range(5)]

        ended = await asyncio.gather(*(ended_by_server(reader, 2.0) for reader, _ in held))

        assert ended == [True] * 5
        assert refused(issuer.registry, "silent") == 5
        assert await until(lambda: issuer.server.listener.held == 0, 1)
        assert len(asyncio.all_tasks()) == tasks_before
        for _, writer in held:
            writer.close()

    serve(identity_dir, tmp_path, scenario, limits=ListenerLimits(handshake_timeout=0.3))


def test_a_client_that_closes_without_a_byte_costs_no_handshake(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        _, writer = await silent_connection(issuer.port)
        writer.close()

        assert await until(lambda: refused(issuer.registry, "silent") == 1, 2)
        assert refused(issuer.registry, "handshake_failed") == 0

    serve(identity_dir, tmp_path, scenario)


def test_a_stalled_handshake_holds_its_tls_slot_only_until_the_deadline(identity_dir: Path,
                                                                        tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        stalled_reader, stalled = await silent_connection(issuer.port)
        stalled.write(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        await asyncio.sleep(0.3)

        started = time.monotonic()
        await issuer.signer().sign(csr_for(CART), CART, 3600)  # waits for the only slot, then gets it

        assert time.monotonic() - started >= 0.5
        assert await ended_by_server(stalled_reader, 0.1)
        assert refused(issuer.registry, "handshake_timeout") == 1
        assert refused(issuer.registry, "too_many_handshakes") == 0
        stalled.close()

    serve(identity_dir, tmp_path, scenario, limits=ListenerLimits(max_tls=1, handshake_timeout=1.0))


def test_a_handshake_that_finds_no_slot_in_time_is_reset_and_counted(identity_dir: Path,
                                                                     tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        # The only TLS slot is held by a finished handshake whose request has not come yet.
        holder_reader, holder = await asyncio.open_connection("127.0.0.1", issuer.port, ssl=insecure_client())
        waiting_reader, waiting = await silent_connection(issuer.port)
        waiting.write(b"\x16\x03\x01")

        assert await ended_by_server(waiting_reader, 2.0)
        assert refused(issuer.registry, "too_many_handshakes") == 1
        assert await ended_by_server(holder_reader, 3.0)
        assert refused(issuer.registry, "read_timeout") == 1
        assert await until(lambda: issuer.server.listener.held == 0, 1)
        holder.close()
        waiting.close()

    serve(identity_dir, tmp_path, scenario,
          limits=ListenerLimits(max_tls=1, handshake_timeout=0.5, read_timeout=1.5))


def test_a_request_that_never_comes_is_reset_at_the_read_deadline(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        started = time.monotonic()

        assert await raw(issuer.port, b"") == b""  # TLS done, then nothing sent

        assert 0.3 <= time.monotonic() - started < 2
        assert refused(issuer.registry, "read_timeout") == 1

    serve(identity_dir, tmp_path, scenario, limits=ListenerLimits(read_timeout=0.3))


def test_a_source_over_its_rate_gets_429_with_retry_after_and_no_token_review(identity_dir: Path,
                                                                              tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        started = time.monotonic()
        for _ in range(2):
            await issuer.signer().sign(csr_for(CART), CART, 3600)

        with pytest.raises(IssuerRefused) as refusal:
            await issuer.signer().sign(csr_for(CART), CART, 3600)
        answer = await raw(issuer.port, b"POST /v1/certificates HTTP/1.1\r\n"
                                        b"Authorization: Bearer agent-n1\r\nContent-Length: 2\r\n\r\n{}")
        # A token comes back in 100 s, less the whole seconds since the first went: exactly 100
        # when the signings take under a second, as natively; under qemu-user they take ~1 s each.
        earliest = 100 - math.floor(time.monotonic() - started)

        assert (refusal.value.status, refusal.value.reason) == (429, "rate_limited")
        assert earliest <= refusal.value.retry_after <= 100  # the agent's backoff honours it
        assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        header = re.search(rb"\r\nRetry-After: (\d+)\r\n", answer)
        assert header is not None and earliest <= int(header.group(1)) <= 100
        assert len(issuer.reviews.asked) == 2
        assert issuer.count("rate_limited") == 2

    serve(identity_dir, tmp_path, scenario, rate=RateLimit(burst=2, per_second=0.01))


async def from_address(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def test_one_address_cannot_take_every_tls_slot(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        stalled = []
        for _ in range(6):  # the first bytes of a ClientHello, then nothing: each wants a slot
            reader, writer = await from_address(issuer.port, "127.0.0.5")
            writer.write(bytes.fromhex("16030102000100"))
            stalled.append((reader, writer))
        await asyncio.sleep(0.3)

        started = time.monotonic()
        await issuer.signer().sign(csr_for(CART), CART, 3600)  # from 127.0.0.1
        assert time.monotonic() - started < 1.0  # not behind the stalled ones' 3 s deadline
        for _, writer in stalled:
            writer.close()

    serve(identity_dir, tmp_path, scenario,
          limits=ListenerLimits(max_tls=4, max_tls_per_source=2, handshake_timeout=3.0))


def test_one_address_holds_at_most_its_share_of_connections(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        held = [await from_address(issuer.port, "127.0.0.6") for _ in range(3)]
        assert await until(lambda: issuer.server.listener.held == 3, 2)
        reader, writer = await from_address(issuer.port, "127.0.0.6")
        assert await ended_by_server(reader, 1.0)
        assert refused(issuer.registry, "too_many_from_source") == 1
        await issuer.signer().sign(csr_for(CART), CART, 3600)  # another address: served
        for _, other in [*held, (reader, writer)]:
            other.close()

    serve(identity_dir, tmp_path, scenario,
          limits=ListenerLimits(max_connections=10, max_tls=4, max_per_source=3))
