"""/metrics size and agent memory with 50 busy pods (issue #14; root, ~1 min).

Kubernetes mode (the in-test API server), two nodes: N meshed pods on node0 (Deployment
"client"), each sends HTTP requests — 200s and 500s, over mTLS — to a "web" pod on node1 and
to one plaintext "legacy" pod on node1, so every pod has inbound-less outbound series of both
kinds, and web has N clients. Then it scrapes both agents' /metrics and prints, per node, the
exposition's bytes and sample count, and the agent's VmRSS before and after that scrape.

    sudo .venv/bin/python bench/metrics_size.py [--pods 50] [--checkout DIR]

`--checkout` runs another checkout's agents (its code is imported first), so one script
measures before and after a change: `--checkout /work/main` vs this tree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
CLIENT = """
import http.client, sys
host, count = sys.argv[1], int(sys.argv[2])
for path in ["/status/200"] * (count - 1) + ["/status/500"]:
    conn = http.client.HTTPConnection(host, 8080, timeout=5)
    conn.request("GET", path)
    conn.getresponse().read()
    conn.close()
"""


def measure(checkout: Path, pods: int, requests: int) -> list[dict[str, float]]:
    sys.path.insert(0, str(checkout))
    from tests.netns.test_kubernetes import kubernetes_cluster

    with tempfile.TemporaryDirectory(prefix="pinion-bench-") as scratch, \
            kubernetes_cluster(Path(scratch)) as cluster:
        cluster.namespace("legacy")
        web = cluster.pod(1, "web-7c9d8f-abcde", deployment="web")
        legacy = cluster.pod(1, "old-7c9d8f-abcde", namespace="legacy", deployment="old")
        for pod in (web, legacy):
            cluster.serve(pod, "--port", "8080")
        clients = [cluster.pod(0, f"client-7c9d8f-{index:05d}", deployment="client")
                   for index in range(pods)]
        time.sleep(1)
        for client in clients:
            for target in (web, legacy):
                client.run([sys.executable, "-c", CLIENT, target.ip, str(requests)], timeout=30)
        time.sleep(1)
        results = []
        for agent in cluster.agents:
            idle = agent.rss_bytes() / MIB
            status, text = agent.get("/metrics")
            assert status == 200
            samples = [line for line in text.splitlines() if line and not line.startswith("#")]
            results.append({"bytes": len(text.encode()), "samples": len(samples),
                            "rss_mib": idle, "rss_after_scrape_mib": agent.rss_bytes() / MIB})
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    results = measure(args.checkout.resolve(), args.pods, args.requests)
    print(json.dumps({"checkout": str(args.checkout), "pods": args.pods, "nodes": results}))
    print(f"| node | /metrics bytes | samples | VmRSS MiB before / after a scrape |  ({args.pods} "
          f"client pods on node0, {args.checkout})")
    print("| --- | ---: | ---: | ---: |")
    for index, node in enumerate(results):
        print(f"| node{index} | {node['bytes']:,.0f} | {node['samples']:,.0f} | "
              f"{node['rss_mib']:.1f} / {node['rss_after_scrape_mib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
