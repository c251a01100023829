"""libbpf through ctypes (libbpf.so.1, >= 1.0): open, load and pin an object compiled ahead of
time, attach programs to cgroups, query and detach them, read and write maps.

Nothing here compiles anything; errors become BpfError with the errno and, for a verifier
rejection, the tail of the verifier's log. Imported only when eBPF capture is wanted."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# enum bpf_attach_type (uapi linux/bpf.h): stable numbers
ATTACH_TYPES = {
    "sockops": 3,  # BPF_CGROUP_SOCK_OPS
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "getsockopt": 21,  # BPF_CGROUP_GETSOCKOPT
}
BPF_F_ALLOW_MULTI = 1 << 1
BPF_ANY, BPF_NOEXIST = 0, 1
_LOG_SIZE = 1 << 18
_INFO_SIZE = 80  # struct bpf_prog_info up to and including name[16]


class BpfError(OSError):
    """A libbpf or bpf(2) failure: errno, what we were doing, and the verifier's say if any."""

    def __init__(self, code: int, what: str, log: str = "") -> None:
        message = f"{what}: {os.strerror(code)}"
        if code == errno.EPERM:
            message += " (needs root / CAP_BPF + CAP_NET_ADMIN, and a large enough memlock limit)"
        if log:
            message += "\nverifier log (tail):\n" + log
        super().__init__(code, message)
        self.what, self.log = what, log

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    id: int
    name: str


class _Lib:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        signatures = {
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_map__set_pin_path": (i, [vp, cp]),
            "bpf_map__set_max_entries": (i, [vp, u32]),
            "bpf_program__pin": (i, [vp, cp]),
            "bpf_program__fd": (i, [vp]),
            "bpf_program__set_log_buf": (i, [vp, cp, ctypes.c_size_t]),
            "bpf_obj_get": (i, [cp]),
            "bpf_prog_attach": (i, [i, i, i, ctypes.c_uint]),
            "bpf_prog_detach2": (i, [i, i, i]),
            "bpf_prog_query": (i, [i, i, u32, vp, vp, vp]),
            "bpf_prog_get_fd_by_id": (i, [u32]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, vp]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self.lib = lib


_LIB: _Lib | None = None


def lib() -> ctypes.CDLL:
    """The loaded libbpf (once per process). OSError if libbpf.so.1 is not installed."""
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB.lib


def _check(result: int, what: str) -> int:
    """libbpf >= 1.0 returns -errno from its low-level calls."""
    if result < 0:
        raise BpfError(-result if -result in errno.errorcode else ctypes.get_errno(), what)
    return result


def load_and_pin(object_path: Path, pin_dir: Path, maps: tuple[str, ...],
                 programs: tuple[str, ...], sizes: Mapping[str, int] | None = None) -> None:
    """Load the object with its maps pinned at pin_dir/<map> (reused if already pinned),
    then pin each program at pin_dir/<program>. The pins keep everything alive.

    A failed load is repeated with a log buffer, for the verifier's words: a successful
    one then costs no buffer (glibc keeps freed megabytes in the heap: RSS)."""
    try:
        _load_and_pin(object_path, pin_dir, maps, programs, None, sizes or {})
    except BpfError as first:
        if first.errno not in (errno.EACCES, errno.EINVAL):
            raise
        log = ctypes.create_string_buffer(_LOG_SIZE)
        try:
            _load_and_pin(object_path, pin_dir, maps, programs, log, sizes or {})
        except BpfError as second:
            raise BpfError(second.errno or first.errno, second.what,
                           _tail(log.value)) from None
        raise  # the second load worked: report the first failure anyway


def _load_and_pin(object_path: Path, pin_dir: Path, maps: tuple[str, ...],
                  programs: tuple[str, ...], log: ctypes.Array[ctypes.c_char] | None,
                  sizes: Mapping[str, int]) -> None:
    bpf = lib()
    obj = bpf.bpf_object__open_file(str(object_path).encode(), None)
    if not obj:
        raise BpfError(ctypes.get_errno() or errno.ENOENT, f"opening {object_path}")
    try:
        for name in maps:
            handle = _find(bpf.bpf_object__find_map_by_name, obj, name, object_path)
            _check(bpf.bpf_map__set_pin_path(handle, str(pin_dir / name).encode()), f"map {name}")
            if name in sizes:  # the object's max_entries are a ceiling: a node sizes them
                _check(bpf.bpf_map__set_max_entries(handle, sizes[name]), f"sizing map {name}")
        for name in programs:
            handle = _find(bpf.bpf_object__find_program_by_name, obj, name, object_path)
            if log is not None:  # shared: loading stops at the first program rejected
                bpf.bpf_program__set_log_buf(handle, log, _LOG_SIZE)
        result = bpf.bpf_object__load(obj)
        if result < 0:
            raise BpfError(-result, f"loading {object_path.name}")
        for name in programs:
            handle = _find(bpf.bpf_object__find_program_by_name, obj, name, object_path)
            _check(bpf.bpf_program__pin(handle, str(pin_dir / name).encode()), f"pinning {name}")
    finally:
        bpf.bpf_object__close(obj)


def _find(finder, obj: int, name: str, object_path: Path) -> int:  # type: ignore[no-untyped-def]
    handle = finder(obj, name.encode())
    if not handle:
        raise BpfError(errno.ENOENT, f"{object_path.name} has no {name}")
    return int(handle)


def _tail(log: bytes, lines: int = 12) -> str:
    return "\n".join(log.decode(errors="replace").rstrip().splitlines()[-lines:])


def pinned(path: Path) -> int:
    """A new fd for a pinned program or map."""
    return _check(lib().bpf_obj_get(str(path).encode()), f"opening pinned {path}")


def attach(prog_fd: int, cgroup_fd: int, attach_type: str) -> None:
    _check(lib().bpf_prog_attach(prog_fd, cgroup_fd, ATTACH_TYPES[attach_type], BPF_F_ALLOW_MULTI),
           f"attaching the {attach_type} program")


def detach(prog_fd: int, cgroup_fd: int, attach_type: str) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, cgroup_fd, ATTACH_TYPES[attach_type]),
           f"detaching the {attach_type} program")


