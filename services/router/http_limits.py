"""The HTTP server's bounds and their flags, apart from the server (which needs uvicorn): the CLI builds
its parser from here on machines that have no uvicorn (the GPU machine's `apar bench`)."""
from __future__ import annotations

import argparse
import resource
from dataclasses import dataclass

from apar.engine.errors import UserError


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 2))


GRPC_HANDSHAKE_TIMEOUT_MS = 10_000  # a public gRPC connection's HTTP/2 (and TLS) handshake, as a request head's


def grpc_connection_options() -> list[tuple[str, int]]:
    """The public gRPC port's share of the file descriptors, a quarter of them (the HTTP port has half;
    the rest stays for the workers and files), and its handshake's time limit: a flood of half-open
    connections on the gRPC port neither starves the process nor holds a connection longer than a
    slow head on the HTTP port."""
    return [("grpc.max_allowed_incoming_connections", max(8, default_max_connections() // 2)),
            ("grpc.server_handshake_timeout_ms", GRPC_HANDSHAKE_TIMEOUT_MS)]


@dataclass(slots=True)
class HttpServerLimits:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 0  # 0: default_max_connections()
    max_pending_per_client: int = 32
    request_timeout_s: float = 600.0  # 0: none

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "idle_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise UserError(f"--http-{name[:-2].replace('_', '-')} must be in (0, 3600] s")
        if not 0 <= self.request_timeout_s <= 7 * 24 * 3600:
            raise UserError("--http-request-timeout must be 0 (none) or a number of seconds up to a week")
        if self.max_connections < 0 or self.max_pending_per_client < 1:
            raise UserError("--http-max-connections must be 0 (automatic) or more, --http-max-pending-per-client "
                            "1 or more")
        if not self.max_connections:
            self.max_connections = default_max_connections()


def add_http_server_args(p: argparse.ArgumentParser) -> None:
    d = HttpServerLimits(max_connections=1)
    g = p.add_argument_group("HTTP server bounds (what a client may hold before and while it is served)")
    g.add_argument("--http-header-timeout", type=float, default=d.header_timeout_s, metavar="S",
                   help=f"a request head must arrive whole within S seconds ({d.header_timeout_s:g})")
    g.add_argument("--http-idle-timeout", type=float, default=d.idle_timeout_s, metavar="S",
                   help=f"close a kept-alive connection idle this long ({d.idle_timeout_s:g})")
    g.add_argument("--http-max-connections", type=int, default=0, metavar="N",
                   help="open HTTP connections at most (0, the default: half the process's file-descriptor "
                        "limit, at most 4096); past it the oldest idle one is closed")
    g.add_argument("--http-max-pending-per-client", type=int, default=d.max_pending_per_client, metavar="N",
                   help="connections one client address may hold before one of its requests passes the API key "
                        f"check; past it its oldest is closed ({d.max_pending_per_client})")
    g.add_argument("--http-request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help=f"a request's time limit, body and answer included (0: none; {d.request_timeout_s:g})")
    g.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="answer HTTP requests only for this Host name (repeatable; 421 otherwise). Listening on "
                        "loopback, localhost, 127.0.0.1 and ::1 are allowed too and nothing else is (against DNS "
                        "rebinding); elsewhere, without it, any name is")


def http_limits_from_args(args) -> HttpServerLimits:
    return HttpServerLimits(args.http_header_timeout, args.http_idle_timeout, args.http_max_connections,
                            args.http_max_pending_per_client, args.http_request_timeout)
