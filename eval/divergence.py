"""Distribution metrics of a quantized model against its 16-bit reference, streamed position by position.

Definitions follow llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp), so numbers are
comparable with published tables. Per scored position t predicting token y:

    KLD_t      = sum_i p_ref(i) * (log p_ref(i) - log p_q(i))
    same top   = argmax p_ref == argmax p_q
    nll_t      = -log p_q(y),   nll_ref_t = -log p_ref(y)
    dp_t       = p_q(y) - p_ref(y)

Reported: mean (with standard error), median, 99th and 99.9th percentile of KLD; top-1 agreement; perplexity of each
model and their ratio exp(mean nll - mean nll_ref); mean and RMS of dp. Percentiles interpolate linearly at
f*(N-1) over the sorted values, as llama.cpp does.

Storage. The reference's log-probabilities are kept much as llama.cpp keeps them: per position a float32 scale and
a float32 offset, then one uint16 code per vocabulary entry on a linear grid over the row's range (`encode`): log p =
code * scale + offset. A position costs 2 * (V + 6) bytes, half of float32; the header also holds the reference's top
token, taken from its exact logits where codes of near-ties would tie. The quant's log-probabilities pass through the
same grid before they are compared, so a model measured against itself gives exactly 0. Two differences from
llama.cpp, both deliberate: the grid spans up to SPAN = 32 nats below the row's top logit where llama.cpp's spans 16,
and the KLD sum runs over the whole vocabulary where llama.cpp drops entries whose reference log-probability is at or
below -16. An entry below the grid is stored as the grid's bottom, which overstates its probability; 32 nats down, all
such entries of a 262,144-token vocabulary together hold under 262144 * e^-32 = 3e-9 of probability, so nothing
needs dropping. The price is a step of 32 / 65535 = 4.9e-4 nats (a log-probability within 2.4e-4 of its exact value;
llama.cpp's 1.2e-4) on rows that span 32 nats or more; a row spanning less uses its own, finer, range. Rounding errors
average out of the mean: on the demo's Q4_K_M (tests/test_eval.py) the mean KLD is within 5e-8 nats of float64
arithmetic on the exact log-probabilities, single positions within 1.5e-6; on a 262,144-token model
(bench/eval_divergence.py) ft's KLD statistics equal llama-perplexity's to the six decimals it prints, and the
perplexities agree to 1.4e-6.

Arithmetic is float32 over the vocabulary in numpy, in blocks of ROW_BLOCK rows, with float64 sums, on one thread on
purpose: torch's two-thread pool ran these operations slower than one thread on the 2-core machine, and its spinning
threads slowed llama.cpp's decodes beside them (docs/BENCHMARKS.md#measurements-behind-design-decisions).

    >>> import numpy as np
    >>> acc = Divergence()
    >>> logits = np.array([[2.0, 1.0, 0.0]], dtype=np.float32)
    >>> acc.add(encode(logits), logits, np.array([0]))
    >>> acc.summary()["kld_mean"], acc.summary()["top1_agreement"]
    (0.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROW_BLOCK = 8  # rows per block: 8 x 262144 float32 = 8 MiB per temporary at Gemma 4's vocabulary, cache-sized
SPAN = 32.0  # nats below a row's top logit that its 16-bit grid covers (see the module docstring)
LEVELS = 65535  # uint16 codes 0..65535
HEADER = 6  # uint16 slots before a row's codes: float32 scale, float32 offset, uint32 top token


def _grid(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (integers 0..LEVELS, as float32) of rows of logits [B, V] float32, and per row the scale and the offset
    that turn a code back into a log-probability: log p = code * scale + offset. llama.cpp's grid, SPAN nats deep."""
    high = logits.max(axis=-1, keepdims=True)
    low = np.maximum(logits.min(axis=-1, keepdims=True), high - SPAN)
    scale = (high - low) / LEVELS
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)  # a flat row: every entry is code 0
    work = np.subtract(logits, high)
    log_sum = np.log(np.exp(work, out=work).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    codes = np.subtract(logits, low, out=work)
    codes *= inverse
    np.clip(np.rint(codes, out=codes), 0, LEVELS, out=codes)
    return codes, scale, low - high - log_sum


def encode(logits: np.ndarray) -> np.ndarray:
    """Rows of logits [B, V] as stored rows [B, HEADER + V] uint16: the float32 scale and offset and the uint32 top
    token (as six uint16), then the codes."""
    logits = np.asarray(logits, dtype=np.float32)
    codes, scale, offset = _grid(logits)
    header = np.empty((len(logits), HEADER // 2), dtype=np.float32)
    header[:, :1], header[:, 1:2] = scale, offset
    header.view(np.uint32)[:, 2] = logits.argmax(axis=-1)  # exact, where the codes of near-ties would tie
    rows = np.empty((len(logits), HEADER + logits.shape[-1]), dtype=np.uint16)
    rows[:, :HEADER] = header.view(np.uint16)
    rows[:, HEADER:] = codes
    return rows


def _header(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    header = np.ascontiguousarray(rows[:, :HEADER]).view(np.float32)
    return header[:, :1], header[:, 1:2], header.view(np.uint32)[:, 2]


def decode(rows: np.ndarray) -> np.ndarray:
    """Stored rows [B, HEADER + V] uint16 back to log-probabilities [B, V] float32."""
    scale, offset, _ = _header(rows)
    log_probs = rows[:, HEADER:].astype(np.float32)
    log_probs *= scale
    log_probs += offset
    return log_probs


def rounded_log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities [B, V] float32 of rows of logits, rounded to the stored grid: decode(encode(logits))."""
    codes, scale, offset = _grid(np.asarray(logits, dtype=np.float32))
    codes *= scale
    codes += offset
    return codes


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
    chunk_kld: list[float] = field(default_factory=list)  # mean KLD of each `add` (a scored chunk): paired intervals

    def add(self, reference: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Score positions: the reference's stored rows [T, HEADER + V] (`encode`), the quant's raw logits [T, V],
        next tokens [T]; one call per scored chunk."""
        blocks = len(self.kld)
        for start in range(0, len(targets), ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            ref = decode(reference[rows])
            q = rounded_log_softmax(logits[rows])
            y = targets[rows]
            at = np.arange(len(y))
            terms = np.subtract(ref, q)
            terms *= np.exp(ref)
            nll, nll_ref = -q[at, y].astype(np.float64), -ref[at, y].astype(np.float64)
            self.kld.append(terms.sum(axis=-1, dtype=np.float64))
            self.same_top.append(_header(reference[rows])[2] == logits[rows].argmax(axis=-1))
            self.nll.append(nll)
            self.nll_ref.append(nll_ref)
            self.dp.append(np.exp(-nll) - np.exp(-nll_ref))
        self.chunk_kld.append(float(np.concatenate(self.kld[blocks:]).mean()))

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
            "chunk_kld": self.chunk_kld,
        }
