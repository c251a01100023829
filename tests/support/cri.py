"""A CRI client for the tests: the calls kubelet makes to containerd, over gRPC on its socket.

The messages are the subset of the CRI API (k8s.io/cri-api, runtime/v1/api.proto) these tests
send and read, encoded here by field number with the protobuf wire format: grpcio carries the
bytes, and no protobuf package or generated code is needed. Each builder names the proto
message and fields it encodes; the numbers are the API's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

# ---------------------------------------------------------------- protobuf wire format

_VARINT, _LENGTH_DELIMITED = 0, 2
FieldValue = int | bool | str | bytes | None


def _varint(number: int) -> bytes:
    if number < 0:
        number += 1 << 64  # int64 on the wire: two's complement, ten bytes
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def encode(*fields: tuple[int, FieldValue | Sequence[Any] | Mapping[str, str]]) -> bytes:
    """A message from (field number, value): int/bool as varint, str/bytes (and nested
    messages, already encoded) length-delimited, a list as a repeated field, a dict as a
    map<string, string>. None and empty values are left out, as proto3 does."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, Mapping):
            value = [encode((1, key), (2, item)) for key, item in sorted(value.items())]
        items: Sequence[Any] = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if item is None or item is False or (isinstance(item, int) and item == 0):
                continue
            if isinstance(item, bool | int):
                out += _varint(number << 3 | _VARINT) + _varint(int(item))
            else:
                data = item.encode() if isinstance(item, str) else bytes(item)
                out += _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(data)) + data
    return bytes(out)


@dataclass(frozen=True)
class Decoded:
    """A received message: every field's values by number (varints as int, the rest bytes)."""

    fields: Mapping[int, list[int | bytes]]

    def integer(self, number: int) -> int:
        values = self.fields.get(number, [0])
        return int(values[-1]) if isinstance(values[-1], int) else 0

    def text(self, number: int) -> str:
        values = self.fields.get(number, [b""])
        return bytes(values[-1]).decode() if isinstance(values[-1], bytes) else ""

    def texts(self, number: int) -> list[str]:
        return [bytes(value).decode() for value in self.fields.get(number, [])
                if isinstance(value, bytes)]

    def message(self, number: int) -> Decoded:
        values = self.fields.get(number, [b""])
        return decode(values[-1] if isinstance(values[-1], bytes) else b"")

    def messages(self, number: int) -> list[Decoded]:
        return [decode(value) for value in self.fields.get(number, []) if isinstance(value, bytes)]

    def mapping(self, number: int) -> dict[str, str]:
        return {entry.text(1): entry.text(2) for entry in self.messages(number)}


def decode(data: bytes) -> Decoded:
    fields: dict[int, list[int | bytes]] = {}
    position = 0

    def varint() -> int:
        nonlocal position
        result, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while position < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            fields.setdefault(number, []).append(varint())
        elif wire_type == _LENGTH_DELIMITED:
            length = varint()
            fields.setdefault(number, []).append(data[position:position + length])
            position += length
        elif wire_type in (1, 5):  # fixed64 / fixed32: none in the fields read here
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire_type} not supported")
    return Decoded(fields)


# ---------------------------------------------------------------- the CRI messages used

NAMESPACE_POD, NAMESPACE_CONTAINER, NAMESPACE_NODE = 0, 1, 2  # enum NamespaceMode
PROPAGATION_PRIVATE, PROPAGATION_HOST_TO_CONTAINER, PROPAGATION_BIDIRECTIONAL = 0, 1, 2
SANDBOX_READY, SANDBOX_NOTREADY = 0, 1  # enum PodSandboxState
CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED, CONTAINER_UNKNOWN = 0, 1, 2, 3
SECCOMP_RUNTIME_DEFAULT = 0  # SecurityProfile.ProfileType RuntimeDefault

# What kubelet sends for the default procMount (pkg/securitycontext/util.go).
DEFAULT_MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                        "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                        "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                        "/sys/devices/virtual/powercap")
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class PodSandbox:
    """What a PodSandboxConfig carries for one pod (kubelet builds it from the Pod object)."""

    name: str
    uid: str
    namespace: str = "default"
    attempt: int = 0
    host_network: bool = False
    cgroup_parent: str = ""  # kubelet's pod cgroup, e.g. /kubepods/besteffort/pod<uid>
    log_directory: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> bytes:
        namespaces = encode((1, NAMESPACE_NODE if self.host_network else NAMESPACE_POD),
                            (2, NAMESPACE_CONTAINER), (3, NAMESPACE_POD))
        security = encode((1, namespaces), (9, encode((1, SECCOMP_RUNTIME_DEFAULT))))
        linux = encode((1, self.cgroup_parent), (2, security))          # LinuxPodSandboxConfig
        metadata = encode((1, self.name), (2, self.uid), (3, self.namespace), (4, self.attempt))
        labels = {"io.kubernetes.pod.name": self.name, "io.kubernetes.pod.namespace": self.namespace,
                  "io.kubernetes.pod.uid": self.uid, **self.labels}
        hostname = "" if self.host_network else self.name  # kubelet: the node's own UTS namespace
        return encode((1, metadata), (2, hostname), (3, self.log_directory), (6, labels), (8, linux))


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False
    propagation: int = PROPAGATION_PRIVATE

    def encoded(self) -> bytes:
        return encode((1, self.container_path), (2, self.host_path), (3, self.readonly),
                      (5, self.propagation))


