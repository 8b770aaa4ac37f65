"""Worker discovery through the Kubernetes API: the EndpointSlices of the workers' Service.

`KubernetesDirectory` lists the slices labelled `kubernetes.io/service-name=<service>` and watches them
from the list's resourceVersion, with the official `kubernetes` package. That package is synchronous, so
the list/watch loop runs on a daemon thread; the router's event loop only ever receives a finished worker
set (`call_soon_threadsafe`) and never waits on the API server.

- The worker set is the union over all of the Service's slices of the endpoints that are ready (an unset
  `ready` counts as ready, as the EndpointConditions API says) and not terminating; each is
  `addresses[0]` (IPv6 bracketed) and the slice's port named `port_name`.
- ADDED / MODIFIED / DELETED events update the slice map; BOOKMARK events only move the resourceVersion
  on; 410 Gone (an ERROR event with code 410, or an HTTP 410) means the history is compacted: list again.
- Any other failure (API server away, connection reset, 5xx, 403) is retried after an exponential,
  jittered, capped backoff (0.2 s up to 10 s by default), resuming the watch from the last resourceVersion;
  meanwhile the last good worker set stays in force.
- A worker that leaves the set is marked not alive and kept aside: requests still streaming from it run
  on, its channel is closed once it is idle or unreachable, and it is reused if it comes back first.
  Liveness and free blocks still come from each worker's Info, polled by `WorkerDirectory`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from pathlib import Path

import grpc

from apar.engine.errors import UserError
from services.router.workers import WorkerDirectory, WorkerHandle, pb

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(path: Path = NAMESPACE_FILE) -> str:
    """The pod's own namespace when running in a cluster, else "default"."""
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def kube_api_client(kube_api: str | None = None):
    """A `kubernetes.client.ApiClient`: for `kube_api` (a plain URL such as `kubectl proxy`'s
    http://127.0.0.1:8001) when given, else the in-cluster service account, else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kube_api:
        if not kube_api.startswith(("http://", "https://")):
            raise UserError(f"--kube-api wants a URL such as http://127.0.0.1:8001, not {kube_api!r}")
        cfg.host = kube_api.rstrip("/")
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as exc:
            in_cluster = str(exc)
            try:
                config.load_kube_config(client_configuration=cfg, persist_config=False)
            except Exception as exc:  # noqa: BLE001  no file, no current context, bad YAML: the user's to fix
                raise UserError(f"no Kubernetes API to discover workers with: not running in a cluster "
                                f"({in_cluster}) and no usable kubeconfig ({exc}); give --kube-api URL (for "
                                "example kubectl proxy's http://127.0.0.1:8001)") from None
    cfg.retries = 0  # no silent retries inside urllib3: the watch loop retries, with its backoff
    return client.ApiClient(cfg)


def endpoint_routable(endpoint: dict) -> bool:
    """Ready (unset means ready) and not terminating (unset means not terminating)."""
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def slice_addresses(obj: dict, port_name: str) -> frozenset[str]:
    """`host:port` of every routable endpoint of one EndpointSlice (its JSON form)."""
    port = next((p.get("port") for p in obj.get("ports") or [] if (p.get("name") or "") == port_name), None)
    if port is None:
        return frozenset()
    out = set()
    for endpoint in obj.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses or not endpoint_routable(endpoint):
            continue
        host = addresses[0]
        if ":" in host and not host.startswith("["):  # IPv6
            host = f"[{host}]"
        out.add(f"{host}:{port}")
    return frozenset(out)


class Backoff:
    """Exponential backoff with jitter, capped: `first`, 2x`first`, ... up to `cap`, each delay drawn
    from its upper half (so reconnecting routers spread out)."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.tries = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.tries, 30))
        self.tries += 1
        return ceiling / 2 + random.random() * ceiling / 2

    def reset(self) -> None:
        self.tries = 0


class _Gone(Exception):
    """410 Gone: the resourceVersion is no longer in the API server's history."""


class _HTTPError(Exception):
    def __init__(self, status: int, reason: str | None) -> None:
        super().__init__(f"{status} {reason or ''}".strip())
        self.status, self.reason = status, reason


