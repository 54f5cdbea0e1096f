"""GPU room: carries out the placement policy (lifecycle/capacity.py) for the engines.

An engine about to start or wake calls `reserve()`. Its reservation (the GPUs
it was placed on, `engine.placed`) counts from then until `release()`: after
its process group is gone, or once it has gone to sleep.

Invariants:

- One placement at a time (`_lock`): a plan is made and carried out — its
  victims evicted and gone — before the next one is made, so two engines
  waiting for room never evict two victims where one would do, and a plan never
  counts room that another has just taken. N requests for one model share its
  one start (lifecycle/engine.py), hence one placement: one eviction, one start.
- Only idle engines are evicted: the policy is given `evictable` as the engine
  says it is in the same step (no await between snapshot and `evict()`), and
  `evict()` re-checks it, so a request that takes a lease first wins.
- A plan that finds only busy holders waits for a change (a release, or an
  engine going idle) and plans again, until STARTUP_TIMEOUT; then the start
  fails with EngineNoRoom (429 GPU_OVERLOADED naming the holders).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from config.models import ModelSpec
from lifecycle.capacity import Ask, Evict, Gpu, Holder, Place, Wait, plan, reserved
from lifecycle.state import EngineError, EngineStartError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1.0
EVICTION_WAIT = 60.0  # an eviction's stop is bounded by STOP_GRACE_PERIOD; this is a backstop


class EngineNoRoom(EngineError):
    """No room on the GPUs: only busy or pinned engines hold it."""

    def __init__(self, model: str, message: str, holders: Sequence[str]) -> None:
        super().__init__(model, message)
        self.holders = list(holders)
        self.retry_after = RETRY_AFTER_SECONDS


class Placeable(Protocol):
    """What the budget needs of an engine (lifecycle/engine.py)."""

    spec: ModelSpec
    placed: tuple[int, ...] | None
    bound: tuple[int, ...] | None  # the GPUs its (sleeping) process is bound to
    last_used: float | None
    key: str  # the model's name, or "<model>#<replica>" for replicas past the first

    @property
    def name(self) -> str: ...
    @property
    def evictable(self) -> bool: ...
    def evict(self, action: str) -> asyncio.Task[None] | None: ...


class GpuBudget:
    def __init__(
        self, gpus: Sequence[Gpu], max_loaded: int, engines: Callable[[], Iterable[Placeable]]
    ) -> None:
        self.gpus = list(gpus)
        self.max_loaded = max_loaded
        self._engines = engines
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._waiters = 0  # placements waiting for room (only they need to hear of changes)

    def configure(self, gpus: Sequence[Gpu]) -> None:
        """A reload's inventory (a changed `gpus:` declaration)."""
        self.gpus = list(gpus)
        self.changed()

    # ------------------------------------------------------------- snapshot

    def holders(self) -> list[Holder]:
        return [
            Holder(
                name=e.key,
                holds=e.placed is not None,
                gpus=e.placed or (),
                share=e.spec.share,
                evictable=e.evictable,
                last_used=e.last_used or 0.0,
                sleeps=e.spec.on_idle == "sleep",
                model=e.name,
            )
            for e in self._engines()
            if e.spec.budgeted
        ]

    def decide(self, engine: Placeable) -> Place | Evict | Wait:
        spec = engine.spec
        if engine.bound:  # a wake: where its process is, whatever the model's entry allows
            ask = Ask(engine.key, spec.share, engine.bound, 0, spec.name)
        else:
            count = spec.gpus_per_replica if spec.pooled else 0
            ask = Ask(engine.key, spec.share, spec.gpu_ids, count, spec.name)
        return plan(ask, self.holders(), self.gpus, self.max_loaded)

    def has_room(self, engine: Placeable) -> bool:
        """Could `engine` start now, evicting idle engines if need be? (For offload at once.)"""
        return not isinstance(self.decide(engine), Wait)

    def changed(self) -> None:
        """Room may have appeared (a release, an engine gone idle): waiters plan again.
        Called at the end of every request on a GPU engine, so it costs nothing unless a
        placement waits (a waiter takes the event and counts itself in the same step)."""
        if self._waiters:
            self._changed.set()
            self._changed = asyncio.Event()

    def release(self, engine: Placeable) -> None:
        if engine.placed is not None:
            engine.placed = None
            self.changed()

    # --------------------------------------------------------------- reserve

    async def reserve(self, engine: Placeable, timeout: float, abort: asyncio.Event) -> tuple[int, ...]:
        """Place `engine` (setting `engine.placed`), evicting idle engines if need be."""
        deadline = time.monotonic() + timeout
        while True:
            async with self._lock:
                decision = self.decide(engine)
                while isinstance(decision, Evict):
                    await self._evict(decision, deadline)
                    decision = self.decide(engine)
                if isinstance(decision, Place):
                    engine.placed = decision.gpus
                    return decision.gpus
                changed = self._changed
                self._waiters += 1
            try:
                woke = await self._wait(changed, abort, deadline)
            finally:
                self._waiters -= 1
            if not woke:
                if abort.is_set():
                    raise EngineStartError(engine.name, f"model '{engine.name}': start aborted", [])
                raise EngineNoRoom(engine.name, self._no_room(engine, decision), decision.holders)

    async def _evict(self, decision: Evict, deadline: float) -> None:
        engines = {e.key: e for e in self._engines()}
        tasks = []
        for name, action in decision.victims:
            victim = engines.get(name)
            task = victim.evict(action) if victim is not None else None
            if task is not None:
                log.info("evicting '%s' (%s) to make room on GPU %s", name, action, list(decision.gpus))
                tasks.append(task)
        if tasks:
            wait = max(1.0, min(EVICTION_WAIT, deadline - time.monotonic()))
            await asyncio.wait([asyncio.ensure_future(asyncio.shield(t)) for t in tasks], timeout=wait)
        else:  # cannot happen (the plan and the evictions share one step); never spin the loop
            await asyncio.sleep(0)

    @staticmethod
    async def _wait(changed: asyncio.Event, abort: asyncio.Event, deadline: float) -> bool:
        """Until room may have appeared (True), or the deadline or an abort (False)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or abort.is_set():
            return False
        waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(abort.wait())]
        try:
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
        return changed.is_set() and not abort.is_set()

    def _no_room(self, engine: Placeable, decision: Wait) -> str:
        spec, gpus = engine.spec, engine.bound or engine.spec.gpu_ids
        where = f"GPU {', '.join(str(g) for g in gpus)}" if gpus else "any GPU"
        held = ", ".join(f"'{n}'" for n in decision.holders) or "nothing"
        limit = f" (MAX_LOADED_MODELS={self.max_loaded})" if self.max_loaded else ""
        return (
            f"no room for model '{spec.name}' (gpu_memory {spec.share:g}) on {where}{limit}: "
            f"held by busy or pinned models {held}"
        )

    def describe(self, gpus: Iterable[int]) -> str:
        """What the daemon has placed on `gpus`, for an out-of-memory error."""
        holders = self.holders()
        parts = []
        for g in gpus:
            on = [f"'{h.name}' ({h.share:g})" for h in holders if h.holds and g in h.gpus]
            parts.append(f"GPU {g}: {reserved(g, holders):g} reserved by {', '.join(on) or 'no model'}")
        return "; ".join(parts)
