"""Control-plane routes through a real daemon."""

from __future__ import annotations

from typing import Any

from tests.helpers import Daemon, fake_model, pid_alive, registry_doc

DOC = registry_doc(
    fake_model("a", gpu_id=0, cpu_offload_model="b"),
    fake_model("b", backend="llamacpp"),
    fake_model("bad", backend="vllm", format="gguf"),
    fake_model("broken", env={"FAKE_EXIT_DURING_START": "2"}),
)


def test_health_models_status_install(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC).start()
    with daemon.client() as c:
        assert c.get("/health").json()["status"] == "ok"
        listing = c.get("/v1/models").json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == ["a", "b", "bad", "broken"]
        one = c.get("/v1/models", params={"model": "a"}).json()
        assert one["backend"] == "sglang" and one["format"] == "hf" and one["execution_mode"] == "gpu"
        assert one["state"] == "stopped" and one["cpu_offload_model"] == "b"
        bad = c.get("/v1/models", params={"model": "bad"}).json()
        assert "not supported" in bad["disabled"] and bad["state"] == "disabled"
        status = c.get("/v1/status").json()
        assert status["execution_mode"] == "gpu"
        assert status["gpus"] == [] and status["max_loaded_models"] == 0  # no NVML, none declared
        assert set(status["models"][0]) == {
            "name",
            "backend",
            "state",
            "pid",
            "port",
            "in_flight",
            "draining",
            "starts",
            "last_used",
            "failures",
            "last_error",
            "retry_at",
            "gpu_ids",
            "gpu_memory",
            "gpu_memory_bytes",
            "pinned",
            "sleeps",
            "wakes",
            "replica",
            "replicas",
            "queued",
            "execution_mode",
            "admission_queue",
            "placement",
            "host",
            "node",
            "socket",
            "disabled",
        }
        rows = {r["name"]: r for r in status["models"]}
        assert rows["a"]["disabled"] is None and rows["a"]["state"] == "stopped"
        # Issue 25, defect 7: a model that cannot run showed as plain "stopped".
        assert rows["bad"]["state"] == "disabled" and "not supported" in rows["bad"]["disabled"]
        assert [r["replica"] for r in status["models"][0]["replicas"]] == [0]
        install = c.get("/v1/models/install").json()
        assert install["downloads"] is False and "gguf" in install["formats"]


def test_admin_start_and_stop(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC).start()
    with daemon.client() as c:
        started = c.post("/v1/admin/models/a/start")
        assert started.status_code == 200
        row = started.json()
        assert row["state"] == "ready" and row["starts"] == 1 and pid_alive(row["pid"])
        stopped = c.post("/v1/admin/models/a/stop").json()
        assert stopped["state"] == "stopped" and stopped["pid"] is None
        assert not pid_alive(row["pid"])

        failed = c.post("/v1/admin/models/broken/start")
        assert failed.status_code == 503
        assert "exited with code 2 during start" in failed.json()["error"]["message"]
        assert c.post("/v1/admin/models/nope/start").status_code == 404
        assert c.post("/v1/admin/models/bad/start").json()["error"]["code"] == "FORMAT_NOT_SUPPORTED"
        row = next(r for r in c.get("/v1/status").json()["models"] if r["name"] == "broken")
        assert row["state"] == "failed" and row["failures"] == 1 and "code 2" in row["last_error"]
