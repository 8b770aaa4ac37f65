"""A fake Kubernetes API server on loopback that speaks the list/watch protocol for EndpointSlices.

Only `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` is served, over plain HTTP/1.1, the
way the real API server answers it:

- a list (no `watch`) is an `EndpointSliceList` whose `metadata.resourceVersion` is the store's current
  version;
- `?watch=true` (or `watch=1`) is a chunked response of newline-delimited JSON watch events
  `{"type": ..., "object": ...}`: every event after `resourceVersion` that matches the namespace and
  `labelSelector` (equality terms `k=v,k2=v2`), then new ones as they happen, `BOOKMARK`s when asked for
  with `allowWatchBookmarks=true`, until `timeoutSeconds` passes. Without `resourceVersion` (or with "0")
  it starts with a synthetic `ADDED` per existing object, as the real server does.
- A `resourceVersion` older than the compacted history gets 410 Gone: as an `ERROR` event carrying a
  `Status` with code 410 (what the real server sends, `stale="event"`), or as an HTTP 410 response
  (`stale="status"`).

The store outlives the HTTP server: `stop()` drops every connection at once (a crashed API server: open
watches break mid-stream, new connections are refused) and `start()` serves the same store on the same
port again. `requests` records every request (`"list"` or `"watch"` with its query) so a test can see a
re-list happen.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
SERVICE_LABEL = "kubernetes.io/service-name"


def endpoint(ip: str, ready: bool | None = True, terminating: bool | None = None,
             serving: bool | None = None, node: str = "node-1") -> dict:
    """One EndpointSlice endpoint; a condition given as None is left out (the API's "unknown")."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    return {"addresses": [ip], "conditions": conditions, "nodeName": node,
            "targetRef": {"kind": "Pod", "name": f"pod-{ip}"}}


