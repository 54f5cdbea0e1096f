"""Replicas through a real daemon and real fake-engine processes: balancing, affinity, scaling.

Which replica served a request is read from the daemon's `x-served-replica` header and
checked against each engine's own count (`/fake/stats`), so a daemon that reported one
replica and used another would fail here.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.fake_gpu import Ledger
from tests.helpers import Daemon, engine_get, fake_model, registry_doc, wait_until

QUICK = {"FAKE_TOKEN_DELAY": "0.002"}  # a request takes a few milliseconds
SLOW = {"FAKE_TOKEN_DELAY": "0.03"}


def replica_rows(c: httpx.Client, model: str) -> list[dict[str, Any]]:
    rows = {m["name"]: m for m in c.get("/v1/status").json()["models"]}
    replicas: list[dict[str, Any]] = rows[model]["replicas"]
    return replicas


def ready_count(c: httpx.Client, model: str) -> int:
    return sum(1 for r in replica_rows(c, model) if r["state"] == "ready")


def engine_requests(c: httpx.Client, model: str) -> list[int]:
    return [
        engine_get(r, "/fake/stats", timeout=5).json()["requests"]
        for r in replica_rows(c, model)
    ]


def counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def complete(
    c: httpx.Client, model: str, prompt: str = "hi", tokens: int = 2, **headers: str
) -> httpx.Response:
    return c.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens}, headers=headers
    )


class Sampler:
    """Reads each replica's in-flight count from /v1/status until stopped."""

    def __init__(self, daemon: Daemon, model: str) -> None:
        self.daemon, self.model = daemon, model
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with self.daemon.client() as c:
            while not self._stop.is_set():
                self.samples.append([r["in_flight"] for r in replica_rows(c, self.model)])


def test_least_loaded_spreads_concurrent_requests_and_round_robin_takes_turns(
    daemon_for: Any, tmp_path: Path
) -> None:
    doc = registry_doc(
        fake_model("ll", replicas=3, env=QUICK),
        fake_model("rr", replicas=3, routing="round_robin", env=QUICK),
    )
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="1000").start()
    with daemon.client() as c:
        wait_until(
            lambda: ready_count(c, "ll") == 3 and ready_count(c, "rr") == 3, 60
        )  # replicas: 3 keeps 3 up

        def one(i: int) -> int:
            with daemon.client() as own:
                resp = complete(own, "ll", tokens=8)
                assert resp.status_code == 200, resp.text
                return int(resp.headers["x-served-replica"])

        with Sampler(daemon, "ll") as sampler, ThreadPoolExecutor(24) as pool:
            served = list(pool.map(one, range(300)))
        totals = [sum(s[i] for s in sampler.samples) for i in range(3)]
        assert sum(totals) > 0, "the sampler saw requests in flight"
        assert max(totals) / (sum(totals) / 3) <= 1.25, totals
        assert engine_requests(c, "ll") == [served.count(i) for i in range(3)]

        for _ in range(300):
            assert complete(c, "rr").status_code == 200
        assert engine_requests(c, "rr") == [100, 100, 100]
        metrics = c.get("/metrics").text
    assert counter(metrics, "unified_inference_routing_decisions_total", model="rr", policy="round_robin",
                   reason="round_robin") == 300  # fmt: skip


