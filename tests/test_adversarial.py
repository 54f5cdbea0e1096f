"""An adversarial run: hostile and careless clients all at once, an honest one unharmed.

tests/adversary.py (its own process, so its load does not share this one's
interpreter) runs a slowloris of 200 connections, 50 stream clients that never
read, a header flood, and a key client cycling through the limit bypasses of
issue 11. Meanwhile an honest client streams from another model: every one of
its requests must succeed, with a p99 latency within 2x of the same run
unloaded. Afterwards nothing is left in flight, and the daemon's descriptors
and memory come back to within 10% of what they were before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.helpers import Daemon, fake_model, registry_doc, wait_until

ADVERSARY = Path(__file__).resolve().parent / "adversary.py"
HONEST, HOSTILE, CARELESS = "sk-honest-0123456789", "sk-hostile-0123456789", "sk-careless-0123456789"
KEYS = {
    "keys": [
        {"key": HONEST, "name": "honest"},
        {"key": CARELESS, "name": "careless"},
        {"key": HOSTILE, "name": "hostile", "max_tokens": 5, "tokens_per_minute": 3000},
    ]
}
DOC = registry_doc(
    fake_model("honest", backend="sglang", env={"FAKE_TOKEN_DELAY": "0.01"}),
    fake_model("target", backend="sglang", env={"FAKE_TOKEN_BYTES": "65536", "FAKE_TOKENS": "2000"}),
    fake_model("metered", backend="vllm", env={"FAKE_TOKENS": "4000"}),
)
ATTACK_SECONDS = 14
SAMPLES = 30


def _honest_run(c: httpx.Client) -> list[float]:
    """SAMPLES streams of 10 tokens at 10 ms; each must arrive whole. Their latencies."""
    body = {"model": "honest", "prompt": "x", "max_tokens": 10, "stream": True}
    latencies = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        with c.stream("POST", "/v1/completions", json=body) as s:
            data = b"".join(s.iter_raw())
        latencies.append(time.perf_counter() - t0)
        assert s.status_code == 200 and data.count(b"data: {") == 10, data[-300:]
    return latencies


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _in_flight(c: httpx.Client) -> dict[str, int]:
    return {r["name"]: r["in_flight"] for r in c.get("/v1/status").json()["models"]}


def _usage(proc: psutil.Process) -> tuple[int, int]:
    return proc.num_fds(), proc.memory_info().rss


def test_hostile_clients_leave_an_honest_one_unharmed(daemon_for: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    daemon: Daemon = daemon_for(
        DOC, API_KEYS_FILE=str(keys), CLIENT_HEADER_TIMEOUT="3", CLIENT_WRITE_TIMEOUT="4",
        OFFLOAD_QUEUE_THRESHOLD="1000", LOG_LEVEL="warning",
    ).start()  # fmt: skip
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)
    auth = {"Authorization": f"Bearer {HONEST}"}
    with httpx.Client(base_url=daemon.url, timeout=30, headers=auth) as c:
        for model in ("honest", "target", "metered"):
            assert c.post(f"/v1/admin/models/{model}/start").status_code == 200
        _honest_run(c)  # warm-up
        unloaded = _honest_run(c)
        fds_before, rss_before = _usage(proc)

        attack = subprocess.Popen(
            [sys.executable, str(ADVERSARY), "--port", str(daemon.port), "--seconds", str(ATTACK_SECONDS),
             "--key", HOSTILE, "--max-tokens", "5", "--stuck-key", CARELESS],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: _in_flight(c)["target"] >= 40, timeout=10, interval=0.1)
            loaded = _honest_run(c)
            out, _ = attack.communicate(timeout=ATTACK_SECONDS + 30)
        finally:
            if attack.poll() is None:
                attack.kill()
                attack.wait()
        report = json.loads(out)
        counts = report["counts"]
        assert report["violations"] == [], "a hostile client got past its key's max_tokens"
        assert counts.get("flood_431", 0) > 0 and counts.get("stuck_cut", 0) > 0, counts
        assert counts.get("slowloris_cut", 0) >= 200 and counts.get("hostile_200", 0) > 0, counts
        assert _p99(loaded) <= 2 * _p99(unloaded), (sorted(loaded)[-3:], sorted(unloaded)[-3:])

        wait_until(lambda: not any(_in_flight(c).values()), timeout=15, interval=0.2)

        def recovered() -> bool:
            fds, rss = _usage(proc)
            return fds <= fds_before * 1.1 and rss <= rss_before * 1.1

        try:
            wait_until(recovered, timeout=20, interval=0.5)
        except AssertionError:
            now = _usage(proc)
            raise AssertionError(f"before: {fds_before} fds, {rss_before} bytes; after: {now}") from None
