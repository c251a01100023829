"""A gRPC server for lab pods with no generated code: one unary method on raw bytes.

    python -m agent.lab.grpcserver --port P

`/pinion.lab.Lab/Call` answers OK with the request bytes echoed, except that a request
`fail:<code>` ends the call with that gRPC status code (e.g. `fail:14` is UNAVAILABLE).
Prints "listening" once bound."""

from __future__ import annotations

import argparse
import threading
from concurrent import futures

import grpc

SERVICE = "pinion.lab.Lab"
METHOD = "Call"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def call(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo, or abort with the status code the request asks for."""
    text = request.decode("ascii", "replace")
    if text.startswith("fail:"):
        code = _CODES.get(int(text[5:]), grpc.StatusCode.UNKNOWN)
        context.abort(code, f"asked to fail with {code.name}")
    return request


def build_server(host: str, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(call),  # no serializers: raw bytes
    })
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50051)
    options = parser.parse_args(argv)
    server = build_server(options.host, options.port)
    server.start()
    print("listening", flush=True)
    threading.Event().wait(600)  # bounded: lab servers never outlive a test run by much
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
