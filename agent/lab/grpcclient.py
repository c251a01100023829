"""A gRPC client for lab pods: a known mix of calls to agent.lab.grpcserver, one channel.

    python -m agent.lab.grpcclient HOST:PORT --ok 20 --fail 14=5

Makes the OK calls, then for each `CODE=COUNT` that many calls asking for status CODE,
and prints the tally of status codes seen as JSON, e.g. {"0": 20, "14": 5}."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import grpc

from agent.lab.grpcserver import METHOD, SERVICE

CALL_TIMEOUT_SECONDS = 5.0


def run(target: str, ok: int, failures: dict[int, int]) -> Counter[str]:
    tally: Counter[str] = Counter()
    payloads = [b"ok"] * ok + [f"fail:{code}".encode() for code, count in failures.items()
                               for _ in range(count)]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")  # no serializers: raw bytes
        for payload in payloads:
            try:
                call(payload, timeout=CALL_TIMEOUT_SECONDS)
                tally[str(grpc.StatusCode.OK.value[0])] += 1
            except grpc.RpcError as error:
                tally[str(error.code().value[0])] += 1
    return tally


def _failure(text: str) -> tuple[int, int]:
    code, _, count = text.partition("=")
    return int(code), int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--ok", type=int, default=1)
    parser.add_argument("--fail", type=_failure, action="append", default=[],
                        help="CODE=COUNT calls that ask for gRPC status CODE")
    options = parser.parse_args(argv)
    print(json.dumps(dict(sorted(run(options.target, options.ok, dict(options.fail)).items()))),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
