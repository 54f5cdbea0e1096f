"""Several GPU models on one box, through a real daemon and fake engines that keep a GPU ledger.

Each fake SGLang/vLLM engine reserves its memory share in a ledger file shared
by all of them and dies with an out-of-memory error when a card cannot hold it
(tests/fake_gpu.py), so a daemon that places wrongly fails here the way it
would on a real GPU.
"""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_gpu import Ledger
from tests.helpers import FAKE_ENGINES, Daemon, engine_up, fake_model, pid_alive, wait_until

pytestmark = pytest.mark.anyio

SLOW = {"FAKE_TOKEN_DELAY": "0.05", "FAKE_TOKENS": "2000"}


def gpu_doc(tmp_path: Path, *models: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
    """A registry of fake engines sharing one ledger, with `gpus` declared 80 GB cards."""
    engines = {
        b: {**cmd, "env": {"FAKE_GPU_LEDGER": str(tmp_path / "ledger.json")}}
        for b, cmd in FAKE_ENGINES.items()
    }
    return {
        "models": list(models),
        "engines": engines,
        "gpus": [{"id": i, "memory_gb": 80} for i in range(gpus)],
    }


def ledger(tmp_path: Path) -> dict[str, dict[str, float]]:
    return Ledger(tmp_path / "ledger.json").read()


def rows(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("/v1/status").json()["models"]}


def loaded(c: httpx.Client) -> set[str]:
    return {name for name, row in rows(c).items() if row["state"] in ("ready", "starting", "waking")}


def ask(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})


def ask_once(daemon: Daemon, model: str) -> httpx.Response:
    with daemon.client() as c:
        return ask(c, model)


def counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus-client orders them
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_three_models_share_a_card_and_the_least_recently_used_idle_one_makes_room(
    daemon_for: Any, tmp_path: Path
) -> None:
    models = [
        fake_model(n, backend=b, gpu_id=0, gpu_memory=0.45)
        for n, b in (("a", "sglang"), ("b", "vllm"), ("c", "sglang"))
    ]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models)).start()
    order = ["a", "b", "c", "a", "c", "b"]
    order += random.Random(13).choices(["a", "b", "c"], k=40)
    expected = 0
    recent: list[str] = []  # the two engines that should be loaded, least recently used first
    with daemon.client() as c:
        for model in order:
            resp = ask(c, model)
            assert resp.status_code == 200, resp.text
            if model in recent:
                recent.remove(model)
            elif len(recent) == 2:
                recent.pop(0)  # the least recently used is the one evicted
                expected += 1
            recent.append(model)
            assert loaded(c) == set(recent), (model, rows(c))
            shares = ledger(tmp_path)["0"]
            assert len(shares) == len(recent) and sum(shares.values()) <= 1.0 + 1e-9
        metrics = c.get("/metrics").text
        status = c.get("/v1/status").json()
    for name, backend in (("a", "sglang"), ("b", "vllm"), ("c", "sglang")):
        assert (
            counter(
                metrics,
                "unified_inference_engine_start_failures_total",
                model=name,
                backend=backend,
                replica="0",
            )
            == 0
        )
    assert not any("out of" in (r["last_error"] or "") for r in status["models"])
    evictions = sum(
        counter(metrics, "unified_inference_engine_evictions_total", model=m, action="stop", replica="0")
        for m in "abc"
    )
    starts = sum(r["starts"] for r in status["models"])
    assert evictions == expected == starts - 2 and expected >= 10
    gpu = status["gpus"][0]
    assert gpu["id"] == 0 and gpu["memory_total_bytes"] == 80 << 30
    assert gpu["share_reserved"] == pytest.approx(0.9) and sorted(gpu["models"]) == sorted(recent)


async def _hold(c: httpx.AsyncClient, stack: AsyncExitStack, model: str) -> None:
    """A stream on `model` that stays in flight until its stack closes."""
    body = {"model": model, "prompt": "x", "stream": True}
    resp = await stack.enter_async_context(c.stream("POST", "/v1/completions", json=body))
    assert resp.status_code == 200 and resp.headers["x-served-model"] == model


