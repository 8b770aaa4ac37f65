"""Embedded mode's link to a `KVManager` in the same process: the gRPC client's calls without gRPC."""
from __future__ import annotations

import secrets

from services.kvmanager.manager import KVManager
from services.kvmanager.records import StaleSession, StoreUnavailable, UnknownWorker, WorkerIdTaken, WorkerSpec
from services.kvmanager.replication import Ack, LogBatch, ReplicaUnavailable, WorkerFenced, WorkerForgotten


class InProcessClient:
    """A worker's handle on an in-process `KVManager` (embedded mode): the calls of the gRPC client
    `services.worker.kvclient.KVManagerClient` (register, start_heartbeat, send, state, close) without
    gRPC. A registration lives `ttl_s` (default a day) and needs no heartbeat unless something reaps."""

    def __init__(self, manager: KVManager, worker_id: str, worker_address: str, num_blocks: int, block_size: int,
                 ttl_s: int = 24 * 3600, model: str = "") -> None:
        self.manager = manager
        self.spec = WorkerSpec(worker_id, worker_address, num_blocks, block_size, ttl_s, model)
        self.session = secrets.randbits(63) | 1
        self.forgotten = False
        self.closed = False

    def register(self, timeout: float | None = None) -> bool:
        """Whether the manager had this session's ledger; WorkerFenced when another session holds the id."""
        try:
            return self.manager.register(self.spec, self.session)[0]
        except WorkerIdTaken as exc:
            raise WorkerFenced(str(exc)) from None

    def start_heartbeat(self) -> None:
        """Nothing to do in-process; `heartbeat()` extends the registration if a caller reaps."""

    def heartbeat(self) -> bool:
        return self.manager.heartbeat(self.spec.worker_id, self.session)

    def send(self, batch: LogBatch) -> Ack:
        """One message; raises ReplicaUnavailable when the store is away (send again later),
        WorkerForgotten when the manager holds no ledger for this worker, of this session."""
        try:
            return self.manager.submit(self.spec.worker_id, batch)
        except StoreUnavailable as exc:
            raise ReplicaUnavailable(str(exc)) from None
        except (UnknownWorker, StaleSession) as exc:
            raise WorkerForgotten(str(exc)) from None

    def state(self) -> dict:
        return self.manager.state(self.spec.worker_id)

    def close(self) -> None:
        self.closed = True
