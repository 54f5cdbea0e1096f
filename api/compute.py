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

from router.errors import InvalidRequest, LimitExceeded

Limits = tuple[tuple[str, int], ...]  # (request field, largest value allowed)
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
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


def enforce(limits: Limits, payload: dict[str, Any], generates: bool) -> bool:
    """Check `payload` against `limits`, rewriting it as described above; True if it changed."""
    changed = False
    for field, limit in limits:
        if field == "max_tokens":
            if generates:
                _enforce_tokens(limit, payload)
                changed = True
        elif field == "n" and payload.get("n") is not None:
            raw = payload["n"]
            n = as_int("n", raw)
            if n > limit:
                raise LimitExceeded(f"n is {n}; at most {limit} is allowed")
            changed |= type(raw) is not int
            payload["n"] = n
    return changed


def _enforce_tokens(limit: int, payload: dict[str, Any]) -> None:
    asked: list[int] = []
    for field in TOKEN_FIELDS:
        raw = payload.get(field)
        if raw is None:
            continue
        value = as_int(field, raw)
        if value > limit:
            raise LimitExceeded(f"{field} is {value}; at most {limit} is allowed")
        if value > 0:  # 0 and below mean "no limit" to llama.cpp: the limit applies
            asked.append(value)
    tokens = min(asked, default=limit)
    payload["max_tokens"] = tokens
    if payload.get("max_completion_tokens") is not None:
        payload["max_completion_tokens"] = tokens


def max_tokens_asked(payload: Mapping[str, Any]) -> int | None:
    """The most tokens the request lets the engine generate, if it says (None: the engine decides)."""
    values = []
    for field in TOKEN_FIELDS:
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
