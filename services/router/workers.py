"""The router's view of the workers: their info, which are alive, and the one with the most free blocks."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from apar.protogen import stubs

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
    dead until its Info answers again."""

    def __init__(self, addresses: list[str], refresh_s: float = 0.2) -> None:
        self.refresh_s = refresh_s
        self._poller: asyncio.Task | None = None
        self.workers: list[WorkerHandle] = []
        for addr in addresses:
            self._add(addr)

    def _add(self, addr: str) -> WorkerHandle:
        channel = grpc.aio.insecure_channel(addr)
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
    blocks from the manager's ledger; each worker's Info still gives its model facts."""

    def __init__(self, kvmanager: str, refresh_s: float = 0.2) -> None:
        super().__init__([], refresh_s)
        self._kv_channel = grpc.aio.insecure_channel(kvmanager)
        self._kv = pb.kvmanager_pb2_grpc.KVManagerStub(self._kv_channel)

    async def refresh(self, force: bool = False) -> None:
        try:
            usage = await self._kv.Usage(pb.kvmanager_pb2.UsageRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("KV manager usage failed: %s; keeping the last view", exc.code().name)
            await super().refresh(force)
            return
        known = {w.address: w for w in self.workers}
        listed = {u.address: u for u in usage.workers}
        for addr in listed:
            if addr not in known:
                known[addr] = self._add(addr)
        for addr, w in known.items():
            if addr not in listed:
                w.alive = False
        await super().refresh(force)
        for addr, u in listed.items():  # the manager's count of free blocks is the authority
            w = known[addr]
            if w.info is not None:
                w.info.free_blocks = u.free_blocks
        for addr, w in known.items():
            if addr not in listed:
                w.alive = False

    async def close(self) -> None:
        await super().close()
        await self._kv_channel.close()
