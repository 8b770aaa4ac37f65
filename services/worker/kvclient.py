"""The worker's client of the KV manager: registration with a time-to-live, heartbeats, step messages."""
from __future__ import annotations

import logging
import threading

import grpc

from apar.protogen import stubs
from services.kvmanager.ops import Append, Finish, Fork, Op, Release, Start

log = logging.getLogger(__name__)
pb = stubs()
K = pb.kvmanager_pb2
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _key(ref) -> object:
    return K.ThreadKey(request=ref.request, thread=ref.thread)


def ops_to_pb(ops: list[Op]) -> list:
    out = []
    for op in ops:
        if isinstance(op, Append):
            out.append(K.KVOp(append=K.AppendOp(thread=_key(op.thread), tokens=op.tokens)))
        elif isinstance(op, Fork):
            out.append(K.KVOp(fork=K.ForkOp(parent=_key(op.parent), child=_key(op.child))))
        elif isinstance(op, Start):
            out.append(K.KVOp(start=_key(op.thread)))
        elif isinstance(op, Finish):
            out.append(K.KVOp(finish=_key(op.thread)))
        elif isinstance(op, Release):
            out.append(K.KVOp(release=op.request))
    return out


class KVManagerClient:
    def __init__(self, address: str, worker_id: str, worker_address: str, num_blocks: int, block_size: int,
                 ttl_s: int = 10) -> None:
        self.address = address
        self.worker_id = worker_id
        self.worker_address = worker_address
        self.num_blocks, self.block_size, self.ttl_s = num_blocks, block_size, ttl_s
        self.channel = grpc.insecure_channel(address)
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    def register(self, timeout: float = 30.0) -> bool:
        """Lease this worker's pool; returns whether the manager already had its ledger."""
        req = K.RegisterRequest(worker_id=self.worker_id, address=self.worker_address, num_blocks=self.num_blocks,
                                block_size=self.block_size, ttl_seconds=self.ttl_s)
        resp = self.stub.Register(req, timeout=timeout, wait_for_ready=True)
        return resp.restored

    def start_heartbeat(self) -> None:
        self._heart = threading.Thread(target=self._beat, name="apar-kv-heartbeat", daemon=True)
        self._heart.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl_s / 3)):
            try:
                resp = self.stub.Heartbeat(K.HeartbeatRequest(worker_id=self.worker_id), timeout=2.0)
                if not resp.known:
                    log.error("the KV manager no longer knows worker %s; registering again", self.worker_id)
                    self.register()
            except grpc.RpcError as exc:
                log.warning("heartbeat to the KV manager failed: %s", exc.code().name)

    def step(self, seq: int, ops: list[Op]):
        """One step's ops; raises ConnectionError when the manager cannot be reached (retry later)."""
        try:
            resp = self.stub.Step(K.StepRequest(worker_id=self.worker_id, seq=seq, ops=ops_to_pb(ops)), timeout=5.0)
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise ConnectionError(exc.details()) from None
            raise RuntimeError(f"KV manager refused step {seq}: {exc.code().name} {exc.details()}") from None
        if resp.error:
            raise RuntimeError(f"KV manager refused step {seq}: {resp.error}")
        return resp

    def state(self):
        return self.stub.State(K.StateRequest(worker_id=self.worker_id), timeout=5.0)

    def close(self) -> None:
        self._stop.set()
        self.channel.close()