def endpoint_slice(name: str, service: str, endpoints: list[dict], port: int, port_name: str = "grpc",
                   namespace: str = "default", address_type: str = "IPv4",
                   extra_ports: tuple[tuple[str, int], ...] = ()) -> dict:
    ports = [{"name": port_name, "port": port, "protocol": "TCP"}]
    ports += [{"name": n, "port": p, "protocol": "TCP"} for n, p in extra_ports]
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {SERVICE_LABEL: service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": address_type, "endpoints": endpoints, "ports": ports}


class FakeKubeAPI:
    """EndpointSlices in memory, served with Kubernetes list/watch semantics (see the module docstring)."""

    def __init__(self, port: int = 0, stale: str = "event") -> None:
        self.port = port
        self.stale = stale  # how a too-old resourceVersion is refused: "event" (ERROR 410) or "status"
        self.requests: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str], dict] = {}
        self._log: list[tuple[int, str, dict]] = []  # (resourceVersion, type, object) of every change
        self._compacted = 0  # watches from an older version than this get 410 Gone
        self._signals: list[tuple[int, str, dict]] = []  # (seq, kind, payload): bookmarks and 410s for live watches
        self._seq = 0
        self._epoch = 0  # bumped by stop(): open watches end at once
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # ---- the HTTP server -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKubeAPI:
        api = self

        class Handler(_Handler):
            fake = api

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The API server goes away: the listening socket closes and every open connection breaks."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            self._epoch += 1
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._cond.notify_all()
        self._server = None

    # ---- the store -------------------------------------------------------------------------------

    def apply(self, obj: dict) -> int:
        """Create or replace an object (ADDED or MODIFIED); returns its new resourceVersion."""
        obj = json.loads(json.dumps(obj))
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._cond:
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            kind = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = obj
            self._log.append((self._rv, kind, obj))
            self._cond.notify_all()
            return self._rv

    def delete(self, name: str, namespace: str = "default") -> int:
        with self._cond:
            obj = json.loads(json.dumps(self._objects.pop((namespace, name))))
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._log.append((self._rv, "DELETED", obj))
            self._cond.notify_all()
            return self._rv

    def advance(self, n: int = 1) -> int:
        """Other resources change elsewhere in the cluster: the shared resourceVersion moves on with no
        event for these watchers (so only a bookmark can tell them the new version)."""
        with self._cond:
            self._rv += n
            return self._rv

    def compact(self) -> None:
        """Forget the history up to now: a watch from any older version gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._log = []

    def bookmark(self) -> int:
        """Send every open watch that asked for bookmarks a BOOKMARK at the current version."""
        with self._cond:
            self._seq += 1
            self._signals.append((self._seq, "bookmark", {"resourceVersion": str(self._rv)}))
            self._cond.notify_all()
            return self._rv

    def expire(self) -> None:
        """The watch cache drops what open watches need: each gets an ERROR event with 410 Gone and its
        stream ends; the history is compacted, so resuming from the old version is refused too."""
        with self._cond:
            self._compacted = self._rv
            self._log = []
            self._seq += 1
            self._signals.append((self._seq, "gone", {}))
            self._cond.notify_all()

    def watch_count(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "watch")

    def list_count(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "list")


def _selected(obj: dict, namespace: str, selector: dict[str, str]) -> bool:
    if obj["metadata"]["namespace"] != namespace:
        return False
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _parse_selector(text: str) -> dict[str, str]:
    """Equality terms only (`k=v`, `k==v`), which is all the router sends."""
    terms = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or key.endswith("!") or not key:
            raise ValueError(f"unsupported selector term {term!r}")
        terms[key] = value
    return terms


def _gone_status(rv: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {rv} (compacted)", "reason": "Expired", "code": 410}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKubeAPI

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._cond:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path[len(PREFIX):].split("/") if url.path.startswith(PREFIX) else []
        if len(parts) != 2 or parts[1] != "endpointslices":
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "message": f"the server could not find {url.path}", "code": 404})
            return
        namespace = parts[0]
        try:
            selector = _parse_selector(query.get("labelSelector", ""))
        except ValueError as exc:
            self._json(400, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest",
                             "message": str(exc), "code": 400})
            return
        watching = query.get("watch", "").lower() in ("true", "1")
        self.fake.requests.append(("watch" if watching else "list", query))
        if watching:
            self._watch(namespace, selector, query)
        else:
            self._list(namespace, selector)

    def _list(self, namespace: str, selector: dict[str, str]) -> None:
        fake = self.fake
        with fake._cond:
            items = [o for o in fake._objects.values() if _selected(o, namespace, selector)]
            rv = str(fake._rv)
        self._json(200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                         "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, namespace: str, selector: dict[str, str], query: dict) -> None:
        fake = self.fake
        rv_text = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(query.get("timeoutSeconds", "1800"))
        with fake._cond:
            epoch, seq = fake._epoch, fake._seq
            if rv_text in ("", "0"):  # "start at the most recent": synthetic ADDED for what exists
                pending = [("ADDED", o) for o in fake._objects.values() if _selected(o, namespace, selector)]
                since = fake._rv
            else:
                since = int(rv_text)
                if since < fake._compacted:
                    if fake.stale == "status":
                        self._json(410, _gone_status(rv_text))
                        return
                    pending = [("ERROR", _gone_status(rv_text))]
                else:
                    pending = []
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        self.close_connection = True
        try:
            while True:
                with fake._cond:
                    while not pending:
                        if fake._epoch != epoch:
                            return  # the server "crashed": the stream breaks without its last chunk
                        for rv, kind, obj in fake._log:
                            if rv > since and _selected(obj, namespace, selector):
                                pending.append((kind, obj))
                        if fake._log:
                            since = max(since, fake._log[-1][0])
                        for s, kind, payload in fake._signals:
                            if s <= seq:
                                continue
                            seq = s
                            if kind == "gone":
                                pending.append(("ERROR", _gone_status(str(since))))
                            elif bookmarks:
                                mark = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                        "metadata": {"resourceVersion": payload["resourceVersion"]}}
                                pending.append(("BOOKMARK", mark))
                        if pending:
                            break
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._chunk(b"")
                            return
                        fake._cond.wait(min(left, 0.5))
                    if fake._epoch != epoch:
                        return
                for kind, obj in pending:
                    self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    if kind == "ERROR":  # the real server ends the watch after an error event
                        self._chunk(b"")
                        return
                pending = []
        except OSError:
            return

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
