"""The invariants, checked against the daemon and the OS after every step (and more after a
settle, when nothing is in flight or changing). Each returns what it found wrong ([] if none).

Where a check could be fooled by the daemon's own word it asks elsewhere: engine logs for what
each engine received, the fake GPU ledger for what the cards hold, /proc for processes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from router.errors import RouterError
from tests.chaos.client import HANG, Answer
from tests.chaos.world import KEYS, TWIN, env_marked, usable


def _codes() -> set[str]:
    found, todo = set(), [RouterError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo += cls.__subclasses__()
    return found - {"INTERNAL_ERROR"}


DOCUMENTED = _codes()  # every code router/errors.py defines (the README's table)
REQUEST_ID = re.compile(r"x-request-id=(\S+)")


@dataclass(frozen=True)
class Era:
    """What was configured from `since` on: the registered names, the alias's split."""

    since: float
    names: frozenset[str]  # models and aliases
    split: frozenset[str]  # the versions of `chat`


def during(eras: Sequence[Era], a: Answer) -> list[Era]:
    """The eras a request may have met: the one it was sent in, and any begun before it ended."""
    out = [e for e in eras if e.since <= a.started][-1:]
    return out + [e for e in eras if a.started < e.since <= (a.ended or a.started)]


def answers(batch: Iterable[Answer], eras: Sequence[Era], versions: dict[str, set[str]]) -> list[str]:
    """Every request got one answer in the project's shape, never a 500 nor a hang; a 403 only
    where the key may use none of what was asked; a 404 only for a name not registered; an
    answer only from a model the key may reach."""
    out = []
    for a in batch:
        where = f"request {a.rid} ({a.key} -> {a.model}, {a.client}, stream={a.stream})"
        met = during(eras, a)
        if a.hung:
            out.append(f"{where}: no answer within the client's {HANG:.0f} s")
        out += [f"{where}: {p}" for p in a.problems]
        if a.status == 500 or a.code == "INTERNAL_ERROR" or (a.code.isupper() and a.code not in DOCUMENTED):
            out.append(f"{where}: status {a.status} code {a.code!r}")
        if a.code == "FORBIDDEN" and all(usable(a.key, a.model, {"chat": set(e.split), "stable": {"c"}})
                                         for e in met):  # fmt: skip
            out.append(f"{where}: 403, though the key may use {sorted(usable(a.key, a.model, versions))}")
        if a.code == "MODEL_NOT_FOUND" and all(a.model in e.names for e in met):
            out.append(f"{where}: 404 for a registered name")
        if a.status == 429 and not (a.retry_after or "").isdigit():
            out.append(f"{where}: 429 without a Retry-After")
        if a.status == 200 and a.served and a.served not in usable(a.key, a.model, versions):
            out.append(f"{where}: served by {a.served!r}, which the key may not reach")
    return out


@dataclass(frozen=True)
class Event:
    """Something done to the daemon that may cut requests short: a kill, a stop, a reload..."""

    at: float
    kind: str
    model: str = ""  # "" : every model (a restart)
    until: float = 0.0  # an event that lasts (a hung engine): when it ended (inf: it goes on)


# What may explain an error answer: the faults and operator actions that could cause it, and
# how long before the request an event still counts (a start's back-off after failures).
CAUSES = {
    "BACKEND_UNAVAILABLE": ({"kill", "kill_starting", "stop", "restart", "reload"}, 1.0),
    "SHUTTING_DOWN": ({"restart", "stop"}, 1.0),
    "MODEL_UNAVAILABLE": ({"kill", "kill_starting", "stop", "restart", "reload"}, 65.0),
    "BACKEND_TIMEOUT": ({"hang"}, 0.0),
}
ANY_MODEL = {"squat", "restart", "reload"}
LOAD = {"GPU_OVERLOADED", "QUEUE_FULL"}  # a saturated model's answers: always possible


