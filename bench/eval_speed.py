"""Decode speed at batch 1 with the MTP drafter off and on: 12B-shaped random target (Q4_K_M, Q8_0) and drafter.

Stage `inputs` (no llama.cpp needed, so it can run while llama-cpp-python builds): a random checkpoint of the
target's shape (numbers drawn on the GPU when there is one), converted to BF16 GGUF with ft's converter, a random
drafter of the 12B drafter's shape converted the same way, and the tokenized prompts. Stage `measure` quantizes the
targets that are missing (llama.cpp's quantizer, on the CPU) and then decodes the same prompts with plain greedy
decoding and with MTP speculative decoding (ft's eval.mtp), in the same process. Every step skips work whose file
is already there, so a stage cut off by a call's time limit resumes. With random weights the drafter's guesses are
almost never accepted, so this measures the machinery and its overhead, not the speed-up a trained drafter gives;
each row therefore also measures the loop's ceiling: the drafts replaced by the target's own greedy output
(acceptance 1.0, the drafter still run for its cost), the best this loop can do at that draft length. MTP output must
equal plain output token for token; on a GPU it can differ where the target's top two tokens nearly tie (batched and
one-row kernels round differently), so each run also decodes plainly in batches padded to the verify step's width,
which MTP must match exactly, and reports each divergence's logit lead.

    python -m bench.eval_speed --work /tmp/s12 --stage inputs        # on the device machine, while llama.cpp builds
    python -m bench.eval_speed --work /tmp/s12 --stage measure       # then, with the CUDA build of llama-cpp-python
    python -m bench.eval_speed --work /tmp/x --shape tiny            # a quick check of the script itself (CPU)

Writes bench/results/eval_speed.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import time
from pathlib import Path

PROMPT = "<bos><|turn>user\nWrite a short story about a lighthouse keeper and a storm.<turn|>\n<|turn>model\n"


def target_gguf(work: Path, shape: str) -> None:
    """The target checkpoint (config and tokenizer kept for the drafter) and its BF16 GGUF, weights then deleted."""
    import torch

    from bench.shapes import config_12b, write_checkpoint
    from ft.tiny import build_tiny
    from quantize.gguf_lm import write_language_model

    config = config_12b() if shape == "12b" else build_tiny()[0].config
    write_checkpoint(work / "merged", config, device="cuda" if torch.cuda.is_available() else "cpu")
    write_language_model(work / "merged", work / "model-BF16.gguf", "BF16")
    for shard in (work / "merged").glob("*.safetensors"):
        shard.unlink()


def drafter_gguf(work: Path, shape: str) -> None:
    import torch
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from bench.shapes import drafter_config_12b, write_weights
    from ft.tiny_drafter import save_tiny_drafter
    from quantize.gguf_drafter import write_drafter

    drafter_dir = work / "drafter"
    if shape == "12b":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_weights(Gemma4UnifiedAssistantForCausalLM, drafter_config_12b(), drafter_dir, device=device)
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


def make_inputs(work: Path, shape: str, n_prompts: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model-BF16.gguf").is_file():
        in_child(target_gguf, work, shape)
    if not (work / "drafter-BF16.gguf").is_file():
        in_child(drafter_gguf, work, shape)
    if not (work / "prompts.json").is_file():
        in_child(prompt_tokens, work, n_prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--targets", nargs="+", default=["Q4_K_M", "Q8_0"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--stage", choices=["inputs", "measure", "all"], default="all")
    parser.add_argument("--no-explain", dest="explain", action="store_false",
                        help="skip decoding differing prompts again to report each divergence's logit lead")
    args = parser.parse_args()
    if args.stage in ("inputs", "all"):
        make_inputs(args.work, args.shape, args.prompts)
    if args.stage in ("measure", "all"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    from eval.mtp import decode_all, mismatches, mtp_summary
    from quantize.llama_quant import quantize

    drafter = args.work / "drafter-BF16.gguf"
    prompts = json.loads((args.work / "prompts.json").read_text())[: args.prompts]
    rows = []
    for target in args.targets:
        path = args.work / f"model-{target}.gguf"
        if not path.is_file():
            started = time.perf_counter()
            quantize(args.work / "model-BF16.gguf", path, target)
            print(f"quantized {target} in {time.perf_counter() - started:.0f} s", flush=True)
        plain = decode_all(path, prompts, args.tokens)
        for draft_len in args.draft:
            mtp = decode_all(path, prompts, args.tokens, drafter, draft_len)
            padded = decode_all(path, prompts, args.tokens, pad_to=draft_len + 1)
            # The loop's ceiling: the target's own greedy output offered as the drafts (the drafter still runs).
            ceiling = mtp_summary(plain, decode_all(path, prompts, args.tokens, drafter, draft_len,
                                                    proposals=[d.tokens for d in plain]))
            row = {
                "target": target, "draft_len": draft_len, **mtp_summary(plain, mtp),
                "ceiling": {k: ceiling[k] for k in ("mtp_tokens_per_second", "acceptance_rate", "mean_accepted",
                                                    "identical")},
                # With nothing accepted, MTP's target runs exactly the batches of plain decoding padded to the
                # verify width, so equality here shows the protocol is exact and any difference is batch rounding.
                "identical_to_padded_plain": all(a.tokens == b.tokens for a, b in zip(padded, mtp, strict=True)),
                "mismatches": mismatches(path, prompts, plain, mtp, drafter, draft_len) if args.explain else None,
            }
            row["mtp_over_plain"] = row["mtp_tokens_per_second"] / row["plain_tokens_per_second"]
            row["ceiling"]["over_plain"] = ceiling["mtp_tokens_per_second"] / row["plain_tokens_per_second"]
            rows.append(row)
            print(f"{target:7s} draft {draft_len}: plain {row['plain_tokens_per_second']:7.1f} tok/s  "
                  f"MTP {row['mtp_tokens_per_second']:7.1f} tok/s ({row['mtp_over_plain']:.2f}x)  "
                  f"acceptance {row['acceptance_rate']:.3f}  ceiling {ceiling['mtp_tokens_per_second']:7.1f} tok/s "
                  f"({row['ceiling']['over_plain']:.2f}x, acceptance {ceiling['acceptance_rate']:.3f})  "
                  f"identical {row['identical']}  identical to padded plain {row['identical_to_padded_plain']}",
                  flush=True)
            for m in row["mismatches"] or []:
                print(f"  prompt {m['prompt']} differs from token {m['token']}: lead of the top token "
                      f"{m['plain_margin']:.4g} (MTP off), {m['mtp_margin']:.4g} (MTP on)", flush=True)
            write_result(args, len(prompts), rows)  # after every row: a run cut off by a time limit keeps its rows


def write_result(args: argparse.Namespace, n_prompts: int, rows: list[dict]) -> None:
    import llama_cpp

    from ft.atomic import write_text

    result = {"benchmark": "eval_speed", "shape": args.shape, "date": datetime.date.today().isoformat(),
              "device": _device_name(), "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
              "prompts": n_prompts, "tokens": args.tokens, "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")


def _device_name() -> str:
    """The GPU's name from nvidia-smi (torch stays out of this process), else the CPU's."""
    import platform
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
