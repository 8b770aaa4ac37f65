"""A client that never reads its stream: the worker holds a bounded number of its events, then cuts it off
with a clear status and frees its KV blocks (before: the events piled up in the worker for as long as the
request ran)."""
from __future__ import annotations

import grpc

from apar.protogen import stubs
from tests.faults import wait_until, worker_info
from tests.procs import Proc, free_port

pb = stubs()
W = pb.worker_pb2
BUFFER = 64
BLOCKS = 2048


def test_a_client_that_never_reads_is_cut_off_with_its_memory_bounded(long_llama_dir):
    port = free_port()
    worker = Proc("worker", "--model", str(long_llama_dir), "--port", str(port), "--kv-blocks", str(BLOCKS),
                  "--stream-buffer", str(BUFFER))
    address = f"127.0.0.1:{port}"
    try:
        worker.wait_for("listening on")
        # no BDP probing: the client's receive window stays at 64 KiB, so unread messages fill it soon
        channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        request = W.WorkerRequest(request_id="never-reads", prompt_ids=list(range(5, 40)), sampling=pb.common_pb2.
                                  SamplingParameters(max_tokens=16000, ignore_eos=True, n=16))
        call = pb.worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=300)
        wait_until(lambda: worker_info(address).running == 1, 60, "the request running")
        worker.wait_for(f"request never-reads cut off: its client fell more than {BUFFER} events behind", 240)
        info = wait_until(lambda: (lambda i: i if i.running == 0 and i.free_blocks == BLOCKS else None)(
            worker_info(address)), 30, "the request gone and its blocks free")
        assert info.running == 0
        received = 0
        try:
            for message in call:  # the client reads at last: what the transport held, then the status
                received += sum(len(e.tokens.tokens) for e in message.events if e.WhichOneof("event") == "tokens")
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "fell behind" in details, (code, details)
        assert 0 < received < 16 * 16000  # cut off long before the end
        channel.close()
    finally:
        worker.stop()
    assert "Traceback" not in "".join(worker.lines)
