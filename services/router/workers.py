"""The router's view of the workers: their info, which are alive, and which one takes the next request.

Without a KV manager a request goes to the live worker with the most free blocks (less what this router
sent it since its last Info). With one
(`KVManagerDirectory`) it goes to the worker that holds the longest cached prefix of its prompt, unless
that worker is loaded well beyond the others (`prefix_choice`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from apar.engine.prefix import block_hashes
from apar.protogen import stubs
from services.kvmanager.shards import parse_shards
from services.repeating import RepeatingWarning
from services.security import TLSFiles, open_channel

log = logging.getLogger(__name__)
pb = stubs()
# A worker more than this many requests above the least loaded one gets no request for its cached prefix:
# a hot prefix spreads to a second worker (which then caches it too) instead of queueing on one.
LOAD_SLACK = 4
PREFIX_WAIT_S = 0.2  # a KV manager shard slower than this counts as holding nothing, for the request asking
# A Prefix call's own deadline, far beyond the wait: the call ends by its answer, not by its deadline or the
# request's cancellation, since every call ended so leaves native memory behind in the manager's grpc.aio
# server (grpc/grpc#43360; measured by `python -m apar.bench_suite.prefix_memory`).
PREFIX_DEADLINE_S = 5.0
PREFIX_PENDING_MAX = 256  # a shard with this many Prefix calls unanswered is not asked (a stalled manager)


@dataclass(slots=True)
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: object
    info: object | None = None  # the last WorkerInfo
    alive: bool = False
    checked: float = 0.0
    inflight: int = 0  # this router's requests to it, from `choose` until `release`
    sent: int = 0  # requests this router has sent it, ever
    asked: int = -1  # `sent` when the Info in `info` was asked for
    unseen: list[tuple[int, int]] = field(default_factory=list)  # (number, blocks) of requests sent since

    @property
    def load(self) -> int:
        """Requests on the worker: running and waiting as it last said, or what this router has sent it
        since, if more (its Info is up to `refresh_s` old)."""
        return max(self.inflight, self.info.running + self.info.waiting)

    @property
    def free_blocks(self) -> int:
        """Its free blocks as its last Info said, less the prompt blocks of the requests this router sent
        it after that Info was asked for: a burst of requests between two polls spreads instead of
        going wherever the last poll saw the most room."""
        return self.info.free_blocks - sum(blocks for _, blocks in self.unseen)

    def blocks_for(self, tokens: int) -> int:
        """KV blocks that `tokens` tokens fill on this worker (a worker saying block size 0 counts as 1)."""
        return -(-tokens // max(self.info.block_size, 1))

    def sent_one(self, blocks: int) -> None:
        self.sent += 1
        self.unseen.append((self.sent, blocks))

    def saw(self, info, asked: int) -> None:
        """An Info asked for when `sent` was `asked`; one older than the Info held is dropped (replies
        may come back out of order)."""
        if asked < self.asked:
            return
        self.info, self.asked = info, asked
        self.unseen = [(n, blocks) for n, blocks in self.unseen if n > asked]


def most_free(live: list[WorkerHandle]) -> WorkerHandle:
    """The worker with the most free KV blocks, counting the requests sent since its Info (fewest queued
    or unseen, then fewest running, on a tie)."""
    return max(live, key=lambda w: (w.free_blocks, -w.info.waiting - len(w.unseen), -w.info.running))


def prefix_choice(live: list[WorkerHandle], cached: dict[str, int], prompt_tokens: int,
                  slack: int = LOAD_SLACK) -> WorkerHandle:
    """The worker for a prompt of `prompt_tokens` tokens, given the tokens of its prefix each worker holds
    cached (`cached`: address -> tokens, absent for none).

    A worker is eligible when its free blocks cover the whole prompt and its load (running and waiting
    requests) is at most `slack` above the least loaded worker's. Among the eligible the longest cached
    prefix wins, then the most free blocks, then the lightest load. None eligible: the most free blocks.
    """
    least = min(w.load for w in live)
    eligible = [w for w in live if w.free_blocks >= w.blocks_for(prompt_tokens)
                and w.load <= least + slack]
    if not eligible:
        return most_free(live)
    return max(eligible, key=lambda w: (cached.get(w.address, 0), w.free_blocks, -w.load))


class WorkerDirectory:
    """Static worker addresses; liveness and free blocks from each worker's Info, polled in the background
    every `refresh_s` so a request never waits on a dead worker. A worker that fails a call is marked
    dead until its Info answers again. With `tls` every channel is mutual TLS with the router's own
    certificate (a worker that does not present one from the CA never answers). With `token` (a
    `cluster_auth.ClusterToken`) a worker is live only while its Info proves it holds the cluster token:
    no request goes to an address a stranger registered or took over. With `model` (the router's served
    model name) a worker whose Info names another model is never live: a worker list or a Service that
    mixes models sends each request only to its own model's workers."""

    def __init__(self, addresses: list[str], refresh_s: float = 0.2, tls: TLSFiles | None = None,
                 token=None, model: str | None = None) -> None:
        self.refresh_s = refresh_s
        self.tls = tls
        self.token = token
        self.model = model
        self._wrong_model: set[str] = set()  # addresses already logged as serving another model
        self._poller: asyncio.Task | None = None
        self.workers: list[WorkerHandle] = []
        for addr in addresses:
            self._add(addr)

    def _add(self, addr: str) -> WorkerHandle:
        channel = open_channel(addr, self.tls, aio=True, token=self.token)
        handle = WorkerHandle(addr, channel, pb.worker_pb2_grpc.WorkerStub(channel))
        self.workers.append(handle)
        return handle

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh(force=True)

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        stale = [w for w in self.workers if force or now - w.checked > self.refresh_s]
        if stale:
            await asyncio.gather(*(self._check(w) for w in stale))

    async def _check(self, w: WorkerHandle) -> None:
        asked = w.sent
        try:
            info = await w.stub.Info(pb.worker_pb2.WorkerInfoRequest(), timeout=1.0)
            w.saw(info, asked)
            w.alive = self._serves_our_model(w.address, info.model)
        except grpc.aio.AioRpcError as exc:
            # a worker going down; or one that fails its first check for want of the token (logged once)
            if w.alive or (not w.checked and exc.code() == grpc.StatusCode.UNAUTHENTICATED):
                log.warning("worker %s is down: %s %s", w.address, exc.code().name, exc.details() or "")
            w.alive = False
        w.checked = time.monotonic()

    def _serves_our_model(self, address: str, model: str) -> bool:
        if self.model is None or model == self.model:
            self._wrong_model.discard(address)
            return True
        if address not in self._wrong_model:
            self._wrong_model.add(address)
            log.warning("worker %s serves model %r, not this router's %r: it gets no request", address, model,
                        self.model)
        return False

    def mark_dead(self, w: WorkerHandle) -> None:
        w.alive = False
        w.checked = time.monotonic()

    async def choose(self, prompt_ids: Sequence[int] = (), cache_salt: int = 0) -> WorkerHandle | None:
        """The live worker with the most free KV blocks (fewest queued on a tie), or None. The caller
        gives the worker back with `release` when the request ends."""
        live = await self._live()
        return self._take(most_free(live), len(prompt_ids)) if live else None

    async def _live(self) -> list[WorkerHandle]:
        self._ensure_poller()
        live = [w for w in self.workers if w.alive and w.info is not None]
        if not live:
            await self.refresh(force=True)
            live = [w for w in self.workers if w.alive and w.info is not None]
        return live

    @staticmethod
    def _take(w: WorkerHandle, prompt_tokens: int) -> WorkerHandle:
        w.inflight += 1
        w.sent_one(w.blocks_for(max(prompt_tokens, 1)))
        return w

    @staticmethod
    def release(w: WorkerHandle) -> None:
        w.inflight -= 1

    async def any_info(self):
        await self.refresh(force=True)
        for w in self.workers:
            if w.alive and w.info is not None:
                return w.info
        return None

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for w in self.workers:
            await w.channel.close()