def test_prefix_affinity_keeps_conversations_on_one_replica_and_bounds_a_hot_key(
    daemon_for: Any, tmp_path: Path
) -> None:
    # A long health interval: a replica killed below stays down (nothing brings it back to 3).
    doc = registry_doc(fake_model("pa", replicas=3, routing="prefix_affinity", env=SLOW))
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="1000", HEALTH_CHECK_INTERVAL="600").start()
    rng = random.Random(7)
    with daemon.client() as c:
        wait_until(lambda: ready_count(c, "pa") == 3, 60)

        def turn(conversation: int, k: int) -> int:
            messages = [{"role": "system", "content": f"You are assistant number {conversation}."},
                        {"role": "user", "content": f"Question from user {conversation}"}]  # fmt: skip
            for j in range(k):
                messages += [{"role": "assistant", "content": f"answer {j}"},
                             {"role": "user", "content": f"follow-up {j}"}]  # fmt: skip
            body = {"model": "pa", "messages": messages, "max_tokens": 1}
            resp = c.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return int(resp.headers["x-served-replica"])

        turns = [(conv, k) for conv in range(30) for k in range(4)]
        rng.shuffle(turns)
        homes: dict[int, set[int]] = {}
        for conv, k in turns:  # one at a time: every replica is under the bound
            homes.setdefault(conv, set()).add(turn(conv, k))
        assert all(len(h) == 1 for h in homes.values()), homes
        home = {conv: next(iter(h)) for conv, h in homes.items()}
        assert set(home.values()) == {0, 1, 2}, "the keys spread over the ring"

        sessions = {f"s{i}": {complete(c, "pa", prompt=f"p{i}-{j}", tokens=1, **{"X-Session-ID": f"s{i}"})
                              .headers["x-served-replica"] for j in range(5)} for i in range(10)}  # fmt: skip
        assert all(len(s) == 1 for s in sessions.values()), sessions

        def hot(i: int) -> int:
            with daemon.client() as own:
                resp = complete(own, "pa", prompt=f"hot {i}", tokens=40, **{"X-Session-ID": "hot"})
                assert resp.status_code == 200, resp.text
                return int(resp.headers["x-served-replica"])

        with Sampler(daemon, "pa") as sampler, ThreadPoolExecutor(60) as pool:
            spread = list(pool.map(hot, range(60)))
        # Each decision keeps its replica within 1.25 x the mean (+1) of the load it saw; with
        # all 60 in flight at most 1.25 * 60 / 3 + 1 = 26 on any replica, whenever sampled.
        peak = max(sum(s) for s in sampler.samples)
        assert peak >= 45, "the sampler saw the hot key's requests in flight together"
        assert max(max(s) for s in sampler.samples) <= 1.25 * 60 / 3 + 1, sampler.samples
        for s in sampler.samples:
            if sum(s) == peak:
                assert max(s) <= 1.25 * peak / 3 + 1, s
        assert len(set(spread)) > 1, "a hot key spills past its replica"

        # A replica leaves the ring (its process dies): only the keys it held move.
        gone = home[0]
        victim = next(r for r in replica_rows(c, "pa") if r["replica"] == gone)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(
            lambda: next(r for r in replica_rows(c, "pa") if r["replica"] == gone)["state"] == "failed", 30
        )
        moved = {conv: turn(conv, 4) for conv in range(30)}
    for conv in range(30):
        if home[conv] == gone:
            assert moved[conv] != gone
        else:
            assert moved[conv] == home[conv], (conv, home[conv], moved[conv])


