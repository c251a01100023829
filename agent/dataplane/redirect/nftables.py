"""The nftables backend: one `ip pinion` table per pod netns, replaced in one transaction.

Talks to the kernel through libnftables (ctypes), so no `nft` process is forked per pod.
Like every backend it acts on the calling thread's network namespace."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading

from agent.dataplane.redirect.plan import COMMENT_PREFIX, Action, Hook, Match, Plan, Rule

TABLE = "ip pinion"
# hook -> (chain name, chain declaration)
_CHAINS = {
    Hook.GUARD: ("guard", "type filter hook prerouting priority mangle; policy accept;"),
    Hook.REPLY_MARK: ("reply_mark", "type route hook output priority mangle; policy accept;"),
    Hook.INBOUND: ("inbound", "type nat hook prerouting priority dstnat; policy accept;"),
    Hook.OUTBOUND: ("outbound", "type nat hook output priority -100; policy accept;"),
}
_ACTIONS = {Action.RETURN: "return", Action.RESTORE_MARK: "meta mark set ct mark",
            Action.DROP: "drop"}
_NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(RuntimeError):
    pass


class _Libnftables:
    """Thin wrapper: one fresh context per command, so each binds to the caller's netns."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib = lib
        self._lock = threading.Lock()

    def run(self, commands: str, json_output: bool = False) -> str:
        if _lowest_free_fd() >= _FD_SETSIZE - 64:
            return _run_nft_process(commands, json_output)
        lib = self._lib
        with self._lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise NftError("nft_ctx_new failed")
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                if json_output:
                    lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
                status = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
                output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
                error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
            finally:
                lib.nft_ctx_free(ctx)
        if status != 0:
            raise NftError(error.strip() or f"nft failed with status {status}")
        return output


_FD_SETSIZE = 1024


def _lowest_free_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # the kernel gives the lowest free
    os.close(fd)
    return fd


def _run_nft_process(commands: str, json_output: bool) -> str:
    """The same commands through the `nft` binary. libnftables talks to netlink with
    select(), which glibc aborts the whole process for once the socket's fd is past
    FD_SETSIZE (1024): an agent holding a thousand connections would die at its next pod.
    A child starts with only its three fds; it inherits the calling thread's netns."""
    # With -j the command goes in argv: `nft -j -f -` reads the file as JSON commands, and
    # prints nothing for a `list` (status 0, nftables 1.0.6). Only `list`s ask for JSON.
    argv = ["nft", "-j", *commands.split()] if json_output else ["nft", "-f", "-"]
    try:
        done = subprocess.run(argv, input=None if json_output else commands, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"nft: {exc}") from None
    if done.returncode != 0:
        raise NftError(done.stderr.strip() or f"nft failed with status {done.returncode}")
    return done.stdout


class NftablesBackend:
    name = "nftables"

    def __init__(self) -> None:
        self._nft = _Libnftables()

    def render(self, plan: Plan) -> str:
        lines = [f"table {TABLE} {{"]
        for hook, (chain, declaration) in _CHAINS.items():
            lines.append(f"\tchain {chain} {{")
            lines.append(f"\t\t{declaration}")
            lines += [f"\t\t{_render_rule(rule)}" for rule in plan.for_hook(hook)]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def apply(self, plan: Plan) -> None:
        """Install the whole table in one transaction. A new pod takes the fast path (`create`
        fails atomically if the table exists); otherwise add-then-delete replaces it. Deleting
        a table with base chains waits for the kernel to synchronise (10-20 ms), so only a
        re-apply pays that."""
        rules = self.render(plan)
        try:
            self._nft.run(f"create table {TABLE}\n" + rules)
        except NftError as exc:
            if "File exists" not in str(exc):
                raise
            self._nft.run(f"add table {TABLE}\ndelete table {TABLE}\n" + rules)

    def prepare(self) -> None:
        """Nothing to load ahead of time."""

    def remove(self) -> None:
        self._nft.run(f"add table {TABLE}\ndelete table {TABLE}\n")

    def installed(self) -> set[str]:
        try:
            output = self._nft.run(f"list table {TABLE}", json_output=True)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return set()
            raise
        items = json.loads(output).get("nftables", [])
        comments = (item["rule"].get("comment", "") for item in items if "rule" in item)
        return {c for c in comments if c.startswith(COMMENT_PREFIX)}

    def count_rules(self) -> int:
        """All rules in this netns, any table: how much the node itself uses nftables."""
        output = self._nft.run("list ruleset", json_output=True)
        return sum(1 for item in json.loads(output).get("nftables", []) if "rule" in item)


def _render_rule(rule: Rule) -> str:
    parts = _render_match(rule.match)
    if rule.match.new_over_rate is not None:  # a meter: one bucket per source, forgotten idle
        rate, burst = rule.match.new_over_rate
        parts.append(f"ct state new meter {rule.name.replace('-', '_')} size 4096 "
                     f"{{ ip saddr timeout 10s limit rate over {rate}/second burst {burst} packets }}")
    if rule.action is Action.REDIRECT:
        if not rule.match.tcp or rule.redirect_port is None:
            raise ValueError(f"{rule.name}: redirect needs a TCP match and a port")
        parts.append(f"redirect to :{rule.redirect_port}")
    elif rule.action is Action.SET_CONNMARK:
        parts.append(f"ct mark set {rule.mark_value:#x}")
    else:
        parts.append(_ACTIONS[rule.action])
    parts.append(f'comment "{rule.comment}"')
    return " ".join(parts)


def _render_match(match: Match) -> list[str]:
    parts: list[str] = []
    if match.mark is not None:
        parts.append(f"meta mark {match.mark:#x}")
    if match.ct_mark is not None:
        parts.append(f"ct mark {match.ct_mark:#x}")
    if match.in_iface:
        parts.append(f'iifname "{match.in_iface}"')
    if match.out_iface:
        parts.append(f'oifname "{match.out_iface}"')
    if match.src_cidrs:
        parts.append(f"ip saddr {_set(match.src_cidrs)}")
    if match.dst_cidrs:
        parts.append(f"ip daddr {_set(match.dst_cidrs)}")
    if match.tcp and match.dst_ports:
        parts.append(f"tcp dport {_set(match.dst_ports)}")
    elif match.tcp:
        parts.append("meta l4proto tcp")
    return parts


def _set(values: tuple[str, ...] | tuple[int, ...]) -> str:
    if len(values) == 1:
        return str(values[0])
    return "{ " + ", ".join(str(v) for v in values) + " }"
