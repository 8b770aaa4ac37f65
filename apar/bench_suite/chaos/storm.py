"""The storm of clients: gRPC and HTTP requests of every kind, retried on the next router as a client
behind a Service would, and the loop that runs them while the fault schedule fires."""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field

from apar.bench_suite.chaos.cluster import Cluster, _count, rss_kib


DOCUMENTED = ("ok", "cancelled", "disconnected", "deadline", "error_final", "unavailable", "exhausted")
SYSTEMS = [
    "You are the assistant of a river museum. Answer visitors briefly and kindly, in plain words, and name the "
    "river, its source, its mouth and the countries it crosses whenever you can.",
    "You are a patient cooking teacher. Give each step of a recipe on its own line, say how long it takes, and "
    "warn about what commonly goes wrong at that step.",
    "You are a careful travel planner. Suggest a day plan with times, places and how to move between them, and "
    "keep the budget the traveller gives in mind.",
]
WORDS = ("water city bread train light river garden music winter letter school market story paper".split())


@dataclass
class Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    retries: int = 0
    broken_mid_answer: int = 0  # calls broken after some output, answered again on another router
    undocumented: list[str] = field(default_factory=list)  # the first few, for the report
    done: int = 0

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.done += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        k = self.by_kind.setdefault(kind, {})
        k[outcome] = k.get(outcome, 0) + 1
        if outcome not in DOCUMENTED and len(self.undocumented) < 20:
            self.undocumented.append(f"{kind}: {outcome}: {detail}"[:300])


class Retry(Exception):
    """The call was refused or broken by a dead router or worker: try it on the next router."""

    def __init__(self, detail: str, started: bool = False) -> None:
        super().__init__(detail)
        self.started = started


REQUEST_KINDS = ("grpc_stream", "grpc_final", "grpc_cancel", "grpc_deadline", "grpc_n_stop", "http_chat_stream",
                 "http_completion", "http_disconnect", "http_n_stop")


