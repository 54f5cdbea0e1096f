"""What a request asks the engine to compute, read as the engines read it (pure functions).

The engines parse requests with pydantic's lax mode: `"40"`, `40.0`, `" 40 "`
and `true` are integers to them, and llama.cpp reads a `max_tokens` of null,
0 or below as "until the context is full". A limit checked against the raw
JSON value would hold only for honest clients. So when a limit applies, the
value is parsed here with pydantic's own integer rules, checked, and written
back into the request as a plain integer; what the engine reads is what was
checked:

- `max_tokens` and `max_completion_tokens` (vLLM and SGLang read the latter
  for chat; llama.cpp ignores it): each given one must be within the limit,
  and `max_tokens` is always set to the smaller, or to the limit itself when
  the request sets neither, so every engine stops there.
- `n` must be within its limit.
- A value no engine would read as an integer is refused (400 INVALID_BODY).

Token metering also needs an estimate of a prompt's size where no engine
reports one (llama.cpp streams; a request abandoned before its answer):
`prompt_tokens_estimate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from backends.capabilities import ENGINE_NAMES, EngineRoute
from router.errors import InvalidRequest, LimitExceeded, ParameterNotSupported

Limits = tuple[tuple[str, int], ...]  # (request field, largest value allowed)
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# The fields that bound a route's output, the first one written when a limit applies.
OUTPUT_LIMITS: dict[str, tuple[str, ...]] = {
    "/v1/completions": TOKEN_FIELDS,
    "/v1/chat/completions": TOKEN_FIELDS,
    "/v1/responses": ("max_output_tokens",),
}
_LAX_INT: TypeAdapter[int] = TypeAdapter(int)
BYTES_PER_TOKEN = 4  # for estimates: English text runs ~4 bytes a token in most tokenizers


def as_int(field: str, value: Any) -> int:
    """`value` as pydantic (hence every engine) reads an integer field; 400 otherwise."""
    if type(value) is int:
        return value
    try:
        return _LAX_INT.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(f"{field} must be an integer, not {str(value)[:40]!r}") from exc


def enforce(limits: Limits, payload: dict[str, Any], token_fields: tuple[str, ...]) -> bool:
    """Check `payload` against `limits`, rewriting it as described above; True if it changed.
    `token_fields`: the route's fields that bound its output, the first one written (none:
    the route generates nothing)."""
    changed = False
    for field, limit in limits:
        if field == "max_tokens":
            if token_fields:
                _enforce_tokens(limit, payload, token_fields)
                changed = True
        elif field == "n" and payload.get("n") is not None:
            raw = payload["n"]
            n = as_int("n", raw)
            if n > limit:
                raise LimitExceeded(f"n is {n}; at most {limit} is allowed")
            changed |= type(raw) is not int
            payload["n"] = n
    return changed


def _enforce_tokens(limit: int, payload: dict[str, Any], fields: tuple[str, ...]) -> None:
    asked: list[int] = []
    for field in fields:
        raw = payload.get(field)
        if raw is None:
            continue
        value = as_int(field, raw)
        if value > limit:
            raise LimitExceeded(f"{field} is {value}; at most {limit} is allowed")
        if value > 0:  # 0 and below mean "no limit" to llama.cpp: the limit applies
            asked.append(value)
    tokens = min(asked, default=limit)
    payload[fields[0]] = tokens
    for field in fields[1:]:
        if payload.get(field) is not None:
            payload[field] = tokens


def apply_defaults(
    defaults: Mapping[str, Any], payload: dict[str, Any], token_fields: tuple[str, ...], limits: Limits = ()
) -> bool:
    """A model's request defaults (models.yaml `defaults:`), for what the request leaves out;
    `max_tokens` stands for the route's token fields, and counts as given when one of them is
    (null, 0 or below do not count: llama.cpp reads them as no limit); a limit under the
    default wins. True if the payload changed."""
    changed = False
    for field, value in defaults.items():
        if field == "max_tokens":
            if token_fields and max_tokens_asked(payload, token_fields) is None:
                for other in token_fields[1:]:
                    payload.pop(other, None)
                payload[token_fields[0]] = min([value, *(n for name, n in limits if name == "max_tokens")])
                changed = True
        elif payload.get(field) is None:
            payload[field] = value
            changed = True
    return changed


def adapt(backend: str, route: EngineRoute, payload: dict[str, Any]) -> bool:
    """Make the request one the engine reads as meant (backends/capabilities.py): refuse what
    it cannot honour, and give `max_completion_tokens` as `max_tokens` where it reads only
    that one. True if the payload changed."""
    for refusal in route.refusals:
        value = payload.get(refusal.field)
        if value is not None and refusal.applies(value):
            raise ParameterNotSupported(f"{refusal.field}: {ENGINE_NAMES[backend]} {refusal.lacks}")
    if not route.lacks_max_completion_tokens or "max_completion_tokens" not in payload:
        return False
    raw = payload.pop("max_completion_tokens")
    wanted = as_int("max_completion_tokens", raw) if raw is not None else 0
    current = payload.get("max_tokens")
    current = as_int("max_tokens", current) if current is not None else 0
    if wanted > 0:
        payload["max_tokens"] = min(wanted, current) if current > 0 else wanted
    return True


def max_tokens_asked(payload: Mapping[str, Any], token_fields: tuple[str, ...] = TOKEN_FIELDS) -> int | None:
    """The most tokens the request lets the engine generate, if it says (None: the engine decides)."""
    values = []
    for field in token_fields:
        raw = payload.get(field)
        if raw is not None:
            try:
                value = as_int(field, raw)
            except InvalidRequest:
                continue
            if value > 0:
                values.append(value)
    return min(values, default=None)


def prompt_tokens_estimate(payload: Mapping[str, Any]) -> int:
    """About how many tokens the request's input is: token ids counted, text at 4 bytes a token."""
    size = 0
    for field in ("prompt", "messages", "input", "query", "documents"):
        size += _text_bytes(payload.get(field))
    return math.ceil(size / BYTES_PER_TOKEN)


def _text_bytes(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, int) and not isinstance(value, bool):
        return BYTES_PER_TOKEN  # a token id
    if depth > 8:
        return 0
    if isinstance(value, list):
        return sum(_text_bytes(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v, depth + 1) for k, v in value.items() if k in ("content", "text"))
    return 0


def truthy(value: Any) -> bool:
    """A boolean field as pydantic reads it (`"false"` is false, `"yes"` true)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "on", "t", "true", "y", "yes")
    return value is True or (type(value) is int and value == 1) or (type(value) is float and value == 1.0)
