"""Where and how one engine's process runs: the seam between an engine's state and its process.

The Engine (lifecycle/engine.py) owns state and intent: when to start, stop, sleep,
what a failure means. A placement owns how the process is started, probed, stopped and
where it listens. `LocalPlacement` runs it on this host as a process group on a loopback
port; placing engines elsewhere (a Ray cluster) is another implementation of the same
few methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping

from backends.base import LOOPBACK, Backend, LaunchContext
from config.models import EngineOverride, ModelSpec
from lifecycle.model_files import ModelFileError
from lifecycle.ports import free_port
from lifecycle.process import (
    EngineProcess,
    LogTail,
    descendants,
    kill_group_now,
    pump_output,
    spawn,
    terminate_group,
)
from lifecycle.services import EngineServices
from lifecycle.state import EngineStartError
from router.address import unix_url

READY_POLL_INTERVAL = 0.025  # seconds between readiness probes during a start
PROBE_TIMEOUT = 2.0
Fail = Callable[[str], EngineStartError]  # the engine's start error, with its last output lines


def launch_key() -> str:
    """A fresh key for one launch of an engine. Hex, never url-safe base64: a key starting
    with "-" reads as a flag to argparse."""
    return secrets.token_hex(24)


class Placement:
    """What the Engine asks of where its process runs (LocalPlacement here; RayPlacement in
    lifecycle/ray_placement.py): launch, readiness, output, stop."""

    kind = "local"

    def __init__(self, key: str, services: EngineServices, log: LogTail) -> None:
        self.key = key  # the pid record's (or Ray actor's) name
        self._services = services
        self.log = log
        self.exited: asyncio.Task[int] | None = None  # done when the process has exited
        self._pump: asyncio.Task[None] | None = None
        self.host = LOOPBACK  # where it listens
        self.node_id: str | None = None  # the Ray node it runs on (Ray placement only)
        self.port: int | None = None
        self.socket: str | None = None  # the Unix socket it serves on instead of a port
        self._socket_url = ""  # its base URL, made once per launch (read on every request)
        self.api_key: str | None = None  # this launch's key; only the daemon knows it
        self.keep_alive = 0.0  # how long this launch keeps an idle connection open

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        if self.socket is not None:
            return self._socket_url
        return f"http://{self.host}:{self.port}"

    def exit_code(self) -> int | None:
        """The exit code once the process has exited (without waiting for the exit notice)."""
        raise NotImplementedError

    def refused(self) -> int | None:
        """The engine refused a connection: its exit code if it is gone (None: it lives, and
        the refusal is the request's error). Here the process is asked."""
        return self.exit_code()

    @property
    def may_place(self) -> bool:
        """Whether a start may find room now (a Ray cluster says no for a while after a
        placement timed out)."""
        return True

    async def place(self, spec: ModelSpec, override: EngineOverride | None) -> None:
        """Find where the process will run, before its start (local: this host, at once)."""

    async def launch(
        self, spec: ModelSpec, backend: Backend, override: EngineOverride | None, gpu_ids: tuple[int, ...],
        fail: Fail,
    ) -> None:  # fmt: skip
        raise NotImplementedError

    async def terminate(self) -> None:
        raise NotImplementedError

    def kill_now(self) -> None:
        raise NotImplementedError

    async def await_ready(
        self, path: str, deadline: float, timeout: float, abort: asyncio.Event, fail: Fail,
        exit_reason: Callable[[int], Awaitable[str]],
    ) -> None:  # fmt: skip
        """Poll the readiness route `path` until 2xx; fail as soon as the process exits."""
        exited = self.exited
        assert exited is not None
        url = self.base_url + path
        aborted = asyncio.get_running_loop().create_task(abort.wait())
        try:
            while True:
                if abort.is_set():
                    raise fail("start aborted by a stop request")
                if exited.done():
                    await self.drain_output()
                    raise fail(await exit_reason(exited.result()))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise fail(f"engine not ready after {timeout:.0f}s (STARTUP_TIMEOUT)")
                if await self._services.prober.ok(url, min(PROBE_TIMEOUT, remaining), self.api_key):
                    return
                await asyncio.wait({exited, aborted}, timeout=min(READY_POLL_INTERVAL, max(remaining, 0)))
        finally:
            aborted.cancel()

    async def drain_output(self) -> None:
        # The pipe may stay open if a child inherited it: do not wait long.
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 0.5)

    def _context(
        self, spec: ModelSpec, override: EngineOverride | None, model_path: str, gpu_ids: tuple[int, ...],
        base_env: Mapping[str, str],
    ) -> LaunchContext:  # fmt: skip
        settings = self._services.settings
        return LaunchContext(
            port=self.port or 0,
            uds=self.socket,
            host=self.host,
            model_path=model_path,
            base_env=base_env,
            command=override.command if override else None,
            override_env=override.env if override else {},
            sglang_max_running_requests=settings.sglang_max_running_requests,
            sglang_max_total_tokens=settings.sglang_max_total_tokens,
            api_key=self.api_key,
            gpu_ids=gpu_ids,
        )


