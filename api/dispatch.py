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
from router.errors import PayloadTooLarge, RouterError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


OPEN_PATHS = frozenset({"/health"})
ADMIN_PREFIX = "/v1/admin/"
# What a control-plane route may be sent: a split, a small JSON document. The validate route
# carries a whole inference body, so it takes what the inference routes take, plus its envelope.
CONTROL_BODY_BYTES = 1 << 20
VALIDATE_PATH = "/v1/models/validate"
VALIDATE_ENVELOPE = 64 * 1024


class Dispatcher:
    def __init__(
        self,
        app: ASGIApp,
        fast_paths: Mapping[str, ASGIApp],
        auth: Authenticator,
        trusted_proxies: str,
        max_request_body: int,
    ) -> None:
        self.app = app
        self.fast_paths = dict(fast_paths)
        self.auth = auth
        self._validate_limit = max_request_body + VALIDATE_ENVELOPE
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
            limit = self._validate_limit if scope["path"] == VALIDATE_PATH else CONTROL_BODY_BYTES
            length = headers.get(b"content-length")
            bounded = _bounded(receive, length, limit, scope["path"], lambda: status != 0)
        except RouterError as exc:
            await send_error(send_with_id, exc)
        else:
            await self.app(scope, bounded, send_with_id)
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


def _bounded(
    receive: Callable[[], Awaitable[Message]], content_length: bytes | None, limit: int, path: str,
    answering: Callable[[], bool],
) -> Callable[[], Awaitable[Message]]:  # fmt: skip
    """`receive`, refusing a body over `limit` bytes: at once when its Content-Length says so,
    else as the bytes come (a route reading it gets PayloadTooLarge, answered 413 in our shape).
    Once the answer has begun (`answering`: a streamed log, say, whose server only listens for
    the client leaving) what still comes is dropped instead. No control-plane route is ever
    handed more than `limit` bytes to hold."""

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body is over the {limit}-byte limit of {path}")

    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise too_large()
    size = 0

    async def bounded() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                if answering():
                    return {**message, "body": b""}
                raise too_large()
        return message

    return bounded
