"""One inference request as it goes through the daemon, and how it is fitted to the engine
chosen for it (no I/O: the model's defaults, the limits, what the engine understands, and the
body the engine gets)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from api.auth import OPEN, Admission
from api.compute import (
    Limits,
    adapt,
    apply_defaults,
    enforce,
    max_tokens_asked,
    prompt_tokens_estimate,
    truthy,
)
from api.metrics import UNKNOWN_MODEL
from api.tenancy import NORMAL
from backends.capabilities import (
    CANNOT_CANCEL_DOCUMENTS,
    ENGINE_NAMES,
    SERVED_TYPES,
    STREAM_USAGE,
    EngineRoute,
)
from config.models import ModelSpec
from lifecycle.engine import Engine
from router.collect import collectable
from router.errors import EndpointNotSupported
from router.relay import Relay

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Call:
    """One request, from its first byte to its access-log line."""

    __slots__ = ("admission", "backend", "base64", "body", "engine_path", "id_header", "left", "metered",
                 "model", "payload", "pending", "priority", "relay", "request_id", "requested", "rewritten",
                 "send", "session", "t0")  # fmt: skip

    def __init__(self, send: Send, request_id: str, t0: float) -> None:
        self.send = send
        self.request_id = request_id
        self.t0 = t0
        self.id_header = [(b"x-request-id", request_id.encode())]
        self.model = UNKNOWN_MODEL  # the registry name asked for (metrics label)
        self.backend = ""
        self.requested = ""
        self.payload: dict[str, Any] = {}
        self.body = b""
        self.rewritten = False  # the payload changed: the body must be serialised again
        self.admission: Admission = OPEN
        self.metered = False  # the key is charged tokens
        self.relay: Relay | None = None
        self.engine_path = ""  # the path the chosen engine serves the route at
        self.base64 = False  # the client asked for base64 embeddings, which the engine lacks
        self.session: bytes | None = None  # X-Session-ID: prefix_affinity's key, an alias's session
        self.priority = NORMAL  # its admission class (api/tenancy.py)
        self.pending: object = None  # what it waits for when no engine could take it at once
        self.left = False  # its client went away while it waited

    @property
    def session_id(self) -> str | None:
        return self.session.decode("latin-1") if self.session else None


def alias_session(session_id: str | None, payload: dict[str, Any]) -> str | None:
    """What pins a client to an alias's version: X-Session-ID, else the OpenAI `user` field."""
    user = payload.get("user")
    return session_id or (user if isinstance(user, str) and user else None)


def wrong_type(spec: ModelSpec, requested: str, path: str) -> EndpointNotSupported | None:
    """The error for a model of a type `path` does not serve, or None."""
    types = SERVED_TYPES[path]
    if spec.type in types:
        return None
    return EndpointNotSupported(
        f"Model '{requested}' is a {spec.type} model; {path} serves {' or '.join(sorted(types))} models"
    )


def fit(call: Call, engine: Engine, route: EngineRoute | None, path: str, limits: Limits,
        token_fields: tuple[str, ...]) -> None:  # fmt: skip
    """Fit the request to the engine chosen: its model's defaults, the limits, and what the
    engine understands (backends/capabilities.py); `route`: how that engine serves `path`."""
    backend = engine.spec.backend
    if route is None:
        raise EndpointNotSupported(
            f"{path} is not served by {ENGINE_NAMES[backend]}, the engine of '{engine.name}'"
        )
    payload = call.payload
    if engine.spec.defaults:
        call.rewritten |= apply_defaults(engine.spec.defaults, payload, token_fields, limits)
    if limits:
        call.rewritten |= enforce(limits, payload, token_fields)
    if route.adapts:
        call.rewritten |= adapt(backend, route, payload)
        if route.lacks_base64 and payload.get("encoding_format") == "base64":
            del payload["encoding_format"]  # the engine answers floats: encoded on the way back
            call.rewritten = call.base64 = True
    call.engine_path = route.path


def engine_body(call: Call, engine: Engine, generates: bool) -> tuple[bytes, bool, bool]:
    """The body the engine gets; whether the daemon asked it for stream usage itself; and
    whether it asked for a stream to build the client's document from (router/collect.py).
    `generates`: the route is completions or chat."""
    payload, changed, hide_usage, collect = call.payload, call.rewritten, False, False
    served = engine.spec.served_name
    if served != call.requested:
        payload["model"] = served
        changed = True
    streams = truthy(payload.get("stream"))
    if call.metered and generates and engine.spec.backend in STREAM_USAGE and streams:
        options = payload.get("stream_options")
        if options is None or (isinstance(options, dict) and not truthy(options.get("include_usage"))):
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            changed = hide_usage = True
    elif generates and not streams and engine.spec.backend in CANNOT_CANCEL_DOCUMENTS:
        collect = collectable(payload)
        if collect:
            payload["stream"] = changed = True
    return (orjson.dumps(payload) if changed else call.body), hide_usage, collect


def tokens_owed(call: Call, disconnected: bool, token_fields: tuple[str, ...]) -> int:
    """Tokens a request costs its key: the engine's usage when it gave one; for a stream,
    what was streamed plus the prompt's estimate; for an answer its client abandoned,
    the prompt's estimate plus all it asked for (how far the engine got is not known)."""
    relay = call.relay
    if relay is None:
        return 0  # no engine saw it
    if relay.usage_tokens:
        return relay.usage_tokens
    if relay.streaming or relay.collecting:  # the tokens relayed or collected so far
        return prompt_tokens_estimate(call.payload) + relay.tokens
    if relay.complete or not disconnected:
        return 0
    asked = max_tokens_asked(call.payload, token_fields) if token_fields else 0
    return prompt_tokens_estimate(call.payload) + (asked or 0)
