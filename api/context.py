"""The one typed object the routes get: everything built by main.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from api.activity import Activity
from api.aliases import AliasTable
from api.auth import Authenticator
from api.metrics import Metrics
from config.models import Registry
from config.settings import ExecutionMode, Settings
from lifecycle.manager import EngineManager
from router.policy import OffloadPolicy


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    manager: EngineManager
    execution_mode: ExecutionMode
    metrics: Metrics
    auth: Authenticator
    activity: Activity = field(default_factory=Activity)  # recent requests and rates (the dashboard)

    @property
    def registry(self) -> Registry:
        """The registry in force (a reload replaces it)."""
        return self.manager.registry

    @functools.cached_property
    def aliases(self) -> AliasTable:
        return AliasTable(self.manager)

    @functools.cached_property
    def policy(self) -> OffloadPolicy:  # settings never change while the daemon runs
        return OffloadPolicy(
            mode=self.execution_mode,
            threshold=self.settings.offload_queue_threshold,
            offload_enabled=self.settings.enable_cpu_offload,
        )