class Storm:
    def __init__(self, cluster: Cluster, rng: random.Random, max_tokens: int) -> None:
        self.cluster, self.rng, self.max_tokens = cluster, rng, max_tokens
        self.tally = Tally()

    def prompt(self) -> tuple[str, str]:
        rng = self.rng
        return rng.choice(SYSTEMS), " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    async def open(self) -> None:
        import grpc
        import httpx

        from apar.protogen import stubs

        self.pb = stubs()
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{g}", options=opts)
                         for g, _ in self.cluster.router_ports]
        self.stubs = [self.pb.apar_pb2_grpc.AparStub(ch) for ch in self.channels]
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0),
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.urls = [f"http://127.0.0.1:{h}" for _, h in self.cluster.router_ports]

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.http.aclose()

    async def one(self) -> None:
        """One request, retried on the next router when refused or broken; its outcome tallied."""
        import asyncio

        rng = self.rng
        kind = rng.choice(REQUEST_KINDS)
        system, user = self.prompt()
        spec = {"kind": kind, "system": system, "user": user, "max_tokens": rng.randint(4, self.max_tokens),
                "n": rng.choice((2, 3)) if kind.endswith("n_stop") else 1,
                "stop": [rng.choice(("e", " the", ".", "ing"))] if kind.endswith("n_stop") else [],
                "after": rng.randint(1, 4), "timeout": rng.uniform(0.01, 0.5), "temperature": rng.choice((0.0, 0.8))}
        first = rng.randrange(len(self.stubs))
        detail = ""
        for attempt in range(12):
            router = (first + attempt) % len(self.stubs)
            try:
                if kind.startswith("grpc"):
                    outcome, detail = await self._grpc(router, spec)
                else:
                    outcome, detail = await self._http(router, spec)
                break
            except Retry as exc:
                detail = str(exc)
                self.tally.retries += 1
                self.tally.broken_mid_answer += exc.started
                await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt) * (0.5 + rng.random()))
        else:
            outcome = "unavailable"
        self.tally.add(kind, outcome, detail)

    async def _grpc(self, router: int, s: dict) -> tuple[str, str]:
        import grpc

        A, C = self.pb.apar_pb2, self.pb.common_pb2
        kind = s["kind"]
        mode = A.STREAM_MODE_FINAL if kind == "grpc_final" else A.STREAM_MODE_LINEAR
        req = A.GenerateRequest(stream=mode, stop=s["stop"], sampling=C.SamplingParameters(
            max_tokens=s["max_tokens"], temperature=s["temperature"], n=s["n"]))
        req.messages.add(role="system", content=s["system"])
        req.messages.add(role="user", content=s["user"])
        timeout = s["timeout"] if kind == "grpc_deadline" else 60.0
        call = self.stubs[router].Generate(req, timeout=timeout)
        got = 0
        finals = 0
        errors = []
        try:
            async for msg in call:
                got += 1
                if msg.WhichOneof("event") == "final":
                    finals += 1
                    if msg.final.error:
                        errors.append(msg.final.error)
                if kind == "grpc_cancel" and got >= s["after"]:
                    call.cancel()
                    return "cancelled", ""
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Retry(f"UNAVAILABLE {exc.details()}", got > 0) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "deadline", ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "exhausted", exc.details() or ""
            if code == grpc.StatusCode.CANCELLED and kind == "grpc_cancel":
                return "cancelled", ""
            return f"grpc_{code.name.lower()}", exc.details() or ""
        if finals != s["n"]:
            return "missing_final", f"{finals} finals of {s['n']}"
        return ("error_final", errors[0]) if errors else ("ok", "")

    async def _http(self, router: int, s: dict) -> tuple[str, str]:
        import httpx

        kind = s["kind"]
        chat = kind != "http_completion"
        body = {"model": "chaos", "max_tokens": s["max_tokens"], "temperature": s["temperature"], "n": s["n"]}
        if s["stop"]:
            body["stop"] = s["stop"]
        if chat:
            body["messages"] = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["user"]}]
        else:
            body["prompt"] = s["system"] + "\n" + s["user"]
        stream = kind in ("http_chat_stream", "http_disconnect") or (kind == "http_n_stop" and s["after"] % 2)
        body["stream"] = bool(stream)
        url = self.urls[router] + ("/v1/chat/completions" if chat else "/v1/completions")
        got = 0
        try:
            async with self.http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self._http_status(r.status_code, r.text)
                if not stream:
                    data = json.loads(await r.aread())
                    if len(data.get("choices", ())) != s["n"]:
                        return "missing_final", f"{len(data.get('choices', ()))} choices of {s['n']}"
                    return "ok", ""
                finished = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    got += 1
                    if kind == "http_disconnect" and got >= s["after"]:
                        return "disconnected", ""  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return ("ok", "") if finished == s["n"] else ("missing_final", f"{finished} of {s['n']}")
                    event = json.loads(line[6:])
                    if "error" in event:
                        if event["error"].get("type") == "service_unavailable":
                            raise Retry(f"stream error {event['error'].get('message')}", True)
                        return f"stream_{event['error'].get('type')}", event["error"].get("message", "")
                    finished += sum(1 for c in event.get("choices", ()) if c.get("finish_reason"))
                raise Retry("stream ended without [DONE]", True)
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}", got > 0) from None

    @staticmethod
    def _http_status(status: int, text: str) -> tuple[str, str]:
        if status == 503:
            raise Retry(f"503 {text[:200]}")
        return {429: "exhausted", 504: "deadline", 400: "invalid"}.get(status, f"http_{status}"), text[:200]