class KubernetesDirectory(WorkerDirectory):
    """Workers from the EndpointSlices of a Kubernetes Service, followed with list and watch.

    `addresses` is the set in force (what the event loop last applied); `resource_version`, `lists`
    (successful lists) and `errors` (failed calls) describe the watch thread, for logs and tests.
    """

    def __init__(self, service: str, namespace: str | None = None, port_name: str = "grpc", api_client=None,
                 kube_api: str | None = None, refresh_s: float = 0.2, backoff_s: tuple[float, float] = (0.2, 10.0),
                 watch_timeout_s: int = 300, connect_timeout_s: float = 5.0, retire_grace_s: float = 5.0,
                 tls=None, token=None, model: str | None = None) -> None:
        from kubernetes import client

        super().__init__([], refresh_s, tls, token, model)
        self.service = service
        self.namespace = namespace or default_namespace()
        self.port_name = port_name
        self.selector = f"{SERVICE_LABEL}={service}"
        self.backoff_s = backoff_s
        self.watch_timeout_s = watch_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retire_grace_s = retire_grace_s
        self._api_client = api_client if api_client is not None else kube_api_client(kube_api)
        self._api = client.DiscoveryV1Api(self._api_client)
        self.addresses: frozenset[str] = frozenset()
        self.resource_version: str | None = None
        self.lists = 0
        self.errors = 0
        self._events = 0
        # the watch thread's own state
        self._slices: dict[str, frozenset[str]] = {}
        self._published: frozenset[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the event loop's own state
        self._retired: dict[str, tuple[WorkerHandle, float]] = {}  # address -> (handle, next close check)
        self._reaper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def where(self) -> str:
        return f"Kubernetes service {self.namespace}/{self.service} port {self.port_name!r}"

    # ---- the event loop's side -------------------------------------------------------------------

    def start(self) -> None:
        """Start the watch thread and the reaper (idempotent; call from the router's event loop)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"kube-discovery-{self.service}", daemon=True)
            self._thread.start()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    def _ensure_poller(self) -> None:
        self.start()
        super()._ensure_poller()

    async def refresh(self, force: bool = False) -> None:
        self.start()
        await super().refresh(force)

    def _apply(self, addresses: frozenset[str]) -> None:
        """Make `addresses` the worker set (runs on the event loop)."""
        if self._stop.is_set():
            return
        added, removed = addresses - self.addresses, self.addresses - addresses
        now = time.monotonic()
        for w in [w for w in self.workers if w.address in removed]:
            self.workers.remove(w)
            w.alive = False
            w.checked = now
            self._retired[w.address] = (w, now + self.retire_grace_s)
        fresh = []
        for addr in sorted(added):
            if addr in self._retired:  # it came back before its channel was closed
                w = self._retired.pop(addr)[0]
                w.alive = False  # until its Info answers again
                self.workers.append(w)
            else:
                w = self._add(addr)
            fresh.append(w)
        self.addresses = addresses
        log.info("%s: %d worker(s) %s%s%s", self.where, len(addresses), ",".join(sorted(addresses)) or "-",
                 f"; added {','.join(sorted(added))}" if added else "",
                 f"; removed {','.join(sorted(removed))}" if removed else "")
        if fresh:  # check the new ones now rather than at the next poll
            task = asyncio.get_running_loop().create_task(self._check_all(fresh))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _check_all(self, handles: list[WorkerHandle]) -> None:
        await asyncio.gather(*(self._check(w) for w in handles if w in self.workers))

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._reap()

    async def _reap(self) -> None:
        """Close the channels of workers that left the set once nothing runs on them any more (or they
        no longer answer): requests that were streaming from a worker when it left are not cut off."""
        now = time.monotonic()
        for addr, (w, due) in list(self._retired.items()):
            if due > now:
                continue
            try:
                info = await w.stub.Info(pb.worker_pb2.WorkerInfoRequest(), timeout=1.0)
                idle = info.running == 0 and info.waiting == 0
            except grpc.aio.AioRpcError:
                idle = True
            if self._retired.get(addr, (None,))[0] is not w:
                continue  # it came back meanwhile
            if idle:
                del self._retired[addr]
                await w.channel.close()
            else:
                self._retired[addr] = (w, time.monotonic() + self.retire_grace_s)

    async def close(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await super().close()
        for w, _ in self._retired.values():
            await w.channel.close()
        self._retired.clear()
        if self._thread is not None:  # a daemon: where the client cannot break its read, it is left behind
            await asyncio.to_thread(self._thread.join, 0.5)

    # ---- the watch thread ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(*self.backoff_s)
        gone_in_a_row = 0
        while not self._stop.is_set():
            delay = 0.0
            try:
                if self.resource_version is None:
                    self._list()
                    backoff.reset()
                started, events = time.monotonic(), self._events
                self._watch_once()
                if self._events > events:
                    gone_in_a_row = 0
                    backoff.reset()
                elif time.monotonic() - started < 1.0:  # ended at once with nothing: do not spin
                    delay = backoff.next()
            except Exception as exc:  # noqa: BLE001  the API server away, reset, refusing: retry later
                if self._stop.is_set():
                    break
                if isinstance(exc, _Gone) or getattr(exc, "status", None) == 410:
                    gone_in_a_row += 1
                    log.info("%s: resourceVersion %s is gone (410): listing again", self.where,
                             self.resource_version)
                    self.resource_version = None
                    if gone_in_a_row > 1:  # 410 right after a fresh list: back off before the next
                        delay = backoff.next()
                else:
                    self.errors += 1
                    delay = backoff.next()
                    # the first failure of an outage, and each time the backoff reaches its cap, is a
                    # warning; the retries in between are debug lines
                    level = logging.WARNING if backoff.tries == 1 or delay > self.backoff_s[1] / 2 else logging.DEBUG
                    log.log(level, "%s: %s; keeping the %d worker(s) known, retrying in %.2f s", self.where,
                            _describe(exc), len(self._published or ()), delay)
            if delay:
                self._stop.wait(delay)
        self._close_client()

    def _list(self) -> None:
        resp = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=(self.connect_timeout_s, 30.0))
        try:
            if not 200 <= resp.status < 300:
                raise _HTTPError(resp.status, resp.reason)
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self._slices = {item["metadata"]["name"]: slice_addresses(item, self.port_name)
                        for item in body.get("items") or []}
        self.resource_version = body["metadata"]["resourceVersion"]
        self.lists += 1
        self._publish()

    def _watch_once(self) -> None:
        """One watch from `resource_version` until the server ends it (its timeout) or it fails."""
        from kubernetes import watch

        # return_type "object": events as plain JSON, the same in every client version and never
        # rejected by model validation (a BOOKMARK carries only metadata)
        w = watch.Watch(return_type="object")
        self._watch = w
        timeout = int(self.watch_timeout_s * (1 + random.random() / 2))
        try:
            for event in w.stream(self._api.list_namespaced_endpoint_slice, self.namespace,
                                  label_selector=self.selector, resource_version=self.resource_version,
                                  allow_watch_bookmarks=True, timeout_seconds=timeout,
                                  _request_timeout=(self.connect_timeout_s, timeout + 30)):
                if self._stop.is_set():
                    w.stop()
                    break
                self._event(event["type"], event.get("raw_object", event.get("object")))
        finally:
            self._watch = None

    def _event(self, kind: str, obj: dict) -> None:
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise _Gone()
            raise RuntimeError(f"watch error {code}: {obj.get('message') if isinstance(obj, dict) else obj}")
        meta = obj.get("metadata") or {}
        self._events += 1
        if kind in ("ADDED", "MODIFIED"):
            self._slices[meta["name"]] = slice_addresses(obj, self.port_name)
        elif kind == "DELETED":
            self._slices.pop(meta["name"], None)
        elif kind != "BOOKMARK":
            return
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind != "BOOKMARK":
            self._publish()

    def _publish(self) -> None:
        addresses = frozenset().union(*self._slices.values())
        if addresses == self._published:
            return
        self._published = addresses
        try:
            self._loop.call_soon_threadsafe(self._apply, addresses)
        except RuntimeError:  # the loop is closed: the router is going away
            self._stop.set()

    def _close_client(self) -> None:
        close = getattr(self._api_client, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # noqa: BLE001  closing at exit: nothing left to do about it
                log.debug("closing the Kubernetes API client: %s", exc)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status:
        reason = getattr(exc, "reason", "") or ""
        hint = (" (the router's ServiceAccount needs get, list and watch on endpointslices)"
                if status == 403 else "")
        return f"Kubernetes API answered {status} {reason}".rstrip() + hint
    return f"Kubernetes API unreachable ({type(exc).__name__}: {str(exc)[:200]})"
