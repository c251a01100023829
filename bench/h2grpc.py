#!/usr/bin/env python3
"""HTTP/2 (h2load) and gRPC through Pinion, side by side with direct and the haproxy mTLS pair.

This is issue #16's "HTTP/2 and gRPC measured the same way": it runs the shared yardstick
`side_by_side.py` (beside the checkout in `../shared/bench`, not in this repository) with other
loads. Its `Bench` builds the ONE lab (two nodes, pods through the real CNI chain, one
`pinion agent --identity-dir` per node), the peers (haproxy pair: TLS 1.3, `mode tcp`,
`nbthread 1`), checks every HTTP/1 path (body, metrics, plaintext on the wire, certificates),
and measures (CPU of both proxy ends per run from /proc, Pinion's /metrics before and after
each run, RSS/PSS at the end). This subclass adds, in the same pods:

  nginx        h2c listeners (`listen P http2;`, the same 1 KiB file): web-plain :82,
               web-mesh :82 (HTTP metrics) and :83 (declared opaque)
  gRPC server  a unary echo service (grpcio, generic handler, raw bytes): web-plain :50051,
               web-mesh :50051 (HTTP metrics) and :50052 (declared opaque)
  haproxy      the yardstick's pair restarted with two more frontend/backend pairs, the same
               TLS lines, to web-plain :82 and :50051

Configurations, interleaved by round (order rotated each round): direct, haproxy, pinion
(mTLS + h2 observation), pinion-opaque. Loads per protocol: saturating (`h2load -c C -m M -D S`;
gRPC: G concurrent unary calls over one channel for S s) and paced (`h2load -c C --rps R/C`;
gRPC: R calls/s from G workers over one channel). Before measuring, each new path is checked:
the body/echo comes back, Pinion counted the requests (gRPC: `response_total{grpc_status="0",
classification="success"}`) and none on the opaque ports, and a marker in the response body
(h2) / the request message (gRPC) crosses the underlay in plaintext only on the direct path.

Usage (root; progress on stderr, markdown on stdout):
    flock /tmp/pinion-bench.lock .venv/bin/python bench/h2grpc.py --quick > h2grpc.md   (~2 min)
    .venv/bin/python bench/h2grpc.py --checkout DIR --yardstick DIR --rounds 3 --duration 10
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from types import ModuleType

import hops  # beside this script
import tracing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_YARDSTICK = os.path.join(os.path.dirname(REPO), "shared", "bench")
CONFIGS = ("direct", "haproxy", "pinion", "pinion-opaque")
PROTOS = ("h2", "grpc")
LOADS = ("ka", "paced")
H2_PORT, H2_OPAQUE = 82, 83
GRPC_PORT, GRPC_OPAQUE = 50051, 50052
HA_H2_CLI, HA_H2_SRV = 25012, 25454
HA_GRPC_CLI, HA_GRPC_SRV = 25022, 25464
GRPC_METHOD = "/pinion.bench.Echo/Echo"

# Both run inside the pods with the checkout's venv python (grpcio); printed formats are the
# ones the yardstick's Bench.measure parses: a `SBSRESULT k=v ...` line (load "ka") or one JSON
# object (load "paced").
GRPC_SERVER = r'''
import asyncio, sys
import grpc

async def echo(request, context):
    return request

async def main(ports):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "pinion.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    for port in ports:
        server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    print("serving", ports, flush=True)
    await server.wait_for_termination()

asyncio.run(main([int(p) for p in sys.argv[1:]]))
'''

GRPC_CLIENT = r'''
"""usage: target check|sat|paced concurrency duration rate size [marker]"""
import asyncio, json, math, sys
import grpc

METHOD = "%METHOD%"

def pct(v, p):
    return None if not v else round(v[max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v)) - 1))] * 1e6)

async def main(target, mode, conc, duration, rate, size, marker):
    payload = (marker.encode() + b"x" * size)[:max(size, len(marker))]
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        loop = asyncio.get_running_loop()
        try:  # warm-up: one call per worker, before the clock
            got = await asyncio.wait_for(asyncio.gather(*(call(payload) for _ in range(conc))), 20)
        except Exception as e:
            print(json.dumps({"fatal": "warm-up call: %s: %s" % (type(e).__name__, str(e)[:200])}))
            return
        if any(g != payload for g in got):
            print(json.dumps({"fatal": "warm-up echo differs"}))
            return
        if mode == "check":
            print(json.dumps({"ok": len(got)}))
            return
        lat, co = [], []
        err = {"n": 0, "first": ""}

        async def one(due):
            t0 = loop.time()
            try:
                r = await call(payload)
            except grpc.RpcError as e:
                err["n"] += 1
                err["first"] = err["first"] or "%s %s" % (e.code(), (e.details() or "")[:80])
                return
            t1 = loop.time()
            if r != payload:
                err["n"] += 1
                err["first"] = err["first"] or "echo differs"
                return
            lat.append(t1 - t0)
            co.append(t1 - due)

        start = loop.time() + 0.1
        if mode == "sat":
            end = start + duration

            async def worker():
                await asyncio.sleep(start - loop.time())
                while loop.time() < end:
                    await one(loop.time())
        else:
            total = int(round(rate * duration))

            async def worker(k):
                for i in range(k, total, conc):
                    due = start + i / rate
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    await one(due)
        timed_out = 0
        try:
            workers = [worker() if mode == "sat" else worker(k) for k in range(conc)]
            await asyncio.wait_for(asyncio.gather(*workers), duration + 20)
        except asyncio.TimeoutError:
            timed_out = 1
        elapsed = loop.time() - start
    lat.sort(); co.sort()
    if mode == "sat":
        print("SBSRESULT requests=%d duration_s=%.3f rps=%.1f p50_us=%d p99_us=%d p999_us=%d errors=%d "
              "e_connect=0 e_read=0 e_write=0 e_status=%d e_timeout=%d" % (
                  len(lat) + conc, elapsed, len(lat) / elapsed, pct(lat, 50) or 0, pct(lat, 99) or 0,
                  pct(lat, 99.9) or 0, err["n"], err["n"], timed_out))
        return
    print(json.dumps({"ok": len(lat), "scheduled": total, "warm": conc, "errors": err["n"],
                      "first_error": err["first"], "timed_out": timed_out, "rps": len(lat) / elapsed,
                      "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "p999_us": pct(lat, 99.9),
                      "co_p99_us": pct(co, 99), "co_p999_us": pct(co, 99.9)}))

a = sys.argv[1:]
asyncio.run(main(a[0], a[1], int(a[2]), float(a[3]), float(a[4]), int(a[5]), a[6] if len(a) > 6 else ""))
'''.replace("%METHOD%", GRPC_METHOD)

# Runs h2load in the client pod and prints its result the way Bench.measure reads it.
H2LOAD_WRAP = r'''
import json, math, re, subprocess, sys

mode, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
cp = subprocess.run(["h2load", "--log-file", log, *argv], capture_output=True, text=True, timeout=600)
out = cp.stdout + cp.stderr
sys.stderr.write(out)
fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                r"(\d+) errored, (\d+) timeout", out)
st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
if not (fin and req and st):
    print(json.dumps({"fatal": "h2load gave no result (rc %d): %s" % (cp.returncode, out.strip()[-200:])}))
    sys.exit(0)
lat = []
with open(log) as f:
    for ln in f:
        p = ln.split("\t")
        if len(p) >= 3 and p[1].strip().lstrip("-").isdigit() and int(p[1]) == 200:
            lat.append(int(p[2]))
lat.sort()
pct = lambda p: None if not lat else lat[max(0, min(len(lat) - 1, math.ceil(p / 100.0 * len(lat)) - 1))]
done, ok = int(req.group(3)), int(st.group(1))
non2xx = int(st.group(2)) + int(st.group(3)) + int(st.group(4))
errors = int(req.group(5)) + int(req.group(6)) + int(req.group(7)) + non2xx
first = "" if not errors else "failed %s errored %s timeout %s non-2xx %d" % (
    req.group(5), req.group(6), req.group(7), non2xx)
if mode == "ka":
    print("SBSRESULT requests=%d duration_s=%s rps=%s p50_us=%d p99_us=%d p999_us=%d errors=%d "
          "e_connect=0 e_read=0 e_write=0 e_status=%d e_timeout=%s" % (
              done, fin.group(1), fin.group(2), pct(50) or 0, pct(99) or 0, pct(99.9) or 0, errors, errors,
              req.group(7)))
else:
    print(json.dumps({"ok": ok, "warm": 0, "errors": errors, "first_error": first, "timed_out": 0,
                      "rps": float(fin.group(2)), "p50_us": pct(50), "p99_us": pct(99), "p999_us": pct(99.9),
                      "co_p99_us": None, "co_p999_us": None}))
'''


def log(msg: str) -> None:
    print(f"[h2grpc {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_yardstick(directory: str) -> ModuleType:
    """Import side_by_side.py (and its lab.py) from `directory`, or exit saying what is missing."""
    missing = [f for f in ("side_by_side.py", "lab.py") if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        sys.exit(f"h2grpc: the shared yardstick is missing: no {' or '.join(missing)} in {directory}.\n"
                 f"It is not part of this repository; it lives beside the checkout in ../shared/bench. "
                 f"Point at it with --yardstick DIR (or $PINION_YARDSTICK).")
    sys.path.insert(0, directory)
    import side_by_side
    return side_by_side


def derived_haproxy(text: str, routes) -> str:
    """The yardstick's haproxy config plus one copy of its `frontend mtls` block per route
    (name, old -> new bind/connect strings): the same TLS lines, other ports and upstreams."""
    block = text[text.index("frontend mtls"):]
    out = [text.rstrip("\n")]
    for name, swaps in routes:
        b = block.replace("mtls", f"mtls_{name}").replace("backend app", f"backend app_{name}")
        for old, new in swaps:
            if old not in b:
                raise RuntimeError(f"haproxy config of the yardstick changed: {old!r} not found")
            b = b.replace(old, new)
        out.append(b.rstrip("\n"))
    return "\n".join(out) + "\n"


def make_bench(sbs: ModuleType, lab: ModuleType):
    """The yardstick's Bench with HTTP/2 and gRPC servers, routes and loads."""

    class OpaqueLab(sbs.BenchLab):
        """The yardstick's lab; meshed pods declare the h2c and gRPC 'opaque' ports opaque too."""

        def add_bench_pod(self, node, namespace, name, sa="default", extra=None, **kw):
            extra = dict(extra or {})
            if "PINION_OPAQUE_PORTS" in extra:
                extra["PINION_OPAQUE_PORTS"] = f"{extra['PINION_OPAQUE_PORTS']},{H2_OPAQUE},{GRPC_OPAQUE}"
            return super().add_bench_pod(node, namespace, name, sa, extra, **kw)

    class H2GrpcBench(sbs.Bench):
        def __init__(self, s, checkout, shown, args):
            super().__init__(s, checkout, shown)
            self.args = args
            self.proto = "h2"
            self.cfgs = {}
            self.active = list(CONFIGS)

        # -- lab --------------------------------------------------------------------
        def run(self) -> None:
            self.loads.append(("start", sbs.loadavg()))
            with OpaqueLab("h2g") as L:
                self.L = L
                try:
                    self.setup()
                    self.verify()  # the yardstick's HTTP/1 checks of every path (stunnel too: it is up)
                    self.active = [c for c in self.active if c in CONFIGS]
                    self.verify_h2grpc()
                    self.warmup()
                    self.measure_rounds()
                    self.loads.append(("after the rounds", sbs.loadavg()))
                    if self.args.pyspy:
                        self.profile()
                    if self.args.strace:
                        self.syscalls()
                    if self.args.hops:
                        self.hops()
                    self.memory_end()
                except (Exception, lab.Interrupted) as e:
                    self.fatal = f"{type(e).__name__}: {e}"
                    log("FATAL: " + self.fatal)
                    traceback.print_exc()
                    self.collect_agent_logs()
                    if isinstance(e, lab.Interrupted):
                        raise
                    return
                self.loads.append(("end", sbs.loadavg()))
                others = [n for n in lab.list_netns() if not n.startswith(L.prefix)]
                self.meta["netns_others_end"] = len(others)
                self.collect_agent_logs()
                log("tearing down the lab")

        def start_nginx(self, pod, ports, wc=8192):
            """The yardstick's nginx, plus h2c listeners (same server block, same file)."""
            h2 = [H2_PORT, H2_OPAQUE] if pod.name == "web-mesh" else [H2_PORT]
            d = os.path.join(self.L.tmp, f"nginx-{pod.name}")
            os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
            conf = sbs.nginx_conf(d, self.www, ports, wc).rstrip()
            # h2c in its own server block: with the yardstick's `sendfile on` nginx 1.22 holds h2
            # responses ~40 ms at low concurrency (paced h2load: ~360 of 1,000 req/s, p50 44 ms).
            listens = "".join(f"        listen {p} http2 backlog=4096;\n" for p in h2)
            conf = (conf[:-1] + f"    server {{\n{listens}        server_name _;\n        root {self.www};\n"
                    "        sendfile off;\n        location / { }\n    }\n}\n")
            with open(os.path.join(d, "nginx.conf"), "w") as f:
                f.write(conf)
            return self.L.spawn_in(pod.netns, ["nginx", "-e", os.path.join(d, "error.log"), "-c",
                                               os.path.join(d, "nginx.conf")], f"nginx-{pod.name}")

        def start_peers(self) -> None:
            """The yardstick's peers; haproxy restarted with h2c and gRPC routes added."""
            super().start_peers()
            L, d = self.L, self.L.tmp
            gw, under = L.nodes["n1"].gateway, L.nodes["n2"].underlay_ip
            up = f"server web {self.web_plain.ip}:{sbs.HTTP_PORT}\n"
            routes = {
                "client": [(n, [(f"{gw}:{sbs.HA_CLI}\n", f"{gw}:{c}\n"),
                                (f"{under}:{sbs.HA_SRV} ", f"{under}:{s} ")])
                           for n, c, s in (("h2", HA_H2_CLI, HA_H2_SRV), ("grpc", HA_GRPC_CLI, HA_GRPC_SRV))],
                "server": [(n, [(f"{under}:{sbs.HA_SRV} ", f"{under}:{s} "),
                                (up, f"server web {self.web_plain.ip}:{p}\n")])
                           for n, s, p in (("h2", HA_H2_SRV, H2_PORT), ("grpc", HA_GRPC_SRV, GRPC_PORT))],
            }
            for side, r in routes.items():
                path = f"{d}/haproxy-{side}.cfg"
                with open(path) as f:
                    text = derived_haproxy(f.read(), r)
                with open(path, "w") as f:
                    f.write(text)
                lab.sh(["haproxy", "-c", "-q", "-f", path], what=f"haproxy -c ({side}, with h2/gRPC routes)")
            L._stop_many([self.ha_c, self.ha_s], grace=3.0)
            self.ha_s = L.spawn_in(L.nodes["n2"].netns, ["haproxy", "-db", "-f", f"{d}/haproxy-server.cfg"],
                                   "haproxy-server")
            self.ha_c = L.spawn_in(L.nodes["n1"].netns, ["haproxy", "-db", "-f", f"{d}/haproxy-client.cfg"],
                                   "haproxy-client")
            self.wait_listen(L.nodes["n2"].netns, [sbs.HA_SRV, HA_H2_SRV, HA_GRPC_SRV], "haproxy server")
            self.wait_listen(L.nodes["n1"].netns, [sbs.HA_CLI, HA_H2_CLI, HA_GRPC_CLI], "haproxy client")

        def setup(self) -> None:
            super().setup()
            L = self.L
            py = self.args.grpc_python
            self.files = {}
            for name, text in (("grpc_server.py", GRPC_SERVER), ("grpc_client.py", GRPC_CLIENT),
                               ("h2load_wrap.py", H2LOAD_WRAP)):
                self.files[name] = os.path.join(L.tmp, name)
                with open(self.files[name], "w") as f:
                    f.write(text)
            self.grpc_plain = L.spawn_in(self.web_plain.netns, [py, self.files["grpc_server.py"], GRPC_PORT],
                                         "grpc-web-plain")
            self.grpc_mesh = L.spawn_in(self.web_mesh.netns, [py, self.files["grpc_server.py"], GRPC_PORT,
                                                              GRPC_OPAQUE], "grpc-web-mesh")
            self.wait_listen(self.web_plain.netns, [H2_PORT, GRPC_PORT], "web-plain h2c/gRPC", timeout=20)
            self.wait_listen(self.web_mesh.netns, [H2_PORT, H2_OPAQUE, GRPC_PORT, GRPC_OPAQUE],
                             "web-mesh h2c/gRPC", timeout=20)
            gw = L.nodes["n1"].gateway
            ports = {"h2": (H2_PORT, HA_H2_CLI, H2_OPAQUE), "grpc": (GRPC_PORT, HA_GRPC_CLI, GRPC_OPAQUE)}
            for proto, (port, ha_port, opaque) in ports.items():
                srv_plain, srv_mesh = ((self.nginx_plain, self.nginx_mesh) if proto == "h2"
                                       else (self.grpc_plain, self.grpc_mesh))
                self.cfgs[proto] = {
                    "direct": dict(cli=self.cli_plain, host=self.web_plain.ip, port=port, procs=(),
                                   nginx=srv_plain),
                    "haproxy": dict(cli=self.cli_plain, host=gw, port=ha_port, procs=(self.ha_c, self.ha_s),
                                    nginx=srv_plain),
                    "pinion": dict(cli=self.cli_mesh, host=self.web_mesh.ip, port=port, procs=None,
                                   nginx=srv_mesh),
                    "pinion-opaque": dict(cli=self.cli_mesh, host=self.web_mesh.ip, port=opaque, procs=None,
                                          nginx=srv_mesh),
                }
            self.http1_cfg = self.cfg
            self.meta["h2load"] = self.tool_version(["h2load", "--version"], r"nghttp2/(\S+)")
            self.meta["grpcio"] = self.tool_version([py, "-c", "import grpc; print(grpc.__version__)"],
                                                    r"(\S+)")

        @staticmethod
        def tool_version(argv, pattern):
            try:
                cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                return "?"
            m = re.search(pattern, cp.stdout + cp.stderr)
            return m.group(1) if m else "?"

        def long_lived(self):
            extra = [("grpc web-plain", getattr(self, "grpc_plain", None)),
                     ("grpc web-mesh", getattr(self, "grpc_mesh", None))]
            return super().long_lived() + [(n, p) for n, p in extra if p is not None]

        def counters(self) -> dict:
            c = super().counters()
            _, s2 = self.L.metrics("n2")
            c["in_grpc_ok"] = lab.total(s2, "response_total", direction="inbound", namespace=sbs.NS,
                                        pod="web-mesh", grpc_status="0", classification="success")
            return c

        # -- checks -------------------------------------------------------------------
        def one_check(self, proto, cfg, marker):
            c = self.cfgs[proto][cfg]
            if proto == "h2":
                url = f"http://{c['host']}:{c['port']}/h2-{cfg}.txt"
                argv = ["curl", "-sS", "--http2-prior-knowledge", "--noproxy", "*", "--max-time", "5",
                        "-w", " %{http_code} %{http_version}", url]
                got = [self.run_in(c["cli"].netns, argv, timeout=10).stdout for _ in range(3)]
                ok = all(g.startswith(f"{marker}-h2-{cfg}") and g.endswith(" 200 2") for g in got)
                return ok, f"3× h2c GET (curl --http2-prior-knowledge) -> {[g[-6:] for g in got]}"
            argv = [self.args.grpc_python, self.files["grpc_client.py"], f"{c['host']}:{c['port']}", "check",
                    "3", "0", "0", "256", f"{marker}-grpc-{cfg}"]
            out = self.run_in(c["cli"].netns, argv, timeout=30).stdout.strip()
            return out == '{"ok": 3}', f"3 unary Echo calls over one channel -> {out[:120]}"

        def verify_h2grpc(self) -> None:
            log("verifying the h2c and gRPC paths (answer, metrics, wire)")
            marker = f"h2g{random.getrandbits(64):016x}"
            for cfg in CONFIGS:
                with open(os.path.join(self.www, f"h2-{cfg}.txt"), "w") as f:
                    f.write(f"{marker}-h2-{cfg}" + "b" * 900)
            cap = self.L.start_capture(seconds=60)
            deltas = {}
            try:
                for proto in PROTOS:
                    for cfg in CONFIGS:
                        before = self.counters()
                        ok, what = self.one_check(proto, cfg, marker)
                        time.sleep(0.3)
                        after = self.counters()
                        deltas[proto, cfg] = {k: after[k] - before[k] for k in before}
                        if not ok:
                            raise lab.CheckFailed(f"{proto} {cfg}: {what}")
                        self.checks.append(f"{proto} {cfg}: {what}")
            finally:
                frames = self.L.stop_capture(cap)
            for proto in PROTOS:
                d, o = deltas[proto, "pinion"], deltas[proto, "pinion-opaque"]
                counted = d["in_req"] >= 3 and d["out_req"] >= 3 and (proto == "h2" or d["in_grpc_ok"] >= 3)
                opaque_ok = o["in_req_all"] == 0 and o["out_req"] == 0 and o["in_tcp"] >= 1
                self.checks.append(
                    f"{proto} pinion: n1 request_total{{direction=\"outbound\",tls=\"true\"}} "
                    f"+{d['out_req']:.0f}, n2 request_total{{direction=\"inbound\",tls=\"true\"}} "
                    f"+{d['in_req']:.0f}"
                    + (", n2 response_total{grpc_status=\"0\",classification=\"success\"} "
                       f"+{d['in_grpc_ok']:.0f}" if proto == "grpc" else "")
                    + f"; {proto} pinion-opaque: tcp_open_total{{tls=\"true\"}} +{o['in_tcp']:.0f}, "
                    f"request_total +{o['in_req_all']:.0f}")
                if not counted:
                    raise lab.CheckFailed(f"{proto}: Pinion did not count the checked requests: {d}")
                if not opaque_ok:
                    raise lab.CheckFailed(f"{proto}: the opaque port was not relayed as TCP only: {o}")
            seen = {(p, c): 0 for p in PROTOS for c in CONFIGS}
            for _sport, _dport, payload in sbs.tcp_payloads(frames):
                for p, c in seen:
                    if f"{marker}-{p}-{c}".encode() in payload:
                        seen[p, c] += 1
            for p in PROTOS:
                if not seen[p, "direct"]:
                    raise lab.CheckFailed(f"{p}: the marker was not seen in plaintext on the direct path: "
                                          "the wire check would mean nothing")
                leaked = [c for c in CONFIGS if c != "direct" and seen[p, c]]
                if leaked:
                    raise lab.CheckFailed(f"{p}: the marker crossed the underlay in plaintext for {leaked}")
            self.checks.append(
                f"underlay capture ({len(frames)} frames): marker (h2: in the response body; gRPC: in the "
                "request message) in plaintext on the direct path only: "
                + ", ".join(f"{p}/{c} {seen[p, c]}" for p in PROTOS for c in CONFIGS))

        # -- loads ----------------------------------------------------------------------
        def command(self, cfg, load):
            s, a, c = self.s, self.args, self.cfgs[self.proto][cfg]
            ns, tag = c["cli"].netns, f"{self.proto}-{load}-{cfg}-{time.monotonic_ns()}"
            dur = s.warm_s if load == "warm" else s.duration
            if self.proto == "h2":
                url = f"http://{c['host']}:{c['port']}{sbs.PATH_1K}"
                if load == "paced":
                    h2 = ["-c", str(s.conns), "-m", "1", "--rps", f"{s.rate / s.conns:g}",
                          "-n", str(int(s.rate * s.duration)), url]
                else:
                    h2 = ["-c", str(s.conns), "-m", str(a.h2_streams), "-D", str(dur), url]
                logf = os.path.join(self.L.tmp, "logs", "runs", f"{tag}.tsv")
                return (["ip", "netns", "exec", ns, sys.executable, self.files["h2load_wrap.py"],
                         "paced" if load == "paced" else "ka", logf, *h2], s.duration + 60)
            mode = "paced" if load == "paced" else "sat"
            conc = a.grpc_paced_conc if load == "paced" else a.grpc_conc
            return (["ip", "netns", "exec", ns, a.grpc_python, self.files["grpc_client.py"],
                     f"{c['host']}:{c['port']}", mode, str(conc), str(dur), str(s.rate), str(a.grpc_size)],
                    s.duration + 60)

        def measure_proto(self, proto, cfg, load, rnd):
            self.proto, self.cfg = proto, self.cfgs[proto]
            row = self.measure(cfg, load, rnd)
            if row is not None:
                row["load"] = f"{proto}-{load}"
            return row

        def warmup(self) -> None:
            log(f"warm-up ({self.s.warm_s} s saturating per config and protocol)")
            for proto in PROTOS:
                for cfg in list(self.active):
                    self.measure_proto(proto, cfg, "warm", 0)

        def measure_rounds(self) -> None:
            for r in range(self.s.rounds):
                self.loads.append((f"before round {r + 1}", sbs.loadavg()))
                for proto in PROTOS:
                    for load in LOADS:
                        order = [c for c in sbs.rotated(CONFIGS, r) if c in self.active]
                        log(f"round {r + 1}/{self.s.rounds} {proto} {load}: {' '.join(order)}")
                        for cfg in order:
                            if cfg in self.active:
                                self.measure_proto(proto, cfg, load, r + 1)
                                time.sleep(0.3)

        def profile(self) -> None:
            """py-spy (raw collapsed stacks, --native) of both agents during one more paced
            h2 run through Pinion with metrics, and one through the opaque port."""
            for cfg in ("pinion", "pinion-opaque"):
                agents = {self.L.nodes[name].agent.pid: os.path.join(self.args.pyspy, f"{cfg}-{name}.raw")
                          for name in ("n1", "n2")}
                tracing.pyspy(self.args.pyspy_bin, agents, self.s.duration, 500,
                              lambda cfg=cfg: self.measure_proto("h2", cfg, "paced", 99))

        def hops(self) -> None:
            """One more paced h2 run through Pinion with metrics, one opaque and one through
            haproxy under tcpdump (bench/hops.py): each request's time, hop by hop, on stderr."""
            nodes = {"node1": self.L.nodes["n1"].netns, "node2": self.L.nodes["n2"].netns}
            self.proto, self.cfg = "h2", self.cfgs["h2"]
            results = {}
            for cfg in ("pinion", "pinion-opaque", "haproxy"):
                c = self.cfg[cfg]
                server = self.web_plain if cfg == "haproxy" else self.web_mesh
                port = H2_OPAQUE if cfg == "pinion-opaque" else H2_PORT
                tls = HA_H2_SRV if cfg == "haproxy" else 15008
                client_ports = {c["port"]} if cfg == "haproxy" else {c["port"], 15001}
                results[cfg] = hops.captured_run(
                    self.args.hops, f"h2-{cfg}", {"client": c["cli"].netns, **nodes,
                                                  "server": server.netns},
                    lambda cfg=cfg: self.measure_proto("h2", cfg, "paced", 97), client_ports, tls, port)
            log("h2 paced, hop by hop (bench/hops.py; requests alone in flight):\n" + hops.table(results))

        def syscalls(self) -> None:
            """System calls of both agents (strace -c -f) during one more paced h2 run with
            metrics and one opaque, per request, on stderr (strace slows what it traces)."""
            os.makedirs(self.args.strace, exist_ok=True)
            for cfg in ("pinion", "pinion-opaque"):
                rows: list[dict] = []
                calls = tracing.strace_calls(
                    [self.L.nodes[name].agent.pid for name in ("n1", "n2")],
                    os.path.join(self.args.strace, f"{cfg}.txt"),
                    lambda cfg=cfg, rows=rows: rows.append(self.measure_proto("h2", cfg, "paced", 98) or {}))
                n = rows[0].get("n") or 1
                log(f"{cfg}: system calls per request, both agents (strace -c, {n:.0f} requests)")
                for name, count in sorted(calls.items(), key=lambda kv: -kv[1]):
                    log(f"  {name:16s} {count / n:6.2f}")

        # -- report ---------------------------------------------------------------------
        def render(self) -> str:
            return render(self, sbs)

    return H2GrpcBench


