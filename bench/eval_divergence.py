"""ft's divergence pass against llama.cpp's own: `llama-perplexity --kl-divergence-base` then `--kl-divergence`.

A random-weight model of ft's architecture at the size of a 270M-parameter Gemma (width 640, 18 layers, Gemma 4's
262,144-token vocabulary, so most parameters are the embedding) is written with ft's exporter as a BF16 reference
GGUF (`export.reference`'s default) and quantized to Q4_K_M; a deterministic plain-text file is made of the tiny
tokenizer's words. All of it is cached under --work. Then, in one invocation, on the same file and text:

- ft: `reference_pass` and `divergence_of` (what `ft eval` runs), each in a fresh process (its peak RSS its own);
- llama.cpp: the base run (writes its logits file) and the KL-divergence run, with ft's engine flags: the same
  threads, context, chunks, and no extra CPU buffer types (`--no-repack`, as ft's `plain_cpu_kernels`).

Reported per pass: wall time (model load included, on both sides), peak RSS, bytes of the reference store against
llama.cpp's logits file, and the metrics each tool prints; ft over llama.cpp as ratios, since machines are noisy.

    python -m bench.eval_divergence --work /tmp/evaldiv --perplexity /tmp/lcpp-build/bin/llama-perplexity

Writes bench/results/eval_divergence.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.environment import environment

VOCAB = 262144
CONTEXT = 512
SHAPE = {  # Gemma 3 270M's widths in ft's (Gemma 4) architecture: ~270M parameters, 168M of them the embedding
    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 256, "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


def config() -> Any:
    """SHAPE in ft's architecture (`ft.tiny`'s settings otherwise), with the 262,144-token tokenizer's ids."""
    from transformers import Gemma4UnifiedConfig

    from ft.tiny import special_token_ids, tiny_tokenizer

    text_ids, media_ids = special_token_ids(tiny_tokenizer(VOCAB))
    text = {"vocab_size": VOCAB, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
            "final_logit_softcapping": 30.0, "max_position_embeddings": 4096, **SHAPE, **text_ids}
    vision = {"mm_embed_dim": 256, "mm_posemb_size": 128, "output_proj_dims": SHAPE["hidden_size"]}
    return Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config={"audio_embed_dim": 640},
                               **media_ids)


def make_models(work: Path, queue: Any) -> None:
    """BF16 reference and Q4_K_M GGUFs of a random model of SHAPE, through ft's own exporter and quantizer (in a
    child process, so that the torch model's memory goes with it)."""
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration

    from ft.tiny import temper_attention, tiny_tokenizer
    from quantize.gguf_lm import write_language_model
    from quantize.llama_quant import quantize

    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(config())
    temper_attention(model)
    model.to(torch.bfloat16).save_pretrained(work / "checkpoint")
    tiny_tokenizer(VOCAB).save_pretrained(work / "checkpoint")
    del model
    write_language_model(work / "checkpoint", work / "model-BF16.gguf", "BF16")
    quantize(work / "model-BF16.gguf", work / "model-Q4_K_M.gguf", "Q4_K_M")
    queue.put(None)


def make_text(path: Path, words: int) -> None:
    """Deterministic plain text: sentences of the tiny tokenizer's corpus words in a seeded random order."""
    from ft.tiny import _CORPUS

    vocabulary = sorted(set(_CORPUS.split()))
    rng = random.Random(0)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 14))).capitalize() + ".")
    path.write_text("\n".join(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)) + "\n")


def ft_settings(text: Path, tokens: int, threads: int) -> Any:
    from ft.recipe import EvalSection

    return EvalSection(context=CONTEXT, max_tokens=tokens, threads=threads, text=text, speed=False)


def ft_reference(work: Path, text: Path, tokens: int, threads: int, queue: Any) -> None:
    """ft's reference pass in this (fresh) process: tokens as `ft eval` makes them, then `reference_pass`."""
    from eval.pipeline import evaluation_tokens, reference_pass
    from eval.runner import load

    settings = ft_settings(text, tokens, threads)
    reference = work / "model-BF16.gguf"
    ids = evaluation_tokens(settings, None, None, load(reference, 64, vocab_only=True))
    started = time.perf_counter()
    store, targets = reference_pass(reference, ids, settings, work / "ft-reference.store")
    queue.put({"seconds": time.perf_counter() - started, "tokens": ids, "store": store, "targets": targets,
               "store_bytes": store.path.stat().st_size, "peak_rss_gib": peak_rss_gib()})


