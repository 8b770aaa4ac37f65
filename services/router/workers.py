"""The router's view of the workers: their info, which are alive, and the one with the most free blocks."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from apar.protogen import stubs
from services.kvmanager.shards import parse_shards
from services.security import TLSFiles, open_channel

log = logging.getLogger(__name__)
pb = stubs()


@dataclass(slots=True)
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: object
    info: object | None = None  # the last WorkerInfo
    alive: bool = False
    checked: float = 0.0


class WorkerDirectory:
    """Static worker addresses; liveness and free blocks from each worker's Info, polled in the background
    every `refresh_s` so a request never waits on a dead worker. A worker that fails a call is marked
    dead until its Info answers again. With `tls` every channel is mutual TLS with the router's own
    certificate (a worker that does not present one from the CA never answers)."""

    def __init__(self, addresses: list[str], refresh_s: float = 0.2, tls: TLSFiles | None = None) -> None:
        self.refresh_s = refresh_s
        self.tls = tls
        self._poller: asyncio.Task | None = None
        self.workers: list[WorkerHandle] = []
        for addr in addresses:
            self._add(addr)

    def _add(self, addr: str) -> WorkerHandle:
        channel = open_channel(addr, self.tls, aio=True)
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
        try:
            w.info = await w.stub.Info(pb.worker_pb2.WorkerInfoRequest(), timeout=1.0)
            w.alive = True
        except grpc.aio.AioRpcError as exc:
            if w.alive:
                log.warning("worker %s is down: %s", w.address, exc.code().name)
            w.alive = False
        w.checked = time.monotonic()

    def mark_dead(self, w: WorkerHandle) -> None:
        w.alive = False
        w.checked = time.monotonic()

    async def choose(self) -> WorkerHandle | None:
        """The live worker with the most free KV blocks (fewest queued on a tie), or None."""
        self._ensure_poller()
        live = [w for w in self.workers if w.alive and w.info is not None]
        if not live:
            await self.refresh(force=True)
            live = [w for w in self.workers if w.alive and w.info is not None]
        if not live:
            return None
        return max(live, key=lambda w: (w.info.free_blocks, -w.info.waiting, -w.info.running))

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
    answer keeps its last view while the others' go on."""

    def __init__(self, kvmanager: str, refresh_s: float = 0.2, tls: TLSFiles | None = None) -> None:
        super().__init__([], refresh_s, tls)
        self._kv_channels = [open_channel(shard, tls, aio=True) for shard in parse_shards(kvmanager)]
        self._kv = [pb.kvmanager_pb2_grpc.KVManagerStub(channel) for channel in self._kv_channels]
        self._views: list[dict] = [{} for _ in self._kv]  # per shard: worker address -> its WorkerUsage

    async def refresh(self, force: bool = False) -> None:
        answers = await asyncio.gather(*(kv.Usage(pb.kvmanager_pb2.UsageRequest(), timeout=1.0) for kv in self._kv),
                                       return_exceptions=True)
        for i, answer in enumerate(answers):
            if isinstance(answer, grpc.aio.AioRpcError):
                log.warning("KV manager shard %d usage failed: %s; keeping its last view", i, answer.code().name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                self._views[i] = {u.address: u for u in answer.workers}
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

    async def close(self) -> None:
        await super().close()
        for channel in self._kv_channels:
            await channel.close()
