"""Decode speed at batch 1 with the MTP drafter off and on, through ft's loop and llama.cpp's own, on 12B-shaped files.

Stage `inputs` (no llama.cpp needed, so it can run while llama.cpp builds): a random checkpoint of the target's
shape (numbers drawn on the GPU when there is one), converted to BF16 GGUF with ft's converter, a random drafter of
the 12B drafter's shape converted the same way, the drafter's echoing copy (bench/full_acceptance.py) and the
prompts. Stage `quantize` makes the targets with llama.cpp's quantizer and then deletes the BF16 target (the disk of
the GPU machine holds 64 GiB). Stage `measure`, per target, in this order:

1. ft's loop (eval.mtp): plain greedy decoding, then MTP at each draft length with the random drafter (its guesses
   are almost never accepted: the floor, the machinery's cost) and with the drafts replaced by the target's own
   greedy output (the drafter still run for its cost: acceptance 1.0, the ceiling of ft's loop). MTP output must
   equal plain output token for token; on a GPU it can differ where the top two tokens nearly tie (batched and
   one-row kernels round differently), so plain decoding is also run in batches padded to the verify width, which
   MTP must match exactly, and each divergence's logit lead is reported.
2. With `--llama-cpp BIN`: llama.cpp's own `llama-simple` and `llama-speculative-simple --spec-type draft-mtp`
   (bench/llama_tools.py) on the same files and the first `--tool-prompts` prompts, beside ft's figures on those;
   the speculative program once per `--tool-variant` (its extra arguments, e.g. llama.cpp's backend sampling).
3. The ceiling through both loops on the same files: the target is silenced in place and the echoing drafter
   proposes exactly what it will accept (bench/full_acceptance.py), then ft's loop and (with `--llama-cpp`)
   llama.cpp's decode with it, and plainly.

Every step skips work whose file is already there, so a stage cut off by a call's time limit resumes; results are
written after every row.

    python -m bench.eval_speed --work /tmp/s12 --stage inputs        # on the device machine, while llama.cpp builds
    python -m bench.eval_speed --work /tmp/s12 --stage quantize --targets Q8_0 Q6_K Q4_K_M
    python -m bench.eval_speed --work /tmp/s12 --stage measure --targets Q4_K_M --llama-cpp /tmp/lcpp-bld/bin \
        --tool-variant='default=-fit off' --tool-variant='bs=-fit off -bs'
    python -m bench.eval_speed --work /tmp/x --shape tiny            # a quick check of the script itself (CPU)

Writes bench/results/eval_speed.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.environment import earlier_environments, environment

PROMPT = "<|turn>user\n{i}. Write a short story about a lighthouse keeper and a storm.<turn|>\n<|turn>model\n"


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
    for shard in drafter_dir.glob("*.safetensors"):
        shard.unlink()


def write_prompts(work: Path, n: int) -> None:
    """n different chat prompts, as text (llama.cpp's programs add BOS to it) and as BOS + the model tokenizer's ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    texts = [PROMPT.format(i=i) for i in range(n)]
    prompts = [{"text": t, "tokens": [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]}
               for t in texts]
    (work / "prompts.json").write_text(json.dumps(prompts))


def in_child(function, *args) -> None:
    """Run a torch-using step in a fresh process, so that this one never holds torch's GPU memory."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{function.__name__} failed with exit code {process.exitcode}")


def make_inputs(work: Path, shape: str, n_prompts: int) -> None:
    from bench.full_acceptance import echo_drafter

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model-BF16.gguf").is_file():
        in_child(target_gguf, work, shape)
    if not (work / "drafter-BF16.gguf").is_file():
        in_child(drafter_gguf, work, shape)
    if not (work / "drafter-echo.gguf").is_file():
        echo_drafter(work / "drafter-BF16.gguf", work / "model-BF16.gguf", work / "drafter-echo.gguf")
    if not (work / "prompts.json").is_file():
        in_child(write_prompts, work, n_prompts)


def make_targets(work: Path, targets: list[str]) -> None:
    """Quantize the missing targets from the BF16 target, then delete it: nothing later reads it."""
    from quantize.llama_quant import quantize

    source = work / "model-BF16.gguf"
    for target in targets:
        path = work / f"model-{target}.gguf"
        if not path.is_file():
            if not source.is_file():
                raise SystemExit(f"{path} is missing and so is {source}: run --stage inputs again")
            started = time.perf_counter()
            quantize(source, path, target)
            print(f"quantized {target} in {time.perf_counter() - started:.0f} s", flush=True)
    source.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--targets", nargs="+", default=["Q8_0", "Q6_K", "Q4_K_M"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--stage", choices=["inputs", "quantize", "measure", "all"], default="all")
    parser.add_argument("--llama-cpp", type=Path, help="folder of llama.cpp's llama-simple and "
                        "llama-speculative-simple, to measure its own decoding beside ft's")
    parser.add_argument("--tool-prompts", type=int, default=2,
                        help="prompts llama.cpp's programs decode (each run loads the model again)")
    parser.add_argument("--tool-variant", dest="tool_variants", action="append", type=_variant,
                        help="NAME=ARGS: run llama-speculative-simple once more per variant with these extra arguments "
                        "(--tool-variant='bs=-fit off -bs'); repeat it to set variants beside each other in one run "
                        "(default: one variant, 'default', with none)")
    parser.add_argument("--tool-draft", type=int, nargs="+",
                        help="the draft lengths llama.cpp's programs run at (default: every --draft)")
    parser.add_argument("--no-padded", dest="padded", action="store_false",
                        help="skip plain decoding in verify-shaped batches (the check of MTP's exactness)")
    parser.add_argument("--no-explain", dest="explain", action="store_false",
                        help="skip decoding differing prompts again to report each divergence's logit lead")
    args = parser.parse_args()
    args.tool_variants = dict(args.tool_variants or [("default", ())])
    args.earlier_environments = earlier_environments(args.out)  # a measure stage resuming an earlier call's file
    if args.stage in ("inputs", "all"):
        make_inputs(args.work, args.shape, args.prompts)
    if args.stage in ("quantize", "all"):
        make_targets(args.work, args.targets)
    if args.stage in ("measure", "all"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Every target in turn, to the end (its echo pair included), resuming from the rows an interrupted run wrote."""
    prompts = json.loads((args.work / "prompts.json").read_text())[: args.prompts]
    rows = [r for r in _earlier_rows(args.out) if r["target"] in args.targets]
    for target in args.targets:
        path = args.work / f"model-{target}.gguf"
        silenced = Path(f"{path}.silenced").exists()
        target_rows = [r for r in rows if r["target"] == target]
        if target_rows and all("echo" in r for r in target_rows):
            print(f"{target}: measured already in {args.out}", flush=True)
            continue
        if not target_rows:
            if silenced:
                raise SystemExit(f"{path} was silenced by an earlier run that kept no rows: delete it and its "
                                 ".silenced marker, then run --stage quantize again")
            target_rows = measure_ft(args, path, target, prompts)
            rows.extend(target_rows)
            write_result(args, len(prompts), rows)  # after every step: a run cut off by a time limit resumes here
        tool_rows = [r for r in target_rows if r["draft_len"] in (args.tool_draft or args.draft)]
        if args.llama_cpp and not silenced:
            drafter = args.work / "drafter-BF16.gguf"
            missing = [n for n in args.tool_variants if any(n not in r.get("llama_cpp", {}) for r in tool_rows)]
            for name, figures in llama_cpp_variants(args, path, drafter, prompts, tool_rows, missing,
                                                    "random drafter"):
                for row, measured in zip(tool_rows, figures, strict=True):
                    row.setdefault("llama_cpp", {})[name] = measured
                write_result(args, len(prompts), rows)
        measure_echo(args, path, prompts, target_rows, tool_rows)
        write_result(args, len(prompts), rows)


def measure_ft(args: argparse.Namespace, path: Path, target: str, prompts: list[dict]) -> list[dict]:
    """ft's loop on the random target: plain, MTP with the random drafter, padded plain, and the ceiling."""
    from eval.mtp import decode_all, divergence, mismatches, mtp_summary, tokens_per_second

    drafter = args.work / "drafter-BF16.gguf"
    ids = [p["tokens"] for p in prompts]
    shown = args.tool_prompts
    plain = decode_all(path, ids, args.tokens)
    rows = []
    for draft_len in args.draft:
        mtp = decode_all(path, ids, args.tokens, drafter, draft_len)
        padded = decode_all(path, ids, args.tokens, pad_to=draft_len + 1) if args.padded else None
        proposed = decode_all(path, ids, args.tokens, drafter, draft_len, proposals=[d.tokens for d in plain])
        ceiling = mtp_summary(plain, proposed)
        row = {
            "target": target, "draft_len": draft_len, **mtp_summary(plain, mtp),
            # per prompt, the token where MTP's output first differs from plain decoding (None: identical); kept
            # even without --explain, which decodes the differing prompts again to say why
            "first_difference": [divergence(a, b) for a, b in zip(plain, mtp, strict=True)],
            "ceiling": {**{k: ceiling[k] for k in ("mtp_tokens_per_second", "acceptance_rate", "mean_accepted",
                                                   "identical")},
                        "first_difference": [divergence(a, b) for a, b in zip(plain, proposed, strict=True)]},
            # With nothing accepted, MTP's target runs exactly the batches of plain decoding padded to the
            # verify width, so equality here shows the protocol is exact and any difference is batch rounding.
            "identical_to_padded_plain": None if padded is None
            else all(a.tokens == b.tokens for a, b in zip(padded, mtp, strict=True)),
            "mismatches": mismatches(path, ids, plain, mtp, drafter, draft_len) if args.explain else None,
            # ft on the prompts llama.cpp's programs decode, for the side-by-side figures
            "ft_on_tool_prompts": {"prompts": shown, "plain_tokens_per_second": tokens_per_second(plain[:shown]),
                                   "mtp_tokens_per_second": tokens_per_second(mtp[:shown])},
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
    return rows


def llama_cpp_variants(args: argparse.Namespace, path: Path, drafter: Path, prompts: list[dict], rows: list[dict],
                       names: list[str], label: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Each named --tool-variant's figures (`llama_cpp_figures`) in turn, beside llama.cpp's own plain greedy decoding
    (`llama-simple`) of the same prompts, which is run once, before the first variant (and not at all for none)."""
    from bench.llama_tools import plain

    if not names:
        return
    texts = [p["text"] for p in prompts[: args.tool_prompts]]
    plain_speed = _speed([plain(args.llama_cpp, path, t, args.tokens) for t in texts])
    for name in names:
        yield name, llama_cpp_figures(args, path, drafter, texts, rows, name, plain_speed, label)


def llama_cpp_figures(args: argparse.Namespace, path: Path, drafter: Path, texts: list[str], rows: list[dict],
                      variant: str, plain_speed: float, label: str) -> list[dict[str, Any]]:
    """llama.cpp's own MTP decoding of `texts` (the first --tool-prompts prompts) with one --tool-variant's
    arguments, one dict per row's draft length, beside `plain_speed`. A variant the program refuses or crashes on is
    recorded with its error, so the variants beside it still run."""
    from bench.llama_tools import speculative

    extra = args.tool_variants[variant]
    figures: list[dict[str, Any]] = []
    for row in rows:
        try:
            runs = [speculative(args.llama_cpp, path, drafter, t, args.tokens, row["draft_len"], extra)
                    for t in texts]
        except RuntimeError as error:
            figures.append({"args": list(extra), "error": str(error)[-2000:]})
            print(f"{path.stem:13s} draft {row['draft_len']}: {label}: llama.cpp {variant} failed: {error}", flush=True)
            continue
        drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
        figures.append({"args": list(extra), "prompts": len(texts), "plain_tokens_per_second": plain_speed,
                        "mtp_tokens_per_second": _speed(runs), "acceptance_rate": accepted / drafted})
        print(f"{path.stem:13s} draft {row['draft_len']}: {label}: llama.cpp {variant} plain {plain_speed:7.1f} tok/s"
              f"  MTP {figures[-1]['mtp_tokens_per_second']:7.1f} tok/s  acceptance "
              f"{figures[-1]['acceptance_rate']:.3f}", flush=True)
    return figures


def measure_echo(args: argparse.Namespace, path: Path, prompts: list[dict], rows: list[dict],
                 tool_rows: list[dict]) -> None:
    """The ceiling through both loops: the target silenced in place, the echoing drafter (full_acceptance)."""
    from bench.full_acceptance import silence_layers
    from eval.mtp import decode_all, mtp_summary

    silence_layers(path)
    ids = [p["tokens"] for p in prompts]
    drafter = args.work / "drafter-echo.gguf"
    plain = decode_all(path, ids, args.tokens)
    for row in rows:
        summary = mtp_summary(plain, decode_all(path, ids, args.tokens, drafter, row["draft_len"]))
        row["echo"] = {"ft": summary}
        print(f"{path.stem:13s} draft {row['draft_len']}: echo pair: ft plain {summary['plain_tokens_per_second']:7.1f}"
              f" tok/s  MTP {summary['mtp_tokens_per_second']:7.1f} tok/s  acceptance {summary['acceptance_rate']:.3f}"
              f"  identical {summary['identical']}", flush=True)
    if args.llama_cpp:
        for name, figures in llama_cpp_variants(args, path, drafter, prompts, tool_rows, list(args.tool_variants),
                                                "echo pair"):
            for row, measured in zip(tool_rows, figures, strict=True):
                row["echo"].setdefault("llama_cpp", {})[name] = measured


def _variant(text: str) -> tuple[str, tuple[str, ...]]:
    """`NAME=ARGS` of --tool-variant, ARGS split as a shell would.

    >>> _variant("bs=-fit off -bs")
    ('bs', ('-fit', 'off', '-bs'))
    """
    name, sep, extra = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--tool-variant {text!r}: expected NAME=ARGS")
    return name, tuple(shlex.split(extra))


def _speed(runs: list) -> float:
    return sum(r.tokens for r in runs) / sum(r.seconds for r in runs)


def _earlier_rows(out: Path) -> list[dict[str, Any]]:
    return json.loads(out.read_text())["rows"] if out.is_file() else []


def write_result(args: argparse.Namespace, n_prompts: int, rows: list[dict]) -> None:
    from quantize.llama_lib import llama_cpp

    from ft.atomic import write_text

    result = {"benchmark": "eval_speed", "shape": args.shape, "date": datetime.date.today().isoformat(),
              "device": _device_name(), "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
              "prompts": n_prompts, "tokens": args.tokens, "llama_cpp_python": llama_cpp.__version__,
              "command": shlex.join(["python", "-m", "bench.eval_speed", *sys.argv[1:]]), "rows": rows,
              "environment": environment(sys.argv), "earlier_environments": args.earlier_environments}
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
