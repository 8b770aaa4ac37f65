"""The worker's client of its KV manager shard: registration with a time-to-live, heartbeats, and the
stream of step batches (one `Steps` call kept open; a batch goes in, its ack comes back).

`address` may list every shard (`host1:p1,host2:p2`): the worker's id picks its own (`shards.shard_for`).
Errors come out as the replication's: ReplicaUnavailable (send again, on a new stream), WorkerForgotten
(register again: the manager forgot this worker, or another process registered its id since), and from
`register`, WorkerFenced (another live process holds the id). A batch unanswered for `ack_timeout_s` (a
manager frozen, a peer gone silently) has its stream cancelled by the heartbeat thread, so the sender is
never stuck for good.

The channel reconnects at most `RECONNECT_MAX_S` after the manager is back, whatever the outage's
length: gRPC's own backoff grows to two minutes, and a worker that stays away that long after a
manager restart outlives its registration's time-to-live (it is reaped, and resyncs from nothing).
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time

import grpc

from apar.protogen import stubs
from services.kvmanager.wire import ack_from_pb, batch_to_pbs
from services.kvmanager.replication import Ack, LogBatch, ReplicaUnavailable, WorkerFenced, WorkerForgotten
from services.kvmanager.shards import parse_shards, shard_for
from services.repeating import RepeatingWarning
from services.security import open_channel

log = logging.getLogger(__name__)
pb = stubs()
K = pb.kvmanager_pb2
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_FORGOTTEN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)  # unknown, or another session's
RECONNECT_MAX_S = 0.5  # the longest wait between two tries to reach the manager
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_S * 1000))]


class _StepStream:
    """One open `Steps` call: a batch goes in, its ack comes out, one at a time."""

    def __init__(self, stub) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Steps(iter(self._requests.get, None))

    def send(self, msg):
        self._requests.put(msg)
        return next(self._call)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


class KVManagerClient:
    def __init__(self, address: str, worker_id: str, worker_address: str, num_blocks: int, block_size: int,
                 ttl_s: int = 10, tls=None, ack_timeout_s: float = 10.0, token=None, model: str = "") -> None:
        self.shards = parse_shards(address)
        self.address = address = shard_for(worker_id, self.shards)
        self.worker_id = worker_id
        self.worker_address = worker_address
        self.num_blocks, self.block_size, self.ttl_s = num_blocks, block_size, ttl_s
        self.model = model
        # mutual TLS with a TLSFiles (services/security.py); the cluster token (services/cluster_auth.py)
        self.channel = open_channel(address, tls, options=_CHANNEL_OPTIONS, token=token)
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)
        self.session = secrets.randbits(63) | 1  # this worker's replication session (its ledger starts empty)
        self.ack_timeout_s = ack_timeout_s
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._stream: _StepStream | None = None
        self._sent_at: float | None = None  # when the batch now in flight was sent
        self.forgotten = False  # set by the heartbeat; the KV backend registers again and resyncs
        self.beats = 0  # heartbeats the manager answered knowing this worker
        self._beat_failing = RepeatingWarning(log)

    def register(self, timeout: float = 30.0) -> bool:
        """Lease this worker's pool; returns whether the manager already had this session's ledger.
        WorkerFenced when another live process holds the worker id."""
        req = K.RegisterRequest(worker_id=self.worker_id, address=self.worker_address, num_blocks=self.num_blocks,
                                block_size=self.block_size, ttl_seconds=self.ttl_s, session=self.session,
                                model=self.model)
        try:
            resp = self.stub.Register(req, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                raise WorkerFenced(exc.details()) from None
            raise
        self.forgotten = False
        return resp.restored

    @property
    def failed_beats(self) -> int:
        """Heartbeats failed in a row (logged once per change of state, not each)."""
        return self._beat_failing.count("beat")

    def start_heartbeat(self) -> None:
        self._heart = threading.Thread(target=self._beat, name="apar-kv-heartbeat", daemon=True)
        self._heart.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl_s / 3)):
            sent_at, stream = self._sent_at, self._stream
            if sent_at is not None and stream is not None and time.monotonic() - sent_at > self.ack_timeout_s:
                log.warning("no ack from the KV manager for %.0f s: reconnecting", self.ack_timeout_s)
                stream.close()
            try:
                resp = self.stub.Heartbeat(K.HeartbeatRequest(worker_id=self.worker_id, session=self.session),
                                           timeout=2.0)
                self._beat_failing.ok("beat", "heartbeats reach the KV manager again")
                if resp.known:
                    self.beats += 1
                elif not self.forgotten:  # expected once it reaped this worker (e.g. frozen past its TTL):
                    # the next batch meets WorkerForgotten and the worker registers again and resyncs
                    log.warning("the KV manager no longer knows worker %s", self.worker_id)
                    self.forgotten = True
            except grpc.RpcError as exc:
                self._beat_failing.failed("beat", exc.code().name, "heartbeat to the KV manager failed: %s",
                                          exc.code().name)

    def send(self, batch: LogBatch) -> Ack:
        """One batch on the open stream (opened first if need be) and its ack: a resync goes in parts, each
        answered, under the message cap (`wire.batch_to_pbs`); the last part's answer is the batch's."""
        if self.forgotten:
            raise WorkerForgotten(f"the KV manager no longer knows worker {self.worker_id}")
        msgs = batch_to_pbs(self.worker_id, batch)
        if self._stream is None:
            self._stream = _StepStream(self.stub)
        try:
            for msg in msgs:
                self._sent_at = time.monotonic()
                resp = self._stream.send(msg)
            return ack_from_pb(resp)
        except (grpc.RpcError, StopIteration) as exc:
            self._stream.close()
            self._stream = None
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            details = exc.details() if isinstance(exc, grpc.RpcError) else "the stream ended"
            if code in _RETRYABLE:
                raise ReplicaUnavailable(details) from None
            if code in _FORGOTTEN:
                raise WorkerForgotten(details) from None
            raise RuntimeError(f"KV manager refused a batch: {code.name} {details}") from None
        finally:
            self._sent_at = None

    def state(self):
        return self.stub.State(K.StateRequest(worker_id=self.worker_id), timeout=5.0)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.close()
        self.channel.close()
