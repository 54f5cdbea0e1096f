"""The proxied inference routes, as raw ASGI endpoints (the hot path).

Each request: read the body (bounded) → parse it once → enforce what it may
ask for (api/compute.py) → admit it for its key → pick the target
(router.policy) → take a lease on that engine → ensure it is ready → forward
(router.proxy). The lease is taken in the same event-loop step as the
decision, so concurrent requests see each other's load, and it is released
after the last byte. While forwarding, a watcher listens for the client's
`http.disconnect` and cancels the upstream request at once.

Tokens are charged to a key after the request, however it ended (see
`tokens_owed`): the engine's usage where it reports one, otherwise what was
streamed plus an estimate of the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from typing import Any

import orjson

from api.auth import KeyState
from api.body import Receive, parse_payload, read_body
from api.call import Call, Send, engine_body, fit, tokens_owed
from api.compute import (
    OUTPUT_LIMITS,
    max_tokens_asked,
    prompt_tokens_estimate,
)
from api.context import AppContext
from api.disconnect import DisconnectGuard
from api.errors import send_error
from api.request_log import REQUEST_ID, access_log, request_id_from
from api.select import Pending, Selector
from api.tenancy import request_cost, request_priority, tenant_of
from backends.capabilities import ROUTES, SERVED_TYPES
from lifecycle.budget import EngineNoRoom
from lifecycle.engine import Engine, Lease
from lifecycle.state import EngineError, EngineQueueFull
from router.answer import Rename
from router.collect import Capture, Collector
from router.errors import (
    BackendConnectFailed,
    GpuOverloaded,
    ModelUnavailable,
    QueueFull,
    RouterError,
)
from router.proxy import Upstream
from router.relay import Relay
from router.ticker import Ticker

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]

INFERENCE_PATHS = SERVED_TYPES  # proxied path -> the model types that serve it
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # stream_options apply


class InferenceEndpoint:
    """ASGI app for one proxied path."""

    def __init__(self, ctx: AppContext, upstream: Upstream, ticker: Ticker, path: str) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self.ticker = ticker
        self.path = path
        self.generates = path in GENERATION_PATHS
        self.token_fields = OUTPUT_LIMITS.get(path, ())
        self.routes = {backend: routes[path] for backend, routes in ROUTES.items() if path in routes}
        self.max_body = ctx.settings.max_response_body_bytes
        self._renames: dict[tuple[str, str], Rename] = {}
        self.selector = Selector(ctx, ticker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        headers: dict[bytes, bytes] = dict(scope["headers"])  # one pass, in C, for every lookup below
        request_id = request_id_from(headers)
        REQUEST_ID.set(request_id)
        call = Call(send, request_id, t0)
        try:
            key = self.ctx.auth.client(headers)  # before the body: refuse cheaply
            priority = headers.get(b"x-priority")
            if priority is not None or key is not None:
                call.priority = request_priority(key, priority)
            limit = self.ctx.settings.max_request_body_bytes
            call.body = await read_body(receive, headers.get(b"content-length"), limit)
            call.session = headers.get(b"x-session-id")
            engine, lease = self._admit(call, key)
            if lease is None:  # it waits for a replica to free, or for a slot in the queue
                engine, lease = await self._wait(call, key, scope.get("client"), receive)
        except RouterError as exc:
            await send_error(send, exc, call.id_header)
            self._done(call, "", exc.status, exc.code)
            return
        except asyncio.CancelledError:
            call.admission.refund()
            if call.left:  # its client went away while it waited
                self._done(call, "", 499, "CLIENT_DISCONNECTED")
            return  # the client left before its request was read or while it waited
        if key is not None:  # tenants are labelled by configured key names only
            self.ctx.metrics.admitted(call.model, key.policy.name, call.priority)
        if engine.name != call.model:
            self.ctx.metrics.offload(call.model, engine.name)
        with lease:
            await self._serve(call, engine, receive)

    def _admit(self, call: Call, key: KeyState | None) -> tuple[Engine, Lease | None]:
        """The engine and its lease; or, without a lease, the engine the request is fitted to
        while it waits (`call.pending` says for what)."""
        auth = self.ctx.auth
        call.payload, call.requested = parse_payload(call.body)
        spec = self.selector.spec(call, self.path, key.policy if key is not None else None)
        call.model, call.backend = spec.name, spec.backend
        if key is not None:
            call.admission = auth.admit(key, spec.name, call.requested)
            call.metered = call.admission.counts_tokens
        try:
            engine = self.selector.select(spec, call)
            if isinstance(engine, Pending):  # fitted to the model (all replicas are alike)
                call.pending = engine
                first = self.ctx.manager.models[spec.name].first
                self._fit(call, key, first)
                return first, None
            self._fit(call, key, engine)
        except RouterError:
            call.admission.refund()  # no engine saw it: it costs the key nothing
            raise
        return engine, engine.acquire()  # same event-loop step as the decision

    async def _wait(
        self, call: Call, key: KeyState | None, client: tuple[str, int] | None, receive: Receive
    ) -> tuple[Engine, Lease]:
        """Wait for a replica to free, or a fair turn in the admission queue; a client that
        leaves meanwhile is noticed at once (its task is cancelled, `call.left` set)."""
        guard = DisconnectGuard(receive, self.ticker, after=0.0)
        try:
            if call.pending is Pending.REPLICA:
                engine = await self.selector.wait(call)
                if not isinstance(engine, Pending):
                    if engine.name != call.model:  # overflowed to the twin: fitted to it
                        self._fit(call, key, engine)
                    return engine, engine.acquire()  # same event-loop step as the decision
            tenant, weight = tenant_of(key, client)
            cost = request_cost(call.payload, self.token_fields)
            return await self.selector.queued(call, tenant, weight, cost)
        except RouterError:
            call.admission.refund()
            raise
        except asyncio.CancelledError:
            call.left = guard.disconnected
            if call.left:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            raise
        finally:
            guard.close()

    def _fit(self, call: Call, key: KeyState | None, engine: Engine) -> None:
        limits = self.ctx.auth.global_limits if key is None else key.limits
        fit(call, engine, self.routes.get(engine.spec.backend), self.path, limits, self.token_fields)

    async def _serve(self, call: Call, engine: Engine, receive: Receive) -> None:
        guard = DisconnectGuard(receive, self.ticker)
        try:
            try:
                served = await self._forward(call, engine)
            finally:
                guard.close()  # before anything else is awaited: no late cancel may land
            relay = call.relay
            assert relay is not None
            self._done(call, served.name, relay.status, relay.error_code)
            if relay.complete and engine.failures:
                engine.proved_healthy()
        except RouterError as exc:
            if isinstance(exc, QueueFull):
                call.admission.refund()
            await send_error(call.send, exc, call.id_header)
            self._done(call, engine.name, exc.status, exc.code)
        except asyncio.CancelledError:
            if not guard.disconnected:
                raise
            # The client went away: the upstream request was cancelled with us.
            self._done(call, engine.name, 499, "CLIENT_DISCONNECTED")
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            owed = tokens_owed(call, guard.disconnected, self.token_fields) if call.metered else 0
            call.admission.finish(owed)

    def _done(self, call: Call, served: str, status: int, code: str) -> None:
        elapsed = time.perf_counter() - call.t0
        metrics = self.ctx.metrics
        metrics.request(call.model, call.backend, status, code, elapsed)
        relay = call.relay
        ttft = None
        if relay is not None and relay.streaming:
            ttft = relay.first_chunk - call.t0 if relay.first_chunk is not None else None
            metrics.stream(call.model, ttft, relay.tokens)
        self.ctx.activity.record(call.model, served, status, code, elapsed, call.request_id, ttft)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "POST %s %d%s %.1fms model=%s served=%s",
                self.path, status, f" {code}" if code else "", elapsed * 1000, call.model, served or "-",
            )  # fmt: skip

    async def _forward(self, call: Call, engine: Engine) -> Engine:
        """Send the request to `engine` and relay the answer; the engine that served it."""
        try:
            base_url = await self._ready(engine)
        except GpuOverloaded:
            twin = self._spill(call, engine)
            if twin is None:
                raise
            with twin.acquire():  # the GPU engine's lease is held until the end, as for any request
                return await self._forward(call, twin)
        body, hide_usage, collect = engine_body(call, engine, self.generates)
        served = engine.spec.served_name
        extra = [(b"x-served-model", engine.name.encode()), *call.id_header]
        if engine.spec.replicas is not None:
            extra.append((b"x-served-replica", b"%d" % engine.replica))
        rename = self._rename(served, call.requested)
        if collect:
            chat = self.path == "/v1/chat/completions"
            relay: Relay = Collector(
                call.send, extra, rename, call.metered, max_body=self.max_body, chat=chat
            )
        else:
            relay = Relay(call.send, extra, rename, call.metered, hide_usage, self.max_body)
        relay.base64 = call.base64
        call.relay = relay
        try:
            await self._send(call, engine, base_url, body)
        except BackendConnectFailed:
            if not engine.check_exited():
                raise
            # The engine died before this request reached it: wait for a new one, send once more.
            base_url = await self._ready(engine)
            await self._send(call, engine, base_url, body)
        if isinstance(relay, Collector):
            await relay.finish(await self._prompt_tokens(call, engine, base_url), self._max_tokens(call))
        return engine

    def _spill(self, call: Call, engine: Engine) -> Engine | None:
        twin = self.selector.twin(engine)
        if twin is not None:
            self._fit(call, call.admission.state, twin)
            self.ctx.metrics.offload(call.model, twin.name)
        return twin

    async def _prompt_tokens(self, call: Call, engine: Engine, base_url: str) -> int:
        """The prompt's size in tokens, which a llama.cpp stream does not say: the same request
        asked for one token, not streamed. The engine reuses the prompt it has just evaluated
        (llama-cpp-python keeps the longest common prefix), so this costs about one token."""
        probe = {**call.payload, "stream": False, "max_tokens": 1}
        probe.pop("max_completion_tokens", None)
        capture = Capture(call.send, [], None, max_body=self.max_body)
        try:
            await self.upstream.forward(
                capture,
                base_url=base_url,
                path=call.engine_path,
                api_key=engine.api_key or "",
                keep_alive=engine.keep_alive,
                request_id=call.request_id,
                body=orjson.dumps(probe),
                timeouts=engine.timeouts,
            )
            return int(orjson.loads(capture.data)["usage"]["prompt_tokens"])
        except (RouterError, orjson.JSONDecodeError, LookupError, TypeError, ValueError) as exc:
            # The answer itself is whole: it is sent, with the prompt's size estimated.
            log.warning(
                "the engine did not say the prompt's size (%s); usage.prompt_tokens is estimated", exc
            )
            return prompt_tokens_estimate(call.payload)

    def _max_tokens(self, call: Call) -> int | None:
        return max_tokens_asked(call.payload, self.token_fields)

    async def _ready(self, engine: Engine) -> str:
        try:
            return await engine.ensure_ready(max_waiting=engine.max_waiting)
        except EngineQueueFull as exc:
            raise QueueFull(exc.message, retry_after=1.0) from exc
        except EngineNoRoom as exc:
            raise GpuOverloaded(exc.message, retry_after=exc.retry_after, holders=exc.holders) from exc
        except EngineError as exc:
            raise ModelUnavailable(exc.message) from exc

    async def _send(self, call: Call, engine: Engine, base_url: str, body: bytes) -> None:
        assert call.relay is not None
        await self.upstream.forward(
            call.relay,
            base_url=base_url,
            path=call.engine_path,
            api_key=engine.api_key or "",
            keep_alive=engine.keep_alive,
            request_id=call.request_id,
            body=body,
            timeouts=engine.timeouts,
        )

    def _rename(self, served: str, requested: str) -> Rename | None:
        if served == requested:
            return None
        key = (served, requested)
        if key not in self._renames:
            self._renames[key] = Rename.of(served, requested)
        return self._renames[key]
