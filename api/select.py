"""Which engine serves a request: the model itself, one of its replicas, or its CPU twin.

A model of one engine takes the path it always has (router/policy.py: the engine, its
twin when saturated or without GPU room, or 429). A model with replicas asks its
ReplicaSet (lifecycle/replicas.py, router/scaling.py): a replica under the threshold by
its routing policy; when all are at it, a new replica starting (the request waits for
whichever frees first); at `max`, the twin or 429 — or, when the model has a
`queue_timeout` (QUEUE_TIMEOUT), its admission queue (lifecycle/admission.py), where the
request waits its fair turn for a slot. Everything here runs in the event-loop step that
takes the lease, except the waits, which end in such a step.
"""

from __future__ import annotations

import enum

from api.aliases import AliasTable, NoVersionAllowed
from api.call import Call, alias_session, wrong_type
from api.context import AppContext
from config.keys import KeyPolicy
from config.models import ModelSpec
from lifecycle.admission import QueueClosed, QueueTimeout, Ticket
from lifecycle.engine import Engine, Lease
from lifecycle.replicas import ReplicaSet
from lifecycle.state import EngineState
from router.balance import affinity_key
from router.errors import Forbidden, GpuOverloaded, ModelNotFound, ModelUnavailable, QueueFull
from router.policy import Route, choose_route, overflow
from router.scaling import Decision, Overflow, Serve, Start, Wait
from router.ticker import Ticker


class Pending(enum.Enum):
    REPLICA = "replica"  # every replica is busy and one is starting: `wait()` for one
    QUEUE = "queue"  # the model is saturated: `enqueue()`, then wait for a slot


def resolve_alias(aliases: AliasTable, name: str, session: str | None, key: KeyPolicy | None,
                  peek: bool = False) -> str | None:  # fmt: skip
    """The version of alias `name` for a request (None: not an alias). A key allowed the alias
    may use every version; a key allowed only some versions is served by those; a key allowed
    none of them gets 403."""
    allowed = key.models if key is not None else None
    try:
        if peek:
            return aliases.peek(name, session, allowed)
        return aliases.resolve(name, session, allowed)
    except NoVersionAllowed as exc:
        assert key is not None and key.models is not None
        raise Forbidden(
            f"Key '{key.name}' may not use model '{name}' nor any of its versions "
            f"({', '.join(exc.versions)}); it may use: {', '.join(key.models) or 'nothing'}"
        ) from exc


def _while_starting(exc: GpuOverloaded, *engines: Engine) -> None:
    """Turned away at the in-flight bound while an engine of the model starts (or wakes): the
    requests it counts wait for that start, so say when the soonest is expected to be ready,
    and retry then."""
    eta = min((t for t in (e.ready_in() for e in engines) if t is not None), default=None)
    if eta is not None:
        exc.retry_after = eta
        exc.message = f"{exc.message}; its engine is starting, expected ready in about {eta:.0f}s"
        exc.args = (exc.message,)