def attached_ids(cgroup_fd: int, attach_type: str, capacity: int = 64) -> list[int]:
    """Programs attached directly to the cgroup (not inherited), in run order."""
    ids = (ctypes.c_uint32 * capacity)()
    count = ctypes.c_uint32(capacity)
    flags = ctypes.c_uint32(0)
    _check(lib().bpf_prog_query(cgroup_fd, ATTACH_TYPES[attach_type], 0, ctypes.byref(flags),
                                ids, ctypes.byref(count)), f"querying {attach_type} programs")
    return list(ids[: count.value])


def program_info(prog_fd: int) -> ProgramInfo:
    buffer = ctypes.create_string_buffer(_INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, buffer, ctypes.byref(size)), "program info")
    raw = buffer.raw
    return ProgramInfo(int.from_bytes(raw[4:8], sys.byteorder),
                       raw[64:80].split(b"\0", 1)[0].decode(errors="replace"))


def program_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(map_fd, key, value, flags), "map update")


def map_delete(map_fd: int, key: bytes) -> bool:
    """False if the key was not there."""
    result = lib().bpf_map_delete_elem(map_fd, key)
    if result == -errno.ENOENT:
        return False
    _check(result, "map delete")
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    result = lib().bpf_map_lookup_elem(map_fd, key, value)
    if result == -errno.ENOENT:
        return None
    _check(result, "map lookup")
    return value.raw


def map_keys(map_fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """Every key (bounded by `limit`); entries may come and go meanwhile."""
    keys: list[bytes] = []
    current: bytes | None = None
    following = ctypes.create_string_buffer(key_size)
    while len(keys) < limit:
        result = lib().bpf_map_get_next_key(map_fd, current, following)
        if result == -errno.ENOENT:
            break
        _check(result, "map iteration")
        current = following.raw
        keys.append(current)
    return keys


def map_memory(fd: int) -> int:
    """The kernel memory a map holds (its fdinfo's memlock), in bytes; 0 if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
