"""What one sampled row costs on the CPU over Gemma 4's 262,144-token vocabulary: llama.cpp's sampler chains against
ft's argmax.

`llama-speculative-simple` (llama.cpp's own speculative decoding, which bench/eval_speed.py compares ft's MTP loop
with) samples every verified row through `common_sampler`: it copies the row's logits into a 262,144-entry
`llama_token_data` array (`set_logits`, common/sampling.cpp) and applies its chain, which at `--temp 0` with the
default `--samplers` is penalties, DRY, top-n-sigma, top-k 40, typical, top-p, min-p, XTC, temperature and dist.
ft's loop takes a numpy argmax of the logits row. This bench times each piece on synthetic logits (normal, like a
model's), a row at a time, through llama.cpp's own sampler code (llama-cpp-python's bindings of the C API). Samplers
that are off at their defaults (penalties with repeat 1.0, DRY with multiplier 0, top-n-sigma -1, XTC probability 0,
typical 1.0) return at once and are left out of the chain; the copy into the array is timed with numpy doing what
`set_logits`' loop does.

    python -m bench.sampler_cost --out bench/results/2026-12-03-devcpu-sampler_cost.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.environment import environment

VOCAB = 262144
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def chains() -> dict[str, list[Callable[[], object]]]:
    """Sampler chains by the `llama-speculative-simple` flags that build them (their no-op members left out)."""
    from quantize.llama_lib import llama_cpp as L

    return {
        "default chain at --temp 0 (top_k 40, top_p 0.95, min_p 0.05, temp 0, dist)": [
            lambda: L.llama_sampler_init_top_k(40), lambda: L.llama_sampler_init_top_p(0.95, 1),
            lambda: L.llama_sampler_init_min_p(0.05, 1), lambda: L.llama_sampler_init_temp_ext(0.0, 0.0, 1.0),
            lambda: L.llama_sampler_init_dist(0)],
        "--samplers top_k --top-k 1 (top_k 1, dist)": [
            lambda: L.llama_sampler_init_top_k(1), lambda: L.llama_sampler_init_dist(0)],
        "greedy sampler alone": [L.llama_sampler_init_greedy],
    }


def median_ms(samples: list[float]) -> float:
    return round(float(np.median(samples)) * 1e3, 4)


def measure(rows: int, seed: int) -> dict[str, float]:
    """Median milliseconds per row of each piece over `rows` random logit rows."""
    from quantize.llama_lib import llama_cpp as L

    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, VOCAB), dtype=np.float32) * 3.0
    cur = np.zeros(VOCAB, dtype=TOKEN_DATA)
    ids = np.arange(VOCAB, dtype=np.int32)
    results: dict[str, float] = {}

    fills, argmaxes = [], []
    for row in logits:
        start = time.perf_counter()
        cur["id"], cur["logit"], cur["p"] = ids, row, 0.0
        fills.append(time.perf_counter() - start)
        start = time.perf_counter()
        int(row.argmax())
        argmaxes.append(time.perf_counter() - start)
    results["copy a row into the token-data array (set_logits)"] = median_ms(fills)
    results["ft: numpy argmax of the row"] = median_ms(argmaxes)

    array = L.llama_token_data_array(cur.ctypes.data_as(L.llama_token_data_p), VOCAB, -1, False)
    for name, members in chains().items():
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        for make in members:
            L.llama_sampler_chain_add(chain, make())
        times = []
        for row in logits:
            cur["id"], cur["logit"], cur["p"] = ids, row, 0.0
            array.size, array.selected, array.sorted = VOCAB, -1, False
            start = time.perf_counter()
            L.llama_sampler_apply(chain, ctypes.byref(array))
            times.append(time.perf_counter() - start)
            if cur["id"][array.selected] != row.argmax():
                raise AssertionError(f"{name} did not pick the top token")
        L.llama_sampler_free(chain)
        results[f"apply: {name}"] = median_ms(times)
    return results


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{today}-sampler_cost.json")
    args = parser.parse_args()
    results = measure(args.rows, seed=0)
    payload = {"benchmark": "sampler_cost", "date": datetime.date.today().isoformat(),
               "device": f"CPU: {cpu_name()}, one thread",
               "command": "python -m bench.sampler_cost", "rows": args.rows, "vocab": VOCAB,
               "milliseconds_per_row": results, "environment": environment(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for name, ms in results.items():
        print(f"{ms:8.3f} ms  {name}")


if __name__ == "__main__":
    main()
