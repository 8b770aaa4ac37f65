"""What the KV manager service tests share: a gRPC client of the service, simulated workers, and the
service on a scratch Redis (the `kv` fixture)."""
from __future__ import annotations

import queue

import grpc
import pytest

from apar.bench_suite.simulated import SimWorker
from apar.engine.kv.ledger import KVLedger
from apar.protogen import stubs
from services.kvmanager import wire
from services.kvmanager.replication import ReplicationLog
from services.kvmanager.service import serve


pb = stubs()
K = pb.kvmanager_pb2
C = grpc.StatusCode
BLOCKS, BLOCK_SIZE, SESSION = 64, 4, 7


class Client:
    """The manager's API as a test drives it: unary calls, and batches on one open Steps stream."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)
        self._requests: queue.SimpleQueue | None = None

    def register(self, worker="w1", blocks=BLOCKS, ttl=30, session=SESSION, **kw):
        return self.stub.Register(K.RegisterRequest(worker_id=worker, address=f"127.0.0.1:{len(worker)}",
                                                    num_blocks=blocks, block_size=BLOCK_SIZE, ttl_seconds=ttl,
                                                    session=session, **kw), timeout=5, wait_for_ready=True)

    def send(self, msg):
        """One StepBatch on the stream (opened on first use; a failed one is dropped)."""
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            self._responses = self.stub.Steps(iter(self._requests.get, None), timeout=30)
        self._requests.put(msg)
        try:
            return next(self._responses)
        except grpc.RpcError:
            self._requests = None
            raise

    def state(self, worker="w1"):
        return self.stub.State(K.StateRequest(worker_id=worker), timeout=5)

    def usage(self):
        return self.stub.Usage(K.UsageRequest(), timeout=5).workers

    def drive(self, sim: SimWorker, steps: int, worker="w1", per_message: int = 2):
        """The simulated worker's next steps, `per_message` to a message; every ack agrees with it."""
        for i in range(steps):
            sim.step()
            if (i + 1) % per_message == 0 or i == steps - 1:
                ack = wire.ack_from_pb(self.send(wire.batch_to_pb(worker, sim.kv.batch())))
                assert ack.applied == sim.kv.seq and ack.digest == sim.ledger.digest() and not ack.resync
                sim.kv.acked(ack)


def worker(seed: int, blocks: int = BLOCKS, **kw) -> SimWorker:
    return SimWorker(ReplicationLog(KVLedger(blocks, BLOCK_SIZE), SESSION), seed=seed, **kw)


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return C.OK


@pytest.fixture
def kv(redis_server, request):
    servers = []

    def start(url=None, memory=False, **kw):
        kw.setdefault("prefix", f"t-{request.node.name}:")
        url = None if memory else url or redis_server.url
        s = serve("127.0.0.1:0", url, snapshot_every=8, reap_every_s=0.1, **kw)
        servers.append(s)
        return s, Client(f"127.0.0.1:{s.port}")

    yield start
    for s in servers:
        s.stop(grace=None)
