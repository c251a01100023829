#!/usr/bin/env python3
"""pinion-cni's reference implementation: what cni/pinion-cni.c (the plugin nodes run, a
static binary) does, in Python. tests/unit/test_cni_plugin.py runs both on every case and
compares them on generated input, so a change of behaviour is made here and there together.

pinion-cni: CNI chained plugin that announces every pod to the node's Pinion agent.

It runs after the plugin that creates the pod interface (e.g. bridge), forwards the
netns, CNI_ARGS and the pod IPs from prevResult to the agent over a Unix socket, waits
until the agent has the pod captured, and passes prevResult through unchanged.
Standard library only, Python >= 3.9 (it runs on the host, outside any venv).

Agent protocol: one exchange per connection; each side sends one JSON object + "\\n".
  request: {"version": 1, "command": "ADD"|"DEL"|"CHECK", "containerId", "netns",
            "ifName", "args": {CNI_ARGS}, "ips": [...], "gateways": [...], "cniVersion"}
  reply:   {"ok": true} | {"ok": false, "code": N, "msg": "...", "details": "..."}
When the agent is unreachable and failPolicy is "open", ADD stores the request (plus
"receivedAt") as <pendingDir>/<containerId>.json for the agent to pick up on return.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO, NamedTuple

PLUGIN_TYPE = "pinion-cni"
OWN_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK")
FAIL_POLICIES = ("closed", "open")
DEFAULT_AGENT_SOCKET = "/run/pinion/cni.sock"
DEFAULT_PENDING_DIR = "/run/pinion/pending"
DEFAULT_TIMEOUT_SECONDS = 30.0
PROTOCOL_VERSION = 1
MAX_REPLY_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 64 * 1024  # what the agent reads of one request line
MAX_TIMEOUT_SECONDS = 3600.0  # a runtime gives up long before; and socket timeouts must fit
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")

# Error codes from the CNI spec ("Error" section); 100 and up are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_AGENT_REFUSED = 100  # the agent said no without a usable code of its own
ERR_INTERNAL = 101  # a bug in pinion-cni itself

# On Python 3.9 socket.timeout is its own OSError subclass; from 3.10 it is TimeoutError.
SocketTimeout = socket.timeout


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class AgentUnreachable(Exception):
    """The agent could not be connected to, or did not answer in time."""


# Start-up time is pod start-up time: this file avoids costly imports (dataclasses,
# tempfile, traceback, contextlib cost ~20 ms together, several times that on a Pi).


class NetConf(NamedTuple):
    """The plugin's part of the network config, validated."""

    cni_version: str
    agent_socket: str
    fail_policy: str
    timeout_seconds: float
    pending_dir: str
    prev_result: dict[str, Any] | None


class Invocation(NamedTuple):
    """What the runtime asked for, from the CNI_* environment variables."""

    command: str
    container_id: str
    netns: str
    if_name: str
    args: dict[str, str]


def bad_config(problem: str) -> CniError:
    return CniError(ERR_INVALID_CONFIG, f"invalid pinion-cni network config: {problem}")


def warn(message: str) -> None:
    print(f"pinion-cni: {message}", file=sys.stderr)


# ---------------------------------------------------------------- input parsing


def decode_config(stdin_bytes: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(stdin_bytes)
    except ValueError as error:
        raise CniError(ERR_DECODE, f"network config on stdin is not valid JSON: {error}") from None
    except RecursionError:
        raise CniError(ERR_DECODE, "network config on stdin is nested too deeply to be one") from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "network config on stdin must be a JSON object")
    return raw


def parse_netconf(raw: Mapping[str, Any]) -> NetConf:
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise bad_config('"cniVersion" is missing or not a string')
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} in the network config is not supported by pinion-cni",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if raw.get("type") != PLUGIN_TYPE:
        raise bad_config(f'"type" is {raw.get("type")!r}, expected "pinion-cni"')
    fail_policy = raw.get("failPolicy", "closed")
    if fail_policy not in FAIL_POLICIES:
        raise bad_config(f'"failPolicy" must be "closed" or "open", got {fail_policy!r}')
    prev_result = raw.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        raise bad_config('"prevResult" must be an object')
    return NetConf(
        cni_version=version,
        agent_socket=config_path(raw, "agentSocket", DEFAULT_AGENT_SOCKET),
        fail_policy=fail_policy,
        timeout_seconds=config_timeout(raw),
        pending_dir=config_path(raw, "pendingDir", DEFAULT_PENDING_DIR),
        prev_result=prev_result,
    )


