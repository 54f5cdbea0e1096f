"""The models.yaml registry: schema, cross-checks, and load errors with paths.

Errors name the file, the model and the field, e.g.
``config/models.yaml: models[2] 'qwen': port: 30003 is also used by models[0] 'bge'``.
All problems in a file are reported together; any of them stops the daemon,
except a format its backend cannot run: that model is loaded *disabled* and a
request for it gets 422 FORMAT_NOT_SUPPORTED (so one bad entry does not take
down every other model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends.capabilities import (
    DEFAULT_DEVICE,
    DEFAULT_FORMAT,
    GPU_BACKENDS,
    MANAGED_FLAGS,
    SUPPORTED_DEVICES,
    SUPPORTED_TYPES,
    BackendName,
    Device,
    ModelFormat,
    ModelType,
    format_problem,
)
from config.cluster import ClusterSpec, placement_problems


class ConfigError(Exception):
    """models.yaml could not be used; `problems` lists every reason found."""

    def __init__(self, source: Path, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


class ModelTimeouts(BaseModel):
    """Per-model overrides of the BACKEND_*_TIMEOUT settings (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: float | None = Field(None, gt=0)
    first_byte: float | None = Field(None, gt=0)
    idle: float | None = Field(None, gt=0)
    total: float | None = Field(None, ge=0)


class ReplicaRange(BaseModel):
    """`replicas: {min: 0, max: 4}`: replicas scaled with load between `min` and `max`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(0, ge=0)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


RoutingPolicy = Literal["round_robin", "least_loaded", "prefix_affinity"]


class WarmupSpec(BaseModel):
    """`warmup: {prompt: "...", max_tokens: 1}`: the request sent before the engine serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field("Hello", min_length=1)
    max_tokens: int = Field(1, ge=1)


@dataclass(frozen=True)
class Timeouts:
    """Resolved data-plane timeouts for one model; total 0 = no limit."""

    connect: float
    first_byte: float
    idle: float
    total: float


class ModelSpec(BaseModel):
    """One entry of `models:`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[^\s/]+$")
    type: ModelType = "llm"
    backend: BackendName
    execution_mode: Device  # defaults from the backend (see below)
    model_path: str = Field(min_length=1)
    format: ModelFormat  # defaults from the backend
    gpu_id: int | list[int] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    idle_timeout: float | None = Field(None, ge=0)
    cpu_offload_model: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    served_model_name: str | None = None
    timeouts: ModelTimeouts = Field(default_factory=ModelTimeouts)
    max_queued_requests: int | None = Field(None, ge=1)
    # Seconds a request may wait for a slot when this GPU model is saturated (unset:
    # QUEUE_TIMEOUT; 0: 429 at once). Who is admitted next: router/fairness.py.
    queue_timeout: float | None = Field(None, ge=0)
    # Request fields applied when a request leaves them out (max_tokens: when it gives
    # neither max_tokens nor max_completion_tokens).
    defaults: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None  # what the model is, for people: logged at start-up
    # GPU capacity (SGLang and vLLM only): the share of each of its GPUs' memory the
    # engine may use (unset: the whole card), what an idle engine does, how long it
    # may sleep before it stops too (unset: DEFAULT_SLEEP_TIMEOUT), and whether
    # it may be evicted to make room for another model.
    gpu_memory: float | None = Field(None, gt=0, le=1)
    on_idle: Literal["stop", "sleep"] = "stop"
    sleep_timeout: float | None = Field(None, ge=0)
    pinned: bool = False
    # Replicas (lifecycle/replicas.py): a fixed number, or a range scaled with load; GPU
    # replicas take `tensor_parallel_size` GPUs each from the pool `gpu_id` (unset: every GPU).
    replicas: Annotated[int, Field(ge=1)] | ReplicaRange | None = None
    tensor_parallel_size: int | None = Field(None, ge=1)
    routing: RoutingPolicy = "least_loaded"
    # Hot models: started with the daemon (before /health?ready=1 answers 200), and given one
    # request of their own before they serve (an engine's first request pays for its caches).
    preload: bool = False
    warmup: bool | WarmupSpec = False
    # Where its engine runs (config/cluster.py): this host, or a node of the Ray cluster in
    # `cluster:` with the custom resources `ray_resources`, on the node `node` (a Ray node id
    # or IP) when given.
    placement: Literal["local", "ray"] = "local"
    ray_resources: dict[str, float] = Field(default_factory=dict)
    node: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") in DEFAULT_DEVICE:
            data = dict(data)
            data.setdefault("execution_mode", DEFAULT_DEVICE[data["backend"]])
            data.setdefault("format", DEFAULT_FORMAT[data["backend"]])
        return data

    @field_validator("replicas", mode="before")
    @classmethod
    def _check_replicas(cls, value: Any) -> Any:
        """One clear message (a union's errors name its pydantic internals)."""
        if value is None or isinstance(value, ReplicaRange):
            return value
        if isinstance(value, dict):
            try:
                return ReplicaRange.model_validate(value)
            except ValidationError as exc:
                errors = exc.errors()
                why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'range'}: {e['msg']}" for e in errors)
                raise ValueError(f"{{min, max}}: {why}") from None
        if type(value) is not int or value < 1:
            raise ValueError(f"a number of replicas (1 or more) or {{min: 0, max: 4}}, not {value!r}")
        return value

    @field_validator("defaults")
    @classmethod
    def _check_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        tokens = value.get("max_tokens")
        if "max_tokens" in value and (type(tokens) is not int or tokens < 1):
            raise ValueError(f"defaults.max_tokens must be a whole number of at least 1, not {tokens!r}")
        if "max_completion_tokens" in value:
            raise ValueError("defaults: give max_tokens (it bounds max_completion_tokens too)")
        return value

    @property
    def gpu_managed(self) -> bool:
        """Its engine's GPU memory is budgeted and placed (SGLang and vLLM on a GPU)."""
        return self.backend in GPU_BACKENDS and self.execution_mode == "gpu"

    @property
    def budgeted(self) -> bool:
        """Placed on this host's GPUs by the daemon's budget (a Ray model's GPUs are Ray's)."""
        return self.gpu_managed and self.placement == "local"

    @property
    def share(self) -> float:
        """The share of each of its GPUs this engine holds while loaded (1.0: the whole card)."""
        return self.gpu_memory if self.gpu_memory is not None else 1.0

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max): `replicas: N` keeps N running; unset is one engine started on demand."""
        if self.replicas is None:
            return (0, 1)
        if isinstance(self.replicas, int):
            return (self.replicas, self.replicas)
        return (self.replicas.min, self.replicas.max)

    @property
    def pooled(self) -> bool:
        """Its replicas are each placed on `gpus_per_replica` GPUs picked from the pool
        `gpu_id` (a `gpu_id` list without `replicas` is one tensor-parallel engine)."""
        return self.replicas is not None and self.budgeted

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size or 1

    @property
    def warmup_request(self) -> WarmupSpec | None:
        if self.warmup is False:
            return None
        return WarmupSpec() if self.warmup is True else self.warmup

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        if self.gpu_id is None:
            return ()
        return (self.gpu_id,) if isinstance(self.gpu_id, int) else tuple(self.gpu_id)


class EngineOverride(BaseModel):
    """`engines: {<backend>: {command: [...], env: {...}}}`: how a backend is launched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: tuple[str, ...] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)


