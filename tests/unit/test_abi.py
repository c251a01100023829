"""The numbers and layouts Python hands the kernel and C libraries, checked against the C
headers of the machine the suite runs on: constants, struct sizes and offsets, sonames, and
the eBPF object's map layouts.

Each value in agent/ is written down by hand (no compiler on a node); a value that is only
right on x86_64 would pass every other test there. Here the platform's own compiler answers,
so `make test-arm64` (the suite on arm64, emulated) checks arm64's ABI with the same test."""

from __future__ import annotations

import ctypes
import importlib
import platform
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.dataplane import netns, sockets
from agent.dataplane.redirect import bpfmaps, libbpf
from agent.inpod import keeper
from agent.lab import topology

ROOT = Path(__file__).resolve().parents[2]
# the module, not the function of the same name that the package exports
watch = importlib.import_module("agent.controlplane.cni_install.watch")

# Every constant and layout below, as the platform's headers define it: one "NAME value" a line.
PROBE_C = r"""
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include <sched.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/inotify.h>
#include <netinet/in.h>
#include <linux/netfilter_ipv4.h>
#include <linux/sockios.h>
#include <linux/bpf.h>

#define SHOW(name, value) printf("%s %lld\n", name, (long long)(value))

int main(void) {
    SHOW("SO_ORIGINAL_DST", SO_ORIGINAL_DST);
    SHOW("IP_TRANSPARENT", IP_TRANSPARENT);
    SHOW("SO_NETNS_COOKIE", SO_NETNS_COOKIE);
    SHOW("CLONE_NEWNET", CLONE_NEWNET);
    SHOW("SIOCGSKNS", SIOCGSKNS);
    SHOW("sizeof(struct linger)", sizeof(struct linger));
    SHOW("sizeof(struct ucred)", sizeof(struct ucred));
    SHOW("sizeof(struct tm)", sizeof(struct tm));
    SHOW("sizeof(struct sockaddr_in)", sizeof(struct sockaddr_in));
    SHOW("offsetof(sockaddr_in, sin_port)", offsetof(struct sockaddr_in, sin_port));
    SHOW("offsetof(sockaddr_in, sin_addr)", offsetof(struct sockaddr_in, sin_addr));
    SHOW("sizeof(struct inotify_event)", sizeof(struct inotify_event));
    SHOW("offsetof(inotify_event, len)", offsetof(struct inotify_event, len));
    SHOW("IN_CLOSE_WRITE", IN_CLOSE_WRITE);
    SHOW("IN_MOVED_FROM", IN_MOVED_FROM);
    SHOW("IN_MOVED_TO", IN_MOVED_TO);
    SHOW("IN_CREATE", IN_CREATE);
    SHOW("IN_DELETE", IN_DELETE);
    SHOW("IN_DELETE_SELF", IN_DELETE_SELF);
    SHOW("IN_MOVE_SELF", IN_MOVE_SELF);
    SHOW("IN_Q_OVERFLOW", IN_Q_OVERFLOW);
    SHOW("IN_IGNORED", IN_IGNORED);
    SHOW("IN_ONLYDIR", IN_ONLYDIR);
    SHOW("IN_NONBLOCK", IN_NONBLOCK);
    SHOW("IN_CLOEXEC", IN_CLOEXEC);
    SHOW("BPF_CGROUP_SOCK_OPS", BPF_CGROUP_SOCK_OPS);
    SHOW("BPF_CGROUP_INET4_CONNECT", BPF_CGROUP_INET4_CONNECT);
    SHOW("BPF_CGROUP_INET6_CONNECT", BPF_CGROUP_INET6_CONNECT);
    SHOW("BPF_CGROUP_GETSOCKOPT", BPF_CGROUP_GETSOCKOPT);
    SHOW("BPF_F_ALLOW_MULTI", BPF_F_ALLOW_MULTI);
    SHOW("BPF_ANY", BPF_ANY);
    SHOW("BPF_NOEXIST", BPF_NOEXIST);
    SHOW("offsetof(bpf_prog_info, id)", offsetof(struct bpf_prog_info, id));
    SHOW("offsetof(bpf_prog_info, name)", offsetof(struct bpf_prog_info, name));
    SHOW("sizeof(bpf_prog_info.name)", sizeof(((struct bpf_prog_info *)0)->name));
    return 0;
}
"""


