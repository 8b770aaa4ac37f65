"""The KV manager service refuses bad input with a reason and never crashes on random input; its health,
reflection and metrics; bad flags; and a pool of a million blocks resyncs in parts."""
from __future__ import annotations

import json
import random
import urllib.request
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apar.bench_suite.simulated import free_port
from apar.engine.kv.ledger import KVLedger, ThreadRef
from services.grpc_common import MAX_MESSAGE
from services.kvmanager import wire
from services.kvmanager.json_forms import RESYNC_PART_BYTES, snapshot_parts, snapshot_to_bytes
from services.kvmanager.records import MAX_BLOCKS
from services.worker.kv import RemoteKV
from services.worker.kvclient import KVManagerClient
from tests.kvmanager_helpers import BLOCKS, BLOCK_SIZE, C, K, SESSION, code_of, kv, worker  # noqa: F401 (fixtures)


def test_bad_input_gets_invalid_argument_with_a_reason(kv):
    server, client = kv()
    client.register()
    s = client.stub
    bad_registers = [dict(worker_id=""), dict(worker_id="has space"), dict(num_blocks=0), dict(num_blocks=1 << 30),
                     dict(block_size=0), dict(block_size=1 << 20), dict(ttl_seconds=10 ** 6), dict(address="\x00"),
                     dict(session=0)]
    for fields in bad_registers:
        good = dict(worker_id="w9", address="x", num_blocks=8, block_size=4, session=9)
        req = K.RegisterRequest(**{**good, **fields})
        with pytest.raises(grpc.RpcError) as err:
            s.Register(req, timeout=5)
        assert err.value.code() == C.INVALID_ARGUMENT and err.value.details(), fields
    digest = K.Digest(free_blocks=BLOCKS, next_free=0)
    bad_steps = [b"not json", b'{"a": 1}', b'[["a", "r", 0]]', b'[["a", "r", 0, 0]]', b'[["a", "", 0, 1]]',
                 b'[["a", "r", -1, 1]]', b'[["s", "r", "0"]]', b'[["v", [["r"]]]]', b'[["q", 1]]', b'[["r", 5]]',
                 b'[["a", "r", 0, 1099511627776]]', b'[["e", [["r"]]]]', b'[["e", "r"]]', b'[["e", [["", 0]]]]',
                 b'[["e", [["r", 0.5]]]]']
    for ops in bad_steps:
        msg = K.StepBatch(worker_id="w1", session=SESSION, steps=[K.Step(seq=1, ops=ops, digest=digest)])
        with pytest.raises(grpc.RpcError) as err:
            client.send(msg)
        assert err.value.code() == C.INVALID_ARGUMENT and "step 0" in err.value.details(), ops
    bad_batches = [K.StepBatch(worker_id="w1", session=0), K.StepBatch(worker_id="w1", session=SESSION, steps=[
        K.Step(seq=1, ops=b"[]"), K.Step(seq=3, ops=b"[]")]), K.StepBatch(worker_id="w1", session=SESSION,
        resync=K.Resync(seq=1, ledger=b"[1, 2]")), K.StepBatch(worker_id="w1", session=SESSION,
        resync=K.Resync(seq=1, ledger=json.dumps({**KVLedger(BLOCKS, BLOCK_SIZE).snapshot(), "free": [0]}).encode()))]
    for msg in bad_batches:
        assert code_of(lambda: client.send(msg)) == C.INVALID_ARGUMENT, msg
    assert code_of(lambda: client.send(K.StepBatch(worker_id="nobody", session=1))) == C.NOT_FOUND
    assert code_of(lambda: client.send(K.StepBatch(worker_id="", session=1))) == C.INVALID_ARGUMENT
    assert code_of(lambda: s.State(K.StateRequest(), timeout=5)) == C.INVALID_ARGUMENT
    raw = client.channel.stream_stream("/apar.v1.KVManager/Steps")
    assert code_of(lambda: list(raw(iter([b"\xff\xff\xff"]), timeout=5))) == C.INVALID_ARGUMENT
    # an op the replica refuses is no status: the ack asks for a resync, the ops before it applied
    refused = K.StepBatch(worker_id="w1", session=SESSION, steps=[K.Step(seq=1, ops=b'[["a", "nobody", 0, 1]]')])
    ack = client.send(refused)
    assert ack.resync and ack.applied == 0
    assert client.state().free == list(range(BLOCKS))
    server.manager.check()


