"""The daemon's socket directory: private, made again when gone, never too long for AF_UNIX."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from lifecycle.sockets import MAX_PATH, NAME, SocketDir


def test_made_on_first_use_private_and_removed(tmp_path: Path) -> None:
    sockets = SocketDir((str(tmp_path),))
    assert list(tmp_path.iterdir()) == [], "nothing is made before an engine needs it"
    made = sockets.path()
    assert made is not None and made.parent == tmp_path and made.stat().st_mode & 0o777 == 0o700
    assert sockets.path() == made
    assert len(str(made / ("x" * NAME))) <= MAX_PATH
    sockets.remove()
    assert not made.exists()


def test_made_again_when_gone_or_no_longer_private(tmp_path: Path) -> None:
    """Found by the review of issue 25: a /tmp cleaner removing the directory left every later
    vLLM start failing at bind until the daemon restarted."""
    sockets = SocketDir((str(tmp_path),))
    first = sockets.path()
    assert first is not None
    shutil.rmtree(first)
    second = sockets.path()
    assert second is not None and second != first and second.is_dir()
    os.chmod(second, 0o755)  # someone opened it up: not the daemon's alone any more
    third = sockets.path()
    assert third not in (None, second) and third is not None and third.stat().st_mode & 0o777 == 0o700
    sockets.remove()
    assert not second.exists() and not third.exists()


def test_a_base_too_long_for_a_socket_path_is_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the review of issue 25: with a TMPDIR over ~61 characters every local vLLM
    engine failed at bind. A shorter base is used, or none (the engines then take ports)."""
    deep = tmp_path / ("d" * (MAX_PATH - len(str(tmp_path))))
    deep.mkdir()
    assert SocketDir((str(deep), str(tmp_path))).path() == next(tmp_path.glob("unified-inference-*"))
    with caplog.at_level(logging.WARNING):
        none = SocketDir((str(deep),))
        assert none.path() is None and none.path() is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1, "said once"
    assert "listen on loopback ports" in caplog.records[0].message
