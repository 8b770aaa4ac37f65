"""Worker discovery through the Kubernetes API, against a real HTTP server on loopback speaking the
list/watch protocol (tests/kube_fake.py): the router's worker set follows added, not ready, terminating
and removed endpoints, joins several slices, follows bookmarks, re-lists on 410 Gone and rides out the API
server going away. Every wait is on an event with a deadline, never a fixed sleep."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from apar.cli import main as cli
from apar.engine.errors import UserError
from apar.protogen import stubs
from services.router.discovery import (
    Backoff,
    KubernetesDirectory,
    default_namespace,
    endpoint_routable,
    kube_api_client,
    slice_addresses,
)
from tests.faults import wait_until
from tests.kube_fake import FakeKubeAPI, endpoint, endpoint_slice

pb = stubs()
NS, SVC = "apar", "apar-worker"


class LoopThread:
    """An asyncio loop on its own thread, as the router's: the directory lives on it, the test polls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def kube():
    fake = FakeKubeAPI().start()
    yield fake
    fake.stop()


def start_directory(loop: LoopThread, url: str, **kw) -> KubernetesDirectory:
    async def make():
        kw.setdefault("backoff_s", (0.05, 0.4))
        d = KubernetesDirectory(SVC, NS, "grpc", api_client=kube_api_client(url), **kw)
        d.start()
        return d

    return loop.call(make())


@pytest.fixture
def directory(loop, kube):
    made = []

    def make(**kw) -> KubernetesDirectory:
        made.append(start_directory(loop, kube.url, **kw))
        return made[-1]

    yield make
    for d in made:
        loop.call(d.close())


def worker_set(loop: LoopThread, d: KubernetesDirectory) -> set[str]:
    """The addresses of the workers the router may route to, read on the router's loop."""
    async def read():
        return {w.address for w in d.workers}

    return loop.call(read())


def wait_set(loop, d, expected: set[str], what: str = "") -> None:
    wait_until(lambda: worker_set(loop, d) == expected, 10, what or f"the worker set to become {expected}")
    assert d.addresses == expected


def svc_slice(name: str, endpoints: list[dict], port: int = 50061, **kw) -> dict:
    return endpoint_slice(name, SVC, endpoints, port, namespace=NS, **kw)


# ---- pure parts ---------------------------------------------------------------------------------------


def test_endpoint_conditions_follow_the_api_semantics():
    assert endpoint_routable({"addresses": ["10.0.0.1"]})  # no conditions: unknown ready counts as ready
    assert endpoint_routable({"conditions": {"ready": True, "serving": True}})
    assert endpoint_routable({"conditions": {"ready": None}})
    assert not endpoint_routable({"conditions": {"ready": False}})
    assert not endpoint_routable({"conditions": {"ready": True, "terminating": True}})  # publishNotReady
    assert not endpoint_routable({"conditions": {"ready": False, "serving": True, "terminating": True}})


def test_slice_addresses_take_the_named_port_and_bracket_ipv6():
    obj = svc_slice("s", [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)], 7000,
                    extra_ports=(("metrics", 9100),))
    obj["ports"].reverse()  # the port is found by name, not by position
    assert slice_addresses(obj, "grpc") == {"10.0.0.1:7000"}
    assert slice_addresses(obj, "metrics") == {"10.0.0.1:9100"}
    assert slice_addresses(obj, "http") == set()
    v6 = svc_slice("s6", [endpoint("fd00::1"), {"addresses": [], "conditions": {}}], 7000, address_type="IPv6")
    assert slice_addresses(v6, "grpc") == {"[fd00::1]:7000"}
    assert slice_addresses({**obj, "endpoints": None}, "grpc") == set()  # an empty slice serializes null
    unnamed = svc_slice("u", [endpoint("10.0.0.3")], 7001, port_name="")
    assert slice_addresses(unnamed, "") == {"10.0.0.3:7001"}


