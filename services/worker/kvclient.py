"""The worker's client of the KV manager: registration with a time-to-live, heartbeats, step messages."""
from __future__ import annotations

import logging
import threading

import grpc

from apar.protogen import stubs
from services.kvmanager.convert import answer_from_pb, step_to_pb
from services.kvmanager.ops import StepAnswer
from services.kvmanager.ops import Op

log = logging.getLogger(__name__)
pb = stubs()
K = pb.kvmanager_pb2
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class WorkerForgotten(RuntimeError):
    """The KV manager no longer knows this worker (its registration expired): the ledgers must restart."""


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
        self.forgotten = False  # set by the heartbeat; the engine loop re-registers and restarts its ledger

    def register(self, timeout: float = 30.0) -> bool:
        """Lease this worker's pool; returns whether the manager already had its ledger."""
        req = K.RegisterRequest(worker_id=self.worker_id, address=self.worker_address, num_blocks=self.num_blocks,
                                block_size=self.block_size, ttl_seconds=self.ttl_s)
        resp = self.stub.Register(req, timeout=timeout, wait_for_ready=True)
        self.forgotten = False
        return resp.restored

    def start_heartbeat(self) -> None:
        self._heart = threading.Thread(target=self._beat, name="apar-kv-heartbeat", daemon=True)
        self._heart.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl_s / 3)):
            try:
                resp = self.stub.Heartbeat(K.HeartbeatRequest(worker_id=self.worker_id), timeout=2.0)
                if not resp.known and not self.forgotten:
                    log.error("the KV manager no longer knows worker %s", self.worker_id)
                    self.forgotten = True
            except grpc.RpcError as exc:
                log.warning("heartbeat to the KV manager failed: %s", exc.code().name)

    def step(self, seq: int, ops: list[Op]) -> StepAnswer:
        """One step's ops; raises ConnectionError when the manager cannot be reached (retry later)."""
        if self.forgotten:
            raise WorkerForgotten(f"the KV manager no longer knows worker {self.worker_id}")
        try:
            resp = self.stub.Step(step_to_pb(self.worker_id, seq, ops), timeout=5.0)
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise ConnectionError(exc.details()) from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise WorkerForgotten(exc.details()) from None
            raise RuntimeError(f"KV manager refused step {seq}: {exc.code().name} {exc.details()}") from None
        if resp.error:
            raise RuntimeError(f"KV manager refused step {seq}: {resp.error}")
        return answer_from_pb(resp)

    def state(self):
        return self.stub.State(K.StateRequest(worker_id=self.worker_id), timeout=5.0)

    def close(self) -> None:
        self._stop.set()
        self.channel.close()