def render(b, sbs) -> str:
    """Markdown: facts, checks, one table per protocol with ratios vs haproxy, memory, raw rows."""
    s, M, a = b.s, b.meta, b.args
    fnum, med = sbs.fnum, sbs.med
    o = []
    w = o.append
    w("# HTTP/2 and gRPC through Pinion, side by side with direct and the haproxy mTLS pair\n")
    if b.fatal:
        w(f"**RUN FAILED: {b.fatal}** — figures below are what was measured before it.\n")
    dirty = " (uncommitted changes)" if M.get("dirty") else ""
    h2_paced = f"h2load -c{s.conns} -m1 --rps {s.rate / s.conns:g} -n {int(s.rate * s.duration)}"
    fc = [r["foreign_cpu_s"] for r in b.rows]
    steal = med([r.get("steal_s") for r in b.rows])
    facts = [
        f"Date: {M.get('date', '?')}; elapsed {time.time() - b.t0:.0f} s; command: `{b.argv_shown}`",
        f"Machine: nproc {M.get('nproc')}, {M.get('cpu')}, kernel {M.get('kernel')}",
        f"Pinion: commit {M.get('commit')}{dirty}, agent Python {M.get('agent_python')}, uvloop "
        f"{M.get('uvloop')}; capture `{M.get('redirect', '?')}`",
        f"Tools: HAProxy {M.get('haproxy')}, OpenSSL {M.get('openssl')}, nginx {M.get('nginx')}, "
        f"h2load (nghttp2) {M.get('h2load')}, grpcio {M.get('grpcio')}",
        f"Parameters: {s.rounds} round(s), configurations interleaved (order rotated each round), each "
        f"cell the median of the rounds. HTTP/2: nginx h2c (`listen P http2`), 1 KiB file; saturating "
        f"`h2load -c{s.conns} -m{a.h2_streams} -D{s.duration}`; paced `{h2_paced}` ({s.rate:.0f} req/s). "
        f"gRPC: unary echo of {a.grpc_size} bytes (grpcio aio server, generic handler); saturating "
        f"{a.grpc_conc} concurrent calls over one channel for {s.duration} s; paced {s.rate:.0f} calls/s "
        f"from {a.grpc_paced_conc} workers over one channel. Warm-up: {s.warm_s} s saturating per config "
        f"and protocol.",
        "CPU: utime+stime of each proxy's process tree, both ends (haproxy client + server; Pinion: "
        "both agents), per run, per 1,000 requests; in paced runs the same number is vCPU per 1,000 req/s.",
        "**Load average** " + "; ".join(f"{k}: {v}" for k, v in b.loads)
        + f". Other netns at start: {M.get('netns_others_start', '?')}, at end: "
        f"{M.get('netns_others_end', '?')}. CPU of processes outside this run per measured run: median "
        f"{fnum(med(fc), 2)} s, max {fnum(max(fc) if fc else None, 2)} s (includes reaped children of "
        f"other sessions); steal median {fnum(steal, 2)} s per run.",
    ]
    o += [f"- {f}" for f in facts]
    w("\n## Checks before measuring\n")
    o += [f"- {c}" for c in b.checks]
    if b.problems:
        w("\n## Problems seen during the run\n")
        o += [f"- {p}" for p in b.problems]
    for proto, title in (("h2", "HTTP/2 (h2c, h2load)"), ("grpc", "gRPC (unary echo, grpcio)")):
        if any(r["load"].startswith(proto + "-") for r in b.rows):
            w(f"\n## {title}\n")
            o += protocol_table(b, sbs, proto)
    if b.mem_end:
        w("\n## Proxy memory at the end of the rounds (both ends)\n")
        w("| proxy | VmRSS MiB | PSS MiB | VmHWM MiB |")
        w("|---|---:|---:|---:|")
        for label, keys in (("haproxy pair", ("haproxy client (n1)", "haproxy server (n2)")),
                            ("Pinion, both agents", ("pinion agent n1", "pinion agent n2"))):
            if all(k in b.mem_end for k in keys):
                mib = {f: sum(b.mem_end[k][f] for k in keys) / 1024 for f in ("rss_kb", "pss_kb", "hwm_kb")}
                w(f"| {label} | {mib['rss_kb']:.1f} | {mib['pss_kb']:.1f} | {mib['hwm_kb']:.1f} |")
    w("\n## Raw per-run values\n")
    w("| load | config | round | req/s | n | p50 µs | p99 µs | cpu cli s | cpu srv s | server s | outside s "
      "| steal s | n2 in req (tcp) | failed |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = (("rps", 1), ("n", 0), ("p50_us", 0), ("p99_us", 0), ("cpu_cli_s", 2), ("cpu_srv_s", 2),
            ("nginx_cpu_s", 2), ("foreign_cpu_s", 2), ("steal_s", 2))
    for r in sorted(b.rows, key=lambda r: (r["load"], CONFIGS.index(r["cfg"]), r["round"])):
        cells = ["–" if r.get(k) is None else f"{r[k]:,.{nd}f}" for k, nd in keys]
        mm = f"{r['m_in_req_all']:.0f} ({r['m_in_tcp']:.0f})" if "m_in_req_all" in r else "–"
        err = f"{r.get('errors') or 0:.0f}" + (f" {r['err_detail']}" if r.get("errors") else "")
        w(f"| {r['load']} | {r['cfg']} | {r['round']} | " + " | ".join(cells) + f" | {mm} | {err} |")
    return "\n".join(o) + "\n"


