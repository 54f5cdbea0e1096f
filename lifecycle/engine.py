"""One engine (a model's, or one replica of it): the single owner of its state and intent.

How its process is started, probed, stopped and where it listens is its placement's
(`self.process`, lifecycle/placement.py: a local process group today); a model with
replicas is a set of engines (lifecycle/replicas.py).

Invariants (the reasons are peers' bugs, see ANCHORS.md):

- At most one *transition* (a start or a stop) runs at a time, as the task
  in `_transition`. A caller that needs one creates it when none runs and
  otherwise waits for the one that does, so N simultaneous first requests
  share one start and all see its one outcome. Callers are shielded: a
  client that goes away never cancels a start that others wait for.
- Every state change goes through `_set()`, which enforces TRANSITIONS.
  Outside a transition only one change happens: READY -> (a stop task) when
  the process exits on its own or the health monitor gives up on it.
- A lease counts a request from before `ensure_ready` until its last byte.
  The idle timer is armed only when `in_flight` falls to 0 while READY and is
  disarmed by any new lease; the idle stop re-checks `in_flight`, so an
  engine is never stopped for idleness while it serves (llama-swap #25).
- A request that arrives during a stop waits for that stop and then starts
  the engine again; it never hangs on a racing stop (llama-swap #946).
- Draining (an operator's stop, a removed model) refuses new requests and
  waits for the ones in flight before the stop; a changed models.yaml entry
  is applied when the engine is stopped, or as soon as it is idle.
- A GPU engine is placed (lifecycle/budget.py) inside its start or wake
  transition, before it takes any memory; `placed` holds its reservation
  until its process group is gone or it sleeps. A process is bound to the
  GPUs it was launched on (`bound`), so a wake is placed on those alone.
  Waiting for room happens in the state it had (STOPPED, FAILED, SLEEPING),
  so a failed placement changes nothing but the answer (429 GPU_OVERLOADED).
- Sleep and eviction only ever take an idle engine (`evictable`): a lease
  taken first makes it not evictable in the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from backends.base import Backend, SleepRoutes
from config.models import EngineOverride, ModelSpec
from config.settings import resolve_timeouts
from lifecycle.gpus import describe_processes, gpu_processes
from lifecycle.placement import LocalPlacement, Placement
from lifecycle.process import LogTail
from lifecycle.ray_placement import RayPlacement
from lifecycle.services import EngineServices
from lifecycle.state import (
    EngineBackingOff,
    EngineDraining,
    EngineError,
    EngineQueueFull,
    EngineStartError,
    EngineState,
    EngineStatus,
    check_transition,
)
from router.policy import ready_eta

log = logging.getLogger(__name__)

# An engine that stayed up this long before it failed had recovered: its earlier
# failures no longer count towards the back-off.
STABLE_AFTER = 60.0
ERROR_TAIL_LINES = 15
BACKOFF_CAP = 60.0
SLEEP_CALL_TIMEOUT = 60.0  # an engine's sleep route frees memory; it should not take longer
# What the engines print when the card cannot hold them: torch, vLLM's start-up memory
# check ("Free memory on device ... is less than desired GPU memory utilization"), SGLang's.
OUT_OF_MEMORY = ("out of memory", "outofmemoryerror", "less than desired gpu memory", "not enough memory")


def backoff_delay(failures: int) -> float:
    """Seconds before the next automatic start: none after the first failure, then 1, 2, 4 … 60."""
    return 0.0 if failures <= 1 else min(BACKOFF_CAP, 2.0 ** (failures - 2))


class Lease:
    """One request in flight on an engine; release it exactly once (idempotent)."""

    def __init__(self, engine: Engine) -> None:
        self._engine: Engine | None = engine

    def release(self) -> None:
        if self._engine is not None:
            self._engine._release()
            self._engine = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Engine:
    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        services: EngineServices,
        override: EngineOverride | None = None,
        replica: int = 0,
    ) -> None:
        self._services = services
        self.replica = replica
        # Unique among all engines (pid records, log file, GPU holders): the model's name for
        # its first replica, as before replicas existed.
        self.key = spec.name if replica == 0 else f"{spec.name}#{replica}"
        self._configure(spec, backend, override)
        self.log = LogTail(services.log_dir / f"{self.key}.log")
        self.process = self._placement(spec)  # how and where it runs
        self.api_key: str | None = None  # this launch's key; only the daemon knows it
        self.keep_alive = 0.0  # how long this launch keeps an idle connection open
        self._state = EngineState.STOPPED
        self._changed = asyncio.Condition()
        self._transition: asyncio.Task[None] | None = None
        self._abort = asyncio.Event()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._pending: tuple[ModelSpec, Backend, EngineOverride | None] | None = None
        self.waiting = 0  # requests inside ensure_ready, waiting for a transition
        self.in_flight = 0
        self.starts = 0
        self.failures = 0  # in a row: reset once the engine proves healthy, not merely when it starts
        self._ready_since: float | None = None  # monotonic time of the last READY
        self.last_used: float | None = None
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.placed: tuple[int, ...] | None = None  # GPUs it holds memory on (lifecycle/budget.py)
        # GPUs its process is bound to (CUDA_VISIBLE_DEVICES at launch), from launch until the
        # process is gone: asleep it holds no memory, yet it can wake only there.
        self.bound: tuple[int, ...] | None = None
        self.sleeps = 0
        self.wakes = 0
        self.ready_once = False  # has been ready since the daemon started (/health?ready=1)
        # The start or wake in progress: when it began, and how long the last one of its kind
        # took (what a caller turned away meanwhile is told to wait: `ready_in`).
        self._coming: tuple[str, float] | None = None
        self._took: dict[str, float] = {}
        # Set by its ReplicaSet: told of every release and state change (requests waiting for
        # a replica to free), and asked before an idle stop (False: keep it, the model's `min`).
        self.on_change: Callable[[], None] | None = None
        # Set by its model's admission queue while requests wait (lifecycle/admission.py):
        # told of every release first, so that it hands the slot over in the same step.
        self.on_release: Callable[[Engine], None] | None = None
        self.may_idle_stop: Callable[[Engine], bool] | None = None

    def _configure(self, spec: ModelSpec, backend: Backend, override: EngineOverride | None) -> None:
        settings = self._services.settings
        self.spec = spec
        self.backend = backend
        # Placed on the GPUs by the budget (a plain attribute: read at the end of every request).
        self._budget = self._services.budget if spec.budgeted else None
        self._override = override
        self.timeouts = resolve_timeouts(spec.timeouts, settings)
        self.max_waiting = spec.max_queued_requests or settings.max_queued_requests

    def _placement(self, spec: ModelSpec) -> Placement:
        if spec.placement == "ray":
            cluster = self._services.cluster
            assert cluster is not None, "a Ray model without a cluster (models.yaml validation)"
            return RayPlacement(self.key, self._services, self.log, cluster)
        return LocalPlacement(self.key, self._services, self.log)

    # ------------------------------------------------------------------ views

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def override(self) -> EngineOverride | None:
        return self._override

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def idle_timeout(self) -> float:
        if self.spec.idle_timeout is not None:
            return self.spec.idle_timeout
        return self._services.settings.default_idle_timeout

    @property
    def sleep_timeout(self) -> float:
        if self.spec.sleep_timeout is not None:
            return self.spec.sleep_timeout
        return self._services.settings.default_sleep_timeout

    @property
    def idle_ready(self) -> bool:
        """Ready, nothing in flight or waiting, no transition, not draining."""
        return (
            self._state is EngineState.READY
            and self.in_flight == 0
            and self.waiting == 0
            and not self._draining
            and self._current() is None
        )

    @property
    def evictable(self) -> bool:
        """Idle and ready, and not pinned: may be slept or stopped to make room."""
        return self.idle_ready and not self.spec.pinned

    @property
    def _sleep_routes(self) -> SleepRoutes | None:
        return self.backend.sleep_routes if self.spec.on_idle == "sleep" else None

    @property
    def ready(self) -> bool:
        """Ready to serve now: READY, no transition in progress."""
        return self._state is EngineState.READY and self._current() is None

    @property
    def up(self) -> bool:
        """Serving or on its way to: ready (with no stop or sleep begun: its task may not have
        run yet), or a start or wake in progress (placement included)."""
        state, busy = self._state, self._current() is not None
        if state is EngineState.READY:
            return not busy
        if state in (EngineState.STARTING, EngineState.WAKING):
            return True
        return busy and state is not EngineState.STOPPING

    @property
    def startable(self) -> bool:
        """May start (or wake) now: no process serving, no transition, not backing off."""
        if self._current() is not None or self._draining:
            return False
        if self._state is EngineState.FAILED:
            return self.retry_at is None or self.retry_at <= time.time()
        return self._state in (EngineState.STOPPED, EngineState.SLEEPING)

    def status(self) -> EngineStatus:
        return EngineStatus(
            name=self.name,
            replica=self.replica,
            queued=self.waiting,
            backend=self.spec.backend,
            state=self._state,
            pid=self.pid,
            port=self.process.port,
            in_flight=self.in_flight,
            draining=self._draining,
            starts=self.starts,
            last_used=self.last_used,
            failures=self.failures,
            last_error=self.last_error,
            retry_at=self.retry_at,
            gpu_ids=next(g for g in (self.placed, self.bound, self.spec.gpu_ids) if g is not None),
            gpu_memory=self.spec.share if self.spec.gpu_managed else None,
            pinned=self.spec.pinned,
            sleeps=self.sleeps,
            wakes=self.wakes,
            placement=self.process.kind,
            host=self.process.host if self.process.port is not None else None,
            socket=self.process.socket,
            node=self.process.node_id,
        )

    async def wait_for_state(self, *states: EngineState, timeout: float) -> EngineState:
        """Wait until the state is one of `states` (for operators' tools and tests)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._state in states), timeout)
        return self._state

    # ----------------------------------------------------------------- leases

    def acquire(self) -> Lease:
        self.in_flight += 1
        self.last_used = time.time()
        self._idle.clear()
        self._disarm_idle()
        return Lease(self)

    def _release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.time()
        if self.on_release is not None:
            self.on_release(self)
        if self.on_change is not None:
            self.on_change()
        if self.in_flight == 0:
            self._idle.set()
            self._room_changed()
            if self._pending is not None:
                self._apply_pending()
            elif self._state is EngineState.READY:
                self._arm_idle()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if self.idle_timeout > 0:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.idle_timeout, self._on_idle)

    def _arm_sleep_timeout(self) -> None:
        self._disarm_idle()
        if self.sleep_timeout > 0:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.sleep_timeout, self._on_sleep_timeout)

    def _room_changed(self) -> None:
        if self._budget is not None:
            self._budget.changed()

    def _disarm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self.may_idle_stop is not None and not self.may_idle_stop(self):
            return  # the model keeps `min` replicas running: this one stays ready
        if self.in_flight == 0 and self._state is EngineState.READY and self._current() is None:
            if self._sleep_routes is not None:
                log.info("engine '%s' idle for %.1fs: sleeping", self.name, self.idle_timeout)
                self._begin_sleep()
            else:
                log.info("engine '%s' idle for %.1fs: stopping", self.name, self.idle_timeout)
                self._begin(self._run_stop(EngineState.STOPPED, None))

    def _on_sleep_timeout(self) -> None:
        self._idle_handle = None
        if self._state is EngineState.SLEEPING and self._current() is None:
            log.info("engine '%s' asleep for %.1fs: stopping", self.name, self.sleep_timeout)
            self._begin(self._run_stop(EngineState.STOPPED, None))

    def evict(self, action: str) -> asyncio.Task[None] | None:
        """Make room: sleep (`action` "sleep", if it can) or stop this idle engine. None when
        it is no longer evictable (a request took it first)."""
        if not self.evictable:
            return None
        self._services.events.evicted(self.name, action, self.replica)
        if action == "sleep" and self._sleep_routes is not None:
            return self._begin_sleep()
        return self._begin(self._run_stop(EngineState.STOPPED, None))

    def sleep_now(self) -> asyncio.Task[None] | None:
        """An operator's sleep: only an idle, ready engine launched for sleep."""
        if self._sleep_routes is None or not self.idle_ready:
            return None
        return self._begin_sleep()

    # ---------------------------------------------------------------- intents

    async def ensure_ready(self, *, force: bool = False, max_waiting: int | None = None) -> str:
        """Return the engine's base URL once READY, starting it if needed.

        Raises EngineStartError (shared by all who waited on that start),
        EngineBackingOff while a failed engine's back-off runs (`force` skips
        it), EngineDraining while it drains, and EngineQueueFull when
        `max_waiting` requests already wait for it.
        """
        while True:
            if self._draining:
                raise EngineDraining(self.name, f"model '{self.name}' is being stopped")
            if self._state is EngineState.READY and self._current() is None:
                return self.base_url
            if max_waiting is not None and self.waiting >= max_waiting:
                raise EngineQueueFull(
                    self.name, f"{self.waiting} requests already wait for model '{self.name}' to start"
                )
            task = self._current()
            if task is None:
                if self._state is not EngineState.SLEEPING:
                    self._check_backoff(force)
                self._abort = asyncio.Event()  # before the task exists: a stop may set it at once
                wake = self._state is EngineState.SLEEPING
                # Now, not when the task first runs: a caller refused in this very step is told
                # how long the start should take (ready_in).
                self._coming = ("wake" if wake else "start", time.monotonic())
                task = self._begin(self._run_wake() if wake else self._run_start())
            self.waiting += 1
            try:
                await asyncio.shield(task)
            finally:
                self.waiting -= 1

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop the engine and wait until its whole process group is gone.

        With `drain`, new requests are refused at once and those in flight get
        up to `drain` seconds to finish before the stop. While a start or a wake
        runs nothing is being served (the requests wait for it): there is nothing
        to drain, and it is stopped at once.
        """
        if drain > 0 and self.in_flight > 0 and not self._coming_up():
            self._draining = True
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), drain)
                await self._stop_now()
            finally:
                self._draining = False
        else:
            await self._stop_now()

    def _coming_up(self) -> bool:
        """A start or a wake is in progress (its placement included)."""
        return self._current() is not None and self._state in (
            EngineState.STOPPED, EngineState.FAILED, EngineState.SLEEPING,
            EngineState.STARTING, EngineState.WAKING,
        )  # fmt: skip

    def adopt(self, spec: ModelSpec) -> None:
        """A changed entry that does not touch the process (how many replicas, routing):
        taken at once, without a restart."""
        self._configure(spec, self.backend, self._override)

    def replace_spec(self, spec: ModelSpec, backend: Backend, override: EngineOverride | None) -> None:
        """Take a changed models.yaml entry: at once if stopped, else when next idle."""
        self._pending = (spec, backend, override)
        if self.in_flight == 0:
            self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending is None or self._current() is not None:
            return
        if self._state in (EngineState.STOPPED, EngineState.FAILED):
            self._configure(*self._pending)
            self._pending = None
            self.failures, self.retry_at = 0, None
            log.info("model '%s': new configuration applied", self.name)
        elif self._state in (EngineState.READY, EngineState.SLEEPING):
            log.info("model '%s': configuration changed, restarting it while idle", self.name)
            task = self._begin(self._run_stop(EngineState.STOPPED, None))
            task.add_done_callback(lambda _: self._apply_pending())

    async def _stop_now(self) -> None:
        while (task := self._current()) is not None:
            if self._state is not EngineState.STOPPING:  # a start, or a placement waiting for room
                self._abort.set()
            with contextlib.suppress(EngineError):
                await asyncio.shield(task)
        if self._state is EngineState.FAILED:
            self.retry_at = None
            self._set(EngineState.STOPPED)
        elif self._state in (EngineState.READY, EngineState.SLEEPING):
            await asyncio.shield(self._begin(self._run_stop(EngineState.STOPPED, None)))

    def proved_healthy(self) -> None:
        """The engine answered a request in full: its earlier failures are forgiven. (A start
        alone proves nothing: an engine that crashes on every request starts fine each time,
        and its back-off must still grow.)"""
        self.failures = 0
        self.retry_at = None

    def check_exited(self) -> bool:
        """After a refused connection: has the process died (a Ray engine's node, say)? If so,
        start the crash stop now rather than when the exit notice is processed, so a retry
        waits for a new engine."""
        if self.process.pid is None:
            return True
        code = self.process.refused()
        if code is None:
            return False
        self._stop_crashed(code)
        return True

    def _stop_crashed(self, code: int | None) -> None:
        """Leave READY at once: a request arriving now must wait for a new engine,
        not be sent to a dead port. The stop drains the last output lines."""
        if self._state in (EngineState.READY, EngineState.SLEEPING) and self._current() is None:
            self._begin(self._run_stop(EngineState.FAILED, f"engine exited unexpectedly with code {code}"))

    def mark_failed(self, reason: str) -> None:
        """The health monitor gave up on a READY engine: kill it, end FAILED."""
        if self._state is EngineState.READY and self._current() is None:
            self._begin(self._run_stop(EngineState.FAILED, reason))

    def reattach(self, actor: Any, info: dict[str, Any]) -> asyncio.Task[None]:
        """Take over the running engine a previous daemon left on the Ray cluster (its host
        actor `actor`, which said `info`): READY once it answers, without a restart."""
        return self._begin(self._run_reattach(actor, info))

    async def _run_reattach(self, actor: Any, info: dict[str, Any]) -> None:
        placement = self.process
        assert isinstance(placement, RayPlacement)
        self._set(EngineState.STARTING)
        try:
            await placement.adopt(actor, info, self.spec, self.backend, self._override)
            self.api_key, self.keep_alive = placement.api_key, placement.keep_alive
            timeout = self._services.settings.startup_timeout
            await self._await_ready(time.monotonic() + timeout, timeout)
        except Exception as exc:  # whatever the cause, it is stopped
            log.warning("engine '%s': could not re-attach (%s): stopping it", self.key, exc)
            await self._terminate()
            self._set(EngineState.STOPPED)
            return
        self._ready_since = time.monotonic()
        self._set(EngineState.READY)
        self.ready_once = True
        log.info("engine '%s' re-attached on %s (pid %s)", self.name, self.base_url, self.pid)
        assert placement.exited is not None
        asyncio.get_running_loop().create_task(self._watch_exit(placement.exited))
        if self.in_flight == 0:
            self._arm_idle()

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit."""
        self.process.kill_now()

    # ------------------------------------------------------------ transitions

    def _set(self, new: EngineState) -> None:
        check_transition(self._state, new)
        log.debug("engine '%s': %s -> %s", self.name, self._state.value, new.value)
        self._state = new
        self._room_changed()
        if self.on_change is not None:
            self.on_change()

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _current(self) -> asyncio.Task[None] | None:
        """The transition in progress. A finished task never counts: its done-callback
        (which clears `_transition`) runs only at the loop's next turn, and awaiting a
        finished task does not yield — a waiter looping on it would spin forever and
        starve that very callback (a soak run froze the daemon exactly so)."""
        task = self._transition
        return task if task is not None and not task.done() else None

    def _begin(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"engine:{self.key}")
        self._transition = task

        def done(t: asyncio.Task[None]) -> None:
            if self._transition is t:
                self._transition = None
            if not t.cancelled():
                t.exception()  # seen by waiters; never "exception was never retrieved"

        task.add_done_callback(done)
        return task

    def _check_backoff(self, force: bool) -> None:
        if self._state is not EngineState.FAILED or force or self.retry_at is None:
            return
        wait = self.retry_at - time.time()
        if wait > 0:
            raise EngineBackingOff(
                self.name,
                f"model '{self.name}' failed {self.failures} times; next start in {wait:.1f}s "
                f"(last error: {self.last_error})",
                self.retry_at,
            )

    def _record_failure(self, reason: str) -> None:
        up = time.monotonic() - self._ready_since if self._ready_since is not None else 0.0
        self._ready_since = None
        if up >= STABLE_AFTER:
            self.failures = 0
        self.failures += 1
        self.last_error = reason
        delay = backoff_delay(self.failures)
        self.retry_at = time.time() + delay if delay > 0 else None
        log.warning("engine '%s' failed (%d): %s", self.name, self.failures, reason)

    async def _place(self, began: float) -> None:
        """Reserve room on the GPUs (evicting idle engines if need be) before taking any."""
        if self._budget is not None and self.placed is None:
            timeout = self._services.settings.startup_timeout
            await self._budget.reserve(self, max(0.0, began + timeout - time.monotonic()), self._abort)

    def ready_in(self) -> float | None:
        """Seconds until the start or wake in progress is expected to end (router/policy.py's
        estimate from the last one's duration); None when none is in progress."""
        if self._coming is None or not self._coming_up():
            return None
        kind, began = self._coming
        return ready_eta(self._took.get(kind), time.monotonic() - began)

    def _came_up(self) -> None:
        if self._coming is not None:
            kind, began = self._coming
            self._took[kind] = time.monotonic() - began
            self._coming = None

    async def _run_start(self) -> None:
        began = time.monotonic()
        if self.process.kind != self.spec.placement:  # a reload moved it (it is stopped)
            self.process = self._placement(self.spec)
        await self.process.place(self.spec, self._override)  # a Ray node with room (local: here)
        await self._place(began)
        self._set(EngineState.STARTING)
        self.starts += 1
        timeout = self._services.settings.startup_timeout
        events = self._services.events
        try:
            await self._launch()
            await self._await_ready(time.monotonic() + timeout, timeout)
            ready_at = time.monotonic()
            if self.spec.warmup_request is not None:
                await self._warm_up(max(1.0, began + timeout - ready_at))
        except EngineStartError as exc:
            if self._abort.is_set():  # an operator's stop, or daemon exit, during start
                self._set(EngineState.STOPPING)
                await self._terminate()
                self._set(EngineState.STOPPED)
                events.stopped(self.name, self.spec.backend, self.replica)
                raise
            await self._terminate()
            self._record_failure(exc.message)
            self._set(EngineState.FAILED)
            events.start_failed(self.name, self.spec.backend, self.replica)
            raise
        except asyncio.CancelledError:
            self.kill_now()
            raise
        self.retry_at = None
        self._ready_since = time.monotonic()
        self._came_up()
        self._set(EngineState.READY)
        self.ready_once = True
        events.started(self.name, self.spec.backend, ready_at - began, self.replica)
        if self.spec.warmup_request is not None:
            events.warmed(self.name, time.monotonic() - ready_at, self.replica)
        log.info("engine '%s' ready on %s (pid %s)", self.name, self.base_url, self.pid)
        assert self.process.exited is not None
        asyncio.get_running_loop().create_task(self._watch_exit(self.process.exited))
        if self.in_flight == 0:
            self._arm_idle()
            if self._pending is not None:  # changed while starting: restart once this start ends
                asyncio.get_running_loop().call_soon(self._apply_pending)

    async def _warm_up(self, timeout: float) -> None:
        """One request of the daemon's own before the engine serves (models.yaml `warmup`):
        a completion, or an embedding; a failure fails the start."""
        warm = self.spec.warmup_request
        assert warm is not None
        served = self.spec.served_name
        body: dict[str, Any]
        if self.spec.type == "embedding":
            path, body = "/v1/embeddings", {"model": served, "input": warm.prompt}
        else:
            path, body = (
                "/v1/completions",
                {"model": served, "prompt": warm.prompt, "max_tokens": warm.max_tokens},
            )
        status, text = await self._services.prober.post(
            self.base_url + path, timeout, self.api_key, body, request_id=f"warmup-{self.key}"
        )
        self.log.write(f"=== warm-up request: {status}")
        if not 200 <= status < 300:
            raise self._start_error(f"the warm-up request failed ({status}): {text}")

    def _start_error(self, message: str) -> EngineStartError:
        tail = self.log.tail(ERROR_TAIL_LINES)
        text = f"model '{self.name}': {message}"
        if tail:
            text += "\nlast engine output:\n" + "\n".join(tail)
        return EngineStartError(self.name, text, tail)

    async def _launch(self) -> None:
        gpus = self.placed or ()
        self.bound = gpus if self.placed is not None else None
        await self.process.launch(self.spec, self.backend, self._override, gpus, self._start_error)
        # Read on every request: plain attributes, copied from this launch.
        self.api_key, self.keep_alive = self.process.api_key, self.process.keep_alive

    async def _await_ready(self, deadline: float, timeout: float) -> None:
        """Poll the readiness route until 2xx; fail as soon as the process exits."""
        await self.process.await_ready(
            self.backend.readiness_path, deadline, timeout, self._abort, self._start_error, self._exit_reason
        )

    async def _exit_reason(self, code: int) -> str:
        """Why the start failed. An engine that ran out of GPU memory is said to have, with what
        the daemon placed on its GPUs and, with NVML, every process using them."""
        said = "\n".join(self.log.tail(ERROR_TAIL_LINES)).lower()
        if not (self.spec.gpu_managed and any(marker in said for marker in OUT_OF_MEMORY)):
            return f"engine exited with code {code} during start"
        gpus = self.placed or self.spec.gpu_ids
        held = self._budget.describe(gpus) if self._budget is not None else ""
        seen = describe_processes(await asyncio.to_thread(gpu_processes, gpus))
        return f"out of GPU memory: the engine exited with code {code} during start ({held}{seen})"

    async def _watch_exit(self, exited: asyncio.Task[int]) -> None:
        code = await exited
        if self.process.exited is exited:
            self._stop_crashed(code)

    async def _run_stop(self, final: EngineState, reason: str | None) -> None:
        self._set(EngineState.STOPPING)
        self._disarm_idle()
        await self._terminate()
        if final is EngineState.FAILED and reason is not None:
            output = [line for line in self.log.tail(ERROR_TAIL_LINES) if not line.startswith("=== ")]
            self._record_failure(reason + (f"; last output: {output[-1]}" if output else ""))
        self._ready_since = None
        self._set(final)
        if final is EngineState.FAILED:
            self._services.events.crashed(self.name, self.spec.backend, self.replica)
        else:
            self._services.events.stopped(self.name, self.spec.backend, self.replica)

    def _begin_sleep(self) -> asyncio.Task[None]:
        self._abort = asyncio.Event()  # a stop from now on cuts the sleep call short
        return self._begin(self._run_sleep())

    async def _run_sleep(self) -> None:
        """READY -> SLEEPING: the engine gives its GPU memory back and keeps its process.
        An engine that refuses stops instead (its memory must be freed either way)."""
        routes = self._sleep_routes
        assert routes is not None
        self._set(EngineState.SLEEPING)
        self._disarm_idle()
        if not await self._call(routes.sleep, SLEEP_CALL_TIMEOUT, routes.body, "sleep", abort=self._abort):
            return
        self.sleeps += 1
        self.log.write("=== asleep: GPU memory released")
        if self._budget is not None:
            self._budget.release(self)
        self._arm_sleep_timeout()

    async def _run_wake(self) -> None:
        """SLEEPING -> WAKING -> READY once it has room again. A wake that fails stops the
        engine; the request that woke it then starts it afresh (ensure_ready loops)."""
        began = time.monotonic()
        await self._place(began)
        routes = self._sleep_routes  # the entry cannot change while asleep: a change stops it
        assert routes is not None
        self._disarm_idle()
        self._set(EngineState.WAKING)
        timeout = self._services.settings.startup_timeout
        if not await self._call(routes.wake, timeout, routes.body, "wake", abort=self._abort):
            return
        self.wakes += 1
        self._came_up()
        self._set(EngineState.READY)
        self._services.events.woke(self.name, time.monotonic() - began, self.replica)
        self.log.write("=== awake")
        if self.in_flight == 0:
            self._arm_idle()

    async def _call(
        self, path: str, timeout: float, body: object, what: str, abort: asyncio.Event | None = None
    ) -> bool:
        """POST the engine's sleep or wake route; on failure stop the engine (its memory must
        be freed, and a request then starts it afresh) and say False. A stop that sets `abort`
        meanwhile (an operator's, the daemon's, a reload's) does not wait for the call: the
        engine is stopped at once (a wake's waiters then get EngineStartError, as for a start)."""
        post = self._services.prober.post(self.base_url + path, timeout, self.api_key, body)
        answer = await post if abort is None else await _unless(abort, post)
        if answer is None:
            self.log.write(f"=== {what} aborted by a stop request: stopping")
            await self._run_stop(EngineState.STOPPED, None)  # within this transition's task
            if what == "wake":  # its waiters get what a start aborted by a stop gives them
                raise EngineStartError(self.name, f"model '{self.name}': wake aborted by a stop request", [])
            return False
        status, text = answer
        if 200 <= status < 300:
            return True
        log.warning("engine '%s' did not %s (%s %s): stopping it", self.name, what, status, text)
        self.log.write(f"=== {what} failed ({status}): stopping")
        await self._run_stop(EngineState.STOPPED, None)  # within this transition's task
        return False

    async def _terminate(self) -> None:
        """Stop the process group and forget it; its GPU memory is free again."""
        await self.process.terminate()
        self.bound = None
        if self._services.budget is not None:
            self._services.budget.release(self)  # the process group is gone: so is its memory


async def _unless(abort: asyncio.Event, call: Coroutine[Any, Any, tuple[int, str]]) -> tuple[int, str] | None:
    """`call`'s answer; None, the call cancelled, if `abort` is set first."""
    answer = asyncio.ensure_future(call)
    aborted = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait({answer, aborted}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this task cancelled (the daemon exits): the call goes too
        answer.cancel()
        raise
    finally:
        aborted.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    return None
