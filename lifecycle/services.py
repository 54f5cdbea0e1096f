"""What every engine shares, built once by the manager."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from lifecycle.budget import GpuBudget
from lifecycle.model_files import ModelFiles
from lifecycle.pidrecords import PidRecords
from lifecycle.probe import Prober
from lifecycle.ray_cluster import RayCluster
from lifecycle.sockets import SocketDir
from lifecycle.state import EngineEvents, NoEvents


@dataclass(frozen=True)
class EngineServices:
    settings: Settings
    base_env: dict[str, str]
    prober: Prober
    pid_records: PidRecords
    model_files: ModelFiles
    log_dir: Path
    events: EngineEvents = field(default_factory=NoEvents)
    budget: GpuBudget | None = None  # GPU placement; None: GPU engines start unplaced
    cluster: RayCluster | None = None  # where `placement: ray` engines run (models.yaml `cluster:`)
    sockets: SocketDir | None = None  # the daemon's own 0700 directory for engines' Unix sockets
