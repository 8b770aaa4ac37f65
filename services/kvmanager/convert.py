"""Protobuf <-> the KV manager's domain types; with the servicer, the only module that sees `kvmanager_pb2`.

`*_from_pb` builds ops, specs and ids from a request (raising BadRequest for what cannot be an op: an
empty oneof); the manager checks every value. `*_to_pb` builds responses from answers, usage and
ledger snapshots. `ops_to_pb` and `answer_from_pb` are the client's side, for tests and callers.
"""
from __future__ import annotations

from apar.protogen import stubs
from services.kvmanager.ledger import ThreadRef
from services.kvmanager.ops import Append, Finish, Fork, Op, Release, Start, StepAnswer
from services.kvmanager.records import BadRequest, Usage, WorkerSpec

K = stubs().kvmanager_pb2


def key_from_pb(k) -> ThreadRef:
    return ThreadRef(k.request, k.thread)


def key_to_pb(ref: ThreadRef):
    return K.ThreadKey(request=ref.request, thread=ref.thread)


def op_from_pb(op, i: int) -> Op:
    kind = op.WhichOneof("op")
    if kind == "append":
        return Append(key_from_pb(op.append.thread), op.append.tokens)
    if kind == "fork":
        return Fork(key_from_pb(op.fork.parent), key_from_pb(op.fork.child))
    if kind == "start":
        return Start(key_from_pb(op.start))
    if kind == "finish":
        return Finish(key_from_pb(op.finish))
    if kind == "release":
        return Release(op.release)
    raise BadRequest(f"op {i}: no operation set (start, append, fork, finish or release)")


def ops_from_pb(ops) -> list[Op]:
    return [op_from_pb(op, i) for i, op in enumerate(ops)]


def op_to_pb(op: Op):
    if isinstance(op, Append):
        return K.KVOp(append=K.AppendOp(thread=key_to_pb(op.thread), tokens=op.tokens))
    if isinstance(op, Fork):
        return K.KVOp(fork=K.ForkOp(parent=key_to_pb(op.parent), child=key_to_pb(op.child)))
    if isinstance(op, Start):
        return K.KVOp(start=key_to_pb(op.thread))
    if isinstance(op, Finish):
        return K.KVOp(finish=key_to_pb(op.thread))
    if isinstance(op, Release):
        return K.KVOp(release=op.request)
    raise TypeError(f"not an op: {op!r}")


def ops_to_pb(ops: list[Op]) -> list:
    return [op_to_pb(op) for op in ops]


def step_to_pb(worker_id: str, seq: int, ops: list[Op]):
    return K.StepRequest(worker_id=worker_id, seq=seq, ops=ops_to_pb(ops))


def spec_from_pb(req, default_ttl_s: int) -> WorkerSpec:
    """A RegisterRequest as a checked spec; ttl_seconds 0 takes the manager's default."""
    return WorkerSpec(worker_id=req.worker_id, address=req.address, num_blocks=req.num_blocks,
                      block_size=req.block_size, ttl_s=req.ttl_seconds or default_ttl_s)


def answer_to_pb(answer: StepAnswer, free_blocks: int):
    appends = [K.Slots(failed=True) if s is None else K.Slots(blocks=[b for b, _ in s], offsets=[o for _, o in s])
               for s in answer.appends]
    return K.StepResponse(appends=appends, freed=answer.freed, free_blocks=free_blocks, error=answer.error or "")


def answer_from_pb(resp) -> StepAnswer:
    appends = [None if s.failed else list(zip(s.blocks, s.offsets)) for s in resp.appends]
    return StepAnswer(appends=appends, freed=list(resp.freed), error=resp.error or None)


def usage_to_pb(usage: list[Usage]):
    return K.UsageResponse(workers=[K.WorkerUsage(worker_id=u.worker_id, address=u.address, num_blocks=u.num_blocks,
                                                  free_blocks=u.free_blocks, requests=u.requests) for u in usage])


def state_to_pb(snapshot: dict):
    """A ledger snapshot (KVLedger.snapshot) as LedgerState: free ids in allocation order, used by id."""
    used = [K.BlockOwner(block=i, owner=K.ThreadKey(request=r, thread=t), refcount=c)
            for i, r, t, c, _ in sorted(snapshot["blocks"])]
    return K.LedgerState(num_blocks=snapshot["num_blocks"], free=snapshot["free"], used=used)
