"""The evaluation report: results.json, results.csv, report.md with a table per metric (and the paired differences
of each quant and the next larger one), and PNG plots against bits per weight."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from eval.table import table, to_csv  # noqa: E402
from ft.atomic import write_bytes, write_text  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def _measured(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for q in results["quants"] if "error" not in q]


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits per weight, loss) points that no other point beats with as few bits and less loss, by bits.

    >>> frontier([(8.5, 0.001), (4.9, 0.02), (4.9, 0.01), (5.5, 0.03), (2.6, 0.5)])
    [(2.6, 0.5), (4.9, 0.01), (8.5, 0.001)]
    """
    best: list[tuple[float, float]] = []
    for bits, loss in sorted(points):
        if not best or loss < best[-1][1]:
            best.append((bits, loss))
    return best


def plot_divergence(results: dict[str, Any], path: Path) -> None:
    everything = [q for q in _measured(results) if "divergence" in q]
    rows = [q for q in everything if "variant" not in q]
    bpw = [q["bits_per_weight"] for q in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.errorbar(bpw, [q["divergence"]["kld_mean"] for q in rows],
                  yerr=[q["divergence"]["kld_mean_error"] for q in rows], marker="o", capsize=3, label="mean")
    left.plot(bpw, [q["divergence"]["kld_p99"] for q in rows], marker="s", linestyle="--", label="99th percentile")
    markers = iter("^vD<>Ph*X")
    for variant in dict.fromkeys(q["variant"] for q in everything if "variant" in q):  # one marker per variant
        group = [q for q in everything if q.get("variant") == variant]
        bits, marker = [q["bits_per_weight"] for q in group], next(markers, "o")
        left.errorbar(bits, [q["divergence"]["kld_mean"] for q in group], marker=marker, linestyle="none",
                      yerr=[q["divergence"]["kld_mean_error"] for q in group], capsize=3, label=f"mean, {variant}")
        right.plot(bits, [100 * q["divergence"]["top1_agreement"] for q in group], marker=marker, linestyle="none",
                   color="tab:green")
    if len(everything) > len(rows):  # the best mean KLD for the size, over the plain quants and every variant
        best = frontier([(q["bits_per_weight"], q["divergence"]["kld_mean"]) for q in everything])
        left.plot(*zip(*best), color="black", linewidth=0.8, alpha=0.5, label="frontier")
    left.set_yscale("symlog", linthresh=1e-4)
    left.set_xlabel("bits per weight")
    left.set_ylabel("KL divergence vs reference (nats)")
    left.legend()
    right.plot(bpw, [100 * q["divergence"]["top1_agreement"] for q in rows], marker="o", color="tab:green")
    right.set_xlabel("bits per weight")
    right.set_ylabel("same top-1 token as reference (%)")
    for q in everything:
        for ax, y in ((left, q["divergence"]["kld_mean"]), (right, 100 * q["divergence"]["top1_agreement"])):
            ax.annotate(q["type"], (q["bits_per_weight"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    _save(fig, path)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Accuracy against bits per weight per task: the plain quants as a line, each variant with a marker of its own,
    and, where there are variants, the frontier (the best accuracy for the size)."""
    everything = [q for q in _measured(results) if q.get("accuracy")]
    variants = list(dict.fromkeys(q["variant"] for q in everything if "variant" in q))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for task, color in zip(results["tasks"], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        scored = [q for q in everything if task in q["accuracy"]]
        for variant, marker in [(None, "o"), *zip(variants, "^vD<>Ph*X")]:
            group = [q for q in scored if q.get("variant") == variant]
            if not group:
                continue
            result = [q["accuracy"][task] for q in group]
            ax.errorbar([q["bits_per_weight"] for q in group], [100 * r["accuracy"] for r in result],
                        yerr=[[100 * (r["accuracy"] - r["wilson95"][0]) for r in result],
                              [100 * (r["wilson95"][1] - r["accuracy"]) for r in result]],
                        marker=marker, capsize=3, color=color, linestyle="-" if variant is None else "none",
                        label=task if variant is None else f"{task}, {variant}")
        if variants and scored:  # frontier() takes a loss: accuracy enters negated
            best = frontier([(q["bits_per_weight"], -q["accuracy"][task]["accuracy"]) for q in scored])
            ax.plot([b for b, _ in best], [-100 * a for _, a in best], color=color, linewidth=0.8, alpha=0.5)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("exact-match accuracy (%), 95% Wilson interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_speed(results: dict[str, Any], path: Path) -> None:
    rows = [q for q in _measured(results) if q.get("speed")]
    names = [q["type"] for q in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [q["speed"]["plain_tokens_per_second"] for q in rows], width=0.4, label="MTP off")
    if any("mtp_tokens_per_second" in q["speed"] for q in rows):
        ax.bar([i + 0.2 for i in x], [q["speed"].get("mtp_tokens_per_second", 0) for q in rows], width=0.4,
               label="MTP on")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(results["device"], fontsize=9)
    ax.legend()
    _save(fig, path)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _interval(d: dict[str, Any], scale: float, spec: str) -> str:
    """`+0.0123 [+0.01, +0.015] *`: a paired difference in format `spec`, marked when its interval excludes 0."""
    text = f"{scale * d['difference']:{spec}} [{scale * d['low']:{spec}}, {scale * d['high']:{spec}}]"
    return text + (" *" if d["excludes_zero"] else "")


def pair_rows(pairs: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the paired-differences table: Δ mean KLD in nats, Δ accuracy in percentage points."""
    return [[p["type"], p["against"], _interval(p["kld_mean"], 1.0, "+.3g"), p["kld_mean"]["n"],
             _interval(p["accuracy"], 100.0, "+.1f") if "accuracy" in p else "",
             p["accuracy"]["n"] if "accuracy" in p else ""] for p in pairs]


PAIR_HEADER = ["type", "against", "Δ mean KLD [95%]", "chunks", "Δ accuracy pp [95%]", "prompts"]
PAIRS_NOTE = ("Each quant against the next larger one, on the same scored chunks and prompts: the difference (first "
              "minus second) in mean KLD against the reference, in nats, and in accuracy over all prompts, in "
              "percentage points, with paired 95% bootstrap intervals (resampling chunks and prompts; "
              "eval/paired.py). * marks an interval that excludes 0.")


def markdown(results: dict[str, Any]) -> str:
    quants = results["quants"]
    div = [[q["type"], q.get("bits_per_weight", ""),
            *(f"{q['divergence'][k]:.5f}" for k in ("kld_mean", "kld_median", "kld_p99", "kld_p999")),
            f"{100 * q['divergence']['top1_agreement']:.2f}", f"{q['divergence']['ppl']:.4f}",
            f"{q['divergence']['ppl_ratio']:.4f}", f"{100 * q['divergence']['dp_mean']:.3f}",
            f"{100 * q['divergence']['dp_rms']:.3f}"]
           for q in quants if "divergence" in q]
    acc = [[q["type"], task, f"{100 * a['accuracy']:.1f}", f"{100 * a['wilson95'][0]:.1f}-{100 * a['wilson95'][1]:.1f}",
            a["n"], a.get("lost", ""), a.get("gained", "")]
           for q in quants for task, a in q.get("accuracy", {}).items()]
    speed = [[q["type"], f"{q['speed']['plain_tokens_per_second']:.1f}",
              f"{q['speed'].get('mtp_tokens_per_second', float('nan')):.1f}",
              f"{q['speed'].get('acceptance_rate', float('nan')):.3f}",
              f"{q['speed'].get('mean_accepted', float('nan')):.2f}", q["speed"].get("identical", "")]
             for q in quants if q.get("speed")]
    flips = [[q["type"], m["prompt"], m["token"], f"{m['plain_margin']:.4g}", f"{m['mtp_margin']:.4g}"]
             for q in quants for m in q.get("speed", {}).get("mismatches", [])]
    errors = [[q["type"], q["error"]] for q in quants if "error" in q]
    settings = "\n".join(f"- {k}: `{v}`" for k, v in results["settings"].items())
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    parts = [
        f"# Quantization report: {results['run']}",
        f"Reference: `{results['reference']}` ({results['reference_type']}). Device: {results['device']}. "
        f"Date: {results['date']}. Versions: {versions}.",
        "## Settings", settings,
        "## Distribution vs reference",
        f"{results.get('divergence_tokens', 0)} scored tokens. KLD over the full vocabulary, natural log; top-1 = same "
        "most likely token; Δp = p_quant(correct) - p_ref(correct), in percentage points.",
        md_table(["type", "bpw", "mean KLD", "median", "p99", "p99.9", "top-1 %", "PPL", "PPL ratio", "mean Δp",
                "RMS Δp"], div),
        "## Paired differences", PAIRS_NOTE,
        md_table(PAIR_HEADER, pair_rows(results.get("pairs", []))),
        "## Accuracy (greedy, exact match)",
        "lost: right with the reference and wrong quantized; gained: the reverse (same prompts).",
        md_table(["type", "task", "accuracy %", "95% Wilson", "n", "lost", "gained"], acc),
        "## Decode speed, batch 1",
        "MTP on is ft's own speculative loop over llama.cpp's C API, taking the target's argmax. How it compares with "
        "llama.cpp's `llama-speculative-simple` (with backend sampling, `-bs`, and with its default CPU sampler chain, "
        "which reads every verified row's full vocabulary) is measured in ft's docs/BENCHMARKS.md, "
        "\"Decode speed with the MTP drafter\".",
        md_table(["type", "tok/s MTP off", "tok/s MTP on", "acceptance", "mean accepted", "MTP output identical"],
                 speed),
    ]
    if flips:
        parts += ["### Where MTP output differed from plain decoding",
                  "lead = top-1 minus top-2 logit of the target at that token; near 0 in both modes means a tie that "
                  "kernel rounding broke differently, not a protocol error.",
                  md_table(["type", "prompt", "token", "lead, MTP off", "lead, MTP on"], flips)]
    if errors:
        parts += ["## Files that could not be evaluated", md_table(["type", "error"], errors)]
    parts.append("Plots: `divergence.png`, `accuracy.png`, `speed.png`.")
    return "\n\n".join(parts) + "\n"


def write_report(results: dict[str, Any], folder: Path) -> None:
    """Report, plots and results.csv, then results.json last: results.json on disk means the rest was written in
    full."""
    write_text(folder / "report.md", markdown(results))
    plots = {"divergence.png": (plot_divergence, "divergence"), "accuracy.png": (plot_accuracy, "accuracy"),
             "speed.png": (plot_speed, "speed")}
    for name, (plot, key) in plots.items():
        if any(q.get(key) for q in results["quants"]):
            plot(results, folder / name)
        else:  # a plot from an earlier evaluation with other settings would contradict this report
            (folder / name).unlink(missing_ok=True)
    write_text(folder / "results.csv", to_csv(table([(results["run"], results)])))
    write_text(folder / "results.json", json.dumps(results, indent=2) + "\n")
