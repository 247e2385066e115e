"""The unsloth backend (CUDA only): unsloth's FastModel with its fused LoRA kernels, chunked loss over the
262,144-token head and offloaded gradient checkpointing, trained by trl's SFTTrainer as unsloth patches it.

unsloth patches transformers, peft and trl when it is imported, so `ft.resolve.choose_backend` imports it
before `ft.train` (and with it trl) loads. The LoRA goes exactly where the recipe says: ft's own target regex
(`ft.lora.target_regex`) is handed to unsloth, which passes a regex to peft unchanged (its own target patterns
miss `gemma4_unified`'s image embedder), and the modules that got a LoRA are checked against the regex by name.
"""

from __future__ import annotations

import re

from peft import PeftModel
from torch import nn

from ft.errors import FtError
from ft.lora import lora_modules, target_regex
from ft.models import DTYPES, checkpoint_folder
from ft.recipe import Recipe
from ft.resolve import Settings


def load(recipe: Recipe, settings: Settings) -> PeftModel:
    from unsloth import FastModel

    with checkpoint_folder(recipe.model.name) as source:  # a tiny model's folder must outlive get_peft_model
        with recipe.blame("model.name"):
            model, _ = FastModel.from_pretrained(
                source, max_seq_length=recipe.data.max_seq_length, dtype=DTYPES[settings.dtype],
                load_in_4bit=settings.quantization == "nf4", full_finetuning=False,
                use_gradient_checkpointing="unsloth",
                use_exact_model_name=True,  # the recipe's checkpoint, not a mirror unsloth maps a hub id to
            )
        pattern = target_regex(recipe.lora)
        wanted = sorted(name for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) and re.fullmatch(pattern, name))
        model = FastModel.get_peft_model(
            model, r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout, bias="none",
            target_modules=pattern, use_gradient_checkpointing="unsloth", random_state=recipe.train.seed,
        )
    placed = lora_modules(model)
    if placed != wanted:
        missing, extra = sorted(set(wanted) - set(placed)), sorted(set(placed) - set(wanted))
        raise FtError(f"unsloth put the LoRA on other modules than the recipe's lora section asks for "
                      f"(missing: {missing[:3]}, unexpected: {extra[:3]}); use train.backend=hf")
    return model
