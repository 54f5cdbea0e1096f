"""Pid records: how a daemon that was killed hard gets its engines reaped.

Each running engine has a small JSON file in `<STATE_DIR>/run/`, written
after spawn (and again once it is ready, naming the workers it forked), and
removed once its group is gone. A daemon that dies without cleaning up
(SIGKILL, OOM) leaves its records behind; the next daemon to start on the
same state directory reads them and stops the engines whose owning daemon is
no longer alive.

A pid alone names nothing: pids are reused, STATE_DIR outlives reboots, and
pids restart low after one. So every process in a record is named by its
*identity* — boot id, pid, and start time in clock ticks since boot (the
kernel's own, exact, from /proc/<pid>/stat) — and nothing is signalled unless
its identity matches exactly:

- the engine leader matches: its whole group is stopped (the group cannot have
  been taken over: a pid is not handed out again while a group bears its
  number), with the recorded workers that still match;
- the leader is gone or is another process now: only the recorded workers that
  still match are stopped, each by itself; the group is never signalled;
- a record without an identity (written by an older daemon, or unreadable) is
  dropped, and nothing is signalled for it;
- a record written in another pid namespace (a daemon in another container sharing
  the state directory) is left alone: its pids are not this namespace's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from lifecycle.process import Identity, boot_id, descendants, identity_of, pid_namespace, terminate_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PidRecord:
    model: str
    leader: Identity
    members: tuple[Identity, ...]  # workers found under the leader once it was ready
    daemon: Identity  # the daemon that started it
    namespace: str = ""  # the pid namespace the pids are in

    def to_json(self) -> str:
        return json.dumps({
            "model": self.model,
            "boot_id": self.leader.boot,
            "pid": self.leader.pid,
            "start_ticks": self.leader.start,
            "members": [[m.pid, m.start] for m in self.members],
            "daemon_pid": self.daemon.pid,
            "daemon_start_ticks": self.daemon.start,
            "pid_namespace": self.namespace,
        })

    @classmethod
    def from_json(cls, text: str) -> PidRecord:
        """Raises ValueError (or KeyError, TypeError) for a record without identities."""
        doc = json.loads(text)
        boot = doc["boot_id"]
        if not isinstance(boot, str) or not boot:
            raise ValueError("no boot id")

        def ident(pid: object, start: object) -> Identity:
            if type(pid) is not int or type(start) is not int or pid <= 0 or start <= 0:
                raise ValueError(f"not an identity: pid {pid!r}, start {start!r}")
            return Identity(boot, pid, start)

        return cls(
            model=str(doc["model"]),
            leader=ident(doc["pid"], doc["start_ticks"]),
            members=tuple(ident(p, s) for p, s in doc["members"]),
            daemon=ident(doc["daemon_pid"], doc["daemon_start_ticks"]),
            namespace=str(doc.get("pid_namespace", "")),
        )


def _still(ident: Identity) -> psutil.Process | None:
    """The live process `ident` names, or None when it has exited or its pid is another's."""
    if identity_of(ident.pid) != ident:
        return None
    try:
        proc = psutil.Process(ident.pid)  # psutil refuses to signal it if the pid changes hands
    except psutil.Error:
        return None
    return proc if identity_of(ident.pid) == ident else None


class PidRecords:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        me = identity_of(os.getpid())
        assert me is not None, "the daemon cannot read its own /proc entry"
        self._daemon = me

    def _path(self, model: str, pid: int) -> Path:
        return self.run_dir / f"{model}.{pid}.json"

    def write(self, model: str, pid: int, members: list[psutil.Process] | None = None) -> Path | None:
        """Record engine `pid` (and its workers `members`); None, and nothing written, when its
        identity cannot be read (it has already exited: there is nothing to reap later)."""
        leader = identity_of(pid)
        if leader is None:
            log.warning("engine '%s' (pid %d): no start time readable; no pid record written", model, pid)
            return None
        found = (identity_of(p.pid) for p in members or ())
        workers = tuple(m for m in found if m is not None)
        record = PidRecord(model, leader, workers, self._daemon, pid_namespace())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self._path(model, pid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def remove(self, model: str, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(model, pid).unlink()

    def _orphans(self) -> list[tuple[Path, PidRecord | None]]:
        """Every record whose daemon is gone (None: one to drop without acting on it)."""
        found: list[tuple[Path, PidRecord | None]] = []
        boot, namespace = boot_id(), pid_namespace()
        for path in sorted(self.run_dir.glob("*.json")):
            if not path.is_file():
                continue  # not a record of ours
            try:
                record = PidRecord.from_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("pid record %s has no usable identity (%s): dropped", path.name, exc)
                found.append((path, None))
                continue
            if record.leader.boot != boot:
                found.append((path, None))  # from before a reboot: its processes are long gone
                continue
            if record.namespace and record.namespace != namespace:
                continue  # another container's: its pids are not ours to read, nor its to lose
            if _still(record.daemon) is not None:
                continue  # another live daemon shares this state directory
            found.append((path, record))
        return found

    async def reap_orphans(self, grace: float) -> list[PidRecord]:
        """Stop the engines left by dead daemons, all at once (each may take its grace
        period); return the records acted on."""
        if not self.run_dir.is_dir():
            return []
        orphans = self._orphans()
        acted = await asyncio.gather(*(self._reap(r, grace) for _, r in orphans if r is not None))
        for path, _ in orphans:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove pid record %s: %s", path, exc)
        return [r for r, done in zip((r for _, r in orphans if r is not None), acted, strict=True) if done]

    async def _reap(self, record: PidRecord, grace: float) -> bool:
        leader = _still(record.leader)
        members = [p for p in map(_still, record.members) if p is not None]
        if leader is None and not members:
            return False
        log.warning(
            "reaping engine '%s' (pid %d%s) left by a daemon that died (pid %d)",
            record.model, record.leader.pid, "" if leader else ", its workers only",
            record.daemon.pid,
        )  # fmt: skip
        if leader is not None and _group_of(leader) == leader.pid:
            known = {m.pid for m in members}
            extra = members + [p for p in descendants(leader.pid) if p.pid not in known]
            await terminate_group(leader.pid, grace, extra=extra, not_before=_created(leader))
        else:
            await terminate_group(None, grace, extra=members + ([leader] if leader else []))
        return True


def _created(proc: psutil.Process) -> float | None:
    try:
        return proc.create_time()
    except psutil.Error:
        return None


def _group_of(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None
