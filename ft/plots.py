"""The PNGs ft draws: a run's loss curve (training and held-out loss per step) and `ft data`'s row lengths."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from ft.atomic import write_bytes  # noqa: E402


def loss_curve(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot `loss` and `eval_loss` against step from metrics records and write the PNG atomically."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if held:
        ax.plot(*zip(*held, strict=True), label="held-out loss", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def length_histogram(lengths: list[int], limit: int, path: Path, title: str) -> None:
    """Histogram of row lengths in tokens with data.max_seq_length marked; the PNG is written atomically."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist(lengths, bins=40, color="tab:blue")
    ax.axvline(limit, color="tab:red", linestyle="--", label=f"data.max_seq_length ({limit})")
    ax.set_xlabel("tokens per row (after too_long)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