def busy_doc(tmp_path: Path) -> dict[str, Any]:
    return gpu_doc(
        tmp_path,
        fake_model("a", gpu_id=0, gpu_memory=0.5, env=SLOW),
        fake_model("b", backend="vllm", gpu_id=0, gpu_memory=0.5, env=SLOW),
        fake_model("c", gpu_id=0, gpu_memory=0.5),
        fake_model("d", gpu_id=0, gpu_memory=0.5, cpu_offload_model="twin"),
        fake_model("twin", backend="llamacpp"),
    )


async def test_busy_models_are_never_evicted_and_a_third_waits_for_one_to_finish(
    daemon_for: Any, tmp_path: Path
) -> None:
    daemon: Daemon = daemon_for(busy_doc(tmp_path)).start()
    async with (
        httpx.AsyncClient(base_url=daemon.url, timeout=60) as c,
        AsyncExitStack() as a_stream,
        AsyncExitStack() as b_stream,
    ):
        await _hold(c, a_stream, "a")
        await _hold(c, b_stream, "b")
        third = asyncio.ensure_future(
            c.post("/v1/completions", json={"model": "c", "prompt": "y", "max_tokens": 2})
        )

        # It waits for room: queued on c, while a and b keep serving.
        async def waiting() -> bool:
            status = (await c.get("/v1/status")).json()["models"]
            return bool({m["name"]: m["in_flight"] for m in status}["c"] == 1)

        for _ in range(400):  # a poll with a deadline (20 s)
            if await waiting():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the request for c never waited")
        await asyncio.sleep(0.5)
        assert not third.done()
        assert {m["name"]: m["state"] for m in (await c.get("/v1/status")).json()["models"]}["a"] == "ready"

        # With a CPU twin, a request that finds no room is served by the twin at once.
        resp = await c.post("/v1/completions", json={"model": "d", "prompt": "z", "max_tokens": 2})
        assert resp.status_code == 200 and resp.headers["x-served-model"] == "twin"

        await a_stream.aclose()  # a finishes: it becomes idle, is evicted, c starts
        resp = await asyncio.wait_for(third, 30)
        assert resp.status_code == 200 and resp.headers["x-served-model"] == "c"
        status = {m["name"]: m for m in (await c.get("/v1/status")).json()["models"]}
        assert status["a"]["state"] == "stopped" and status["b"]["state"] == "ready"
        assert status["b"]["in_flight"] == 1, "the busy model kept its stream"


async def test_past_the_wait_a_request_gets_429_naming_the_busy_holders(
    daemon_for: Any, tmp_path: Path
) -> None:
    daemon: Daemon = daemon_for(busy_doc(tmp_path), STARTUP_TIMEOUT="3").start()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c, AsyncExitStack() as stack:
        await _hold(c, stack, "a")
        await _hold(c, stack, "b")
        resp = await c.post("/v1/completions", json={"model": "c", "prompt": "y", "max_tokens": 2})
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        error = resp.json()["error"]
        assert error["code"] == "GPU_OVERLOADED" and error["holders"] == ["a", "b"]
        assert "'a'" in error["message"] and "'b'" in error["message"] and "GPU 0" in error["message"]
        status = {m["name"]: m for m in (await c.get("/v1/status")).json()["models"]}
        assert status["c"]["state"] == "stopped" and status["c"]["failures"] == 0, (
            "no back-off for a full card"
        )
        warm = await c.post("/v1/admin/models/c/start")  # an operator's start is refused the same way
        assert warm.status_code == 429 and warm.json()["error"]["holders"] == ["a", "b"]


