"""The Kubernetes client: kubeconfig and in-cluster loading, HTTP/1.1 framing, and requests and
watches against the in-test API server (tests/support/kubeapi.py) over TLS on loopback.

Where a behaviour needs a server that misbehaves on purpose (closes keep-alive connections, never
answers, sends an over-long event), a few lines of raw asyncio server stand in for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from agent.controlplane.kube import client as client_module
from agent.controlplane.kube.client import ApiError, Gone, KubeClient, KubeConfig, KubeConfigError
from agent.controlplane.kube.http1 import BodyReader, LineSplitter, LineTooLong, ProtocolError, parse_head
from tests.support.kubeapi import FakeApiServer

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def pod(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "podIP": "10.42.0.7"}}


@pytest.fixture
def server(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    api = FakeApiServer(directory=tmp_path / "api", bookmark_interval=0.2).start()
    yield api
    api.stop()


def client_for(server: FakeApiServer, **overrides: Any) -> KubeClient:
    config = KubeConfig.load(str(server.kubeconfig))
    if overrides:
        config = KubeConfig(**{**config.__dict__, **overrides})
    return KubeClient(config, timeout=5.0)


async def with_client(server: FakeApiServer, use: Callable[[KubeClient], Awaitable[T]],
                      **overrides: Any) -> T:
    kube = client_for(server, **overrides)
    try:
        return await use(kube)
    finally:
        await kube.close()


async def collect(events: AsyncIterator[dict[str, Any]], until: Callable[[list[dict[str, Any]]], bool],
                  ) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with contextlib.aclosing(events):
        async for event in events:
            seen.append(event)
            if until(seen):
                break
    return seen


# --- configuration ---------------------------------------------------------------------------------

def test_a_json_kubeconfig_gives_server_ca_token_and_namespace(server: FakeApiServer) -> None:
    config = KubeConfig.load(str(server.kubeconfig))
    assert config.server == server.url
    assert config.ca_pem == server.ca_pem
    assert config.token == server.token
    assert config.namespace == "default"
    assert server.token not in repr(config)


def test_a_yaml_kubeconfig_with_relative_files_and_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA PEM")
    (tmp_path / "token").write_text("secret\n")
    document = {
        "apiVersion": "v1", "kind": "Config", "current-context": "pi",
        "clusters": [{"name": "k3s", "cluster": {"server": "https://10.0.0.1:6443/",
                                                 "certificate-authority": "ca.crt",
                                                 "tls-server-name": "kubernetes"}}],
        "users": [{"name": "agent", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "pi", "context": {"cluster": "k3s", "user": "agent", "namespace": "shop"}}],
    }
    (tmp_path / "k3s.yaml").write_text(yaml.safe_dump(document))
    config = KubeConfig.load(str(tmp_path / "k3s.yaml"))
    assert (config.server, config.ca_pem, config.token_file) == ("https://10.0.0.1:6443", b"CA PEM",
                                                                   str(tmp_path / "token"))
    assert (config.namespace, config.tls_server_name, config.insecure) == ("shop", "kubernetes", False)


def test_in_cluster_reads_the_service_account_directory(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t0")
    (tmp_path / "ca.crt").write_bytes(b"CA")
    (tmp_path / "namespace").write_text("pinion-system")
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert KubeConfig.in_cluster_available(environ, str(tmp_path))
    config = KubeConfig.load(None, environ=environ, service_account_dir=str(tmp_path))
    assert config == KubeConfig(server="https://[fd00::1]:443", ca_pem=b"CA",
                                token_file=str(tmp_path / "token"), namespace="pinion-system")
    assert not KubeConfig.in_cluster_available({}, str(tmp_path))
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubeConfig.load(None, environ={}, service_account_dir=str(tmp_path))


@pytest.mark.parametrize(("document", "reason"), [
    ({"clusters": []}, "current-context is not set"),
    ({"current-context": "x", "contexts": []}, "no context named 'x'"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
      "clusters": [{"name": "c", "cluster": {"server": "https://h:1"}}],
      "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}]}, "'exec', which is not supported"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c"}}],
      "clusters": [{"name": "c", "cluster": {"server": "https://h:1", "certificate-authority-data": "%%"}}]},
     "not valid base64"),
])
def test_kubeconfig_errors_are_one_line(tmp_path: Path, document: dict[str, Any], reason: str) -> None:
    path = tmp_path / "config"
    path.write_text(json.dumps(document))
    with pytest.raises(KubeConfigError, match=reason) as raised:
        KubeConfig.load(str(path))
    assert "\n" not in str(raised.value)
    with pytest.raises(KubeConfigError, match="cannot read kubeconfig"):
        KubeConfig.load(str(tmp_path / "missing"))


# --- framing (no sockets) ----------------------------------------------------------------------------

def test_lines_are_split_across_pieces_and_bounded() -> None:
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b':1}\n{"b":2}\n{') == [b'{"a":1}', b'{"b":2}']
    assert splitter.finish() == b"{"
    with pytest.raises(LineTooLong):
        splitter.feed(b"0123456789A")
    with pytest.raises(LineTooLong):
        for piece in (b"01234", b"567890"):  # the second piece makes the line too long
            splitter.feed(piece)
    assert splitter.feed(b"ok\n") == [b"ok"]  # nothing of the long line was kept


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def body_of(raw: bytes) -> bytes:
    head_end = raw.index(b"\r\n\r\n") + 4
    reader = feed(raw[head_end:])
    return await BodyReader(reader, parse_head(raw[:head_end]), max_piece=1024).read_all(4096)


def test_chunked_and_counted_bodies_are_decoded() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\n")
    assert run(body_of(chunked)) == b"hello!"
    counted = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef"
    assert run(body_of(counted)) == b"abc"
    closing = b"HTTP/1.0 200 OK\r\n\r\nuntil the end"
    assert run(body_of(closing)) == b"until the end"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",  # cut inside a chunk
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not hex
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n",  # over the piece bound
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # short
])
def test_broken_bodies_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        run(body_of(raw))


# --- requests ----------------------------------------------------------------------------------------

def test_get_list_create_patch_replace_delete(server: FakeApiServer) -> None:
    async def scenario(kube: KubeClient) -> None:
        created = await kube.request("POST", "/api/v1/namespaces/default/pods", body=pod("web", app="shop"))
        assert created["metadata"]["uid"] and created["status"]["podIP"] == "10.42.0.7"
        listing = await kube.request("GET", "/api/v1/pods", params={"labelSelector": "app=shop"})
        assert [item["metadata"]["name"] for item in listing["items"]] == ["web"]
        patched = await kube.request("PATCH", "/api/v1/namespaces/default/pods/web",
                                     body={"metadata": {"labels": {"tier": "front", "app": None}}},
                                     content_type="application/merge-patch+json")
        assert patched["metadata"]["labels"] == {"tier": "front"}
        patched["metadata"]["annotations"] = {"note": "replaced"}
        replaced = await kube.request("PUT", "/api/v1/namespaces/default/pods/web", body=patched)
        assert replaced["metadata"]["annotations"] == {"note": "replaced"}
        assert int(replaced["metadata"]["resourceVersion"]) > int(patched["metadata"]["resourceVersion"])
        await kube.request("DELETE", "/api/v1/namespaces/default/pods/web")
        with pytest.raises(ApiError) as missing:
            await kube.request("GET", "/api/v1/namespaces/default/pods/web")
        assert (missing.value.status, missing.value.reason) == (404, "NotFound")
        assert missing.value.message == 'pods "web" not found'

    run(with_client(server, scenario))


def test_refusals_carry_the_status_reason(server: FakeApiServer) -> None:
    server.apply(pod("web"))

    async def scenario(kube: KubeClient) -> None:
        with pytest.raises(ApiError) as exists:
            await kube.request("POST", "/api/v1/namespaces/default/pods", body=pod("web"))
        assert (exists.value.status, exists.value.reason) == (409, "AlreadyExists")
        stale = pod("web")
        stale["metadata"]["resourceVersion"] = "1"
        with pytest.raises(ApiError) as conflict:
            await kube.request("PUT", "/api/v1/namespaces/default/pods/web", body=stale)
        assert conflict.value.reason == "Conflict"

    run(with_client(server, scenario))
    with pytest.raises(ApiError) as unauthorized:
        run(with_client(server, lambda kube: kube.request("GET", "/api/v1/pods"), token="wrong"))
    assert (unauthorized.value.status, unauthorized.value.reason) == (401, "Unauthorized")


def test_plain_requests_share_keep_alive_connections(server: FakeApiServer) -> None:
    async def scenario(kube: KubeClient) -> None:
        for _ in range(5):
            await kube.request("GET", "/api/v1/namespaces")
        await asyncio.gather(*(kube.request("GET", "/api/v1/pods") for _ in range(3)))

    run(with_client(server, scenario))
    assert server.connections_accepted <= 3


def test_a_client_certificate_authenticates(server: FakeApiServer) -> None:
    cert, key = server.client_certificate("node-a", groups=("system:nodes",))
    listing = run(with_client(server, lambda kube: kube.request("GET", "/api/v1/namespaces"),
                              token=None, client_cert_pem=cert, client_key_pem=key))
    assert "default" in [item["metadata"]["name"] for item in listing["items"]]


def test_a_rotated_token_file_is_read_again(server: FakeApiServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-yet-valid")
    server.add_token("rotated", username="system:serviceaccount:pinion-system:pinion-agent")

    async def scenario(kube: KubeClient) -> None:
        with pytest.raises(ApiError, match="401"):
            await kube.request("GET", "/api/v1/pods")
        (tmp_path / "token.new").write_text("rotated\n")
        os.replace(tmp_path / "token.new", token_file)  # how the kubelet swaps projected tokens
        await kube.request("GET", "/api/v1/pods")

    run(with_client(server, scenario, token=None, token_file=str(token_file)))


def test_the_server_is_verified_against_the_ca(server: FakeApiServer) -> None:
    other = FakeApiServer(directory=server.directory.parent / "other")
    other.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            run(with_client(server, lambda kube: kube.request("GET", "/version"), ca_pem=other.ca_pem))
        run(with_client(server, lambda kube: kube.request("GET", "/version"), ca_pem=None, insecure=True))
    finally:
        other.stop()


async def serve_raw(respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                    ) -> tuple[asyncio.Server, KubeClient]:
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"), timeout=1.0)


def test_a_pooled_connection_the_server_closed_is_retried_on_a_new_one() -> None:
    accepted = 0

    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def scenario() -> None:
        raw, kube = await serve_raw(one_answer_then_close)
        async with raw:
            assert await kube.request("GET", "/a") == {}
            await asyncio.sleep(0.1)  # the server has closed the pooled connection by now
            assert await kube.request("GET", "/b") == {}
            await kube.close()

    run(scenario())
    assert accepted == 2


def test_a_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def scenario() -> None:
        raw, kube = await serve_raw(silent)
        async with raw:
            with pytest.raises(TimeoutError):
                await kube.request("GET", "/api/v1/pods")
            await kube.close()

    run(scenario())


# --- watches -----------------------------------------------------------------------------------------

def test_watch_from_a_resource_version_sees_later_changes_and_bookmarks(server: FakeApiServer) -> None:
    server.apply(pod("before"))

    async def scenario(kube: KubeClient) -> list[dict[str, Any]]:
        listing = await kube.request("GET", "/api/v1/pods")
        await asyncio.to_thread(server.apply, pod("after"))
        await asyncio.to_thread(server.delete, "v1", "Pod", "default", "before")
        events = kube.watch("/api/v1/pods", {"resourceVersion": listing["metadata"]["resourceVersion"],
                                             "allowWatchBookmarks": "true"})
        return await collect(events, lambda seen: seen[-1]["type"] == "BOOKMARK")

    events = run(with_client(server, scenario))
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "after"), ("DELETED", "before"), ("BOOKMARK", None)]
    assert events[-1]["object"]["metadata"]["resourceVersion"] == str(server.resource_version)


def test_a_watch_ends_when_the_server_ends_the_stream(server: FakeApiServer) -> None:
    async def scenario(kube: KubeClient) -> list[dict[str, Any]]:
        events = kube.watch("/api/v1/namespaces", {"resourceVersion": "0", "timeoutSeconds": "1"})
        return [event async for event in events]

    events = run(with_client(server, scenario))
    assert {e["object"]["metadata"]["name"] for e in events} >= {"default", "kube-system"}


def test_watching_from_a_compacted_resource_version_raises_gone(server: FakeApiServer) -> None:
    server.apply(pod("a"))
    old = str(server.resource_version - 1)
    server.compact()

    async def scenario(kube: KubeClient) -> None:
        with pytest.raises(Gone) as gone:
            await collect(kube.watch("/api/v1/pods", {"resourceVersion": old}), lambda seen: False)
        assert (gone.value.status, gone.value.reason) == (410, "Expired")

    run(with_client(server, scenario))


def test_a_dropped_watch_stream_is_a_connection_error(server: FakeApiServer) -> None:
    async def scenario(kube: KubeClient) -> None:
        events = kube.watch("/api/v1/namespaces", {"resourceVersion": "0"})
        with pytest.raises(ConnectionError):
            async with contextlib.aclosing(events):
                async for _ in events:
                    await asyncio.to_thread(server.drop_watches)

    run(with_client(server, scenario))


def test_close_ends_a_running_watch(server: FakeApiServer) -> None:
    async def scenario() -> None:
        kube = client_for(server)
        events = kube.watch("/api/v1/pods", {"resourceVersion": str(server.resource_version)})
        waiting = asyncio.create_task(collect(events, lambda seen: False))
        await asyncio.sleep(0.2)
        await kube.close()
        with pytest.raises(ConnectionError):
            await waiting

    run(scenario())


def test_error_events_and_overlong_events_raise_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_EVENT_BYTES", 1024)
    bodies = [
        json.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError",
                                                 "message": "etcd is down"}}).encode() + b"\n",
        b'{"type":"ADDED","object":{"pad":"' + b"x" * 2000 + b'"}}\n',
    ]

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = bodies.pop(0)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 500):
            piece = body[start:start + 500]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        raw, kube = await serve_raw(stream)
        async with raw:
            with pytest.raises(ApiError) as failed:
                await collect(kube.watch("/api/v1/pods", {}), lambda seen: False)
            assert (failed.value.status, failed.value.reason, failed.value.message) == (
                500, "InternalError", "etcd is down")
            with pytest.raises(ApiError) as too_long:
                await collect(kube.watch("/api/v1/pods", {}), lambda seen: False)
            assert too_long.value.reason == "EventTooLarge"
            await kube.close()

    run(scenario())
