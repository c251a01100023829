"""List-then-watch mirrors of one Kubernetes collection, kept as small projections, never whole objects.

A Reflector lists (paginated), then watches from the list's resourceVersion with bookmarks; each
object is reduced by `project` as it arrives (None = not interesting, treated as absent). A 410
Gone relists and applies only the difference to the store, so consumers see the deletes they
missed and never a reset; a broken stream reconnects from the last resourceVersion with jittered
backoff. The store and diff logic are pure functions below (apply_event, replace_all, Backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from agent.controlplane.kube.client import ApiError, Gone, KubeClient
from agent.controlplane.kube.http1 import ProtocolError
from agent.controlplane.kube.listing import ListReader

__all__ = ["Backoff", "Reflector", "Update", "apply_event", "object_key", "replace_all"]

T = TypeVar("T")
UpdateKind = Literal["upsert", "delete"]
OnEvent = Callable[[UpdateKind, str, T | None, T | None], None]
PAGE_SIZE = 500
WATCH_TIMEOUT = (300.0, 600.0)  # seconds, drawn per watch so many agents do not reconnect in step

log = logging.getLogger(__name__)


def object_key(obj: Mapping[str, Any]) -> str:
    """"namespace/name", or "name" for cluster-scoped objects."""
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata.get('name')}" if namespace else str(metadata.get("name"))


@dataclass(frozen=True)
class Update(Generic[T]):
    kind: UpdateKind
    key: str
    old: T | None
    new: T | None


def apply_event(store: dict[str, T], event_type: str, obj: Mapping[str, Any],
                project: Callable[[dict[str, Any]], T | None]) -> Update[T] | None:
    """Apply one ADDED/MODIFIED/DELETED event to the store; the Update, or None if nothing changed.

    A projection equal to the stored one is no change: a pod's status heartbeat that touches nothing
    projected costs no callback.
    """
    key = object_key(obj)
    old = store.get(key)
    new = None if event_type == "DELETED" else project(dict(obj))
    if new is None:
        if key not in store:
            return None
        del store[key]
        return Update("delete", key, old, None)
    if key in store and old == new:
        return None
    store[key] = new
    return Update("upsert", key, old, new)


def replace_all(store: dict[str, T], fresh: dict[str, T]) -> list[Update[T]]:
    """Make the store equal to `fresh` (a relist), returning only what differs: deletes, then upserts."""
    updates: list[Update[T]] = []
    for key in sorted(store.keys() - fresh.keys()):
        updates.append(Update("delete", key, store.pop(key), None))
    for key, new in fresh.items():
        old = store.get(key)
        if key not in store or old != new:
            store[key] = new
            updates.append(Update("upsert", key, old, new))
    return updates


class Backoff:
    """0.5 s doubling to 30 s; each delay drawn from [d/2, d] so a fleet of agents spreads out."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial
        self._rng = rng or random.Random()

    def next(self) -> float:
        nominal = self._next
        self._next = min(self._maximum, nominal * 2)
        return self._rng.uniform(nominal / 2, nominal)

    def reset(self) -> None:
        self._next = self._initial


