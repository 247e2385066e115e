"""Peak memory of ft eval's divergence pass with Gemma 4's full 262,144-token vocabulary over 8192 tokens.

The tiny model's architecture with the real vocabulary size (its embedding and output rows are what make a large
vocabulary expensive to evaluate) is converted to F32 and Q8_0 GGUFs; then, in a fresh process, the reference pass
(log-probabilities streamed to disk) and the Q8_0 divergence pass run over 8192 tokens exactly as `ft eval` runs
them. Reported: that process's peak RSS, and the same minus the larger model file (what eval holds beyond the model).

    python -m bench.eval_memory --work /tmp/evalmem

Writes bench/results/eval_memory.json (or --out) and prints the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.environment import environment

VOCAB = 262144
TOKENS = 8192
CONTEXT = 512


def make_models(work: Path) -> None:
    from ft.tiny import temper_attention, tiny_config, tiny_tokenizer
    from quantize.gguf_lm import write_language_model
    from quantize.llama_quant import quantize
    from transformers import Gemma4UnifiedForConditionalGeneration

    import torch

    tokenizer = tiny_tokenizer(VOCAB)
    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(tiny_config(tokenizer))
    temper_attention(model)
    model.save_pretrained(work / "checkpoint")
    tokenizer.save_pretrained(work / "checkpoint")
    write_language_model(work / "checkpoint", work / "model-F32.gguf", "F32")
    quantize(work / "model-F32.gguf", work / "model-Q8_0.gguf", "Q8_0")


def divergence(work: Path, queue: Any) -> None:
    import numpy as np

    from eval.pipeline import divergence_of, reference_pass
    from ft.recipe import EvalSection

    settings = EvalSection(context=CONTEXT, max_tokens=TOKENS)
    tokens = [int(t) for t in np.random.default_rng(0).integers(300, VOCAB, TOKENS)]
    started = time.perf_counter()
    ref, targets = reference_pass(work / "model-F32.gguf", tokens, settings, work / "reference.f32")
    summary = divergence_of(work / "model-Q8_0.gguf", tokens, settings, ref, targets)
    queue.put({"seconds": time.perf_counter() - started, "tokens_scored": summary["tokens"],
               "kld_mean": summary["kld_mean"],
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_memory.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    maker = context.Process(target=make_models, args=(args.work,))
    maker.start()
    maker.join()
    queue = context.Queue()
    worker = context.Process(target=divergence, args=(args.work, queue))
    worker.start()
    worker.join()
    result = queue.get()
    model_gib = max((args.work / f"model-{t}.gguf").stat().st_size for t in ("F32", "Q8_0")) / 2**30
    result.update(benchmark="eval_memory", date=datetime.date.today().isoformat(), vocab=VOCAB, tokens=TOKENS,
                  context=CONTEXT, cpu_count=os.cpu_count(), model_file_gib=model_gib,
                  beyond_model_gib=result["peak_rss_gib"] - model_gib, environment=environment(sys.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
