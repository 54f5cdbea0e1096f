"""Fair, prioritised admission (issue 18), through a real daemon and fake engines that take
FAKE_TOKEN_DELAY per token: a saturated GPU model (OFFLOAD_QUEUE_THRESHOLD 3, no twin)
queues requests for up to its `queue_timeout` and admits them by priority, then by the
tenant with the least recent service (weighted), then in arrival order."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Daemon, engine_aget, fake_model, registry_doc

pytestmark = pytest.mark.anyio

TOKEN_DELAY = 0.02
ADMIN = "admin-key-0123456789"
KEYS: dict[str, dict[str, Any]] = {
    "a": {"key": "sk-tenant-a-000", "name": "team-a", "weight": 3},
    "b": {"key": "sk-tenant-b-000", "name": "team-b"},
    "h": {"key": "sk-tenant-h-000", "name": "ops", "priority": "high"},
    "n": {"key": "sk-tenant-n-000", "name": "batch"},
    "locked": {"key": "sk-tenant-l-000", "name": "locked", "priority_header": False},
}
SLOW = {"FAKE_TOKEN_DELAY": str(TOKEN_DELAY)}


def start(daemon_for: Any, tmp_path: Path, *models: dict[str, Any], **env: str) -> Daemon:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": list(KEYS.values())}))
    doc = registry_doc(*models)
    daemon: Daemon = daemon_for(doc, API_KEYS_FILE=str(keys), ADMIN_API_KEY=ADMIN, **env)
    return daemon.start()


def auth(who: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]['key']}", **headers}


ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


async def ask(c: httpx.AsyncClient, who: str, model: str, tokens: int, **headers: str) -> httpx.Response:
    body = {"model": model, "prompt": "x", "max_tokens": tokens}
    return await c.post("/v1/completions", json=body, headers=auth(who, **headers))


async def status_row(c: httpx.AsyncClient, model: str) -> dict[str, Any]:
    rows = (await c.get("/v1/status", headers=ADMIN_AUTH)).json()["models"]
    return next(r for r in rows if r["name"] == model)


async def until(predicate: Any, timeout: float) -> float:
    """Poll an async predicate until true; the seconds it took (fails at the deadline)."""
    t0 = time.monotonic()
    while not await predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def queued(c: httpx.AsyncClient, model: str, n: int, priority: str = "normal") -> None:
    async def check() -> bool:
        return bool((await status_row(c, model))["admission_queue"][priority] == n)

    await until(check, 10)


async def metric(c: httpx.AsyncClient, prefix: str) -> float:
    text = (await c.get("/metrics", headers=ADMIN_AUTH)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


class Flood:
    """`workers` requests of one tenant kept in flight; completions counted by end time."""

    def __init__(self, c: httpx.AsyncClient, who: str, model: str, workers: int, tokens: int = 10) -> None:
        self.c, self.who, self.model, self.tokens = c, who, model, tokens
        self.done: list[float] = []  # monotonic end time of each 200
        self.refused = 0
        self._stop = False
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(workers)]

    async def _worker(self) -> None:
        while not self._stop:
            resp = await ask(self.c, self.who, self.model, self.tokens)
            if resp.status_code == 200:
                self.done.append(time.monotonic())
            else:
                assert resp.status_code == 429, resp.text
                self.refused += 1
                await asyncio.sleep(0.05)

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.done if t0 <= t <= t1)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


async def test_a_flood_does_not_starve_a_tenant_sending_one_at_a_time(
    daemon_for: Any, tmp_path: Path
) -> None:
    daemon = start(
        daemon_for, tmp_path,
        fake_model("queued", env=SLOW, queue_timeout=30), fake_model("plain", env=SLOW),
    )  # fmt: skip
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60, limits=limits) as c:
        solo = []
        for _ in range(5):  # the time to serve one request, alone
            t0 = time.monotonic()
            assert (await ask(c, "b", "queued", 10)).status_code == 200
            solo.append(time.monotonic() - t0)
        serve = statistics.median(solo[1:])

        flood = Flood(c, "a", "queued", 48)
        await queued(c, "queued", 45)
        waits, t_first = [], time.monotonic()
        for _ in range(20):
            t0 = time.monotonic()
            resp = await ask(c, "b", "queued", 10)
            assert resp.status_code == 200, resp.text
            waits.append(time.monotonic() - t0 - serve)
        t_last = time.monotonic()
        a_served = flood.between(t_first, t_last)
        await flood.stop()
        p99 = sorted(waits)[-1]  # 20 samples: the 99th percentile is the largest
        print(f"serve {serve * 1000:.0f} ms; B's wait p50 {statistics.median(waits) * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms; A served {a_served} while B was served 20")  # fmt: skip
        # A's requests run in step (admitted together, done together), so slots free in threes
        # once per service time and B, arriving just after, waits for the next: about one
        # service time is the bound; the 20 % is for the scheduling of 50 clients on 2 cores.
        assert p99 <= 1.2 * serve, f"B waited {p99:.3f}s at p99; one request's service is {serve:.3f}s"
        assert a_served >= 20, "A still gets (at least) every other slot"

        # Contrast: the same flood on a model without a queue: B is refused.
        flood = Flood(c, "a", "plain", 48)
        await until(lambda: _full(c, "plain"), 10)
        codes = [(await ask(c, "b", "plain", 10)).status_code for _ in range(10)]
        await flood.stop()
        print(f"without the queue: B got {codes.count(429)} 429s in 10")
        assert codes.count(429) >= 8


async def _full(c: httpx.AsyncClient, model: str) -> bool:
    row = await status_row(c, model)
    return bool(row["in_flight"] == 3 and row["state"] == "ready")


async def test_weights_share_a_saturated_model(daemon_for: Any, tmp_path: Path) -> None:
    daemon = start(daemon_for, tmp_path, fake_model("m", env=SLOW, queue_timeout=30))
    async with httpx.AsyncClient(
        base_url=daemon.url, timeout=60, limits=httpx.Limits(max_connections=64)
    ) as c:
        a, b = Flood(c, "a", "m", 12), Flood(c, "b", "m", 12)
        await queued(c, "m", 21)
        t0 = time.monotonic()
        await asyncio.sleep(30)  # the measurement window: both keep the queue full throughout
        t1 = time.monotonic()
        await asyncio.gather(a.stop(), b.stop())
        served_a, served_b = a.between(t0, t1), b.between(t0, t1)
        share = served_a / (served_a + served_b)
        print(f"weights 3:1 -> served {served_a}:{served_b}, A's share {share:.3f}")
        assert a.refused == b.refused == 0
        assert 0.675 <= share <= 0.825, f"A's share {share:.3f}, not within 10% of 0.75"


async def _staggered_fill(c: httpx.AsyncClient, model: str) -> list[asyncio.Task[httpx.Response]]:
    """Three requests in flight that end one slot-time apart (10, 20, 30 tokens)."""
    fill = [asyncio.create_task(ask(c, "n", model, 10 * (i + 1))) for i in range(3)]
    await until(lambda: _full(c, model), 10)
    return fill


async def _finish_order(tasks: dict[str, asyncio.Task[httpx.Response]]) -> list[str]:
    ends: dict[str, float] = {}

    async def watch(name: str, task: asyncio.Task[httpx.Response]) -> None:
        resp = await task
        assert resp.status_code == 200, resp.text
        ends[name] = time.monotonic()

    await asyncio.gather(*(watch(n, t) for n, t in tasks.items()))
    return sorted(ends, key=ends.__getitem__)


async def test_priorities_high_keys_first_and_the_header_only_lowers(daemon_for: Any, tmp_path: Path) -> None:
    daemon = start(daemon_for, tmp_path, fake_model("m", env=SLOW, queue_timeout=30))
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
        # A `high` key's request goes before normal ones that were waiting first.
        fill = await _staggered_fill(c, "m")
        tasks = {}
        for i in range(3):
            tasks[f"normal{i}"] = asyncio.create_task(ask(c, "n", "m", 10))
            await queued(c, "m", i + 1)
        tasks["high"] = asyncio.create_task(ask(c, "h", "m", 10))
        await queued(c, "m", 1, "high")
        assert (await _finish_order(tasks))[0] == "high"
        await asyncio.gather(*fill)

        # From a normal key, X-Priority: low is honoured and X-Priority: high is not: one
        # tenant, so what is left is the class, then arrival order.
        fill = await _staggered_fill(c, "m")
        tasks = {"low": asyncio.create_task(ask(c, "n", "m", 10, **{"x-priority": "low"}))}
        await queued(c, "m", 1, "low")
        tasks["normal"] = asyncio.create_task(ask(c, "n", "m", 10))
        await queued(c, "m", 1)
        tasks["asked-high"] = asyncio.create_task(ask(c, "n", "m", 10, **{"x-priority": "HIGH"}))
        await queued(c, "m", 2)
        assert (await status_row(c, "m"))["admission_queue"] == {"high": 0, "normal": 2, "low": 1}
        assert await _finish_order(tasks) == ["normal", "asked-high", "low"]
        await asyncio.gather(*fill)
        low = await metric(c, 'unified_inference_admissions_total{key="batch",model="m",priority="low"}')
        assert low == 1

        # A key with `priority_header: false` ignores the header; a bad value is a 400.
        resp = await ask(c, "locked", "m", 1, **{"x-priority": "bogus"})
        assert resp.status_code == 200
        resp = await ask(c, "n", "m", 1, **{"x-priority": "urgent"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_HEADER"
        assert "X-Priority" in resp.json()["error"]["message"]


async def test_a_queued_client_that_leaves_is_gone_and_a_long_wait_gets_429(
    daemon_for: Any, tmp_path: Path
) -> None:
    daemon = start(
        daemon_for, tmp_path,
        fake_model("m", env=SLOW, queue_timeout=30), fake_model("short", env=SLOW, queue_timeout=1),
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
        fill = [asyncio.create_task(ask(c, "a", "m", 150)) for _ in range(3)]  # 3 s each
        await until(lambda: _full(c, "m"), 10)
        row = await status_row(c, "m")

        async def engine_has_all_three() -> bool:  # the daemon counts a lease before it forwards
            stats = (await engine_aget(row, "/fake/stats")).json()
            return bool(stats["in_flight"] == 3)

        await until(engine_has_all_three, 10)
        engine_requests = (await engine_aget(row, "/fake/stats")).json()
        leaver = asyncio.create_task(ask(c, "b", "m", 10))
        await queued(c, "m", 1)
        leaver.cancel()  # the client closes its connection
        t0 = time.monotonic()
        await until(lambda: _queue_empty(c, "m"), 5)
        gone = time.monotonic() - t0
        print(f"a queued client that left was out of the queue in {gone * 1000:.0f} ms")
        assert gone <= 0.2
        assert await metric(c, 'unified_inference_admission_queue_exits_total{model="m",outcome="left"') == 1
        assert await metric(c, 'unified_inference_admission_queue_requests{model="m"') == 0
        assert (await status_row(c, "m"))["in_flight"] == 3
        stats = (await engine_aget(await status_row(c, "m"), "/fake/stats")).json()
        assert stats["requests"] == engine_requests["requests"], "the engine never saw it"

        # Past its queue_timeout a request gets 429 with Retry-After, and nothing hangs.
        short_fill = [asyncio.create_task(ask(c, "a", "short", 150)) for _ in range(3)]
        await until(lambda: _full(c, "short"), 10)
        t0 = time.monotonic()
        resp = await ask(c, "b", "short", 10)
        waited = time.monotonic() - t0
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "GPU_OVERLOADED"
        assert int(resp.headers["retry-after"]) >= 1
        assert 1.0 <= waited < 2.0, waited
        exits = 'unified_inference_admission_queue_exits_total{model="short",outcome="timeout"'
        assert await metric(c, exits) == 1
        for resp in await asyncio.gather(*fill, *short_fill):
            assert resp.status_code == 200
    assert "CLIENT_DISCONNECTED" in daemon.log()


async def _queue_empty(c: httpx.AsyncClient, model: str) -> bool:
    return bool(sum((await status_row(c, model))["admission_queue"].values()) == 0)


async def test_replicas_at_max_queue_a_twin_still_spills_and_a_removed_model_frees_its_queue(
    daemon_for: Any, tmp_path: Path
) -> None:
    models = [
        fake_model("r", env=SLOW, replicas={"min": 1, "max": 2}, queue_timeout=30),
        fake_model("t", env=SLOW, cpu_offload_model="cpu", queue_timeout=30),
        fake_model("cpu", backend="llamacpp"),
    ]
    daemon = start(daemon_for, tmp_path, *models)
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
        # Two replicas of 3 slots: 10 at once means a scale-up, then 4 wait their turn.
        answers = await asyncio.gather(*(ask(c, "a", "r", 10) for _ in range(10)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert {r.headers["x-served-replica"] for r in answers} == {"0", "1"}
        admitted = 'unified_inference_admission_queue_exits_total{model="r",outcome="admitted"'
        assert await metric(c, admitted) >= 1

        # A model with a CPU twin spills to it, as before: its queue is not used.
        answers = await asyncio.gather(*(ask(c, "a", "t", 10) for _ in range(6)))
        assert all(r.status_code == 200 for r in answers)
        assert {r.headers["x-served-model"] for r in answers} == {"t", "cpu"}
        assert await metric(c, 'unified_inference_admission_queue_exits_total{model="t"') == 0

        # Removed by a reload while requests wait: they are answered at once, not left to time out.
        fill = [asyncio.create_task(ask(c, "a", "r", 150)) for _ in range(6)]
        await until(lambda: _all_busy(c, "r"), 10)
        waiting = [asyncio.create_task(ask(c, "b", "r", 10)) for _ in range(2)]
        await queued(c, "r", 2)
        daemon.config.write_text(yaml.safe_dump(registry_doc(*models[1:])))
        (await c.post("/v1/admin/reload", headers=ADMIN_AUTH)).raise_for_status()
        for resp in await asyncio.gather(*waiting):
            assert resp.status_code == 503 and "removed" in resp.json()["error"]["message"]
        for resp in await asyncio.gather(*fill):
            assert resp.status_code == 200  # requests in flight on a removed model finish


async def _all_busy(c: httpx.AsyncClient, model: str) -> bool:
    row = await status_row(c, model)
    return bool(row["in_flight"] == 6 and all(r["state"] == "ready" for r in row["replicas"]))


async def test_a_client_waiting_for_a_replica_to_start_that_leaves_is_gone_at_once(
    daemon_for: Any, tmp_path: Path
) -> None:
    """Not the admission queue: every replica is busy and a new one is starting (3 s); a
    request waiting for it whose client disconnects stops waiting at once, and is logged 499."""
    slow_start = {**SLOW, "FAKE_START_DELAY": "3"}
    daemon = start(daemon_for, tmp_path, fake_model("r", env=slow_start, replicas={"min": 1, "max": 2}))
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:

        async def first_ready() -> bool:
            return bool((await status_row(c, "r"))["replicas"][0]["state"] == "ready")

        await until(first_ready, 30)
        fill = [asyncio.create_task(ask(c, "a", "r", 200)) for _ in range(3)]  # 4 s each, on replica 0

        async def waiting(n: int) -> bool:  # for a replica to free or start (not in its start)
            row = await status_row(c, "r")
            for_a_replica = row["queued"] - sum(r["queued"] for r in row["replicas"])
            return bool(row["in_flight"] == 3 and for_a_replica == n)

        await until(lambda: waiting(0), 10)
        leaver = asyncio.create_task(ask(c, "b", "r", 10))
        await until(lambda: waiting(1), 10)  # it started replica 1 and waits for it
        leaver.cancel()
        gone = await until(lambda: waiting(0), 5)
        print(f"a client waiting for a replica that left stopped waiting in {gone * 1000:.0f} ms")
        assert gone <= 0.2
        for resp in await asyncio.gather(*fill):
            assert resp.status_code == 200
    assert "CLIENT_DISCONNECTED" in daemon.log()
