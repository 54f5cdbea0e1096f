"""The daemon as a real process: signals, orphan reaping, config refusal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import ROOT, Daemon, fake_model, pid_alive, registry_doc, wait_until


def _engine_family(status: dict[str, Any]) -> list[int]:
    pids = []
    for row in status["models"]:
        if row["pid"]:
            leader = psutil.Process(row["pid"])
            pids += [leader.pid] + [c.pid for c in leader.children(recursive=True)]
    return pids


def _start_both(daemon: Daemon) -> list[int]:
    with daemon.client() as c:
        for name in ("a", "b"):
            assert c.post(f"/v1/admin/models/{name}/start").status_code == 200
        status = c.get("/v1/status").json()
    assert {r["state"] for r in status["models"]} == {"ready"}
    return _engine_family(status)


DOC = registry_doc(
    fake_model("a", env={"FAKE_CHILDREN": "1"}),
    fake_model("b", backend="vllm", env={"FAKE_IGNORE_SIGTERM": "1", "FAKE_CHILDREN": "1"}),
)


def test_sigterm_leaves_no_engine_process(daemon_for: Any) -> None:
    daemon = daemon_for(DOC).start()
    family = _start_both(daemon)
    assert len(family) == 4

    daemon.signal(signal.SIGTERM)

    # uvicorn re-raises the signal it caught once shutdown is complete.
    assert daemon.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in daemon.log()
    assert [pid for pid in family if pid_alive(pid)] == []


def test_next_start_reaps_engines_of_a_sigkilled_daemon(daemon_for: Any) -> None:
    daemon = daemon_for(DOC).start()
    family = _start_both(daemon)

    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    assert all(pid_alive(pid) for pid in family), "orphans survive a hard kill"

    daemon.start()  # same STATE_DIR: the pid records are read and acted on

    wait_until(lambda: not any(pid_alive(pid) for pid in family), timeout=15)
    assert "reaping engine" in daemon.log()
    with daemon.client() as c:
        assert {r["state"] for r in c.get("/v1/status").json()["models"]} == {"stopped"}


def test_invalid_registry_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: x\n    backend: sglang\n    model_path: m\n    colour: red\n")
    proc = subprocess.run(
        [sys.executable, "main.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "MODELS_CONFIG_PATH": str(bad), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{bad}: models[0] 'x': colour: unknown field" in proc.stderr
