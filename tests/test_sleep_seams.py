"""Where sleep meets GPU placement and operators' stops (issue 25, defects 3 and 5), through a
real daemon and fake engines sharing a GPU ledger (tests/fake_gpu.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Daemon, fake_model, pid_alive, wait_until
from tests.test_gpu_sharing import ask, gpu_doc, ledger, rows


def test_a_sleeping_model_wakes_on_the_gpu_its_process_is_bound_to(daemon_for: Any, tmp_path: Path) -> None:
    """s (no gpu_id) lands on GPU 0 and sleeps; g1 then takes GPU 1. Planned afresh, s's wake
    went on GPU 1's books (fuller, so preferred) while its memory came back on GPU 0, and f0b's
    start on GPU 0 then ran out of memory."""
    models = [
        fake_model("f0a", gpu_id=0, gpu_memory=0.3),
        fake_model("g1", gpu_id=1, gpu_memory=0.45),
        fake_model("f0b", gpu_id=0, gpu_memory=0.5),
        fake_model("s", gpu_memory=0.5, on_idle="sleep", idle_timeout=0),
    ]
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models, gpus=2)).start()
    with daemon.client() as c:
        assert ask(c, "f0a").status_code == 200
        assert ask(c, "s").status_code == 200
        assert rows(c)["s"]["gpu_ids"] == [0]
        assert c.post("/v1/admin/models/s/sleep").status_code == 200
        asleep = rows(c)["s"]
        assert asleep["state"] == "sleeping" and asleep["gpu_ids"] == [0], "asleep, it says where it lives"
        assert ask(c, "g1").status_code == 200

        assert ask(c, "s").status_code == 200  # the wake
        woke = rows(c)["s"]
        assert woke["wakes"] == 1 and woke["gpu_ids"] == [0]
        gpus = {g["id"]: g for g in c.get("/v1/status").json()["gpus"]}
        assert sorted(gpus[0]["models"]) == ["f0a", "s"] and gpus[1]["models"] == ["g1"]

        # GPU 0 holds 0.8: f0b's start makes room by stopping the least recently used, f0a.
        resp = ask(c, "f0b")
        assert resp.status_code == 200, resp.text
        states = {name: row["state"] for name, row in rows(c).items()}
        assert states == {"f0a": "stopped", "g1": "ready", "f0b": "ready", "s": "ready"}
        books = ledger(tmp_path)  # what the (fake) cards hold agrees with the daemon's books
        assert sorted(books["0"].values()) == [0.5, 0.5] and list(books["1"].values()) == [0.45]
        gpus = {g["id"]: g for g in c.get("/v1/status").json()["gpus"]}
        assert gpus[0]["share_reserved"] == 1.0 and gpus[1]["share_reserved"] == 0.45


@pytest.mark.parametrize("how", ["force", "drain", "reload"])
def test_an_operators_stop_during_a_hung_wake_answers_within_the_grace_period(
    daemon_for: Any, tmp_path: Path, how: str
) -> None:
    """The wake call itself was bounded only by STARTUP_TIMEOUT: the stop waited it out. (A
    draining stop has nothing to drain: the request waits for the wake, not on the engine.)"""
    models = [fake_model("s", gpu_id=0, gpu_memory=0.5, on_idle="sleep", idle_timeout=0,
                         env={"FAKE_WAKE_DELAY": "60"})]  # fmt: skip
    doc = gpu_doc(tmp_path, *models)
    daemon: Daemon = daemon_for(doc, STARTUP_TIMEOUT="20", STOP_GRACE_PERIOD="1").start()
    with daemon.client() as c:
        assert ask(c, "s").status_code == 200
        pid = rows(c)["s"]["pid"]
        assert c.post("/v1/admin/models/s/sleep").status_code == 200
        woken: dict[str, httpx.Response] = {}

        def wake() -> None:
            with daemon.client() as w:
                woken["r"] = ask(w, "s")

        waker = threading.Thread(target=wake)
        waker.start()
        wait_until(lambda: rows(c)["s"]["state"] == "waking", 10)
        t0 = time.monotonic()
        if how == "reload":  # the model removed from models.yaml while it wakes
            daemon.config.write_text(yaml.safe_dump(gpu_doc(tmp_path, fake_model("other"))))
            stopped = c.post("/v1/admin/reload")
            assert stopped.status_code == 200 and stopped.json()["removed"] == ["s"]
            waker.join(30)
            took = time.monotonic() - t0
        else:
            stopped = c.post("/v1/admin/models/s/stop", params={"force": "true"} if how == "force" else {})
            took = time.monotonic() - t0
            waker.join(30)
            assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        # The stop grace (1 s) and the SIGKILL wait after it bound the stop, not the wake (20 s).
        assert took < 5.0, f"the stop took {took:.1f}s"
        assert woken["r"].status_code == 503 and woken["r"].json()["error"]["code"] == "MODEL_UNAVAILABLE"
        wait_until(lambda: not pid_alive(pid), 5)
        assert ledger(tmp_path).get("0", {}) == {}



def test_a_stop_during_a_hung_sleep_answers_within_the_grace_period(daemon_for: Any, tmp_path: Path) -> None:
    """Found by the review of issue 25: the sleep call was bounded only by its own 60 s."""
    models = [fake_model("s", gpu_id=0, gpu_memory=0.5, on_idle="sleep", idle_timeout=0,
                         env={"FAKE_SLEEP_DELAY": "60"})]  # fmt: skip
    daemon: Daemon = daemon_for(gpu_doc(tmp_path, *models), STOP_GRACE_PERIOD="1").start()
    with daemon.client() as c:
        assert ask(c, "s").status_code == 200
        pid = rows(c)["s"]["pid"]
        slept: dict[str, httpx.Response] = {}

        def sleep() -> None:
            with daemon.client(timeout=90) as s:
                slept["r"] = s.post("/v1/admin/models/s/sleep")

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        wait_until(lambda: rows(c)["s"]["state"] == "sleeping", 10)
        t0 = time.monotonic()
        stopped = c.post("/v1/admin/models/s/stop", params={"force": "true"})
        took = time.monotonic() - t0
        sleeper.join(30)
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        assert took < 5.0, f"the stop took {took:.1f}s"
        assert slept["r"].status_code == 200 and slept["r"].json()["state"] == "stopped"
        wait_until(lambda: not pid_alive(pid), 5)
        assert ledger(tmp_path).get("0", {}) == {}
