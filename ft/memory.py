"""Peak GPU memory of a training run, estimated from the recipe before any weights are loaded.

It only estimates, for a backend, base and memory work already decided: `ft.resolve` weighs the estimate against
`train.memory_budget_gb` (tiling the MLP when `train.tiled_mlp: auto` needs it) and refuses, with the breakdown, a
CUDA run that cannot fit, instead of dying in an out-of-memory error hours later; `ft plan RECIPE` prints it
anywhere. After each CUDA run, summary.json holds the estimate beside the peak the run really reserved.

The estimate adds up what a LoRA step keeps on the GPU (peak = `torch.cuda.max_memory_reserved()`). Three ways to
train are modelled: `hf` is ft's own path (transformers + peft + trl), `unsloth` plain unsloth, and `transformers`
the plain transformers + peft + bitsandbytes recipe measured as the baseline.
- base weights: every parameter counted on a meta-device model built from the checkpoint's config. A 4-bit base
  (QLoRA) holds the decoder's linear layers at 4.127 bits (NF4 with double-quantized absmax, blocks of 64) and the
  rest in bf16 (in fp32 for `transformers`: peft's `prepare_model_for_kbit_training` upcasts them; ft does not);
  an unquantized base is bf16 throughout.
- LoRA: weights, gradients and AdamW's two moments, all fp32 (16 bytes per LoRA parameter), and on ft's path the
  bf16 copies its fused projections compute with (2 more).
- checkpoints: with gradient checkpointing, each decoder layer's bf16 input, kept until the backward pass reaches
  it; ft offloads them to CPU memory (`train.offload_activations`), leaving only trl's in-flight stash on the GPU.
- the layer being recomputed: per token, a share of the residual width (norms, projections, attention) and of the
  MLP width (gate, up and their product), fitted to GPU measurements; with `train.tiled_mlp` the MLP's share is
  held for one tile of `ft.tiling.TILE` tokens only. Without checkpointing every layer keeps its working set.
- the attention masks ft's chunked attention keeps for the recomputed layer's backward while they are small.
- logits: `transformers` keeps the bf16 logits, their fp32 copy, the softcap and the loss gradient over the whole
  vocabulary for every token; trl's fused LM head (ft's loss on CUDA) holds one vocabulary tile of 4096 tokens and
  the fp32 gradient of the final hidden states; unsloth's fused cross-entropy keeps none beyond the slack.
- a fixed slack for the allocator and the kernels' workspaces.

The fitted constants come from peak reserved memory of random weights of the exact 12B shape, r=16 on all
language-model projections (`bench/train_12b.py` measures them; docs/BENCHMARKS.md, "Memory planner against measured
peaks of plain unsloth and transformers" and "Training at the Gemma 4 12B shape", has the runs; `tests/test_memory.py`
holds the estimates to them).

    >>> from ft.recipe import LoraSection
    >>> from ft.tiny import build_tiny
    >>> counts = count_parameters(build_tiny()[0].config, LoraSection())
    >>> plan = estimate(counts, tokens=256, backend="hf", quantized=False)
    >>> plan.total_gib - plan.slack < 0.1
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ft.attention import KEPT_MASKS_BYTES, QUERY_CHUNK
from ft.lora import target_regex
from ft.recipe import LoraSection
from ft.tiling import TILE

GIB = 1 << 30
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
LORA_BYTES = 16  # fp32 weight, gradient and two AdamW moments
HF_LORA_COPY_BYTES = 2  # ft's fused projections keep a bf16 copy of each LoRA weight for a step (ft.fused_lora)
FULL_LOGIT_BYTES = 24  # per vocabulary entry per token, transformers' own loss
SLACK_GIB = 0.55  # fitted to the plain unsloth and transformers runs
# ft's path: bytes per token, per unit of residual width and of MLP width, of the layer being recomputed (its MLP
# share held for one tile when tiled), and the slack (allocator, workspaces, trl's head tile). A least-squares fit to
# ft's runs at the 12B shape, rounded, with the slack raised above the fit so that run-to-run noise stays clear of the
# 3% a plan may fall short (docs/BENCHMARKS.md, "Training at the Gemma 4 12B shape", has the runs and the fit).
HF_RESIDUAL_BYTES = 74.0
HF_MLP_BYTES = 5.5
HF_SLACK_GIB = 0.6
OFFLOAD_STASH = 5  # checkpointed layer inputs trl keeps on the GPU while they are copied out (max_fwd_stash_size)

Backend = Literal["hf", "unsloth", "transformers"]


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one training step, in GiB, by what holds it."""

    weights: float
    lora: float
    checkpoints: float
    working: float
    logits: float
    slack: float
    tokens: int
    backend: str
    quantized: bool
    offload: bool = False
    tiled_mlp: bool = False

    @property
    def base(self) -> str:
        return "4-bit" if self.quantized else "bf16"

    @property
    def total_gib(self) -> float:
        return self.weights + self.lora + self.checkpoints + self.working + self.logits + self.slack

    def as_dict(self) -> dict[str, object]:
        """The plan as summary.json's `memory` holds it, beside the peak the run reserved."""
        return {"base": self.base, "tokens": self.tokens, "offload_activations": self.offload,
                "tiled_mlp": self.tiled_mlp, "planned_gib": round(self.total_gib, 2)}

    def table(self) -> str:
        where = "offloaded, trl's stash" if self.offload else "on the GPU"
        rows = [(f"base weights ({self.base})", self.weights), ("LoRA weights, gradients, AdamW", self.lora),
                (f"checkpointed layer inputs ({where})", self.checkpoints),
                (f"layer being recomputed ({self.tokens} tokens{', MLP tiled' if self.tiled_mlp else ''})",
                 self.working),
                ("logits and loss", self.logits), ("allocator slack, workspaces", self.slack),
                ("total", self.total_gib)]
        return "\n".join(f"  {name:<52} {gib:6.2f} GiB" for name, gib in rows)


