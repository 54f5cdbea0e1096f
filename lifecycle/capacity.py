"""GPU placement and eviction: a pure function of a snapshot (no I/O, no clock).

The lifecycle takes a snapshot of every engine (`Holder`), asks `plan()` where
an engine about to start or wake can go, and carries the answer out:

- `Place(gpus)`: it fits now on `gpus`; start it there.
- `Evict(gpus, victims)`: it fits on `gpus` once `victims` are gone: sleep the
  ones with `on_idle: sleep`, stop the others, then ask again.
- `Wait(holders)`: only busy (or pinned) engines hold the room it needs; wait
  for one of them to go idle, or refuse naming `holders`.

The rules, in order:

1. An engine holds its share (`gpu_memory`, or 1.0 for the whole card) on each
   of its GPUs from the moment it is placed until its process group is gone or
   it has gone to sleep. On each GPU the shares held plus the newcomer's must
   stay within the GPU's budget (1.0, less where models.yaml caps the GPU's
   memory below the driver's total), and the engines holding memory within
   MAX_LOADED_MODELS (0: no limit).
2. A model with `gpu_id` goes on exactly those GPUs (a list is tensor parallel:
   the share counts on every one). Without one, it goes on one GPU with room:
   the fullest one it fits on ("pack"), so that the largest free space stays
   whole for a large model; ties go to the lowest id. A replica (`count` > 0)
   takes `count` GPUs from its pool (`gpu_id`, or every GPU): first those
   holding none of its model's other replicas (replicas are for throughput; two
   on one card share its compute), then pack. Replicas never evict their own.
3. Only idle engines are evicted (ready, nothing in flight, no transition, not
   pinned), least recently used first, and only as many as needed. Among GPUs
   that need evictions, the one needing fewest wins, then the one whose victims
   were used longest ago.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

EPSILON = 1e-9  # three shares of 1/3 fill a card
Action = Literal["sleep", "stop"]


@dataclass(frozen=True)
class Gpu:
    id: int
    memory_total_bytes: int
    budget: float = 1.0  # the share of the card the daemon may hand out


@dataclass(frozen=True)
class Holder:
    """One engine, as the policy sees it."""

    name: str
    holds: bool  # placed and holding GPU memory (starting, ready, waking, or stopping until gone)
    gpus: tuple[int, ...]  # where it holds its share (() when no GPU is known)
    share: float
    evictable: bool  # ready, idle, no transition in progress, not pinned
    last_used: float
    sleeps: bool  # on_idle: sleep (evicted by sleeping it, not stopping it)
    model: str = ""  # the model it is a replica of


@dataclass(frozen=True)
class Ask:
    name: str
    share: float
    gpu_ids: tuple[int, ...]  # fixed GPUs; () = any one GPU with room (with `count`: the pool)
    count: int = 0  # a replica: this many GPUs from the pool `gpu_ids` (() = every GPU)
    model: str = ""


@dataclass(frozen=True)
class Place:
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Evict:
    gpus: tuple[int, ...]
    victims: tuple[tuple[str, Action], ...]


@dataclass(frozen=True)
class Wait:
    holders: tuple[str, ...]  # the engines that hold the room it needs and cannot be evicted now


Plan = Place | Evict | Wait


def reserved(gpu: int, holders: Iterable[Holder]) -> float:
    return sum(h.share for h in holders if gpu in h.gpus)


def plan(ask: Ask, holders: Sequence[Holder], gpus: Sequence[Gpu], max_loaded: int = 0) -> Plan:
    """Where `ask` can go, what must be evicted first, or who is in the way."""
    others = [h for h in holders if h.name != ask.name and h.holds]
    room = _Room(ask.share, {g.id: g.budget for g in gpus}, max_loaded)
    candidates = _candidates(ask, gpus)
    siblings = [h for h in others if ask.model and h.model == ask.model]

    def crowd(ids: tuple[int, ...]) -> int:
        return sum(1 for h in siblings if set(h.gpus) & set(ids))

    direct = [ids for ids in candidates if room.fits(ids, others)]
    if direct:
        # Spread replicas, then pack: the candidate left fullest after placement, then the lowest id.
        return Place(min(direct, key=lambda ids: (crowd(ids), room.free_after(ids, others), ids)))
    strangers = [h for h in others if not (ask.model and h.model == ask.model)]
    options = []
    for ids in candidates:
        victims = room.lru_victims(ids, others, strangers)
        if victims:
            options.append((len(victims), crowd(ids), max(v.last_used for v in victims), ids, victims))
    if options:
        _, _, _, ids, victims = min(options, key=lambda o: (o[0], o[1], o[2], o[3]))
        return Evict(ids, tuple((v.name, "sleep" if v.sleeps else "stop") for v in victims))
    wanted = {g for ids in candidates for g in ids}
    in_the_way = [h for h in others if max_loaded or wanted & set(h.gpus)]
    return Wait(tuple(sorted(h.name for h in in_the_way)))


def _candidates(ask: Ask, gpus: Sequence[Gpu]) -> list[tuple[int, ...]]:
    """Where `ask` may go: its fixed GPUs; any one GPU; or, for a replica, any `count` GPUs of
    its pool. With no GPU known only the loaded-models limit is checked."""
    if ask.count:
        pool = ask.gpu_ids or tuple(g.id for g in gpus)
        return list(combinations(sorted(pool), ask.count)) if len(pool) >= ask.count else [()]
    return [(g.id,) for g in gpus] if gpus and not ask.gpu_ids else [ask.gpu_ids]


@dataclass(frozen=True)
class _Room:
    share: float
    budget: dict[int, float]
    max_loaded: int

    def fits(self, ids: tuple[int, ...], present: list[Holder]) -> bool:
        return not self.too_many(present) and all(
            reserved(g, present) + self.share <= self.budget.get(g, 0.0) + EPSILON for g in ids if self.budget
        )

    def short(self, ids: tuple[int, ...], present: list[Holder]) -> set[int]:
        """The GPUs of `ids` without room for the share: only holders there help."""
        return {g for g in ids if reserved(g, present) + self.share > self.budget.get(g, 0.0) + EPSILON}

    def too_many(self, present: list[Holder]) -> bool:
        return bool(self.max_loaded) and len(present) + 1 > self.max_loaded

    def free_after(self, ids: tuple[int, ...], present: list[Holder]) -> float:
        return sum(self.budget.get(g, 0.0) - reserved(g, present) - self.share for g in ids)

    def lru_victims(self, ids: tuple[int, ...], present: list[Holder], allowed: list[Holder]) -> list[Holder]:
        """The least recently used idle engines of `allowed` whose eviction makes `ids` fit
        ([] if none do)."""
        remaining = list(present)
        victims: list[Holder] = []
        for h in sorted((h for h in allowed if h.evictable), key=lambda h: h.last_used):
            if self.fits(ids, remaining):
                break
            if self.short(ids, remaining) & set(h.gpus) or self.too_many(remaining):
                remaining.remove(h)
                victims.append(h)
        return victims if self.fits(ids, remaining) else []


def never_fits(
    name: str,
    share: float,
    gpu_ids: tuple[int, ...],
    pinned: Sequence[tuple[str, float, tuple[int, ...]]],
    gpus: Sequence[Gpu],
) -> str | None:
    """Why a model can never be placed (its GPU is absent, or the pinned models leave it no
    room), or None. `pinned`: the other pinned models with fixed GPUs (name, share, gpu_ids)."""
    if not gpus:
        return None
    present = {g.id: g for g in gpus}
    missing = [i for i in gpu_ids if i not in present]
    if missing:
        return f"gpu_id: GPU {missing[0]} is not present (GPUs: {', '.join(str(i) for i in sorted(present))})"
    candidates = [gpu_ids] if gpu_ids else [(g,) for g in present]
    for ids in candidates:
        if all(_pinned_share(g, pinned, name) + share <= present[g].budget + EPSILON for g in ids):
            return None
    ids = candidates[0]
    g = ids[0]
    held = [f"'{n}' ({s:g})" for n, s, on in pinned if n != name and g in on]
    budget = present[g].budget
    what = f"with the pinned model(s) {', '.join(held)} " if held else ""
    return f"gpu_memory: {share:g} {what}is over GPU {g}'s budget of {budget:g}"


def _pinned_share(gpu: int, pinned: Sequence[tuple[str, float, tuple[int, ...]]], name: str) -> float:
    return sum(share for n, share, on in pinned if n != name and gpu in on)
