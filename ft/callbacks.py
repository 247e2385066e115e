"""Trainer callbacks: a rich progress bar, the run's own metrics log (JSONL, independent of wandb), a step clock, and
the sample answers a run writes while it trains."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ft.atomic import write_text


class RichProgress(TrainerCallback):
    """One progress bar over optimizer steps, showing the latest training and held-out loss."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = 0
        self.status = ""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if not state.is_world_process_zero:  # one bar for the run, not one a process
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self.status)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **_: Any) -> None:
        logs = logs or {}
        parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs]
        if parts:
            self.status = "  ".join(parts)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self.status)
            self.progress.stop()
            self.progress = None

    def note(self, text: str) -> None:
        """Show `text` on the progress line now (until the next step or log replaces it); where there is no live
        line (output to a file or pipe), as a line of its own."""
        if self.progress is not None:
            self.progress.update(self.task, status=text)
            self.progress.refresh()
            if not self.progress.console.is_terminal:
                self.progress.console.print(text, highlight=False)


class MetricsLog(TrainerCallback):
    """Appends every Trainer log (train loss, eval loss, learning rate) as one JSON line with its step, or through
    `append` any record with a step (the sample answers).

    Each line is flushed and fsynced, so a killed run keeps every line it logged; `truncate_after` drops lines
    newer than the checkpoint a resumed run restarts from, so the log never holds a step twice. With several
    processes the Trainer's logs hold every rank's figures already (gathered); rank 0 alone writes them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in read_metrics(self.path) if line["step"] <= step]
        write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **_: Any) -> None:
        if state.is_world_process_zero:
            self.append({"step": state.global_step, "epoch": state.epoch or 0.0, **(logs or {})})

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics log (a torn last line from a killed write is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class StepClock(TrainerCallback):
    """Wall time and trained tokens of every optimizer step, for summary.json's throughput.

    The trainer adds each micro-batch's non-pad tokens to `tokens`; on CUDA the clock waits for the GPU at both ends
    of a step, so that a step's time is its own.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.steps: list[tuple[float, int]] = []  # (seconds, tokens) per optimizer step
        self.first_step_end: float | None = None  # time.time() when the first step of this process ended
        self.last_step_end: float | None = None  # and when the latest one did
        self._begin = 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self.tokens = 0
        self._begin = self._now()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self.steps.append((self._now() - self._begin, self.tokens))
        self.last_step_end = time.time()
        self.first_step_end = self.first_step_end or self.last_step_end

    def throughput(self, ranks_tokens: list[list[int]] | None = None) -> dict[str, Any]:
        """Median step time and tokens per second over the steps after the first (which warms up kernels), of every
        rank's tokens together (`ranks_tokens`: each rank's tokens a step; default this process's), in total and
        per device (GPU)."""
        every = ranks_tokens or [[t for _, t in self.steps]]
        steps = [(s, sum(tokens)) for (s, _), tokens in zip(self.steps, zip(*every, strict=True), strict=True)]
        steady = steps[1:] or steps
        if not steady:
            return {}
        seconds = sorted(s for s, _ in steady)
        total = sum(t for _, t in steady) / sum(s for s, _ in steady)
        return {"median_step_seconds": round(seconds[len(seconds) // 2], 3),
                "tokens_per_second": round(total, 1), "tokens_per_second_per_device": round(total / len(every), 1),
                "step_seconds": [round(s, 3) for s, _ in steps], "step_tokens": [t for _, t in steps]}


class SampleAnswers(TrainerCallback):
    """Every `every` optimizer steps and after the last, the model answers each sample prompt (greedy, at most
    `max_new_tokens` new tokens): one line per prompt and step in `log` (samples.jsonl, kept exact on resume as
    metrics.jsonl is), and a table of all answers so far in wandb when it runs. The progress line says so."""

    def __init__(self, log: MetricsLog, conversations: list[list[dict[str, Any]]], every: int, max_new_tokens: int,
                 progress: RichProgress) -> None:
        self.log, self.conversations, self.every, self.max_new_tokens = log, conversations, every, max_new_tokens
        self.progress = progress
        self.sampled_at: int | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            self._sample(state.global_step, kwargs["model"], kwargs["processing_class"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.sampled_at != state.global_step:
            self._sample(state.global_step, kwargs["model"], kwargs["processing_class"])

    def _sample(self, step: int, model: torch.nn.Module, processor: Any) -> None:
        from ft.generate import greedy_answer

        self.progress.note(f"sampling {len(self.conversations)} prompts at step {step}")
        ends = set(model.generation_config.eos_token_id or [])
        was_training = model.training
        model.eval()
        try:
            for number, messages in enumerate(self.conversations):
                tokens = greedy_answer(model, processor, messages, self.max_new_tokens)
                stop = next((i for i, token in enumerate(tokens) if token in ends), None)
                answer = processor.tokenizer.decode(tokens[:stop], skip_special_tokens=True)
                self.log.append({"step": step, "prompt": number, "answer": answer, "tokens": tokens,
                                 "stopped": stop is not None})
        finally:
            model.train(was_training)
        self.sampled_at = step
        self._to_wandb()

    def _to_wandb(self) -> None:
        import wandb

        if wandb.run is None:
            return
        rows = [[r["step"], r["prompt"], r["answer"]] for r in read_metrics(self.log.path)]
        wandb.run.log({"samples": wandb.Table(columns=["step", "prompt", "answer"], data=rows)})
