"""An engine placed on a Ray cluster: the same Placement as a local process, through an actor.

`place()` asks Ray for a detached, named EngineHost actor (lifecycle/ray_host.py) with the
model's resources — GPUs (`tensor_parallel_size`, 1 by default, for a GPU model), its
`ray_resources`, on its `node` when given — and waits up to `cluster.placement_timeout` for
a node to take it; an actor still pending then is killed (nothing is left waiting in the
cluster) and the start ends in EngineNoRoom, which the request path answers like a full GPU
(the CPU twin, else 429). `launch()` has the actor spawn the engine on its node, bound to
the node's IP on a port free there, with a fresh key; readiness and health are probed over
the network like a local engine's. Output comes back by polling the actor, into the same log
file as a local engine's. `terminate()` has the actor stop the engine (SIGTERM, grace,
SIGKILL of every descendant), then kills the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import orjson

from backends.base import Backend, LaunchContext
from config.models import EngineOverride, ModelSpec
from lifecycle.budget import EngineNoRoom
from lifecycle.placement import Fail, Placement, launch_key
from lifecycle.process import LogTail
from lifecycle.ray_cluster import RayCluster
from lifecycle.services import EngineServices
from lifecycle.state import EngineStartError

log = logging.getLogger(__name__)
OUTPUT_POLL = 0.5  # seconds between reads of the engine's output from its actor
LOST = -1  # the exit code of an engine whose actor (or node) died: its own code is not known


def fingerprint(spec: ModelSpec, override: EngineOverride | None) -> str:
    """What an engine was started for: a re-attached engine must match its model's entry."""
    doc = {"spec": spec.model_dump(mode="json", exclude={"replicas", "routing", "preload", "warmup",
                                                         "queue_timeout", "description"}),
           "override": override.model_dump(mode="json") if override else None}  # fmt: skip
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class RayPlacement(Placement):
    kind = "ray"

    def __init__(self, key: str, services: EngineServices, log_tail: LogTail, cluster: RayCluster) -> None:
        super().__init__(key, services, log_tail)
        self.cluster = cluster
        self._actor: Any = None
        self._pid: int | None = None
        self.cuda_visible_devices: str | None = None
        self._no_room_until = 0.0  # after a placement timeout: no node had room, recently
        self._seen = 0  # output lines read from the actor so far
        self._lost = False  # the engine refused connections: its node (or actor) is gone

    @property
    def pid(self) -> int | None:
        return self._pid

    def exit_code(self) -> int | None:
        exited = self.exited
        return exited.result() if exited is not None and exited.done() and not exited.cancelled() else None

    def refused(self) -> int | None:
        """Nothing listens at the engine's address on its node: its process or its node is gone,
        though the actor's exit watch may not say so for seconds (Ray notices a dead node by
        missed heartbeats). Taken as an exit at once, as a local engine's is; the stop that
        follows does not wait on the actor, which may be unreachable."""
        code = self.exit_code()
        if code is None and self._actor is not None:
            self._lost = True
            return LOST
        return code

    @property
    def may_place(self) -> bool:
        """False for a while after a placement timed out: send requests elsewhere meanwhile."""
        return time.monotonic() >= self._no_room_until

    async def place(self, spec: ModelSpec, override: EngineOverride | None) -> None:
        """A host actor on a node with the model's resources, within placement_timeout. For a
        placement_timeout after one timed out, none is asked for: the start is refused at once."""
        timeout = self.cluster.spec.placement_timeout
        if not self.may_place:
            left = self._no_room_until - time.monotonic()
            why = f"no Ray node had {_resources(spec)} within placement_timeout ({timeout:g}s) a moment ago"
            raise self._no_room(spec, f"{why}; next try in {left:.0f}s", left)
        api_key = launch_key()
        actor = await self._create(spec, fingerprint(spec, override), api_key)
        try:
            where = await asyncio.wait_for(_awaitable(actor.reserve.remote()), timeout)
        except TimeoutError:
            self.cluster.kill(actor)
            self._no_room_until = time.monotonic() + timeout
            need = _resources(spec)
            self.log.write(f"=== no Ray node had {need} within {timeout:g}s: placement cancelled")
            raise self._no_room(
                spec, f"no Ray node had {need} within placement_timeout ({timeout:g}s)", timeout
            ) from None
        except Exception as exc:  # the actor failed, or the cluster is unreachable
            self.cluster.kill(actor)
            raise EngineStartError(
                spec.name, f"model '{spec.name}': Ray could not place it: {exc}", []
            ) from exc
        except BaseException:  # cancelled: an operator's stop, or the daemon exits
            self.cluster.kill(actor)
            raise
        self._actor, self.api_key = actor, api_key
        self._where(where)

    @staticmethod
    def _no_room(spec: ModelSpec, why: str, retry_after: float) -> EngineNoRoom:
        """The model's requests take the overload path (its twin, else 429) and are told to come
        back once the cluster may have room again."""
        error = EngineNoRoom(spec.name, f"model '{spec.name}': {why}", ())
        error.retry_after = max(error.retry_after, retry_after)
        return error

    async def _create(self, spec: ModelSpec, print_: str, api_key: str) -> Any:
        """The host actor. One left under this engine's name (a stop that could not reach the
        cluster) is stale, as this engine is stopped: it is killed, and its name freed."""
        for _ in range(50):
            try:
                return self.cluster.create_host(self.key, spec, print_, api_key)
            except ValueError:  # the name is taken
                stale = self.cluster.host(self.key)
                if stale is not None:
                    self.cluster.kill(stale)
                await asyncio.sleep(0.1)
            except Exception as exc:
                raise EngineStartError(spec.name, f"model '{spec.name}': Ray refused it: {exc}", []) from exc
        raise EngineStartError(
            spec.name, f"model '{spec.name}': the Ray actor name {self.key!r} stays taken", []
        )

    def _where(self, where: dict[str, Any]) -> None:
        self.host, self.port = where["ip"], where["port"]
        self.node_id, self.cuda_visible_devices = where["node_id"], where["cuda_visible_devices"]

    async def launch(
        self, spec: ModelSpec, backend: Backend, override: EngineOverride | None, gpu_ids: tuple[int, ...],
        fail: Fail,
    ) -> None:  # fmt: skip
        actor = self._actor
        if actor is None:
            raise fail("no Ray node was reserved for the engine")
        launch = backend.launch(spec, self._ray_context(spec, override))
        self.keep_alive = launch.keep_alive
        self.log.secret = self.api_key
        try:
            self._pid = int(await _awaitable(actor.start.remote(list(launch.argv), dict(launch.env))))
        except Exception as exc:
            self.log.write(f"=== could not launch on the Ray node: {exc}")
            raise fail(f"could not launch '{launch.argv[0]}' on Ray node {self.node_id}: {exc}") from exc
        self.log.write(
            f"=== on Ray node {self.node_id} ({self.host}:{self.port}), pid {self._pid}, "
            f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices!r}"
        )
        self._seen = 0
        self._follow(actor)

    def _ray_context(self, spec: ModelSpec, override: EngineOverride | None) -> LaunchContext:
        """The launch on the node: its model path as given (nodes resolve it), none of this host's
        environment (the actor's own is the base), GPU ids that only size tensor parallelism
        (the actor's CUDA_VISIBLE_DEVICES, Ray's choice, replaces them there)."""
        gpus = tuple(range(spec.gpus_per_replica)) if spec.execution_mode == "gpu" else ()
        return self._context(spec, override, spec.model_path, gpus, {})

    def _follow(self, actor: Any) -> None:
        loop = asyncio.get_running_loop()
        self.exited = loop.create_task(self._wait_exit(actor))
        self._pump = loop.create_task(self._pump_output(actor))

    async def _wait_exit(self, actor: Any) -> int:
        try:
            return int(await _awaitable(actor.wait.remote()))
        except Exception as exc:  # the actor died: killed, its worker or its node lost
            log.debug("engine host '%s' is gone: %s", self.key, exc)
            return LOST

    async def _pump_output(self, actor: Any) -> None:
        while True:
            with contextlib.suppress(Exception):  # gone, or busy: the exit watch reports a death
                await self._read_output(actor)
            await asyncio.sleep(OUTPUT_POLL)

    async def _read_output(self, actor: Any) -> None:
        seen, lines = await _awaitable(actor.output.remote(self._seen))
        for line in lines:
            self.log.write(line)
        self._seen = int(seen)

    async def drain_output(self) -> None:
        """The lines the actor holds that are not in the log yet (a start failed, or it stops)."""
        if self._actor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._read_output(self._actor), 2.0)

    async def terminate(self) -> None:
        actor, self._actor = self._actor, None
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        lost, self._lost = self._lost, False
        if actor is not None:
            grace = self._services.settings.stop_grace_period
            code: int | None = None
            if not lost:  # a lost engine's actor may not answer: Ray's kill ends what is left
                with contextlib.suppress(Exception):
                    code = await asyncio.wait_for(_awaitable(actor.stop.remote(grace)), grace + 10)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._read_output(actor), 2.0)
            self.cluster.kill(actor)
            self.log.write(f"=== exited with code {code if code is not None else LOST}")
        if self.exited is not None and not self.exited.done():
            self.exited.cancel()
        self.exited = None
        self.port = None
        self._pid = None

    def kill_now(self) -> None:
        if self._actor is not None:
            self.cluster.kill(self._actor)

    async def adopt(self, actor: Any, info: dict[str, Any], spec: ModelSpec, backend: Backend,
                    override: EngineOverride | None) -> None:  # fmt: skip
        """Take over an engine a previous daemon started (re-attach)."""
        self._actor, self.api_key, self._pid = actor, info["api_key"], info["pid"]
        self._where(info)
        self.keep_alive = backend.launch(spec, self._ray_context(spec, override)).keep_alive
        self.log.secret = self.api_key
        self.log.write(
            f"=== re-attached on Ray node {self.node_id} ({self.host}:{self.port}), pid {self._pid}"
        )
        seen, _ = await _awaitable(actor.output.remote(1 << 62))
        self._seen = int(seen)
        self._follow(actor)


def _start_error(spec: ModelSpec, why: str) -> EngineStartError:
    return EngineStartError(spec.name, f"model '{spec.name}': {why}", [])


def _resources(spec: ModelSpec) -> str:
    parts = []
    if spec.execution_mode == "gpu":
        parts.append(f"{spec.gpus_per_replica} GPU(s)")
    parts += [f"{v:g} {k}" for k, v in spec.ray_resources.items()]
    if spec.node:
        parts.append(f"on node {spec.node}")
    return ", ".join(parts) or "room"


async def _awaitable(ref: Any) -> Any:
    """An ObjectRef awaited on the daemon's loop (Ray completes it from its own thread)."""
    return await ref