def test_an_idle_engine_sleeps_keeps_its_process_and_wakes_once(daemon_for: Any, tmp_path: Path) -> None:
    wake = {"FAKE_WAKE_DELAY": "0.3"}
    models = [
        fake_model(
            "s", backend="sglang", gpu_id=0, gpu_memory=0.5, on_idle="sleep", idle_timeout=0.5, env=wake
        ),
        fake_model(
            "v",
            backend="vllm",
            gpu_id=0,
            gpu_memory=0.5,
            on_idle="sleep",
            idle_timeout=0.5,
            sleep_timeout=3,
            env=wake,
        ),
    ]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models), OFFLOAD_QUEUE_THRESHOLD="100").start()
    with daemon.client() as c:
        for name in ("s", "v"):
            assert ask(c, name).status_code == 200
        pids = {n: r["pid"] for n, r in rows(c).items()}
        # Asleep once the engine said so: the state turns `sleeping` as the sleep call begins,
        # `sleeps` counts it once the engine has answered (its memory released).
        wait_until(lambda: all(r["state"] == "sleeping" and r["sleeps"] == 1 for r in rows(c).values()), 15)
        assert all(pid_alive(pid) for pid in pids.values())
        assert ledger(tmp_path).get("0", {}) == {}, "a sleeping engine holds no GPU memory"
        assert c.get("/v1/status").json()["gpus"][0]["share_reserved"] == 0

        with ThreadPoolExecutor(6) as pool:  # six requests at once for the sleeping engine: one wake
            replies = list(pool.map(lambda _: ask_once(daemon, "v"), range(6)))
        assert [r.status_code for r in replies] == [200] * 6
        row = rows(c)["v"]
        assert row["pid"] == pids["v"] and row["starts"] == 1 and row["wakes"] == 1
        assert list(ledger(tmp_path)["0"].values()) == [0.5]
        metrics = c.get("/metrics").text
        assert counter(metrics, "unified_inference_engine_wakes_total", model="v", replica="0") == 1
        assert counter(metrics, "unified_inference_engine_wake_seconds_count", model="v") == 1
        assert (
            'unified_inference_engine_state{backend="sglang",model="s",replica="0",state="sleeping"} 1.0'
            in metrics
        )

        # Back to sleep, then past its sleep_timeout the process stops too.
        wait_until(lambda: rows(c)["v"]["state"] == "sleeping", 15)
        wait_until(lambda: rows(c)["v"]["state"] == "stopped", 15)
        assert not pid_alive(pids["v"])
        # The engines' own sleep and wake routes are not reachable through the daemon.
        for path in ("/sleep", "/wake_up", "/release_memory_occupation", "/resume_memory_occupation"):
            assert c.post(path, json={}).status_code == 404


def test_a_wake_that_fails_falls_back_to_a_cold_start(daemon_for: Any, tmp_path: Path) -> None:
    models = [fake_model("v", backend="vllm", gpu_id=0, gpu_memory=0.5, on_idle="sleep", idle_timeout=0.3)]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models)).start()
    with daemon.client() as c:
        assert ask(c, "v").status_code == 200
        wait_until(lambda: rows(c)["v"]["state"] == "sleeping", 15)
        first = rows(c)["v"]["pid"]
        # Someone outside the daemon takes the card while it sleeps: the wake runs out of memory.
        assert Ledger(tmp_path / "ledger.json").claim(os.getpid(), ["0"], 0.6) is None
        try:
            resp = ask(c, "v")
        finally:
            Ledger(tmp_path / "ledger.json").release(os.getpid())
        # The wake failed, so the engine was stopped and started cold: out of memory too.
        assert resp.status_code == 503 and "out of GPU memory" in resp.json()["error"]["message"]
        assert not pid_alive(first) and rows(c)["v"]["starts"] == 2
        assert ask(c, "v").status_code == 200  # the card is free again: another cold start
        assert rows(c)["v"]["starts"] == 3


