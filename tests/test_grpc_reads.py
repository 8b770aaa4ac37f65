"""`services.grpc_common.responses`: a server stream read with no gRPC read ever left in a cancelled task
(grpc.aio never frees such a read's batch: grpc/grpc#43360), cancelling the call as before."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.grpc_common import responses


class _Call:
    """A client call whose second read waits until the call is cancelled, then ends as grpc.aio's does
    (CancelledError from the read). Records whether a read was interrupted by its task's cancellation."""

    def __init__(self) -> None:
        self.reads = 0
        self.cancels = 0
        self.interrupted = 0
        self.waiting = asyncio.Event()
        self.read_over = asyncio.Event()  # set when the pending read has ended, however it ended
        self._ended = asyncio.Event()

    async def read(self):
        self.reads += 1
        if self.reads == 1:
            return b"first"
        self.waiting.set()
        try:
            await self._ended.wait()
        except asyncio.CancelledError:
            self.interrupted += 1  # what leaks the batch in grpc.aio
            raise
        finally:
            self.read_over.set()
        raise asyncio.CancelledError  # the call was cancelled: the read ends by itself

    def cancel(self) -> bool:
        self.cancels += 1
        self._ended.set()
        return True

    def __aiter__(self):  # `async for msg in call`: the reads run in the consumer's task
        async def gen():
            while (msg := await self.read()) is not grpc.aio.EOF:
                yield msg
        return gen()


async def _consume_then_cancel(call, wrap) -> list:
    got = []

    async def consumer():
        async for msg in wrap(call):
            got.append(msg)

    task = asyncio.ensure_future(consumer())
    await call.waiting.wait()  # the second read is pending
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(call.read_over.wait(), 5)  # the pending read has ended, in whichever task
    return got


def test_a_cancelled_consumer_cancels_the_call_and_its_read_ends_by_itself():
    async def main():
        call = _Call()
        got = await _consume_then_cancel(call, responses)
        return got, call

    got, call = asyncio.run(main())
    assert got == [b"first"]
    assert call.cancels == 1  # the call is cancelled at gRPC's level (the worker frees its KV)
    assert call.interrupted == 0  # and no read was cut off in its task


def test_async_for_over_the_call_interrupts_the_pending_read():
    """What `responses` avoids: iterating the call itself, the consumer's cancellation lands in the read."""
    async def main():
        call = _Call()
        await _consume_then_cancel(call, lambda c: c)
        return call

    assert asyncio.run(main()).interrupted == 1


def test_a_real_stream_cancelled_mid_read_ends_on_the_server_and_reads_to_the_end_otherwise():
    async def main():
        handler_ended = asyncio.Event()
        second_sent = asyncio.Event()

        async def stream(request, context):
            try:
                yield b"a"
                if request == b"hang":
                    second_sent.set()
                    await asyncio.Event().wait()  # until the client cancels
                yield b"b"
            finally:
                handler_ended.set()

        h = grpc.method_handlers_generic_handler("t.T", {"S": grpc.unary_stream_rpc_method_handler(stream)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((h,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                method = ch.unary_stream("/t.T/S")
                whole = [m async for m in responses(method(b"all"))]
                handler_ended.clear()
                got, first = [], asyncio.Event()

                async def consumer():
                    async for m in responses(method(b"hang")):
                        got.append(m)
                        first.set()

                task = asyncio.ensure_future(consumer())
                await second_sent.wait()
                await first.wait()  # the client has the first message and is reading the next
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.wait_for(handler_ended.wait(), 10)  # the server saw the cancellation
                return whole, got
        finally:
            await server.stop(None)

    whole, got = asyncio.run(main())
    assert whole == [b"a", b"b"]
    assert got == [b"a"]
