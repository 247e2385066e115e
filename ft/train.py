"""The training recipe: recipe YAML in, run directory out. Read top to bottom, it is the whole training stage.

    ft train recipes/demo.yaml                 # train
    ft train recipes/demo.yaml --resume        # continue from the last checkpoint after a crash or kill
    ft train recipes/demo.yaml train.lr=1e-4   # override any recipe key

Run directory (`output.dir`):
    recipe.yaml       the resolved recipe this run used
    checkpoints/      resumable Trainer checkpoints (optimizer, scheduler, RNG, data position)
    adapter/          the final LoRA adapter (peft format)
    metrics.jsonl     every logged training and held-out loss, one JSON object a line
    samples.jsonl     the answers to train.sample_prompts, one JSON object per prompt and sampled step
    loss.png          the loss curve
    summary.json      final numbers of the run
    gguf/, eval/      written next by `ft quantize` and `ft eval` (the CLI chains them when the recipe has export /
                      eval sections)
    .ft-run, .ft-lock ft's marker and the lock of the process writing the folder (`ft.rundir`)

Under torchrun every process runs this stage on its share of the rows (`ft.distributed`); rank 0 alone writes the
run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints
from trl import SFTConfig, SFTTrainer
from trl.models.activation_offloading import OffloadActivations

from ft import backends, distributed
from ft.atomic import remove_stale_temporaries, staged_dir, write_text
from ft.batching import LengthGroupedEpochSampler, padding_share
from ft.callbacks import MetricsLog, RichProgress, SampleAnswers, StepClock, read_metrics
from ft.compiled import compiled_graphs
from ft.data_checks import load_data
from ft.encode import IGNORE_INDEX, collate_items, encoded_dataset
from ft.errors import FtError
from ft.lora import lora_modules
from ft.loss import causal_lm_loss
from ft.models import load_processor
from ft.plots import loss_curve
from ft.recipe import Recipe
from ft.resolve import Backend, Settings, resolve
from ft.rundir import clear

console = Console(stderr=True)
# What ft writes into a run directory (the module docstring's list, wandb's offline run, and ft quantize's copies of
# a tiny base model and drafter); a fresh start removes these, and the export and eval folders ft claimed there.
WORLD_FILE = "world.json"  # in each checkpoint: the number of processes that wrote it
RUN_ENTRIES = ("recipe.yaml", "checkpoints", "adapter", "metrics.jsonl", "samples.jsonl", "loss.png", "summary.json",
               "wandb", "base", "drafter-base")


class OffloadKeepingAllocatorCache(OffloadActivations):
    """trl's activation offloading, less the `torch.cuda.empty_cache()` it calls at every step's start whenever
    bitsandbytes is imported: that hands every cached block back to the driver, so each step asks for them again
    (hundreds of cudaMalloc calls a step on the 12B, each synchronising), host time in a step the host bounds
    (docs/BENCHMARKS.md, "Training speed on users' data"). trl empties the cache against bitsandbytes' dequantisation
    buffers piling up in it; ft's projections dequantise into ordinary tensors (`ft.nf4`), and the peaks over the
    realistic set's varied lengths, recorded there, show no such growth."""

    def __enter__(self) -> OffloadActivations:
        empty_cache, torch.cuda.empty_cache = torch.cuda.empty_cache, lambda: None
        try:
            return super().__enter__()
        finally:
            torch.cuda.empty_cache = empty_cache


