"""HTTP probes of an engine's readiness and liveness routes, and posts to its control routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from router.address import split_unix


class Prober:
    """One connection pool for every probe the daemon makes (a probe of an engine on a Unix
    socket makes its own short-lived connector: aiohttp binds one to one socket path)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: a probe must see a fresh connection each time,
            # and an engine that restarts on the same port must not get a stale one.
            connector = aiohttp.TCPConnector(force_close=True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    @asynccontextmanager
    async def _session_for(self, url: str) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
        unix = split_unix(url)
        if unix is None:
            yield self._client(), url
            return
        path, rest = unix
        connector = aiohttp.UnixConnector(path=path, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield session, "http://localhost" + rest

    async def ok(self, url: str, timeout: float, api_key: str | None = None) -> bool:
        """True when `url` answers 2xx within `timeout` seconds."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            async with (
                self._session_for(url) as (session, target),
                session.get(target, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp,
            ):
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def post(
        self, url: str, timeout: float, api_key: str | None = None, json: object = None,
        request_id: str | None = None,
    ) -> tuple[int, str]:  # fmt: skip
        """POST to an engine's control route: (status, first 500 characters of the answer);
        status 0 when it could not be reached or did not answer in time."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if request_id:
            headers["X-Request-ID"] = request_id
        try:
            async with (
                self._session_for(url) as (session, target),
                session.post(
                    target, headers=headers, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as resp,
            ):
                return resp.status, (await resp.text())[:500]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