def test_backoff_is_exponential_jittered_and_capped():
    b = Backoff(0.2, 10.0)
    delays = [b.next() for _ in range(12)]
    for i, d in enumerate(delays):
        ceiling = min(10.0, 0.2 * 2 ** i)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 10.0 and delays[-1] >= 5.0
    b.reset()
    assert b.next() <= 0.2


def test_discovery_imports_no_torch():
    code = ("import sys\nimport services.router.discovery, kubernetes.client, kubernetes.watch\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_namespace_defaults_to_the_pods_own(tmp_path):
    f = tmp_path / "namespace"
    f.write_text("serving\n")
    assert default_namespace(f) == "serving"
    assert default_namespace(tmp_path / "absent") == "default"


def test_no_kubernetes_config_is_a_clear_user_error(monkeypatch, tmp_path, capsys):
    from kubernetes.config import kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "no-kubeconfig"))
    with pytest.raises(UserError, match="--kube-api"):
        kube_api_client(None)
    with pytest.raises(UserError, match="URL"):
        kube_api_client("127.0.0.1:8001")
    assert cli(["router", "--model", str(tmp_path), "--discovery", "kubernetes", "--worker-service", SVC]) == 2
    assert "no Kubernetes API" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--discovery", "kubernetes"], "--worker-service"),
    (["--discovery", "kubernetes", "--worker-service", SVC, "--workers", "a:1"], "--workers"),
    (["--worker-service", SVC], "--worker-service"),
    (["--discovery", "static", "--kvmanager", "k:1"], "--kvmanager"),
    ([], "--discovery kubernetes"),
])
def test_router_discovery_flags_are_checked(argv, message, tmp_path, capsys):
    assert cli(["router", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


# ---- list and watch against the fake API server ---------------------------------------------------------


def test_added_workers_join_and_other_services_are_ignored(kube, loop, directory):
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1")], extra_ports=(("metrics", 9100),)))
    kube.apply(endpoint_slice("other-1", "other", [endpoint("10.9.9.9")], 50061, namespace=NS))
    kube.apply(endpoint_slice("w-elsewhere", SVC, [endpoint("10.8.8.8")], 50061, namespace="default"))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061"}, "the listed worker")
    assert d.lists == 1
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]))  # a pod added (MODIFIED)
    kube.apply(endpoint_slice("other-1", "other", [endpoint("10.9.9.8")], 50061, namespace=NS))
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.2:50061"}, "the added worker")
    assert kube.list_count() == 1  # followed by the watch, no new list
    [(_, query)] = [r for r in kube.requests if r[0] == "list"]
    assert query["labelSelector"] == f"kubernetes.io/service-name={SVC}"


def test_not_ready_and_terminating_endpoints_get_no_requests(kube, loop, directory):
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False),
                                 endpoint("10.0.0.3", ready=None),  # unset: counts as ready
                                 endpoint("10.0.0.4", ready=True, terminating=True)]))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.3:50061"})
    # 10.0.0.2 becomes ready, 10.0.0.1 starts terminating (serving its last requests, not ready)
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
                                 endpoint("10.0.0.2"), endpoint("10.0.0.3", ready=None),
                                 endpoint("10.0.0.4", ready=True, terminating=True)]))
    wait_set(loop, d, {"10.0.0.2:50061", "10.0.0.3:50061"}, "the readiness change")


def test_two_slices_are_joined_and_a_deleted_slice_removes_its_workers(kube, loop, directory):
    kube.apply(svc_slice("w-a", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]))
    kube.apply(svc_slice("w-b", [endpoint("10.0.1.1"), endpoint("10.0.0.2")]))  # one endpoint in both
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.2:50061", "10.0.1.1:50061"}, "the union of both slices")
    kube.apply(svc_slice("w-c", [endpoint("10.0.2.1")]))
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.2:50061", "10.0.1.1:50061", "10.0.2.1:50061"}, "a third slice")
    kube.delete("w-a", NS)
    wait_set(loop, d, {"10.0.0.2:50061", "10.0.1.1:50061", "10.0.2.1:50061"}, "slice w-a's removal")
    kube.apply(svc_slice("w-b", []))  # emptied, as the controller leaves a slice
    wait_set(loop, d, {"10.0.2.1:50061"}, "slice w-b emptied")