class Reflector(Generic[T]):
    """One collection (a path such as /api/v1/pods, plus selectors) mirrored into `store`.

    `run()` never returns by itself: the caller owns it in a TaskGroup and cancels it. `synced` is set
    after the first complete list. Counters: `relists` (lists after the first), `restarts` (watch or
    list failures that were retried), `events` (ADDED/MODIFIED/DELETED events received),
    `resyncs` (lists a consumer asked for with `resync()`).
    """

    def __init__(self, client: KubeClient, path: str, project: Callable[[dict[str, Any]], T | None], *,
                 on_event: OnEvent[T] | None = None, params: Mapping[str, str] | None = None,
                 page_size: int = PAGE_SIZE, watch_timeout: tuple[float, float] = WATCH_TIMEOUT,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        self._client = client
        self._path = path
        self._project = project
        self._on_event = on_event
        self._params = dict(params or {})
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._rng = rng or random.Random()
        self._backoff = backoff or Backoff(rng=self._rng)
        self.store: dict[str, T] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0
        self.restarts = 0
        self.events = 0
        self.resyncs = 0  # lists asked for by resync()
        self._resync = asyncio.Event()
        self._last_event = 0.0  # loop time of the last event or bookmark

    def resync(self, reason: str) -> None:
        """End the watch and list again: a consumer knows of an object the watch should have
        brought and has not (a stream that stalls without breaking loses nothing by this)."""
        if self._resync.is_set():
            return
        idle = asyncio.get_running_loop().time() - self._last_event if self._last_event else None
        log.warning("%s: %s; listing again (the watch is at resourceVersion %s, %d events, the "
                    "last %s)", self._path, reason, self.resource_version or "(none)", self.events,
                    "never" if idle is None else f"{idle:.1f}s ago")
        self.resyncs += 1
        self._resync.set()

    async def run(self) -> None:
        must_list = not self.synced.is_set()
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                must_list = await self._watch_until_resync()
            except Gone as error:
                log.info("%s: %s; listing again", self._path, error.message or error.reason)
                if must_list:  # the list itself expired (a stale continue token): do not spin
                    await self._retry_later(error)
                must_list = True
            except (OSError, TimeoutError, ApiError) as error:
                await self._retry_later(error)

    async def _retry_later(self, error: Exception) -> None:
        self.restarts += 1
        delay = self._backoff.next()
        log.warning("%s: %s; retrying in %.1fs from resourceVersion %s", self._path,
                    _describe(error), delay, self.resource_version or "(none)")
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        self._resync.clear()  # a resync() asked from now on gets a list that starts after it
        fresh: dict[str, T] = {}
        revision = ""
        params = {**self._params, "limit": str(self._page_size)}
        while True:
            metadata = await self._list_page(params, fresh)
            revision = revision or str(metadata.get("resourceVersion") or "")
            if not metadata.get("continue"):
                break
            params["continue"] = str(metadata["continue"])
        if self.synced.is_set():
            self.relists += 1
        self.resource_version = revision
        for update in replace_all(self.store, fresh):
            self._emit(update)
        self.synced.set()

    async def _list_page(self, params: dict[str, str], fresh: dict[str, T]) -> dict[str, Any]:
        """Project one page into `fresh`, decoding one item at a time; the page's list metadata."""
        body = await self._client.request_bytes("GET", self._path, params=params)
        try:
            page = ListReader(body.decode("utf-8"))
            del body  # the text is all that is needed now: do not hold both
            for item in page.items():
                projection = self._project(item)
                if projection is not None:
                    fresh[object_key(item)] = projection
        except ValueError as error:  # includes UnicodeDecodeError and JSONDecodeError
            raise ProtocolError(f"list page is not JSON: {error}") from error
        metadata = page.fields.get("metadata")
        return metadata if isinstance(metadata, dict) else {}

    async def _watch_until_resync(self) -> bool:
        """Watch until the stream ends (False) or resync() asks for a list (True); the
        stream's failure is raised."""
        watch = asyncio.ensure_future(self._watch())
        asked = asyncio.ensure_future(self._resync.wait())
        try:
            await asyncio.wait((watch, asked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
            if not watch.done():
                watch.cancel()
                await asyncio.wait((watch,))  # its connection closed before listing again
        if watch.cancelled():
            return True
        watch.result()
        return self._resync.is_set()

    async def _watch(self) -> None:
        """One watch stream, until the server ends it (returns) or it fails (raises)."""
        params = {**self._params, "resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(int(self._rng.uniform(*self._watch_timeout)))}
        events = self._client.watch(self._path, params)
        async with contextlib.aclosing(events):
            async for event in events:
                self._backoff.reset()  # the stream works: the next failure starts from 0.5 s again
                self._apply(event)

    def _apply(self, event: dict[str, Any]) -> None:
        self._last_event = asyncio.get_running_loop().time()
        obj = event.get("object") or {}
        revision = (obj.get("metadata") or {}).get("resourceVersion")
        event_type = event.get("type")
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            self.events += 1
            update = apply_event(self.store, event_type, obj, self._project)
            if update is not None:
                self._emit(update)
        elif event_type != "BOOKMARK":
            log.warning("%s: ignoring a watch event of type %r", self._path, event_type)
            return
        if revision:
            self.resource_version = str(revision)

    def _emit(self, update: Update[T]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(update.kind, update.key, update.old, update.new)
        except Exception:  # a consumer's bug must not stop the mirror; it is logged with its traceback
            log.exception("%s: on_event failed for %s %s", self._path, update.kind, update.key)


def _describe(error: Exception) -> str:
    if isinstance(error, ApiError):
        return f"{error.status} {error.reason}: {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
