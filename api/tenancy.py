"""Who a request is for fair admission (router/fairness.py): its tenant, weight, priority, cost.

- Tenant: the API key's `name`; without client keys, the client's address.
- Weight: the key's `weight` (default 1).
- Priority: the key's `priority` (default normal). A request may lower it with
  `X-Priority: high | normal | low` (unless the key says `priority_header: false`), never
  raise it: a `normal` key asking for `high` is served as `normal`.
- Cost: the tokens the request lets the engine generate (`max_tokens` or
  `max_completion_tokens`, times `n`); DEFAULT_COST when it names no bound; 1 for routes
  that generate nothing (embeddings, rerank).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.auth import KeyState
from api.compute import as_int, max_tokens_asked
from router.errors import InvalidHeader, InvalidRequest
from router.fairness import DEFAULT_COST, PRIORITIES

NORMAL = PRIORITIES.index("normal")
_BY_NAME = {name.encode(): i for i, name in enumerate(PRIORITIES)}


def request_priority(key: KeyState | None, header: bytes | None) -> int:
    """The request's class (an index into PRIORITIES); 400 for an X-Priority it cannot mean."""
    base = NORMAL if key is None else key.priority
    if header is None or (key is not None and not key.policy.priority_header):
        return base
    asked = _BY_NAME.get(header.strip().lower())
    if asked is None:
        raise InvalidHeader("X-Priority must be one of high, normal or low")
    return max(base, asked)  # a larger index is a lower class: it may only go down


def tenant_of(key: KeyState | None, client: tuple[str, int] | None) -> tuple[str, float]:
    """The tenant's name and weight."""
    if key is not None:
        return key.policy.name, key.policy.weight
    return (client[0] if client else "-"), 1.0


def request_cost(payload: Mapping[str, Any], token_fields: tuple[str, ...]) -> float:
    if not token_fields:
        return 1.0
    tokens = max_tokens_asked(payload, token_fields)
    try:
        n = as_int("n", payload.get("n", 1) or 1)
    except InvalidRequest:
        n = 1
    return float(tokens or DEFAULT_COST) * max(1, n)
