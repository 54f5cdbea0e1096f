"""Benchmark results: medians across rounds, targets checked, JSON + Markdown + PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def median_of(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    nonstream = {
        name: {conns: {k: median_of(rows, k) for k in ("rps", "p50_ms", "p99_ms", "errors")}
               for conns, rows in cells.items()}
        for name, cells in raw["nonstream"].items()
    }  # fmt: skip
    stream = {
        name: {k: median_of(rows, k) for k in ("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "errors")}
        for name, rows in raw["stream"].items()
    }
    cold = {name: {k: median_of(rows, k) for k in rows[0]} for name, rows in raw["cold"].items() if rows}
    return {
        "nonstream": nonstream,
        "stream": stream,
        "cold": cold,
        "overload": raw["overload"],
        "rss": raw["rss"],
        "collect": raw.get("collect", {}),
        "wake": _wake_summary(raw.get("wake")),
        "replicas": _replicas_summary(raw.get("replicas")),
        "fairness": _fairness_summary(raw.get("fairness")),
    }


def _fairness_summary(fair: dict[str, Any] | None) -> dict[str, float]:
    if not fair or not fair["rows"]:
        return {}
    rows = fair["rows"]
    return {"serve_ms": fair["serve_ms"], "bound": fair["bound"], **{k: median_of(rows, k) for k in rows[0]}}


def _replicas_summary(replicas: dict[str, Any] | None) -> dict[str, Any]:
    if not replicas:
        return {}
    policies = {p: {k: median_of(rows, k) for k in rows[0]} for p, rows in replicas["rows"].items() if rows}
    return {"prefill_ms": replicas["prefill_ms"], "replicas": replicas["replicas"], "policies": policies}


def _wake_summary(wake: dict[str, Any] | None) -> dict[str, float]:
    if not wake or not wake["rows"]:
        return {}
    rows = wake["rows"]
    return {"delay_ms": wake["delay_ms"], **{k: median_of(rows, k) for k in rows[0]}}


def _keys_rows(s: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Every data-plane figure of the daemon with API keys, within 5 % of the daemon without."""
    ns, st = s["nonstream"], s["stream"]
    figures = [  # (what, with keys, without, unit, higher is better)
        ("req/s, 32 conns", ns["daemon+keys"]["32"]["rps"], ns["daemon"]["32"]["rps"], "", True),
        ("req/s, 1 conn", ns["daemon+keys"]["1"]["rps"], ns["daemon"]["1"]["rps"], "", True),
        ("p50, 1 conn", ns["daemon+keys"]["1"]["p50_ms"], ns["daemon"]["1"]["p50_ms"], " ms", False),
        ("TTFT p50", st["daemon+keys"]["ttft_p50_ms"], st["daemon"]["ttft_p50_ms"], " ms", False),
        ("chunk-gap p99", st["daemon+keys"]["gap_p99_ms"], st["daemon"]["gap_p99_ms"], " ms", False),
    ]
    rows = []
    for what, keyed, plain, unit, higher in figures:
        ratio = keyed / plain
        digits = 0 if not unit else 3 if plain < 1 else 1
        rows.append((
            f"with API keys: {what} within 5 % of the daemon without",
            f"{keyed:.{digits}f} vs {plain:.{digits}f}{unit} = {ratio:.2f}x",
            ratio >= 0.95 if higher else ratio <= 1.05,
        ))  # fmt: skip
    return rows


