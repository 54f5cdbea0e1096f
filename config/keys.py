"""Client API keys: from API_KEYS (plain list) and API_KEYS_FILE (YAML, per-key policy).

    keys:
      - key: sk-team-a-3f9c...      # the secret itself, or:
        # key_sha256: 9b1d...       # its SHA-256 (hex), so the file holds no secret
        name: team-a                # shown in errors and metrics, never the key
        models: [gemma-3-270m]      # allowed models and aliases (default: all)
        requests_per_minute: 60     # token bucket (default: unlimited)
        tokens_per_minute: 20000    # engine-reported tokens (default: unlimited)
        max_concurrent: 4           # requests in flight at once
        max_tokens: 1024            # largest max_tokens a request may ask for
        max_n: 1                    # largest n
        priority: normal            # high | normal | low: admission order on a saturated model
        weight: 1                   # share of a saturated model's slots among waiting keys
        priority_header: true       # X-Priority may lower a request's priority (never raise it)

Keys are kept only as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.models import ConfigError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(None, min_length=8, repr=False)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    name: str = Field(min_length=1)
    models: tuple[str, ...] | None = None
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_n: int | None = Field(None, ge=1)
    priority: Literal["high", "normal", "low"] = "normal"
    weight: float = Field(1.0, gt=0, le=1000)
    priority_header: bool = True

    @model_validator(mode="after")
    def _one_key(self) -> KeyPolicy:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def sha256(self) -> str:
        return self.key_sha256 or digest(self.key or "")


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[KeyPolicy]


@dataclass(frozen=True)
class KeyStore:
    """Client keys by SHA-256, and the admin key's digest (None: admin is loopback-only)."""

    clients: dict[str, KeyPolicy]
    admin_sha256: str | None

    @property
    def enforced(self) -> bool:
        return bool(self.clients)


def load_keys(api_keys: str, keys_file: Path | None, admin_key: str | None) -> KeyStore:
    policies: list[KeyPolicy] = []
    for i, key in enumerate(k.strip() for k in api_keys.split(",") if k.strip()):
        try:
            policies.append(KeyPolicy(key=key, name=f"key-{i + 1}"))
        except ValidationError as exc:
            raise ConfigError(Path("API_KEYS"), [f"key {i + 1}: at least 8 characters"]) from exc
    if keys_file is not None:
        policies += _read_file(keys_file)
    clients: dict[str, KeyPolicy] = {}
    for policy in policies:
        if policy.sha256 in clients:
            raise ConfigError(keys_file or Path("API_KEYS"), [f"key '{policy.name}' is given twice"])
        clients[policy.sha256] = policy
    admin = digest(admin_key) if admin_key else None
    if admin is not None and admin in clients:
        raise ConfigError(Path("ADMIN_API_KEY"), ["the admin key must not also be a client key"])
    return KeyStore(clients=clients, admin_sha256=admin)


def _read_file(path: Path) -> list[KeyPolicy]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(path, [f"cannot read keys file: {exc}"]) from exc
    try:
        return _KeysFile.model_validate(raw).keys
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {message}")  # never the input: it may be a key
        raise ConfigError(path, problems) from exc
