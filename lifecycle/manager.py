"""The engines of a registry: orphan reaping, health monitoring, shutdown.

The manager owns no engine state itself: each `Engine` owns its own, and each
model is a `ReplicaSet` of them (lifecycle/replicas.py). It reaps orphans before
anything starts, runs one health-monitor task (which also brings each model back
up to its `min` replicas), and on shutdown stops every engine group concurrently
and waits for all of them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backends.registry import backend_for
from config.models import EngineOverride, ModelSpec, Registry
from config.settings import Settings
from lifecycle.budget import GpuBudget
from lifecycle.capacity import Gpu
from lifecycle.engine import Engine
from lifecycle.gpus import gpus_for
from lifecycle.model_files import ModelFiles
from lifecycle.pidrecords import PidRecords
from lifecycle.probe import Prober
from lifecycle.ray_attach import reconcile
from lifecycle.ray_cluster import RayCluster
from lifecycle.replicas import ReplicaSet
from lifecycle.services import EngineServices
from lifecycle.sockets import SocketDir
from lifecycle.state import EngineEvents, EngineState, NoEvents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadReport:
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


class EngineManager:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        base_env: dict[str, str],
        events: EngineEvents | None = None,
        gpus: list[Gpu] | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._prober = Prober()
        # GPU placement: the GPUs (NVML's, capped or declared by models.yaml) and the budget.
        self.budget = GpuBudget(
            gpus_for(registry) if gpus is None else gpus,
            settings.max_loaded_models,
            lambda: list(self.all_engines()),
        )
        shared = [m.name for m in registry.models.values() if m.budgeted and m.gpu_memory is not None]
        if shared and not self.budget.gpus:
            log.warning(
                "no GPU is known (NVML sees none and models.yaml declares no gpus:): the memory shares "
                "of %s are passed to the engines but cannot be checked", ", ".join(shared),
            )  # fmt: skip
        self.pid_records = PidRecords(settings.run_dir)
        self.cluster = RayCluster(registry.cluster)  # joined only when a model is placed on Ray
        # Engines that can serve on a Unix socket (vLLM) do, in a 0700 directory of the daemon's
        # (docs/engine-security.md): made at the first such launch, removed at shutdown.
        self.sockets = SocketDir()
        self._services = services = EngineServices(
            settings=settings,
            base_env=base_env,
            prober=self._prober,
            pid_records=self.pid_records,
            model_files=ModelFiles(settings.model_cache_dir),
            log_dir=settings.log_dir,
            events=events or NoEvents(),
            budget=self.budget,
            cluster=self.cluster,
            sockets=self.sockets,
        )
        self.models: dict[str, ReplicaSet] = {
            name: ReplicaSet(spec, backend_for(spec.backend), services, self._override(spec.backend))
            for name, spec in registry.models.items()
        }
        # Which models may be started without a request (their `min` replicas): not a disabled
        # one, nor a GPU model while the daemon runs in cpu mode (main.py sets it).
        self.may_start: Callable[[ModelSpec], bool] = lambda spec: spec.name not in self.registry.disabled
        self._monitor: asyncio.Task[None] | None = None
        self._misses: dict[str, int] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def _override(self, backend: str) -> EngineOverride | None:
        """models.yaml `engines:` first, then the <BACKEND>_COMMAND setting."""
        if backend in self.registry.engines:
            return self.registry.engines[backend]
        command = self.settings.engine_command(backend)
        return EngineOverride(command=command) if command else None

    def get(self, name: str) -> Engine | None:
        """A model's first replica (its only engine, unless it has `replicas:`)."""
        replicas = self.models.get(name)
        return replicas.first if replicas is not None else None

    def all_engines(self) -> Iterator[Engine]:
        for replicas in list(self.models.values()):
            yield from replicas.engines

    def maintain(self) -> None:
        """Bring every model up to its `min` replicas."""
        for replicas in self.models.values():
            replicas.maintain(self.may_start)

    async def start(self) -> None:
        """Reap engines left by a daemon that died hard, then start monitoring."""
        reaped = await self.pid_records.reap_orphans(self.settings.stop_grace_period)
        if reaped:
            log.warning("reaped %d orphaned engine group(s)", len(reaped))
        atexit.register(self._kill_all_now)
        if self.cluster.connected:
            engines = {e.key: e for e in self.all_engines()}
            kept, stopped = await reconcile(self.cluster, engines)
            if kept or stopped:
                log.info(
                    "Ray engines of a previous daemon: %d re-attached, %d stopped", len(kept), len(stopped)
                )
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_health(), name="health-monitor")
        self.maintain()
        self.preload()

    def connect_cluster(self, registry: Registry | None = None) -> None:
        """Join the Ray cluster when `registry` (the current one) places a model on it
        (blocking, once; RayUnavailable when it cannot)."""
        registry = registry or self.registry
        self.cluster.configure(registry.cluster)
        if any(m.placement == "ray" for m in registry.models.values()):
            self.cluster.connect()

    def preload(self) -> None:
        """Start the `preload` models (their `min` replicas, at least one) in the background."""
        for replicas in self.models.values():
            spec = replicas.spec
            if spec.preload and self.may_start(spec):
                for engine in replicas.engines[: max(1, spec.replica_range[0])]:
                    if engine.startable and not engine.up:
                        replicas.start_replica(engine.replica)

    def not_ready(self) -> list[str]:
        """The `preload` models none of whose replicas has been ready yet (/health?ready=1)."""
        return [
            name
            for name, replicas in self.models.items()
            if replicas.spec.preload and self.may_start(replicas.spec)
            and not any(e.ready_once for e in replicas.engines)
        ]  # fmt: skip

    def reload(self, registry: Registry, gpus: list[Gpu] | None = None) -> ReloadReport:
        """Switch to a validated registry; takes effect for the next request.

        Added models can be used at once. Removed ones vanish from the
        registry at once (new requests: MODEL_NOT_FOUND) while their engines
        drain — requests in flight finish, up to SHUTDOWN_GRACE_PERIOD — and
        stop. Changed ones take the new entry when stopped, or restart as
        soon as they are idle. In-flight requests are never cut off by a reload.
        """
        old = self.registry
        self.registry = registry
        if gpus is not None:
            self.budget.configure(gpus)
        added = [n for n in registry.models if n not in old.models]
        removed = [n for n in old.models if n not in registry.models]
        changed, unchanged = [], []
        for name, spec in registry.models.items():
            if name in added:
                continue
            replicas = self.models[name]
            override = self._override(spec.backend)
            if spec == replicas.spec and override == replicas.first.override:
                unchanged.append(name)
            else:
                changed.append(name)
                for engine in replicas.replace_spec(spec, backend_for(spec.backend), override):
                    self._retire(engine)  # past the new `max`
        for name in added:
            spec = registry.models[name]
            self.models[name] = ReplicaSet(
                spec, backend_for(spec.backend), self._services, self._override(spec.backend)
            )
        for name in removed:
            gone = self.models.pop(name)
            gone.queue.close(f"Model '{name}' was removed from the registry while this request waited")
            for engine in gone.engines:
                self._retire(engine)
        self.maintain()
        self.preload()
        return ReloadReport(added=added, removed=removed, changed=changed, unchanged=unchanged)

    def _retire(self, engine: Engine) -> None:
        """Drain and stop an engine no longer in the registry (requests in flight finish)."""
        task = asyncio.get_running_loop().create_task(engine.stop(drain=self.settings.shutdown_grace_period))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def shutdown(self) -> None:
        """Stop every engine group and wait until all are gone."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for replicas in self.models.values():
            replicas.queue.close("The daemon is shutting down")
        stops = [engine.stop() for engine in self.all_engines()]
        await asyncio.gather(*stops, *self._retiring, return_exceptions=True)
        await self._prober.close()
        self.sockets.remove()
        atexit.unregister(self._kill_all_now)

    def _kill_all_now(self) -> None:
        # Only reached if the interpreter exits without `shutdown()` running.
        for engine in self.all_engines():
            engine.kill_now()

    # --------------------------------------------------------- health monitor

    async def _monitor_health(self) -> None:
        """Every HEALTH_CHECK_INTERVAL, probe each READY engine's liveness route.

        A dead process is caught at once by the engine's own exit watcher;
        this catches the hung ones. After `failures_allowed` missed probes in
        a row the engine is killed and marked FAILED; the next request
        starts a fresh one.
        """
        interval = self.settings.health_check_interval
        while True:
            await asyncio.sleep(interval)
            ready = [e for e in self.all_engines() if e.state is EngineState.READY]
            results = await asyncio.gather(*(self._probe(e, interval) for e in ready))
            for engine, ok in zip(ready, results, strict=True):
                self._note(engine, ok)
            self.maintain()

    async def _probe(self, engine: Engine, interval: float) -> bool:
        url = engine.base_url + engine.backend.liveness_path
        return await self._prober.ok(url, timeout=max(interval, 1.0), api_key=engine.api_key)

    def _note(self, engine: Engine, ok: bool) -> None:
        if ok or engine.state is not EngineState.READY:
            self._misses.pop(engine.key, None)
            return
        misses = self._misses.get(engine.key, 0) + 1
        self._misses[engine.key] = misses
        if misses >= self.settings.health_check_failures:
            self._misses.pop(engine.key, None)
            engine.mark_failed(f"engine unresponsive: {misses} health checks failed in a row")
