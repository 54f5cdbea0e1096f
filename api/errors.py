"""Sending a RouterError over raw ASGI (the fast path and the dispatcher)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from router.errors import RouterError

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def send_error(send: Send, exc: RouterError, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = exc.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    headers += list(extra)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