def test_a_scaled_model_grows_under_load_spills_at_max_and_shrinks_back(
    daemon_for: Any, tmp_path: Path
) -> None:
    doc = registry_doc(
        fake_model("grow", replicas={"min": 1, "max": 3}, idle_timeout=2, env=SLOW, cpu_offload_model="cpu"),
        fake_model("cpu", backend="llamacpp", execution_mode="cpu", env=QUICK),
        fake_model("solo", replicas={"min": 0, "max": 2}, idle_timeout=2, env=SLOW),
    )
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="2").start()
    with daemon.client() as c:
        wait_until(lambda: ready_count(c, "grow") == 1, 30)  # min: 1 is kept warm from the start
        assert [r["state"] for r in replica_rows(c, "solo")] == ["stopped", "stopped"]  # min: 0 waits

        stop = threading.Event()
        answers: list[tuple[int, str]] = []

        def client(i: int) -> None:
            with daemon.client() as own:
                while not stop.is_set():
                    resp = complete(own, "grow", prompt=f"load {i}", tokens=10)
                    answers.append((resp.status_code, resp.headers.get("x-served-model", "")))

        with ThreadPoolExecutor(5) as pool:  # 5 in flight, 2 per replica: it needs 3
            for i in range(5):
                pool.submit(client, i)
            wait_until(lambda: ready_count(c, "grow") == 3, 60)
            wait_until(lambda: len(answers) >= 60, 60)
            stop.set()
        metrics = c.get("/metrics").text
        assert [counter(metrics, "unified_inference_engine_starts_total", model="grow", backend="sglang",
                        replica=str(i)) for i in range(3)] == [1, 1, 1]  # fmt: skip
        assert all(code == 200 and model == "grow" for code, model in answers), set(answers)
        scale_ups = counter(
            metrics,
            "unified_inference_routing_decisions_total",
            model="grow",
            policy="least_loaded",
            reason="scale_up",
        )
        assert scale_ups >= 2

        # At max: 8 at once against 3 x 2 — the overflow goes to the CPU twin.
        def burst(model: str) -> list[httpx.Response]:
            def one(i: int) -> httpx.Response:
                with daemon.client() as own:
                    return complete(own, model, prompt=f"burst {i}", tokens=30)

            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(one, range(8)))

        answered = burst("grow")
        assert all(r.status_code == 200 for r in answered)
        assert sum(r.headers["x-served-model"] == "cpu" for r in answered) >= 2

        # Without a twin, a model at max answers 429 GPU_OVERLOADED for the overflow.
        c.post("/v1/admin/models/solo/start", params={"replicas": 2}).raise_for_status()
        refused = [r for r in burst("solo") if r.status_code == 429]
        assert len(refused) >= 4 and all(r.json()["error"]["code"] == "GPU_OVERLOADED" for r in refused)

        # Idle for its idle_timeout, it shrinks back to min, never below.
        wait_until(lambda: [r["state"] for r in replica_rows(c, "grow")].count("stopped") == 2, 30)
        assert ready_count(c, "grow") == 1
        wait_until(lambda: [r["state"] for r in replica_rows(c, "solo")] == ["stopped", "stopped"], 30)
        kept = next(r for r in replica_rows(c, "grow") if r["state"] == "ready")["replica"]
        # Across more than another idle_timeout, the one left stays up: min is a floor.
        holds_for(lambda: [r["state"] for r in replica_rows(c, "grow")][kept] == "ready", 3.0)
        assert ready_count(c, "grow") == 1

        too_many = c.post("/v1/admin/models/grow/start", params={"replicas": 4})
        assert too_many.status_code == 400 and "at most 3 replica" in too_many.json()["error"]["message"]
        stopped = c.post("/v1/admin/models/grow/stop").json()  # every replica, min included
        assert [r["state"] for r in stopped["replicas"]] == ["stopped"] * 3 and stopped["state"] == "stopped"


def holds_for(predicate: Any, seconds: float) -> None:
    """Assert `predicate` stays true at every poll for `seconds` (a property over time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate()
        time.sleep(0.1)


def test_two_gpu_replicas_from_a_pool_of_two_get_different_gpus(daemon_for: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    doc = registry_doc(fake_model("pool", replicas=2, gpu_id=[0, 1], gpu_memory=0.5))
    # Copies: registry_doc's engines are the shared FAKE_ENGINES (changing them would leak the
    # ledger into every later test of the session).
    env = {"FAKE_GPU_LEDGER": str(ledger)}
    doc["engines"] = {b: {**cmd, "env": env} for b, cmd in doc["engines"].items()}
    doc["gpus"] = [{"id": 0, "memory_gb": 80}, {"id": 1, "memory_gb": 80}]
    daemon: Daemon = daemon_for(doc).start()
    with daemon.client() as c:
        wait_until(lambda: ready_count(c, "pool") == 2, 60)
        rows = replica_rows(c, "pool")
        assert sorted(tuple(r["gpu_ids"]) for r in rows) == [(0,), (1,)]
        assert all(r["failures"] == 0 and r["last_error"] is None for r in rows)
        shares = Ledger(ledger).read()
        assert {g: sorted(v.values()) for g, v in shares.items()} == {"0": [0.5], "1": [0.5]}
        pids = {str(r["pid"]) for r in rows}
        assert {pid for v in shares.values() for pid in v} == pids
        status = c.get("/v1/status").json()
        assert [g["models"] for g in status["gpus"]] == [["pool"], ["pool#1"]] or \
            [g["models"] for g in status["gpus"]] == [["pool#1"], ["pool"]]  # fmt: skip
