"""The Unix-socket server the CNI plugin talks to: one JSON request line, one JSON reply.

Also reads the requests a fail-open plugin spooled while the agent was away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from agent.inpod.errors import (
    CNI_DECODE_FAILURE,
    CNI_INVALID_CONFIG,
    CNI_INVALID_ENV,
    CNI_IO_FAILURE,
    CaptureError,
)
from agent.inpod.pods import PodLifecycle
from agent.model import CaptureSettings, InboundPolicy, Pod, PodKey, parse_duration, parse_ports
from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0


def decode_request(raw: bytes | str) -> dict[str, Any]:
    """One plugin request: a JSON object whose fields have the types pinion-cni sends (`args`
    an object of strings, `ips` and `gateways` lists of strings, the rest strings), else a
    CaptureError with CNI code 6 (4 for `args`), never a traceback."""
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CaptureError(CNI_DECODE_FAILURE, "malformed request from pinion-cni: "
                           f"{str(exc)[:200] or type(exc).__name__}") from None
    if not isinstance(request, dict):
        raise CaptureError(CNI_DECODE_FAILURE, "malformed request from pinion-cni: not a JSON object")
    args = request.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
        raise CaptureError(CNI_INVALID_ENV, "CNI_ARGS must be key=value pairs")
    for field in ("command", "containerId", "netns"):
        if not isinstance(request.get(field, ""), str):
            raise CaptureError(CNI_DECODE_FAILURE, f"malformed request from pinion-cni: {field} "
                               "is not a string")
    for field in ("ips", "gateways"):
        value = request.get(field) or []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise CaptureError(CNI_DECODE_FAILURE, f"malformed request from pinion-cni: {field} "
                               "is not a list of addresses")
    return request


def opted_out(args: dict[str, Any]) -> bool:
    """PINION_MESH=disabled: the standalone form of the `pinion.dev/mesh: disabled` label."""
    return str(args.get("PINION_MESH", "")).lower() == "disabled"


def pod_from_request(request: dict[str, Any]) -> Pod:
    """Validate a plugin request into a Pod; a CaptureError says what was wrong."""
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise CaptureError(CNI_INVALID_ENV, "CNI_ARGS must be key=value pairs")
    missing = [k for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME") if not args.get(k)]
    if missing:
        raise CaptureError(CNI_INVALID_ENV, f"CNI_ARGS lacks {', '.join(missing)}; "
                           "pinion-cni needs the pod's namespace and name")
    for field in ("containerId", "netns"):
        if not isinstance(request.get(field), str) or not request[field]:
            raise CaptureError(CNI_INVALID_ENV, f"request lacks {field}")
    try:
        capture = CaptureSettings.from_cni_args(args, list(request.get("gateways") or []))
        opaque_ports = parse_ports(args.get("PINION_OPAQUE_PORTS", ""))
        inbound = InboundPolicy.from_cni_args(args)
        idle_timeout = parse_duration(args.get("PINION_IDLE_TIMEOUT", ""))
    except ValueError as exc:
        raise CaptureError(CNI_INVALID_ENV, f"bad PINION_* CNI arg: {exc}") from None
    return Pod(
        key=PodKey(args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"]),
        uid=args.get("K8S_POD_UID", ""),
        container_id=request["containerId"],
        netns_path=request["netns"],
        ips=tuple(request.get("ips") or ()),
        service_account=args.get("PINION_SERVICE_ACCOUNT") or "default",
        capture=capture,
        opaque_ports=opaque_ports,
        inbound=inbound,
        cgroup=args.get("PINION_CGROUP", ""),
        idle_timeout=idle_timeout,
    )


class Admission(Protocol):
    """Decides what an announced pod gets: captured, or left alone (and remembered)."""

    async def admit(self, pod: Pod, args: dict[str, Any]) -> None: ...
    async def release(self, container_id: str) -> None: ...
    async def check(self, container_id: str) -> list[str]: ...
    async def sweep(self) -> None: ...


class StandaloneAdmission:
    """No Kubernetes: every announced pod is captured unless its CNI args opt it out."""

    def __init__(self, pods: PodLifecycle) -> None:
        self._pods = pods

    async def admit(self, pod: Pod, args: dict[str, Any]) -> None:
        if not opted_out(args):
            await self._pods.add(pod)

    async def release(self, container_id: str) -> None:
        await self._pods.delete(container_id)

    async def check(self, container_id: str) -> list[str]:
        return await self._pods.check(container_id)

    async def sweep(self) -> None:
        """Nothing of its own to forget: the PodManager sweeps captured pods."""


class CniServer:
    def __init__(self, path: Path, pods: PodLifecycle, metrics: AgentMetrics,
                 admission: Admission | None = None) -> None:
        self._path = path
        self._admission = admission or StandaloneAdmission(pods)
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._inode = 0

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is for root's plugin only
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self._path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self._path).st_ino

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(OSError):  # not the next agent's, in a rolling update
                if os.stat(self._path).st_ino == self._inode:
                    self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                reply = self.refuse(CNI_DECODE_FAILURE, f"request from pinion-cni is over "
                                    f"{MAX_REQUEST // 1024} KiB: not read")
            except asyncio.IncompleteReadError as exc:  # no newline: the plugin's last bytes
                reply = await self.handle_line(exc.partial)
            else:
                reply = await self.handle_line(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError) as exc:
            log.info("cni: dropped a client: %s", exc or type(exc).__name__)
        finally:
            writer.close()

    def refuse(self, code: int, msg: str) -> dict[str, Any]:
        """A request refused before it was read: counted and logged like any failure."""
        self._metrics.cni_requests.labels("unknown", "error").inc()
        log.warning("cni request refused: %s", msg)
        return _error(code, msg)

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        command = "unknown"
        try:
            request = decode_request(line)
            command = str(request.get("command", "")).upper()
            await self.handle(command, request)
            reply: dict[str, Any] = {"ok": True}
        except CaptureError as exc:
            reply = _error(exc.code, exc.msg, exc.details)
        except Exception as exc:  # the plugin always gets an answer, and we say why
            log.exception("cni %s: unexpected failure", command)
            reply = _error(CNI_IO_FAILURE, f"pinion agent failed on {command}: {exc}")
        result = "ok" if reply["ok"] else "error"
        label = command.lower() if command in ("ADD", "DEL", "CHECK") else "unknown"
        self._metrics.cni_requests.labels(label, result).inc()
        if not reply["ok"]:
            log.warning("cni %s failed: %s", command, reply["msg"])
        return reply

    async def handle(self, command: str, request: dict[str, Any]) -> None:
        args = request.get("args")
        if command in ("ADD", "CHECK") and isinstance(args, dict) and opted_out(args):
            return  # the pod asked not to be meshed: nothing to do, nothing to check
        if command == "ADD":
            pod = pod_from_request(request)
            await self._admission.admit(pod, request.get("args") or {})
        elif command == "DEL":
            container_id = request.get("containerId")
            if not isinstance(container_id, str) or not container_id:
                raise CaptureError(CNI_INVALID_ENV, "DEL without containerId")
            await self._admission.release(container_id)
        elif command == "CHECK":
            problems = await self._admission.check(str(request.get("containerId", "")))
            if problems:
                raise CaptureError(CNI_INVALID_CONFIG, "pod is not fully captured: "
                                   + "; ".join(problems))
        else:
            raise CaptureError(CNI_INVALID_ENV, f"unknown CNI command {command!r}")


async def replay_pending(directory: Path, admission: Admission) -> int:
    """Capture pods a fail-open plugin let start while we were away. Returns how many
    requests were admitted (captured, or in Kubernetes mode perhaps left alone)."""
    captured = 0
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            request = decode_request(path.read_bytes())
        except (OSError, CaptureError) as exc:
            log.warning("pending request %s unreadable: %s", path.name, getattr(exc, "msg", exc))
            path.unlink(missing_ok=True)
            continue
        try:
            args = request.get("args") or {}
            if not opted_out(args):
                await admission.admit(pod_from_request(request), args)
                captured += 1
        except CaptureError as exc:
            log.warning("pending pod %s not captured: %s", path.name, exc.msg)
        except Exception:  # one bad file must not block the others, nor start-up
            log.exception("pending request %s failed", path.name)
        path.unlink(missing_ok=True)
    return captured


def _error(code: int, msg: str, details: str = "") -> dict[str, Any]:
    return {"ok": False, "code": code, "msg": msg, "details": details}