def config_path(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise bad_config(f'"{key}" must be a non-empty path, got {value!r}')
    return value


def config_timeout(raw: Mapping[str, Any]) -> float:
    value = raw.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise bad_config(f'"timeoutSeconds" must be a number > 0 and at most '
                         f'{MAX_TIMEOUT_SECONDS:g}, got {value!r}')
    return float(value)


def read_invocation(environ: Mapping[str, str]) -> Invocation:
    command = require_env(environ, "CNI_COMMAND", "any command")
    if command not in COMMANDS:
        raise CniError(
            ERR_INVALID_ENV, f"CNI_COMMAND={command!r} is not one of ADD, DEL, CHECK, VERSION"
        )
    container_id = require_env(environ, "CNI_CONTAINERID", command)
    if not CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            ERR_INVALID_ENV,
            f"CNI_CONTAINERID={container_id!r} is not a valid container id",
            "expected letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    if command != "DEL":  # DEL may come after the netns is gone
        require_env(environ, "CNI_NETNS", command)
        require_env(environ, "CNI_IFNAME", command)
    return Invocation(
        command=command,
        container_id=container_id,
        netns=environ.get("CNI_NETNS", ""),
        if_name=environ.get("CNI_IFNAME", ""),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
    )


def require_env(environ: Mapping[str, str], name: str, command: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise CniError(
            ERR_INVALID_ENV, f"environment variable {name} is not set; {command} needs it"
        )
    return value


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is "K=V;K=V" (the spec); every pair is passed through to the agent."""
    args: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise CniError(
                ERR_INVALID_ENV,
                f"CNI_ARGS has a malformed pair {pair!r}; expected KEY=VALUE pairs joined by ';'",
                f"CNI_ARGS={raw}",
            )
        args[key] = value
    return args


def pod_addresses(prev_result: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Pod IPs (no prefix length) and distinct gateways from a 0.3.x-1.0.0 prevResult."""
    entries = prev_result.get("ips", [])
    if not isinstance(entries, list):
        raise bad_config("prevResult.ips must be a list")
    ips: list[str] = []
    gateways: list[str] = []
    for index, entry in enumerate(entries):
        where = f"prevResult.ips[{index}]"
        if not isinstance(entry, dict):
            raise bad_config(f"{where} must be an object")
        try:
            ips.append(str(ipaddress.ip_interface(entry.get("address")).ip))
            gateway = entry.get("gateway")
            if gateway:
                gateway = str(ipaddress.ip_address(gateway))
                if gateway not in gateways:
                    gateways.append(gateway)
        except ValueError as error:
            raise bad_config(f"{where} has an invalid address: {error}") from None
    return ips, gateways


def build_request(invocation: Invocation, conf: NetConf) -> dict[str, Any]:
    ips, gateways = pod_addresses(conf.prev_result or {})
    return {
        "version": PROTOCOL_VERSION,
        "command": invocation.command,
        "containerId": invocation.container_id,
        "netns": invocation.netns,
        "ifName": invocation.if_name,
        "args": invocation.args,
        "ips": ips,
        "gateways": gateways,
        "cniVersion": conf.cni_version,
    }


# ---------------------------------------------------------------- agent exchange


def exchange(socket_path: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request line, read one reply line; the whole exchange within `timeout`."""
    line_out = json.dumps(request).encode() + b"\n"
    if len(line_out) > MAX_REQUEST_BYTES:
        raise CniError(ERR_INVALID_ENV, f"the request for the agent is {len(line_out)} bytes, over "
                       f"its {MAX_REQUEST_BYTES // 1024} KiB: CNI_ARGS or the pod's addresses "
                       "are far too long")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(socket_path)
        except FileNotFoundError:
            raise AgentUnreachable("socket does not exist (is the agent running?)") from None
        except SocketTimeout:
            raise AgentUnreachable(f"timed out connecting after {timeout:g}s") from None
        except OSError as error:
            raise AgentUnreachable((error.strerror or str(error)).lower()) from None
        try:
            connection.settimeout(time_left(deadline))
            connection.sendall(line_out)
            line = read_line(connection, deadline)
        except SocketTimeout:
            raise AgentUnreachable(f"connected, but no reply within {timeout:g}s") from None
        except OSError as error:
            raise CniError(
                ERR_IO, f"connection to pinion agent at {socket_path} failed mid-request: {error}"
            ) from None
    return decode_reply(line, socket_path)


def time_left(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise SocketTimeout("deadline passed")
    return remaining


def read_line(connection: socket.socket, deadline: float) -> bytes:
    buffer = b""
    while b"\n" not in buffer and len(buffer) <= MAX_REPLY_BYTES:
        connection.settimeout(time_left(deadline))
        chunk = connection.recv(4096)
        if not chunk:
            break
        buffer += chunk
    return buffer.split(b"\n", 1)[0]


def decode_reply(line: bytes, socket_path: str) -> dict[str, Any]:
    where = f"pinion agent at {socket_path}"
    if not line.strip():
        raise CniError(
            ERR_IO,
            f"{where} closed the connection without replying",
            "the agent may have crashed while handling this pod; see the agent log",
        )
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CniError(
            ERR_IO,
            f'{where} sent an invalid reply; expected one JSON object with a boolean "ok"',
            f"reply: {line[:200]!r}",
        )
    return reply


def raise_for_reply(reply: Mapping[str, Any]) -> None:
    """An ok:false reply becomes the CNI error, with the agent's code, msg and details."""
    if reply["ok"]:
        return
    code = reply.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code <= 0:
        code = ERR_AGENT_REFUSED
    msg = reply.get("msg")
    if not isinstance(msg, str) or not msg:
        msg = "pinion agent refused the request without saying why"
    details = reply.get("details", "")
    raise CniError(code, msg, details if isinstance(details, str) else json.dumps(details))


# ---------------------------------------------------------------- pending records


def pending_path(pending_dir: str, container_id: str) -> str:
    return os.path.join(pending_dir, f"{container_id}.json")


def write_pending(pending_dir: str, container_id: str, request: Mapping[str, Any]) -> str:
    """Atomically store the request for the agent to replay; returns the file's path."""
    try:
        os.makedirs(pending_dir, mode=0o700)
        os.chmod(pending_dir, 0o700)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass
    path = pending_path(pending_dir, container_id)
    record = dict(request, receivedAt=time.time())
    temporary = os.path.join(pending_dir, f".{container_id}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib would cost start-up time (see the note above)
            os.unlink(temporary)
        except OSError:
            pass
        raise
    directory = os.open(pending_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def remove_pending(pending_dir: str, container_id: str) -> bool:
    """Forget a pending ADD; True when there was one. DEL must not fail, so only warn."""
    path = pending_path(pending_dir, container_id)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        warn(f"could not remove pending record {path}: {error}")
        return False
    return True


# ---------------------------------------------------------------- commands


def handle(invocation: Invocation, conf: NetConf) -> str:
    """Run ADD, DEL or CHECK; returns what to print on stdout."""
    if invocation.command != "DEL" and conf.prev_result is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            f"{invocation.command} without prevResult: pinion-cni must be chained after a plugin"
            " that creates the pod interface (e.g. bridge)",
        )
    request = build_request(invocation, conf)
    try:
        reply = exchange(conf.agent_socket, request, conf.timeout_seconds)
    except AgentUnreachable as unreachable:
        reason = f"pinion agent not reachable at {conf.agent_socket}: {unreachable}"
        return handle_unreachable(invocation, conf, request, reason)
    raise_for_reply(reply)
    if invocation.command == "DEL":
        remove_pending(conf.pending_dir, invocation.container_id)
    return json.dumps(conf.prev_result) if invocation.command == "ADD" else ""


def handle_unreachable(
    invocation: Invocation, conf: NetConf, request: Mapping[str, Any], reason: str
) -> str:
    container = invocation.container_id
    if invocation.command == "DEL":
        removed = remove_pending(conf.pending_dir, container)
        note = f"; removed its pending ADD record in {conf.pending_dir}" if removed else ""
        warn(f"{reason}; DEL of container {container} treated as done{note}")
        return ""
    if invocation.command == "CHECK":
        raise CniError(ERR_TRY_AGAIN_LATER, f"{reason}; cannot check that the pod is captured")
    if conf.fail_policy == "closed":
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"{reason}; pod not started because failPolicy=closed",
            "start the pinion agent on this node, or set failPolicy=open to let pods start"
            " uncaptured until it returns",
        )
    try:
        path = write_pending(conf.pending_dir, container, request)
    except OSError as error:
        raise CniError(
            ERR_IO,
            f"{reason}; failPolicy=open but recording the pod failed: {error}; pod not started",
        ) from None
    warn(f"{reason}; failPolicy=open, so the pod starts uncaptured; recorded in {path}")
    return json.dumps(conf.prev_result)


def run(environ: Mapping[str, str], stdin: BinaryIO) -> tuple[int, str]:
    """One plugin invocation: returns (exit code, text for stdout)."""
    if environ.get("CNI_COMMAND") == "VERSION":
        return 0, json.dumps({"cniVersion": OWN_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
    version = OWN_VERSION
    try:
        raw = decode_config(stdin.read())
        if raw.get("cniVersion") in SUPPORTED_VERSIONS:  # errors speak the config's version
            version = raw["cniVersion"]
        conf = parse_netconf(raw)
        return 0, handle(read_invocation(environ), conf)
    except CniError as failure:
        error = failure
    except Exception as bug:  # a bug must still reach the runtime as CNI error JSON
        import traceback

        traceback.print_exc()
        error = CniError(ERR_INTERNAL, f"pinion-cni bug: {bug!r}")
    warn(f"error {error.code}: {error.msg}")
    fields = {"cniVersion": version, "code": error.code, "msg": error.msg, "details": error.details}
    return 1, json.dumps(fields)


def main() -> int:
    status, output = run(os.environ, sys.stdin.buffer)
    if output:
        print(output)
    return status


if __name__ == "__main__":
    sys.exit(main())
