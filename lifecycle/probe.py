"""HTTP probes of an engine's readiness and liveness routes."""

from __future__ import annotations

import aiohttp


class Prober:
    """One connection pool for every probe the daemon makes."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: a probe must see a fresh connection each time,
            # and an engine that restarts on the same port must not get a stale one.
            connector = aiohttp.TCPConnector(force_close=True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def ok(self, url: str, timeout: float, api_key: str | None = None) -> bool:
        """True when `url` answers 2xx within `timeout` seconds."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            async with self._client().get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
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
            async with self._client().post(
                url, headers=headers, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, (await resp.text())[:500]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
