"""Peak GPU memory of a training run, estimated from the recipe before any weights are loaded.

`ft train` checks the estimate against `train.memory_budget_gb` on CUDA and refuses, with the breakdown, a recipe
that cannot fit, instead of dying in an out-of-memory error hours later; `ft plan RECIPE` prints it anywhere.

The estimate adds up what a LoRA step keeps on the GPU (peak = `torch.cuda.max_memory_reserved()`):
Three ways to train are modelled: `hf` is ft's own transformers path, `unsloth` plain unsloth, and `transformers`
the plain transformers + peft + bitsandbytes recipe that issue #4 measured as the baseline.
- base weights: every parameter counted on a meta-device model built from the checkpoint's config. A 4-bit base
  (QLoRA) holds the decoder's linear layers at 4.127 bits (NF4 with double-quantized absmax, blocks of 64) and the
  rest in bf16 (in fp32 for `transformers`: peft's `prepare_model_for_kbit_training` upcasts them; ft does not);
  an unquantized base is bf16 throughout.
- LoRA: weights, gradients and AdamW's two moments, all fp32 (16 bytes per LoRA parameter).
- activations per token: the bf16 input of each decoder layer kept for gradient checkpointing, plus one layer's
  working set while it is recomputed (4 hidden-wide and 3 MLP-wide bf16 rows). Without checkpointing every layer
  keeps its working set.
- logits: `transformers` keeps the bf16 logits, their fp32 copy, the softcap and the loss gradient over the whole
  vocabulary for every token (24 bytes per vocabulary entry, fitted below); ft's loss (`ft.loss`) holds one chunk
  of 256 labelled positions at a time (estimated at 18 bytes per entry: bf16 and fp32 logits, softcap, softmax,
  gradient; not yet measured on a GPU); unsloth's fused cross-entropy keeps none beyond the slack.
- a fixed 0.55 GiB for the allocator's slack and the kernels' workspaces (fitted below).

The two fitted constants come from peak reserved memory measured on an H100 with random weights of the exact 12B
shape, r=16 on all language-model projections, batch 1 (issue #4; `tests/test_memory.py` holds the table): the
estimate is within 5% of all 8 points, from 1024 to 8192 tokens and for a multimodal step, for both of them.

    >>> from ft.recipe import LoraSection
    >>> from ft.tiny import build_tiny
    >>> counts = count_parameters(build_tiny()[0].config, LoraSection())
    >>> plan = estimate(counts, tokens=256, backend="hf", quantized=False)
    >>> plan.total_gib < 1
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ft.errors import FtError
from ft.lora import target_regex
from ft.loss import CHUNK
from ft.recipe import LoraSection, Recipe

GIB = 1 << 30
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
LORA_BYTES = 16  # fp32 weight, gradient and two AdamW moments
FULL_LOGIT_BYTES = 24  # per vocabulary entry per token, transformers' own loss
CHUNK_LOGIT_BYTES = 18  # per vocabulary entry per position of ft.loss's chunk
SLACK_GIB = 0.55

Backend = Literal["hf", "unsloth", "transformers"]


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one training step, in GiB, by what holds it."""

    weights: float
    lora: float
    activations: float
    logits: float
    slack: float
    tokens: int
    backend: str
    quantized: bool

    @property
    def base(self) -> str:
        return "4-bit" if self.quantized else "bf16"

    @property
    def total_gib(self) -> float:
        return self.weights + self.lora + self.activations + self.logits + self.slack

    def table(self) -> str:
        rows = [(f"base weights ({self.base})", self.weights), ("LoRA weights, gradients, AdamW", self.lora),
                (f"activations ({self.tokens} tokens a step)", self.activations),
                ("logits and loss", self.logits), ("allocator slack, workspaces", self.slack),
                ("total", self.total_gib)]
        return "\n".join(f"  {name:<40} {gib:6.2f} GiB" for name, gib in rows)


@dataclass(frozen=True)
class ParamCounts:
    quantizable: int  # decoder linear weights (what a 4-bit loader quantizes)
    other: int
    lora: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def count_parameters(config: object, lora: LoraSection) -> ParamCounts:
    """Parameter counts of the model `config` describes, on the meta device (no memory, a few seconds for 12B)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    with torch.device("meta"):
        model = Gemma4UnifiedForConditionalGeneration(config)
    pattern = re.compile(target_regex(lora))
    quantizable = lora_params = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if ".language_model.layers." in f".{name}":
            quantizable += module.weight.numel()
        if pattern.fullmatch(name):
            lora_params += lora.r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    text = config.text_config
    return ParamCounts(quantizable, total - quantizable, lora_params, text.num_hidden_layers, text.hidden_size,
                   text.intermediate_size, text.vocab_size)


def estimate(counts: ParamCounts, tokens: int, backend: Backend, quantized: bool,
             gradient_checkpointing: bool = True) -> MemoryPlan:
    """Peak GPU memory of a LoRA step over `tokens` tokens (batch rows x padded length, soft tokens included)."""
    other_bytes = 4 if quantized and backend == "transformers" else 2
    logits = {"transformers": tokens * FULL_LOGIT_BYTES, "hf": min(tokens, CHUNK) * CHUNK_LOGIT_BYTES, "unsloth": 0}
    weights = counts.quantizable * (NF4_BYTES if quantized else 2) + counts.other * other_bytes
    working = (4 * counts.hidden + 3 * counts.intermediate) * 2
    per_token = (counts.layers * counts.hidden * 2 + working) if gradient_checkpointing else counts.layers * working
    return MemoryPlan(
        weights=weights / GIB,
        lora=counts.lora * LORA_BYTES / GIB,
        activations=tokens * per_token / GIB,
        logits=logits[backend] * counts.vocab / GIB,
        slack=SLACK_GIB,
        tokens=tokens,
        backend=backend,
        quantized=quantized,
    )


def plan_for(recipe: Recipe, config: object, tokens: int | None = None) -> MemoryPlan:
    """The estimate for a recipe's run on CUDA; tokens defaults to the recipe's worst case (a batch of
    max-length rows)."""
    backend: Backend = "unsloth" if recipe.train.backend == "unsloth" else "hf"
    tokens = tokens or recipe.train.batch_size * recipe.data.max_seq_length
    quantized = backend == "unsloth" or recipe.model.quantization in ("auto", "nf4")
    return estimate(count_parameters(config, recipe.lora), tokens, backend, quantized,
                    gradient_checkpointing=recipe.train.gradient_checkpointing or backend == "unsloth")


def check_budget(recipe: Recipe, plan: MemoryPlan) -> None:
    """Raise a FtError naming `train.memory_budget_gb` when the plan does not fit the budget."""
    budget = recipe.train.memory_budget_gb
    if plan.total_gib > budget:
        raise FtError(
            f"{recipe.where('train.memory_budget_gb')}: this run needs about {plan.total_gib:.1f} GiB of GPU memory, "
            f"more than the budget of {budget:g} GiB ({plan.backend} backend, "
            f"{plan.base} base):\n{plan.table()}\n"
            "Lower data.max_seq_length or train.batch_size (the largest step sets the peak), lower lora.r, turn on "
            "train.gradient_checkpointing, or raise train.memory_budget_gb if the GPU has more memory."
        )
