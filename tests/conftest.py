from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from config.environment import engine_base_env
from config.models import Registry, parse_registry
from config.settings import Settings
from lifecycle.manager import EngineManager
from tests.helpers import Daemon, registry_doc, wait_until
from tests.ray_cluster import is_ray_process


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Every test must leave no child process behind (engines included)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leaked() -> list[psutil.Process]:
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in before
            and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE
            and not is_ray_process(p)  # a fake Ray cluster's own (tests/ray_cluster.py)
        ]

    try:
        wait_until(lambda: not leaked(), timeout=10)
    except AssertionError:
        left = leaked()
        for p in left:
            p.kill()
        pytest.fail(f"test leaked processes: {[(p.pid, p.cmdline()) for p in left]}")


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"state_dir": tmp_path / "state", "stop_grace_period": 2.0}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def manager_for(
    tmp_path: Path, settings_for: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Any]]:
    """Build and start an EngineManager over fake-engine models; shut all down after."""
    managers: list[EngineManager] = []

    async def make(*models: dict[str, Any], **settings: Any) -> EngineManager:
        registry: Registry = parse_registry(registry_doc(*models), tmp_path / "models.yaml")
        manager = EngineManager(registry, settings_for(**settings), engine_base_env())
        await manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.shutdown()


@pytest.fixture
def daemon_for(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(doc: dict[str, Any], nofile: int | None = None, **env: str) -> Daemon:
        daemon = Daemon(tmp_path, doc, nofile=nofile, **env)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()
