"""The Ray actor that hosts one engine process on a cluster node.

Shipped to the node by value (lifecycle/ray_cluster.py registers this module with Ray's
cloudpickle), so it needs nothing of the daemon's code there: the standard library and Ray.

- The engine is spawned in the actor worker's own process group (no new session): when the
  actor is killed or its worker dies, Ray kills that group, so the engine and its children
  cannot outlive their host. `stop()` therefore never signals the group (it holds the
  worker): SIGTERM to the engine, a grace period, then SIGKILL to it and every descendant.
- It binds the node's IP (the daemon gives the engine `--host` with it), on a port the
  actor found free there; the engine's per-launch key is kept here too, so that a daemon
  restarted after a crash can re-attach (`info()`), as only holders of the Ray token can.
- Output lines are kept in a bounded buffer the daemon reads from (`output(since)`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
from typing import Any

OUTPUT_LINES = 5000


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class EngineHost:
    """Created detached and named by the daemon; one engine process for its lifetime."""

    def __init__(self, fingerprint: str, api_key: str) -> None:
        import ray

        self.fingerprint = fingerprint  # the model entry it was started for
        self.api_key = api_key
        self.ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.node_id = ray.get_runtime_context().get_node_id()
        self.port: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.seen = 0  # output lines ever read (the number of the line after the last)
        self._reader: asyncio.Task[None] | None = None

    def reserve(self) -> dict[str, Any]:
        """Where the engine will listen: this node's IP and a port free on it now."""
        with socket.socket() as s:
            s.bind((self.ip, 0))
            self.port = s.getsockname()[1]
        return {"ip": self.ip, "port": self.port, "node_id": self.node_id,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip

    async def start(self, argv: list[str], env: dict[str, str]) -> int:
        """Spawn the engine; its pid. `env` goes over this worker's own environment, whose
        CUDA_VISIBLE_DEVICES (the GPUs Ray gave this actor) always wins."""
        full = {**os.environ, **env}
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            full["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, env=full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self.seen += 1

    def output(self, since: int) -> tuple[int, list[str]]:
        """Lines numbered `since` onwards still held, and the number to ask from next."""
        first = self.seen - len(self.lines)
        start = max(since, first)
        return self.seen, list(self.lines)[start - first :]

    async def wait(self) -> int:
        """The engine's exit code, once it has exited."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 0.5)
        return code

    async def stop(self, grace: float) -> int | None:
        """SIGTERM, up to `grace` seconds, then SIGKILL to the engine and all it started."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            family = _children(proc.pid)
            _kill([proc.pid], signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                self.lines.append(f"=== did not exit within {grace:.1f}s of SIGTERM: killed")
            _kill([proc.pid, *family, *_children(proc.pid)], signal.SIGKILL)
            await proc.wait()
        else:
            _kill(_children(proc.pid), signal.SIGKILL)
        return proc.returncode

    def info(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "fingerprint": self.fingerprint, "api_key": self.api_key, "ip": self.ip, "port": self.port,
            "node_id": self.node_id, "pid": proc.pid if proc else None,
            "exit_code": proc.returncode if proc else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "descendants": _children(proc.pid) if proc else [],
        }  # fmt: skip