@dataclass(frozen=True)
class Container:
    """A ContainerConfig with a Linux security context, as kubelet maps a container spec."""

    name: str
    image: str
    attempt: int = 0  # kubelet's restart count: a restarted container is a new one, attempt+1
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[Mount] = ()
    log_path: str = ""
    run_as_user: int | None = 0
    readonly_rootfs: bool = False
    no_new_privs: bool = False
    add_capabilities: Sequence[str] = ()
    drop_capabilities: Sequence[str] = ()
    host_network: bool = False
    cpu_shares: int = 0            # kubelet: requests.cpu (milli) * 1024 / 1000
    memory_limit_bytes: int = 0    # kubelet: limits.memory

    def config(self) -> bytes:
        resources = encode((3, self.cpu_shares), (4, self.memory_limit_bytes))  # LinuxContainerResources
        capabilities = encode((1, list(self.add_capabilities)), (2, list(self.drop_capabilities)))
        namespaces = encode((1, NAMESPACE_NODE if self.host_network else NAMESPACE_POD),
                            (2, NAMESPACE_CONTAINER), (3, NAMESPACE_POD))
        # Int64Value{value: 0} encodes as an empty message, present all the same: uid 0.
        run_as_user = encode((1, self.run_as_user)) if self.run_as_user is not None else None
        security = encode(
            (1, capabilities), (3, namespaces), (5, run_as_user), (7, self.readonly_rootfs),
            (11, self.no_new_privs), (13, list(DEFAULT_MASKED_PATHS)),
            (14, list(DEFAULT_READONLY_PATHS)), (15, encode((1, SECCOMP_RUNTIME_DEFAULT))))
        envs = [encode((1, key), (2, value)) for key, value in self.env.items()]
        return encode(
            (1, encode((1, self.name), (2, self.attempt))), (2, encode((1, self.image))),
            (3, list(self.command)),
            (4, list(self.args)), (6, envs), (7, [mount.encoded() for mount in self.mounts]),
            (11, self.log_path), (15, encode((1, resources), (2, security))))


# ---------------------------------------------------------------- the client


class CriError(RuntimeError):
    pass


class CriClient:
    """RuntimeService calls on a containerd socket; every call has a deadline."""

    SERVICE = "/runtime.v1.RuntimeService/"

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: bytes, timeout: float | None = None) -> Decoded:
        stub = self._channel.unary_unary(self.SERVICE + method,
                                         request_serializer=lambda data: data,
                                         response_deserializer=lambda data: data)
        try:
            return decode(stub(request, timeout=timeout or self._timeout))
        except grpc.RpcError as error:
            raise CriError(f"{method}: {error.code().name}: {error.details()}") from error

    def version(self) -> tuple[str, str]:
        response = self.call("Version", encode((1, "v1")), timeout=5)
        return response.text(2), response.text(3)

    def run_pod_sandbox(self, pod: PodSandbox) -> str:
        return self.call("RunPodSandbox", encode((1, pod.config()))).text(1)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self.call("StopPodSandbox", encode((1, sandbox_id)))

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self.call("RemovePodSandbox", encode((1, sandbox_id)))

    def pod_sandbox_status(self, sandbox_id: str) -> Decoded:
        """PodSandboxStatus: .integer(3) the state, .message(5).text(1) the pod IP."""
        return self.call("PodSandboxStatus", encode((1, sandbox_id))).message(1)

    def pod_sandbox_info(self, sandbox_id: str) -> str:
        """The verbose `info` JSON containerd adds (the sandbox's netns path, its pid, ...)."""
        return self.call("PodSandboxStatus", encode((1, sandbox_id), (2, True))).mapping(2).get("info", "")

    def list_pod_sandboxes(self) -> list[str]:
        return [item.text(1) for item in self.call("ListPodSandbox", b"").messages(1)]

    def create_container(self, sandbox_id: str, container: Container, pod: PodSandbox) -> str:
        return self.call("CreateContainer", encode((1, sandbox_id), (2, container.config()),
                                                   (3, pod.config()))).text(1)

    def start_container(self, container_id: str) -> None:
        self.call("StartContainer", encode((1, container_id)))

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        self.call("StopContainer", encode((1, container_id), (2, timeout)), timeout=timeout + 30)

    def remove_container(self, container_id: str) -> None:
        self.call("RemoveContainer", encode((1, container_id)))

    def container_pid(self, container_id: str) -> int:
        """The container's first process, from the verbose `info` JSON containerd adds."""
        import json

        response = self.call("ContainerStatus", encode((1, container_id), (2, True)))
        return int(json.loads(response.mapping(2).get("info", "{}")).get("pid", 0))

    def container_status(self, container_id: str) -> Decoded:
        """ContainerStatus: .integer(3) the state, .integer(7) the exit code, .text(15) the log path."""
        return self.call("ContainerStatus", encode((1, container_id))).message(1)
