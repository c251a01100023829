"""The floor of a per-connection C engine: a paced request through two C TLS relays that
uvloop's readiness callbacks drive, next to the agents' mesh path, in one process.

docs/fastpath.md's next step 3 is one C engine per connection (relay, tunnel framing, TLS on
OpenSSL's memory BIOs, driven from the event loop's callbacks, Python only for accept,
connect, policy and metrics). Before building it, this measures what its data path would
cost at best: `bench/engine_floor.c` (built here, in a scratch directory) is one agent's end
without framing or observation — a plain socket and a TLS socket, each readable callback one
C call that reads, runs OpenSSL and writes. Two of them stand where the two agents stand in
`bench/meshpath.py` (same apps, same TLS 1.3 mTLS contexts, same sockets):

    client app --TCP--> C relay ==TLS 1.3 over TCP==> C relay --TCP--> server app

and the table puts it next to meshpath's `direct` and `mesh` cases, busy (one request after
another) and paced (the process asleep for 1 ms before each request, as agents are at a
paced 1,000 req/s), CPU per request from `getrusage` (a run of N minus a run of N/10).

    python bench/engine_floor.py                                  # the table (about 3 minutes)
    python bench/engine_floor.py --case c-relay --requests N [--pace S]   # one run

Needs gcc, the Python headers and libssl-dev. The handshake is the agents' own
(`agent.dataplane.tls.handshake`); the relays take the SSL* from its `ssl.SSLObject`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from agent.dataplane.tls import handshake  # noqa: E402
from bench.meshpath import REQUEST, RESPONSE, _App, _certificates, _contexts, _tcp_pair  # noqa: E402


def build(directory: str) -> Path:
    """bench/engine_floor.c as an extension module of this Python, in `directory`."""
    target = Path(directory) / f"engine_floor{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", str(BENCH / "engine_floor.c"),
                    "-o", str(target), "-lssl", "-lcrypto"], check=True)
    return target


def _load(directory: str) -> ModuleType:
    sys.path.insert(0, directory)
    import engine_floor  # type: ignore[import-not-found]
    return engine_floor  # type: ignore[no-any-return]


async def _c_relay(requests: int, pace: float, certs: str, module: ModuleType) -> None:
    loop = asyncio.get_running_loop()
    server_context, client_context = _contexts(
        {name: os.path.join(certs, name) for name in ("ca", "server", "client")})
    app_client, a_plain = _tcp_pair()
    a_tls, b_tls = _tcp_pair()
    b_plain, app_server = _tcp_pair()
    for sock in (a_plain, a_tls, b_tls, b_plain):
        sock.setblocking(False)
    server = loop.create_task(handshake(b_tls, server_context, True, 10.0))  # as the agents do
    client = await handshake(a_tls, client_context, False, 10.0)
    one = module.make(client.ssl_object._sslobj, a_tls.fileno(), a_plain.fileno())
    other = module.make((await server).ssl_object._sslobj, b_tls.fileno(), b_plain.fileno())
    loop.add_reader(a_plain.fileno(), one.on_plain_readable)
    loop.add_reader(a_tls.fileno(), one.on_tls_readable)
    loop.add_reader(b_tls.fileno(), other.on_tls_readable)
    loop.add_reader(b_plain.fileno(), other.on_plain_readable)
    done: asyncio.Future[None] = loop.create_future()
    _App(loop, app_server, RESPONSE, len(REQUEST), None, requests)
    _App(loop, app_client, REQUEST, len(RESPONSE), done, requests, pace).start()
    await done  # the client counted every byte of every response


def _cpu(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, timeout=900,
                   env={**os.environ, "PYTHONHASHSEED": "0", "MALLOC_MMAP_THRESHOLD_": "131072"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _argv(case: str, requests: int, pace: float, certs: str, built: str) -> list[str]:
    if case == "c-relay":
        return [sys.executable, __file__, "--case", case, "--requests", str(requests), "--pace",
                str(pace), "--certs", certs, "--built", built]
    return [sys.executable, str(BENCH / "meshpath.py"), "--case", case, "--requests",
            str(requests), "--pace", str(pace), "--certs", certs]


def table(certs: str, built: str, rounds: int) -> None:
    cases = ("direct", "mesh", "c-relay")
    print(f"CPU µs per request (user + system), median of {rounds} interleaved rounds, "
          f"python {sys.version.split()[0]}\n")
    print("| load | " + " | ".join(cases) + " | agents' share: mesh | agents' share: C relays |")
    print("|---|" + "---:|" * (len(cases) + 2))
    for label, pace, high, low in (("busy, 30,000 − 3,000 requests", 0.0, 30000, 3000),
                                   ("paced, 1 ms asleep before each, 5,000 − 500", 0.001, 5000, 500)):
        spent: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(rounds):
            for case in cases:
                cost = (_cpu(_argv(case, high, pace, certs, built))
                        - _cpu(_argv(case, low, pace, certs, built)))
                spent[case].append(cost / (high - low) * 1e6)
        median = {case: statistics.median(values) for case, values in spent.items()}
        print(f"| {label} | " + " | ".join(f"{median[c]:.1f}" for c in cases)
              + f" | {median['mesh'] - median['direct']:.1f} | {median['c-relay'] - median['direct']:.1f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("c-relay",))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--certs", help="a directory with ca/server/client .pem and .key")
    parser.add_argument("--built", help="a directory where engine_floor is built already")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="engine-floor-") as scratch:
        certs = args.certs or scratch
        if not args.certs:
            _certificates(certs)
        built = args.built or scratch
        if not args.built:
            build(built)
        if args.case:
            import uvloop
            uvloop.run(_c_relay(args.requests, args.pace, certs, _load(built)))
            return
        table(certs, built, args.rounds)


if __name__ == "__main__":
    main()