def _random_message(rng: random.Random, method: str):
    """A message with field values from a small pool (some valid, most not), or random bytes."""
    ids = ["w1", "w2", "", "x" * 200, "a b", "w-never"]  # w-never is never registered
    num = lambda: rng.choice([0, 1, 3, 64, 2 ** 20, 2 ** 32 - 1])  # noqa: E731
    if method == "Register":
        return K.RegisterRequest(worker_id=rng.choice(ids[:-1]), address=rng.choice(["", "h:1", "\x01"]),
                                 num_blocks=num(), block_size=num() % 5000,
                                 ttl_seconds=rng.choice([0, 1, 5, 2 ** 32 - 1]), session=rng.choice([0, 1, 7]))
    if method == "Steps":
        ref = lambda: [rng.choice(["a", "b", "", "\u00e9", "r" * 300]), rng.choice([0, 1, -1, 2 ** 32])]  # noqa: E731
        steps = []
        for seq in range(rng.choice([0, 1, 2, 2 ** 40]), 0, -1)[:4]:
            ops = [rng.choice([["s", *ref()], ["a", *ref(), num()], ["f", *ref(), *ref()], ["x", *ref()],
                               ["r", ref()[0]], ["v", [ref()]], ["v", []], ["e", [ref(), ref()]], [], "x"]) for _ in range(rng.randint(0, 5))]
            steps.append(K.Step(seq=seq, ops=json.dumps(ops).encode(), digest=K.Digest(free_blocks=num())))
        return K.StepBatch(worker_id=rng.choice(ids), session=rng.choice([0, 1, SESSION]), steps=steps[::-1])
    if method == "Heartbeat":
        return K.HeartbeatRequest(worker_id=rng.choice(ids))
    if method == "State":
        return K.StateRequest(worker_id=rng.choice(ids))
    return K.UsageRequest()


def test_fuzz_never_crashes_the_service(kv):
    server, client = kv()
    client.register("w1", blocks=8)
    rng = random.Random(18)
    methods = [m.name for m in K.DESCRIPTOR.services_by_name["KVManager"].methods]
    # another session's steps and registrations of a live id are refused too (the id is bound to w1's)
    allowed = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS}
    seen = set()
    for i in range(400):
        method = rng.choice(methods)
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randint(1, 64))
        else:
            data = _random_message(rng, method).SerializeToString()
        if method == "Steps":
            raw = client.channel.stream_stream("/apar.v1.KVManager/Steps")
            code = code_of(lambda: list(raw(iter([data]), timeout=5)))
        else:
            raw = client.channel.unary_unary(f"/apar.v1.KVManager/{method}")
            code = code_of(lambda: raw(data, timeout=5))
        assert code in allowed, (i, method, data, code)
        seen.add(code)
    assert seen == allowed  # the fuzz reached every kind of answer
    server.manager.check()
    assert client.usage()


