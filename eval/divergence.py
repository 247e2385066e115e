"""Distribution metrics of a quantized model against its 16-bit reference, streamed position by position.

Definitions follow llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp), so numbers are
comparable with published tables, with two deliberate differences: ft keeps the log-probabilities of both models at
float32 precision (float64 sums) where llama.cpp stores the reference as 16-bit codes clipped 16 nats below the maximum,
and ft sums KL divergence over the whole vocabulary (llama.cpp drops terms whose reference log-probability is at or
below -16, which are negligible). Per scored position t predicting token y:

    KLD_t      = sum_i p_ref(i) * (log p_ref(i) - log p_q(i))
    same top   = argmax p_ref == argmax p_q
    nll_t      = -log p_q(y),   nll_ref_t = -log p_ref(y)
    dp_t       = p_q(y) - p_ref(y)

Reported: mean (with standard error), median, 99th and 99.9th percentile of KLD; top-1 agreement; perplexity of each
model and their ratio exp(mean nll - mean nll_ref); mean and RMS of dp. Percentiles interpolate linearly at
f*(N-1) over the sorted values, as llama.cpp does.

    >>> import numpy as np
    >>> acc = Divergence()
    >>> logits = np.array([[2.0, 1.0, 0.0]])
    >>> acc.add(log_softmax(logits).astype(np.float32), logits, np.array([0]))
    >>> acc.summary()["kld_mean"], acc.summary()["top1_agreement"]
    (0.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROW_BLOCK = 16  # rows per float64 block: 16 x 262144 x 8 bytes = 32 MiB for Gemma 4's vocabulary


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def percentile(sorted_values: np.ndarray, f: float) -> float:
    """llama.cpp's percentile: linear interpolation at f*(N-1)."""
    p = f * (len(sorted_values) - 1)
    low = int(math.floor(p))
    high = min(low + 1, len(sorted_values) - 1)
    return float((1 - (p - low)) * sorted_values[low] + (p - low) * sorted_values[high])


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    variance = float((values**2).mean() - mean**2)
    return mean, math.sqrt(variance / (n - 1)) if n > 10 and variance > 0 else 0.0


@dataclass
class Divergence:
    """Per-token statistics accumulated chunk by chunk; only O(tokens) numbers are kept, never logits."""

    kld: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    nll_ref: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logprobs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Score positions: reference log-probs [T, V], the quant's raw logits [T, V], next tokens [T]."""
        for start in range(0, len(targets), ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            ref = ref_logprobs[rows].astype(np.float64)
            # Rounded through float32 like the stored reference, so a model compared with itself gives exactly 0.
            q = log_softmax(logits[rows]).astype(np.float32).astype(np.float64)
            y = targets[rows]
            at = np.arange(len(y))
            self.kld.append((np.exp(ref) * (ref - q)).sum(axis=-1))
            self.same_top.append(ref.argmax(axis=-1) == q.argmax(axis=-1))
            self.nll.append(-q[at, y])
            self.nll_ref.append(-ref[at, y])
            self.dp.append(np.exp(q[at, y]) - np.exp(ref[at, y]))

    @property
    def count(self) -> int:
        return int(sum(len(k) for k in self.kld))

    def summary(self) -> dict[str, Any]:
        kld, nll, nll_ref = (np.concatenate(x) for x in (self.kld, self.nll, self.nll_ref))
        same, dp = np.concatenate(self.same_top), np.concatenate(self.dp)
        ordered = np.sort(kld)
        kld_mean, kld_error = _mean_and_error(kld)
        agreement = float(same.mean())
        n = len(kld)
        return {
            "tokens": n,
            "kld_mean": kld_mean,
            "kld_mean_error": kld_error,
            "kld_median": percentile(ordered, 0.5),
            "kld_p99": percentile(ordered, 0.99),
            "kld_p999": percentile(ordered, 0.999),
            "kld_max": float(ordered[-1]),
            "top1_agreement": agreement,
            "top1_agreement_error": math.sqrt(agreement * (1 - agreement) / (n - 1)) if n > 1 else 0.0,
            "ppl": math.exp(nll.mean()),
            "ppl_ref": math.exp(nll_ref.mean()),
            "ppl_ratio": math.exp(nll.mean() - nll_ref.mean()),
            "dp_mean": float(dp.mean()),
            "dp_rms": math.sqrt(float((dp**2).mean())),
        }
