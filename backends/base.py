"""The seam between the lifecycle manager and the engine kinds.

A backend turns a model entry into a command line and an environment, and
says how to ask the engine whether it is ready or alive. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from config.models import ModelSpec

LOOPBACK = "127.0.0.1"
# How long the engines' HTTP servers keep an idle connection open. All three
# serve through uvicorn, whose default is 5 s; SGLang and vLLM take a longer
# one from their environment, so the daemon's pooled connections to them
# survive a pause in traffic (a burst after a pause then opens none).
UVICORN_KEEP_ALIVE = 5.0
ENGINE_KEEP_ALIVE = 75.0


@dataclass(frozen=True)
class LaunchContext:
    """What the daemon decided for this start of the engine."""

    port: int
    model_path: str  # local file or directory, or a hub id the engine resolves
    base_env: Mapping[str, str]  # the daemon's allow-listed environment
    command: tuple[str, ...] | None = None  # models.yaml `engines:` override
    override_env: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = None
    sglang_max_running_requests: int | None = 3  # None: not passed (SGLang's own default)
    sglang_max_total_tokens: int = 0
    gpu_ids: tuple[int, ...] = ()  # where placement put it (CUDA_VISIBLE_DEVICES); () = the spec's gpu_id
    host: str = LOOPBACK  # the address it binds: loopback here, a node's private IP on Ray
    uds: str | None = None  # a Unix socket to serve on instead (host and port then unused)


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    keep_alive: float = UVICORN_KEEP_ALIVE  # seconds the engine keeps an idle connection


def ask_keep_alive(env: dict[str, str], variable: str) -> float:
    """Ask for ENGINE_KEEP_ALIVE through `variable`, unless the model's env set it; the value in force."""
    env.setdefault(variable, f"{ENGINE_KEEP_ALIVE:g}")
    try:
        return float(env[variable])
    except ValueError:
        return UVICORN_KEEP_ALIVE


@dataclass(frozen=True)
class SleepRoutes:
    """How an engine launched for sleep gives its GPU memory back and takes it again (POST)."""

    sleep: str
    wake: str
    body: object = None  # JSON sent with both; None: no body


class Backend(Protocol):
    name: str
    # Answers 2xx only once the engine can serve (polled during start).
    readiness_path: str
    # Polled by the health monitor while READY.
    liveness_path: str
    # None: the engine cannot sleep (models.yaml refuses `on_idle: sleep` for it).
    sleep_routes: SleepRoutes | None
    # It can serve on a Unix socket (LaunchContext.uds): a local engine then has no port that
    # other local users could reach.
    unix_socket: bool

    def launch(self, spec: ModelSpec, ctx: LaunchContext) -> LaunchSpec: ...


def engine_env(spec: ModelSpec, ctx: LaunchContext) -> dict[str, str]:
    """Clean environment: allow-list, then device pinning, then overrides, then the model's env."""
    env = dict(ctx.base_env)
    gpus = gpu_ids(spec, ctx)
    if spec.execution_mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
    env.update(ctx.override_env)
    env.update(spec.env)
    return env


def gpu_ids(spec: ModelSpec, ctx: LaunchContext) -> tuple[int, ...]:
    """The GPUs this start runs on: where placement put it, else the model's `gpu_id`."""
    return ctx.gpu_ids or spec.gpu_ids


def gpu_flags(spec: ModelSpec, ctx: LaunchContext, tp: str, memory: str, sleep: str) -> list[str]:
    """Tensor parallelism over the GPUs it runs on, its memory share, and sleep support,
    in the engine's own flag spellings."""
    flags = []
    gpus = gpu_ids(spec, ctx)
    if len(gpus) > 1:
        flags += [tp, str(len(gpus))]
    if spec.gpu_memory is not None:
        flags += [memory, f"{spec.gpu_memory:g}"]
    if spec.on_idle == "sleep":
        flags.append(sleep)
    return flags