def explained(batch: Iterable[Answer], events: Sequence[Event], req: dict[str, dict[str, Any]]) -> list[str]:
    """Every error answer has a cause the walk made: a fault or an operator action on that model
    (or on everything), a limit of the key, a bad header, load. An error nothing explains (a
    busy engine evicted, a stream cut for no reason) is a defect."""
    out = []
    for a in batch:
        if not a.code or a.code in LOAD or a.code in ("FORBIDDEN", "MODEL_NOT_FOUND"):
            continue
        if _explained(a, events, req.get(a.rid, {})):
            continue
        out.append(f"request {a.rid} ({a.key} -> {a.model}, served {a.served or '-'}): {a.status} {a.code} "
                   f"with no cause in the walk: {(a.error or {}).get('message', '')[:160]}")  # fmt: skip
    return out


def _explained(a: Answer, events: Sequence[Event], req: dict[str, Any]) -> bool:
    spec = KEYS[a.key]
    if a.code == "RATE_LIMITED":
        return any(spec.get(f) for f in ("requests_per_minute", "tokens_per_minute", "max_concurrent"))
    if a.code == "LIMIT_EXCEEDED":
        return bool(spec.get("max_tokens")) and req.get("max_tokens", 0) > spec["max_tokens"]
    if a.code == "INVALID_HEADER":
        return req.get("priority") not in (None, "high", "normal", "low")
    kinds, before = CAUSES.get(a.code, (set(), 0.0))
    if a.code == "MODEL_UNAVAILABLE" and "out of GPU memory" in str((a.error or {}).get("message")):
        kinds = kinds | {"squat"}  # memory taken behind the daemon's back: said as such
    models = {a.model, a.served, *ALIAS_TARGETS.get(a.model, ())} - {""}
    begin, end = a.started - before, (a.ended or a.started) + 0.5
    return any(
        e.kind in kinds and (e.kind in ANY_MODEL or e.model in models)
        and e.at <= end and max(e.at, e.until) >= begin
        for e in events
    )  # fmt: skip


ALIAS_TARGETS = {"chat": ("a", "b", TWIN), "stable": ("c", TWIN), "a": (TWIN,), "c": (TWIN,)}


def sessions(
    batch: Iterable[Answer], eras: Sequence[Era], seen: dict[tuple[Era, str, str], str]
) -> list[str]:
    """A session keeps its alias version while the split is unchanged. The CPU twin standing in
    for a saturated version says nothing of the split; nor does a request that met two splits."""
    out = []
    for a in batch:
        if a.model != "chat" or not a.session or a.status != 200 or a.served in ("", TWIN):
            continue
        met = during(eras, a)
        if len({e.split for e in met}) != 1:
            continue
        before = seen.setdefault((met[0], a.key, a.session), a.served)
        if before != a.served:
            out.append(f"request {a.rid}: session {a.session} of {a.key} moved from {before} to {a.served}")
    return out


WINDOW = 180.0  # seconds: the longest window checked (a skipped limit shows in short ones)


def rates(all_answers: Sequence[Answer], since: float = 0.0, new: float = 0.0) -> list[str]:
    """A key's requests (and tokens) per minute never exceed its bucket: at most its capacity
    plus what refills over any window (of up to WINDOW, ending after `new`). Counted: answers
    an engine produced (a request refused before any engine saw it costs the key nothing, so
    counting fewer can only under-count); from `since`, the daemon's last start (its buckets
    start full)."""
    start = max(since, new - WINDOW)
    all_answers = [a for a in all_answers if a.started >= start]
    out = []
    for key, spec in KEYS.items():
        for field, unit in (("requests_per_minute", 1.0), ("tokens_per_minute", None)):
            limit = spec.get(field)
            if not limit:
                continue
            charged = [(a.started, 1.0 if unit else float(a.usage)) for a in all_answers
                       if a.key == key and a.status == 200 and (unit or not a.stream)]  # fmt: skip
            out += _window_check(key, field, float(limit), sorted(charged))
    return out


