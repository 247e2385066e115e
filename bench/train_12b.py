"""Training benchmark at the exact Gemma 4 12B shape: `ft train` with each backend against plain unsloth and plain
transformers + peft, on one GPU.

A random checkpoint of the 12B shape (bench.shapes) and the bench's chat data are written once under --work; then each
ft (path, point) runs in a fresh process: `ft train` on a recipe (the user's path: data checks, memory plan, QLoRA,
trl). The plain paths run every point in one process of their own on the very token ids and labels ft encoded, batched
by ft's collator in trl's default (random) order: plain unsloth (`FastModel`, 4-bit,
`use_gradient_checkpointing="unsloth"`, trl's SFTTrainer as unsloth patches it) and plain transformers + peft (NF4
base, gradient checkpointing, trl's SFTTrainer). Per point: the first step's loss (the LoRA starts as a no-op, so for
a single row every path should give the base model's loss on it, within 1%); peak `torch.cuda.max_memory_reserved()`;
tokens per second (non-pad tokens) over the steps after the first (the median step for a single row, all steps for the
batch-4 set), so compilation on a shape's first step is never in it; process start to the end of the first optimizer
step (compilation included); and `ft plan`'s estimate. Results accumulate in --out: a run stopped by a call's time
limit (SIGTERM) keeps every point it measured, a plain process's finished points included, and the same command in the
next call measures only the points still missing (`--remeasure` measures all again).

    python -m bench.train_12b --work /tmp/t12 --paths unsloth ft-unsloth ft-hf --points 2048 8192 mm   # GPU machine
    python -m bench.train_12b --work /tmp/t --shape tiny --paths ft-hf --points 2048 mm mixed4        # a CPU check

Points: text rows of 2048, 8192, 16384 or 32768 tokens (batch 1); `mm`, one row of a 1120-soft-token image, 60 s of
audio and text; `mixed4`, a mixed-length text/image/audio set at batch 4 (ft groups it by length); `real1` and
`real4`, the realistic set (`realistic_rows`: 64 rows of users' lengths, images and audio) for one epoch at batch 1
and 4, where the figure that counts is the wall time from process start to the last step (`last_step_after_seconds`). Paths: `ft`
(`train.backend: auto`), `ft-hf` and `ft-unsloth` (the backend forced), `ft-compiled` (hf with compiled layers,
`train.compile_layers: true`), `ft-tiled` and `ft-untiled` (hf with
`train.tiled_mlp` on / off; `auto` never tiles under the bench's 80 GiB budget), `unsloth` and `transformers` (plain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.environment import earlier_environments, environment

POINTS = ("2048", "8192", "16384", "32768", "mm", "mixed4", "real1", "real4")
EPOCH_POINTS = ("mixed4", "real1", "real4")  # sets of different rows, one epoch each (the rest repeat one row)
FT_PATHS = {"ft": {}, "ft-hf": {"backend": "hf"}, "ft-compiled": {"backend": "hf", "compile_layers": True},
            "ft-unsloth": {"backend": "unsloth"},
            "ft-tiled": {"backend": "hf", "tiled_mlp": "on"}, "ft-untiled": {"backend": "hf", "tiled_mlp": "off"}}
PLAIN_PATHS = ("unsloth", "transformers")
PATHS = (*FT_PATHS, *PLAIN_PATHS)
STEPS = 6  # unsloth compiles on a shape's first step and recompiles on its second (seen: 187, 9.0, 0.49 s); the
# median of the 5 steps after the first is then a steady step
MIXED_ROWS = 48
MIXED_STEPS = MIXED_ROWS // 4  # the batch-4 set: one epoch, so every path trains on the very same rows (and meets
# each kind of batch, text-only or with image and audio, which compiled paths compile once each)
REAL_ROWS = 64  # the realistic set: lengths as users' data has them (most rows 300-1,500 tokens, a tail to 4,000),
# a quarter with an image, one in six with 5-20 s of audio; one epoch at batch 1 (real1) and at batch 4 (real4)
ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps over the lazy dog while the river runs past the old house. "


def build_checkpoint(work: Path, shape: str) -> Path:
    import torch

    from bench.shapes import config_12b, write_checkpoint
    from ft.tiny import build_tiny

    folder = work / "model"
    if not (folder / "config.json").is_file():
        config = config_12b() if shape == "12b" else build_tiny()[0].config
        write_checkpoint(folder, config, device="cuda" if torch.cuda.is_available() else "cpu")
    return folder


def text_row(tokens: int, processor: Any) -> dict[str, Any]:
    """A chat row of about `tokens` tokens, nearly all in the assistant's answer (so nearly all carry loss)."""
    from ft.data import Row
    from ft.encode import length_of

    def row(repeats: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": "Tell me a long story."},
                             {"role": "assistant", "content": SENTENCE * repeats}]}

    one, eleven = (length_of(Row(row(n)["messages"], "bench", Path(".")), processor) for n in (1, 11))
    per_repeat = (eleven - one) / 10
    return row(max(1, round((tokens - one) / per_repeat) + 1))