class GpuDeclaration(BaseModel):
    """`gpus: [{id: 0, memory_gb: 80}]`: a GPU where NVML cannot see it, or a cap on one it sees."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0)
    memory_gb: float = Field(gt=0)


class AliasSplit(BaseModel):
    """`aliases: {chat: {split: {qwen-v1: 90, qwen-v2: 10}, sticky: session}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: dict[str, Annotated[int, Field(gt=0, strict=True)]] = Field(min_length=1)
    sticky: Literal["none", "session"] = "session"


@dataclass(frozen=True)
class Alias:
    """An alias as the router uses it: versions and weights in the order written."""

    name: str
    weights: tuple[tuple[str, int], ...]
    sticky: bool  # a session keeps its version (X-Session-ID, else the request's `user`)

    @property
    def plain(self) -> bool:
        return len(self.weights) == 1


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec] = Field(default_factory=list)
    aliases: dict[str, str | AliasSplit] = Field(default_factory=dict)

    @field_validator("aliases", mode="before")
    @classmethod
    def _check_aliases(cls, value: Any) -> Any:
        """One clear message per alias (a union's errors name its pydantic internals)."""
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        problems = []
        for name, target in value.items():
            if not isinstance(name, str) or not name or any(c.isspace() or c == "/" for c in name):
                problems.append(f"{name!r}: an alias is a name without spaces or '/'")
            elif isinstance(target, str) and target:
                out[name] = target
            elif isinstance(target, dict):
                try:
                    out[name] = AliasSplit.model_validate(target)
                except ValidationError as exc:
                    errors = exc.errors()
                    problems += [f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors]
            else:
                problems.append(
                    f"{name}: a model name, or {{split: {{model: weight, ...}}, sticky: session}}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return out

    engines: dict[BackendName, EngineOverride] = Field(default_factory=dict)
    gpus: list[GpuDeclaration] = Field(default_factory=list)
    cluster: ClusterSpec | None = None


@dataclass(frozen=True)
class Registry:
    """The validated registry. `disabled` maps a model name to why it cannot run."""

    source: Path
    models: Mapping[str, ModelSpec]
    engines: Mapping[str, EngineOverride] = field(default_factory=dict)
    disabled: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[GpuDeclaration, ...] = ()
    aliases: Mapping[str, Alias] = field(default_factory=dict)
    cluster: ClusterSpec | None = None

    @property
    def names(self) -> list[str]:
        """What a request may name: the models, then the aliases."""
        return [*self.models, *self.aliases]

    def warnings(self) -> list[str]:
        """What loads but cannot run: disabled models, and the aliases' versions among them
        (their share of the split goes to the others; api/aliases.py)."""
        out = [f"model '{name}' is disabled: {reason}" for name, reason in self.disabled.items()]
        for alias in self.aliases.values():
            down = [v for v, _ in alias.weights if v in self.disabled]
            if down and len(down) < len(alias.weights):
                names = ", ".join(down)
                out.append(f"alias '{alias.name}': {names} cannot run: its share goes to the others")
            elif down:
                out.append(f"alias '{alias.name}': none of its versions can run: its requests get 422")
        return out


def load_registry(path: Path) -> Registry:
    """Read and validate `path`; raise ConfigError naming every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start} cannot be decoded)"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}"]) from exc
    return parse_registry(raw if raw is not None else {}, path)


def parse_registry(raw: object, source: Path) -> Registry:
    if not isinstance(raw, dict):
        raise ConfigError(source, ["top level must be a mapping with a 'models' list"])
    try:
        parsed = _RegistryFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, _describe_validation(exc, raw)) from exc
    aliases = {name: _alias(name, value) for name, value in parsed.aliases.items()}
    problems = (
        _cross_check(parsed.models)
        + [
            p
            for i, m in enumerate(parsed.models)
            for p in placement_problems(f"models[{i}] '{m.name}'", m, parsed.cluster)
        ]
        + _gpu_list_problems(parsed.gpus)
        + _alias_problems(aliases, parsed.models)
    )
    if problems:
        raise ConfigError(source, problems)
    disabled = {
        m.name: reason for m in parsed.models if (reason := format_problem(m.backend, m.format)) is not None
    }
    return Registry(
        source=source,
        models={m.name: m for m in parsed.models},
        engines={str(k): v for k, v in parsed.engines.items()},
        disabled=disabled,
        gpus=tuple(parsed.gpus),
        aliases=aliases,
        cluster=parsed.cluster,
    )


def _alias(name: str, value: str | AliasSplit) -> Alias:
    if isinstance(value, str):
        return Alias(name, ((value, 1),), sticky=False)
    return Alias(name, tuple(value.split.items()), sticky=value.sticky == "session")


def _alias_problems(aliases: Mapping[str, Alias], models: Sequence[ModelSpec]) -> list[str]:
    by_name = {m.name: m for m in models}
    problems = []
    for name, alias in aliases.items():
        where = f"aliases.{name}"
        if name in by_name:
            problems.append(f"{where}: shadows the model '{name}' (an alias needs a name of its own)")
        types = set()
        for target, _ in alias.weights:
            if target in by_name:
                types.add(by_name[target].type)
            elif target in aliases:
                problems.append(f"{where}: '{target}' is an alias (aliases name models, they do not chain)")
            else:
                problems.append(f"{where}: '{target}' is not a model in this file")
        if len(types) > 1:
            problems.append(f"{where}: its versions mix {' and '.join(sorted(types))} models")
    return problems


def _label(index: int, models: Sequence[Any]) -> str:
    name = models[index].get("name") if isinstance(models[index], dict) else None
    return f"models[{index}] '{name}'" if name else f"models[{index}]"


def _describe_validation(exc: ValidationError, raw: dict[str, Any]) -> list[str]:
    models = raw.get("models") if isinstance(raw.get("models"), list) else []
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) and models:
            rest = ".".join(str(part) for part in loc[2:]) or "(entry)"
            where = f"{_label(loc[1], models)}: {rest}"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {message}")
    return problems


def _cross_check(models: Sequence[ModelSpec]) -> list[str]:
    problems: list[str] = []
    first_by_name: dict[str, int] = {}
    first_by_port: dict[int, int] = {}
    by_name = {m.name: m for m in models}
    for i, m in enumerate(models):
        label = f"models[{i}] '{m.name}'"
        if m.name in first_by_name:
            problems.append(f"{label}: name: duplicate of models[{first_by_name[m.name]}]")
        first_by_name.setdefault(m.name, i)
        if m.port is not None:
            if m.port in first_by_port:
                j = first_by_port[m.port]
                problems.append(f"{label}: port: {m.port} is also used by models[{j}] '{models[j].name}'")
            first_by_port.setdefault(m.port, i)
        if m.execution_mode not in SUPPORTED_DEVICES[m.backend]:
            problems.append(
                f"{label}: execution_mode: backend '{m.backend}' cannot run on {m.execution_mode}"
            )
        if m.type not in SUPPORTED_TYPES[m.backend]:
            problems.append(f"{label}: type: backend '{m.backend}' cannot serve '{m.type}' models")
        if m.backend == "sglang" and ":" in m.served_name:
            problems.append(f"{label}: served_model_name: SGLang does not allow ':' (set served_model_name)")
        managed = sorted({a.split("=", 1)[0] for a in m.args} & MANAGED_FLAGS)
        if managed:
            problems.append(f"{label}: args: {', '.join(managed)} is set by the daemon")
        problems.extend(_offload_problems(label, m, by_name))
        problems.extend(_gpu_field_problems(label, m))
        problems.extend(_replica_problems(label, m))
    return problems


# Fields that place an engine on a GPU: only SGLang and vLLM take a memory share and sleep.
GPU_FIELDS = ("gpu_memory", "on_idle", "sleep_timeout", "pinned")


def _gpu_field_problems(label: str, m: ModelSpec) -> list[str]:
    problems = []
    managed = m.gpu_managed
    for name in GPU_FIELDS:
        if name not in m.model_fields_set or managed:
            continue
        if name == "on_idle" and m.on_idle == "stop":
            continue
        why = (
            "llama.cpp has no sleep mode"
            if m.backend == "llamacpp" and name == "on_idle"
            else (
                f"only GPU models on SGLang or vLLM take it (this one is {m.backend} on {m.execution_mode})"
            )
        )
        problems.append(f"{label}: {name}: {why}")
    if m.sleep_timeout is not None and m.on_idle != "sleep":
        problems.append(f"{label}: sleep_timeout: applies only with on_idle: sleep")
    if m.queue_timeout is not None and m.execution_mode != "gpu":
        problems.append(
            f"{label}: queue_timeout: only a GPU model has an in-flight bound to queue for "
            "(a CPU model's requests queue on its engine)"
        )
    if len(set(m.gpu_ids)) != len(m.gpu_ids):
        problems.append(f"{label}: gpu_id: {list(m.gpu_ids)} names a GPU twice")
    if any(i < 0 for i in m.gpu_ids):
        problems.append(f"{label}: gpu_id: GPU ids are 0 or more, not {list(m.gpu_ids)}")
    if managed and "CUDA_VISIBLE_DEVICES" in m.env:
        problems.append(f"{label}: env: CUDA_VISIBLE_DEVICES is set by the daemon (use gpu_id)")
    return problems


def _replica_problems(label: str, m: ModelSpec) -> list[str]:
    problems = []
    if m.replica_range[1] > 1 and m.port is not None:
        problems.append(
            f"{label}: port: each of its {m.replica_range[1]} replicas needs its own port (unset it)"
        )
    if m.tensor_parallel_size is not None:
        if not m.gpu_managed:
            problems.append(f"{label}: tensor_parallel_size: only GPU models on SGLang or vLLM take it")
        elif m.replicas is None and m.placement == "local":
            problems.append(
                f"{label}: tensor_parallel_size: applies to replicas (one tensor-parallel engine: "
                "a gpu_id list)"
            )
        elif m.gpu_ids and m.tensor_parallel_size > len(m.gpu_ids):
            problems.append(
                f"{label}: tensor_parallel_size: {m.tensor_parallel_size} GPUs per replica from a pool of "
                f"{len(m.gpu_ids)} (gpu_id {list(m.gpu_ids)})"
            )
    if "routing" in m.model_fields_set and m.replicas is None:
        problems.append(f"{label}: routing: applies to replicas (set replicas)")
    if m.warmup is not False and m.type == "reranker":
        problems.append(f"{label}: warmup: not for reranker models (the engines' rerank bodies differ)")
    return problems


def _gpu_list_problems(gpus: Sequence[GpuDeclaration]) -> list[str]:
    seen: set[int] = set()
    problems = []
    for i, gpu in enumerate(gpus):
        if gpu.id in seen:
            problems.append(f"gpus[{i}]: id: GPU {gpu.id} is declared twice")
        seen.add(gpu.id)
    return problems


def _offload_problems(label: str, m: ModelSpec, by_name: Mapping[str, ModelSpec]) -> list[str]:
    if m.cpu_offload_model is None:
        return []
    where = f"{label}: cpu_offload_model"
    twin = by_name.get(m.cpu_offload_model)
    if twin is None:
        return [f"{where}: '{m.cpu_offload_model}' is not a model in this file"]
    if twin.execution_mode != "cpu":
        return [f"{where}: '{twin.name}' is not a CPU model (execution_mode: {twin.execution_mode})"]
    if m.execution_mode != "gpu":
        return [f"{where}: only GPU models offload to a CPU twin"]
    if twin.type != m.type:
        return [f"{where}: '{twin.name}' is a {twin.type} model, not {m.type}"]
    return []
