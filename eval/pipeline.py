"""The evaluation recipe: how much each quantization of a run's model degrades, and how fast it decodes.

    ft eval runs/demo              # a run directory (quant files missing from its export are made first)
    ft eval recipes/demo.yaml      # the same, through the recipe's output.dir
    ft eval recipes/study-demo.yaml  # a study (study: true): the model as it is, exported first

Writes `<run>/eval/`: results.json, report.md, divergence.png, accuracy.png, speed.png. Every number comes from
llama.cpp (llama-cpp-python) running the GGUF files; the reference is the unquantized GGUF of the export
(`export.reference`), which is also measured against itself as a check (KLD 0, 100% agreement).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from eval.accuracy import is_correct, paired_flips, wilson_interval
from eval.divergence import HEADER, ROW_BLOCK, Divergence, encode
from eval.mtp import decode_all, mismatches, mtp_summary, tokens_per_second
from eval.paired import pair_table
from eval.report import write_report
from eval.runner import EvalError, Scorer, chunks, greedy, load
from eval.tasks import Prompt, check_tasks, heldout_prompts, reasoning_prompts, text_only
from ft.data_split import recipe_rows
from ft.errors import FtError
from ft.recipe import EvalSection, ExportSection, Recipe
from ft.rundir import claim, lock

console = Console(stderr=True)
RESULTS_FORMAT = 2  # results.json's layout; 2 added per-chunk KLD, per-prompt answers and paired differences


def evaluation_tokens(settings: EvalSection, recipe: Recipe, processor: Any, llm: Any) -> list[int]:
    """Tokens of the evaluation text, as `llama-perplexity` tokenizes its file: BOS first where the vocabulary adds
    one, so that window i covers the same tokens as llama-perplexity's chunk i. A text file is read as plain text
    (special-token names in it stay text, as there); held-out rows are rendered by the chat template, whose turn
    markers are special tokens and which may itself open with BOS (never doubled)."""
    if settings.text is not None:
        text, special = settings.text.read_text(encoding="utf-8"), False
    else:
        train, held = recipe_rows(recipe)
        conversations = text_only(held or train)
        text, special = "".join(processor.apply_chat_template(c, tokenize=False) for c in conversations), True
    tokens = llm.tokenize(text.encode(), add_bos=False, special=special)
    bos = llm.tokenize(b"", add_bos=True, special=False)  # [BOS] where the vocabulary adds one, else []
    if tokens[:1] != bos:
        tokens = bos + tokens
    tokens = tokens[: settings.max_tokens]
    if len(tokens) < settings.context:
        raise FtError(f"eval.context: the evaluation text has {len(tokens)} tokens, fewer than one chunk "
                      f"({settings.context}); lower eval.context or give a longer eval.text")
    return tokens


class LogprobStore:
    """The reference's log-probabilities on disk, one stored row per scored position (`eval.divergence.encode`:
    2 * (V + 4) bytes, llama.cpp's layout), read back a chunk at a time.

    Plain reads and writes rather than a memory map: the pages of a mapped file count towards the process's resident
    memory, and at Gemma 4's vocabulary 8192 tokens of them are 2 GiB.
    """

    def __init__(self, path: Path, vocab: int) -> None:
        self.path = path
        self.vocab = vocab

    @property
    def row_bytes(self) -> int:
        return (HEADER + self.vocab) * 2

    def append(self, rows: np.ndarray) -> None:
        with self.path.open("ab") as f:
            rows.astype(np.uint16, copy=False).tofile(f)

    def read(self, start: int, count: int) -> np.ndarray:
        with self.path.open("rb") as f:
            f.seek(start * self.row_bytes)
            return np.fromfile(f, dtype=np.uint16, count=count * (HEADER + self.vocab)).reshape(count, -1)


def reference_pass(
    reference: Path, tokens: list[int], settings: EvalSection, store: Path
) -> tuple[LogprobStore, np.ndarray]:
    """Reference log-probabilities of every scored position, streamed to disk; and the tokens they predict."""
    store.unlink(missing_ok=True)
    targets = []
    with Scorer(reference, settings.context, settings.threads) as scorer:
        logprobs = LogprobStore(store, scorer.n_vocab)
        for logits, predicted in scorer.score(chunks(tokens, settings.context, scorer.bos)):
            for start in range(0, len(logits), ROW_BLOCK):
                logprobs.append(encode(logits[start : start + ROW_BLOCK]))
            targets.append(predicted)
    return logprobs, np.concatenate(targets)


def divergence_of(path: Path, tokens: list[int], settings: EvalSection, ref: LogprobStore, targets: np.ndarray) -> dict:
    stats = Divergence()
    row = 0
    with Scorer(path, settings.context, settings.threads) as scorer:
        for logits, predicted in scorer.score(chunks(tokens, settings.context, scorer.bos)):
            if not np.array_equal(predicted, targets[row : row + len(predicted)]):
                raise EvalError(f"{path}: tokenizes the evaluation text differently from the reference")
            stats.add(ref.read(row, len(predicted)), logits, predicted)
            row += len(predicted)
    return stats.summary()


def answers(path: Path, prompts: list[Prompt], processor: Any, settings: EvalSection) -> list[bool]:
    """Greedy answers of one model to every prompt, scored by exact match."""
    tokenizer = processor.tokenizer
    stop = {tokenizer.convert_tokens_to_ids(t) for t in ("<turn|>", "<eos>")}
    rendered = [processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered)
    llm = load(path, longest + settings.max_new_tokens + 16, threads=settings.threads)
    correct = []
    for prompt, text in zip(prompts, rendered, strict=True):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        reply = llm.detokenize(greedy(llm, ids, settings.max_new_tokens, stop), special=True).decode(errors="replace")
        correct.append(is_correct(reply, prompt.answer))
    return correct


def accuracy_table(results: list[bool], reference: list[bool], prompts: list[Prompt]) -> dict[str, Any]:
    table = {}
    for task in dict.fromkeys(p.task for p in prompts):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        got = [results[i] for i in idx]
        flips = paired_flips([reference[i] for i in idx], got)
        low, high = wilson_interval(sum(got), len(got))
        table[task] = {"n": len(got), "correct": sum(got), "accuracy": sum(got) / len(got),
                       "wilson95": [low, high], "lost": flips.lost, "gained": flips.gained}
    return table


def speed_of(path: Path, drafter: Path | None, prompts: list[list[int]], settings: EvalSection) -> dict[str, Any]:
    """Decode tokens/s with MTP off and (with a drafter) on, and whether both give the same tokens."""
    plain = decode_all(path, prompts, settings.speed_tokens, threads=settings.threads)
    if drafter is None:
        return {"plain_tokens_per_second": tokens_per_second(plain)}
    mtp = decode_all(path, prompts, settings.speed_tokens, drafter, settings.draft_len, settings.threads)
    out = mtp_summary(plain, mtp)
    out.update(mismatches=mismatches(path, prompts, plain, mtp, drafter, settings.draft_len, settings.threads),
               draft_len=settings.draft_len)
    return out


def device_name() -> str:
    from quantize.llama_lib import llama_cpp

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = " + GPU offload" if llama_cpp.llama_supports_gpu_offload() else ""
    return f"{cpu}, {os.cpu_count()} threads{gpu}"


def versions() -> dict[str, str]:
    from quantize.llama_lib import llama_cpp
    import torch
    import transformers

    import ft

    return {"ft": ft.__version__, "llama-cpp-python": llama_cpp.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def digest(value: Any) -> str:
    """SHA-256 of a JSON value: two evaluations scored the same tokens (prompts) when their digests are equal."""
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()


def evaluate_run(target: Path, overrides: Sequence[str] = (), remeasure: bool = False) -> tuple[Path, Path]:
    """Measure every quant of a run against its reference GGUF and write the report; returns the report folder and
    the export folder the quants are in. `overrides` may change `eval.*` and `export.*`; results measured from the
    same files and settings are reused unless `remeasure`."""
    from quantize.pipeline import resolve_run

    run, recipe = resolve_run(target, overrides, sections=("eval", "export"))
    check_tasks(recipe)  # before any export or model work
    with ExitStack() as held:  # one writer: the run (and its export, which export_trained claims) and the eval folder
        held.enter_context(lock(run))
        with recipe.blame("output.dir"):
            held.enter_context(claim(recipe.eval_dir(run), "eval"))
        return write_evaluation(run, recipe, recipe.eval_dir(run), remeasure), recipe.export_dir(run)


def evaluation_inputs(recipe: Recipe, file_shas: list[str]) -> str:
    """What an evaluation's numbers depend on: its settings, the bytes of every file measured (their SHA-256s), the
    evaluation data, the machine and the software. Equal inputs mean the saved results still stand."""
    from quantize.manifest import fingerprint, sha256

    settings = recipe.eval or EvalSection()
    # the rows as read (data.format, data.columns) and held out (data.eval_split) are part of the evaluation data
    data = [settings.text, recipe.data.eval, recipe.data.train, recipe.data.format,
            json.dumps(recipe.data.columns.model_dump(), sort_keys=True), recipe.data.eval_split]
    return fingerprint("eval", RESULTS_FORMAT, settings.model_dump(mode="json"),
                       file_shas,
                       [sha256(p) if isinstance(p, Path) and p.is_file() else str(p) for p in data], device_name(),
                       versions())


def saved_results(out: Path, inputs: str) -> dict[str, Any] | None:
    """The results in `out` when they were measured from `inputs` (and their report is still there); else None."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("inputs") == inputs and (out / "report.md").is_file() else None