def test_max_loaded_models_switches_one_at_a_time(daemon_for: Any, tmp_path: Path) -> None:
    models = [fake_model("a", gpu_memory=0.2), fake_model("b", backend="vllm", gpu_memory=0.2)]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models, gpus=2), MAX_LOADED_MODELS="1").start()
    with daemon.client() as c:
        for model in ("a", "b", "a", "b"):
            assert ask(c, model).status_code == 200
            assert loaded(c) == {model}
        assert rows(c)["b"]["gpu_ids"] == [0], "both GPUs are empty: the lowest id"


def test_pinned_models_stay_and_tensor_parallel_counts_on_both_gpus(daemon_for: Any, tmp_path: Path) -> None:
    models = [
        fake_model("pinned", gpu_id=0, gpu_memory=0.45, pinned=True),
        fake_model("b", gpu_id=0, gpu_memory=0.45),
        fake_model("tp", backend="vllm", gpu_id=[0, 1], gpu_memory=0.1),
        fake_model("free", gpu_memory=0.6),
        fake_model("big1", gpu_id=1, gpu_memory=0.95),
        fake_model("c", gpu_id=0, gpu_memory=0.45),
    ]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models, gpus=2)).start()
    with daemon.client() as c:
        for model in ("pinned", "b", "tp"):
            assert ask(c, model).status_code == 200
        # tp fits (0.45 + 0.45 + 0.1 on GPU 0); it holds 0.1 on both GPUs.
        shares = ledger(tmp_path)
        assert sorted(shares["0"].values()) == [0.1, 0.45, 0.45] and list(shares["1"].values()) == [0.1]
        # A model without gpu_id goes where it fits: GPU 1 (GPU 0 is full).
        assert ask(c, "free").status_code == 200 and rows(c)["free"]["gpu_ids"] == [1]
        # big1 needs GPU 1 nearly whole: both free and tp (which holds GPU 1 too) make room.
        assert ask(c, "big1").status_code == 200
        assert loaded(c) == {"pinned", "b", "big1"}
        # tp again: GPU 1 lacks room (big1), GPU 0 does not: only big1 goes.
        assert ask(c, "tp").status_code == 200
        assert loaded(c) == {"pinned", "b", "tp"}
        # c on GPU 0: pinned is the least recently used there, but b is the one evicted.
        assert ask(c, "c").status_code == 200
        assert loaded(c) == {"pinned", "tp", "c"}
        metrics = c.get("/metrics").text
    assert (
        counter(
            metrics, "unified_inference_engine_evictions_total", model="pinned", action="stop", replica="0"
        )
        == 0
    )
    assert (
        counter(metrics, "unified_inference_engine_evictions_total", model="b", action="stop", replica="0")
        == 1
    )


def test_a_start_that_runs_out_of_memory_says_so(daemon_for: Any, tmp_path: Path) -> None:
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, fake_model("a", gpu_id=0, gpu_memory=0.5))).start()
    # A process the daemon does not know holds most of the card.
    assert Ledger(tmp_path / "ledger.json").claim(os.getpid(), ["0"], 0.7) is None
    try:
        with daemon.client() as c:
            resp = ask(c, "a")
    finally:
        Ledger(tmp_path / "ledger.json").release(os.getpid())
    assert resp.status_code == 503
    message = resp.json()["error"]["message"]
    assert "out of GPU memory" in message and "GPU 0: 0.5 reserved by 'a' (0.5)" in message


