"""Engine lifecycle with real engine subprocesses (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psutil
import pytest

from lifecycle.engine import backoff_delay
from lifecycle.state import EngineBackingOff, EngineStartError, EngineState
from tests.helpers import fake_model, pid_alive

pytestmark = pytest.mark.anyio


async def test_simultaneous_first_requests_share_one_start(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_START_DELAY": "0.5"}))
    engine = manager.get("m")

    urls = await asyncio.gather(*(engine.ensure_ready() for _ in range(16)))

    assert len(set(urls)) == 1
    assert engine.starts == 1
    assert engine.state is EngineState.READY
    spawned = [line for line in engine.log.tail(200) if line.startswith("=== ") and "starting:" in line]
    assert len(spawned) == 1
    assert len(list(manager.pid_records.run_dir.glob("m.*.json"))) == 1


async def test_exit_during_start_fails_fast_with_log_lines(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_EXIT_DURING_START": "3"}), startup_timeout=60)
    engine = manager.get("m")

    t0 = time.monotonic()
    waiters = [engine.ensure_ready() for _ in range(5)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    elapsed = time.monotonic() - t0

    assert elapsed < 15, "an engine that exits must not wait for STARTUP_TIMEOUT"
    assert all(isinstance(r, EngineStartError) for r in results)
    err = results[0]
    assert isinstance(err, EngineStartError)
    assert "exited with code 3 during start" in err.message
    assert any("FAKE_EXIT_DURING_START" in line for line in err.log_tail)
    assert engine.state is EngineState.FAILED
    assert engine.starts == 1, "every waiter must share the one failed start"
    assert engine.failures == 1 and engine.last_error is not None


async def test_startup_timeout_kills_engine_that_never_gets_ready(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_HANG": "start"}), startup_timeout=1.0)
    engine = manager.get("m")
    with pytest.raises(EngineStartError, match="not ready after"):
        await engine.ensure_ready()
    assert engine.state is EngineState.FAILED
    assert engine.pid is None


async def test_repeated_failures_back_off(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_EXIT_DURING_START": "1"}))
    engine = manager.get("m")
    for _ in range(2):  # the first failure retries at once; the second starts a back-off
        with pytest.raises(EngineStartError):
            await engine.ensure_ready()
    with pytest.raises(EngineBackingOff) as info:
        await engine.ensure_ready()
    assert info.value.retry_at > time.time()
    assert engine.starts == 2
    assert [backoff_delay(n) for n in (1, 2, 3, 4, 10)] == [0.0, 1.0, 2.0, 4.0, 60.0]


async def test_idle_engine_is_stopped_after_its_timeout(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", idle_timeout=0.5))
    engine = manager.get("m")
    lease = engine.acquire()
    await engine.ensure_ready()
    pid = engine.pid
    lease.release()

    t0 = time.monotonic()
    await engine.wait_for_state(EngineState.STOPPED, timeout=10)

    assert time.monotonic() - t0 >= 0.45
    assert not pid_alive(pid)


async def test_busy_engine_is_not_stopped_while_a_request_is_in_flight(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", idle_timeout=0.3))
    engine = manager.get("m")
    lease = engine.acquire()
    await engine.ensure_ready()

    await asyncio.sleep(1.2)  # four idle timeouts pass while the request is in flight
    assert engine.state is EngineState.READY

    lease.release()  # the idle clock starts now
    t0 = time.monotonic()
    await engine.wait_for_state(EngineState.STOPPED, timeout=10)
    assert time.monotonic() - t0 >= 0.25


async def test_request_during_idle_stop_waits_and_restarts(manager_for: Any) -> None:
    """Regression (llama-swap #946): a start racing an idle stop must not hang."""
    manager = await manager_for(
        fake_model("m", idle_timeout=0.2, env={"FAKE_IGNORE_SIGTERM": "1"}), stop_grace_period=1.0
    )
    engine = manager.get("m")
    await engine.ensure_ready()
    await engine.wait_for_state(EngineState.STOPPING, timeout=10)

    with engine.acquire():
        url = await asyncio.wait_for(engine.ensure_ready(), timeout=20)

    assert url.startswith("http://127.0.0.1:")
    assert engine.starts == 2


async def test_engine_ignoring_sigterm_is_killed_with_its_children(manager_for: Any) -> None:
    manager = await manager_for(
        fake_model("m", env={"FAKE_IGNORE_SIGTERM": "1", "FAKE_CHILDREN": "2"}), stop_grace_period=0.5
    )
    engine = manager.get("m")
    await engine.ensure_ready()
    leader = psutil.Process(engine.pid)
    family = [leader.pid] + [c.pid for c in leader.children(recursive=True)]
    assert len(family) == 3

    t0 = time.monotonic()
    await engine.stop()

    assert time.monotonic() - t0 >= 0.5, "SIGKILL must wait for the grace period"
    assert engine.state is EngineState.STOPPED
    assert [pid for pid in family if pid_alive(pid)] == []
    assert any("killed" in line for line in engine.log.tail(5))


async def test_a_stopping_engine_shows_its_pid_until_its_process_is_gone(manager_for: Any) -> None:
    """Found by the chaos test (issue 26): the pid was forgotten as the stop began, so for the
    grace period a live engine process was in no status row."""
    manager = await manager_for(fake_model("m", env={"FAKE_IGNORE_SIGTERM": "1"}), stop_grace_period=1.0)
    engine = manager.get("m")
    await engine.ensure_ready()
    pid = engine.pid
    stop = asyncio.ensure_future(engine.stop())
    await engine.wait_for_state(EngineState.STOPPING, timeout=5)
    assert engine.status().pid == pid and pid_alive(pid)
    await stop
    assert engine.status().pid is None and not pid_alive(pid)


async def test_crashed_engine_is_failed_then_restarted_by_next_request(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_CHILDREN": "1"}))
    engine = manager.get("m")
    await engine.ensure_ready()
    leader = psutil.Process(engine.pid)
    child = leader.children()[0].pid

    os.kill(leader.pid, signal.SIGKILL)
    await engine.wait_for_state(EngineState.FAILED, timeout=10)

    assert "exited unexpectedly" in (engine.last_error or "")
    assert not pid_alive(child), "the crashed engine's children must be reaped too"
    await engine.ensure_ready()
    assert engine.state is EngineState.READY and engine.starts == 2


async def test_health_monitor_fails_a_hung_engine(manager_for: Any) -> None:
    manager = await manager_for(
        fake_model("m"), health_check_interval=0.2, health_check_failures=2, stop_grace_period=0.5
    )
    engine = manager.get("m")
    await engine.ensure_ready()
    pid = engine.pid
    os.kill(pid, signal.SIGSTOP)  # alive but unresponsive

    await engine.wait_for_state(EngineState.FAILED, timeout=15)

    assert "unresponsive" in (engine.last_error or "")
    assert not pid_alive(pid)


async def test_stop_during_start_aborts_it(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", env={"FAKE_START_DELAY": "30"}), startup_timeout=60)
    engine = manager.get("m")
    starting = asyncio.ensure_future(engine.ensure_ready())
    await engine.wait_for_state(EngineState.STARTING, timeout=5)

    t0 = time.monotonic()
    await engine.stop()

    assert time.monotonic() - t0 < 10
    assert engine.state is EngineState.STOPPED
    with pytest.raises(EngineStartError, match="aborted"):
        await starting


@pytest.mark.parametrize("backend", ["sglang", "vllm", "llamacpp"])
async def test_each_backend_launch_line_is_accepted(manager_for: Any, backend: str) -> None:
    """The real command builders' flags must parse (the fake engine is strict)."""
    fields: dict[str, Any] = {"gpu_id": 0} if backend != "llamacpp" else {}
    manager = await manager_for(fake_model("m", backend=backend, **fields))
    engine = manager.get("m")
    await engine.ensure_ready()
    assert engine.state is EngineState.READY


async def test_launch_of_a_missing_command_is_a_start_error(manager_for: Any, tmp_path: Any) -> None:
    manager = await manager_for(fake_model("m"))
    engine = manager.get("m")
    engine._override = type(engine._override)(command=(str(tmp_path / "no-such-engine"),))
    with pytest.raises(EngineStartError, match="could not launch"):
        await engine.ensure_ready()


async def test_regression_waiter_spun_on_a_finished_transition(manager_for: Any) -> None:
    """A soak froze the daemon: a request reached ensure_ready in the same loop turn in
    which a stop task finished, before the task's done-callback cleared `_transition`.
    Awaiting a finished task does not yield, so the waiter looped on it forever and the
    callback never ran. A finished transition must never count as the current one."""
    manager = await manager_for(fake_model("m"))
    engine = manager.get("m")
    await engine.ensure_ready()
    await engine.stop()
    finished = asyncio.ensure_future(asyncio.sleep(0))
    await finished
    engine._transition = finished  # done, and its clearing callback never ran

    url = await asyncio.wait_for(engine.ensure_ready(), timeout=20)

    assert url.startswith("http://127.0.0.1:") and engine.state is EngineState.READY