def media_row(text_tokens: int, processor: Any, folder: Path, image_px: int, audio_seconds: float,
              seed: int) -> dict[str, Any]:
    """A text row with a random image of `image_px` px and `audio_seconds` of noise before the question."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    if image_px:
        Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(folder / f"{seed}.png")
        parts.append({"type": "image", "path": f"{folder.name}/{seed}.png"})
    if audio_seconds:
        wave = (0.1 * rng.standard_normal(int(16000 * audio_seconds))).astype(np.float32)
        sf.write(folder / f"{seed}.wav", wave, 16000)
        parts.append({"type": "audio", "path": f"{folder.name}/{seed}.wav"})
    row = text_row(text_tokens, processor)
    row["messages"][0]["content"] = [*parts, {"type": "text", "text": "Describe what you see and hear."}]
    return row


def write_data(work: Path, point: str, model: Path, tiny: bool) -> tuple[Path, int, int, int]:
    """The point's training file, its image_soft_tokens, batch size and longest row in tokens (the point's
    `max_seq_length`, for ft's recipe and plain unsloth alike: unsloth sizes its memory reserve, and on a small GPU
    its offloading, by it)."""
    from ft.data import load_rows
    from ft.encode import length_of
    from ft.models import load_processor

    soft = 70 if tiny else 280 if point in ("real1", "real4") else 1120  # the realistic set: the recipe default
    processor = load_processor(str(model), soft)
    data = work / "data"
    media = data / f"media-{point}"  # a point's own files: mixed4's seed-0 image must not replace mm's
    scale = 8 if tiny else 1  # the tiny check runs the same shapes of data at an eighth of the length
    if point == "mm":
        rows = [media_row(2048 // scale, processor, media, 1632 // scale, 60 / scale, 0)]
        batch = 1
    elif point in ("real1", "real4"):
        rows = realistic_rows(processor, media, scale)
        batch = 1 if point == "real1" else 4
    elif point == "mixed4":
        rng = np.random.default_rng(0)
        rows = []
        for i in range(MIXED_ROWS):
            tokens = int(rng.integers(256, 4096)) // scale
            image_px = 896 // scale if i % 3 == 0 else 0
            audio_s = float(rng.integers(10, 30)) / scale if i % 4 == 0 else 0.0
            rows.append(media_row(tokens, processor, media, image_px, audio_s, i) if image_px or audio_s
                        else text_row(tokens, processor))
        batch = 4
    else:
        rows = [text_row(int(point) // scale, processor)]
        batch = 1
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"{point}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, soft, batch, max(length_of(row, processor) for row in load_rows(path))


def realistic_rows(processor: Any, media: Path, scale: int) -> list[dict[str, Any]]:
    """`REAL_ROWS` chat rows whose text lengths follow a log-normal law (median 700 tokens, 10% over 1,500), the
    last one 4,000 tokens long; every fourth row has an 896 px image, every sixth 5-20 s of audio."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(REAL_ROWS):
        tokens = 4000 if i == REAL_ROWS - 1 else int(np.clip(rng.lognormal(np.log(700), 0.6), 200, 4000))
        image_px = 896 if i % 4 == 0 else 0
        audio_s = float(rng.uniform(5, 20)) if i % 6 == 1 else 0.0
        if image_px or audio_s:
            rows.append(media_row(tokens // scale, processor, media, image_px // scale, audio_s / scale, 1000 + i))
        else:
            rows.append(text_row(tokens // scale, processor))
    order = rng.permutation(len(rows))  # the long row and the media rows anywhere in the file
    return [rows[i] for i in order]


def epoch_steps(point: str) -> int:
    """Optimizer steps of a point: one epoch of a set, or `STEPS` of a repeated row."""
    return {"mixed4": MIXED_STEPS, "real1": REAL_ROWS, "real4": REAL_ROWS // 4}.get(point, STEPS)


def child_env(work: Path) -> dict[str, str]:
    """Offline, and one compile cache for every unsloth process of the run (a later process reuses its kernels)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_COMPILE_LOCATION": str(work / "unsloth_compiled_cache")}


def steady_rate(seconds: list[float], tokens: list[int], single_row: bool) -> float:
    """Non-pad tokens per second after the first step (where kernels warm up and unsloth compiles): the median
    step's for a single repeated row, whose steps are all alike; all steps' for a batch of mixed rows."""
    steady = list(zip(seconds[1:], tokens[1:], strict=True)) or list(zip(seconds, tokens, strict=True))
    if single_row:
        return round(steady[0][1] / float(np.median([s for s, _ in steady])), 1)
    return round(sum(t for _, t in steady) / sum(s for s, _ in steady), 1)


def recipe_for(work: Path, path: str, point: str, model: Path, tiny: bool) -> Path:
    data, soft, batch, longest = write_data(work, point, model, tiny)
    steps = epoch_steps(point)
    recipe = {
        "model": {"name": str(model)},
        "data": {"train": str(data), "max_seq_length": longest, "image_soft_tokens": soft},
        "lora": {"r": 16, "alpha": 32},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "log_every": 1, "save_every": 1000,
                  "gradient_checkpointing": True, "memory_budget_gb": 80, **FT_PATHS[path]},
        "logging": {"wandb": "disabled"},
        "output": {"dir": str(work / "runs" / f"{point}-{path}"), "overwrite": True},
    }
    recipe_path = work / f"recipe-{point}-{path}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return recipe_path


def run_ft(work: Path, path: str, point: str, model: Path, tiny: bool) -> dict[str, Any]:
    """One `ft train` in a fresh process; its summary.json carries the backend, the plan, the peak and the step
    clock."""
    from ft.callbacks import read_metrics

    recipe = recipe_for(work, path, point, model, tiny)
    run = yaml.safe_load(recipe.read_text())["output"]["dir"]
    result = subprocess.run([sys.executable, "-m", "ft", "train", str(recipe)], capture_output=True, text=True,
                            env=child_env(work), cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:]}
    summary = json.loads((Path(run) / "summary.json").read_text())
    memory, clock = summary.get("memory", {}), summary["throughput"]
    logged = read_metrics(Path(run) / "metrics.jsonl")
    return {"backend": summary["backend"], "backend_reason": summary["backend_reason"],
            "lora_modules": summary["lora_modules"],
            "first_loss": next(r["loss"] for r in logged if "loss" in r),
            "tokens_per_second": steady_rate(clock["step_seconds"], clock["step_tokens"], point not in EPOCH_POINTS),
            "step_seconds": clock["step_seconds"], "step_tokens": clock["step_tokens"],
            "first_step_after_seconds": summary["first_step_after_seconds"],
            "last_step_after_seconds": summary["last_step_after_seconds"],
            "peak_reserved_gib": memory.get("peak_reserved_gib"), "planned_gib": memory.get("planned_gib"),
            "tiled_mlp": memory.get("tiled_mlp"), "offload_activations": memory.get("offload_activations"),
            "compiled_graphs": summary.get("compiled_graphs")}


def plain_model(kind: str, model: Path, longest: int) -> Any:
    """The 12B checkpoint with an r=16 LoRA on every language projection, as a user of the library alone builds it."""
    if kind == "unsloth":
        from unsloth import FastModel

        fast, _ = FastModel.from_pretrained(str(model), max_seq_length=longest, load_in_4bit=True)
        return FastModel.get_peft_model(
            fast, r=16, lora_alpha=32, lora_dropout=0, bias="none", finetune_vision_layers=False,
            finetune_language_layers=True, finetune_attention_modules=True, finetune_mlp_modules=True,
            use_gradient_checkpointing="unsloth", random_state=0,
        )
    from ft.lora import apply_lora
    from ft.models import load_model
    from ft.recipe import LoraSection

    return apply_lora(load_model(str(model), "bfloat16", "cuda", "nf4"), LoraSection(r=16, alpha=32))


def plain_run(kind: str, work: Path, points: list[str], model: Path, out: Path) -> None:
    """Plain unsloth or transformers + peft on the same encoded rows as ft, all points in this one process (unsloth's
    compiled code is reused); writes one JSON object per point to `out` as it goes."""
    import psutil
    import torch

    if kind == "unsloth":
        import unsloth  # noqa: F401  (unsloth patches trl and transformers when imported before them)
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ft.callbacks import StepClock
    from ft.data import load_rows
    from ft.encode import collate_items, encoded_dataset
    from ft.lora import lora_modules
    from ft.memory import count_parameters, estimate
    from ft.models import load_config, load_processor
    from ft.recipe import LoraSection

    started = psutil.Process().create_time()
    processor = load_processor(str(model), 1120)
    loaded = {}
    for point in points:
        data, _, batch, longest = write_data(work, point, model, tiny=False)
        loaded[point] = (load_rows(data), batch, longest)
    fast = plain_model(kind, model, max(longest for _, _, longest in loaded.values()))
    counts = count_parameters(load_config(str(model)), LoraSection(r=16))
    results = {}
    for point, (rows, batch, longest) in loaded.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        clock = StepClock()  # steps timed with the GPU synchronized at both ends, as ft's own runs

        class Progress(TrainerCallback):
            """Writes the steps so far after each one: a run stopped by a time limit shows how far it got."""

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                done = {"partial": True, "step_seconds": [round(s, 3) for s, _ in clock.steps],
                        "step_tokens": [t for _, t in clock.steps],
                        "after_seconds": round(clock.last_step_end - started, 1), "compiles": compile_counts()}
                out.write_text(json.dumps({**results, point: done}))

        class CountingTrainer(SFTTrainer):
            def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                clock.tokens += int(inputs["attention_mask"].sum())
                return super().training_step(model, inputs, *args, **kwargs)

        trainer = CountingTrainer(
            model=fast, train_dataset=encoded_dataset(rows, processor), processing_class=processor.tokenizer,
            callbacks=[clock, Progress()],
            data_collator=lambda items: collate_items(items, pad_token_id=processor.tokenizer.pad_token_id),
            # gradient_accumulation_steps given, as ft's recipes give it: unsloth's patched SFTConfig defaults to 2,
            # which made the 2026-12-03 mixed-set run take 8 rows a step (and go through the set twice)
            args=SFTConfig(output_dir=str(work / kind), per_device_train_batch_size=batch, seed=0,
                           gradient_accumulation_steps=1,
                           learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], bf16=True,
                           dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, optim="adamw_torch",
                           remove_unused_columns=False, max_steps=epoch_steps(point)),
        )
        try:
            trainer.train()
        except torch.cuda.OutOfMemoryError as exc:
            results[point] = {"error": f"out of memory: {exc}"[:300]}
            del trainer
            continue
        seconds, tokens = [s for s, _ in clock.steps], [t for _, t in clock.steps]
        results[point] = {
            "first_loss": next(r["loss"] for r in trainer.state.log_history if "loss" in r),
            "tokens_per_second": steady_rate(seconds, tokens, point not in EPOCH_POINTS),
            "step_seconds": [round(s, 3) for s in seconds], "step_tokens": tokens,
            "first_step_after_seconds": round(clock.first_step_end - started, 1) if not results else None,
            "last_step_after_seconds": round(clock.last_step_end - started, 1) if not results else None,
            "compiles": compile_counts(),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "planned_gib": round(estimate(counts, batch * longest, kind, quantized=True).total_gib, 2),
            "lora_modules": len(lora_modules(fast)),
        }
        out.write_text(json.dumps(results))
        del trainer


def compile_counts() -> dict[str, Any]:
    """torch.compile's counters in this process (frames compiled, graphs, recompilations), where anything compiled."""
    from torch._dynamo.utils import counters

    return {name: dict(counters[name]) for name in ("frames", "stats", "recompiles") if counters.get(name)}


def run_plain(kind: str, work: Path, points: list[str], model: Path, results: dict[str, Any]) -> None:
    """Runs the plain path's process and puts every point it measured into `results`, also when this bench is
    stopped while the process runs (the process is then killed)."""
    out = work / f"{kind}.json"
    out.unlink(missing_ok=True)
    code = ("import sys; from pathlib import Path; from bench.train_12b import plain_run; "
            "plain_run(sys.argv[1], Path(sys.argv[2]), sys.argv[4:], Path(sys.argv[3]), "
            "Path(sys.argv[2]) / f'{sys.argv[1]}.json')")
    try:
        result = subprocess.run([sys.executable, "-c", code, kind, str(work), str(model), *points],
                                capture_output=True, text=True, cwd=ROOT, env=child_env(work))
    finally:
        results.update(json.loads(out.read_text()) if out.is_file() else {})
    if result.returncode != 0:
        for point in points:
            results.setdefault(point, {"error": result.stderr[-3000:]})


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'point':8} {'path':11} {'peak GiB':>8} {'plan GiB':>8} {'tok/s':>8} {'1st step s':>10} "
             f"{'last step s':>11} {'loss 1':>7}"]
    for point in POINTS:
        for path in PATHS:
            r = results.get(path, {}).get(point)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{point:8} {path:11} error: {r['error'].strip().splitlines()[-1][:80]}")
                continue
            lines.append(f"{point:8} {path:11} {r.get('peak_reserved_gib') or 0:8.2f} {r.get('planned_gib') or 0:8.2f} "
                         f"{r.get('tokens_per_second') or 0:8.0f} {r.get('first_step_after_seconds') or 0:10.0f} "
                         f"{r.get('last_step_after_seconds') or 0:11.0f} {r.get('first_loss') or 0:7.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path,
                        default=(Path(__file__).parent / "results"
                                 / f"{datetime.date.today().isoformat()}-train_12b.json"))
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--points", nargs="+", choices=POINTS, default=list(POINTS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["ft", "unsloth"])
    parser.add_argument("--remeasure", action="store_true",
                        help="measure points that --out already holds (default: only the missing or failed ones)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)  # `timeout` stops a device call's bench: keep what it measured
    args.work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict[str, dict[str, Any]] = previous.get("results", {})
    args.commands = [*previous.get("commands", []), "python -m bench.train_12b " + " ".join(sys.argv[1:])]
    args.environment, args.earlier_environments = environment(sys.argv), earlier_environments(args.out)
    model = build_checkpoint(args.work, args.shape)
    tiny = args.shape == "tiny"
    try:
        for path in args.paths:
            done = results.setdefault(path, {})
            points = [p for p in args.points
                      if args.remeasure or "error" in done.get(p, {"error": ""}) or done[p].get("partial")]
            if path in PLAIN_PATHS:
                if points:
                    run_plain(path, args.work, points, model, done)
                continue
            for point in points:
                done[point] = run_ft(args.work, path, point, model, tiny)
                _write(args, results)
                print(table(results), flush=True)
    except Stopped:
        print("stopped: the points measured so far are in", args.out, flush=True)
    finally:
        _write(args, results)
    print(table(results), flush=True)


class Stopped(Exception):
    """SIGTERM arrived (a time limit); subprocess.run kills the running child when it sees an exception."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def _write(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload = {"benchmark": "train_12b", "shape": args.shape, "date": datetime.date.today().isoformat(),
               "device": device, "commands": args.commands,
               "steps_per_point": {"single row": STEPS, **{p: epoch_steps(p) for p in EPOCH_POINTS}},
               "notes": "tokens_per_second: non-pad tokens over the steps after the first (the median step for a "
                        "single row, all steps for a set), so no compilation is in it; first_step_after_seconds and "
                        "last_step_after_seconds: process start to the end of the first and of the last optimizer "
                        "step, compilation included (plain paths: their first point only); planned_gib: ft plan's "
                        "estimate for that backend",
               "results": results, "environment": args.environment,
               "earlier_environments": args.earlier_environments}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