def test_fake_engines_sleep_only_when_launched_for_it(tmp_path: Path) -> None:
    """The fake behaves as the engines' sources say (see tests/fake_gpu.py)."""
    import subprocess
    import sys

    from lifecycle.ports import free_port
    from tests.helpers import FAKE_ENGINE

    def run(dialect: str, *flags: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        model = ["--model-path", "m"] if dialect == "sglang" else ["m"]
        environ = {
            **os.environ,
            "FAKE_GPU_LEDGER": str(tmp_path / "ledger.json"),
            "CUDA_VISIBLE_DEVICES": "0",
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_ENGINE), dialect, *model, "--port", str(port), *flags], env=environ
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: engine_up(url), 15)
        return proc, url

    cases = [
        ("vllm", (), {}, "/sleep", 404, 0.92),  # no VLLM_SERVER_DEV_MODE: no route
        ("vllm", (), {"VLLM_SERVER_DEV_MODE": "1"}, "/sleep", 500, 0.92),  # no --enable-sleep-mode
        (
            "vllm",
            ("--enable-sleep-mode", "--gpu-memory-utilization", "0.3"),
            {"VLLM_SERVER_DEV_MODE": "1"},
            "/sleep",
            200,
            None,
        ),
        ("sglang", (), {}, "/release_memory_occupation", 200, 0.88),  # a no-op without the saver
        ("sglang", ("--enable-memory-saver",), {}, "/release_memory_occupation", 200, None),
    ]
    for dialect, flags, env, path, status, kept in cases:
        proc, url = run(dialect, *flags, **env)
        try:
            assert httpx.post(url + path, json={}).status_code == status, (dialect, flags, env)
            held = list(ledger(tmp_path).get("0", {}).values())
            assert held == ([kept] if kept is not None else []), (dialect, flags, env, held)
        finally:
            proc.terminate()
            proc.wait(10)
    assert ledger(tmp_path).get("0", {}) == {}


async def test_simultaneous_requests_for_room_cause_one_eviction_and_one_start(
    daemon_for: Any, tmp_path: Path
) -> None:
    models = [fake_model(n, gpu_id=0, gpu_memory=0.5, env={"FAKE_START_DELAY": "0.3"}) for n in "abc"]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models), OFFLOAD_QUEUE_THRESHOLD="100").start()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
        for model in ("a", "b"):
            assert (await c.post("/v1/completions", json={"model": model, "prompt": "x"})).status_code == 200
        body = {"model": "c", "prompt": "x", "max_tokens": 2}
        replies = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        status = {m["name"]: m for m in (await c.get("/v1/status")).json()["models"]}
        metrics = (await c.get("/metrics")).text
    assert status["c"]["starts"] == 1
    assert status["a"]["state"] == "stopped" and status["b"]["state"] == "ready"
    evicted = [
        counter(metrics, "unified_inference_engine_evictions_total", model=m, action="stop", replica="0")
        for m in "ab"
    ]
    assert evicted == [1, 0]


def test_an_operator_sleeps_an_idle_engine(daemon_for: Any, tmp_path: Path) -> None:
    models = [
        fake_model("s", gpu_id=0, gpu_memory=0.5, on_idle="sleep", idle_timeout=0, env=SLOW),
        fake_model("plain", gpu_id=0, gpu_memory=0.5),
    ]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models)).start()
    with daemon.client() as c:
        refused = c.post("/v1/admin/models/plain/sleep")  # issue 25, defect 7: was INVALID_BODY
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "SLEEP_NOT_ENABLED"
        assert "on_idle: sleep" in refused.json()["error"]["message"]
        assert c.post("/v1/admin/models/s/sleep").json()["error"]["code"] == "MODEL_BUSY"  # stopped
        with c.stream("POST", "/v1/completions", json={"model": "s", "prompt": "x", "stream": True}) as resp:
            assert resp.status_code == 200
            busy = c.post("/v1/admin/models/s/sleep")
            assert busy.status_code == 409 and "1 in flight" in busy.json()["error"]["message"]
        wait_until(lambda: rows(c)["s"]["in_flight"] == 0, 10)
        slept = c.post("/v1/admin/models/s/sleep")
        assert slept.status_code == 200 and slept.json()["state"] == "sleeping"
        assert ledger(tmp_path).get("0", {}) == {}
        assert c.post("/v1/admin/models/s/sleep").json()["state"] == "sleeping"  # already asleep: as it is
        assert ask(c, "s").status_code == 200 and rows(c)["s"]["wakes"] == 1


