"""Agent memory in Kubernetes mode vs standalone, side by side (issue #6; root, ~30 s).

Each round builds the two-node lab twice: once with the agents in Kubernetes mode (in-test
API server in node0's netns, `pinion issuer` signing the pods' certificates, five watches),
once standalone (`--identity-dir`); three meshed pods on node0 each time. Prints VmRSS of
both agents after the pods are captured, as markdown, medians over the rounds.

    sudo .venv/bin/python bench/kube_agent.py [--rounds 3] [--pods 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.identity.files import init_identity_dir  # noqa: E402
from tests.netns.conftest import running_mesh  # noqa: E402
from tests.netns.test_kubernetes import kubernetes_cluster  # noqa: E402

MIB = 2**20


def kubernetes_round(tmp: Path, pods: int) -> list[float]:
    with kubernetes_cluster(tmp, issuer=True) as cluster:
        for index in range(pods):
            cluster.pod(0, f"web-{index}")
        time.sleep(1)
        return [agent.rss_bytes() / MIB for agent in cluster.agents]


def standalone_round(tmp: Path, pods: int) -> list[float]:
    identity = tmp / "identity"
    init_identity_dir(identity)
    with running_mesh("nftables", ["--identity-dir", str(identity)], identity) as mesh:
        for index in range(pods):
            mesh.pod(0, f"web-{index}")
        time.sleep(1)
        return [agent.rss_bytes() / MIB for agent in mesh.agents]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pods", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[list[float]]] = {"kubernetes": [], "standalone": []}
    with tempfile.TemporaryDirectory(prefix="pinion-bench-") as scratch:
        for number in range(args.rounds):
            base = Path(scratch) / f"round-{number}"
            results["kubernetes"].append(kubernetes_round(base / "k", args.pods))
            results["standalone"].append(standalone_round(base / "s", args.pods))
    print(f"| agent mode ({args.pods} meshed pods on node0) | node0 VmRSS MiB | node1 VmRSS MiB |")
    print("| --- | ---: | ---: |")
    for mode, rounds in results.items():
        node0 = statistics.median(r[0] for r in rounds)
        node1 = statistics.median(r[1] for r in rounds)
        print(f"| {mode} | {node0:.1f} | {node1:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