async def _storm(args, cluster: Cluster, storm: Storm, plan: list) -> list[dict]:
    import asyncio

    await storm.open()
    t0 = time.monotonic()
    tally = storm.tally
    total = args.requests  # None with --duration alone: as many as the duration takes
    duration = args.duration
    warm_after = max(20, total // 10) if duration is None else None
    started = 0
    kills: list[dict] = []
    crashes: list[str] = []
    series: list = []
    stop = asyncio.Event()

    def progress() -> float:
        if duration is not None:
            return min(1.0, (time.monotonic() - t0) / duration)
        return tally.done / max(total, 1)

    def more() -> bool:
        if len(kills) < len(plan) and not stop.is_set():
            return True  # the storm goes on until every planned kill is done
        if duration is not None:
            return time.monotonic() - t0 < duration and (total is None or started < total)
        return started < total

    def held() -> bool:
        """Requests beyond 5% of the run past the next planned kill wait for it to be done (a restart
        can take longer than the storm's rest would)."""
        if len(kills) >= len(plan) or stop.is_set():
            return False
        if duration is not None:
            return time.monotonic() - t0 > (plan[len(kills)][0] + 0.05) * duration
        return started >= (plan[len(kills)][0] + 0.05) * total

    async def client() -> None:
        nonlocal started
        while more():
            if held():
                await asyncio.sleep(0.05)
                continue
            started += 1
            await storm.one()

    async def chaos() -> None:
        for at, comp, action in plan:
            while progress() < at and not stop.is_set():
                await asyncio.sleep(0.05)
            if stop.is_set():
                return
            t, at_request = time.monotonic(), tally.done
            if action == "pause":  # frozen until the manager reaps it (at most --pause s)
                mark, expired = _count(comp, "registered again"), rf"worker {cluster.worker_id(comp)} expired"
                reaps = _count(cluster.kvmanager, expired)
                frozen_s, reaped = await asyncio.to_thread(
                    comp.pause, args.pause, lambda timeout: cluster.kvmanager.wait_line(expired, reaps, timeout))
                kills.append({"component": comp.name, "action": "pause", "at_request": at_request,
                              "down_s": frozen_s, "reaped": reaped, "registered_again": await asyncio.to_thread(
                                  comp.wait_line, "registered again", mark, args.worker_ttl + 20)})
                continue
            await asyncio.to_thread(comp.kill, tally.done)
            down = args.kv_down if comp.kind == "kvmanager" and args.kv_down is not None else args.down
            await asyncio.sleep(down)
            try:
                await asyncio.to_thread(comp.start, tally.done)
            except RuntimeError as exc:
                crashes.append(str(exc))
                stop.set()
                return
            kills.append({"component": comp.name, "at_request": at_request, "down_s": down,
                          "restart_s": round(time.monotonic() - t, 2)})

    async def monitor() -> None:
        last_print = last_sample = 0.0
        while not stop.is_set():
            now = time.monotonic()
            warm = warm_after if warm_after is not None else max(20, int(tally.done / max(progress(), 1e-3) / 10))
            for c in cluster.components:
                c.sample(tally.done, warm)
                c.check_crash()  # recorded in its life: the verdict names it
            if now - last_sample >= args.sample_every:
                last_sample = now
                series.append({"t": round(now - t0, 1), "done": tally.done,
                               **{c.name: rss_kib(c.life.pid) for c in cluster.components if c.alive()}})
            if not args.quiet and now - last_print >= (0.5 if sys.stderr.isatty() else 10.0):
                last_print = now
                _progress(progress(), tally, len(kills), len(plan), now - t0)
            await asyncio.sleep(0.25)

    mon = asyncio.create_task(monitor())
    killer = asyncio.create_task(chaos())
    try:
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        stop.set()
        await killer
    finally:
        stop.set()
        await mon
        await storm.close()
        if not args.quiet:
            _progress(1.0, tally, len(kills), len(plan), time.monotonic() - t0)
            print(file=sys.stderr)
    cluster.series = series
    if crashes:
        raise RuntimeError("; ".join(crashes))
    return kills


def _progress(frac: float, tally: Tally, kills: int, planned: int, elapsed: float) -> None:
    width = 30
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    bad = sum(v for k, v in tally.outcomes.items() if k not in DOCUMENTED)
    line = (f"[{bar}] {tally.done} requests, {tally.outcomes.get('ok', 0)} ok, {bad} undocumented, "
            f"{tally.retries} retries, kills {kills}/{planned}, {elapsed:.0f} s")
    print(("\r" if sys.stderr.isatty() else "") + line, end="" if sys.stderr.isatty() else "\n", file=sys.stderr,
          flush=True)
