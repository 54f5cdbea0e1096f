"""Instructions per proxied request, counted by valgrind's callgrind: a figure that does not
move with the machine's load (request rates here swing by 10-20% from one cell to the next).

The daemon runs under callgrind with instrumentation off; after a warm-up it is switched on
for exactly `requests` sequential requests (one keep-alive client, one fake engine), then off.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from bench.procs import FAKE_ENGINES
from lifecycle.ports import free_port


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def per_request(root: Path, work: Path, requests: int = 300, backend: str = "sglang") -> float:
    """Instructions the daemon from source tree `root` executes per request (its whole process)."""
    work.mkdir(parents=True, exist_ok=True)
    doc = {
        "models": [{"name": "fast", "backend": backend, "model_path": "org/fast"}],
        "engines": FAKE_ENGINES,
    }
    (work / "models.yaml").write_text(yaml.safe_dump(doc))
    port = free_port()
    env = {
        **os.environ, "MODELS_CONFIG_PATH": str(work / "models.yaml"), "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": str(port), "STATE_DIR": str(work / "state"), "EXECUTION_MODE": "gpu",
        "LOG_LEVEL": "warning", "OFFLOAD_QUEUE_THRESHOLD": "1000000", "PYTHONHASHSEED": "0",
    }  # fmt: skip
    out = work / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    daemon = subprocess.Popen([*argv, sys.executable, "main.py"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, daemon)
        body = {"model": "fast", "prompt": "hi", "max_tokens": 16}
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(100):  # warm-up: the engine started, every pool and cache filled
                client.post("/v1/completions", json=body).raise_for_status()
            _control(daemon.pid, "on")
            for _ in range(requests):
                client.post("/v1/completions", json=body).raise_for_status()
            _control(daemon.pid, "off")
    finally:
        daemon.terminate()
        daemon.wait(120)
    totals = re.search(rb"^totals: (\d+)", out.read_bytes(), re.M) or re.search(
        rb"^summary: (\d+)", out.read_bytes(), re.M
    )
    assert totals, f"no totals in {out}"
    return int(totals.group(1)) / requests


def _wait_healthy(url: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300  # Python's start-up under valgrind takes a while
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError("the daemon under valgrind exited")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the daemon under valgrind did not start")


def _control(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)
