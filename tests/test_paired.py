"""Paired differences with bootstrap intervals (eval/paired.py) and their table in the report: synthetic data with
known differences, identical inputs, and a direct computation of the same resampling."""

from __future__ import annotations

import numpy as np
import pytest

from eval.divergence import Divergence, encode
from eval.paired import RESAMPLES, SEED, paired_bootstrap, pair_table
from eval.report import markdown


def loop_bootstrap(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The same resampling, written out pair by pair in Python, and its percentiles by their definition."""
    n = len(a)
    draws = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n)).tolist()
    means = sorted(sum(a[i] - b[i] for i in row) / n for row in draws)

    def percentile(q: float) -> float:  # numpy's default: linear interpolation at q * (N - 1)
        at = q * (len(means) - 1)
        low = int(at)
        return means[low] + (at - low) * (means[min(low + 1, len(means) - 1)] - means[low])

    return sum(x - y for x, y in zip(a, b)) / n, percentile(0.025), percentile(0.975)


def test_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.gamma(2.0, 0.01, 40).tolist(), rng.gamma(2.0, 0.012, 40).tolist()
    got = paired_bootstrap(a, b)
    assert (got.difference, got.low, got.high) == pytest.approx(loop_bootstrap(a, b), abs=1e-12)
    assert got.n == 40


def test_known_difference_is_covered_about_95_percent_of_the_time() -> None:
    """Chunks whose KLD differs by 0.02 nats plus noise shared by both models (what pairing removes) and noise of
    their own: the interval excludes 0, and over many such texts it covers the true 0.02 in about 95% of them."""
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(200):
        shared = rng.gamma(2.0, 0.05, 32)
        a = shared + 0.02 + rng.normal(0, 0.01, 32)
        b = shared + rng.normal(0, 0.01, 32)
        d = paired_bootstrap(a, b, resamples=1000)
        covered += d.low <= 0.02 <= d.high
        assert d.excludes_zero
    assert 0.88 <= covered / 200 <= 0.99


def test_identical_inputs_give_an_interval_containing_zero() -> None:
    answers = [1, 0, 1, 1, 0, 1]
    d = paired_bootstrap(answers, answers)
    assert (d.difference, d.low, d.high, d.excludes_zero) == (0.0, 0.0, 0.0, False)
    flips = paired_bootstrap([1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1])  # 2 lost, 2 gained
    assert flips.difference == 0.0 and flips.low < 0 < flips.high and not flips.excludes_zero


def test_mismatched_units_are_refused() -> None:
    with pytest.raises(ValueError, match="same units"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_chunk_means_average_to_the_mean_kld() -> None:
    """Divergence keeps one mean KLD per scored chunk; chunks score equally many tokens, so their mean is the mean."""
    rng = np.random.default_rng(3)
    stats = Divergence()
    for _ in range(3):
        ref, q = rng.normal(size=(2, 20, 50)).astype(np.float32)
        stats.add(encode(ref), q, rng.integers(0, 50, 20))
    summary = stats.summary()
    per_token = np.concatenate(stats.kld)
    assert summary["chunk_kld"] == pytest.approx([per_token[i * 20 : (i + 1) * 20].mean() for i in range(3)])
    assert np.mean(summary["chunk_kld"]) == pytest.approx(summary["kld_mean"])


def rows() -> list[dict]:
    """Three rows as ft eval writes them: the reference, Q8_0 (close to it), Q2_K (far)."""
    def row(kind: str, bpw: float, chunks: list[float], answers: list[int]) -> dict:
        return {"type": kind, "bits_per_weight": bpw, "divergence": {"chunk_kld": chunks}, "answers": answers}

    return [row("F32 (reference)", 32.0, [0.0] * 4, [1, 1, 0, 1, 1, 0]),
            row("Q2_K", 2.6, [0.50, 0.70, 0.60, 0.65], [0, 0, 0, 1, 0, 0]),
            row("Q8_0", 8.5, [0.001, 0.002, 0.001, 0.002], [1, 1, 0, 1, 1, 0])]


def test_each_quant_is_compared_with_the_next_larger_one() -> None:
    pairs = pair_table(rows())
    assert [(p["type"], p["against"]) for p in pairs] == [("Q8_0", "F32 (reference)"), ("Q2_K", "Q8_0")]
    q8, q2 = pairs
    assert q8["kld_mean"]["difference"] == pytest.approx(0.0015) and q8["kld_mean"]["excludes_zero"]
    assert q8["accuracy"]["difference"] == 0.0 and not q8["accuracy"]["excludes_zero"]
    q2_kld = np.mean([0.499, 0.698, 0.599, 0.648])
    assert q2["kld_mean"]["difference"] == pytest.approx(q2_kld) and q2["kld_mean"]["excludes_zero"]
    assert q2["accuracy"]["difference"] == pytest.approx(1 / 6 - 4 / 6)
    table = markdown({"run": "r", "reference": "r-F32.gguf", "reference_type": "F32", "device": "cpu",
                      "date": "2026-12-07", "versions": {}, "settings": {}, "tasks": [], "quants": [],
                      "pairs": pairs})
    assert "| Q8_0 | F32 (reference) | +0.0015 [" in table
    assert f"| Q2_K | Q8_0 | {q2_kld:+.3g} [" in table and "] * | 4 | -50.0 [" in table


def test_variants_are_paired_within_themselves_and_with_the_plain_type() -> None:
    plain = rows()
    for row in plain[1:]:
        row["quant"] = row["type"]
    imat = {"type": "imat/Q2_K", "quant": "Q2_K", "variant": "imat", "bits_per_weight": 2.6,
            "divergence": {"chunk_kld": [0.40, 0.50, 0.45, 0.55]}, "answers": [1, 0, 0, 1, 0, 0]}
    pairs = pair_table([*plain, imat])
    assert [(p["type"], p["against"]) for p in pairs] == [
        ("Q8_0", "F32 (reference)"), ("Q2_K", "Q8_0"), ("imat/Q2_K", "F32 (reference)"), ("imat/Q2_K", "Q2_K")]
    assert pairs[3]["kld_mean"]["difference"] == pytest.approx(np.mean([-0.10, -0.20, -0.15, -0.10]))
    assert pairs[3]["accuracy"]["difference"] == pytest.approx(1 / 6)
