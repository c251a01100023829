"""An in-test Kubernetes API server: HTTPS, bearer tokens, list/watch, enough for our client and kubectl.

Standard library asyncio plus the `openssl` command for its certificates. In-process:

    server = FakeApiServer(host="127.0.0.1", port=0, directory=tmp_path)
    server.start()   # its own thread and event loop; server.url, server.kubeconfig, server.token
    server.apply({...}); server.delete("v1", "Pod", "default", "web"); server.compact(); server.stop()

As a process (netns tests): `python -m tests.support.kubeapi --listen IP:PORT --dir D` writes D/kubeconfig,
D/token, then D/ready; the test helpers are then POST /_test/{apply,delete,add-token,compact,drop-watches}
and GET /_test/requests, with the bearer token (RemoteFakeApi wraps them).

Deliberate deviations from a real API server: objects are created with the `status` they are given
(tests set status.podIP and status.phase; a real server drops status on create); RBAC is not
enforced on requests (any authenticated user may do anything) but SubjectAccessReviews are answered
from the stored Roles and bindings (tests/support/kuberbac.py); no admission, no defaulting or
validation beyond names and namespaces; deletes are immediate (no grace period, finalizers, or
namespace Terminating phase);
strategic-merge patches are applied as JSON merge patches; a list ignores its resourceVersion
parameter and always reads the latest state; continue pages read the latest state after the
previous page's last key (a real server reads a snapshot).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import secrets
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.kubecerts import ServerCerts, issue_client_cert, make_server_certs
from tests.support.kubehttp import (
    BadRequest,
    Request,
    certificate_user,
    event_chunk,
    parse_resource_path,
    read_request,
    response_head,
    send_json,
)
from tests.support.kuberbac import access_review
from tests.support.kubestore import (
    JsonObject,
    Resource,
    Selector,
    Store,
    StoreError,
    decode_continue,
    encode_continue,
    merge_patch,
    object_key,
    objects_of,
    resource_of_kind,
)
from tests.support.kubeviews import (
    API_AUDIENCE,
    VERSION,
    TokenEntry,
    TokenTable,
    api_group,
    api_group_list,
    api_resource_list,
    api_versions,
    status_of,
    table,
    wants_table,
)

__all__ = ["FakeApiError", "FakeApiServer", "RemoteFakeApi", "main"]

T = TypeVar("T")
DEFAULT_WATCH_SECONDS = 1800.0
PUBLIC_PATHS = {"/version", "/healthz", "/livez", "/readyz"}
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
FakeApiError = StoreError  # what the thread-safe helpers raise (code, reason, message)


@dataclass
class _Api:
    """Request handling on the server's event loop: auth, discovery, CRUD, list and watch."""

    store: Store
    tokens: TokenTable
    bookmark_interval: float
    server_address: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    connections: set[asyncio.StreamWriter] = field(default_factory=set)
    watches: set[asyncio.StreamWriter] = field(default_factory=set)
    stalled: set[asyncio.StreamWriter] = field(default_factory=set)  # open, sending nothing
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    accepted: int = 0  # connections, so tests can see keep-alive at work

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections.add(writer)
        self.accepted += 1
        try:
            while request := await read_request(reader):
                if not request.path.startswith("/_test/"):
                    self.requests.append((request.method, request.target))
                if not await self._dispatch(request, reader, writer, certificate_user(writer)):
                    break
        except (BadRequest, ValueError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown() cancels handlers; this task is the top of its connection, so it just ends
        finally:
            self.connections.discard(writer)
            self.handlers.discard(task)
            writer.transport.abort()

    async def _dispatch(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        certificate_user: str | None) -> bool:
        try:
            if request.path in PUBLIC_PATHS:
                return await send_json(writer, 200, VERSION if request.path == "/version" else "ok")
            self._authenticate(request, certificate_user)
            if request.path.startswith("/_test/"):
                return await send_json(writer, 200, self.test_hook(request))
            document = self._discovery(request.path)
            if document is not None:
                return await send_json(writer, 200, document)
            target = parse_resource_path(request.path)
            if target is None:
                raise StoreError(404, "NotFound", "the server could not find the requested resource")
            if request.query.get("watch") in ("1", "true") and request.method == "GET":
                return await self._watch(request, (reader, writer), target[0], target[1])
            code, document = self._resource(request, *target)
            return await send_json(writer, code, document)
        except StoreError as error:
            return await send_json(writer, error.code, status_of(error))

    def _authenticate(self, request: Request, certificate_user: str | None) -> str:
        authorization = request.headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            try:
                return self.tokens.check(authorization[7:].strip(), [API_AUDIENCE])[0].username
            except StoreError:
                pass
        elif certificate_user:
            return certificate_user
        raise StoreError(401, "Unauthorized", "Unauthorized")

    def _discovery(self, path: str) -> JsonObject | None:
        parts = [part for part in path.split("/") if part]
        if parts == ["api"]:
            return api_versions(self.server_address)
        if parts == ["apis"]:
            return api_group_list()
        if parts == ["api", "v1"]:
            return api_resource_list("v1")
        if len(parts) == 2 and parts[0] == "apis":
            return api_group(parts[1])
        if len(parts) == 3 and parts[0] == "apis":
            return api_resource_list(f"{parts[1]}/{parts[2]}")
        return None

    def _resource(self, request: Request, resource: Resource, namespace: str | None,
                  name: str | None) -> tuple[int, JsonObject]:
        method = request.method
        if resource.kind == "TokenReview":
            if method != "POST" or name is not None:
                raise StoreError(405, "MethodNotAllowed", "the server does not allow this method")
            return 201, self.tokens.review(request.json() or {})
        if resource.kind == "SubjectAccessReview":
            if method != "POST" or name is not None:
                raise StoreError(405, "MethodNotAllowed", "the server does not allow this method")
            return 201, access_review(self.store, request.json() or {})
        if resource.namespaced and namespace is None and (name is not None or method != "GET"):
            raise StoreError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            if name is None:
                return 200, self._maybe_table(request, resource, self._list(request, resource, namespace))
            document = self.store.get(resource, namespace, name)
            return 200, self._maybe_table(request, resource, document)
        if method == "POST" and name is None:
            return 201, self.store.create(resource, self._incoming(request, resource, namespace, None))
        if method == "PUT" and name is not None:
            return 200, self.store.replace(resource, self._incoming(request, resource, namespace, name))
        if method == "PATCH" and name is not None:
            return 200, self._patch(request, resource, namespace, name)
        if method == "DELETE" and name is not None:
            return 200, self.store.delete(resource, namespace, name)
        raise StoreError(405, "MethodNotAllowed",
                         "the server does not allow this method on the requested resource")

    def _incoming(self, request: Request, resource: Resource, namespace: str | None,
                  name: str | None) -> JsonObject:
        obj = request.json()
        if not isinstance(obj, dict):
            raise StoreError(400, "BadRequest", "the body is not a JSON object")
        if obj.get("apiVersion", resource.group_version) != resource.group_version:
            raise StoreError(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}) does not "
                             f"match the expected API version ({resource.group_version})")
        metadata = obj.setdefault("metadata", {})
        if namespace is not None and metadata.setdefault("namespace", namespace) != namespace:
            raise StoreError(400, "BadRequest", "the namespace of the provided object does not match the "
                             "namespace sent on the request")
        if name is not None and metadata.get("name") != name:
            raise StoreError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if name is None and not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        return obj

    def _patch(self, request: Request, resource: Resource, namespace: str | None, name: str) -> JsonObject:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in MERGE_PATCHES:
            raise StoreError(415, "UnsupportedMediaType", "the body of the request was in an unknown format "
                             f"- accepted media types include: {', '.join(MERGE_PATCHES)}")
        current = self.store.get(resource, namespace, name)
        patched = merge_patch(current, request.json())
        patched["metadata"] = {**patched.get("metadata", {}), "name": name}
        if namespace is not None:
            patched["metadata"]["namespace"] = namespace
        return self.store.replace(resource, patched)

    def _list(self, request: Request, resource: Resource, namespace: str | None) -> JsonObject:
        query = request.query
        selector = Selector.parse(resource, namespace, query.get("labelSelector", ""),
                                  query.get("fieldSelector", ""))
        items = self.store.list(resource, selector)
        revision = self.store.revision
        if query.get("continue"):
            revision, after = decode_continue(query["continue"])
            self.store.check_continue(revision)
            items = [item for item in items if object_key(item) > after]
        metadata: JsonObject = {"resourceVersion": str(revision)}
        limit = int(query.get("limit") or 0)
        if 0 < limit < len(items):
            metadata["continue"] = encode_continue(revision, object_key(items[limit - 1]))
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": f"{resource.kind}List", "apiVersion": resource.group_version, "metadata": metadata,
                "items": objects_of(items)}

    def _maybe_table(self, request: Request, resource: Resource, document: JsonObject) -> JsonObject:
        if not wants_table(request.headers.get("accept", "")):
            return document
        include = request.query.get("includeObject", "Metadata")
        if "items" in document:
            return table(resource, document["items"], document["metadata"], include)
        return table(resource, [document], {}, include)

    async def _watch(self, request: Request, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                     resource: Resource, namespace: str | None) -> bool:
        writer = connection[1]
        query = request.query
        selector = Selector.parse(resource, namespace, query.get("labelSelector", ""),
                                  query.get("fieldSelector", ""))
        events: asyncio.Queue[tuple[str, JsonObject]] = asyncio.Queue()
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked",
                   "Cache-Control": "no-cache"}
        try:
            watcher = self.store.watch(resource, selector, query.get("resourceVersion", ""),
                                       lambda kind, obj: events.put_nowait((kind, obj)))
        except StoreError as error:
            if error.code != 410:
                raise
            writer.write(response_head(200, headers) + event_chunk("ERROR", status_of(error)) + b"0\r\n\r\n")
            await writer.drain()
            return True
        self.watches.add(writer)
        try:
            writer.write(response_head(200, headers))
            if not await self._stream(connection, events, resource, query):
                return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.store.unwatch(watcher)
            self.watches.discard(writer)
            self.stalled.discard(writer)
        return True

    async def _stream(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                      events: asyncio.Queue[tuple[str, JsonObject]], resource: Resource,
                      query: dict[str, str]) -> bool:
        """Send events until timeoutSeconds (True) or until the client goes away (False)."""
        reader, writer = connection
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        next_bookmark = loop.time() + self.bookmark_interval
        while (now := loop.time()) < deadline:
            if reader.at_eof() or writer.is_closing():
                return False
            if writer in self.stalled:  # held by a broken middlebox: events queue up unsent
                await asyncio.sleep(0.05)
                continue
            if bookmarks and now >= next_bookmark and events.empty():
                bookmark = {"kind": resource.kind, "apiVersion": resource.group_version,
                            "metadata": {"resourceVersion": str(self.store.revision)}}
                writer.write(event_chunk("BOOKMARK", bookmark))
                next_bookmark = now + self.bookmark_interval
                continue
            wake = min(deadline, next_bookmark if bookmarks else deadline, now + 1.0)
            try:
                kind, obj = await asyncio.wait_for(events.get(), max(0.0, wake - now))
            except TimeoutError:
                continue
            if writer in self.stalled:  # never sent (a stalled stream does not come back)
                continue
            writer.write(event_chunk(kind, obj))
            await writer.drain()
        return True

    def test_hook(self, request: Request) -> Any:
        body: Any = request.json() if request.method == "POST" else None
        hook = request.path.removeprefix("/_test/")
        if hook == "apply":
            return self.apply(body)
        if hook == "delete":
            return self.delete(body["apiVersion"], body["kind"], body.get("namespace"), body["name"])
        if hook == "add-token":
            entry = _token_entry(body)
            self.tokens.add(str(body["token"]), entry)
            return {}
        if hook == "compact":
            self.store.compact()
            return {}
        if hook == "drop-watches":
            self.drop_watches()
            return {}
        if hook == "requests":
            return {"requests": self.requests}
        raise StoreError(404, "NotFound", f"no test hook {hook!r}")

    def apply(self, obj: JsonObject) -> JsonObject:
        return self.store.apply(_resource_of(obj), copy.deepcopy(obj))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> JsonObject:
        resource = _resource_of({"apiVersion": api_version, "kind": kind})
        return self.store.delete(resource, namespace if resource.namespaced else None, name)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> JsonObject:
        resource = _resource_of({"apiVersion": api_version, "kind": kind})
        return self.store.get(resource, namespace if resource.namespaced else None, name)

    def drop_watches(self) -> None:
        for writer in list(self.watches):
            writer.transport.abort()

    def stall_watches(self) -> None:
        self.stalled.update(self.watches)

    async def shutdown(self) -> None:
        for writer in list(self.connections):
            writer.transport.abort()
        for task in self.handlers:
            task.cancel()
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=5)