def _window_check(key: str, field: str, limit: float, charged: list[tuple[float, float]]) -> list[str]:
    rate = limit / 60.0
    biggest = max((c for _, c in charged), default=0.0)
    for i, (t0, _) in enumerate(charged):
        total = 0.0
        for t1, cost in charged[i:]:
            total += cost
            # Tokens are charged after the answer: one request may run the bucket into debt.
            if total > limit + rate * (t1 - t0) + biggest + 1e-6:
                return [f"key {key}: {total:g} {field.split('_')[0]} in {t1 - t0:.1f}s (limit {limit:g}/min)"]
    return []


def ledger(books: dict[str, dict[str, float]], status: dict[str, Any], squatted: dict[int, float],
           settled: bool) -> list[str]:  # fmt: skip
    """No card holds more than it has; once settled, the daemon's books are what the cards hold
    (less what a squatter outside the daemon took)."""
    out = []
    for gpu, holders in books.items():
        if sum(holders.values()) > 1.0 + 1e-6:
            out.append(f"GPU {gpu} holds {sum(holders.values()):.2f} of its memory")
    if not settled:
        return out
    for g in status["gpus"]:
        held = sum(books.get(str(g["id"]), {}).values()) - squatted.get(g["id"], 0.0)
        if abs(held - g["share_reserved"]) > 1e-6:
            books_say = g["share_reserved"]
            out.append(f"GPU {g['id']}: the daemon books {books_say:.2f}, the card holds {held:.2f}")
    return out


def processes(statuses: Sequence[dict[str, Any]], tag: str, settled: bool) -> list[str]:
    """Every engine process of this run is one /v1/status knows (or a child of one): no orphan
    once settled. (`statuses`: snapshots around the scan; an engine a timer stops or starts
    meanwhile is in one of them.)"""
    if not settled:
        return []
    known = {r["pid"] for status in statuses for m in status["models"] for r in m["replicas"] if r["pid"]}
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "fake_engine.py" not in line or not env_marked(proc.info["pid"], tag):
            continue
        if proc.info["pid"] not in known and proc.info["ppid"] not in known:
            out.append(f"engine process {proc.info['pid']} ({line}) is not in /v1/status")
    return out


def engine_logs(log_dir: Path, batch: Sequence[Answer]) -> list[str]:
    """No engine received a request twice, and an answer an engine gave came from the engine
    the daemon says served it. (A llama.cpp request is read as a stream, and may be sent twice
    by design: the second, of one token, asks the prompt's size, which its streams do not say.)"""
    seen: dict[str, list[str]] = defaultdict(list)
    for log in sorted(log_dir.glob("*.log")):
        engine = log.stem.split("#")[0]
        for rid in REQUEST_ID.findall(log.read_text(errors="replace")):
            seen[rid].append(engine)
    out = []
    for a in batch:
        got = seen.get(a.rid, [])
        twice_ok = 2 if set(got) == {TWIN} else 1
        if len(got) > twice_ok:
            out.append(f"request {a.rid} reached engines {got}")
        if a.status == 200 and a.served and got and set(got) != {a.served}:
            out.append(f"request {a.rid} answered by {a.served} but seen by {got}")
        if a.status == 200 and a.complete and a.served and not got:
            out.append(f"request {a.rid} answered by {a.served}, which never saw it")
    return out


COUNTER = re.compile(r"^(unified_inference_\w+_total)(\{[^}]*\})? ([0-9.e+-]+)$", re.M)
GAUGE = re.compile(
    r"^(unified_inference_(?:engine_in_flight_requests|engine_queued_requests|admission_queue_requests))"
    r"(\{[^}]*\})? ([0-9.e+-]+)$", re.M,
)  # fmt: skip


def counters(text: str) -> dict[str, float]:
    return {f"{m[1]}{m[2] or ''}": float(m[3]) for m in COUNTER.finditer(text)}


def metrics(before: dict[str, float], text: str, settled: bool) -> list[str]:
    """Counters only grow (within one daemon's life); once idle, in-flight and queue gauges are 0."""
    now = counters(text)
    out = [f"{name} went from {v:g} to {now[name]:g}" for name, v in before.items() if now.get(name, v) < v]
    if settled:
        out += [f"{m[1]}{m[2] or ''} is {m[3]} while idle" for m in GAUGE.finditer(text) if float(m[3]) != 0]
    return out
