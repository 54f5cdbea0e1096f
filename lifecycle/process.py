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
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil

TAIL_LINES = 200
POLL_INTERVAL = 0.02


class LogTail:
    """An engine's output: appended to its log file, the last lines kept in memory."""

    def __init__(self, path: Path, keep: int = TAIL_LINES) -> None:
        self.path = path
        self._lines: deque[str] = deque(maxlen=keep)
        self.secret: str | None = None  # the engine's launch key: never written out
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: str) -> None:
        if self.secret and self.secret in line:
            line = line.replace(self.secret, "***")
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


class EngineProcess:
    """A started engine and the read end of its output pipe.

    Spawned with subprocess.Popen, not the event loop's subprocess support:
    uvloop forks through libuv and runs Python's at-fork handlers in the
    child before exec, so a lock held by another thread at that moment
    (a worker of asyncio.to_thread, say) could deadlock the child — and
    libuv blocks the daemon's event loop until the child execs. (A soak
    freeze first blamed on this turned out to be a spinning waiter, fixed in
    engine.py; the safer spawn stays.) CPython's fork_exec runs no Python
    between fork and exec and calls setsid() in C.

    Exit is watched without threads: a pidfd becomes readable when the
    process ends (polling where pidfds are unavailable). The output pipe is
    ours too: children that inherit it cannot delay the exit notice.
    """

    def __init__(self, popen: subprocess.Popen[bytes], output: asyncio.StreamReader,
                 transport: asyncio.ReadTransport) -> None:  # fmt: skip
        self.popen = popen
        self.pid = popen.pid
        self.output = output
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
            self._loop.add_reader(self._pidfd, self._on_exit)
        except (AttributeError, OSError):  # no pidfd on this kernel: poll
            self._pidfd = -1
            self._poller = self._loop.create_task(self._poll())

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._reap()

    async def _poll(self) -> None:
        while self.popen.poll() is None:  # noqa: ASYNC110 -- no pidfd: nothing to wait on but time
            await asyncio.sleep(POLL_INTERVAL)
        self._reap()

    def _reap(self) -> None:
        code = self.popen.wait()  # it has exited: this returns at once
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close_output(self) -> None:
        self._transport.close()


async def spawn(argv: Sequence[str], env: Mapping[str, str], log: LogTail) -> EngineProcess:
    """Start `argv` as the leader of a new session, its output into a pipe we read."""
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}")
    read_fd, write_fd = os.pipe()
    try:
        # Blocking on purpose: fork+exec in C takes milliseconds, see EngineProcess.
        popen = subprocess.Popen(  # noqa: ASYNC220
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
            close_fds=True,
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
    return EngineProcess(popen, reader, transport)


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


@dataclass(frozen=True)
class Identity:
    """One process, unmistakably: pids are reused, a pid's start time within one boot is not."""

    boot: str  # /proc/sys/kernel/random/boot_id
    pid: int
    start: int  # start time, in clock ticks since boot (/proc/<pid>/stat, field 22)


@cache
def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()


def identity_of(pid: int) -> Identity | None:
    """The identity of live process `pid`; None when there is none (or only its zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):  # field 3, the state: dead, waiting to be reaped
            return None
        return Identity(boot_id(), pid, int(fields[19]))  # field 22: fields[0] is field 3
    except (IndexError, ValueError):
        return None


@cache
def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"): pids mean something only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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


def _signal_all(pgid: int | None, extra: Iterable[psutil.Process], sig: signal.Signals) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for proc in extra:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _survivors(
    pgid: int | None, extra: Iterable[psutil.Process], not_before: float | None
) -> list[psutil.Process]:
    seen = {p.pid: p for p in group_members(pgid, not_before)} if pgid is not None else {}
    for proc in extra:
        if proc.pid not in seen and _alive(proc):
            seen[proc.pid] = proc
    return list(seen.values())


async def terminate_group(
    pgid: int | None,
    grace: float,
    *,
    extra: Sequence[psutil.Process] = (),
    not_before: float | None = None,
) -> bool:
    """Stop every process of group `pgid` and `extra`. True if SIGKILL was needed.
    (`pgid` None: only `extra`, each by itself.)

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
    pgid: int | None, extra: Sequence[psutil.Process], not_before: float | None, timeout: float
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
