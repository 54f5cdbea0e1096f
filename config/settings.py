"""Daemon settings, read from the environment (and nothing else reads it).

Every variable of the spec is here with the spec's default. A few extra ones
(`STATE_DIR`, `STOP_GRACE_PERIOD`, `LOG_LEVEL`) cover what an operator of a
process supervisor needs; they are documented in the README.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.models import ModelTimeouts, Timeouts

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_MODELS_CONFIG = CONFIG_DIR / "models.yaml"

ExecutionMode = Literal["gpu", "cpu"]


def _default_state_dir() -> Path:
    return Path.home() / ".cache" / "unified-inference"


class Settings(BaseSettings):
    """Environment settings; names are the upper-case field names."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    execution_mode: Literal["gpu", "cpu", "auto"] = "auto"
    router_host: str = "0.0.0.0"
    router_port: int = Field(3001, ge=0, le=65535)

    sglang_max_running_requests: int = Field(3, ge=1)
    # 0 means "elastic": the flag is not passed and SGLang sizes its KV pool itself.
    sglang_max_total_tokens: int = Field(0, ge=0)

    # Relative paths are taken from the working directory; the default is the
    # models.yaml shipped beside this module, so `python main.py` works anywhere.
    models_config_path: Path = DEFAULT_MODELS_CONFIG

    default_idle_timeout: float = Field(300.0, ge=0)
    health_check_interval: float = Field(10.0, gt=0)
    # Missed liveness probes in a row before a READY engine is declared hung.
    health_check_failures: int = Field(3, ge=1)
    startup_timeout: float = Field(120.0, gt=0)

    # Data plane timeouts (per model in models.yaml `timeouts:`), in seconds:
    # connecting to the engine; from sending the request to the answer's first
    # byte (queueing and prompt processing included); the longest silence
    # between chunks of a stream (the "soft" limit); the whole request (the
    # "hard" limit, 0 = none). Past any of them: BACKEND_TIMEOUT.
    backend_connect_timeout: float = Field(10.0, gt=0)
    backend_first_byte_timeout: float = Field(600.0, gt=0)
    backend_read_timeout: float = Field(600.0, gt=0)
    backend_total_timeout: float = Field(0.0, ge=0)
    max_request_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # An engine's non-streaming answer is read whole before it is sent on (so a
    # broken one is a clean 502); larger ones get 502 RESPONSE_TOO_LARGE.
    max_response_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # Client connections (api/connections.py): how many may be open, how large
    # a request head may be, and how long a client may keep the daemon waiting.
    max_connections: int = Field(1024, ge=1)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    client_header_timeout: float = Field(10.0, gt=0)
    client_body_timeout: float = Field(30.0, gt=0)
    client_keep_alive_timeout: float = Field(5.0, gt=0)
    client_write_timeout: float = Field(60.0, gt=0)
    # /docs, /redoc and /openapi.json (off: they describe the API to anyone who asks).
    enable_docs: bool = False
    # Requests allowed to wait for one model's engine to start (per model:
    # `max_queued_requests`); more get 429 QUEUE_FULL.
    max_queued_requests: int = Field(256, ge=1)
    # On SIGTERM (and for an admin stop without force): how long requests in
    # flight may run on before they are cut off and the engines stopped.
    shutdown_grace_period: float = Field(30.0, ge=0)

    # GPU capacity: engines holding GPU memory at once (0 = no limit), and how long an
    # engine with `on_idle: sleep` may sleep before its process stops too.
    max_loaded_models: int = Field(0, ge=0)
    default_sleep_timeout: float = Field(3600.0, ge=0)

    enable_cpu_offload: bool = True
    offload_queue_threshold: int = Field(3, ge=1)
    # Seconds a request may wait for a slot on a saturated GPU model with no CPU twin or
    # replica to go to (per model: `queue_timeout`); 0: 429 GPU_OVERLOADED at once.
    queue_timeout: float = Field(0.0, ge=0)

    # Pid records, per-model engine logs and assembled model files live here.
    state_dir: Path = Field(default_factory=_default_state_dir)
    # SIGTERM -> this many seconds -> SIGKILL for an engine's process group.
    stop_grace_period: float = Field(10.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "text" (one line, with the request ID) or "json" (one JSON object per line).
    log_format: Literal["text", "json"] = "text"

    # Client keys (comma-separated) and/or a YAML keys file with per-key policy
    # (see config/keys.py); the admin key for /v1/admin/*. No client keys: the
    # API is open (a warning says so). No admin key: admin answers loopback only.
    api_keys: SecretStr = SecretStr("")
    api_keys_file: Path | None = None
    admin_api_key: SecretStr | None = None
    # Proxies whose X-Forwarded-For/-Proto are believed on control routes (so
    # "loopback only" means the real client), comma-separated IPs/networks or "*".
    forwarded_allow_ips: str = "127.0.0.1"
    # Global caps on what a request may ask for (0 = none); keys may set lower ones.
    max_tokens_limit: int = Field(0, ge=0)
    max_n_limit: int = Field(0, ge=0)

    # How to launch each engine when models.yaml has no `engines:` entry for
    # it (shell-style strings, e.g. "/opt/sglang/bin/python -m sglang.launch_server").
    # Unset: the engine's module run by this daemon's own Python.
    sglang_command: str | None = None
    vllm_command: str | None = None
    llamacpp_command: str | None = None

    def engine_command(self, backend: str) -> tuple[str, ...] | None:
        value: str | None = getattr(self, f"{backend}_command")
        return tuple(shlex.split(value)) if value else None

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def model_cache_dir(self) -> Path:
        return self.state_dir / "models"


def resolve_timeouts(model: ModelTimeouts, settings: Settings) -> Timeouts:
    """A model's `timeouts:` over the global BACKEND_*_TIMEOUT settings."""
    return Timeouts(
        connect=model.connect or settings.backend_connect_timeout,
        first_byte=model.first_byte or settings.backend_first_byte_timeout,
        idle=model.idle or settings.backend_read_timeout,
        total=settings.backend_total_timeout if model.total is None else model.total,
    )


def resolve_execution_mode(setting: str, gpu_count: int) -> ExecutionMode:
    """`auto` means gpu when NVML sees at least one GPU, else cpu."""
    if setting == "gpu":
        return "gpu"
    if setting == "cpu":
        return "cpu"
    return "gpu" if gpu_count > 0 else "cpu"
