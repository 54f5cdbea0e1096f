"""Which replica of a model serves a request: pure functions of a snapshot of replica loads.

lifecycle/replicas.py takes the snapshot and acts on the choice. Three policies:

- `round_robin`: the replicas in turn.
- `least_loaded`: fewest requests in flight; ties in turn.
- `prefix_affinity`: consistent hashing with bounded loads (Mirrokni et al., as KubeAI's
  CHWBL and Neutree's consistent-hash router): a request's key (the start of its prompt,
  or the client's X-Session-ID) maps to a point on a ring of replicas; it goes to the first
  replica clockwise whose load stays within `c` times the mean (+1), walking past full ones.
  The same prompt prefix keeps landing on the replica whose KV cache holds it, and a hot key
  cannot pile onto one replica. A replica joining or leaving the ring moves only its own keys.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Reason = Literal["affinity", "bounded_spill", "least_loaded", "round_robin"]
Policy = Literal["round_robin", "least_loaded", "prefix_affinity"]
LOAD_FACTOR = 1.25  # c: no replica above c x the mean load (+1)
VNODES = 100  # points per replica on the ring: a smooth share of the keys
PREFIX_CHARS = 256  # of a completion's prompt: the part a multi-turn session repeats


@dataclass(frozen=True)
class Replica:
    id: int
    in_flight: int


@dataclass(frozen=True)
class Choice:
    replica: int
    reason: Reason


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Replicas at VNODES points each; a key's walk visits every replica once, clockwise."""

    def __init__(self, ids: Iterable[int], vnodes: int = VNODES) -> None:
        points = sorted((_point(f"replica-{i}-{v}"), i) for i in set(ids) for v in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._ids = [i for _, i in points]

    def walk(self, key: str) -> Iterator[int]:
        if not self._ids:
            return
        start = bisect.bisect(self._hashes, _point(key))
        seen: set[int] = set()
        for k in range(len(self._ids)):
            replica = self._ids[(start + k) % len(self._ids)]
            if replica not in seen:
                seen.add(replica)
                yield replica


def limit(loads: Sequence[Replica], c: float = LOAD_FACTOR) -> float:
    """The most requests a replica may hold once this one is added: c x the mean (+1)."""
    mean = (sum(r.in_flight for r in loads) + 1) / len(loads)
    return c * mean + 1


def prefix_affinity(
    key: str, ring: HashRing, loads: Sequence[Replica], c: float = LOAD_FACTOR, cap: float = float("inf")
) -> Choice:
    """The key's replica, or the next one clockwise with room under the bound (and under
    `cap`, the in-flight count at which a replica takes no more)."""
    in_flight = {r.id: r.in_flight for r in loads}
    bound = min(limit(loads, c), cap)
    first = True
    for replica in ring.walk(key):
        if replica in in_flight and in_flight[replica] + 1 <= bound:
            return Choice(replica, "affinity" if first else "bounded_spill")
        first = first and replica not in in_flight  # a replica gone from the snapshot is skipped
    least = min(loads, key=lambda r: (r.in_flight, r.id))  # every one at the bound: the emptiest
    return Choice(least.id, "bounded_spill")


def choose(
    policy: Policy,
    loads: Sequence[Replica],
    *,
    turn: int,
    key: str | None = None,
    ring: HashRing | None = None,
    cap: float = float("inf"),
) -> Choice | None:
    """A replica of `loads` under `cap` by `policy`; None when every one is at `cap`.
    prefix_affinity without a key (or a ring) balances by load."""
    open_ = [r for r in loads if r.in_flight < cap]
    if not open_:
        return None
    if policy == "round_robin":
        return round_robin(open_, turn)
    if policy == "prefix_affinity" and key is not None and ring is not None:
        return prefix_affinity(key, ring, loads, cap=cap)
    return least_loaded(open_, turn)


def least_loaded(loads: Sequence[Replica], turn: int) -> Choice:
    """Fewest in flight; among equals, the `turn`-th (the caller advances it per request)."""
    fewest = min(r.in_flight for r in loads)
    tied = sorted(r.id for r in loads if r.in_flight == fewest)
    return Choice(tied[turn % len(tied)], "least_loaded")


def round_robin(loads: Sequence[Replica], turn: int) -> Choice:
    ids = sorted(r.id for r in loads)
    return Choice(ids[turn % len(ids)], "round_robin")


def affinity_key(payload: Mapping[str, Any], session_id: str | None) -> str | None:
    """What identifies a conversation: the client's session id, else for chat the system
    message and the first user turn, for completions the first PREFIX_CHARS of the prompt."""
    if session_id:
        return "session:" + session_id
    messages = payload.get("messages")
    if isinstance(messages, list):
        system = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"), None)
        user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        parts = [str(m.get("content")) for m in (system, user) if m is not None]
        return "chat:" + "\x1f".join(parts) if parts else None
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return "prompt:" + prompt[:PREFIX_CHARS]
    return None
