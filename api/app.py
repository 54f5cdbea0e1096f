"""The FastAPI application, built from an AppContext (no globals)."""

from __future__ import annotations

import gc
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
from api.inference import INFERENCE_PATHS, InferenceEndpoint
from router.errors import InvalidRequest, MethodNotAllowed, NotFound, RouterError
from router.proxy import Timeouts, Upstream


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
        return error_response(MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}"))
    err = RouterError(str(exc.detail))
    err.status = exc.status_code  # type: ignore[misc]
    return error_response(err)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(InvalidRequest(f"{where}: {first.get('msg', 'invalid request')}"))


def create_app(ctx: AppContext) -> Dispatcher:
    """The FastAPI app (control plane, errors, lifespan) behind the inference fast path."""
    upstream = Upstream(
        Timeouts(connect=ctx.settings.backend_connect_timeout, read=ctx.settings.backend_read_timeout)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.manager.start()
        await upstream.start()
        # Everything built so far lives as long as the daemon: keep it out of the
        # collector's generations so full collections stay short under load.
        gc.freeze()
        try:
            yield
        finally:
            await upstream.close()
            await ctx.manager.shutdown()

    app = FastAPI(title="unified-inference", lifespan=lifespan)
    app.state.ctx = ctx
    app.add_exception_handler(RouterError, _router_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(control_router)
    # Raw ASGI endpoints: no Request object, no middleware, errors in our shape.
    endpoints = {path: InferenceEndpoint(ctx, upstream, path) for path in INFERENCE_PATHS}
    for path, endpoint in endpoints.items():
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))
    return Dispatcher(app, endpoints)
