"""HTTP probes of an engine's readiness and liveness routes, and posts to its control routes."""

from __future__ import annotations

import aiohttp

from router.address import split_unix


class Prober:
    """One connection pool for every probe the daemon makes over TCP, and one per engine on a
    Unix socket (aiohttp binds a connector to one socket path), dropped with its engine."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._unix: dict[str, aiohttp.ClientSession] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: a probe must see a fresh connection each time,
            # and an engine that restarts on the same port must not get a stale one.
            connector = aiohttp.TCPConnector(force_close=True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _session_for(self, url: str) -> tuple[aiohttp.ClientSession, str]:
        unix = split_unix(url)
        if unix is None:
            return self._client(), url
        path, rest = unix
        session = self._unix.get(path)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=path, force_close=True)
            session = self._unix[path] = aiohttp.ClientSession(connector=connector)
        return session, "http://localhost" + rest

    async def forget(self, socket_path: str) -> None:
        """An engine on this socket has stopped: close what was kept for it."""
        session = self._unix.pop(socket_path, None)
        if session is not None:
            await session.close()

    async def ok(self, url: str, timeout: float, api_key: str | None = None) -> bool:
        """True when `url` answers 2xx within `timeout` seconds."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        session, target = self._session_for(url)
        try:
            limit = aiohttp.ClientTimeout(total=timeout)
            async with session.get(target, headers=headers, timeout=limit) as resp:
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
        session, target = self._session_for(url)
        try:
            async with session.post(
                target, headers=headers, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, (await resp.text())[:500]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for path in list(self._unix):
            await self.forget(path)