@dataclass(frozen=True)
class ParamCounts:
    quantizable: int  # decoder linear weights (what a 4-bit loader quantizes)
    other: int
    lora: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int


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
                   text.intermediate_size, text.vocab_size, text.num_attention_heads)


def estimate(counts: ParamCounts, tokens: int, backend: Backend, quantized: bool,
             gradient_checkpointing: bool = True, offload: bool = False, tiled_mlp: bool = False) -> MemoryPlan:
    """Peak GPU memory of a LoRA step over `tokens` tokens (batch rows x padded length, soft tokens included)."""
    other_bytes = 4 if quantized and backend == "transformers" else 2
    weights = counts.quantizable * (NF4_BYTES if quantized else 2) + counts.other * other_bytes
    layer_input = counts.hidden * 2
    if backend == "hf":
        residual, mlp = HF_RESIDUAL_BYTES * counts.hidden, HF_MLP_BYTES * counts.intermediate
        working = tokens * residual + min(tokens, TILE if tiled_mlp else tokens) * mlp
        # the attention masks of the recomputed layer's chunks, kept for its backward while they are small (counted
        # as if bf16 and widened to every head, each query seeing at most two chunks of keys: an upper bound,
        # ft.attention)
        working += min(KEPT_MASKS_BYTES, tokens * min(tokens, 2 * QUERY_CHUNK) * counts.heads * 2)
        logits = tokens * counts.hidden * 6  # the fused head's fp32 gradient and bf16 copy of the labelled states
        slack = HF_SLACK_GIB
    else:  # plain unsloth and transformers, fitted on an H100 (issue #4)
        working = tokens * (4 * counts.hidden + 3 * counts.intermediate) * 2
        logits = tokens * FULL_LOGIT_BYTES * counts.vocab if backend == "transformers" else 0
        slack = SLACK_GIB
    if not gradient_checkpointing:
        checkpoints, working = 0.0, working * counts.layers
    elif offload:
        checkpoints = tokens * layer_input * OFFLOAD_STASH
    else:
        checkpoints = tokens * layer_input * counts.layers
    return MemoryPlan(
        weights=weights / GIB,
        lora=counts.lora * (LORA_BYTES + (HF_LORA_COPY_BYTES if backend == "hf" else 0)) / GIB,
        checkpoints=checkpoints / GIB,
        working=working / GIB,
        logits=logits / GIB,
        slack=slack,
        tokens=tokens,
        backend=backend,
        quantized=quantized,
        offload=offload,
        tiled_mlp=tiled_mlp,
    )

