"""Engine processes: spawn in their own group, pump their output, kill the group.

Engines fork workers (vLLM's EngineCore, SGLang's scheduler and detokenizer)
that outlive their parent and keep GPU memory if only the parent is killed
(vllm #55510, llama-swap #97). So every engine is the leader of its own
process group, and stopping means the whole group — plus any descendant that
moved to a group of its own, found through psutil before the first signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import psutil

TAIL_LINES = 200
POLL_INTERVAL = 0.02


class LogTail:
    """An engine's output: appended to its log file, the last lines kept in memory."""

    def __init__(self, path: Path, keep: int = TAIL_LINES) -> None:
        self.path = path
        self._lines: deque[str] = deque(maxlen=keep)
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: str) -> None:
        self._lines.append(line)
        with self.path.open("a", encoding="utf-8", errors="replace") as f:
            f.write(line + "\n")

    def tail(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:] if n > 0 else []

    def read_tail(self, n: int, max_bytes: int = 4 << 20) -> tuple[list[str], int]:
        """The last `n` lines of the log file (it outlives restarts), and its size."""
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except FileNotFoundError:
            return [], 0
        lines = data.decode("utf-8", errors="replace").splitlines()
        return (lines[-n:] if n > 0 else []), size

    def read_from(self, offset: int) -> tuple[bytes, int]:
        """Bytes appended since `offset`, and the new offset."""
        try:
            with self.path.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return b"", offset
        return data, offset + len(data)


class Spawned:
    """A started engine: the process, and the read end of its output pipe.

    The pipe is ours, not asyncio's subprocess transport's: in Python 3.11
    `Process.wait()` does not return until every pipe the transport owns is
    closed, and an engine's children inherit its stdout — so a crashed
    engine with a live child would never be seen to exit.
    """

    def __init__(
        self, proc: asyncio.subprocess.Process, output: asyncio.StreamReader, transport: asyncio.ReadTransport
    ) -> None:
        self.proc = proc
        self.output = output
        self._transport = transport

    def close_output(self) -> None:
        self._transport.close()


async def spawn(argv: Sequence[str], env: Mapping[str, str], log: LogTail) -> Spawned:
    """Start `argv` as the leader of a new session, its output into a pipe we read."""
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}")
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    return Spawned(proc, reader, transport)


async def pump_output(output: asyncio.StreamReader, log: LogTail) -> None:
    """Copy the engine's output into its log until the pipe closes."""
    while True:
        try:
            raw = await output.readline()
        except ValueError:  # a line longer than the stream limit: take what is there
            raw = await output.read(64 * 1024)
        if not raw:
            return
        log.write(raw.decode("utf-8", errors="replace").rstrip("\r\n"))


def _pgid_of(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int, not_before: float | None = None) -> list[psutil.Process]:
    """Live processes of group `pgid` (created at or after `not_before`, if given)."""
    members = []
    for proc in psutil.process_iter(["create_time"]):
        if _pgid_of(proc) != pgid or not _alive(proc):
            continue
        if not_before is not None and proc.info["create_time"] < not_before - 1.0:
            continue
        members.append(proc)
    return members


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(pgid: int, extra: Iterable[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for proc in extra:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _survivors(pgid: int, extra: Iterable[psutil.Process], not_before: float | None) -> list[psutil.Process]:
    seen = {p.pid: p for p in group_members(pgid, not_before)}
    for proc in extra:
        if proc.pid not in seen and _alive(proc):
            seen[proc.pid] = proc
    return list(seen.values())


async def terminate_group(
    pgid: int,
    grace: float,
    *,
    extra: Sequence[psutil.Process] = (),
    not_before: float | None = None,
) -> bool:
    """Stop every process of group `pgid` and `extra`. True if SIGKILL was needed.

    1. SIGTERM the group and the extra processes (descendants found earlier
       that may have left the group).
    2. Poll until none is alive, for at most `grace` seconds.
    3. SIGKILL whatever is left, and poll until it is gone.
    """
    _signal_all(pgid, extra, signal.SIGTERM)
    if await _wait_gone(pgid, extra, not_before, grace):
        return False
    _signal_all(pgid, _survivors(pgid, extra, not_before), signal.SIGKILL)
    await _wait_gone(pgid, extra, not_before, 5.0)
    return True


async def _wait_gone(
    pgid: int, extra: Sequence[psutil.Process], not_before: float | None, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while _survivors(pgid, extra, not_before):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)
    return True


def kill_group_now(pgid: int, extra: Iterable[psutil.Process] = ()) -> None:
    """Last resort when no event loop is left to wait with (interpreter exit)."""
    _signal_all(pgid, extra, signal.SIGKILL)