def ft_divergence(work: Path, text: Path, tokens: int, threads: int, reference: dict[str, Any], queue: Any) -> None:
    """ft's pass over the quant in this (fresh) process: `divergence_of` against the stored reference."""
    from eval.pipeline import divergence_of

    settings = ft_settings(text, tokens, threads)
    started = time.perf_counter()
    summary = divergence_of(work / "model-Q4_K_M.gguf", reference["tokens"], settings, reference["store"],
                            reference["targets"])
    queue.put({"seconds": time.perf_counter() - started, "metrics": summary, "peak_rss_gib": peak_rss_gib()})


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def in_child(target: Any, *args: Any) -> dict[str, Any]:
    """Run target(*args, queue) in a fresh spawned process and return what it put on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def run_perplexity(command: list[str]) -> dict[str, Any]:
    """Run llama-perplexity; its wall time, its own peak RSS (wait4 on it alone) and its output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0 or "failed" in output:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "output": output}


def llama_cpp_passes(binary: Path, work: Path, text: Path, chunks: int, threads: int) -> dict[str, Any]:
    """The base run (logits file) and the KL-divergence run of llama-perplexity, with ft's engine flags."""
    logits = work / "llama-base.kld"
    flags = ["-f", str(text), "-c", str(CONTEXT), "--chunks", str(chunks), "-t", str(threads), "-tb", str(threads),
             "--no-repack", "--kl-divergence-base", str(logits)]
    base = run_perplexity([str(binary), "-m", str(work / "model-BF16.gguf"), *flags])
    quant = run_perplexity([str(binary), "-m", str(work / "model-Q4_K_M.gguf"), *flags, "--kl-divergence"])
    return {"base": base, "quant": quant, "logits_file": logits, "store_bytes": logits.stat().st_size}


def logits_file_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_vocab, tokens) from the header of llama-perplexity's logits file: the magic `_logits_`, uint32
    n_ctx, int32 n_vocab, int32 n_chunk, then n_chunk * n_ctx int32 tokens (tools/perplexity/perplexity.cpp)."""
    with path.open("rb") as f:
        assert f.read(8) == b"_logits_"
        n_ctx, n_vocab, n_chunk = np.fromfile(f, dtype=np.int32, count=3)
        return int(n_ctx), int(n_vocab), np.fromfile(f, dtype=np.int32, count=int(n_chunk * n_ctx))


def top_code_ties(path: Path) -> float:
    """Fraction of llama.cpp's stored reference rows whose top code is shared by several tokens: there its top-1
    (the first of them) can differ from ft's, which takes the top token from exact logits. Rows of n_vocab + 4
    uint16 (float32 scale and minimum, then the codes) follow the tokens."""
    n_ctx, n_vocab, tokens = logits_file_tokens(path)
    row = n_vocab + 4
    with path.open("rb") as f:
        f.seek(8 + 12 + 4 * len(tokens))
        tied = total = 0
        while len(block := np.fromfile(f, dtype=np.uint16, count=64 * row)):
            codes = block.reshape(-1, row)[:, 4:]
            tied += int(((codes == codes.max(axis=-1, keepdims=True)).sum(axis=-1) > 1).sum())
            total += len(codes)
    return tied / total


def parse_kld(output: str) -> dict[str, float]:
    """The summary statistics that `llama-perplexity --kl-divergence` prints, in ft's names and units."""
    patterns = {
        "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_ref": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
        "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", "kld_mean": r"Mean\s+KLD:\s*([-\d.]+)",
        "kld_max": r"Maximum KLD:\s*([-\d.]+)", "kld_p999": r"99\.9%\s+KLD:\s*([-\d.]+)",
        "kld_p99": r"99\.0%\s+KLD:\s*([-\d.]+)", "kld_median": r"Median\s+KLD:\s*([-\d.]+)",
        "dp_mean": r"Mean\s+Δp:\s*([-\d.]+)", "dp_rms": r"RMS Δp\s*:\s*([-\d.]+)",
        "top1_agreement": r"Same top p:\s*([-\d.]+)",
    }
    found = {key: float(re.search(pattern, output).group(1)) for key, pattern in patterns.items()}
    for key in ("dp_mean", "dp_rms", "top1_agreement"):  # printed in percent
        found[key] /= 100
    return found