class RecipeTrainer(SFTTrainer):
    """trl's SFTTrainer (its fused LM head and activation offloading) on ft's own encoded rows. What ft changes:
    checkpoints appear under `checkpoint-N` only when complete, rows of similar length are batched together when
    given a sampler (`ft.batching`), on CPUs the loss is ft's chunked one (`ft.loss`; trl's head is Triton), each
    step's tokens are counted for the step clock, trl writes no model card among the checkpoints, trl's activation
    offloading keeps the allocator's cache (`OffloadKeepingAllocatorCache`) and the FLOP estimate's parameter count is
    taken once.

    transformers writes a checkpoint file by file into its final folder, so a kill mid-save leaves a folder that
    `--resume` would pick up and fail on. Here each checkpoint is written into a hidden staging folder and renamed.
    """

    _staging: Path | None = None
    train_sampler: LengthGroupedEpochSampler | None = None
    clock: StepClock | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.use_cpu:
            # ft's loss divides by the labelled tokens of the whole step (every micro-batch, every rank), which the
            # Trainer counts only for a model that says it takes them; Gemma 4's forward says it does not
            self.model_accepts_loss_kwargs = True
        if type(self.maybe_activation_offload_context) is OffloadActivations:
            self.maybe_activation_offload_context.__class__ = OffloadKeepingAllocatorCache

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.clock is not None:
            trained = (inputs["labels"] != IGNORE_INDEX).any(dim=1)  # not the fillers of a short last batch (no labels)
            self.clock.tokens += int(inputs["attention_mask"][trained].sum())
        return super().training_step(model, inputs, *args, **kwargs)

    @cached_property
    def _parameter_count(self) -> int:
        return self.model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate (6 x tokens x parameters), with the parameters counted once: transformers counts
        them for every step, walking the model's some 4,000 modules, host time in every step."""
        return 6 * inputs["input_ids"].numel() * self._parameter_count

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        return self.train_sampler or super()._get_train_sampler(train_dataset)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if inputs["input_ids"].device.type == "cuda":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The decoder's last hidden states, taken as they leave the inner model (the LoRA layers sit inside it); the
        # head and softcap are applied by ft.loss, normalised as trl's head normalises. The forward goes through
        # `model`, which under DDP is its wrapper (which must see the forward to all-reduce the gradients), and
        # runs the head on one position only.
        causal_lm = self.accelerator.unwrap_model(model).get_base_model()
        features = {key: value for key, value in inputs.items() if key != "labels"}
        taken: list[torch.Tensor] = []
        hook = causal_lm.model.register_forward_hook(lambda _m, _a, out: taken.append(out.last_hidden_state))
        try:
            model(**features, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        hidden = taken[-1]
        softcap = causal_lm.config.get_text_config().final_logit_softcapping
        loss = causal_lm_loss(hidden, causal_lm.lm_head, inputs["labels"], softcap, num_items=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items counts every rank's labelled tokens and DDP averages the ranks' gradients, so each rank's
            # loss is scaled by their number, as transformers' compute_loss does
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No trl model card: it would land among the checkpoints; the run directory documents itself."""

    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        root = Path(self.args.output_dir)
        self._staging = root / ".staging"
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # every rank writes its RNG state into the staging folder
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self._staging = self._staging, None
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:  # rank 0 completes the checkpoint
            return
        name = f"checkpoint-{self.state.global_step}"
        write_text(staging / name / WORLD_FILE, json.dumps({"world_size": self.args.world_size}) + "\n")
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(staging / name, root / name)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit, use_mtime=False)


def checkpoint_to_resume(recipe: Recipe, resume: bool, ranks: int) -> Path | None:
    """The checkpoint a run of `ranks` processes continues from (None: a fresh start). Whether a fresh start may
    replace the folder's run was decided before anything loaded (`ft.preflight`).

    A checkpoint's data position is a count of each rank's micro-batches and its RNG states are one a rank, so it
    continues only with the number of processes that wrote it; another number is refused, naming both."""
    if not resume:
        return None
    checkpoints = recipe.output.dir / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        if distributed.world().main:
            console.print(f"[yellow]no checkpoint in {checkpoints}; starting from step 0")
        return None
    record = Path(last) / WORLD_FILE
    written = json.loads(record.read_text())["world_size"] if record.is_file() else 1  # before ft trained on several
    if written != ranks:
        raise FtError(f"{last} was written by a run of {written} process{'es' * (written > 1)} and this one has "
                      f"{ranks}: each process's place in the data is in the checkpoint, so it continues only with "
                      f"{written} (train.devices={written}, or torchrun with {written} processes in all); or start "
                      "afresh with output.overwrite=true")
    return Path(last)


def prepare_run_dir(recipe: Recipe, resume_from: Path | None) -> Path:
    """Empty the claimed run directory of ft's own entries for a fresh start (any other file stays) and record the
    resolved recipe in it."""
    run = recipe.output.dir
    if resume_from is None:
        clear(run, RUN_ENTRIES)
    remove_stale_temporaries(run)
    shutil.rmtree(run / "checkpoints" / ".staging", ignore_errors=True)
    write_text(run / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return run


def training_arguments(recipe: Recipe, settings: Settings, has_eval: bool, fresh: bool) -> SFTConfig:
    """The Trainer's arguments: the recipe's train section, with checkpointing, offloading, precision and wandb as
    resolved (`ft.resolve`); a `fresh` run (not resumed) with held-out rows evaluates them at step 0."""
    t, run = recipe.train, recipe.output.dir
    hf, mode = settings.backend == "hf", settings.wandb
    if mode != "disabled":
        os.environ.update(
            WANDB_MODE=mode, WANDB_DIR=str(run), WANDB_PROJECT=recipe.logging.project, WANDB_SILENT="true"
        )
    return SFTConfig(
        output_dir=str(run / "checkpoints"),
        run_name=recipe.logging.run_name or run.name,
        report_to=["wandb"] if mode != "disabled" else [],
        seed=t.seed,
        data_seed=t.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        logging_steps=t.log_every,
        eval_strategy="steps" if has_eval else "no",
        # inside train(), once the model is wrapped: a Trainer that evaluated first never wraps it in DDP
        eval_on_start=has_eval and fresh,
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        gradient_checkpointing=settings.gradient_checkpointing,
        # ft's offloading and MLP tiles need the non-reentrant kind; unsloth picks its own
        gradient_checkpointing_kwargs={"use_reentrant": False} if hf else None,
        # Under DDP: a micro-batch without images or audio leaves their LoRA without a gradient on that rank, which
        # DDP must be told to look for; text-only LoRA uses every parameter every step, and looking costs a pass.
        ddp_find_unused_parameters=recipe.lora.vision or recipe.lora.audio,
        average_tokens_across_devices=True,  # the loss over every rank's labelled tokens, as one process's would be
        activation_offloading=settings.offload_activations,
        bf16=settings.device == "cuda" and settings.dtype == "bfloat16",
        use_cpu=settings.device == "cpu",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive validated, encoded and labelled by ft
        max_length=None,  # too-long rows were reported by the data checks, never cut
        label_names=["labels"],
        prediction_loss_only=True,  # held-out loss only: no logits gathered
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="passive",  # the Trainer keeps transformers' log level as the CLI set it (`ft.quiet`)
    )


def summarize(recipe: Recipe, records: list[dict[str, Any]], seconds: float, modules: list[str],
              pad_share: float | None, clock: StepClock, settings: Settings, started_at: float,
              ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json; `ranks` holds each rank's step tokens and peak memory (`rank_figures`)."""
    evals = [r for r in records if "eval_loss" in r]
    losses = [r for r in records if "loss" in r]
    summary: dict[str, Any] = {
        "model": recipe.model.name,
        "backend": settings.backend,
        "backend_reason": settings.backend_reason,
        "settings": settings.as_dict(),
        "steps": max((r["step"] for r in records), default=0),
        "train_loss_last": losses[-1]["loss"] if losses else None,
        "eval_loss_first": evals[0]["eval_loss"] if evals else None,
        "eval_loss_last": evals[-1]["eval_loss"] if evals else None,
        "seconds": round(seconds, 1),
        "world_size": len(ranks),
        "global_batch": global_batch(recipe, len(ranks)),
        "lora_modules": len(modules),
        "pad_share": None if pad_share is None else round(pad_share, 4),  # first epoch's micro-batches, grouped
        "adapter": "adapter",
    }
    if evals and evals[0]["eval_loss"]:
        summary["eval_loss_drop"] = 1.0 - evals[-1]["eval_loss"] / evals[0]["eval_loss"]
    summary["throughput"] = clock.throughput([rank["step_tokens"] for rank in ranks])
    if settings.compiled_layers:  # a count that grows with the run's shapes would mean recompiling (`ft.compiled`)
        summary["compiled_graphs"] = compiled_graphs()
    if clock.first_step_end is not None:  # from ft's start: imports, data checks and loading included
        summary["first_step_after_seconds"] = round(clock.first_step_end - started_at, 1)
        summary["last_step_after_seconds"] = round(clock.last_step_end - started_at, 1)
    if settings.plan is not None:  # every CUDA run checks the planner: its estimate beside what the step reserved
        peaks = [rank["peak_reserved_gib"] for rank in ranks]
        summary["memory"] = {**settings.plan.as_dict(), "peak_reserved_gib": max(peaks),
                             "peak_reserved_gib_per_rank": peaks}
    return summary


def global_batch(recipe: Recipe, ranks: int) -> int:
    """Rows an optimizer step trains on: train.batch_size x train.grad_accum x processes."""
    return recipe.train.batch_size * recipe.train.grad_accum * ranks


def rank_figures(clock: StepClock) -> dict[str, Any]:
    """This process's share of summary.json: its tokens a step and, on CUDA, its peak reserved memory."""
    peak = round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None
    return {"step_tokens": [tokens for _, tokens in clock.steps], "peak_reserved_gib": peak}


def train(recipe: Recipe, backend: Backend, resume: bool = False, callbacks: Sequence[TrainerCallback] = (), *,
          started_at: float) -> dict[str, Any] | None:
    """Run the training stage of a recipe that passed `ft.preflight` and whose run directory this process (rank 0
    of several) has claimed (`ft.rundir`) on the backend `ft.resolve.choose_backend` chose before this module
    imported trl (unsloth must load first); return the run's summary (None on the ranks other than 0).
    `started_at` is ft's start (time.time() at the CLI's entry), from which summary.json counts the first and last
    steps; `callbacks` are extra Trainer callbacks (a benchmark's profiler)."""
    started, here = time.time(), distributed.world()
    last_checkpoint = checkpoint_to_resume(recipe, resume, here.size)
    set_seed(recipe.train.seed)
    with recipe.blame("model.name"):
        processor = load_processor(recipe.model.name, recipe.data.image_soft_tokens)
    train_rows, eval_rows, lengths = load_data(recipe, processor)
    # Every other `auto`, decided before any weights load (on CUDA a run over the memory budget stops here): a batch
    # of the longest rows bounds every step, and grouping by length makes such a batch likely.
    settings = resolve(recipe, backend, recipe.train.batch_size * max(lengths))
    t = recipe.train
    if here.main:
        console.print(settings.header(), highlight=False)
        console.print(f"global batch {global_batch(recipe, here.size)} rows a step: train.batch_size {t.batch_size} x "
                      f"train.grad_accum {t.grad_accum} x {here.size} process{'es' * (here.size > 1)}", highlight=False)
    model = backends.load(recipe, settings)
    distributed.on_main(lambda: prepare_run_dir(recipe, last_checkpoint))
    run = recipe.output.dir
    modules = lora_modules(model)
    metrics, clock, progress = MetricsLog(run / "metrics.jsonl"), StepClock(), RichProgress()
    samples = MetricsLog(run / "samples.jsonl")
    # rank 0 alone answers the sample prompts: its model is every rank's after each step
    sampling = [SampleAnswers(samples, t.sample_conversations(), t.sample_every, t.sample_tokens, progress)
                ] if t.sample_prompts and here.main else []
    # ft's own order where it groups rows, and always with several processes (it deals out each global batch)
    sampler = None
    if t.group_by_length or here.size > 1:
        sampler = LengthGroupedEpochSampler(lengths, t.batch_size, t.seed, here.size, t.group_by_length)
    trainer = RecipeTrainer(
        model=model,
        args=training_arguments(recipe, settings, bool(eval_rows), last_checkpoint is None),
        train_dataset=encoded_dataset(train_rows, processor, recipe.data.max_seq_length,
                                      sampler.filler_rows if sampler else ()),
        eval_dataset=encoded_dataset(eval_rows, processor, recipe.data.max_seq_length) if eval_rows else None,
        processing_class=processor,
        data_collator=partial(collate_items, pad_token_id=processor.tokenizer.pad_token_id),
        callbacks=[metrics, clock, progress, *sampling, *callbacks],
    )
    trainer.clock, trainer.train_sampler = clock, sampler
    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl replace its raw dict prints
    keep_lora_in_float32(model)
    pad_share = None
    if t.group_by_length:
        pad_share = padding_share(sampler.item_lengths, list(sampler), t.batch_size)
    if last_checkpoint is not None:
        step = int(last_checkpoint.name.split("-")[-1])
        distributed.on_main(lambda: [log.truncate_after(step) for log in (metrics, samples)])
        if here.main:
            console.print(f"resuming from {last_checkpoint}")
    trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    if eval_rows and trainer.state.global_step % t.eval_every != 0:
        trainer.evaluate()
    ranks = distributed.gather(rank_figures(clock))
    distributed.finish()
    if not here.main:
        return None

    model.peft_config["default"].base_model_name_or_path = recipe.model.name
    with staged_dir(run / "adapter") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)  # embeddings are never trained here
    records = read_metrics(run / "metrics.jsonl")
    loss_curve(records, run / "loss.png", f"{recipe.model.name}: {run.name}")
    summary = summarize(recipe, records, time.time() - started, modules, pad_share, clock, settings, started_at,
                        ranks)
    write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def keep_lora_in_float32(model: torch.nn.Module) -> None:
    """trl's SFTTrainer casts a quantized model's trainable weights to bfloat16; ft keeps the LoRA weights, and so
    their gradients and AdamW moments, in float32, as peft creates them (and as `ft.memory` plans them)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