class KVManagerDirectory(WorkerDirectory):
    """Workers as the KV manager knows them: registered (alive within their time-to-live), with free
    blocks from the manager's ledger; each worker's Info still gives its model facts. `kvmanager` lists
    every shard (`host1:p1,host2:p2`, services/kvmanager/shards.py): each is asked, and one that does not
    answer keeps its last view while the others' go on.

    A request goes by `prefix_choice`: every shard is asked at once (`Prefix`) how many leading blocks of
    the prompt each of its workers holds; a shard that fails or takes over `prefix_wait_s` counts as
    none for its workers, so a slow manager costs a request its cache hit, never its answer. The router
    stops waiting without cancelling the call (nor does the request's own end cancel it): the call runs to
    its answer, or to `PREFIX_DEADLINE_S`, in the background; a shard with `PREFIX_PENDING_MAX` calls
    unanswered is not asked until some are.

    With `model` (the router's served model name) only the workers that registered serving that model
    are taken: a manager shared by several models' workers never sends a request to another model.
    `kv_tls` (default: `tls`) is for the shards' channels: the same files checking another server name
    (the KV manager's role where each role has its certificate, services/peer_names.py)."""

    def __init__(self, kvmanager: str, refresh_s: float = 0.2, tls: TLSFiles | None = None, token=None,
                 model: str | None = None, prefix_wait_s: float = PREFIX_WAIT_S,
                 kv_tls: TLSFiles | None = None) -> None:
        super().__init__([], refresh_s, tls, token, model)
        self.prefix_wait_s = prefix_wait_s
        self._others: frozenset[str] = frozenset()  # other models whose workers the shards list (logged once)
        self._kv_channels = [open_channel(shard, kv_tls or tls, aio=True, token=token) for shard in parse_shards(kvmanager)]
        self._kv = [pb.kvmanager_pb2_grpc.KVManagerStub(channel) for channel in self._kv_channels]
        self._views: list[dict] = [{} for _ in self._kv]  # per shard: worker address -> its WorkerUsage
        self._asking: list[set[asyncio.Task]] = [set() for _ in self._kv]  # per shard: its Prefix calls unanswered
        self._prefix_failing = RepeatingWarning(log)  # shards whose last Prefix call failed
        self._usage_failing = RepeatingWarning(log)  # shards whose last Usage call failed

    async def choose(self, prompt_ids: Sequence[int] = (), cache_salt: int = 0) -> WorkerHandle | None:
        """The worker `prefix_choice` picks for the prompt (its blocks named under `cache_salt`), or None
        when none is alive."""
        live = await self._live()
        if not live:
            return None
        cached = await self.cached_tokens(prompt_ids, live, cache_salt)
        return self._take(prefix_choice(live, cached, len(prompt_ids)), len(prompt_ids))

    async def cached_tokens(self, prompt_ids: Sequence[int], live: list[WorkerHandle],
                            cache_salt: int = 0) -> dict[str, int]:
        """Worker address -> tokens of the prompt's prefix it holds in full blocks, as the shards say. Only
        blocks that leave at least one prompt token to compute count (the engine reuses no more)."""
        held: dict[str, int] = {}
        for bs in {w.info.block_size for w in live}:  # a name includes its block size
            hashes = block_hashes(prompt_ids, bs, limit=(len(prompt_ids) - 1) // bs, salt=cache_salt)
            if not hashes:
                continue
            req = pb.kvmanager_pb2.PrefixRequest(names=hashes)
            asks = [self._ask_prefix(i, req) for i in range(len(self._kv))]
            if any(asks):
                await asyncio.wait([a for a in asks if a is not None], timeout=self.prefix_wait_s)
            for i, ask in enumerate(asks):
                if (failure := _prefix_failure(ask)) is not None:
                    self._prefix_failing.failed(i, failure, "KV manager shard %d prefix lookup failed: %s; its "
                                                "workers count as holding nothing", i, failure)
                    continue
                self._prefix_failing.ok(i, "KV manager shard %d answers prefix lookups again", i)
                for wp in ask.result().workers:
                    held[wp.address] = max(held.get(wp.address, 0), wp.blocks * bs)
        return held

    def _ask_prefix(self, shard: int, req) -> asyncio.Task | None:
        """Shard `shard`'s Prefix call, running on its own (None: too many of its calls are unanswered)."""
        asking = self._asking[shard]
        if len(asking) >= PREFIX_PENDING_MAX:
            return None
        task = asyncio.ensure_future(self._kv[shard].Prefix(req, timeout=PREFIX_DEADLINE_S))
        asking.add(task)

        def settled(t: asyncio.Task) -> None:
            asking.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: an answer nobody waits for any more is no error to report

        task.add_done_callback(settled)
        return task

    async def refresh(self, force: bool = False) -> None:
        answers = await asyncio.gather(*(kv.Usage(pb.kvmanager_pb2.UsageRequest(), timeout=1.0) for kv in self._kv),
                                       return_exceptions=True)
        for i, answer in enumerate(answers):
            if isinstance(answer, grpc.aio.AioRpcError):
                self._usage_failing.failed(i, answer.code().name, "KV manager shard %d usage failed: %s; keeping "
                                           "its last view", i, answer.code().name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                self._usage_failing.ok(i, "KV manager shard %d answers usage again", i)
                self._views[i] = {u.address: u for u in answer.workers if self.model in (None, u.model)}
                self._note_others(answer.workers)
        listed = {addr: u for view in self._views for addr, u in view.items()}
        known = {w.address: w for w in self.workers}
        for addr in listed:
            if addr not in known:
                known[addr] = self._add(addr)
        await super().refresh(force)
        for addr, w in known.items():
            if addr not in listed:
                w.alive = False
            elif w.info is not None:  # the manager's count of free blocks is the authority
                w.info.free_blocks = listed[addr].free_blocks

    def _note_others(self, workers) -> None:
        """Say once (per set of models) that workers of other models are registered: a worker started
        with another --served-model-name (or --model path) than this router's gets no request."""
        others = frozenset(u.model for u in workers if self.model is not None and u.model != self.model)
        if others and others != self._others:
            log.warning("the KV manager lists workers of other models (%s); this router serves %r only",
                        ", ".join(sorted(repr(m) for m in others)), self.model)
        self._others = others

    async def close(self) -> None:
        await super().close()
        for channel in self._kv_channels:  # ends the Prefix calls still running
            await channel.close()


def _prefix_failure(ask: asyncio.Task | None) -> str | None:
    """Why a shard's Prefix call gave no answer in time (None: it answered)."""
    if ask is None:
        return f"{PREFIX_PENDING_MAX} calls unanswered"
    if not ask.done():
        return "no answer in time"
    if ask.cancelled():
        return "CANCELLED"
    if isinstance(exc := ask.exception(), grpc.aio.AioRpcError):
        return exc.code().name
    if exc is not None:
        raise exc
    return None