class LocalPlacement(Placement):
    """One engine's process on this host: its process group, loopback port, key and output."""

    def __init__(self, key: str, services: EngineServices, log: LogTail) -> None:
        super().__init__(key, services, log)
        self._proc: EngineProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        return self._proc.popen.poll() if self._proc is not None else None

    async def launch(
        self, spec: ModelSpec, backend: Backend, override: EngineOverride | None, gpu_ids: tuple[int, ...],
        fail: Fail,
    ) -> None:  # fmt: skip
        self._listen(spec, backend)
        self.api_key = launch_key()
        try:
            model_path = await asyncio.to_thread(self._services.model_files.resolve, spec.model_path)
        except ModelFileError as exc:
            raise fail(str(exc)) from exc
        launch = backend.launch(
            spec, self._context(spec, override, model_path, gpu_ids, self._services.base_env)
        )
        self.keep_alive = launch.keep_alive
        self.log.secret = self.api_key
        try:
            self._proc = await spawn(launch.argv, launch.env, self.log)
        except OSError as exc:
            self.log.write(f"=== could not launch: {exc}")
            raise fail(f"could not launch '{launch.argv[0]}': {exc}") from exc
        self._services.pid_records.write(self.key, self._proc.pid)
        loop = asyncio.get_running_loop()
        self._pump = loop.create_task(pump_output(self._proc.output, self.log))
        self.exited = loop.create_task(self._proc.wait())

    def _listen(self, spec: ModelSpec, backend: Backend) -> None:
        """Where this launch listens: a fresh Unix socket in the daemon's private directory when
        the engine can serve on one (a fixed `port` in models.yaml keeps TCP), else a port."""
        sockets = self._services.sockets
        wanted = sockets is not None and backend.unix_socket and spec.port is None
        socket_dir = sockets.path() if sockets is not None and wanted else None
        if socket_dir is not None:
            path = socket_dir / f"{secrets.token_hex(6)}.sock"
            path.unlink(missing_ok=True)  # the engine would not bind over a file left there
            self.socket, self.port = str(path), None
            self._socket_url = unix_url(self.socket)
        else:
            self.socket, self.port = None, spec.port or free_port()

    async def terminate(self) -> None:
        """Stop the process group (SIGTERM, grace, SIGKILL) and forget the process, once it is
        gone (till then its pid is shown: every process of the daemon's is in /v1/status)."""
        proc = self._proc
        if proc is not None:
            grace = self._services.settings.stop_grace_period
            killed = await terminate_group(proc.pid, grace, extra=descendants(proc.pid))
            if killed:
                self.log.write(f"=== did not exit within {grace:.1f}s of SIGTERM: killed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            self._services.pid_records.remove(self.key, proc.pid)
            await self.drain_output()  # the group is gone: its last lines are in the pipe
            self.log.write(f"=== exited with code {proc.returncode}")
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if proc is not None:
            proc.close_output()
        if self.socket is not None:  # the engine leaves its socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
            await self._services.prober.forget(self.socket)
        self.exited = None
        self.port = self.socket = None
        self._proc = None

    async def await_ready(
        self, path: str, deadline: float, timeout: float, abort: asyncio.Event, fail: Fail,
        exit_reason: Callable[[int], Awaitable[str]],
    ) -> None:  # fmt: skip
        await super().await_ready(path, deadline, timeout, abort, fail, exit_reason)
        # Ready: its workers are forked by now. Recorded too, so that a daemon reaping after a
        # crash can stop the ones that outlive their leader (vLLM's EngineCore, say).
        if self._proc is not None:
            self._services.pid_records.write(self.key, self._proc.pid, descendants(self._proc.pid))

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit, a cancelled start)."""
        if self._proc is not None and self._proc.returncode is None:
            kill_group_now(self._proc.pid, descendants(self._proc.pid))