def test_health_reflection_and_metrics(kv):
    port = free_port()
    server, client = kv(metrics_port=port)
    client.register()
    client.drive(worker(19), 25, per_message=5)
    health = health_pb2_grpc.HealthStub(client.channel)
    for name in ("", "apar.v1.KVManager"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
    assert "apar.v1.KVManager" in [s.name for s in answer.list_services_response.service]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    used = server.manager.usage()[0]
    assert f'apar_kvmanager_blocks_free{{worker="w1"}} {float(used.free_blocks)}' in text
    assert "apar_kvmanager_steps_total 25.0" in text and "apar_kvmanager_messages_total 5.0" in text
    assert "apar_kvmanager_resyncs_total 0.0" in text and "apar_kvmanager_steps_duplicate_total 0.0" in text
    assert "apar_kvmanager_redis_round_trips_total" in text


@pytest.mark.parametrize("flags, message", [(["--round-every", "0"], "--round-every must be 0.001..10 s"),
                                            (["--reap-every", "0"], "--reap-every must be"),
                                            (["--ttl", "0"], "--ttl must be"),
                                            (["--snapshot-every", "0"], "--snapshot-every must be 1 or more")])
def test_bad_manager_flags_are_refused_with_a_reason(flags, message, capsys):
    from services.kvmanager.cli import main

    assert main(["--no-redis", "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_pool_of_a_million_blocks_resyncs_in_parts(kv):
    """A worker with the largest pool (2^20 blocks), half of it in use by requests of random ids and
    lengths (some released, so the free list is out of order), resyncs its whole ledger over a real gRPC
    stream: the snapshot, as one message more than twice gRPC's 16 MiB cap, goes compressed in parts,
    and the replica equals the worker's ledger, digest and all."""
    server, _ = kv(memory=True)
    rng = random.Random(7)
    ledger, requests = KVLedger(MAX_BLOCKS, 16), []
    while ledger.num_used < MAX_BLOCKS // 2:
        ref = ThreadRef(f"{rng.getrandbits(128):032x}", 0)  # as the router names requests
        ledger.start(ref)
        ledger.append(ref, rng.randint(1, 300 * 16), want_slots=False)
        requests.append(ref.request)
        if rng.random() < 0.3:
            ledger.release(requests.pop(rng.randrange(len(requests))))
    snapshot = ledger.snapshot()
    whole = snapshot_to_bytes(snapshot)  # (the parts cut this, compressed)
    assert len(whole) > MAX_MESSAGE and len(zlib.compress(whole, 1)) > RESYNC_PART_BYTES
    client = KVManagerClient(f"127.0.0.1:{server.port}", "w-big", "here", MAX_BLOCKS, 16, ttl_s=60)
    backend = None
    try:
        assert not client.register()
        backend = RemoteKV(ledger, client)
        backend.flush()
        with backend._cv:
            backend.outbox.forget()  # what a worker does when its replica is lost: its ledger, whole
        backend.drain(60)
        assert server.manager.state("w-big") == snapshot
        assert server.metrics.resyncs._value.get() == 1
    finally:
        if backend is not None:
            backend.close()
        client.close()


def test_resync_parts_out_of_order_or_not_a_snapshot_are_refused(kv):
    """A resync in parts: a part out of order, parts that are not a compressed snapshot, steps before
    the last part are INVALID_ARGUMENT with a reason, and change nothing; in order, they replace the
    replica."""
    server, client = kv(memory=True)
    client.register()
    sim = worker(19)
    client.drive(sim, 10)
    state = client.state()
    parts = snapshot_parts(sim.ledger.snapshot(), size=64)  # small parts: several even for this pool
    assert len(parts) > 2

    def part(i: int, data: bytes | None = None, **kw):
        return K.StepBatch(worker_id="w1", session=SESSION, resync=K.Resync(
            seq=sim.kv.seq, ledger=parts[i] if data is None else data, part=i, parts=len(parts)), **kw)

    def refused(msg) -> str:
        with pytest.raises(grpc.RpcError) as err:
            client.send(msg)
        assert err.value.code() == C.INVALID_ARGUMENT
        return err.value.details()

    assert "out of order" in refused(part(1))
    client.send(part(0))
    assert "out of order" in refused(part(2))
    step = K.Step(seq=sim.kv.seq + 1, ops=b"[]", digest=wire.digest_to_pb(sim.ledger.digest()))
    assert "last part" in refused(part(0, steps=[step]))
    for i in range(len(parts) - 1):
        client.send(part(i, b"not zlib" if i == 0 else None))
    assert "not a compressed snapshot" in refused(part(len(parts) - 1))
    assert client.state() == state
    for i in range(len(parts)):
        ack = client.send(part(i))
    assert ack.applied == sim.kv.seq and not ack.resync and client.state() == state
    assert server.metrics.resyncs._value.get() == 1