def protocol_table(b, sbs, proto) -> list:
    """One row per configuration: saturating and paced figures, CPU per 1k and its ratio to haproxy."""
    fnum, ms, ratio = sbs.fnum, sbs.ms, sbs.ratio
    ka, pc = f"{proto}-ka", f"{proto}-paced"
    d_ka, h_ka = b.m("direct", ka, "rps"), b.m("haproxy", ka, "rps")
    d_p50, d_p99 = b.m("direct", pc, "p50_us"), b.m("direct", pc, "p99_us")
    h_cpu_ka, h_cpu_pc = b.per_k("haproxy", ka)[0], b.per_k("haproxy", pc)[0]
    out = ["| config | saturating req/s | range | vs direct | vs haproxy | sat. p99 ms "
           "| proxy CPU s / 1k req, sat. | ÷ haproxy | paced achieved req/s | paced p50 ms | paced p99 ms "
           "| p50 / p99 added vs direct ms | proxy vCPU / 1k req/s, paced | ÷ haproxy "
           "| Pinion counted, paced (n2 inbound / client) | failed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONFIGS:
        rps, p50, p99 = b.m(c, ka, "rps"), b.m(c, pc, "p50_us"), b.m(c, pc, "p99_us")
        cpu_ka, cpu_pc = b.per_k(c, ka)[0], b.per_k(c, pc)[0]
        added = "–"
        if c != "direct" and None not in (p50, p99, d_p50, d_p99):
            added = f"{(p50 - d_p50) / 1e3:+.2f} / {(p99 - d_p99) / 1e3:+.2f}"
        counted = "–"
        if c == "pinion":
            counted = f"{fnum(b.m(c, pc, 'm_in_req'), 0)} / {fnum(b.m(c, pc, 'n'), 0)}"
            if proto == "grpc":
                counted += f" (grpc_status=\"0\" success: {fnum(b.m(c, pc, 'm_in_grpc_ok'), 0)})"
        elif c == "pinion-opaque":
            conns, reqs = fnum(b.m(c, pc, "m_in_tcp"), 0), fnum(b.m(c, pc, "m_in_req_all"), 0)
            counted = f"{conns} conns, {reqs} requests"
        errs = sum(r.get("errors") or 0 for r in b.rows if r["cfg"] == c and r["load"] in (ka, pc))
        vs_ka, vs_pc = ("–", "–") if c == "direct" else (ratio(cpu_ka, h_cpu_ka), ratio(cpu_pc, h_cpu_pc))
        cells = [c, fnum(rps, 0), b.span(c, ka, "rps"), ratio(rps, d_ka), ratio(rps, h_ka),
                 ms(b.m(c, ka, "p99_us")), fnum(cpu_ka, 3), vs_ka, fnum(b.m(c, pc, "rps"), 0), ms(p50),
                 ms(p99), added, fnum(cpu_pc, 3), vs_pc, counted, f"{errs:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", default=os.environ.get("PINION_CHECKOUT") or REPO,
                   help="Pinion checkout with a built .venv and cni/pinion-cni (default: this one)")
    p.add_argument("--yardstick", default=os.environ.get("PINION_YARDSTICK") or DEFAULT_YARDSTICK,
                   help="where side_by_side.py and lab.py are (default: ../shared/bench beside the checkout)")
    p.add_argument("--quick", action="store_true", help="1 round, 3 s loads")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=int, help="seconds per saturating / paced run")
    p.add_argument("--rate", type=float, default=1000.0, help="paced requests (calls) per second")
    p.add_argument("--conns", type=int, default=16, help="h2load connections")
    p.add_argument("--h2-streams", type=int, default=10, help="h2load -m (streams per connection)")
    p.add_argument("--grpc-conc", type=int, default=32, help="concurrent gRPC calls, saturating")
    p.add_argument("--grpc-paced-conc", type=int, default=16, help="gRPC workers, paced")
    p.add_argument("--grpc-size", type=int, default=1024, help="bytes per gRPC request (echoed back)")
    p.add_argument("--grpc-python",
                   help="python with grpcio for the gRPC server and client (default: the checkout's venv)")
    p.add_argument("--keep-logs", help="copy the lab logs here")
    p.add_argument("--pyspy", help="after the rounds, write py-spy profiles of both agents during "
                   "one more paced h2 run with metrics and one opaque here")
    p.add_argument("--pyspy-bin", default="py-spy")
    p.add_argument("--hops", help="after the rounds, packet captures of one more paced h2 run "
                   "with metrics, one opaque and one through haproxy here, and where each "
                   "request's time goes, hop by hop (bench/hops.py), on stderr")
    p.add_argument("--strace", help="after the rounds, count both agents' system calls per request "
                   "(strace -c) during one more paced h2 run with metrics and one opaque; tables here")
    return p.parse_args(argv)


