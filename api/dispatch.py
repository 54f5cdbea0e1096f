"""The daemon's ASGI entry: inference paths straight to their endpoints.

The proxied paths are matched by one dict lookup and served by raw ASGI
endpoints, skipping FastAPI's middleware stack and route matching (measured
at ~17% of the daemon's CPU per proxied request). Everything else — the
control plane, 404s and 405s in our error shape, lifespan — is the FastAPI
app's, where the same endpoints are also registered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, cast

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api.auth import Authenticator
from api.errors import send_error
from api.request_log import REQUEST_ID, access_log, request_id_from
from router.errors import RouterError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


OPEN_PATHS = frozenset({"/health"})
ADMIN_PREFIX = "/v1/admin/"


class Dispatcher:
    def __init__(
        self,
        app: ASGIApp,
        fast_paths: Mapping[str, ASGIApp],
        auth: Authenticator,
        trusted_proxies: str,
    ) -> None:
        self.app = app
        self.fast_paths = dict(fast_paths)
        self.auth = auth
        # The client address matters only to the control plane (admin: loopback
        # only without ADMIN_API_KEY), so only it reads a trusted proxy's headers.
        proxied = ProxyHeadersMiddleware(cast(Any, self._control_plane), trusted_hosts=trusted_proxies)
        self._control = cast(ASGIApp, proxied)  # uvicorn types ASGI with TypedDicts

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            endpoint = self.fast_paths.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)  # it sets its own request ID
                return
        await self._control(scope, receive, send)

    async def _control_plane(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        request_id = request_id_from(headers)
        REQUEST_ID.set(request_id)
        t0 = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            self._authorize(scope, headers)
        except RouterError as exc:
            await send_error(send_with_id, exc)
        else:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                ms = (time.perf_counter() - t0) * 1000
                access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, ms)

    def _authorize(self, scope: Scope, headers: dict[bytes, bytes]) -> None:
        """Admin routes need the admin key (or loopback); the rest any valid key, when keys exist."""
        path = scope["path"]
        if path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/"):
            return  # the dashboard's static files hold no data: it reads /v1/dashboard with a key
        if path.startswith(ADMIN_PREFIX):
            self.auth.admin(headers, scope.get("client"))
        else:
            self.auth.client(headers)