class FakeWorker:
    """A worker's Info RPC on loopback, reporting `running`; enough for liveness and channel reaping."""

    def __init__(self, loop: LoopThread) -> None:
        self.running = 0
        self.loop = loop
        outer = self

        class Servicer(pb.worker_pb2_grpc.WorkerServicer):
            async def Info(self, request, context):
                return pb.worker_pb2.WorkerInfo(worker_id="fake", num_blocks=64, free_blocks=64,
                                                running=outer.running)

        async def start():
            server = grpc.aio.server()
            pb.worker_pb2_grpc.add_WorkerServicer_to_server(Servicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = loop.call(start())

    def stop(self) -> None:
        self.loop.call(self.server.stop(None))


def test_a_removed_worker_is_marked_dead_drained_and_reused_when_it_returns(kube, loop, directory):
    worker = FakeWorker(loop)
    addr = f"127.0.0.1:{worker.port}"
    try:
        kube.apply(svc_slice("w-1", [endpoint("127.0.0.1")], worker.port))
        d = directory(retire_grace_s=0.05)
        wait_set(loop, d, {addr})
        [handle] = wait_until(lambda: [w for w in d.workers if w.alive], 10, "the worker's Info to answer")
        assert loop.call(d.choose()) is handle

        worker.running = 1  # a request still streams from it when it leaves
        kube.apply(svc_slice("w-1", [endpoint("127.0.0.1", ready=False)], worker.port))
        wait_set(loop, d, set(), "the not-ready worker to leave")
        assert handle.alive is False and loop.call(d.choose()) is None
        due = d._retired[addr][1]  # the reaper looks at it while it is busy: its channel stays open
        wait_until(lambda: d._retired[addr][1] > due, 10, "the reaper to look at the busy worker")
        assert handle.channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN

        kube.apply(svc_slice("w-1", [endpoint("127.0.0.1")], worker.port))  # it comes back
        wait_set(loop, d, {addr}, "the worker's return")
        assert [w for w in d.workers] == [handle]  # the same handle and channel, reused
        wait_until(lambda: handle.alive, 10, "the returning worker's Info")
        assert loop.call(d.choose()) is handle

        worker.running = 0
        kube.delete("w-1", NS)
        wait_set(loop, d, set(), "the deleted slice's worker to leave")
        wait_until(lambda: addr not in d._retired, 10, "the idle worker's channel to be closed")
        assert handle.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    finally:
        worker.stop()


def test_bookmarks_move_the_resource_version_so_a_resumed_watch_needs_no_list(kube, loop, directory):
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1")]))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061"})
    wait_until(lambda: kube.watch_count() >= 1, 5, "the watch")
    [(_, query)] = [r for r in kube.requests if r[0] == "watch"]
    assert query["allowWatchBookmarks"].lower() == "true" and query["resourceVersion"] == d.resource_version
    moved = kube.advance(50)  # other objects change; this watch sees no event, only a bookmark
    kube.bookmark()
    wait_until(lambda: d.resource_version == str(moved), 5, "the bookmark's resourceVersion")
    assert worker_set(loop, d) == {"10.0.0.1:50061"}
    # the history before the bookmark is compacted; the watch breaks; resuming from the bookmark works
    kube.compact()
    kube.stop()
    kube.start()
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1"), endpoint("10.0.0.5")]))
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.5:50061"}, "the change after the resumed watch")
    assert kube.list_count() == 1, "a bookmark-resumed watch must not need a new list"
    assert any(q.get("resourceVersion") == str(moved) for kind, q in kube.requests if kind == "watch")


