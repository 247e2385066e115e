"""Time and memory of `ft validate` (reading, checking and encoding every row) over many text rows of about 500 tokens.

    python -m bench.data_checks --rows 100000 --checkout /work/main --out bench/results/DATE-cpu-data_checks.json

Writes a JSONL of `--rows` two-turn text rows into a scratch folder, calibrated to about 500 tokens of the tiny
model's tokenizer, and runs `ft validate` on it with `--checkout` first on PYTHONPATH (so one script measures any
checkout, before and after a change), `--runs` times in processes of their own, the first on an empty datasets cache
(so a second run shows what ft keeps between runs): wall time, and each process's peak RSS from wait4. The
machine's load average is recorded beside them, since a shared machine slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.environment import environment

WORDS = ("the", "model", "reads", "every", "row", "and", "counts", "tokens", "before", "training", "starts", "here")


def write_rows(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            row = [{"role": "user", "content": f"Question {i}: {text[: len(text) // 4]}"},
                   {"role": "assistant", "content": text}]
            f.write(json.dumps({"messages": row}) + "\n")


def words_for(tokens: int) -> int:
    """Words per row that give about `tokens` tokens with the tiny tokenizer."""
    from ft.tiny import tiny_processor

    tokenizer = tiny_processor().tokenizer
    sample = " ".join(WORDS * 50)
    return round(tokens * len(sample.split()) * 0.8 / len(tokenizer(sample)["input_ids"]))  # 0.8: the user turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=500, help="about this many tokens a row")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--runs", type=int, default=2, help="ft validate runs, the first on a cold datasets cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = work / "train.jsonl"
    write_rows(data, args.rows, words_for(args.tokens))
    recipe = work / "recipe.yaml"
    recipe.write_text(f"# bench: python -m ft validate {recipe}\nmodel: {{name: tiny-random:gemma4-unified}}\n"
                      f"data: {{train: {data}, max_seq_length: 4096}}\noutput: {{dir: {work / 'run'}}}\n")
    env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets")}  # a cold cache for the first run
    runs = []
    for _ in range(args.runs):
        load_before = os.getloadavg()
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "ft", "validate", str(recipe)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, rusage = os.wait4(process.pid, 0)[1:]
        seconds = time.perf_counter() - started
        stderr = process.stderr.read()
        if not stderr.rstrip().endswith(f"ok: {recipe}"):
            sys.exit(stderr)
        runs.append({"seconds": round(seconds, 1), "peak_rss_gib": round(rusage.ru_maxrss / 2**20, 2),
                     "load_average_before": load_before, "load_average_after": os.getloadavg()})
    figures = {"rows": args.rows, "tokens_per_row": args.tokens, "checkout": str(args.checkout), "runs": runs,
               "environment": environment(sys.argv)}
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
