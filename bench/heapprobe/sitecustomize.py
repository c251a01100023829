"""A heap probe for an agent under bench/overload.py (issue #21): what stays after a burst.

Loaded into every Python process started with this directory on PYTHONPATH and
PINION_PROBE=1 set; it does nothing until SIGUSR1. The first signal records the process's
anonymous mappings; each later one writes /tmp/pinion-heapprobe-<pid>-<n>.txt with glibc's
mallinfo2(), smaps' resident memory by kind of mapping (1 MiB anonymous ones are pymalloc
arenas), `sys._debugmallocstats()`, the objects living in anonymous memory mapped since the
first signal (gc-tracked ones, then what they refer to: ints, floats, strings; by type, with a
few samples and their owners) and the Python containers of 32 KiB or more.

    sudo PINION_PROBE=1 PYTHONPATH=$PWD/bench/heapprobe .venv/bin/python bench/overload.py \\
        --modes nftables --signal-agent USR1

The probe's own lists and tuples show up in its report too; it takes seconds at 0.2 CPU."""

from __future__ import annotations

import os

if os.environ.get("PINION_PROBE"):
    import bisect
    import collections
    import ctypes
    import gc
    import signal
    import sys
    import tempfile
    from types import FrameType

    _state: dict[str, object] = {"n": 0, "before": None}
    Span = tuple[int, int]

    def _anonymous() -> list[Span]:
        spans = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) == 5 or (len(parts) >= 6 and parts[5] == "[heap]"):
                    low, high = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((low, high))
        return spans

    def _subtract(after: list[Span], before: list[Span]) -> list[Span]:
        out = []
        for low, high in after:
            pieces = [(low, high)]
            for b_low, b_high in before:
                kept = []
                for p_low, p_high in pieces:
                    if b_high <= p_low or b_low >= p_high:
                        kept.append((p_low, p_high))
                        continue
                    if p_low < b_low:
                        kept.append((p_low, b_low))
                    if b_high < p_high:
                        kept.append((b_high, p_high))
                pieces = kept
            out += pieces
        return out

    def _mallocstats() -> str:
        with tempfile.TemporaryFile("w+") as tmp:  # it writes to the C stderr
            saved = os.dup(2)
            os.dup2(tmp.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            return tmp.read()

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    def _glibc() -> str:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        sizes = ", ".join(f"{name}={getattr(info, name) / 2**20:.2f}M"
                          for name in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost"))
        return f"# glibc: {sizes}, hblks={info.hblks}"

    def _resident_by_kind() -> str:
        rss: collections.Counter[str] = collections.Counter()
        kind = None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    size = high - low
                    if len(fields) >= 6:
                        kind = "file" if fields[5].startswith("/") else fields[5]
                    else:
                        kind = "anon-1M" if size == 2**20 else "anon"
                elif fields[0] == "Rss:" and kind is not None:
                    rss[kind] += int(fields[1])
        return "# resident kB by kind: " + ", ".join(f"{k}={v}" for k, v in rss.most_common())

    def _objects_in(new: list[Span]) -> list[str]:
        spans = sorted(new)
        lows = [low for low, _ in spans]

        def inside(address: int) -> bool:
            at = bisect.bisect_right(lows, address) - 1
            return at >= 0 and address < spans[at][1]

        lines = []
        objects = gc.get_objects()
        # only what lies in new memory is remembered: a set of every object's id would cost
        # the agent more than its cgroup leaves it (OOM-killed at 48 and 64 MiB)
        seen = {id(o) for o in objects if inside(id(o))}
        tracked: collections.Counter[str] = collections.Counter()
        samples: dict[str, list[str]] = collections.defaultdict(list)
        for obj in objects:
            if inside(id(obj)):
                name = type(obj).__qualname__
                tracked[name] += 1
                if len(samples[name]) < 4:
                    owners = [type(r).__qualname__ for r in gc.get_referrers(obj)[:3] if r is not objects]
                    samples[name].append(f"{repr(obj)[:160]}  <- {owners}")
        other: collections.Counter[str] = collections.Counter()
        other_samples: dict[str, list[str]] = collections.defaultdict(list)
        for obj in objects:
            for ref in gc.get_referents(obj):
                if id(ref) in seen or not inside(id(ref)):
                    continue
                seen.add(id(ref))
                name = type(ref).__qualname__
                other[name] += 1
                if len(other_samples[name]) < 4:
                    other_samples[name].append(
                        f"{repr(ref)[:100]}  <- {type(obj).__qualname__} {repr(obj)[:80]}")
        lines.append(f"# gc objects in new memory: {sum(tracked.values())}")
        for name, count in tracked.most_common(40):
            lines.append(f"{count:6d} {name}")
            lines += [f"         {s}" for s in samples[name]]
        lines.append(f"# objects they refer to in new memory: {sum(other.values())}")
        for name, count in other.most_common(30):
            lines.append(f"{count:6d} {name}")
            lines += [f"         {s}" for s in other_samples[name]]
        return lines

    def _big_containers() -> list[str]:
        objects = gc.get_objects()
        untracked = {}
        for obj in objects:
            for ref in gc.get_referents(obj):
                if isinstance(ref, (dict, set, frozenset, list, bytearray, bytes, str)) \
                        and not gc.is_tracked(ref) and sys.getsizeof(ref) >= 32768:
                    untracked[id(ref)] = ref  # the big ones only: all would not fit the cgroup
        big = []
        for obj in [*objects, *untracked.values()]:
            if not isinstance(obj, (dict, set, frozenset, list, bytearray, bytes, str,
                                    collections.deque)):
                continue
            size = sys.getsizeof(obj)
            if size >= 32768:
                owners = [type(r).__qualname__ for r in gc.get_referrers(obj)[:4]]
                head = repr(list(obj)[:3] if isinstance(obj, dict) else obj[:60]
                            if isinstance(obj, (bytes, str)) else "")[:120]
                big.append((size, type(obj).__qualname__, len(obj), owners, head))
        big.sort(reverse=True)
        lines = [f"# containers of 32 KiB or more: {len(big)}, {sum(b[0] for b in big) / 2**20:.2f} MiB"]
        lines += [f"   {b[0]:9d} {b[1]} len={b[2]} owners={b[3]} {b[4]}" for b in big[:25]]
        return lines

    def _heap_census() -> list[str]:
        """glibc's main heap ([heap]) walked chunk by chunk: the chunks in use, by the Python
        type whose address sits where an object's ob_type would (plain or gc-tracked), else
        by size. Free chunks in tcache count as in use (they are few)."""
        types: dict[int, str] = {}
        for obj in gc.get_objects():
            kind = type(obj)
            types.setdefault(id(kind), kind.__qualname__)
        for kind in (bytes, str, int, float, tuple, list, dict, set, frozenset, bytearray):
            types.setdefault(id(kind), kind.__qualname__)
        heap = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("[heap]"):
                    heap = tuple(int(x, 16) for x in line.split()[0].split("-"))
        if heap is None:
            return ["# heap census: no [heap]"]
        low, high = heap
        memory = ctypes.string_at(low, high - low)
        census: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        at = 0
        chunks = []
        while at + 16 <= len(memory):
            size = int.from_bytes(memory[at + 8:at + 16], "little") & ~7
            if size < 32 or at + size > len(memory):
                break
            chunks.append((at, size))
            at += size
        for index, (at, size) in enumerate(chunks[:-1]):
            following = chunks[index + 1][0]
            if not int.from_bytes(memory[following + 8:following + 16], "little") & 1:
                continue  # free
            payload = at + 16
            name = None
            for offset in (8, 24):
                if payload + offset + 8 <= len(memory):
                    name = types.get(int.from_bytes(memory[payload + offset:payload + offset + 8],
                                                    "little"))
                    if name:
                        break
            label = name or f"<{1 << (size - 1).bit_length()} B>"
            census[label] += 1
            sizes[label] += size
        lines = [f"# heap census: {len(chunks)} chunks, in use {sum(sizes.values()) / 2**20:.2f} MiB"]
        lines += [f"census {label!s:40} {census[label]:7d} {sizes[label]:10d}"
                  for label, _ in sizes.most_common(60)]
        return lines

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        n = int(str(_state["n"])) + 1
        _state["n"] = n
        gc.collect()
        spans = _anonymous()
        stats = _mallocstats()
        lines = [_glibc(), _resident_by_kind()]
        lines += [line for line in stats.splitlines() if line.startswith("# arenas")
                  or "unused pools" in line or line.startswith("# bytes in")]
        before = _state["before"]
        if isinstance(before, list):
            new = _subtract(spans, before)
            lines.append(f"# anonymous memory mapped since the first signal: {len(new)} spans, "
                         f"{sum(high - low for low, high in new) / 2**20:.2f} MiB")
            lines += _objects_in(new)
        else:
            _state["before"] = spans
        lines += _big_containers()
        lines += _heap_census()
        with open(f"/tmp/pinion-heapprobe-{os.getpid()}-{n}.txt", "w") as report:
            report.write("\n".join(lines) + "\n\n" + stats)

    signal.signal(signal.SIGUSR1, _on_signal)
