"""Restarts side by side: the same two-node mTLS lab and traffic as tests/netns/test_restarts.py
(a client at 20 req/s with a new connection each, one over keep-alive; each agent restarted 5
times with SIGTERM, then 5 times with SIGKILL), with and without the socket keeper, in one run.

    sudo .venv/bin/python bench/restarts.py            # markdown on stdout, ~80 s

Without the keeper a pod's listeners close with the agent: what arrives meanwhile is refused
(SIGKILL) or reset (SIGTERM). With it, connections wait in the backlog for the next agent."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.identity.files import init_identity_dir
from tests.netns.conftest import running_mesh
from tests.netns.test_restarts import RESTARTS, phase


def main() -> int:
    rows = []
    for keeper in (False, True):
        identity = Path(tempfile.mkdtemp(prefix="pinion-bench-restarts-")) / "identity"
        init_identity_dir(identity, trust_domain="cluster.local")
        with running_mesh("nftables", ["--identity-dir", str(identity)], identity,
                          keeper=keeper) as mesh:
            client, server = mesh.pod(0, "steady"), mesh.pod(1, "web")
            mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
            for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)):
                summaries, took = phase(mesh, client, server.ip, sig)
                for summary in summaries:
                    errors = sorted({str(e["error"]).split(":")[0] for e in summary["errors"]})  # type: ignore[attr-defined]
                    rows.append(("keeper" if keeper else "no keeper", name, summary["mode"],
                                 summary["sent"], summary["failed"], summary["retries"],
                                 summary["p50_ms"], summary["p99_ms"], summary["max_ms"],
                                 sorted(took)[len(took) // 2], ", ".join(errors) or "–"))
    print(f"{RESTARTS} restarts of each agent per signal; client at 20 req/s\n")
    print("| agents | signal | client | requests | failed | retried on a reused connection "
          "| p50 ms | p99 ms | max ms | signal → ready, median s | errors |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
