"""Paired differences between two models measured on the same material, with 95% bootstrap intervals.

A reader comparing two quants wants to know whether their difference exceeds the noise of the text and prompts
measured. Both models are scored on the same units (the scored chunks of the evaluation text for KLD, the prompts
for accuracy), so the comparison is paired: the per-unit differences d_i = a_i - b_i are resampled with
replacement (a percentile bootstrap, RESAMPLES draws from a fixed seed, so a report is reproducible), and the
interval is the 2.5th to 97.5th percentile of the resampled mean differences. Resampling whole chunks rather than
tokens keeps the correlation of neighbouring tokens inside each unit, which a per-token interval would ignore.
Every chunk scores the same number of tokens, so the mean of chunk means is the mean over tokens.

    >>> d = paired_bootstrap([0.3, 0.5, 0.4, 0.6], [0.1, 0.2, 0.2, 0.3])
    >>> round(d.difference, 3), d.low > 0, d.excludes_zero
    (0.25, True, True)
    >>> paired_bootstrap([1, 0, 1], [1, 0, 1]).excludes_zero
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over n paired units and its 95% interval."""

    difference: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = SEED) -> PairedDifference:
    """The mean paired difference of `a` and `b` (the same units in the same order) with its percentile bootstrap
    95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(d) == 0:
        raise ValueError(f"a paired difference needs the same units on both sides ({len(a)} and {len(b)})")
    draws = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    return PairedDifference(float(d.mean()), float(low), float(high), len(d))


def next_larger_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(quant, the next larger one) for every measured row but the largest, larger meaning more bits per weight (the
    reference is the largest).

    >>> rows = [{"type": t, "bits_per_weight": b, "divergence": {}} for t, b in (("F32", 32), ("Q4", 4.9), ("Q8", 8.5))]
    >>> rows.append({"type": "bad", "error": "unreadable"})
    >>> [(a["type"], b["type"]) for a, b in next_larger_pairs(rows)]
    [('Q8', 'F32'), ('Q4', 'Q8')]
    """
    measured = sorted((r for r in rows if "divergence" in r and r.get("bits_per_weight") is not None),
                      key=lambda r: -r["bits_per_weight"])
    return list(zip(measured[1:], measured[:-1]))


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Row `a` against row `b` of results measured on the same chunks and prompts: the difference in mean KLD (a's
    minus b's; both against their reference) and in accuracy over all prompts, each with its paired interval."""
    out: dict[str, Any] = {"type": a["type"], "against": b["type"],
                           "kld_mean": paired_bootstrap(a["divergence"]["chunk_kld"],
                                                        b["divergence"]["chunk_kld"]).as_dict()}
    if a.get("answers") and b.get("answers"):
        out["accuracy"] = paired_bootstrap(a["answers"], b["answers"]).as_dict()
    return out


def pair_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs a reader compares: every quant against the next larger one of its own variant (the reference
    above them all), and every variant's quant against the plain one of the same type (rows of ft eval: a
    variant's carry `variant`, and every quant's its type as `quant`)."""
    plain = [r for r in rows if "variant" not in r]
    pairs = [compare_rows(a, b) for a, b in next_larger_pairs(plain)]
    reference = [r for r in plain if "quant" not in r]
    same_type = {r["quant"]: r for r in plain if "quant" in r and "divergence" in r}
    for variant in dict.fromkeys(r["variant"] for r in rows if "variant" in r):
        group = [r for r in rows if r.get("variant") == variant]
        pairs += [compare_rows(a, b) for a, b in next_larger_pairs(reference + group)]
        pairs += [compare_rows(r, same_type[r["quant"]]) for r in group
                  if "divergence" in r and r["quant"] in same_type]
    return pairs