def write_evaluation(run: Path, recipe: Recipe, out: Path, remeasure: bool = False) -> Path:
    """Export what is missing, measure every quant (unless up-to-date results are there), and write the report into
    `out`; returns `out`."""
    from ft.models import load_processor
    from quantize.manifest import Manifest
    from quantize.pipeline import export_trained, model_checkpoint

    settings = recipe.eval or EvalSection()
    export = recipe.export or ExportSection()
    folder = export_trained(run, recipe, extra_quants=settings.quants)
    manifest = Manifest(folder / "manifest.json")
    reference = folder / f"{run.name}-{export.reference}.gguf"
    drafters = [f for f in manifest.files.values() if f["kind"] == "MTP drafter"]
    drafter = folder / drafters[0]["file"] if drafters and settings.speed else None
    rows = [(f"{export.reference} (reference)", reference, {})]
    rows += [(q, folder / f"{run.name}-{q}.gguf", {"quant": q}) for q in settings.quants]
    rows += [(f"{name}/{q}", folder / name / f"{run.name}-{q}.gguf", {"quant": q, "variant": name})
             for name in export.variants for q in export.variant(name).quants]
    manifests = {path.parent: Manifest(path.parent / "manifest.json") for _, path, _ in rows}
    files = [*(path for _, path, _ in rows), *([drafter] if drafter else [])]
    inputs = evaluation_inputs(recipe, [manifests[f.parent].entry(f.name)["sha256"] for f in files])
    saved = None if remeasure else saved_results(out, inputs)
    if saved is not None:
        console.print(f"up to date: {out / 'report.md'} (measured {saved['date']} from these files and settings; "
                      "--remeasure measures again)", highlight=False)
        return out
    processor = load_processor(str(model_checkpoint(run, recipe, folder)[0]), recipe.data.image_soft_tokens)

    prompts = reasoning_prompts(settings.tasks, settings.samples, settings.seed) if settings.samples else []
    if settings.heldout and (held := recipe_rows(recipe)[1]):
        prompts += heldout_prompts(held)

    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=out))
    try:
        tokens = evaluation_tokens(settings, recipe, processor, load(reference, 64, vocab_only=True))
        console.print(f"reference pass over {len(tokens)} tokens")
        ref_logprobs, targets = reference_pass(reference, tokens, settings, scratch / "reference.logprobs")
        reference_correct = answers(reference, prompts, processor, settings) if prompts else []
        speed_prompts = [processor.tokenizer(processor.apply_chat_template(p.messages, tokenize=False,
                                                                          add_generation_prompt=True),
                                             add_special_tokens=False)["input_ids"]
                         for p in prompts[: settings.speed_prompts]]
        measured = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("evaluate", total=len(rows))
            for label, path, identity in rows:
                progress.update(task, description=f"evaluate {label}")
                measured.append(measure(label, path, manifests[path.parent], tokens, settings, ref_logprobs, targets,
                                        prompts, processor, reference_correct, drafter, speed_prompts, identity))
                progress.advance(task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results = {
        "run": run.name, "reference": reference.name, "reference_type": export.reference,
        "drafter": drafter.name if drafter else None, "device": device_name(), "versions": versions(),
        "date": datetime.date.today().isoformat(), "inputs": inputs, "settings": settings.model_dump(mode="json"),
        "tasks": list(dict.fromkeys(p.task for p in prompts)), "divergence_tokens": int(len(targets)),
        "scored_tokens_sha256": digest(tokens),
        "prompts_sha256": digest([[p.task, p.messages, p.answer] for p in prompts]),
        "quants": measured, "pairs": pair_table(measured),
    }
    write_report(results, out)
    console.print(f"[green]report written to {out / 'report.md'}")
    return out


def measure(label: str, path: Path, manifest: Any, tokens: list[int], settings: EvalSection, ref: LogprobStore,
            targets: np.ndarray, prompts: list[Prompt], processor: Any, reference_correct: list[bool],
            drafter: Path | None, speed_prompts: list[list[int]], identity: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """Every metric of one file (`identity`: its quant type and variant, kept in the row); a file llama.cpp cannot
    use is reported with its error instead."""
    identity = identity or {}
    file = f"{identity['variant']}/{path.name}" if "variant" in identity else path.name  # variants share names
    entry: dict[str, Any] = {"type": label, "file": file, **identity}
    if path.name in manifest.files:
        entry["bits_per_weight"] = manifest.entry(path.name).get("bits_per_weight")
    try:
        entry["divergence"] = divergence_of(path, tokens, settings, ref, targets)
        if prompts:
            correct = answers(path, prompts, processor, settings)
            entry["accuracy"] = accuracy_table(correct, reference_correct, prompts)
            entry["answers"] = [int(c) for c in correct]  # per prompt, in order: paired intervals between rows
        if settings.speed and speed_prompts:
            entry["speed"] = speed_of(path, drafter, speed_prompts, settings)
    except EvalError as exc:
        entry = {"type": label, "file": file, **identity, "error": str(exc)}
    return entry
