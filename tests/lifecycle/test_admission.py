"""A model's admission queue (lifecycle/admission.py) on its real Engine objects: hand-off
on release, deadlines from the shared Ticker, and a waiter cancelled in the instant it was
admitted. Leases are taken by hand, so no process needs to run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lifecycle.admission import QueueClosed, QueueTimeout
from router.ticker import Ticker
from tests.helpers import fake_model

pytestmark = pytest.mark.anyio
NORMAL = 1


async def test_a_release_hands_the_slot_over_in_the_same_step(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m"))
    replicas = manager.models["m"]
    engine, queue, ticker = replicas.first, replicas.queue, Ticker()
    leases = [engine.acquire() for _ in range(2)]
    first = queue.join("a", NORMAL, 1.0, 1.0, timeout=30, cap=2, ticker=ticker)
    second = queue.join("b", NORMAL, 1.0, 1.0, timeout=30, cap=2, ticker=ticker)
    leases[0].release()
    # Handed over before anything else could run: the engine never showed a free slot.
    assert engine.in_flight == 2 and first.future.done() and queue.waiting == 1
    got_engine, lease = await queue.wait(first)
    assert got_engine is engine
    lease.release()
    assert second.future.done() and engine.in_flight == 2 and queue.waiting == 0
    (await queue.wait(second))[1].release()
    leases[1].release()
    assert engine.in_flight == 0 and engine.on_release is not None
    deadline = asyncio.get_running_loop().time() + 2
    while engine.on_release is not None:  # the ticker's next look finds nothing waiting
        assert asyncio.get_running_loop().time() < deadline, "the hook outlived the queue"
        await asyncio.sleep(0.005)
    ticker.close()


async def test_a_waiter_cancelled_as_it_was_admitted_passes_the_slot_on(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m"))
    replicas = manager.models["m"]
    engine, queue, ticker = replicas.first, replicas.queue, Ticker()
    lease = engine.acquire()
    first = queue.join("a", NORMAL, 1.0, 1.0, timeout=30, cap=1, ticker=ticker)
    second = queue.join("b", NORMAL, 1.0, 1.0, timeout=30, cap=1, ticker=ticker)
    waiter = asyncio.ensure_future(queue.wait(first))
    await asyncio.sleep(0)  # it awaits its ticket
    lease.release()  # first is admitted ...
    waiter.cancel()  # ... and its client leaves before its task runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert second.future.done(), "the slot first gave back went to the next waiter"
    assert engine.in_flight == 1
    (await queue.wait(second))[1].release()
    assert engine.in_flight == 0
    ticker.close()


async def test_deadlines_and_closing(manager_for: Any) -> None:
    manager = await manager_for(fake_model("m"))
    replicas = manager.models["m"]
    engine, queue, ticker = replicas.first, replicas.queue, Ticker()
    lease = engine.acquire()
    late = queue.join("a", NORMAL, 1.0, 1.0, timeout=0.1, cap=1, ticker=ticker)
    with pytest.raises(QueueTimeout) as timed_out:
        await asyncio.wait_for(queue.wait(late), 5)
    assert timed_out.value.retry_after >= 1 and "queue_timeout" in timed_out.value.message
    assert queue.waiting == 0 and engine.in_flight == 1
    kept = queue.join("a", NORMAL, 1.0, 1.0, timeout=30, cap=1, ticker=ticker)
    queue.close("gone")
    with pytest.raises(QueueClosed, match="gone"):
        await queue.wait(kept)
    lease.release()
    assert engine.in_flight == 0
    ticker.close()