def test_a_410_gone_error_event_makes_it_list_again(kube, loop, directory):
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1")]))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061"})
    wait_until(lambda: kube.watch_count() >= 1, 5, "the watch")
    kube.expire()  # the open watch gets ERROR 410 and the history is compacted
    wait_until(lambda: d.lists == 2 and kube.list_count() == 2, 10, "a re-list after 410 Gone")
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.2")]))
    wait_set(loop, d, {"10.0.0.2:50061"}, "the change after the re-list")
    assert d.errors == 0  # 410 is part of the protocol, not a failure


@pytest.mark.parametrize("stale", ["event", "status"])
def test_changes_missed_while_the_api_server_was_away_come_from_a_relist_on_410(kube, loop, directory, stale):
    kube.stale = stale  # a stale resourceVersion refused with an ERROR event, or with HTTP 410
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.2:50061"})
    kube.stop()
    errors = d.errors
    wait_until(lambda: d.errors > errors, 10, "a failed reconnect")
    kube.apply(svc_slice("w-1", [endpoint("10.0.0.2"), endpoint("10.0.0.3")]))
    kube.compact()  # the API server comes back without the history the router would resume from
    kube.start()
    wait_set(loop, d, {"10.0.0.2:50061", "10.0.0.3:50061"}, "the state re-listed after 410")
    assert d.lists == 2


def test_the_last_good_set_stays_while_the_api_server_is_away(kube, loop, directory):
    kube.apply(svc_slice("w-a", [endpoint("10.0.0.1")]))
    kube.apply(svc_slice("w-b", [endpoint("10.0.0.2")]))
    d = directory()
    wait_set(loop, d, {"10.0.0.1:50061", "10.0.0.2:50061"})
    wait_until(lambda: kube.watch_count() >= 1, 5, "the watch")
    kube.stop()
    errors = d.errors
    wait_until(lambda: d.errors >= errors + 3, 10, "several failed reconnects")  # backing off, not spinning
    assert worker_set(loop, d) == {"10.0.0.1:50061", "10.0.0.2:50061"}, "the set must survive the outage"
    # changes made meanwhile (another API server replica) are in the history the watch resumes from
    kube.delete("w-a", NS)
    kube.start()
    wait_set(loop, d, {"10.0.0.2:50061"}, "the change made while the server was away")
    kube.apply(svc_slice("w-b", [endpoint("10.0.0.2"), endpoint("10.0.0.3")]))
    wait_set(loop, d, {"10.0.0.2:50061", "10.0.0.3:50061"}, "changes after the restart")
    assert d.lists == 1  # resumed from the resourceVersion: no re-list was needed


def test_a_down_api_server_at_start_is_retried_with_backoff(loop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = start_directory(loop, f"http://127.0.0.1:{port}", backoff_s=(0.05, 0.2))
    try:
        wait_until(lambda: d.errors >= 3, 10, "reconnect attempts")
        assert worker_set(loop, d) == set() and loop.call(d.choose()) is None
        fake = FakeKubeAPI(port).start()
        try:
            fake.apply(svc_slice("w-1", [endpoint("10.0.0.7")]))
            wait_set(loop, d, {"10.0.0.7:50061"}, "the first list once the server is up")
        finally:
            fake.stop()
    finally:
        loop.call(d.close())


def test_a_hung_api_server_never_blocks_the_routers_loop(loop):
    """An API server that accepts connections and never answers: the watch thread waits on it (its
    connection is seen here, unanswered), while the router's loop answers choose and refresh and the
    directory closes. The calls' own timeouts (5 s) are far below the 30 s the watch waits for a reply."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        hung.settimeout(10)
        d = start_directory(loop, f"http://127.0.0.1:{hung.getsockname()[1]}")
        conn = None
        try:
            conn, _ = hung.accept()  # the watch thread's list request: it now waits for an answer
            conn.settimeout(10)
            assert conn.recv(65536).startswith(b"GET ")
            for _ in range(5):
                assert loop.call(d.choose(), timeout=5) is None
                loop.call(d.refresh(force=True), timeout=5)
            assert d.lists == 0
        finally:
            loop.call(d.close(), timeout=5)
            if conn is not None:
                conn.close()