def _compiler() -> str:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:  # make deps installs gcc (it builds the keeper): never silently skipped
        pytest.fail("no C compiler: the ABI checks need the platform's gcc and headers")
    return compiler


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What this platform's C headers say, compiled and run here."""
    work = tmp_path_factory.mktemp("abi")
    (work / "probe.c").write_text(PROBE_C)
    subprocess.run([_compiler(), "-o", str(work / "probe"), str(work / "probe.c")], check=True,
                   capture_output=True, timeout=120)
    output = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True,
                            timeout=30).stdout
    values = dict(line.rsplit(" ", 1) for line in output.splitlines())
    return {name: int(value) for name, value in values.items()}


def test_socket_options_are_the_platforms(headers: dict[str, int]) -> None:
    assert headers["SO_ORIGINAL_DST"] == sockets.SO_ORIGINAL_DST
    assert headers["IP_TRANSPARENT"] == sockets.IP_TRANSPARENT
    # asm/socket.h: asm-generic on x86_64 and arm64, but not everywhere (alpha, mips, sparc)
    assert headers["SO_NETNS_COOKIE"] == bpfmaps.SO_NETNS_COOKIE


def test_setns_and_the_socket_netns_ioctl_are_the_platforms(headers: dict[str, int]) -> None:
    assert headers["CLONE_NEWNET"] == netns.CLONE_NEWNET
    assert headers["CLONE_NEWNET"] == topology._CLONE_NEWNET
    assert headers["SIOCGSKNS"] == keeper.SIOCGSKNS


def test_structs_packed_by_hand_have_the_platforms_size(headers: dict[str, int]) -> None:
    assert len(sockets._LINGER_RESET) == headers["sizeof(struct linger)"]
    assert keeper._UCRED.size == headers["sizeof(struct ucred)"]
    assert watch._EVENT_HEADER.size == headers["sizeof(struct inotify_event)"]
    assert headers["offsetof(inotify_event, len)"] == watch._EVENT_HEADER.size - 4  # the last "I"


def test_original_destination_reads_sockaddr_in_where_the_platform_puts_it(
        headers: dict[str, int]) -> None:
    raw = bytearray(headers["sizeof(struct sockaddr_in)"])
    raw[0:2] = struct.pack("=H", 2)  # AF_INET, host order
    port_at, addr_at = headers["offsetof(sockaddr_in, sin_port)"], headers["offsetof(sockaddr_in, sin_addr)"]
    raw[port_at:port_at + 2] = struct.pack("!H", 8080)
    raw[addr_at:addr_at + 4] = bytes([10, 42, 1, 7])

    class Answer:  # getsockopt's reply, as the kernel fills it
        def getsockopt(self, level: int, option: int, size: int) -> bytes:
            assert (level, option, size) == (0, headers["SO_ORIGINAL_DST"], len(raw))
            return bytes(raw)

    assert sockets.original_destination(Answer()) == ("10.42.1.7", 8080)  # type: ignore[arg-type]


def test_inotify_flags_are_the_platforms(headers: dict[str, int]) -> None:
    for name in ("IN_CLOSE_WRITE", "IN_MOVED_FROM", "IN_MOVED_TO", "IN_CREATE", "IN_DELETE",
                 "IN_DELETE_SELF", "IN_MOVE_SELF", "IN_Q_OVERFLOW", "IN_IGNORED", "IN_ONLYDIR"):
        assert getattr(watch, name) == headers[name], name


def test_struct_tm_is_as_large_as_the_one_openssl_fills(headers: dict[str, int]) -> None:
    """ASN1_TIME_to_tm writes a whole struct tm: a smaller ctypes Tm would be overrun."""
    from agent.identity import _libcrypto

    assert ctypes.sizeof(_libcrypto.Tm) == headers["sizeof(struct tm)"]


def test_bpf_numbers_and_prog_info_offsets_are_the_uapis(headers: dict[str, int]) -> None:
    attach_types = {"sockops": headers["BPF_CGROUP_SOCK_OPS"],
                    "connect4": headers["BPF_CGROUP_INET4_CONNECT"],
                    "connect6": headers["BPF_CGROUP_INET6_CONNECT"],
                    "getsockopt": headers["BPF_CGROUP_GETSOCKOPT"]}
    assert attach_types == libbpf.ATTACH_TYPES
    flags = (headers["BPF_F_ALLOW_MULTI"], headers["BPF_ANY"], headers["BPF_NOEXIST"])
    assert flags == (libbpf.BPF_F_ALLOW_MULTI, libbpf.BPF_ANY, libbpf.BPF_NOEXIST)
    # program_info() reads id at 4 and name[16] at 64 from a buffer of _INFO_SIZE bytes
    assert headers["offsetof(bpf_prog_info, id)"] == 4
    assert headers["offsetof(bpf_prog_info, name)"] == 64
    assert 64 + headers["sizeof(bpf_prog_info.name)"] == libbpf._INFO_SIZE


