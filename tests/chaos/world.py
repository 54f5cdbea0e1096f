"""The chaos test's world: one daemon on fake engines that share a GPU ledger, and what it knows.

Two declared 80 GB GPUs; models that sleep, float, are pinned, replicated, queued, spill to a
CPU twin; an alias with a split; keys with allowlists, limits, priorities and weights. The
configuration has variants a reload (or SIGHUP) switches between: a model added, its replicas
changed, the split changed, an engine made to hang.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import FAKE_ENGINE

ADMIN = "sk-chaos-admin-0123456789"
KEYS: dict[str, dict[str, Any]] = {
    "ops": {"key": "sk-chaos-ops-0123456789", "priority": "high"},
    # Limits tight enough that a walk meets them: a check skipped would show (issue 26's mutations).
    "chatter": {"key": "sk-chaos-chatter-012345", "models": ["chat"], "tokens_per_minute": 300},
    "narrow": {"key": "sk-chaos-narrow-0123456", "models": ["a"]},  # a version of chat, not chat
    "metered": {
        "key": "sk-chaos-metered-012345", "requests_per_minute": 6, "max_concurrent": 3, "max_tokens": 32,
        "weight": 2,
    },
    "low": {"key": "sk-chaos-low-0123456789", "models": ["q", "c"], "priority": "low"},
}
SETTINGS = {
    "EXECUTION_MODE": "gpu",
    "OFFLOAD_QUEUE_THRESHOLD": "2",
    "STARTUP_TIMEOUT": "8",
    "STOP_GRACE_PERIOD": "1",
    "SHUTDOWN_GRACE_PERIOD": "2",
    "HEALTH_CHECK_INTERVAL": "1",
    "HEALTH_CHECK_FAILURES": "2",
    "MAX_LOADED_MODELS": "5",
    "ADMIN_API_KEY": ADMIN,
    "LOG_LEVEL": "info",
}
STOP_GRACE = 1.0
STARTUP_TIMEOUT = 8.0
SHUTDOWN_GRACE = 2.0
TWIN = "twin"


def _model(name: str, backend: str = "sglang", **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "backend": backend, "model_path": f"org/{name}"}
    if backend == "llamacpp":
        entry["model_path"] = f"/models/{name}.gguf"
    entry.update(fields)
    return entry


PACE = {"FAKE_TOKEN_DELAY": "0.01"}
BASE_MODELS: list[dict[str, Any]] = [
    _model("a", gpu_id=0, gpu_memory=0.4, on_idle="sleep", idle_timeout=1.5, sleep_timeout=8,
           cpu_offload_model=TWIN, env={**PACE, "FAKE_WAKE_DELAY": "0.2"}),
    # No gpu_id: placed where it fits, and asleep it must wake where its process is (25, 3).
    _model("b", "vllm", gpu_memory=0.4, on_idle="sleep", idle_timeout=2,
           env={**PACE, "FAKE_WAKE_DELAY": "0.1"}),
    _model("c", gpu_memory=0.5, idle_timeout=3, cpu_offload_model=TWIN,
           env={**PACE, "FAKE_START_DELAY": "0.5"}, timeouts={"first_byte": 3}),
    _model("pin", "vllm", gpu_id=1, gpu_memory=0.3, pinned=True, env=PACE),
    _model("rep", gpu_memory=0.3, replicas={"min": 0, "max": 2}, routing="prefix_affinity",
           idle_timeout=2, env=PACE),
    _model("q", gpu_id=1, gpu_memory=0.2, queue_timeout=2, idle_timeout=4,
           env={"FAKE_TOKEN_DELAY": "0.02"}),
    _model(TWIN, "llamacpp", execution_mode="cpu", idle_timeout=4),
]  # fmt: skip
BASE_SPLIT = {"a": 70, "b": 30}


@dataclass
class Variant:
    """What a reload can change: models.yaml is rewritten from these."""

    extra: bool = False  # a model "extra" is in the registry
    rep_max: int = 2
    split: dict[str, int] = field(default_factory=lambda: dict(BASE_SPLIT))
    c_hangs: bool = False  # c's engine answers no request (FAKE_HANG=request)

    def models(self) -> list[dict[str, Any]]:
        models = copy.deepcopy(BASE_MODELS)
        for m in models:
            if m["name"] == "rep":
                m["replicas"] = {"min": 0, "max": self.rep_max}
            if m["name"] == "c" and self.c_hangs:
                m["env"] = {**m["env"], "FAKE_HANG": "request"}
        if self.extra:
            models.append(_model("extra", gpu_memory=0.1, idle_timeout=2, env=PACE))
        return models

    @property
    def names(self) -> set[str]:
        return {m["name"] for m in self.models()}


@dataclass
class World:
    """A run's files: models.yaml, keys, the ledger, the state directory."""

    root: Path
    tag: str  # in every engine's environment: which processes are this run's
    variant: Variant = field(default_factory=Variant)

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "models.yaml"

    def document(self) -> dict[str, Any]:
        env = {"FAKE_GPU_LEDGER": str(self.ledger), "FAKE_LOG_REQUESTS": "1", "CHAOS_TAG": self.tag}
        engines = {b: {"command": [sys.executable, str(FAKE_ENGINE), b], "env": env}
                   for b in ("sglang", "vllm", "llamacpp")}  # fmt: skip
        return {
            "models": self.variant.models(),
            "engines": engines,
            "gpus": [{"id": 0, "memory_gb": 80}, {"id": 1, "memory_gb": 80}],
            "aliases": {"chat": {"split": dict(self.variant.split), "sticky": "session"}, "stable": "c"},
        }

    def write(self) -> None:
        self.config.write_text(yaml.safe_dump(self.document()))
        keys = [{"name": name, **{k: v for k, v in spec.items()}} for name, spec in KEYS.items()]
        (self.root / "keys.yaml").write_text(yaml.safe_dump({"keys": keys}))

    def env(self) -> dict[str, str]:
        return {**SETTINGS, "API_KEYS_FILE": str(self.root / "keys.yaml")}


def key_of(name: str) -> str:
    return str(KEYS[name]["key"])


TWINS = {"a": TWIN, "c": TWIN}


def usable(key: str, asked: str, versions: dict[str, set[str]]) -> set[str]:
    """The models key `key` may have serve a request for `asked` (an alias, per `versions`, the
    versions it has had): all of them when its list names the model or alias, else the
    versions on its list (issue 25, defect 4); their CPU twins may stand in."""
    models = KEYS[key].get("models")
    names = versions.get(asked, {asked})
    if models is None or asked in models:
        out = set(names)
    else:
        out = names & set(models) if asked in versions else set()
    return out | {TWINS[m] for m in out if m in TWINS}


def env_marked(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"CHAOS_TAG={tag}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def tag_for(seed: int) -> str:
    return f"chaos-{seed}-{os.getpid()}"
