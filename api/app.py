"""The FastAPI application, built from an AppContext (no globals)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from api.context import AppContext
from api.control import router as control_router
from api.dispatch import Dispatcher
from api.heap import trim_heap_forever
from api.inference import INFERENCE_PATHS, InferenceEndpoint
from api.reload import reload_registry
from router.errors import InvalidConfig, InvalidRequest, MethodNotAllowed, NotFound, RouterError
from router.proxy import Upstream
from router.ticker import Ticker


def error_response(exc: RouterError) -> Response:
    return Response(
        exc.json_bytes(), status_code=exc.status, headers=exc.headers(), media_type="application/json"
    )


async def _router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"No route {request.method} {request.url.path}"))
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow")
        message = f"Method {request.method} not allowed on {request.url.path}"
        return error_response(MethodNotAllowed(message, allow))
    err = RouterError(str(exc.detail))
    err.status = exc.status_code  # type: ignore[misc]
    return error_response(err)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(InvalidRequest(f"{where}: {first.get('msg', 'invalid request')}"))


def _reload_on_signal(ctx: AppContext) -> None:
    with contextlib.suppress(InvalidConfig):  # logged; nothing changed
        reload_registry(ctx)


def create_app(ctx: AppContext) -> Dispatcher:
    """The FastAPI app (control plane, errors, lifespan) behind the inference fast path."""
    ticker = Ticker()  # the data plane's deadlines, one timer for all requests
    upstream = Upstream(ticker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.manager.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, ctx)
        # Everything built so far lives as long as the daemon: keep it out of the
        # collector's generations so full collections stay short under load.
        gc.freeze()
        trimmer = loop.create_task(trim_heap_forever(), name="heap-trim")
        try:
            yield
        finally:
            trimmer.cancel()
            loop.remove_signal_handler(signal.SIGHUP)
            await upstream.close()
            ticker.close()
            await ctx.manager.shutdown()

    # The OpenAPI pages are off unless ENABLE_DOCS; then they need a key like any route.
    docs = ctx.settings.enable_docs
    app = FastAPI(
        title="unified-inference",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.ctx = ctx
    app.add_exception_handler(RouterError, _router_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(control_router)
    # Raw ASGI endpoints: no Request object, no middleware, errors in our shape.
    endpoints = {path: InferenceEndpoint(ctx, upstream, ticker, path) for path in INFERENCE_PATHS}
    for path, endpoint in endpoints.items():
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))
    settings = ctx.settings
    return Dispatcher(app, endpoints, ctx.auth, settings.forwarded_allow_ips, settings.max_request_body_bytes)
