"""Each measurement of the benchmark, one function each."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from backends.base import LaunchContext
from backends.registry import backend_for
from bench.load import RateResult, first_chunk_ms, measure_rate, percentile, run_streams
from bench.procs import FAKE_ENGINES, Proc
from config.environment import engine_base_env
from config.models import ModelSpec
from lifecycle.model_files import ModelFiles
from lifecycle.ports import free_port


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # requests go to base_url + /v1/completions
    model: str
    key: str = ""  # sent as a bearer token (the engine's launch key, or a client key)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def rate(target: Target, connections: int, duration: float) -> RateResult:
    body = {"model": target.model, "prompt": "hi", "max_tokens": 16}
    return measure_rate(target.base_url + "/v1/completions", body, connections, duration, target.headers)


class RssSampler:
    """Peak resident memory of a process while a block runs."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def touch(engine_url: str, key: str) -> None:
    """One request straight to an engine, on a connection of its own."""
    headers = {"Authorization": f"Bearer {key}"}
    httpx.get(engine_url + "/health", headers=headers, timeout=10).raise_for_status()


def streaming(target: Target, streams: int, tokens: int) -> dict[str, float]:
    return asyncio.run(
        run_streams(target.base_url + "/v1/completions", target.model, streams, tokens, target.headers)
    ).summary()


def engine_alone(spec: ModelSpec, model_files: ModelFiles, fake: bool) -> dict[str, float]:
    """Launch the engine exactly as the daemon would; time it until its readiness probe answers,
    then the first chunk of a streaming request sent to it directly (the engine's own first token)."""
    backend = backend_for(spec.backend)
    port = free_port()
    command = tuple(FAKE_ENGINES[spec.backend]["command"]) if fake else None
    ctx = LaunchContext(
        port=port,
        model_path=model_files.resolve(spec.model_path),
        base_env=engine_base_env(),
        command=command,
    )
    launch = backend.launch(spec, ctx)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        launch.argv, env=dict(launch.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        with httpx.Client(timeout=1.0) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url + backend.readiness_path).status_code == 200:
                        break
                if proc.poll() is not None:
                    raise RuntimeError(f"engine exited during start: {launch.argv}")
                time.sleep(0.005)
        ready = (time.perf_counter() - t0) * 1000
        first = asyncio.run(first_chunk_ms(url + "/v1/completions", spec.served_name))
        return {"engine_ready_ms": ready, "engine_first_token_ms": first}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cold_start(daemon: Proc, model: str) -> dict[str, float]:
    """Stop `model`, then time a streaming request's first chunk through the daemon (cold and warm)."""
    httpx.post(f"{daemon.url}/v1/admin/models/{model}/stop", timeout=60).raise_for_status()
    url = daemon.url + "/v1/completions"
    cold = asyncio.run(first_chunk_ms(url, model))
    warm = asyncio.run(first_chunk_ms(url, model))
    # Leave it stopped, so the engine's own start is timed on an equally quiet machine.
    httpx.post(f"{daemon.url}/v1/admin/models/{model}/stop", timeout=60).raise_for_status()
    return {"cold_ttft_ms": cold, "warm_ttft_ms": warm}


def wake_vs_cold(daemon: Proc, model: str) -> dict[str, float]:
    """A sleeping engine's first token against a stopped one's (both through the daemon)."""
    admin = f"{daemon.url}/v1/admin/models/{model}"
    url = daemon.url + "/v1/completions"
    httpx.post(admin + "/stop", timeout=60).raise_for_status()
    cold = asyncio.run(first_chunk_ms(url, model))
    httpx.post(admin + "/sleep", timeout=60).raise_for_status()
    woken = asyncio.run(first_chunk_ms(url, model))
    warm = asyncio.run(first_chunk_ms(url, model))
    return {"cold_ttft_ms": cold, "wake_ttft_ms": woken, "warm_ttft_ms": warm}


def _engine_stats(daemon: Proc, model: str) -> dict[str, Any]:
    rows = httpx.get(daemon.url + "/v1/status").json()["models"]
    port = next(r["port"] for r in rows if r["name"] == model)
    stats: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/fake/stats").json()
    return stats


async def _hammer(url: str, model: str, clients: int, duration: float) -> dict[str, list[float]]:
    """Closed-loop clients; latencies grouped by outcome (served, offloaded, 429)."""
    outcomes: dict[str, list[float]] = {"served": [], "offloaded": [], "rejected": [], "error": []}
    body = {"model": model, "prompt": "x", "max_tokens": 30}
    deadline = time.monotonic() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                async with session.post(url, json=body) as r:
                    await r.read()
                    ms = (time.perf_counter() - t0) * 1000
                    if r.status == 429:
                        outcomes["rejected"].append(ms)
                    elif r.status != 200:
                        outcomes["error"].append(ms)
                    elif r.headers.get("x-served-model") != model:
                        outcomes["offloaded"].append(ms)
                    else:
                        outcomes["served"].append(ms)

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


def overload(daemon: Proc, bound: int, duration: float) -> dict[str, float]:
    """4x the in-flight bound on a GPU model without a twin, then on one with a twin."""
    url = daemon.url + "/v1/completions"
    result: dict[str, float] = {"bound": bound}
    for model, kind in (("gpu-alone", "rejected"), ("gpu", "offloaded")):
        httpx.post(f"{daemon.url}/v1/admin/models/{model}/start", timeout=60).raise_for_status()
        outcomes = asyncio.run(_hammer(url, model, 4 * bound, duration))
        decided = outcomes[kind]
        result[f"{model}_{kind}"] = len(decided)
        result[f"{model}_{kind}_p50_ms"] = percentile(decided, 50)
        result[f"{model}_{kind}_p99_ms"] = percentile(decided, 99)
        result[f"{model}_served"] = len(outcomes["served"])
        result[f"{model}_errors"] = len(outcomes["error"])
        result[f"{model}_engine_max_in_flight"] = _engine_stats(daemon, model)["max_in_flight"]
    return result


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def shipped_spec(name: str) -> ModelSpec:
    from config.models import load_registry
    from config.settings import DEFAULT_MODELS_CONFIG

    return load_registry(Path(DEFAULT_MODELS_CONFIG)).models[name]


def collected_documents(daemon: Proc, model: str, rounds: int, tokens: int) -> dict[str, float]:
    """A non-streaming llama.cpp completion through the daemon (which reads it as a stream and
    asks the prompt's size: router/collect.py) against the same request to the engine itself,
    alternating, at temperature 0. Medians in ms."""
    with httpx.Client(base_url=daemon.url, timeout=120) as c:
        c.post(f"/v1/admin/models/{model}/start").raise_for_status()
        row = next(m for m in c.get("/v1/status").json()["models"] if m["name"] == model)
    key = psutil.Process(row["pid"]).environ().get("API_KEY")
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": "The history of the city of Paris begins", "max_tokens": tokens,
            "temperature": 0}  # fmt: skip
    times: dict[str, list[float]] = {"daemon": [], "engine": []}
    with (
        httpx.Client(base_url=daemon.url, timeout=120) as via,
        httpx.Client(base_url=f"http://127.0.0.1:{row['port']}", headers=auth, timeout=120) as direct,
    ):
        for i in range(rounds):
            order = (("daemon", via), ("engine", direct)) if i % 2 else (("engine", direct), ("daemon", via))
            for name, client in order:
                t0 = time.perf_counter()
                client.post("/v1/completions", json=body).raise_for_status()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {f"{name}_ms": percentile(values, 50) for name, values in times.items()}
