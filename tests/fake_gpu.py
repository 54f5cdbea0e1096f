"""The fake engine's GPU: a shared ledger of memory shares, and sleep/wake as the real engines do it.

FAKE_GPU_LEDGER names a JSON file, shared by every fake engine of a test:
{"<gpu id>": {"<pid>": share, ...}, ...}. At start a fake SGLang or vLLM
engine reserves its share (--mem-fraction-static / --gpu-memory-utilization,
else the engine's default) on each GPU it uses — the first `tp` of
CUDA_VISIBLE_DEVICES, GPU 0 when that is unset — and, like the real engines,
exits during start with an out-of-memory message when a card cannot hold it.
The share is released on exit (a process that died is pruned, as the driver
frees a dead process's memory) and on sleep. Without FAKE_GPU_LEDGER there is
no GPU accounting at all.

Sleep, as confirmed in the engines' sources (README "Sleep"):
- vLLM: POST /sleep?level=N, POST /wake_up, GET /is_sleeping exist only with
  VLLM_SERVER_DEV_MODE=1 (404 otherwise); without --enable-sleep-mode they
  fail (500: "Sleep mode is not enabled in the model config").
- SGLang: POST (or GET) /release_memory_occupation and
  /resume_memory_occupation always exist and take a JSON body
  (ReleaseMemoryOccupationReqInput, `{}` = everything; none: 422); without
  --enable-memory-saver they answer 200 and free nothing (a no-op saver).
FAKE_WAKE_DELAY (seconds) is how long a wake takes; FAKE_SLEEP_DELAY, a sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

DEFAULT_SHARE = {"sglang": 0.88, "vllm": 0.92}  # what each engine takes when not told
CARD_GIB = 80.0


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, float]]]:
        with open(str(self.path) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
            except ValueError:
                data = {}
            for holders in data.values():  # the driver frees a dead process's memory
                for pid in [p for p in holders if not _alive(int(p))]:
                    del holders[pid]
            yield data
            self.path.write_text(json.dumps(data))

    def read(self) -> dict[str, dict[str, float]]:
        with self._locked() as data:
            return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    def claim(self, pid: int, gpus: list[str], share: float) -> str | None:
        """Reserve `share` on every GPU of `gpus`; the out-of-memory text when one cannot hold it."""
        with self._locked() as data:
            for gpu in gpus:
                used = sum(s for p, s in data.get(gpu, {}).items() if int(p) != pid)
                if used + share > 1.0 + 1e-9:
                    free = (1.0 - used) * CARD_GIB
                    return (
                        f"ValueError: Free memory on device cuda:{gpu} ({free:.2f}/{CARD_GIB:.1f} GiB) on "
                        f"startup is less than desired GPU memory utilization ({share:g}, "
                        f"{share * CARD_GIB:.2f} GiB). torch.OutOfMemoryError: CUDA out of memory."
                    )
            for gpu in gpus:
                data.setdefault(gpu, {})[str(pid)] = share
        return None

    def release(self, pid: int) -> None:
        with self._locked() as data:
            for holders in data.values():
                holders.pop(str(pid), None)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class FakeGpu:
    """One fake engine's GPU memory and sleep state."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.dialect = args.dialect
        self.ledger = Ledger(Path(env["FAKE_GPU_LEDGER"])) if env.get("FAKE_GPU_LEDGER") else None
        flag = {"sglang": "mem_fraction_static", "vllm": "gpu_memory_utilization"}.get(self.dialect)
        given = getattr(args, flag, None) if flag else None
        self.share = given if given is not None else DEFAULT_SHARE.get(self.dialect, 0.0)
        tp = getattr(args, "tp_size", None) or getattr(args, "tensor_parallel_size", None) or 1
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = ["0"] if visible is None else [d for d in visible.split(",") if d.strip()]
        self.tp = tp
        self.gpus = devices[:tp]
        self.can_release = bool(
            getattr(args, "enable_memory_saver", False) or getattr(args, "enable_sleep_mode", False)
        )
        self.dev_mode = env.get("VLLM_SERVER_DEV_MODE") == "1"
        self.wake_delay = float(env.get("FAKE_WAKE_DELAY", "0"))
        self.sleep_delay = float(env.get("FAKE_SLEEP_DELAY", "0"))
        self.sleeping = False
        self.holding = False
        self.stats = {"sleeps": 0, "wakes": 0}

    @property
    def tracked(self) -> bool:
        return self.ledger is not None and self.dialect in DEFAULT_SHARE

    def claim(self) -> str | None:
        """At start: the error the engine dies with, or None once its memory is reserved."""
        if not self.tracked:
            return None
        assert self.ledger is not None
        if len(self.gpus) < self.tp:
            return (
                f"RuntimeError: No CUDA GPUs are available (tensor parallel {self.tp}, visible {self.gpus})"
            )
        error = self.ledger.claim(os.getpid(), self.gpus, self.share)
        self.holding = error is None
        return error

    def release(self) -> None:
        if self.tracked and self.holding:
            assert self.ledger is not None
            self.ledger.release(os.getpid())
            self.holding = False

    def routes(self, app: web.Application) -> None:
        r = app.router
        if self.dialect == "vllm" and self.dev_mode:
            r.add_post("/sleep", self.vllm_sleep)
            r.add_post("/wake_up", self.vllm_wake)
            r.add_get("/is_sleeping", self.is_sleeping)
        elif self.dialect == "sglang":
            for method in ("GET", "POST"):
                r.add_route(method, "/release_memory_occupation", self.sglang_release)
                r.add_route(method, "/resume_memory_occupation", self.sglang_resume)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})

    async def vllm_sleep(self, request: web.Request) -> web.Response:
        if not self.can_release:
            return web.json_response({"error": "Sleep mode is not enabled in the model config"}, status=500)
        level = int(request.query.get("level", "1"))
        await asyncio.sleep(self.sleep_delay)
        self._sleep()
        return web.json_response({"status": "sleeping", "level": level})

    async def vllm_wake(self, request: web.Request) -> web.Response:
        if not self.can_release:
            return web.json_response({"error": "Sleep mode is not enabled in the model config"}, status=500)
        error = await self._wake()
        if error:
            return web.json_response({"error": error}, status=500)
        return web.json_response({"status": "awake"})

    async def sglang_release(self, request: web.Request) -> web.Response:
        if (refused := await _sglang_body(request)) is not None:
            return refused
        if self.can_release:  # without --enable-memory-saver: a no-op
            await asyncio.sleep(self.sleep_delay)
            self._sleep()
        return web.json_response(None)

    async def sglang_resume(self, request: web.Request) -> web.Response:
        if (refused := await _sglang_body(request)) is not None:
            return refused
        if self.can_release:
            error = await self._wake()
            if error:
                return web.json_response({"object": "error", "message": error, "code": 400}, status=400)
        return web.json_response(None)

    def _sleep(self) -> None:
        if not self.sleeping:
            self.release()
            self.sleeping = True
            self.stats["sleeps"] += 1

    async def _wake(self) -> str | None:
        if not self.sleeping:
            return None
        await asyncio.sleep(self.wake_delay)
        error = self.claim()
        if error is None:
            self.sleeping = False
            self.stats["wakes"] += 1
        return error


async def _sglang_body(request: web.Request) -> web.Response | None:
    """FastAPI reads the dataclass argument from a JSON body: none, or not an object, is a 422."""
    try:
        body: Any = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        detail = [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]
        return web.json_response({"detail": detail}, status=422)
    return None
