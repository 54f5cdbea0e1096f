"""A model's replicas as a set, with real engine subprocesses (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lifecycle.state import EngineState
from tests.helpers import fake_model

pytestmark = pytest.mark.anyio


async def test_idle_timers_firing_together_stop_down_to_min_and_no_further(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", replicas={"min": 1, "max": 3}, idle_timeout=300))
    replicas = manager.models["m"]
    await asyncio.gather(*(e.ensure_ready() for e in replicas.engines))
    # All three idle timers fire in one event-loop step: each stop's task has not run yet
    # when the next timer asks whether its replica may stop.
    for engine in replicas.engines:
        engine._on_idle()
    await asyncio.gather(*(e.wait_for_state(EngineState.STOPPED, EngineState.READY, timeout=10)
                           for e in replicas.engines))  # fmt: skip
    states = [e.state for e in replicas.engines]
    assert states.count(EngineState.READY) == 1 and states.count(EngineState.STOPPED) == 2, states


async def test_min_replicas_start_with_the_manager_and_come_back_after_a_crash(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m", replicas=2), health_check_interval=0.2)
    replicas = manager.models["m"]
    for engine in replicas.engines:
        await engine.wait_for_state(EngineState.READY, timeout=30)
    crashed = replicas.engines[1]
    assert crashed.pid is not None
    crashed.kill_now()
    await crashed.wait_for_state(EngineState.FAILED, timeout=10)
    await crashed.wait_for_state(EngineState.READY, timeout=30)  # the health monitor restores min
    assert crashed.starts == 2 and replicas.engines[0].starts == 1
    await replicas.stop(hold=True)  # an operator's stop holds: min is not restored
    manager.maintain()
    assert [e.state for e in replicas.engines] == [EngineState.STOPPED, EngineState.STOPPED]


async def test_a_reload_grows_and_shrinks_the_set_stopping_only_the_replicas_past_max(
    manager_for: Any, tmp_path: Any
) -> None:
    from config.models import parse_registry
    from tests.helpers import registry_doc

    manager = await manager_for(fake_model("m", replicas=3))
    replicas = manager.models["m"]
    for engine in replicas.engines:
        await engine.wait_for_state(EngineState.READY, timeout=30)
    first, third = replicas.engines[0], replicas.engines[2]
    doc = registry_doc(fake_model("m", replicas={"min": 1, "max": 2}))
    report = manager.reload(parse_registry(doc, tmp_path / "models.yaml"))
    assert report.changed == ["m"] and len(replicas.engines) == 2
    await third.wait_for_state(EngineState.STOPPED, timeout=30)  # past the new max: drained and stopped
    assert third.pid is None
    assert first.state is EngineState.READY and first.starts == 1  # replicas changed, not its process
    grown = registry_doc(fake_model("m", replicas=4))
    manager.reload(parse_registry(grown, tmp_path / "models.yaml"))
    assert [e.replica for e in replicas.engines] == [0, 1, 2, 3]
    for engine in replicas.engines:  # the new min (4) is brought up
        await engine.wait_for_state(EngineState.READY, timeout=30)
    assert (
        sorted({e.pid for e in replicas.engines if e.pid is not None})
        and len({e.pid for e in replicas.engines}) == 4
    )
