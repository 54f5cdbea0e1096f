"""One chaos run: a daemon, a walk of steps, the invariants after each step.

Operators and faults act on the daemon as people and machines do: the admin routes, a changed
models.yaml (reload, SIGHUP), SIGKILL of an engine (mid-stream, mid-start), another process
taking GPU memory behind the daemon's back (the ledger), a daemon killed hard and started again
on its state directory. A run ends at the first step after which an invariant fails; the
failure names the step, and `Failure.walk` is what to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil

from lifecycle.process import identity_of
from tests.chaos import checks
from tests.chaos.client import Answer, Clients
from tests.chaos.steps import Step
from tests.chaos.world import ADMIN, SHUTDOWN_GRACE, STOP_GRACE, Variant, World, key_of
from tests.fake_gpu import Ledger
from tests.helpers import Daemon

SETTLE = 25.0  # seconds a settle may take: idle timers, drains, stops (STOP_GRACE) included
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MAX_BACKGROUND = 4
BOOKS_TRIES = 5  # a difference between books and cards must last 0.8 s to count
ALIASES = frozenset({"chat", "stable"})
STATIC = {"FORBIDDEN", "MODEL_NOT_FOUND", "INVALID_HEADER", "LIMIT_EXCEEDED", "INVALID_BODY"}


class Failure(AssertionError):
    def __init__(self, step: int, walk: list[Step], problems: list[str]) -> None:
        self.step, self.walk, self.problems = step, walk, problems
        self.log: list[str] = []  # the run's steps, each with what it found and did
        super().__init__(f"step {step} {json.dumps(walk[step])}: " + "; ".join(problems[:8]))


class Run:
    def __init__(self, world: World, walk: list[Step]) -> None:
        self.world, self.walk = world, walk
        self.daemon: Daemon | None = None
        self.clients: Clients | None = None
        self.background: list[asyncio.Task[Answer]] = []
        self.checked = 0  # answers already checked
        self.versions: dict[str, set[str]] = {"chat": set(world.variant.split), "stable": {"c"}}
        names, split = frozenset(world.variant.names | ALIASES), frozenset(world.variant.split)
        self.eras = [checks.Era(0.0, names, split)]
        self.sessions: dict[tuple[checks.Era, str, str], str] = {}
        self.counters: dict[str, float] = {}
        self.squatted: dict[int, float] = {}
        self.stranger: subprocess.Popen[bytes] | None = None
        self.step = 0
        self.log: list[str] = []
        self.events: list[checks.Event] = []
        self.requests: dict[str, dict[str, Any]] = {}  # request id -> what the step asked
        self.note = ""  # what the step found and did, for the log
        self.rss: list[tuple[int, int]] = []  # (step, the daemon's resident memory) at each settle

    # ------------------------------------------------------------------ driving

    async def run(self) -> None:
        self.world.write()
        self._plant_stale_record()
        self.daemon = Daemon(self.world.root, self.world.document(), None, **self.world.env())
        self.daemon.start(timeout=60)
        self.clients = Clients(self.daemon.url, self.world.tag)
        try:
            for number, step in enumerate(self.walk):
                self.step = number
                t0 = time.monotonic()
                await getattr(self, "_op_" + step["op"])(step)
                problems = await self._check(settled=step["op"] == "settle")
                self.log.append(f"{self.step:3} {time.monotonic() - t0:5.2f}s {step['op']:13} {self.note}")
                self.note = ""
                if problems:
                    raise Failure(self.step, self.walk, problems)
        except Failure as failure:
            failure.log = [*self.log, f"{self.step:3}   (failed) {self.note}"]
            raise
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.clients is not None:
            await self.clients.close()
        if self.daemon is not None:
            self.daemon.stop()
        await self._op_unsquat({})
        if self.stranger is not None:
            self.stranger.kill()
            self.stranger.wait()

    def _plant_stale_record(self) -> None:
        """An unrelated process leading its own group, named by a stale pid record (its pid,
        another start time, a dead daemon): the daemon must never touch it (issue 25, 1)."""
        self.stranger = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        me = identity_of(self.stranger.pid)
        assert me is not None
        run_dir = self.world.state_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"model": "a", "boot_id": me.boot, "pid": me.pid, "start_ticks": max(1, me.start - 360_000),
                  "members": [], "daemon_pid": 1, "daemon_start_ticks": 1}  # fmt: skip
        (run_dir / f"a.{me.pid}.json").write_text(json.dumps(record))
        old = {"model": "b", "pid": me.pid, "pgid": me.pid, "create_time": 0.0, "daemon_pid": 999_999,
               "daemon_create_time": 0.0}  # fmt: skip
        (run_dir / f"b.{me.pid}.json").write_text(json.dumps(old))

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.clients is not None
        return self.clients.http

    # ------------------------------------------------------------- requests

    async def _send(self, req: dict[str, Any]) -> Answer:
        assert self.clients is not None
        answer = await self.clients.send(self.step, req, self.requests)
        return answer

    async def _op_burst(self, step: Step) -> None:
        answers = await asyncio.gather(*(self._send(r) for r in step["requests"]))
        self.note = " ".join(f"{a.model}>{a.served or '-'}:{a.code or a.status}" for a in answers)

    _op_pressure = _op_burst

    async def _op_mix(self, step: Step) -> None:
        """Requests, and a moment into them an operator's action or a fault: the races."""

        async def act() -> None:
            await asyncio.sleep(step["delay"])
            await getattr(self, "_op_" + step["action"]["op"])(step["action"])

        answers, _ = await asyncio.gather(asyncio.gather(*(self._send(r) for r in step["requests"])), act())
        self.note = f"{step['action']['op']} {self.note} | " + " ".join(
            f"{a.model}>{a.served or '-'}:{a.code or a.status}" for a in answers
        )

    async def _op_background(self, step: Step) -> None:
        self.background = [t for t in self.background if not t.done()]
        if len(self.background) < MAX_BACKGROUND:
            self.background.append(asyncio.ensure_future(self._send(step["request"])))
            self.note = f"{len(self.background)} running"

    async def _op_join(self, step: Step) -> None:
        await asyncio.gather(*self.background, return_exceptions=True)
        self.background = []

    async def _op_validate(self, step: Step) -> None:
        """What validate says of a request is what the request then meets (issue 25, 7)."""
        assert self.clients is not None
        req = step["request"]
        headers = {"Authorization": f"Bearer {key_of(req['key'])}"}
        if step["priority"]:
            headers["X-Priority"] = step["priority"]
        body = {"model": req["model"], "prompt": "x", "max_tokens": req["max_tokens"]}
        said = (await self.http.post("/v1/models/validate", headers=headers,
                                     json={"path": "/v1/completions", "body": body})).json()  # fmt: skip
        real = await self._send({**req, "chat": False, "stream": False, "client": "normal",
                                 "priority": step["priority"]})  # fmt: skip
        self.note = f"{req['key']} {req['model']}: validate {said['problems'][:1]}, real {real.code or 200}"
        first = said["problems"][0]["code"] if said["problems"] else None
        got = real.code if real.code in STATIC else ("" if real.status == 200 else None)
        if got is not None and got != (first if first in STATIC else ""):
            said_code = first or "valid"
            raise Failure(self.step, self.walk, [f"validate said {said_code}; the request got {got or 200}"])

    async def _op_oversize(self, step: Step) -> None:
        """A body far past a control route's limit: 413, and the daemon does not hold it (25, 2)."""
        assert self.daemon is not None and self.daemon.proc is not None
        proc = psutil.Process(self.daemon.proc.pid)
        before = proc.memory_info().rss

        async def chunks() -> Any:
            yield b'{"split": {"a": 1}, "pad": "'
            for _ in range(40):
                yield b"x" * (1 << 20)
            yield b'"}'

        resp = await self.http.post(step["path"], content=chunks(), headers=ADMIN_HEADERS)
        grew = proc.memory_info().rss - before
        if resp.status_code != 413 or grew > 64 << 20:
            raise Failure(self.step, self.walk, [f"{step['path']}: {resp.status_code}, +{grew >> 20} MiB"])

    # ------------------------------------------------------------- operators

    async def _admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, path, headers=ADMIN_HEADERS, **kw)

    async def _op_start(self, step: Step) -> None:
        resp = await self._admin("POST", f"/v1/admin/models/{step['model']}/start")
        self._expect(resp, {200, 404, 429, 503}, "admin start")
        self.note = f"{step['model']}: {resp.status_code}"

    async def _op_stop(self, step: Step) -> None:
        """A stop answers within its bound, whatever the engine was doing (a wake included)."""
        t0 = time.monotonic()
        self._event("stop", step["model"])
        resp = await self._admin("POST", f"/v1/admin/models/{step['model']}/stop",
                                 params={"force": "true"} if step["force"] else {})  # fmt: skip
        took = time.monotonic() - t0
        self.note = f"{step['model']}: {resp.status_code} in {took:.2f}s"
        self._expect(resp, {200, 404}, "admin stop")
        bound = STOP_GRACE + 6.0 + (0 if step["force"] else SHUTDOWN_GRACE)
        if took > bound:
            raise Failure(self.step, self.walk, [f"the stop took {took:.1f}s (bound {bound:g}s)"])

    async def _op_sleep(self, step: Step) -> None:
        resp = await self._admin("POST", f"/v1/admin/models/{step['model']}/sleep")
        self._expect(resp, {200, 404, 409}, "admin sleep")
        self.note = f"{step['model']}: {resp.status_code} {resp.json().get('error', {}).get('code', '')}"

    async def _op_split(self, step: Step) -> None:
        self._era(self.eras[-1].names, step["split"])
        resp = await self._admin("POST", "/v1/admin/aliases/chat", json={"split": step["split"]})
        self._expect(resp, {200}, "alias split")

    async def _op_reload(self, step: Step) -> None:
        assert self.daemon is not None
        old, hung = self.eras[-1].names, self.world.variant.c_hangs
        self.world.variant = Variant(**step["variant"])
        self.world.write()
        self._event("reload", "")
        if hung != self.world.variant.c_hangs:  # a hung engine lives until it is next idle
            if hung:
                self._hang_ends()
            else:
                self._event("hang", "c", until=float("inf"))
        # Requests from now may meet the old registry or the new one, until it is in force.
        self._era(old | self.world.variant.names, self.world.variant.split)
        if step["how"] == "sighup":
            self.daemon.signal(signal.SIGHUP)
            await self._until(self._loaded, 10, "the SIGHUP reload")
        else:
            resp = await self._admin("POST", "/v1/admin/reload")
            self._expect(resp, {200}, "reload")
        self._era(self.world.variant.names | ALIASES, self.world.variant.split)

    async def _loaded(self) -> bool:
        names = {m["id"] for m in (await self.http.get("/v1/models", headers=ADMIN_HEADERS)).json()["data"]}
        return names >= self.world.variant.names and ("extra" in names) == self.world.variant.extra

    def _event(self, kind: str, model: str, until: float = 0.0) -> None:
        self.events.append(checks.Event(time.monotonic(), kind, model, until))

    def _hang_ends(self) -> None:
        """c answers again once its hung engine is replaced: a few seconds after the reload."""
        for i, e in enumerate(self.events):
            if e.kind == "hang" and e.until == float("inf"):
                self.events[i] = checks.Event(e.at, e.kind, e.model, time.monotonic() + 10.0)

    def _era(self, names: Iterable[str], split: Iterable[str]) -> None:
        """From now on: these names registered, this split (its versions are remembered: the
        model a key may reach through the alias is any it has had)."""
        self.versions["chat"] |= set(split)
        self.eras.append(checks.Era(time.monotonic(), frozenset(names), frozenset(split)))

    # ----------------------------------------------------------------- faults

    async def _op_kill(self, step: Step) -> None:
        """SIGKILL a running engine of the model (mid-stream, if background streams run)."""
        for row in await self._replicas(step["model"]):
            if row["pid"]:
                self._event("kill", step["model"])
                _kill(row["pid"])
                self.note = f"{step['model']}: killed pid {row['pid']} ({row['state']})"
                return
        self.note = f"{step['model']}: not running"

    async def _op_kill_starting(self, step: Step) -> None:
        """Stop the model, start it again, and SIGKILL its engine while it starts."""
        self._event("kill_starting", step["model"])
        await self._admin("POST", f"/v1/admin/models/{step['model']}/stop", params={"force": "true"})
        start = asyncio.ensure_future(self._admin("POST", f"/v1/admin/models/{step['model']}/start"))
        deadline = time.monotonic() + 5
        while not start.done() and time.monotonic() < deadline:
            rows = await self._replicas(step["model"])
            starting = [r for r in rows if r["state"] == "starting" and r["pid"]]
            if starting:
                _kill(starting[0]["pid"])
                self.note = f"{step['model']}: killed pid {starting[0]['pid']} while starting"
                break
            await asyncio.sleep(0.02)
        resp = await start
        self._expect(resp, {200, 429, 503}, "a start whose engine was killed")
        self._event("kill_starting", step["model"])
        self.note += f"; the start answered {resp.status_code}"

    async def _op_squat(self, step: Step) -> None:
        """Another process takes GPU memory behind the daemon's back (one GPU at a time): wakes
        and starts there run out of memory (the engines say so), and the daemon must say so too."""
        gpu, share = step["gpu"], step["share"]
        if not self.squatted and Ledger(self.world.ledger).claim(os.getpid(), [str(gpu)], share) is None:
            self.squatted[gpu] = share
            self._event("squat", "", until=float("inf"))
            self.note = f"GPU {gpu}: {share} taken"

    async def _op_unsquat(self, step: Step) -> None:
        if self.squatted:
            Ledger(self.world.ledger).release(os.getpid())
            self.squatted.clear()
            # What failed for want of room stays failed (its back-off) a while after.
            for i, e in enumerate(self.events):
                if e.kind == "squat" and e.until == float("inf"):
                    self.events[i] = checks.Event(e.at, e.kind, e.model, time.monotonic())

    async def _op_restart(self, step: Step) -> None:
        """The daemon killed hard, and started again on its state directory: it reaps what the
        last one left, and touches nothing else."""
        assert self.daemon is not None and self.daemon.proc is not None and self.clients is not None
        await self._op_join(step)
        self._event("restart", "")
        # An operator's split lives in the daemon's memory: models.yaml's is in force again.
        self._era(self.eras[-1].names, self.world.variant.split)
        self.daemon.proc.kill()
        self.daemon.proc.wait(10)
        self.daemon.start(timeout=60)
        self.clients.rebase(self.daemon.url)
        self.counters = {}
        self.rss = []  # another process
        await self._settle()
        if self.stranger is None or self.stranger.poll() is not None:
            raise Failure(self.step, self.walk, ["a process named by a stale pid record was killed"])

    async def _op_settle(self, step: Step) -> None:
        await self._op_join(step)
        await self._op_unsquat({})
        await self._settle()
        assert self.daemon is not None and self.daemon.proc is not None
        rss = psutil.Process(self.daemon.proc.pid).memory_info().rss
        self.rss.append((self.step, rss))
        self.note = f"daemon RSS {rss / 2**20:.1f} MiB"

    async def _settle(self) -> None:
        await self._until(self._quiet, SETTLE, "a settle (no request in flight, no engine changing)")

    async def _quiet(self) -> bool:
        status = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
        rows = [r for m in status["models"] for r in m["replicas"]]
        busy = {"starting", "stopping", "waking"}
        return all(r["in_flight"] == 0 and r["queued"] == 0 and r["state"] not in busy for r in rows)

    # ------------------------------------------------------------- checking

    async def _check(self, settled: bool) -> list[str]:
        assert self.clients is not None
        # In order, each once it has ended (a background stream's when it has).
        batch = _prefix_done(self.clients.answers[self.checked :])
        self.checked += len(batch)
        problems = checks.answers(batch, self.eras, self.versions)
        problems += checks.explained(batch, self.events, self.requests)
        problems += checks.sessions(batch, self.eras, self.sessions)
        restarts = [e.at for e in self.events if e.kind == "restart"]
        newest = min((a.started for a in batch), default=time.monotonic())
        problems += checks.rates(self.clients.answers[-2000:], max(restarts, default=0.0), newest)
        problems += await self._books(settled)
        problems += await self._processes(settled)
        text = (await self.http.get("/metrics", headers=ADMIN_HEADERS)).text
        problems += checks.metrics(self.counters, text, settled)
        self.counters = checks.counters(text)
        if settled:
            problems += checks.engine_logs(self.world.state_dir / "logs", self.clients.answers)
        return problems

    async def _processes(self, settled: bool) -> list[str]:
        """No orphan: an engine process /v1/status does not know, before or after the scan,
        twice in a row 0.3 s apart (a start's spawn and a stop's exit are not instant)."""
        problems: list[str] = []
        for _ in range(2):
            before = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
            problems = checks.processes([before], self.world.tag, settled)
            if not problems:
                return []
            after = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
            problems = checks.processes([before, after], self.world.tag, settled)
            if not problems:
                return []
            await asyncio.sleep(0.3)
        return problems

    async def _books(self, settled: bool) -> list[str]:
        """The cards never hold more than they have; and the daemon's books are what they hold
        whenever nothing changes — not only once settled. A sleep in progress reads as asleep
        while its engine gives its memory back, so a difference counts once it has lasted."""
        for attempt in range(BOOKS_TRIES):
            status = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
            books = Ledger(self.world.ledger).read()
            after = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
            steady = _engines(status) == _engines(after) and not _changing(status)
            problems = checks.ledger(books, status, self.squatted, settled or steady)
            if not problems or not steady or attempt == BOOKS_TRIES - 1:
                return problems
            await asyncio.sleep(0.2)
        return []

    def _expect(self, resp: httpx.Response, statuses: set[int], what: str) -> None:
        if resp.status_code not in statuses:
            raise Failure(self.step, self.walk, [f"{what}: {resp.status_code} {resp.text[:200]}"])

    async def _replicas(self, model: str) -> list[dict[str, Any]]:
        status = (await self.http.get("/v1/status", headers=ADMIN_HEADERS)).json()
        return next((m["replicas"] for m in status["models"] if m["name"] == model), [])

    async def _until(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise Failure(self.step, self.walk, [f"{what} did not happen within {timeout:g}s"])
            await asyncio.sleep(0.05)


def _engines(status: dict[str, Any]) -> list[tuple[str, int, str, int | None]]:
    return [(m["name"], r["replica"], r["state"], r["pid"]) for m in status["models"] for r in m["replicas"]]


def _changing(status: dict[str, Any]) -> bool:
    busy = {"starting", "stopping", "waking"}
    return any(r["state"] in busy for m in status["models"] for r in m["replicas"])


def _prefix_done(batch: list[Answer]) -> list[Answer]:
    """The answers up to the first still running (checked once; later ones wait their turn)."""
    out = []
    for a in batch:
        if not a.ended:
            break
        out.append(a)
    return out


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def dump(walk: list[Step], path: Path) -> None:
    path.write_text(json.dumps({"walk": walk}, indent=1))