def test_a_model_that_can_never_fit_stops_the_daemon_and_a_reload(daemon_for: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from tests.helpers import ROOT

    bad = gpu_doc(tmp_path, fake_model("a", gpu_id=1, gpu_memory=0.5))  # one GPU declared: GPU 0
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    environ = {"PATH": "/usr/bin:/bin", "MODELS_CONFIG_PATH": str(config), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert f"{config}: models[0] 'a': gpu_id: GPU 1 is not present (GPUs: 0)" in proc.stderr

    good = gpu_doc(tmp_path, fake_model("a", gpu_id=0, gpu_memory=0.5))
    daemon: Daemon = daemon_for(good).start()
    with daemon.client() as c:
        assert ask(c, "a").status_code == 200
        # A reload that pins a model the card cannot hold beside another pinned one changes nothing.
        pinned = [fake_model(n, gpu_id=0, gpu_memory=0.6, pinned=True) for n in ("p", "q")]
        daemon.config.write_text(
            yaml.safe_dump(gpu_doc(tmp_path, fake_model("a", gpu_id=0, gpu_memory=0.5), *pinned))
        )
        resp = c.post("/v1/admin/reload")
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_CONFIG"
        assert any("'p' (0.6)" in p and "over GPU 0's budget" in p for p in resp.json()["error"]["problems"])
        assert set(rows(c)) == {"a"}
        # A reload that declares a second GPU takes effect: a model for it can start.
        doc = gpu_doc(tmp_path, fake_model("a", gpu_id=0, gpu_memory=0.5), fake_model("b", gpu_id=1), gpus=2)
        daemon.config.write_text(yaml.safe_dump(doc))
        assert c.post("/v1/admin/reload").status_code == 200
        assert ask(c, "b").status_code == 200 and rows(c)["b"]["gpu_ids"] == [1]
        assert [g["id"] for g in c.get("/v1/status").json()["gpus"]] == [0, 1]


async def test_concurrent_requests_across_more_models_than_fit_never_run_out_of_memory(
    daemon_for: Any, tmp_path: Path
) -> None:
    """Six clients, random models, short streams: evictions race requests taking leases."""
    pace = {"FAKE_TOKEN_DELAY": "0.01"}
    models = [fake_model(n, gpu_id=0, gpu_memory=0.45, env=pace) for n in ("a", "b", "c")]
    models.append(fake_model("s", backend="vllm", gpu_id=0, gpu_memory=0.45, on_idle="sleep", env=pace))
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models), OFFLOAD_QUEUE_THRESHOLD="100").start()
    rng = random.Random(7)
    plan = [[rng.choice("abcs") for _ in range(12)] for _ in range(6)]
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:

        async def client(models: list[str]) -> list[int]:
            codes = []
            for model in models:
                body = {"model": model, "prompt": "x", "max_tokens": rng.randint(1, 20), "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as resp:
                    text = (await resp.aread()).decode()
                    codes.append(resp.status_code if "[DONE]" in text else -resp.status_code)
            return codes

        results = await asyncio.gather(*(client(p) for p in plan))
        status = (await c.get("/v1/status")).json()
        metrics = (await c.get("/metrics")).text
    assert [code for codes in results for code in codes] == [200] * 72
    assert all(r["failures"] == 0 and r["last_error"] is None for r in status["models"]), status["models"]
    assert status["gpus"][0]["share_reserved"] <= 0.9 + 1e-9
    name = "unified_inference_engine_evictions_total"
    evictions = sum(counter(metrics, name, model=m, action=a, replica="0")
                    for m in "abcs" for a in ("stop", "sleep"))  # fmt: skip
    wakes = counter(metrics, "unified_inference_engine_wakes_total", model="s", replica="0")
    print(
        f"evictions {evictions:.0f}, wakes {wakes:.0f}, starts {sum(r['starts'] for r in status['models'])}"
    )
    assert evictions >= 5
