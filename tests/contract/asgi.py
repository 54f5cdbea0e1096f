"""Does a real engine's ASGI app serve (method, path)? Asked of its own router, as a request would be."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.routing import Match


def serves(app: Any, method: str, path: str) -> bool:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


def unserved(app: Any, wanted: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(w for w in wanted if not serves(app, *w))