def table(result: dict[str, Any]) -> str:
    ft, llama = result["ft"], result["llama_cpp"]
    rows = [
        ("reference pass (s)", ft["reference"]["seconds"], llama["base"]["seconds"]),
        ("quant pass (s)", ft["quant"]["seconds"], llama["quant"]["seconds"]),
        ("both passes (s)", ft["seconds"], llama["seconds"]),
        ("reference store (GB)", ft["store_bytes"] / 1e9, llama["store_bytes"] / 1e9),
        ("peak RSS, reference pass (GiB)", ft["reference"]["peak_rss_gib"], llama["base"]["peak_rss_gib"]),
        ("peak RSS, quant pass (GiB)", ft["quant"]["peak_rss_gib"], llama["quant"]["peak_rss_gib"]),
    ]
    rows += [(key, ft["metrics"][key], llama["metrics"][key]) for key in llama["metrics"]]
    lines = [f"{'':34} {'ft':>12} {'llama.cpp':>12} {'ft/llama':>9}"]
    lines += [f"{name:34} {a:12.6g} {b:12.6g} {a / b if b else float('nan'):9.3f}" for name, a, b in rows]
    return "\n".join(lines)


def measure(work: Path, binary: Path, tokens: int, threads: int) -> dict[str, Any]:
    text = work / "text.txt"
    reference = in_child(ft_reference, work, text, tokens, threads)
    quant = in_child(ft_divergence, work, text, tokens, threads, reference)
    chunks = len(reference["tokens"]) // CONTEXT
    llama = llama_cpp_passes(binary, work, text, chunks, threads)
    n_ctx, n_vocab, llama_tokens = logits_file_tokens(llama["logits_file"])
    if (n_ctx, n_vocab) != (CONTEXT, VOCAB) or not np.array_equal(llama_tokens, reference["tokens"][: chunks * n_ctx]):
        raise RuntimeError("llama-perplexity scored other tokens than ft")
    return {
        "ft": {"reference": {k: reference[k] for k in ("seconds", "peak_rss_gib")},
               "quant": {k: quant[k] for k in ("seconds", "peak_rss_gib")},
               "seconds": reference["seconds"] + quant["seconds"], "store_bytes": reference["store_bytes"],
               "metrics": quant["metrics"]},
        "llama_cpp": {"base": {k: llama["base"][k] for k in ("seconds", "peak_rss_gib")},
                      "quant": {k: llama["quant"][k] for k in ("seconds", "peak_rss_gib")},
                      "seconds": llama["base"]["seconds"] + llama["quant"]["seconds"],
                      "store_bytes": llama["store_bytes"], "metrics": parse_kld(llama["quant"]["output"]),
                      "output_tail": llama["quant"]["output"][-2500:]},
        "chunks": chunks, "tokens_scored": quant["metrics"]["tokens"], "same_tokens": True,
        "llama_cpp_top_code_ties": top_code_ties(llama["logits_file"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--perplexity", type=Path, required=True, help="the llama-perplexity binary")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (a multiple of 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_divergence.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "model-Q4_K_M.gguf").is_file():
        in_child(make_models, args.work)
    if not (args.work / "text.txt").is_file():
        make_text(args.work / "text.txt", args.tokens)
    result = measure(args.work, args.perplexity, args.tokens, args.threads)
    sizes = {name: (args.work / name).stat().st_size for name in ("model-BF16.gguf", "model-Q4_K_M.gguf")}
    result.update(benchmark="eval_divergence", date=datetime.date.today().isoformat(), vocab=VOCAB, context=CONTEXT,
                  threads=args.threads, tokens=args.tokens, cpu_count=os.cpu_count(), model_bytes=sizes,
                  ratios={"seconds": result["ft"]["seconds"] / result["llama_cpp"]["seconds"],
                          "store_bytes": result["ft"]["store_bytes"] / result["llama_cpp"]["store_bytes"]},
                  environment=environment(sys.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
