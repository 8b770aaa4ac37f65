"""A gRPC health check that speaks (mutual) TLS, for probes: Kubernetes' own gRPC probes cannot.

    python -m services.healthcheck 127.0.0.1:50061 [--service apar.v1.KVManager]
        [--tls-cert PEM --tls-key PEM --tls-ca PEM] [--tls-server-name NAME] [--timeout 3]

Exit 0 when the service is SERVING, 1 otherwise (one line on stderr says why). The Helm chart runs it as
the readiness probe of workers and the KV manager when internal mutual TLS is on.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.healthcheck", description=__doc__.split("\n")[0])
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="the service to ask about ('' is the server as a whole)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-server-name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from apar.engine.errors import UserError
    from services.security import internal_tls, open_channel

    try:
        tls = internal_tls(args, "--tls")
    except UserError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    with open_channel(args.address, tls) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
        except grpc.RpcError as exc:
            print(f"healthcheck: {args.address}: {exc.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    if status != health_pb2.HealthCheckResponse.SERVING:
        print(f"healthcheck: {args.address} {args.service or '(server)'}: {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