# ---------------------------------------------------------------- the eBPF object's maps

@pytest.fixture(scope="module")
def capture_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bpf/capture.c compiled as the Makefile does, with this platform's multiarch headers."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("no clang: make deps installs it (the eBPF programs are built with it)")
    triplet = subprocess.run([_compiler(), "-dumpmachine"], check=True, capture_output=True,
                             text=True).stdout.strip()
    target = tmp_path_factory.mktemp("bpf") / "capture.o"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
                    f"-I/usr/include/{triplet}", "-c", str(ROOT / "bpf" / "capture.c"),
                    "-o", str(target)], check=True, capture_output=True, timeout=300)
    return target


def _map_layouts(object_path: Path) -> dict[str, tuple[int, int]]:
    """(key size, value size) of each map, from the object's BTF: opening needs no privilege."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_object__open_file.restype = ctypes.c_void_p
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_object__find_map_by_name.restype = ctypes.c_void_p
    lib.bpf_object__find_map_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_object__close.argtypes = [ctypes.c_void_p]
    for size in ("bpf_map__key_size", "bpf_map__value_size"):
        getattr(lib, size).restype, getattr(lib, size).argtypes = ctypes.c_uint32, [ctypes.c_void_p]
    obj = lib.bpf_object__open_file(str(object_path).encode(), None)
    assert obj, f"libbpf cannot open {object_path}"
    try:
        layouts = {}
        for name in bpfmaps.MAPS:
            handle = lib.bpf_object__find_map_by_name(obj, name.encode())
            assert handle, name
            layouts[name] = (lib.bpf_map__key_size(handle), lib.bpf_map__value_size(handle))
        return layouts
    finally:
        lib.bpf_object__close(obj)


def test_the_map_layouts_python_packs_are_the_compiled_objects(capture_object: Path) -> None:
    layouts = _map_layouts(capture_object)
    cookie, pod_config = len(bpfmaps.cookie_key(1)), len(bpfmaps.pod_config_value(
        bpfmaps.OutboundPolicy(redirect_port=15001, proxy_mark=0x1)))

    assert layouts["pod_config"] == (cookie, pod_config) == (8, 8)  # ebpf.py reads 8 bytes
    assert layouts["stats"] == (cookie, bpfmaps.STATS_SIZE)
    assert layouts["skip_ports"] == (bpfmaps.PORT_KEY_SIZE, 1)
    assert layouts["skip_cidrs"] == (bpfmaps.CIDR_KEY_SIZE, 1)
    assert layouts["by_port"][0] == bpfmaps.PORT_KEY_SIZE
    assert layouts["by_cookie"][0] == cookie


# ---------------------------------------------------------------- sonames and paths

SONAME = re.compile(r"""["'](lib[A-Za-z0-9_+-]+\.so(?:\.\d+)+)["']""")


def _agent_sources() -> list[Path]:
    return [*sorted((ROOT / "agent").rglob("*.py")), ROOT / "cni" / "pinion_cni_reference.py"]


def test_every_library_the_agent_loads_is_named_by_soname_and_found_here() -> None:
    sonames = {m for path in _agent_sources() for m in SONAME.findall(path.read_text())}

    assert {"libbpf.so.1", "libnftables.so.1", "libcrypto.so.3", "libssl.so.3"} <= sonames
    for soname in sorted(sonames):
        ctypes.CDLL(soname)  # OSError names the library this platform lacks


X86_ISMS = re.compile(r"x86_64-linux-gnu|ld-linux-x86-64|/lib64/|\bamd64\b|SYS_[a-z]+|\.syscall\(")


def test_no_source_names_an_architecture_or_a_raw_syscall() -> None:
    """Multiarch paths, the x86_64 loader and syscall numbers differ on arm64: the agent
    reaches the kernel through libc and sonames only."""
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _agent_sources()
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if X86_ISMS.search(line)]
    assert found == []


def test_the_c_library_is_found_on_this_platform() -> None:
    """agent/memory.py finds libc through ctypes.util (ldconfig's per-architecture cache)."""
    from agent import memory

    assert memory._malloc_trim() is not None, f"no malloc_trim on {platform.machine()}"
