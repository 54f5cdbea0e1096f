"""Clients of the chaos test: one request as a step describes it, and what came back.

Each request carries its own X-Request-ID (`chaos-<run>-<n>`), which the daemon passes to the
engine and the fake engine prints (FAKE_LOG_REQUESTS): the engines' logs say which engine saw
which request, and how often. A client may disconnect early, read slowly, or never read; it
always gives up after HANG seconds, and a request that had to is a hang (an invariant).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.world import key_of

HANG = 30.0  # seconds: past every documented deadline (STARTUP_TIMEOUT 8 s, first byte 3 s, ...)
SLOW_READ = 0.05  # seconds between reads of a slow client


@dataclass
class Answer:
    rid: str
    step: int
    key: str
    model: str  # what the client asked for
    stream: bool
    client: str
    session: str | None
    started: float  # monotonic
    ended: float = 0.0
    status: int = 0  # 0: no answer at all (the client left first, or it hung)
    code: str = ""  # the error code of an error answer (or of the stream's error event)
    error: dict[str, Any] | None = None
    served: str = ""  # X-Served-Model
    replica: str = ""
    retry_after: str | None = None
    complete: bool = False  # a document read whole, or a stream that ended with [DONE] or an error event
    hung: bool = False
    usage: int = 0  # usage.total_tokens of a document
    problems: list[str] = field(default_factory=list)  # what was wrong with the answer's shape


class Clients:
    def __init__(self, base_url: str, run: str) -> None:
        self.base_url = base_url
        self.run = run
        self._n = 0
        self.answers: list[Answer] = []
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=HANG, limits=limits)

    async def close(self) -> None:
        await self.http.aclose()

    def rebase(self, base_url: str) -> None:
        """The daemon came back on another port (a restart)."""
        self.base_url = base_url
        self.http.base_url = httpx.URL(base_url)

    def new_id(self) -> str:
        self._n += 1
        return f"{self.run}-{self._n}"

    async def send(self, step: int, req: dict[str, Any], asked: dict[str, dict[str, Any]]) -> Answer:
        """One request as `req` says; its Answer, recorded (and `req`, in `asked` by its id)."""
        answer = Answer(self.new_id(), step, req["key"], req["model"], req["stream"], req["client"],
                        req.get("session"), time.monotonic())  # fmt: skip
        self.answers.append(answer)
        asked[answer.rid] = req
        headers = {"Authorization": f"Bearer {key_of(req['key'])}", "X-Request-ID": answer.rid}
        if req.get("session"):
            headers["X-Session-ID"] = req["session"]
        if req.get("priority"):
            headers["X-Priority"] = req["priority"]
        path, body = _body(req)
        try:
            await asyncio.wait_for(self._exchange(answer, path, body, headers), HANG)
        except TimeoutError:
            answer.hung = True
        except httpx.HTTPError as exc:  # the daemon closed on us (a restart, a kill): said below
            answer.problems.append(f"transport error: {type(exc).__name__}: {exc}")
        answer.ended = time.monotonic()
        return answer

    async def _exchange(
        self, answer: Answer, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        if answer.client == "disconnect" and not answer.stream:
            # Leave while the engine works: the request is cancelled after 30 ms.
            try:
                await asyncio.wait_for(self.http.post(path, json=body, headers=headers), 0.03)
            except TimeoutError:
                return
            return
        async with self.http.stream("POST", path, json=body, headers=headers) as resp:
            answer.status = resp.status_code
            answer.served = resp.headers.get("x-served-model", "")
            answer.replica = resp.headers.get("x-served-replica", "")
            answer.retry_after = resp.headers.get("retry-after")
            if resp.status_code != 200 or not answer.stream:
                data = await resp.aread()
                _document(answer, data)
                return
            await _read_stream(answer, resp)


def _body(req: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": req["model"], "max_tokens": req["max_tokens"], "stream": req["stream"]}
    if req["chat"]:
        body["messages"] = [{"role": "user", "content": f"hello {req.get('session') or ''}"}]
        return "/v1/chat/completions", body
    body["prompt"] = f"hello {req.get('session') or ''}"
    return "/v1/completions", body


def _document(answer: Answer, data: bytes) -> None:
    try:
        doc = json.loads(data)
    except ValueError:
        answer.problems.append(f"status {answer.status}: not JSON: {data[:200]!r}")
        return
    answer.complete = True
    if answer.status == 200:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        answer.usage = int(usage.get("total_tokens", 0)) if isinstance(usage, dict) else 0
        return
    error = doc.get("error") if isinstance(doc, dict) else None
    fields = ("code", "type", "message")
    if not isinstance(error, dict) or not all(isinstance(error.get(f), str) for f in fields):
        answer.problems.append(f"status {answer.status}: not the project's error shape: {doc!r:.300}")
        return
    answer.error, answer.code = error, error["code"]


async def _read_stream(answer: Answer, resp: httpx.Response) -> None:
    lines = resp.aiter_lines()
    if answer.client == "never":  # opens the stream, reads nothing, goes away
        await asyncio.sleep(0.3)
        return
    async for line in lines:
        if answer.client == "disconnect":
            return  # one line read: gone
        if answer.client == "slow":
            await asyncio.sleep(SLOW_READ)
        if line == "data: [DONE]":
            answer.complete = True
            return
        if line.startswith("event: error"):
            data = await anext(lines, "")
            _error_event(answer, data)
            return
    answer.problems.append("the stream ended without [DONE] or an error event")


def _error_event(answer: Answer, line: str) -> None:
    try:
        error = json.loads(line.removeprefix("data: "))["error"]
        answer.code = str(error["code"])
        answer.error = error
        answer.complete = True
    except (ValueError, KeyError, TypeError):
        answer.problems.append(f"an error event not in the project's shape: {line[:200]!r}")
