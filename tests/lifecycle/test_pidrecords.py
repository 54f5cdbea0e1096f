"""Pid records never lead to an unrelated process: identities must match exactly (issue 25, 1)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from lifecycle.pidrecords import PidRecord, PidRecords
from lifecycle.process import Identity, identity_of
from tests.helpers import pid_alive, wait_until

HOUR_TICKS = 3600 * os.sysconf("SC_CLK_TCK")


def _dead_identity() -> Identity:
    """The identity a daemon that has since died had."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = identity_of(proc.pid)
    proc.wait()
    assert ident is not None
    return ident


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process leading its own session, as `setsid sleep 300` does."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    wait_until(lambda: identity_of(proc.pid) is not None, 5)
    yield proc
    proc.kill()
    proc.wait()


def _reap(run_dir: Path) -> list[PidRecord]:
    return asyncio.run(PidRecords(run_dir).reap_orphans(grace=1.0))


def _record(run_dir: Path, doc: dict[str, object]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"m.{doc['pid']}.json"
    path.write_text(json.dumps(doc))
    return path


def _doc(leader: Identity, daemon: Identity, members: tuple[Identity, ...] = ()) -> dict[str, object]:
    return {
        "model": "m", "boot_id": leader.boot, "pid": leader.pid, "start_ticks": leader.start,
        "members": [[m.pid, m.start] for m in members],
        "daemon_pid": daemon.pid, "daemon_start_ticks": daemon.start,
    }  # fmt: skip


def test_stale_record_naming_a_reused_pid_kills_nothing(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    """The record's engine started an hour before the process that now has its pid."""
    now = identity_of(stranger.pid)
    assert now is not None
    earlier = Identity(now.boot, now.pid, now.start - HOUR_TICKS)
    path = _record(tmp_path / "run", _doc(earlier, _dead_identity()))

    reaped = _reap(tmp_path / "run")

    assert reaped == [] and not path.exists()
    assert stranger.poll() is None and pid_alive(stranger.pid)


def test_record_of_an_older_daemon_without_start_ticks_is_dropped_unacted(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    """The format before identities, with `create_time: 0` (start time unreadable): the old
    daemon killed the group of whatever process held the pid."""
    doc = {"model": "m", "pid": stranger.pid, "pgid": stranger.pid, "create_time": 0.0,
           "daemon_pid": 999_999, "daemon_create_time": 0.0}  # fmt: skip
    path = _record(tmp_path / "run", doc)

    assert _reap(tmp_path / "run") == []
    assert not path.exists() and stranger.poll() is None


def test_record_from_before_a_reboot_is_dropped(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    now = identity_of(stranger.pid)
    assert now is not None
    other_boot = Identity("00000000-0000-0000-0000-000000000000", now.pid, now.start)
    daemon = _dead_identity()
    path = _record(tmp_path / "run", _doc(other_boot, Identity(other_boot.boot, daemon.pid, daemon.start)))

    assert _reap(tmp_path / "run") == []
    assert not path.exists() and stranger.poll() is None


def test_matching_leader_has_its_whole_group_stopped(tmp_path: Path) -> None:
    engine = subprocess.Popen(
        [sys.executable, "-c", "import subprocess as s, time; s.Popen(['sleep', '300']); time.sleep(300)"],
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(_children(engine.pid)) == 1, 5)
        child = _children(engine.pid)[0]
        leader = identity_of(engine.pid)
        assert leader is not None
        _record(tmp_path / "run", _doc(leader, _dead_identity()))

        reaped = _reap(tmp_path / "run")

        assert [r.leader for r in reaped] == [leader]
        assert engine.wait(5) == -signal.SIGTERM
        wait_until(lambda: not pid_alive(child), 5)
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()


def test_leader_gone_stops_only_recorded_workers_never_the_group(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    """A worker that outlived its leader is stopped by its own identity, and only it."""
    worker = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        wait_until(lambda: identity_of(worker.pid) is not None, 5)
        member = identity_of(worker.pid)
        gone = _dead_identity()
        assert member is not None
        _record(tmp_path / "run", _doc(gone, _dead_identity(), (member,)))

        reaped = _reap(tmp_path / "run")

        assert len(reaped) == 1
        assert worker.wait(5) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_record_is_never_written_without_an_identity(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: nothing under /proc any more
    records = PidRecords(tmp_path / "run")
    assert records.write("m", proc.pid) is None
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").glob("*.json")) == []


def test_identity_reads_the_kernel_start_time_exactly() -> None:
    me = identity_of(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.start > 0
    assert identity_of(os.getpid()) == me


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def test_a_stray_entry_in_the_run_directory_stops_nothing(tmp_path: Path) -> None:
    """Found by the review of issue 25: a directory named like a record made reaping raise
    IsADirectoryError, and the daemon did not start."""
    (tmp_path / "run" / "stray.json").mkdir(parents=True)
    assert _reap(tmp_path / "run") == []
    assert (tmp_path / "run" / "stray.json").is_dir()


def test_a_daemon_that_is_only_a_zombie_is_dead(tmp_path: Path) -> None:
    """Found by the review of issue 25: a SIGKILLed daemon whose parent had not yet waited for
    it still matched its record, so its engines were neither reaped nor their records removed."""
    daemon = subprocess.Popen(["sleep", "300"])
    engine = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        owner, leader = identity_of(daemon.pid), identity_of(engine.pid)
        assert owner is not None and leader is not None
        daemon.kill()
        wait_until(lambda: identity_of(daemon.pid) is None, 5)  # a zombie: not waited for yet
        assert Path(f"/proc/{daemon.pid}").exists()
        _record(tmp_path / "run", _doc(leader, owner))
        assert [r.leader for r in _reap(tmp_path / "run")] == [leader]
        assert engine.wait(5) == -signal.SIGTERM
    finally:
        daemon.wait()
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_a_record_from_another_pid_namespace_is_left_alone(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    """Found by the review of issue 25: a live daemon in another container sharing STATE_DIR
    lost its records (its pids mean nothing here)."""
    now = identity_of(stranger.pid)
    assert now is not None
    path = _record(tmp_path / "run", {**_doc(now, _dead_identity()), "pid_namespace": "pid:[1]"})
    assert _reap(tmp_path / "run") == []
    assert path.exists() and stranger.poll() is None


def test_orphans_are_reaped_together_not_one_grace_period_after_another(tmp_path: Path) -> None:
    """Found by the review of issue 25: four orphans ignoring SIGTERM, 2 s grace: 8 s."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    engines = [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(4)]
    try:
        for engine in engines:
            leader = wait_until(partial(identity_of, engine.pid), 5)
            _record(tmp_path / "run", _doc(leader, _dead_identity()))
        t0 = time.monotonic()
        assert len(asyncio.run(PidRecords(tmp_path / "run").reap_orphans(grace=1.0))) == 4
        assert time.monotonic() - t0 < 3.0, "four grace periods of 1 s, together"
        assert all(e.wait(5) == -signal.SIGKILL for e in engines)
    finally:
        for engine in engines:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
