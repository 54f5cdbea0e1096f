"""Engine states, the legal transitions between them, and lifecycle errors.

    STOPPED ──▶ STARTING ──▶ READY ──▶ STOPPING ──▶ STOPPED
                   │  ▲        │  ▲        │ ▲
                   ▼  │        ▼  │        ▼ │
                  FAILED ◀── SLEEPING ──▶ WAKING
                             (GPU memory freed, process kept)

SLEEPING: an idle engine with `on_idle: sleep` (or one evicted to make room)
has given its GPU memory back but keeps its process; a request wakes it
(SLEEPING -> WAKING -> READY). A wake that fails stops it (WAKING ->
STOPPING) and the request falls back to a cold start. Asleep longer than
`sleep_timeout`, it stops (SLEEPING -> STOPPING). A sleep call the engine
refuses stops it too (SLEEPING -> STOPPING).

FAILED means the process group is gone and the last start or run ended
badly; the next `ensure_ready` (after a back-off) or an admin start retries.

Errors (all are `EngineError`; the API maps them to MODEL_UNAVAILABLE):

    EngineError
     ├── EngineStartError      the engine exited, timed out or could not be launched
     ├── EngineBackingOff      recent starts failed; `retry_at` says when to try again
     ├── EngineDraining        an operator's stop or a reload is draining it (503)
     ├── EngineQueueFull       too many requests already wait for its start (429)
     └── EngineNoRoom          no room on its GPUs: busy engines hold it (429, lifecycle/budget.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    SLEEPING = "sleeping"
    WAKING = "waking"


S = EngineState
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> STOPPING is an operator's stop (or daemon exit) during start.
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.STOPPING, S.SLEEPING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING}),
    S.WAKING: frozenset({S.READY, S.STOPPING}),
    # STOPPING ends in FAILED when the stop was for a crash or an unhealthy engine.
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: EngineState, new: EngineState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {new.value}")


class EngineError(Exception):
    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model
        self.message = message


class EngineStartError(EngineError):
    def __init__(self, model: str, message: str, log_tail: list[str]) -> None:
        super().__init__(model, message)
        self.log_tail = log_tail


class EngineBackingOff(EngineError):
    def __init__(self, model: str, message: str, retry_at: float) -> None:
        super().__init__(model, message)
        self.retry_at = retry_at


class EngineDraining(EngineError):
    pass


class EngineQueueFull(EngineError):
    pass


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot for /v1/status and tests."""

    name: str
    backend: str
    state: EngineState
    pid: int | None
    port: int | None
    in_flight: int
    draining: bool
    starts: int
    last_used: float | None
    failures: int
    last_error: str | None
    retry_at: float | None
    gpu_ids: tuple[int, ...] = ()  # where it runs (placed), or its gpu_id while not placed
    gpu_memory: float | None = None  # its share of each of those GPUs (GPU engines only)
    pinned: bool = False
    sleeps: int = 0
    wakes: int = 0
    replica: int = 0
    queued: int = 0  # requests waiting for it to start or wake
    placement: str = "local"  # local | ray
    host: str | None = None  # the address it listens on while it runs (a node's IP on Ray)
    node: str | None = None  # the Ray node it runs on
    socket: str | None = None  # the Unix socket it serves on (a local vLLM engine), port then None


class EngineEvents(Protocol):
    """What an engine reports as it goes (metrics implement it; lifecycle stays unaware)."""

    def started(self, model: str, backend: str, seconds: float, replica: int = 0) -> None: ...
    def start_failed(self, model: str, backend: str, replica: int = 0) -> None: ...
    def stopped(self, model: str, backend: str, replica: int = 0) -> None: ...
    def crashed(self, model: str, backend: str, replica: int = 0) -> None: ...
    def evicted(self, model: str, action: str, replica: int = 0) -> None: ...
    def woke(self, model: str, seconds: float, replica: int = 0) -> None: ...
    def warmed(self, model: str, seconds: float, replica: int = 0) -> None: ...
    def queue_left(self, model: str, priority: str, outcome: str, seconds: float) -> None: ...


class NoEvents:
    def started(self, model: str, backend: str, seconds: float, replica: int = 0) -> None:
        pass

    def start_failed(self, model: str, backend: str, replica: int = 0) -> None:
        pass

    def stopped(self, model: str, backend: str, replica: int = 0) -> None:
        pass

    def crashed(self, model: str, backend: str, replica: int = 0) -> None:
        pass

    def evicted(self, model: str, action: str, replica: int = 0) -> None:
        pass

    def woke(self, model: str, seconds: float, replica: int = 0) -> None:
        pass

    def warmed(self, model: str, seconds: float, replica: int = 0) -> None:
        pass

    def queue_left(self, model: str, priority: str, outcome: str, seconds: float) -> None:
        pass