class Selector:
    def __init__(self, ctx: AppContext, ticker: Ticker) -> None:
        self.ctx = ctx
        self.ticker = ticker

    def spec(self, call: Call, path: str, key: KeyPolicy | None) -> ModelSpec:
        """The model `call` names (an alias: the version that serves it, among those `key` may
        use; the answer still names the alias), if it serves `path`."""
        spec = self.ctx.registry.models.get(call.requested)
        if spec is None:
            session = alias_session(call.session_id, call.payload)
            version = resolve_alias(self.ctx.aliases, call.requested, session, key)
            if version is None:
                raise ModelNotFound(call.requested, self.ctx.registry.names)
            self.ctx.metrics.aliased(call.requested, version)
            spec = self.ctx.registry.models[version]
        mismatch = wrong_type(spec, call.requested, path)
        if mismatch is not None:
            raise mismatch
        return spec

    def twin(self, engine: Engine) -> Engine | None:
        """The CPU twin for a request whose GPU engine found no room to start (its Ray
        placement timed out, or its GPUs stayed full), when offload may use one."""
        name = engine.spec.cpu_offload_model
        replicas = self.ctx.manager.models.get(name) if name else None
        if replicas is None or not self.ctx.policy.offload_enabled or name in self.ctx.registry.disabled:
            return None
        return replicas.first if replicas.single else replicas.any_replica(None)

    def queue_timeout(self, spec: ModelSpec) -> float:
        timeout = spec.queue_timeout
        return self.ctx.settings.queue_timeout if timeout is None else timeout

    def select(self, spec: ModelSpec, call: Call) -> Engine | Pending:
        """The engine for `call`, or how it must wait for one."""
        replicas = self.ctx.manager.models[spec.name]
        # While requests wait in its queue, a model's engines stay at the bound (a release hands
        # the slot to a waiter: lifecycle/admission.py), so a newcomer is refused here and
        # queues behind them.
        try:
            return self._select(spec, replicas, call)
        except GpuOverloaded:
            if self.queue_timeout(spec) <= 0:
                raise
            return Pending.QUEUE

    def _select(self, spec: ModelSpec, replicas: ReplicaSet, call: Call) -> Engine | Pending:
        if replicas.single:
            if replicas.held:  # a request ends an operator's hold (only `replicas: 1` has a min)
                replicas.held = False
            engine = replicas.first
            try:
                route = choose_route(
                    spec,
                    policy=self.ctx.policy,
                    disabled=self.ctx.registry.disabled,
                    in_flight={spec.name: engine.in_flight},
                    # Only asked of a GPU model with a twin whose engine must start or wake.
                    no_room=spec.cpu_offload_model is not None and engine.state is not EngineState.READY
                    and spec.execution_mode == "gpu" and not replicas.has_room(0),
                )  # fmt: skip
            except GpuOverloaded as exc:
                _while_starting(exc, engine)
                raise
            return self._engine(route, call) if route.offloaded else engine
        route = choose_route(spec, policy=self.ctx.policy, disabled=self.ctx.registry.disabled, in_flight={})
        if route.offloaded:  # a GPU model in cpu mode: its twin
            return self._engine(route, call)
        key = self._key(replicas, call)
        if spec.execution_mode != "gpu":
            return replicas.any_replica(key)
        decision = replicas.route(key, float(self.ctx.policy.threshold))
        if isinstance(decision, Wait) or (isinstance(decision, Start) and decision.wait):
            if replicas.waiting >= replicas.first.max_waiting:
                self._routed(spec, "rejected")
                raise QueueFull(
                    f"{replicas.waiting} requests already wait for a replica of model '{spec.name}'",
                    retry_after=1.0,
                )
            if isinstance(decision, Start):
                self._routed(spec, "scale_up")
            return Pending.REPLICA
        return self._act(spec, replicas, decision, call)

    async def wait(self, call: Call) -> Engine | Pending:
        """Wait for a replica of the model to take `call` (bounded by STARTUP_TIMEOUT); or,
        when they all stay busy at `max` and the model queues, Pending.QUEUE."""
        replicas = self.ctx.manager.models.get(call.model)
        if replicas is None:  # removed by a reload while it waited
            raise ModelNotFound(call.model, self.ctx.registry.names)
        timeout = self.ctx.settings.startup_timeout
        decision = await replicas.wait_for_replica(
            self._key(replicas, call),
            float(self.ctx.policy.threshold),
            timeout,
            lambda: self._routed(replicas.spec, "scale_up"),
        )
        try:
            return self._act(replicas.spec, replicas, decision, call)
        except GpuOverloaded:
            if self.queue_timeout(replicas.spec) <= 0:
                raise
            return Pending.QUEUE

    async def queued(self, call: Call, tenant: str, weight: float, cost: float) -> tuple[Engine, Lease]:
        """Wait in the model's admission queue for a slot: the engine and the lease taken for
        the request; 429 GPU_OVERLOADED past its queue_timeout, QUEUE_FULL past
        max_queued_requests, 503 when the model is removed meanwhile."""
        replicas = self.ctx.manager.models.get(call.model)
        if replicas is None:  # removed by a reload while it waited for a replica
            raise ModelNotFound(call.model, self.ctx.registry.names)
        ticket = self._enqueue(replicas, call, tenant, weight, cost)
        queue = replicas.queue
        try:
            return await queue.wait(ticket)
        except QueueTimeout as exc:
            raise GpuOverloaded(exc.message, retry_after=exc.retry_after) from exc
        except QueueClosed as exc:
            raise ModelUnavailable(exc.message) from exc

    def _enqueue(self, replicas: ReplicaSet, call: Call, tenant: str, weight: float, cost: float) -> Ticket:
        queue, spec = replicas.queue, replicas.spec
        if queue.waiting >= replicas.first.max_waiting:
            raise QueueFull(
                f"{queue.waiting} requests already wait for a slot on model '{spec.name}'", retry_after=1.0
            )
        return queue.join(
            tenant, call.priority, weight, cost,
            timeout=self.queue_timeout(spec), cap=self.ctx.policy.threshold, ticker=self.ticker,
        )  # fmt: skip

    def _act(self, spec: ModelSpec, replicas: ReplicaSet, decision: Decision, call: Call) -> Engine:
        if isinstance(decision, Overflow):
            size = len(replicas.engines)
            try:
                route = overflow(
                    spec, self.ctx.policy, self.ctx.registry.disabled,
                    f"All {size} replicas of model '{spec.name}' are busy or cannot start "
                    f"(limit {self.ctx.policy.threshold} requests each)",
                )  # fmt: skip
            except GpuOverloaded as exc:
                self._routed(spec, "queued" if self.queue_timeout(spec) > 0 else "rejected")
                _while_starting(exc, *replicas.engines)
                raise
            self._routed(spec, "offload")
            return self._engine(route, call)
        assert isinstance(decision, Serve | Start)
        if isinstance(decision, Start):
            twin = spec.cpu_offload_model
            usable = (
                twin is not None
                and twin not in self.ctx.registry.disabled
                and self.ctx.policy.offload_enabled
            )
            if usable and not replicas.has_room(decision.replica):
                route = overflow(spec, self.ctx.policy, self.ctx.registry.disabled, "no GPU room")
                self._routed(spec, "offload")
                return self._engine(route, call)
            self._routed(spec, "scale_up")
        else:
            self._routed(spec, decision.reason)
        return replicas.engines[decision.replica]

    def _engine(self, route: Route, call: Call) -> Engine:
        """The twin's engine (a twin with replicas picks one of them)."""
        twin = self.ctx.manager.models[route.target]
        return twin.first if twin.single else twin.any_replica(self._key(twin, call))

    @staticmethod
    def _key(replicas: ReplicaSet, call: Call) -> str | None:
        if replicas.spec.routing != "prefix_affinity":
            return None
        return affinity_key(call.payload, call.session_id)

    def _routed(self, spec: ModelSpec, reason: str) -> None:
        self.ctx.metrics.routed(spec.name, spec.routing, reason)