def check_targets(s: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows."""
    ns, st = s["nonstream"], s["stream"]
    d32, x32 = ns["daemon"]["32"], ns["direct"]["32"]
    rows = [
        (
            "non-streaming 32 conns: req/s >= 0.5 x direct",
            f"{d32['rps']:.0f} vs {x32['rps']:.0f} = {d32['rps'] / x32['rps']:.2f}x",
            d32["rps"] >= 0.5 * x32["rps"],
        )
    ]
    if "sglang-router" in ns:
        r32 = ns["sglang-router"]["32"]
        rows.append((
            "non-streaming 32 conns: req/s >= 0.9 x sglang-router",
            f"{d32['rps']:.0f} vs {r32['rps']:.0f} = {d32['rps'] / r32['rps']:.2f}x",
            d32["rps"] >= 0.9 * r32["rps"],
        ))  # fmt: skip
    if "daemon+keys" in ns:
        rows += _keys_rows(s)
    d1, x1 = ns["daemon"]["1"], ns["direct"]["1"]
    rows.append((
        "non-streaming 1 conn: p50 <= direct + 0.5 ms",
        f"{d1['p50_ms']:.3f} vs {x1['p50_ms']:.3f} ms ({d1['p50_ms'] - x1['p50_ms']:+.3f})",
        d1["p50_ms"] <= x1["p50_ms"] + 0.5,
    ))  # fmt: skip
    ds, xs = st["daemon"], st["direct"]
    rows += [
        (
            "streaming: TTFT p50 <= 1.15 x direct",
            f"{ds['ttft_p50_ms']:.1f} vs {xs['ttft_p50_ms']:.1f} ms "
            f"= {ds['ttft_p50_ms'] / xs['ttft_p50_ms']:.2f}x",
            ds["ttft_p50_ms"] <= 1.15 * xs["ttft_p50_ms"],
        ),
        (
            "streaming: chunk-gap p99 <= direct + 5 ms",
            f"{ds['gap_p99_ms']:.1f} vs {xs['gap_p99_ms']:.1f} ms",
            ds["gap_p99_ms"] <= xs["gap_p99_ms"] + 5,
        ),
        ("streaming: zero errors", f"{ds['errors']:.0f} errors", ds["errors"] == 0),
    ]
    for name, c in s["cold"].items():
        rows.append((
            f"cold start ({name}): TTFT <= engine start-to-ready + 150 ms",
            f"{c['cold_ttft_ms']:.0f} vs {c['engine_ready_ms']:.0f} ms "
            f"({c['cold_ttft_ms'] - c['engine_ready_ms']:+.0f}; the engine alone takes "
            f"{c['engine_first_token_ms']:.0f} ms after ready for its first token, warm "
            f"{c['warm_ttft_ms']:.0f})",
            c["cold_ttft_ms"] <= c["engine_ready_ms"] + 150,
        ))  # fmt: skip
    for tokens, c in s.get("collect", {}).items():
        rows.append((
            f"llama.cpp non-streaming, {tokens} tokens, read as a stream (cancellable): <= engine + 150 ms",
            f"{c['daemon_ms']:.0f} vs {c['engine_ms']:.0f} ms ({c['daemon_ms'] - c['engine_ms']:+.0f})",
            c["daemon_ms"] <= c["engine_ms"] + 150,
        ))  # fmt: skip
    w = s.get("wake")
    if w:
        rows.append((
            "wake vs cold start: TTFT of a woken engine <= its wake + 100 ms",
            f"{w['wake_ttft_ms']:.0f} ms, wake {w['delay_ms']:.0f} ms "
            f"({w['wake_ttft_ms'] - w['delay_ms']:+.0f}); "
            f"cold start {w['cold_ttft_ms']:.0f} ms, warm {w['warm_ttft_ms']:.0f} ms",
            w["wake_ttft_ms"] <= w["delay_ms"] + 100,
        ))  # fmt: skip
    rows += _replica_rows(s.get("replicas"))
    rows += _fairness_rows(s.get("fairness"))
    ol = s["overload"]
    for model, kind in (("gpu-alone", "rejected"), ("gpu", "offloaded")):
        p99 = ol[f"{model}_{kind}_p99_ms"]
        rows.append((
            f"overload: {'429' if kind == 'rejected' else 'offload'} decision p99 <= 5 ms",
            f"{p99:.2f} ms over {ol[f'{model}_{kind}']:.0f} requests",
            p99 <= 5,
        ))  # fmt: skip
        peak = ol[f"{model}_engine_max_in_flight"]
        rows.append((f"overload ({model}): engine in flight <= bound", f"{peak} <= {ol['bound']:.0f}",
                     peak <= ol["bound"]))  # fmt: skip
    rows.append(("idle RSS <= 100 MB", f"{s['rss']['idle_mb']:.0f} MB (under streaming load "
                 f"{s['rss']['streaming_peak_mb']:.0f} MB)", s["rss"]["idle_mb"] <= 100))  # fmt: skip
    return rows


def _replica_rows(r: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    """Prefix affinity against round robin on the multi-turn workload: more prefix-cache hits
    and a lower TTFT p50."""
    if not r or not {"prefix_affinity", "round_robin"} <= set(r["policies"]):
        return []
    pa, rr = r["policies"]["prefix_affinity"], r["policies"]["round_robin"]
    return [
        ("replicas, multi-turn chat: prefix_affinity cache hit rate > round_robin",
         f"{pa['hit_rate']:.0%} vs {rr['hit_rate']:.0%}", pa["hit_rate"] > rr["hit_rate"]),
        ("replicas, multi-turn chat: prefix_affinity TTFT p50 < round_robin",
         f"{pa['ttft_p50_ms']:.1f} vs {rr['ttft_p50_ms']:.1f} ms", pa["ttft_p50_ms"] < rr["ttft_p50_ms"]),
    ]  # fmt: skip


def _fairness_rows(f: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    """A tenant sending one request at a time behind a 48-deep flood waits about one service
    time with the admission queue (its requests are refused without it); weights 3:1 share
    the slots 75/25 within 10 %."""
    if not f:
        return []
    serve = f["serve_ms"]
    return [
        ("fair admission: one-at-a-time tenant's wait p99 behind a 48-deep flood <= 1.2 x one service",
         f"{f['b_wait_p99_ms']:.0f} ms (p50 {f['b_wait_p50_ms']:.0f}), service {serve:.0f} ms; the flood got "
         f"{f['a_served']:.0f} admissions meanwhile; without the queue "
         f"{f['plain_b_refused_share']:.0%} of its requests were refused",
         f["b_wait_p99_ms"] <= 1.2 * serve),
        ("fair admission: weights 3:1 share a saturated model 75/25 (+-10 %)",
         f"{f['a_share']:.1%} / {1 - f['a_share']:.1%} over {f['admissions']:.0f} admissions",
         0.675 <= f["a_share"] <= 0.825),
    ]  # fmt: skip


def replica_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Replicas: multi-turn chat, {r['replicas']} replicas, prefill {r['prefill_ms']:.0f} ms "
        "unless the replica has the conversation cached",
        "",
        "| policy | cache hit rate | TTFT p50 | TTFT p99 | TTFT mean | requests max/mean per replica |",
        "|---|---|---|---|---|---|",
    ]
    for policy, row in r["policies"].items():
        lines.append(
            f"| {policy} | {row['hit_rate']:.0%} | {row['ttft_p50_ms']:.1f} ms | {row['ttft_p99_ms']:.1f} ms "
            f"| {row['ttft_mean_ms']:.1f} ms | {row['load_max_over_mean']:.2f} |"
        )
    return lines


def markdown(s: dict[str, Any], targets: list[tuple[str, str, bool]], meta: dict[str, Any]) -> str:
    ns, st = s["nonstream"], s["stream"]
    direct1, direct32 = ns["direct"]["1"], ns["direct"]["32"]
    lines = [
        "# unified-inference benchmark",
        "",
        f"{meta['when']} · {meta['rounds']} rounds, alternating targets · load: {meta['tool']} · "
        f"{meta['cpus']} CPUs",
        "",
        "## Non-streaming `POST /v1/completions` (16 tokens, instant engine)",
        "",
        "| target | req/s, 1 conn | p50, 1 conn | req/s, 32 conns | p50, 32 | p99, 32 | x direct (32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cells in ns.items():
        one, many = cells["1"], cells["32"]
        lines.append(
            f"| {name} | {one['rps']:.0f} | {one['p50_ms']:.3f} ms | {many['rps']:.0f} "
            f"| {many['p50_ms']:.2f} ms | {many['p99_ms']:.2f} ms | {many['rps'] / direct32['rps']:.2f} |"
        )
    lines += [
        "",
        f"## Streaming: {meta['streams']} concurrent streams x {meta['tokens']} tokens, a token every 10 ms",
        "",
        "| target | TTFT p50 | TTFT p99 | chunk gap p99 | errors | TTFT x direct |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in st.items():
        lines.append(
            f"| {name} | {r['ttft_p50_ms']:.1f} ms | {r['ttft_p99_ms']:.1f} ms | {r['gap_p99_ms']:.1f} ms "
            f"| {r['errors']:.0f} | {r['ttft_p50_ms'] / st['direct']['ttft_p50_ms']:.2f} |"
        )
    if s.get("replicas"):
        lines += replica_table(s["replicas"])
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    lines += ["", f"Direct, 1 connection: {direct1['rps']:.0f} req/s, p50 {direct1['p50_ms']:.3f} ms.", ""]
    return "\n".join(lines)


def chart(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns, st = s["nonstream"], s["stream"]
    names = list(ns)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0][0], "req/s, 32 connections (higher is better)", [ns[n]["32"]["rps"] for n in names], names),
        (axes[0][1], "p50 ms, 1 connection", [ns[n]["1"]["p50_ms"] for n in names], names),
        (axes[1][0], "streaming TTFT p50 ms", [st[n]["ttft_p50_ms"] for n in st], list(st)),
        (axes[1][1], "streaming chunk gap p99 ms", [st[n]["gap_p99_ms"] for n in st], list(st)),
    ]
    for ax, title, values, labels in panels:
        bars = ax.bar(labels, values, color=["#888" if n == "direct" else "#3a7" if n == "daemon" else "#57b"
                                             for n in labels])  # fmt: skip
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title)
    fig.suptitle("unified-inference vs direct engine vs Rust routers (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, raw: dict[str, Any], meta: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(raw)
    targets = check_targets(summary)
    md = markdown(summary, targets, meta)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "raw": raw,
                                                  "targets": targets}, indent=2))  # fmt: skip
    (out / "results.md").write_text(md)
    chart(summary, out / "results.png")
    return md, targets
