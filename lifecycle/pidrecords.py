"""Pid records: how a daemon that was killed hard gets its engines reaped.

Each running engine has a small JSON file in `<STATE_DIR>/run/`, written
after spawn and removed once its group is gone. A daemon that dies without
cleaning up (SIGKILL, OOM) leaves its records behind; the next daemon to
start on the same state directory reads them and kills every group whose
owning daemon is no longer alive. A record names the owner by pid *and*
start time, so a recycled pid is never mistaken for a live owner, and the
engine leader likewise, so an unrelated process that reused its pid is
never killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from lifecycle.process import group_members, terminate_group

log = logging.getLogger(__name__)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class PidRecord:
    model: str
    pid: int
    pgid: int
    create_time: float
    daemon_pid: int
    daemon_create_time: float


class PidRecords:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._daemon_pid = os.getpid()
        self._daemon_create_time = _create_time(self._daemon_pid) or 0.0

    def _path(self, model: str, pid: int) -> Path:
        return self.run_dir / f"{model}.{pid}.json"

    def write(self, model: str, pid: int) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = PidRecord(
            model=model,
            pid=pid,
            pgid=pid,  # the engine leads its own session, so its group id is its pid
            create_time=_create_time(pid) or 0.0,
            daemon_pid=self._daemon_pid,
            daemon_create_time=self._daemon_create_time,
        )
        path = self._path(model, pid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def remove(self, model: str, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(model, pid).unlink()

    def _orphans(self) -> list[tuple[Path, PidRecord | None]]:
        found: list[tuple[Path, PidRecord | None]] = []
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                record = PidRecord(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                found.append((path, None))  # unreadable: drop it
                continue
            owner_time = _create_time(record.daemon_pid)
            if owner_time is not None and abs(owner_time - record.daemon_create_time) < 1.0:
                continue  # another live daemon shares this state directory
            found.append((path, record))
        return found

    async def reap_orphans(self, grace: float) -> list[PidRecord]:
        """Kill engines left by dead daemons; return the records acted on."""
        if not self.run_dir.is_dir():
            return []
        reaped = []
        for path, record in self._orphans():
            if record is not None and group_members(record.pgid, not_before=record.create_time):
                log.warning(
                    "reaping engine '%s' (pid %d) left by a daemon that died (pid %d)",
                    record.model,
                    record.pid,
                    record.daemon_pid,
                )
                await terminate_group(record.pgid, grace, not_before=record.create_time)
                reaped.append(record)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return reaped
