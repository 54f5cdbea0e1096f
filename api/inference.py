"""The proxied inference routes, as raw ASGI endpoints (the hot path).

Each request: read the body (bounded) → parse it once → pick the target
(router.policy) → take a lease on that engine → ensure it is ready →
forward (router.proxy). The lease is taken in the same event-loop step as
the decision, so concurrent requests see each other's load, and it is
released after the last byte. While forwarding, a watcher listens for the
client's `http.disconnect` and cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from api.context import AppContext
from api.errors import send_error
from api.metrics import UNKNOWN_MODEL
from api.request_log import REQUEST_ID, access_log, request_id_from
from config.models import ModelSpec
from lifecycle.engine import Engine
from lifecycle.state import EngineError, EngineQueueFull
from router.errors import (
    BackendConnectFailed,
    EndpointNotSupported,
    InvalidJson,
    InvalidRequest,
    ModelNotFound,
    ModelRequired,
    ModelUnavailable,
    PayloadTooLarge,
    QueueFull,
    RouterError,
)
from router.policy import choose_route
from router.proxy import Relay, Rename, Send, Upstream
from router.ticker import Ticker

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# Proxied path -> the model types that serve it.
INFERENCE_PATHS: dict[str, frozenset[str]] = {
    "/v1/completions": frozenset({"llm"}),
    "/v1/chat/completions": frozenset({"llm"}),
    "/v1/embeddings": frozenset({"embedding"}),
    "/v1/rerank": frozenset({"reranker"}),
    "/v1/score": frozenset({"reranker"}),
}


async def read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"Request body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError  # nobody is left to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_payload(body: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object and its `model`; raise the client's error otherwise."""
    try:
        payload = orjson.loads(body)  # ~5x json's speed on small bodies, more on large ones
    except orjson.JSONDecodeError as exc:  # also: bad UTF-8, nesting too deep, ints over 64 bits
        raise InvalidJson(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object")
    model = payload.get("model")
    if model is None or model == "":
        raise ModelRequired('Every request must name a model: add "model" to the JSON body')
    if not isinstance(model, str):
        raise InvalidRequest('"model" must be a string')
    return payload, model


async def _watch_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# A request still running after this long gets a disconnect watcher (a task
# waiting on `receive()`). Most non-streaming answers come back sooner, and
# a watcher per request cost ~15% of the daemon's throughput; 0.025 s put the
# watchers of a burst of streams right in their time-to-first-token window.
# A client that leaves is noticed within this delay plus one Ticker interval.
WATCH_AFTER = 0.1


class DisconnectGuard:
    """Cancel the request's own task when the client goes away.

    The watcher (a task waiting on `receive()` for `http.disconnect`) starts
    only once the request has run for WATCH_AFTER seconds, looked at by the
    shared Ticker (no timer of its own). `close()` must be called as soon as
    the forward ends: a done-callback may already be scheduled, and the flag
    stops it from cancelling a task that moved on.
    """

    def __init__(self, receive: Receive, ticker: Ticker) -> None:
        self._receive = receive
        self._ticker = ticker
        self._task = asyncio.current_task()
        self._open = True
        self.disconnected = False
        self._watcher: asyncio.Future[None] | None = None
        self._watch_at = asyncio.get_running_loop().time() + WATCH_AFTER
        ticker.add(self)

    def tick(self, now: float) -> bool:
        if not self._open:
            return False
        if now < self._watch_at:
            return True
        self._watcher = asyncio.ensure_future(_watch_disconnect(self._receive))
        self._watcher.add_done_callback(self._on_disconnect)
        return False

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if self._open and not watcher.cancelled() and watcher.exception() is None:
            self.disconnected = True
            assert self._task is not None
            self._task.cancel()

    def close(self) -> None:
        self._open = False
        self._ticker.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()


class InferenceEndpoint:
    """ASGI app for one proxied path."""

    def __init__(self, ctx: AppContext, upstream: Upstream, ticker: Ticker, path: str) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self.ticker = ticker
        self.path = path
        self.types = INFERENCE_PATHS[path]
        self._renames: dict[tuple[str, str], Rename] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        headers: dict[bytes, bytes] = dict(scope["headers"])  # one pass, in C, for every lookup below
        request_id = request_id_from(headers)
        REQUEST_ID.set(request_id)
        id_header = [(b"x-request-id", request_id.encode())]
        model, backend = UNKNOWN_MODEL, ""
        try:
            key = self.ctx.auth.client(headers)  # before the body: refuse cheaply
            limit = self.ctx.settings.max_request_body_bytes
            body = await read_body(receive, headers.get(b"content-length"), limit)
            payload, requested = parse_payload(body)
            spec = self._spec(requested)
            model, backend = spec.name, spec.backend
            admission = self.ctx.auth.admit(key, spec.name, payload)
            try:
                engine = self._select(spec)
            except RouterError:
                admission.finish(0)
                raise
            lease = engine.acquire()  # same event-loop step as the decision
        except RouterError as exc:
            await send_error(send, exc, id_header)
            self._done(model, backend, "", exc.status, exc.code, t0, None)
            return
        except asyncio.CancelledError:
            return  # the client left before its request was read
        if engine.name != model:
            self.ctx.metrics.offload(model, engine.name)
        tokens = 0
        with lease:
            guard = DisconnectGuard(receive, self.ticker)
            try:
                try:
                    relay = await self._forward(
                        send, engine, requested, payload, body, request_id, id_header, admission.counts_tokens
                    )
                finally:
                    guard.close()  # before anything else is awaited: no late cancel may land
                tokens = relay.tokens or relay.usage_tokens
                self._done(model, backend, engine.name, relay.status, relay.error_code, t0, relay)
            except RouterError as exc:
                await send_error(send, exc, id_header)
                self._done(model, backend, engine.name, exc.status, exc.code, t0, None)
            except asyncio.CancelledError:
                if not guard.disconnected:
                    raise
                # The client went away: the upstream request was cancelled with us.
                self._done(model, backend, engine.name, 499, "CLIENT_DISCONNECTED", t0, None)
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            finally:
                admission.finish(tokens)

    def _done(
        self, model: str, backend: str, served: str, status: int, code: str, t0: float, relay: Relay | None
    ) -> None:
        elapsed = time.perf_counter() - t0
        metrics = self.ctx.metrics
        metrics.request(model, backend, status, code, elapsed)
        if relay is not None and relay.streaming:
            ttft = relay.first_chunk - t0 if relay.first_chunk is not None else None
            metrics.stream(model, ttft, relay.tokens)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "POST %s %d%s %.1fms model=%s served=%s",
                self.path, status, f" {code}" if code else "", elapsed * 1000, model, served or "-",
            )  # fmt: skip

    def _spec(self, requested: str) -> ModelSpec:
        spec = self.ctx.registry.models.get(requested)
        if spec is None:
            raise ModelNotFound(requested, self.ctx.registry.names)
        if spec.type not in self.types:
            raise EndpointNotSupported(
                f"Model '{requested}' is a {spec.type} model; {self.path} serves "
                f"{' or '.join(sorted(self.types))} models"
            )
        return spec

    def _select(self, spec: ModelSpec) -> Engine:
        engines = self.ctx.manager.engines
        route = choose_route(
            spec,
            policy=self.ctx.policy,
            disabled=self.ctx.registry.disabled,
            in_flight={spec.name: engines[spec.name].in_flight},
        )
        return engines[route.target]

    async def _forward(
        self,
        send: Send,
        engine: Engine,
        requested: str,
        payload: dict[str, Any],
        body: bytes,
        request_id: str,
        id_header: list[tuple[bytes, bytes]],
        count_usage: bool,
    ) -> Relay:
        target = engine.spec
        base_url = await self._ready(engine)
        served = target.served_name
        if served != requested:
            payload["model"] = served
            body = orjson.dumps(payload)
        try:
            return await self._send_upstream(send, engine, base_url, body, request_id, id_header, count_usage,
                                             served, requested)  # fmt: skip
        except BackendConnectFailed:
            if not engine.check_exited():
                raise
            # The engine died before this request reached it: wait for a new one, send once more.
            base_url = await self._ready(engine)
            return await self._send_upstream(send, engine, base_url, body, request_id, id_header, count_usage,
                                             served, requested)  # fmt: skip

    async def _ready(self, engine: Engine) -> str:
        try:
            return await engine.ensure_ready(max_waiting=engine.max_waiting)
        except EngineQueueFull as exc:
            raise QueueFull(exc.message, retry_after=1.0) from exc
        except EngineError as exc:
            raise ModelUnavailable(exc.message) from exc

    async def _send_upstream(
        self,
        send: Send,
        engine: Engine,
        base_url: str,
        body: bytes,
        request_id: str,
        id_header: list[tuple[bytes, bytes]],
        count_usage: bool,
        served: str,
        requested: str,
    ) -> Relay:
        return await self.upstream.forward(
            send,
            base_url=base_url,
            path=self.path,
            api_key=engine.api_key or "",
            keep_alive=engine.keep_alive,
            request_id=request_id,
            body=body,
            extra_headers=[(b"x-served-model", engine.name.encode()), *id_header],
            rename=self._rename(served, requested),
            timeouts=engine.timeouts,
            count_usage=count_usage,
        )

    def _rename(self, served: str, requested: str) -> Rename | None:
        if served == requested:
            return None
        key = (served, requested)
        if key not in self._renames:
            self._renames[key] = Rename.of(served, requested)
        return self._renames[key]
