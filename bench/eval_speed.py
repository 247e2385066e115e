"""Decode speed at batch 1 with the MTP drafter off and on: 12B-shaped random target (Q4_K_M, Q8_0) and drafter.

Runs after `bench.export_12b --stage ...` left its GGUF files and merged config in --work. A random drafter of the
12B drafter's shape is written and converted with ft's converter, then each target decodes the same prompts with
plain greedy decoding and with MTP speculative decoding (ft's eval.mtp), in the same process. With random weights
the drafter's guesses are almost never accepted, so this measures the machinery and its overhead, not the speed-up
a trained drafter gives; the report says so. MTP output must equal plain output token for token.

    python -m bench.eval_speed --work /tmp/export12b                 # on the device machine, CUDA llama.cpp
    python -m bench.eval_speed --work /tmp/x --shape tiny            # a quick check of the script itself

Writes bench/results/eval_speed.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
from pathlib import Path

from eval.mtp import decode

PROMPT = "<bos><|turn>user\nWrite a short story about a lighthouse keeper and a storm.<turn|>\n<|turn>model\n"


def drafter_gguf(work: Path, shape: str) -> None:
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from bench.shapes import drafter_config_12b, write_weights
    from ft.tiny_drafter import save_tiny_drafter
    from quantize.gguf_drafter import write_drafter

    drafter_dir = work / "drafter"
    if shape == "12b":
        write_weights(Gemma4UnifiedAssistantForCausalLM, drafter_config_12b(), drafter_dir)
    else:
        save_tiny_drafter(drafter_dir)
    write_drafter(drafter_dir, work / "merged", work / "drafter-BF16.gguf", "BF16")


def prompt_tokens(work: Path, n: int) -> None:
    """n different prompts (the chat prompt with a number prefix), tokenized by the model's tokenizer, to a file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    prompts = [tokenizer(f"{i}. {PROMPT}", add_special_tokens=False)["input_ids"] for i in range(n)]
    (work / "prompts.json").write_text(json.dumps(prompts))


def in_child(function, *args) -> None:
    """Run a torch-using step in a fresh process: torch's CUDA libraries and a CUDA build of llama.cpp in one
    process crashed llama.cpp's model load on the H100 machine here."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{function.__name__} failed with exit code {process.exitcode}")


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--targets", nargs="+", default=["Q4_K_M", "Q8_0"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()

    in_child(drafter_gguf, args.work, args.shape)
    drafter = args.work / "drafter-BF16.gguf"
    in_child(prompt_tokens, args.work, args.prompts)
    prompts = json.loads((args.work / "prompts.json").read_text())
    rows = []
    for target in args.targets:
        path = args.work / f"model-{target}.gguf"
        decode(path, prompts[0], 8)  # warm-up: load, allocate and run every kernel once
        plain = [decode(path, p, args.tokens) for p in prompts]
        plain_tps = sum(d.timed_tokens for d in plain) / sum(d.seconds for d in plain)
        for draft_len in args.draft:
            mtp = [decode(path, p, args.tokens, drafter, draft_len) for p in prompts]
            drafted = sum(d.drafted for d in mtp)
            row = {
                "target": target, "draft_len": draft_len, "plain_tokens_per_second": plain_tps,
                "mtp_tokens_per_second": sum(d.timed_tokens for d in mtp) / sum(d.seconds for d in mtp),
                "acceptance_rate": sum(d.accepted for d in mtp) / drafted if drafted else 0.0,
                "mean_accepted": sum(d.accepted for d in mtp) / sum(d.steps for d in mtp),
                "identical": all(a.tokens == b.tokens for a, b in zip(plain, mtp, strict=True)),
            }
            row["mtp_over_plain"] = row["mtp_tokens_per_second"] / plain_tps
            rows.append(row)
            print(f"{target:7s} draft {draft_len}: plain {plain_tps:7.1f} tok/s  MTP {row['mtp_tokens_per_second']:7.1f} "
                  f"tok/s ({row['mtp_over_plain']:.2f}x)  acceptance {row['acceptance_rate']:.3f}  "
                  f"identical {row['identical']}", flush=True)
    result = {"benchmark": "eval_speed", "shape": args.shape, "date": datetime.date.today().isoformat(),
              "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()), "prompts": args.prompts,
              "tokens": args.tokens, "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
