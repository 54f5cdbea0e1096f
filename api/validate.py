"""`POST /v1/models/validate`: what the daemon would do with a request, without doing it.

The same checks as the inference path (api/inference.py, api/call.py), run on a copy of the
body, collecting what they find instead of stopping at the first: the model (through
aliases, without advancing a split's round robin), its type for the path, whether it can
run, whether the caller's key may use it, and what `fit` says of the body (limits, what the
engine understands). No engine is started, no rate is charged.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from api.auth import KeyState, may_use
from api.body import parse_payload
from api.call import Call, alias_session, fit, wrong_type
from api.compute import OUTPUT_LIMITS
from api.context import AppContext
from api.select import resolve_alias
from api.tenancy import request_priority
from backends.capabilities import ROUTES, SERVED_TYPES
from config.keys import KeyPolicy
from config.models import ModelSpec
from router.errors import (
    Forbidden,
    FormatNotSupported,
    InvalidRequest,
    ModelNotFound,
    RouterError,
)


def validate(
    ctx: AppContext, key: KeyState | None, request: Any, session: str | None, priority: bytes | None = None
) -> dict[str, Any]:
    problems: list[RouterError] = []
    answer: dict[str, Any] = {"valid": False, "model": None, "resolved": None, "problems": []}
    try:  # the X-Priority the real request would carry (sent to this route as it is)
        request_priority(key, priority)
    except RouterError as exc:
        problems.append(exc)
    path = request.get("path") if isinstance(request, dict) else None
    body = request.get("body") if isinstance(request, dict) else None
    if path not in SERVED_TYPES:
        problems.append(InvalidRequest(f"path: one of {', '.join(sorted(SERVED_TYPES))}, not {path!r}"))
        return _done(answer, problems)
    try:
        payload, requested = parse_payload(orjson.dumps(body))
    except RouterError as exc:
        return _done(answer, [*problems, exc])
    answer["model"] = requested
    policy = key.policy if key is not None else None
    try:
        spec = _resolve(ctx, requested, payload, session, policy)
    except Forbidden as exc:
        return _done(answer, [*problems, exc])
    if spec is None:
        return _done(answer, [*problems, ModelNotFound(requested, ctx.registry.names)])
    answer["resolved"] = spec.name
    mismatch = wrong_type(spec, requested, path)
    if mismatch is not None:
        problems.append(mismatch)
    if spec.name in ctx.registry.disabled:
        problems.append(
            FormatNotSupported(f"Model '{spec.name}' cannot run: {ctx.registry.disabled[spec.name]}")
        )
    if policy is not None and not may_use(policy, spec.name, requested):
        problems.append(Forbidden(f"Key '{policy.name}' may not use model '{requested}'"))
    call = Call(_no_send, "validate", 0.0)
    call.payload, call.requested = copy.deepcopy(payload), requested
    engine = ctx.manager.models[spec.name].first
    route = ROUTES[spec.backend].get(path)
    limits = ctx.auth.global_limits if key is None else key.limits
    try:
        fit(call, engine, route, path, limits, OUTPUT_LIMITS.get(path, ()))
    except RouterError as exc:
        if not any(type(p) is type(exc) for p in problems):
            problems.append(exc)
    return _done(answer, problems)


def _resolve(
    ctx: AppContext, requested: str, payload: dict[str, Any], session: str | None, key: KeyPolicy | None
) -> ModelSpec | None:
    spec = ctx.registry.models.get(requested)
    if spec is not None:
        return spec
    version = resolve_alias(ctx.aliases, requested, alias_session(session, payload), key, peek=True)
    return ctx.registry.models.get(version) if version is not None else None


def _done(answer: dict[str, Any], problems: list[RouterError]) -> dict[str, Any]:
    answer["problems"] = [{"code": p.code, "status": p.status, "message": p.message} for p in problems]
    answer["valid"] = not problems
    return answer


async def _no_send(message: Any) -> None:
    raise AssertionError("validate sends nothing")