def _resource_of(obj: JsonObject) -> Resource:
    resource = resource_of_kind(str(obj.get("apiVersion")), str(obj.get("kind")))
    if resource is None or "get" not in resource.verbs:
        raise StoreError(400, "BadRequest", f"no stored kind {obj.get('apiVersion')}/{obj.get('kind')}")
    return resource


def _token_entry(body: JsonObject) -> TokenEntry:
    return TokenEntry(username=str(body["username"]), uid=str(body.get("uid", "")),
                      groups=tuple(body.get("groups") or ()), extra=dict(body.get("extra") or {}),
                      audiences=tuple(body.get("audiences") or (API_AUDIENCE,)),
                      expires_at=body.get("expires_at"))


class FakeApiServer:
    """The API server on its own thread and event loop; the helpers are safe to call from any thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, directory: str | Path | None = None, *,
                 bookmark_interval: float = 1.0, history_limit: int = 10_000,
                 token: str | None = None, listen_socket: socket.socket | None = None) -> None:
        """`listen_socket`: a bound, listening socket to serve on instead of host:port (a
        netns test makes it inside a lab node's netns, so agents there can reach it)."""
        self.host = host
        self._listen_socket = listen_socket
        self.port = port
        self._own_directory = directory is None
        self.directory = Path(directory if directory is not None else tempfile.mkdtemp(prefix="kubeapi-"))
        self.token = token or secrets.token_urlsafe(24)
        self._api = _Api(Store(history_limit), TokenTable(), bookmark_interval)
        admin = TokenEntry("kubernetes-admin", groups=("system:masters", "system:authenticated"),
                           audiences=())
        self._api.tokens.add(self.token, admin)
        self._certs: ServerCerts | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def ca_pem(self) -> bytes:
        assert self._certs is not None, "start() first"
        return self._certs.ca_pem

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self._on_loop(lambda: list(self._api.requests))

    def start(self) -> FakeApiServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        hosts = [self.host, "127.0.0.1", "::1", "localhost", "kubernetes", "kubernetes.default.svc"]
        if self._certs is None:  # a restart (go_away, come_back) keeps them, as a real server
            self._certs = make_server_certs(self.directory, [h for h in hosts if h not in ("0.0.0.0", "::")])
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failure is not None:
            raise RuntimeError(f"the fake API server did not start: {self._failure}")
        self._write_client_files()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = self._loop = None
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def go_away(self) -> None:
        """Stop serving (every connection cut, the listener closed), keeping the objects, the
        tokens and the certificates: `come_back` then restarts it, as a restarted API server
        with its etcd. Objects cannot be changed meanwhile."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = self._loop = None

    def come_back(self, listen_socket: socket.socket | None = None) -> FakeApiServer:
        """Serve again after `go_away` (on a new listening socket when it had one)."""
        self._listen_socket = listen_socket
        return self.start()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace (uid kept on replace); returns a copy of what is stored."""
        return self._on_loop(lambda: copy.deepcopy(self._api.apply(obj)))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self._on_loop(lambda: copy.deepcopy(self._api.delete(api_version, kind, namespace, name)))

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        """One stored object (a StoreError with 404 when absent)."""
        return self._on_loop(lambda: copy.deepcopy(self._api.get(api_version, kind, namespace, name)))

    def add_token(self, token: str, *, username: str, uid: str = "", groups: tuple[str, ...] = (),
                  extra: dict[str, list[str]] | None = None, audiences: tuple[str, ...] = (API_AUDIENCE,),
                  expires_at: float | None = None) -> None:
        entry = TokenEntry(username, uid, tuple(groups), dict(extra or {}), tuple(audiences), expires_at)
        self._on_loop(lambda: self._api.tokens.add(token, entry))

    def compact(self) -> None:
        """Forget the watch history: watching from any older resourceVersion now gets 410."""
        self._on_loop(self._api.store.compact)

    def drop_watches(self) -> None:
        """End every watch stream abruptly (no final chunk), as a restarting API server would."""
        self._on_loop(self._api.drop_watches)

    def stall_watches(self) -> None:
        """Every open watch stream stays open and sends nothing more (no events, no
        bookmarks), as behind a middlebox that stopped forwarding; new watches are served."""
        self._on_loop(self._api.stall_watches)

    @property
    def connections_accepted(self) -> int:
        return self._on_loop(lambda: self._api.accepted)

    @property
    def resource_version(self) -> int:
        return self._on_loop(lambda: self._api.store.revision)

    def client_certificate(self, user: str, groups: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for a client certificate the server accepts as `user`."""
        assert self._certs is not None, "start() first"
        return issue_client_cert(self._certs, user, groups)

    def _on_loop(self, function: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake API server is not running")
        result: Future[T] = Future()

        def call() -> None:
            try:
                result.set_result(function())
            except BaseException as error:  # handed to the calling thread
                result.set_exception(error)

        loop.call_soon_threadsafe(call)
        return result.result(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            self._failure = error
            self._ready.set()

    async def _serve(self) -> None:
        assert self._certs is not None
        self._stop = asyncio.Event()
        if self._listen_socket is not None:
            server = await asyncio.start_server(self._api.handle, sock=self._listen_socket,
                                                ssl=_server_context(self._certs), limit=1 << 16)
        else:
            server = await asyncio.start_server(self._api.handle, self.host, self.port,
                                                ssl=_server_context(self._certs), limit=1 << 16)
        async with server:
            self.port = server.sockets[0].getsockname()[1]
            self._api.server_address = self.url.removeprefix("https://")
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()
            server.close()
            await self._api.shutdown()

    def _write_client_files(self) -> None:
        (self.directory / "ca.crt").write_bytes(self.ca_pem)
        (self.directory / "token").write_text(self.token + "\n")
        document = kubeconfig_document(self.url, self.ca_pem, self.token)
        self.kubeconfig.write_text(json.dumps(document, indent=1))
        self.kubeconfig.chmod(0o600)


def kubeconfig_document(url: str, ca_pem: bytes, token: str) -> JsonObject:
    """A kubeconfig (JSON is YAML too: kubectl reads it) with one cluster, one token user, one context."""
    cluster = {"server": url, "certificate-authority-data": base64.b64encode(ca_pem).decode()}
    context = {"cluster": "fake", "user": "admin", "namespace": "default"}
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": cluster}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": context}],
    }


def _server_context(certs: ServerCerts) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert_path, certs.key_path)
    context.load_verify_locations(cadata=certs.ca_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate is one way to authenticate
    context.set_alpn_protocols(["http/1.1"])
    return context


class RemoteFakeApi:
    """The test helpers of a FakeApiServer running as a process, called over HTTPS (blocking)."""

    def __init__(self, directory: str | Path) -> None:
        document = json.loads((Path(directory) / "kubeconfig").read_text())
        cluster = document["clusters"][0]["cluster"]
        self.url = str(cluster["server"])
        self.token = str(document["users"][0]["user"]["token"])
        self._context = ssl.create_default_context(cadata=(Path(directory) / "ca.crt").read_text())

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("apply", obj))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return dict(self._call("delete", {"apiVersion": api_version, "kind": kind, "namespace": namespace,
                                          "name": name}))

    def add_token(self, token: str, *, username: str, uid: str = "", groups: tuple[str, ...] = (),
                  extra: dict[str, list[str]] | None = None, audiences: tuple[str, ...] = (API_AUDIENCE,),
                  expires_at: float | None = None) -> None:
        self._call("add-token", {"token": token, "username": username, "uid": uid, "groups": list(groups),
                                 "extra": extra or {}, "audiences": list(audiences),
                                 "expires_at": expires_at})

    def compact(self) -> None:
        self._call("compact", {})

    def drop_watches(self) -> None:
        self._call("drop-watches", {})

    @property
    def requests(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path in self._call("requests", None)["requests"]]

    def _call(self, hook: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/_test/{hook}", data=data, method="GET" if data is None
                                         else "POST", headers={"Authorization": f"Bearer {self.token}",
                                                               "Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=self._context, timeout=10) as response:
            return json.loads(response.read())


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kubeapi",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", type=_listen, help="IP:PORT (default 127.0.0.1:0)")
    parser.add_argument("--dir", required=True, type=Path, help="where kubeconfig, token, ca.crt, ready go")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    host, port = args.listen
    server = FakeApiServer(host, port, args.dir, bookmark_interval=args.bookmark_interval).start()
    (args.dir / "ready").write_text(server.url + "\n")
    with contextlib.suppress(KeyboardInterrupt):
        stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
