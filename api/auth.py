"""Who may do what: client keys and their limits, and the admin key.

- Client routes need a client key when any is configured (`Authorization:
  Bearer <key>` or `x-api-key`); otherwise they are open and the daemon says
  so at start-up.
- Admin routes need ADMIN_API_KEY; without one they answer only loopback.
  A client key is refused there (403).
- A key is looked up by its SHA-256 and compared in constant time; keys are
  never logged or echoed (errors name the key's `name`). A key that passed
  is remembered (bytes -> state, at most one entry per configured key), so
  the hash is not recomputed per request: a dict lookup compares bytes only
  after a full match of Python's per-process random SipHash, so its timing
  does not reveal how much of a guess was right.
- Limits per key: allowed models, requests and tokens per minute (token
  buckets; tokens are charged after the answer, so a request may run the
  bucket into debt and the next one waits), concurrent requests, and the
  compute a request may ask for (`max_tokens`, `n`; also global limits).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass

from api.compute import Limits
from config.keys import KeyPolicy, KeyStore
from router.errors import Forbidden, RateLimited, Unauthorized
from router.fairness import PRIORITIES


class TokenBucket:
    """`per_minute` units, refilled continuously; `level` may go negative (debt)."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.level = per_minute
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: available now)."""
        self._refill()
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def effective_limits(policy: KeyPolicy | None, max_tokens: int, max_n: int) -> Limits:
    """The per-key limit, or the global one, whichever is lower; computed once, not per request."""

    def lower(a: int | None, b: int) -> int | None:
        values = [v for v in (a, b or None) if v is not None]
        return min(values) if values else None

    tokens = lower(policy.max_tokens if policy else None, max_tokens)
    n = lower(policy.max_n if policy else None, max_n)
    limits: list[tuple[str, int]] = []
    if tokens is not None:
        limits.append(("max_tokens", tokens))  # max_completion_tokens too: api/compute.py
    if n is not None:
        limits.append(("n", n))
    return tuple(limits)


@dataclass
class KeyState:
    policy: KeyPolicy
    digest: bytes  # SHA-256 of the key, computed once
    requests: TokenBucket | None
    tokens: TokenBucket | None
    limits: Limits = ()
    in_flight: int = 0
    priority: int = 1  # the key's admission class, an index into router.fairness.PRIORITIES


class Admission:
    """A client request let in; `finish()` charges its tokens and frees its slot."""

    __slots__ = ("done", "state")

    def __init__(self, state: KeyState | None) -> None:
        self.state = state
        self.done = state is None

    @property
    def counts_tokens(self) -> bool:
        return self.state is not None and self.state.tokens is not None

    def refund(self) -> None:
        """The daemon turned the request away before any engine saw it (GPU_OVERLOADED,
        QUEUE_FULL): it costs the key nothing, not even one of its requests."""
        if not self.done and self.state is not None and self.state.requests is not None:
            self.state.requests.give(1.0)
        self.finish(0)

    def finish(self, tokens: int) -> None:
        if self.done or self.state is None:
            return
        self.done = True
        self.state.in_flight -= 1
        if self.state.tokens is not None and tokens:
            self.state.tokens.take(tokens)


OPEN = Admission(None)


def may_use(policy: KeyPolicy, model: str, requested: str | None = None) -> bool:
    """Whether a key may have `model` serve a request that asked for `requested`: the model is
    on its list, or the alias asked for is (None: every model)."""
    allowed = policy.models
    return allowed is None or model in allowed or (requested is not None and requested in allowed)


def presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    """`Authorization: Bearer <key>` or `x-api-key`. `headers`: dict(scope["headers"])."""
    authorization = headers.get(b"authorization")
    if authorization and authorization[:7].lower() == b"bearer ":
        token = authorization[7:].strip()
        if token:
            return token
    return headers.get(b"x-api-key") or None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, store: KeyStore, max_tokens: int = 0, max_n: int = 0) -> None:
        self.store = store
        self.global_limits = effective_limits(None, max_tokens, max_n)  # requests without a key
        self._admin_digest = bytes.fromhex(store.admin_sha256) if store.admin_sha256 else None
        self._verified: dict[bytes, KeyState] = {}  # keys that passed _lookup; only configured ones
        self._states = {
            bytes.fromhex(sha): KeyState(
                policy=p,
                digest=bytes.fromhex(sha),
                requests=TokenBucket(p.requests_per_minute) if p.requests_per_minute else None,
                tokens=TokenBucket(p.tokens_per_minute) if p.tokens_per_minute else None,
                limits=effective_limits(p, max_tokens, max_n),
                priority=PRIORITIES.index(p.priority),
            )
            for sha, p in store.clients.items()
        }

    def _lookup(self, key: bytes) -> KeyState | None:
        state = self._verified.get(key)
        if state is not None:
            return state
        digest = _digest(key)
        state = self._states.get(digest)
        if state is not None and hmac.compare_digest(digest, state.digest):
            self._verified[key] = state
            return state
        return None

    def _is_admin(self, key: bytes | None) -> bool:
        if self._admin_digest is None or key is None:
            return False
        return hmac.compare_digest(_digest(key), self._admin_digest)

    # --------------------------------------------------------------- clients

    def client(self, headers: Mapping[bytes, bytes]) -> KeyState | None:
        """The caller's key state; None when no client keys are configured."""
        if not self.store.enforced:
            return None
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("An API key is required: Authorization: Bearer <key>, or x-api-key")
        state = self._lookup(key)
        if state is None and self._is_admin(key):
            return None  # the admin key may do anything a client may
        if state is None:
            raise Unauthorized("The API key is not valid")
        return state

    def admit(self, state: KeyState, model: str, requested: str | None = None) -> Admission:
        """Check the key's model list, concurrency and rates; count the request in flight.
        `model` serves the request; `requested` is the name asked for, when an alias: a key
        allowed the alias may use its versions. (What a request may ask for is `state.limits`,
        or `global_limits` without a key: api/compute.py enforces it.)"""
        policy = state.policy
        if not may_use(policy, model, requested):
            raise Forbidden(f"Key '{policy.name}' may not use model '{requested or model}'")
        if policy.max_concurrent is not None and state.in_flight >= policy.max_concurrent:
            raise RateLimited(
                f"Key '{policy.name}' already has {state.in_flight} requests in flight "
                f"(limit {policy.max_concurrent})",
                retry_after=1.0,
            )
        for bucket, unit in ((state.requests, "requests"), (state.tokens, "tokens")):
            if bucket is not None and (wait := bucket.wait_for(1.0)) > 0:
                raise RateLimited(f"Key '{policy.name}' is over its {unit} per minute", retry_after=wait)
        if state.requests is not None:
            state.requests.take(1.0)
        state.in_flight += 1
        return Admission(state)

    # ----------------------------------------------------------------- admin

    def admin(self, headers: Mapping[bytes, bytes], client: tuple[str, int] | None) -> None:
        key = presented_key(headers)
        if self.store.admin_sha256 is None:
            if not _is_loopback(client):
                raise Forbidden("Admin routes answer only loopback when ADMIN_API_KEY is not set")
            return
        if self._is_admin(key):
            return
        if key is not None and self._lookup(key) is not None:
            raise Forbidden("This is a client key; admin routes need ADMIN_API_KEY")
        raise Unauthorized("Admin routes need ADMIN_API_KEY: Authorization: Bearer <key>")
