"""Container health probe: exit 0 only if the local gRPC server answers grpc.health.v1 Check with SERVING.

Used by the images' HEALTHCHECK (Docker and compose). Kubernetes uses its native `grpc:` probes
instead. The grpc_health_probe binary is not shipped; this needs only grpcio and
grpcio-health-checking, which every Conveyor image has.

Usage: healthcheck.py [ADDR [SERVICE]]. ADDR defaults to $CONVEYOR_HEALTH_ADDR (the plaintext
health-only port a service with TLS serves), else $CONVEYOR_GRPC_ADDR, the address it listens
on; a wildcard host (0.0.0.0, [::]) is probed on the loopback address.
SERVICE defaults to "" (the whole server).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0
_WILDCARDS = {"", "0.0.0.0", "[::]", "::", "*"}


def probe_target(addr: str) -> str:
    """Turn a listen address ("0.0.0.0:50051") into one to dial ("127.0.0.1:50051")."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {addr!r}")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def main(argv: list[str]) -> int:
    # Under TLS the gRPC port wants a certificate: the plaintext health-only port answers instead.
    addr = (
        argv[1] if len(argv) > 1 else os.environ.get("CONVEYOR_HEALTH_ADDR") or os.environ.get("CONVEYOR_GRPC_ADDR", "")
    )
    service = argv[2] if len(argv) > 2 else ""
    try:
        target = probe_target(addr)
    except ValueError as exc:
        print(f"unhealthy: {exc} (set CONVEYOR_GRPC_ADDR or pass ADDR)", file=sys.stderr)
        return 2
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
