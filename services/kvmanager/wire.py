"""Protobuf <-> the KV manager's domain types; with the servicer and the worker's client, the only module
that sees `kvmanager_pb2`.

`*_from_pb` builds batches and specs from a message (raising BadRequest for what cannot be one: ops or
a snapshot that are not the JSON they should be); the manager checks every value. A step's ops travel
as the JSON of `json_forms` (three times cheaper to build and read than a message per op, and the form the
store logs). `*_to_pb` builds messages
from batches, acks, usage and ledger snapshots. Both directions of batches and acks are here: the
manager reads batches and writes acks, the worker the other way round.
"""
from __future__ import annotations

from apar.engine.kv.ledger import Digest
from apar.protogen import stubs
from services.kvmanager.json_forms import (ops_from_bytes, ops_to_bytes, snapshot_from_bytes, snapshot_parts,
                                      snapshot_to_bytes)
from services.kvmanager.records import BadRequest, Usage, WorkerSpec
from services.kvmanager.replication import Ack, LogBatch, Resync, ResyncPart, LogEntry

K = stubs().kvmanager_pb2


_new = tuple.__new__  # a NamedTuple made without its Python-level __new__ (a replica reads one per step)


def digest_from_pb(d) -> Digest:
    return _new(Digest, (d.free_blocks, d.used_blocks, d.threads, d.tokens, d.next_free, d.named, d.contents))


def digest_to_pb(d: Digest):
    return K.Digest(free_blocks=d.free, used_blocks=d.used, threads=d.threads, tokens=d.tokens,
                    next_free=d.next_free, named=d.named, contents=d.contents)


def batch_from_pb(req) -> LogBatch:
    steps = []
    for i, s in enumerate(req.steps):
        raw = s.ops
        try:
            ops = ops_from_bytes(raw)
        except ValueError as exc:
            raise BadRequest(f"step {i}: {exc}") from None
        steps.append(LogEntry(s.seq, ops, digest_from_pb(s.digest), raw=raw))
    resync = part = None
    if req.HasField("resync") and req.resync.parts:  # one part of it: the manager puts them together
        r = req.resync
        part = ResyncPart(r.seq, r.part, r.parts, r.ledger)
    elif req.HasField("resync"):
        try:
            ledger = snapshot_from_bytes(req.resync.ledger)
        except ValueError as exc:
            raise BadRequest(f"resync: the ledger is not JSON: {exc}") from None
        resync = Resync(req.resync.seq, ledger)
    return LogBatch(req.session, steps, resync, part)


def batch_to_pbs(worker_id: str, batch: LogBatch) -> list:
    """The messages a batch travels in, in order: one, or with a resync, one per part of its snapshot
    (compressed; the last part with the steps), so a pool of any size resyncs under the message cap."""
    if batch.resync is None:
        return [batch_to_pb(worker_id, batch)]
    parts = snapshot_parts(batch.resync.ledger)
    return [K.StepBatch(worker_id=worker_id, session=batch.session,
                        resync=K.Resync(seq=batch.resync.seq, ledger=data, part=i, parts=len(parts)),
                        steps=batch_to_pb(worker_id, batch).steps if i == len(parts) - 1 else [])
            for i, data in enumerate(parts)]


def batch_to_pb(worker_id: str, batch: LogBatch):
    msg = K.StepBatch(worker_id=worker_id, session=batch.session,
                      steps=[K.Step(seq=s.seq, ops=ops_to_bytes(s.ops), digest=digest_to_pb(s.digest))
                             for s in batch.steps])
    if batch.resync is not None:
        msg.resync.CopyFrom(K.Resync(seq=batch.resync.seq, ledger=snapshot_to_bytes(batch.resync.ledger)))
    return msg


def ack_to_pb(ack: Ack):
    return K.StepAck(applied=ack.applied, digest=digest_to_pb(ack.digest), resync=ack.resync)


def ack_from_pb(resp) -> Ack:
    return Ack(resp.applied, digest_from_pb(resp.digest), resp.resync)


def spec_from_pb(req, default_ttl_s: int) -> WorkerSpec:
    """A RegisterRequest as a checked spec; ttl_seconds 0 takes the manager's default."""
    return WorkerSpec(worker_id=req.worker_id, address=req.address, num_blocks=req.num_blocks,
                      block_size=req.block_size, ttl_s=req.ttl_seconds or default_ttl_s, model=req.model)


def usage_to_pb(usage: list[Usage]):
    return K.UsageResponse(workers=[K.WorkerUsage(worker_id=u.worker_id, address=u.address, num_blocks=u.num_blocks,
                                                  free_blocks=u.free_blocks, requests=u.requests,
                                                  block_size=u.block_size, cached_blocks=u.cached_blocks,
                                                  model=u.model,
                                                  digest=None if u.digest is None else digest_to_pb(u.digest))
                                    for u in usage])


def prefix_to_pb(found: list[tuple[str, str, int]]):
    return K.PrefixResponse(workers=[K.WorkerPrefix(worker_id=w, address=a, blocks=n) for w, a, n in found])


def state_to_pb(snapshot: dict):
    """A ledger snapshot (KVLedger.snapshot) as LedgerState: free ids in allocation order, used by id."""
    used = [K.BlockOwner(block=i, owner=K.ThreadKey(request=r or "", thread=t or 0), refcount=c)  # named: no owner
            for i, r, t, c, *_ in sorted(snapshot["blocks"], key=lambda b: b[0])]
    return K.LedgerState(num_blocks=snapshot["num_blocks"], free=snapshot["free"], used=used)
