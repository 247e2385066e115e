"""Export benchmark at the exact Gemma 4 12B shape: merge + convert (BF16, projector) + Q8_0 + Q6_K + Q4_K_M.

Random bf16 weights in Google's layout and a random r=16 LoRA over every language-model projection are written
first; each export step then runs in a fresh process, which reports its wall time and its own peak RSS
(`ru_maxrss`), so one step's memory never hides another's. Intermediate files are deleted as soon as the next
step no longer needs them (the device machine has 64 GiB of disk).

    python -m bench.export_12b --work /tmp/export12b            # on the device machine (CPU work)
    python -m bench.export_12b --work /tmp/x --shape tiny       # a quick check of the script itself

Writes bench/results/export_12b.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.environment import earlier_environments, environment


def _child(queue: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    started = time.perf_counter()
    function(*args)
    queue.put({"seconds": time.perf_counter() - started,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def measured(name: str, function: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run function(*args) in a fresh process; its wall time and peak resident memory."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"step {name} failed with exit code {process.exitcode}")
    result = {"step": name, **queue.get()}
    print(f"{name:14s} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_gib']:6.2f} GiB", flush=True)
    return result


def make_inputs(work: Path, shape: str) -> None:
    from bench.shapes import config_12b, write_adapter, write_checkpoint
    from ft.tiny import build_tiny

    config = config_12b() if shape == "12b" else build_tiny()[0].config
    write_checkpoint(work / "base", config)
    write_adapter(work / "adapter", work / "base")


def merge(work: Path) -> None:
    from quantize.merge import merge_lora

    merge_lora(work / "base", work / "adapter", work / "merged")


def convert(work: Path) -> None:
    from quantize.gguf_lm import write_language_model

    write_language_model(work / "merged", work / "model-BF16.gguf", "BF16")


def projector(work: Path) -> None:
    from quantize.gguf_mmproj import write_projector

    write_projector(work / "merged", work / "model-mmproj-F16.gguf", "F16")


def quantize(work: Path, qtype: str) -> None:
    from quantize.llama_quant import quantize as llama_quantize

    llama_quantize(work / "model-BF16.gguf", work / f"model-{qtype}.gguf", qtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_12b.json")
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--stage", choices=["prepare", "convert", "quantize", "all"], default="all",
                        help="run part of the steps (a device call is limited to 10 minutes); results accumulate")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    steps = json.loads(args.out.read_text())["steps"] if args.stage != "prepare" and args.out.is_file() else []
    earlier = earlier_environments(args.out) if args.stage != "prepare" else []  # the stages' calls, one file
    if args.stage in ("prepare", "all"):
        steps.append(measured("random inputs", make_inputs, work, args.shape))
        steps.append(measured("merge", merge, work))
        shutil.rmtree(work / "base")
    if args.stage in ("convert", "all"):
        steps.append(measured("convert BF16", convert, work))
        steps.append(measured("projector F16", projector, work))
        for shard in (work / "merged").glob("*.safetensors"):
            shard.unlink()  # eval_speed.py still needs the merged config and tokenizer
    if args.stage in ("quantize", "all"):
        for qtype in ("Q8_0", "Q6_K", "Q4_K_M"):
            steps.append(measured(f"quantize {qtype}", quantize, work, qtype))
    sizes = {p.name: p.stat().st_size / 2**30 for p in sorted(work.glob("*.gguf"))}
    export_steps = [s for s in steps if s["step"] != "random inputs"]
    result = {
        "benchmark": "export_12b", "shape": args.shape, "date": datetime.date.today().isoformat(),
        "host": platform.node(), "cpu_count": os.cpu_count(), "steps": steps, "file_gib": sizes,
        "peak_rss_gib_max": max((s["peak_rss_gib"] for s in export_steps), default=0.0),
        "export_seconds": sum(s["seconds"] for s in export_steps),
        "environment": environment(sys.argv), "earlier_environments": earlier,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("peak_rss_gib_max", "export_seconds", "file_gib")}, indent=2))


if __name__ == "__main__":
    main()
