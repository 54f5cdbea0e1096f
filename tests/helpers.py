"""Shared test helpers: fake-engine registries and a real daemon process."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from lifecycle.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
FAKE_ENGINES = {b: {"command": [sys.executable, str(FAKE_ENGINE), b]} for b in ("sglang", "vllm", "llamacpp")}


def fake_model(name: str, backend: str = "sglang", **fields: Any) -> dict[str, Any]:
    """A models.yaml entry served by the fake engine (knobs go in `env`)."""
    entry: dict[str, Any] = {"name": name, "backend": backend, "model_path": f"org/{name}"}
    if backend == "llamacpp":
        entry["model_path"] = f"/models/{name}.gguf"
    entry.update(fields)
    return entry


def registry_doc(*models: dict[str, Any], fake: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {"models": list(models)}
    if fake:
        doc["engines"] = FAKE_ENGINES
    return doc


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `predicate` until truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def engine_up(url: str) -> bool:
    """An engine (the fake) answers its /health with 200."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def engine_request(
    row: dict[str, Any], method: str, path: str, timeout: float = 10.0, **kw: Any
) -> httpx.Response:
    """A request straight to an engine, by its /v1/status row: on its Unix socket (a local vLLM
    engine), else at its host and port."""
    if row.get("socket"):
        with httpx.Client(transport=httpx.HTTPTransport(uds=row["socket"]), timeout=timeout) as c:
            return c.request(method, "http://localhost" + path, **kw)
    url = f"http://{row.get('host') or '127.0.0.1'}:{row['port']}{path}"
    return httpx.request(method, url, timeout=timeout, **kw)


def engine_get(row: dict[str, Any], path: str, timeout: float = 10.0) -> httpx.Response:
    return engine_request(row, "GET", path, timeout)


async def engine_aget(row: dict[str, Any], path: str, timeout: float = 10.0) -> httpx.Response:
    """`engine_get` for async tests."""
    if row.get("socket"):
        transport = httpx.AsyncHTTPTransport(uds=row["socket"])
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as c:
            return await c.get("http://localhost" + path)
    async with httpx.AsyncClient(timeout=timeout) as c:
        return await c.get(f"http://{row.get('host') or '127.0.0.1'}:{row['port']}{path}")


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Daemon:
    """`python main.py` as a real process on a free loopback port."""

    def __init__(self, workdir: Path, doc: dict[str, Any], nofile: int | None = None, **env: str) -> None:
        self.workdir = workdir
        self.nofile = nofile  # the daemon's file descriptor limit (soft and hard), when given
        self.config = workdir / "models.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"daemon-{self.port}.log"
        self.env = {
            **os.environ,
            "MODELS_CONFIG_PATH": str(self.config),
            "ROUTER_HOST": "127.0.0.1",
            "ROUTER_PORT": str(self.port),
            "STATE_DIR": str(workdir / "state"),
            "EXECUTION_MODE": "gpu",
            "STOP_GRACE_PERIOD": "2",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Daemon:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["ROUTER_PORT"] = str(self.port)
        self.log_path = self.workdir / f"daemon-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "main.py"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self._limit_fds if self.nofile else None,
            )  # fmt: skip
        wait_until(self._healthy, timeout)
        return self

    def _limit_fds(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
