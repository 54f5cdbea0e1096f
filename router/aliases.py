"""Which version an alias's request goes to: pure functions of the split and the session.

- A session (X-Session-ID, else the OpenAI `user` field) hashes to one of BUCKETS
  buckets; the split's weights, in the order written, cover the buckets in turn. The same
  session always lands in the same bucket, so it keeps its version while the split is
  unchanged; a changed split moves only the buckets whose owner changed (90/10 -> 50/50
  moves buckets 5000-8999 and nothing else), and going back restores every session.
- Requests without a session follow the weights exactly, by smooth weighted round robin
  (nginx's): over any run of sum(weights) requests each version gets its weight.
- A key limited to some of the versions sees only those: its sessions keep the version every
  key's session gets when it may use it, and are bucketed among its versions otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

BUCKETS = 10_000
Weights = Sequence[tuple[str, int]]  # (version, weight), in the order written


def bucket(session: str) -> int:
    digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def owner(weights: Weights, slot: int) -> str:
    """The version whose share of the buckets holds `slot`."""
    total = sum(w for _, w in weights)
    point = slot * total // BUCKETS  # in [0, total)
    for version, weight in weights:
        if point < weight:
            return version
        point -= weight
    return weights[-1][0]


def for_session(weights: Weights, session: str) -> str:
    return owner(weights, bucket(session))


def allowed_weights(weights: Weights, allowed: Collection[str] | None) -> Weights:
    """The split as a key limited to `allowed` models sees it: only its versions (None: all)."""
    if allowed is None:
        return weights
    return tuple((v, w) for v, w in weights if v in allowed)


def session_version(split: Weights, usable: Weights, session: str) -> str:
    """A session's version for a key that may use the versions of `usable` (part of `split`):
    its own in the whole split when the key may use that one (as every key's session gets it),
    else its bucket among the versions the key may use."""
    own = for_session(split, session)
    if any(v == own for v, _ in usable):
        return own
    # Hashed afresh: the sessions of a version the key may not use fill a run of buckets, which
    # would all map to one of its versions; spread, they follow its versions' weights.
    return for_session(usable, session + "\x1f")


class RoundRobin:
    """Smooth weighted round robin over one split (state: each version's current weight)."""

    def __init__(self, weights: Weights) -> None:
        self.weights = list(weights)
        self._current = {v: 0 for v, _ in self.weights}

    def next(self) -> str:
        total = 0
        best: str | None = None
        for version, weight in self.weights:
            self._current[version] += weight
            total += weight
            if best is None or self._current[version] > self._current[best]:
                best = version
        assert best is not None
        self._current[best] -= total
        return best
