"""One model as a set of replicas: an Engine per replica, and how a request picks one.

A model without `replicas:` is a set of one, and behaves as it always has. With
`replicas: N` the set keeps N running; with `replicas: {min, max}` it keeps `min`
running and grows towards `max` when every running replica holds
OFFLOAD_QUEUE_THRESHOLD requests. The decision is router/scaling.py's (pure); this
module takes the snapshot and acts on the answer in the same event-loop step.

Invariants:

- Each replica is a whole Engine: its own lifecycle, idle timer, health, pid record,
  log file (`<model>#<i>.log` past the first) and GPU placement. The set adds only
  what spans them: the turn counter, the hash ring, the waiters, the `min` floor.
- One start for a burst: a scale-up start is begun only when no replica is starting
  (the decision says Wait while one is), so N overflowing requests start one replica.
- A request that waits for a replica to free is told of every release and every state
  change of every replica (`Engine.on_change`); it re-decides then, so it is served by
  whichever frees first, a running replica or the new one.
- An idle replica stops only while at least `min` others stay up (`may_idle_stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from backends.base import Backend
from config.models import EngineOverride, ModelSpec
from lifecycle.admission import AdmissionQueue
from lifecycle.capacity import Place
from lifecycle.engine import Engine
from lifecycle.services import EngineServices
from lifecycle.state import EngineError, EngineState, EngineStatus
from router.balance import HashRing
from router.scaling import Decision, Overflow, Serve, Start, View, decide, least_loaded_any

log = logging.getLogger(__name__)


class ReplicaSet:
    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        services: EngineServices,
        override: EngineOverride | None = None,
    ) -> None:
        self._services = services
        self.spec = spec
        self.engines: list[Engine] = []
        self._turn = 0
        self._ring_ids: tuple[int, ...] = ()
        self._ring = HashRing(())
        self.waiting = 0  # requests waiting for a replica to free
        self._changed = asyncio.Event()
        self._starts: set[asyncio.Task[None]] = set()
        self.single = True  # one engine: the request path skips the set's decision
        # An operator stopped the model: `min` is not restored until a request or a start.
        self.held = False
        # Requests waiting for a slot when every replica is full (QUEUE_TIMEOUT > 0).
        self.queue = AdmissionQueue(spec.name, self.engines, services.events)
        self._resize(spec, backend, override)

    # ----------------------------------------------------------------- shape

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def first(self) -> Engine:
        return self.engines[0]

    def _resize(self, spec: ModelSpec, backend: Backend, override: EngineOverride | None) -> list[Engine]:
        """Grow or shrink to `spec`'s `max`; return the replicas removed (the caller stops them)."""
        self.spec = spec
        want = spec.replica_range[1]
        while len(self.engines) < want:
            engine = Engine(spec, backend, self._services, override, replica=len(self.engines))
            engine.may_idle_stop = self._may_idle_stop
            self.engines.append(engine)
        removed = self.engines[want:]
        del self.engines[want:]
        self.single = want == 1
        for engine in self.engines:  # only a set of several has requests waiting for a replica
            engine.on_change = None if self.single else self._on_change
        return removed

    def replace_spec(
        self, spec: ModelSpec, backend: Backend, override: EngineOverride | None
    ) -> list[Engine]:
        """A changed models.yaml entry: each kept replica takes it (at once if stopped, else
        when idle; at once when only `replicas` or `routing` changed, which touch no process);
        replicas past the new `max` are returned for the caller to drain and stop."""
        old = self.spec
        unchanged = spec.model_copy(update={"replicas": old.replicas, "routing": old.routing}) == old
        same_process = unchanged and override == self.first.override
        for engine in self.engines[: spec.replica_range[1]]:
            if same_process:
                engine.adopt(spec)
            else:
                engine.replace_spec(spec, backend, override)
        return self._resize(spec, backend, override)

    # ----------------------------------------------------------- the snapshot

    def _on_change(self) -> None:
        if self.waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    def _may_idle_stop(self, engine: Engine) -> bool:
        floor = self.spec.replica_range[0]
        return sum(1 for e in self.engines if e is not engine and e.up) >= floor

    def views(self) -> list[View]:
        out = []
        for e in self.engines:
            status = "ready" if e.ready else "starting" if e.up else "idle"
            asleep = e.state is EngineState.SLEEPING
            out.append(View(e.replica, status, e.in_flight, e.startable, asleep))  # type: ignore[arg-type]
        return out

    def _ring_for(self, views: list[View]) -> HashRing:
        ids = tuple(v.id for v in views if v.status == "ready")
        if ids != self._ring_ids:  # a replica joined or left: only its keys move
            self._ring_ids, self._ring = ids, HashRing(ids)
        return self._ring

    def decide(self, key: str | None, cap: float) -> Decision:
        views = self.views()
        ring = self._ring_for(views) if self.spec.routing == "prefix_affinity" else None
        self._turn += 1
        return decide(views, policy=self.spec.routing, cap=cap, turn=self._turn, key=key, ring=ring)

    # ---------------------------------------------------------------- acting

    def start_replica(self, replica: int, *, force: bool = False) -> asyncio.Task[None]:
        """Start (or wake) a replica in the background; its failure is logged, and the
        requests waiting re-decide when its state changes."""
        engine = self.engines[replica]

        async def run() -> None:
            try:
                await engine.ensure_ready(force=force)
            except EngineError as exc:
                log.warning("replica %d of model '%s' did not start: %s", replica, self.name, exc.message)

        task = asyncio.get_running_loop().create_task(run(), name=f"replica-start:{engine.key}")
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)
        return task

    def has_room(self, replica: int) -> bool:
        budget = self._services.budget
        engine = self.engines[replica]
        if not engine.process.may_place:  # a Ray placement timed out a moment ago
            return False
        return not self.spec.budgeted or budget is None or budget.has_room(engine)

    def route(self, key: str | None, cap: float) -> Decision:
        """Decide, and begin a scale-up start the decision asks for (when it has room)."""
        self.held = False
        decision = self.decide(key, cap)
        if isinstance(decision, Start) and decision.wait:
            if not self.has_room(decision.replica):
                return Overflow()
            self.start_replica(decision.replica)
        return decision

    async def wait_for_replica(
        self, key: str | None, cap: float, timeout: float, scaled: Callable[[], None]
    ) -> Decision:
        """Wait until a replica can take the request (Serve, or Start without waiting: a
        cold replica it will wait for), or the set overflows (Overflow), for up to `timeout`.
        `scaled` is told when the wait begins a scale-up start."""
        deadline = time.monotonic() + timeout
        while True:
            decision = self.route(key, cap)
            if isinstance(decision, Start) and decision.wait:
                scaled()
            if isinstance(decision, Serve | Overflow) or (isinstance(decision, Start) and not decision.wait):
                return decision
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Overflow()
            changed = self._changed
            self.waiting += 1
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
            finally:
                self.waiting -= 1

    def any_replica(self, key: str | None) -> Engine:
        """For a CPU model (or a twin): never refused; below `max` a new replica is started
        for the overflow, which meanwhile queues on the least loaded running one."""
        decision = self.route(key, float(self._services.settings.offload_queue_threshold))
        if isinstance(decision, Serve) or (isinstance(decision, Start) and not decision.wait):
            return self.engines[decision.replica]
        chosen = least_loaded_any(self.views())
        return self.engines[chosen if chosen is not None else 0]

    def maintain(self, allowed: Callable[[ModelSpec], bool]) -> int:
        """Start replicas until `min` are up (at start-up, after a crash, after a reload);
        returns how many starts were begun. Not while an operator holds the model stopped,
        and a GPU replica only where it fits without evicting anything (else an evicted
        replica, restarted, would evict in turn: churn)."""
        floor = self.spec.replica_range[0]
        up = sum(1 for e in self.engines if e.up)
        begun = 0
        if self.held or not floor or up >= floor or not allowed(self.spec):
            return 0
        budget = self._services.budget if self.spec.budgeted else None
        for engine in self.engines:
            if up + begun >= floor:
                break
            if engine.startable and (budget is None or isinstance(budget.decide(engine), Place)):
                self.start_replica(engine.replica)
                begun += 1
        return begun

    async def stop(self, *, drain: float = 0.0, hold: bool = False) -> None:
        """Stop every replica; `hold` (an operator's stop): keep them stopped, `min` included,
        until the next request or start."""
        self.held = self.held or hold
        await asyncio.gather(*(e.stop(drain=drain) for e in self.engines))

    # ----------------------------------------------------------------- views

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.engines)

    @property
    def state(self) -> EngineState:
        """The model's state: its best replica's (ready over waking/starting over sleeping ...)."""
        states = {e.state for e in self.engines}
        for s in ORDER:
            if s in states:
                return s
        return EngineState.STOPPED

    def statuses(self) -> list[EngineStatus]:
        return [e.status() for e in self.engines]


ORDER = (
    EngineState.READY, EngineState.WAKING, EngineState.STARTING, EngineState.SLEEPING,
    EngineState.STOPPING, EngineState.FAILED, EngineState.STOPPED,
)  # fmt: skip
