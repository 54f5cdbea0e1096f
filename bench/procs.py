"""The processes a benchmark run measures: the daemon, its engines, the Rust routers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from lifecycle.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "fake_engine.py"
FAKE_ENGINES = {b: {"command": [sys.executable, str(FAKE_ENGINE), b]} for b in ("sglang", "vllm", "llamacpp")}


def wait_http(url: str, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(interval)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_daemon(
    workdir: Path,
    models: list[dict[str, Any]],
    fake: bool = True,
    root: Path = ROOT,
    gpus: list[dict[str, Any]] | None = None,
    **env: str,
) -> Proc:
    """`python main.py` from the source tree `root` (another commit's, for an A/B), serving
    `models`; fake engines always come from this tree, so both sides of an A/B share one."""
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"models": models}
    if fake:
        doc["engines"] = FAKE_ENGINES
    if gpus:
        doc["gpus"] = gpus
    config = workdir / "models.yaml"
    config.write_text(yaml.safe_dump(doc))
    port = free_port()
    full_env = {
        **os.environ,
        "MODELS_CONFIG_PATH": str(config),
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": str(port),
        "STATE_DIR": str(workdir / "state"),
        "EXECUTION_MODE": "gpu",
        "LOG_LEVEL": "warning",
        **env,
    }
    with (workdir / "daemon.log").open("wb") as log:
        popen = subprocess.Popen([sys.executable, "main.py"], cwd=root, env=full_env, stdout=log, stderr=log)
    proc = Proc("daemon", popen, f"http://127.0.0.1:{port}")
    wait_http(proc.url + "/health", 30)
    return proc


def engine_url(daemon: Proc, model: str) -> tuple[str, str]:
    """Start `model` through the admin API; its engine's own URL and launch key.

    Engines accept only the daemon's per-launch key; the benchmark (the same
    user) reads it from the SGLang-dialect command line so that "direct" and
    the routers can reach the same engine.
    """
    resp = httpx.post(f"{daemon.url}/v1/admin/models/{model}/start", timeout=180)
    resp.raise_for_status()
    row = resp.json()
    argv = psutil.Process(row["pid"]).cmdline()
    return f"http://127.0.0.1:{row['port']}", argv[argv.index("--api-key") + 1]


ROUTERS = {
    "sglang-router": [sys.executable, "-m", "sglang_router.launch_router"],
    "vllm-router": ["vllm-router"],
}


def router_available(name: str) -> bool:
    if name == "sglang-router":
        import importlib.util

        return importlib.util.find_spec("sglang_router") is not None
    return shutil.which("vllm-router") is not None


def start_router(name: str, worker: str, key: str, workdir: Path) -> Proc:
    port = free_port()
    argv = [
        *ROUTERS[name],
        "--worker-urls", worker,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--policy", "round_robin",
        "--prometheus-port", str(free_port()),
        "--max-concurrent-requests", "4096",
        "--queue-size", "4096",
    ]  # fmt: skip
    with (workdir / f"{name}-{port}.log").open("wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    proc = Proc(name, popen, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    while True:  # ready when it forwards a request
        with contextlib.suppress(httpx.HTTPError):
            headers = {"Authorization": f"Bearer {key}"}
            if (
                httpx.post(proc.url + "/v1/completions", json=body, headers=headers, timeout=2).status_code
                == 200
            ):
                return proc
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start (see {workdir})")
        time.sleep(0.1)