def shown_command(given) -> str:
    """The command line as run, without this machine's paths."""
    shown, hide = ["python3 bench/h2grpc.py"], False
    for x in given:
        if hide:
            hide = False
        elif x in ("--checkout", "--yardstick", "--keep-logs", "--grpc-python"):
            shown.append(f"{x} <{x[2:]}>")
            hide = True
        else:
            shown.append(re.sub(r"^(--[a-z-]+)=/.*", r"\1=<path>", x))
    return " ".join(shown)


def main(argv=None) -> int:
    a = parse_args(argv)
    sbs = load_yardstick(os.path.abspath(a.yardstick))
    lab = sbs.lab
    a.checkout = os.path.abspath(a.checkout)
    a.grpc_python = a.grpc_python or os.path.join(a.checkout, ".venv", "bin", "python")
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    if subprocess.run([a.grpc_python, "-c", "import grpc"], capture_output=True).returncode != 0:
        sys.exit(f"{a.grpc_python} cannot import grpc (give --grpc-python)")
    if not subprocess.run(["sh", "-c", "command -v h2load"], capture_output=True).stdout:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    q = a.quick
    s = sbs.Settings(rounds=a.rounds or (1 if q else 3), duration=a.duration or (3 if q else 10), rate=a.rate,
                     conns=a.conns, ab_n=0, pods=0, cni_n=0, quick=q)
    if q:
        s.warm_s = 1
    os.environ["LAB_PINION_ROOT"] = a.checkout
    lab.PINION_ROOT = a.checkout
    os.environ["PATH"] = sbs.RUNTIME_PATH
    os.environ.pop("PYTHONPATH", None)
    if a.keep_logs:
        os.environ["LAB_KEEP_LOGS"] = os.path.abspath(a.keep_logs)
    try:
        lab.require_built()
    except lab.NotBuilt as e:
        sys.exit(f"not built: {e}")
    sbs.ensure_tools()

    def on_signal(n, _f):
        raise lab.Interrupted(f"interrupted by {signal.Signals(n).name}")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    b = make_bench(sbs, lab)(s, a.checkout, shown_command(argv if argv is not None else sys.argv[1:]), a)
    rc = 0
    try:
        b.run()
    except lab.Interrupted as e:
        b.fatal, rc = b.fatal or str(e), 130
    except Exception as e:
        traceback.print_exc()
        b.fatal = b.fatal or f"{type(e).__name__}: {e}"
    rc = rc or (1 if b.fatal else 0)
    try:
        sys.stdout.write(b.render())
    except Exception:
        traceback.print_exc()
        raw = json.dumps({"fatal": b.fatal, "rows": b.rows}, default=str)[:200000]
        sys.stdout.write(f"```json\n{raw}\n```\n")
        rc = rc or 1
    log(f"done in {time.time() - b.t0:.0f} s (rc {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
