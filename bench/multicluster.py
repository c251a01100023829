"""The multicluster gateway's cost (issue #18; root, ~1 min): CPU per 1,000 req/s and memory.

Builds the two lab clusters of tests/netns/test_multicluster.py (edge and cloud, each its own
in-test API server and agent, both with pod CIDR 10.42.0.0/16, joined by a NATed "WAN"
link; cloud runs `pinion multicluster gateway`, edge the mirror of the link). Then, from
edge's client pod, the paced client of bench/foundation.py sends `--rate` GETs a second over
16 keep-alive connections to the *mirrored* Service `web-cloud` for `--seconds`: every
request crosses edge's agent, the tunnel to cloud's gateway, the gateway's tunnel to the
web pod's agent, and the web pod (agent.lab.httpserver). Per round it reads the gateway's
(and both agents') utime+stime deltas, and the gateway's VmRSS, VmHWM and Pss.

    sudo .venv/bin/python bench/multicluster.py [--rounds 3] [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from foundation import cpu_seconds, memory_mib  # noqa: E402

from tests.netns.conftest import eventually  # noqa: E402
from tests.netns.test_multicluster import (  # noqa: E402
    export,
    install_gateway,
    link,
    mirror_vip,
    serve,
    two_clusters,
)


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pinion-mc-bench-") as tmp, two_clusters(Path(tmp)) as clusters:
        web = clusters.cloud.pod("web", "web")
        client = clusters.edge.pod("client", "front")
        serve(web)
        export(clusters.cloud.api, "web", web)
        install_gateway(clusters)
        link(clusters)
        assert eventually(lambda: clusters.mirror_names() == {"web-cloud"}, 20)
        url = f"http://{mirror_vip(clusters, 'web-cloud')}/"
        assert clusters.gateway is not None
        gateway = clusters.gateway.pid
        agents = {"edge agent": clusters.edge.agents[0], "cloud agent": clusters.cloud.agents[0]}
        time.sleep(2)
        idle = {**memory_mib(gateway), "pss": pss_mib(gateway)}
        rows = []
        for round_index in range(args.rounds):
            before = {"gateway": cpu_seconds(gateway),
                      **{k: cpu_seconds(a.process.pid) for k, a in agents.items() if a.process}}
            done = client.run([sys.executable, str(REPO / "bench" / "foundation.py"), "--paced-client",
                               url, "--rate", str(args.rate), "--seconds", str(args.seconds),
                               "--connections", "16"], check=True, timeout=args.seconds + 60)
            after = {"gateway": cpu_seconds(gateway),
                     **{k: cpu_seconds(a.process.pid) for k, a in agents.items() if a.process}}
            result = json.loads(done.stdout)
            rows.append({"round": round_index, **result,
                         "rate": result["requests"] / result["seconds"],
                         **{f"{k} cpu": after[k] - before[k] for k in after},
                         **{f"gateway {k}": v for k, v in memory_mib(gateway).items()},
                         "gateway pss": pss_mib(gateway)})
        streams = clusters.gateway_metrics().value("pinion_gateway_streams_total", outcome="forwarded")
    print(f"gateway idle (mirror linked, before traffic): VmRSS {idle['rss']:.1f} MiB, "
          f"Pss {idle['pss']:.1f} MiB\n")
    print("| round | req/s achieved | errors | p50 ms | p99 ms | gateway CPU s per 1,000 req "
          "| edge agent | cloud agent | gateway VmRSS MiB | VmHWM | Pss |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        per_k = 1000 / row["requests"]
        print(f"| {row['round']} | {row['rate']:.0f} | {row['errors']:.0f} | {row['p50_ms']:.1f} "
              f"| {row['p99_ms']:.1f} | {row['gateway cpu'] * per_k:.3f} "
              f"| {row['edge agent cpu'] * per_k:.3f} | {row['cloud agent cpu'] * per_k:.3f} "
              f"| {row['gateway rss']:.1f} | {row['gateway peak']:.1f} | {row['gateway pss']:.1f} |")
    median = statistics.median(row["gateway cpu"] * 1000 / row["requests"] for row in rows)
    print(f"\nmedian gateway CPU: {median:.3f} s per 1,000 requests = {median:.3f} vCPU per 1,000 req/s;"
          f" streams forwarded by the gateway: {streams:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
