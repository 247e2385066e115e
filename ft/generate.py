"""Answers from the model in training form (transformers, with the LoRA on it): the samples a run writes while it
trains (`ft.callbacks.SampleAnswers`), and `ft chat --adapter`, which tells a training problem from a quantization
one by answering without any GGUF in the way.

A conversation is in the data format (`ft.data`): a string or text / image / audio parts per message, ending with
a user turn; it is rendered by the processor's chat template with the model's turn opened, as at inference.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import BatchFeature, ProcessorMixin, TextIteratorStreamer

from ft.data import load_audio, load_image
from ft.sampling import Sampling

if TYPE_CHECKING:
    from ft.recipe import Recipe


def prompt_inputs(messages: list[dict[str, Any]], processor: ProcessorMixin, device: torch.device) -> BatchFeature:
    """Model inputs for the model's next turn after `messages`, media read as training reads them."""
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
    images = [load_image(Path(p["path"])) for p in parts if p["type"] == "image"]
    audio = [load_audio(Path(p["path"])) for p in parts if p["type"] == "audio"]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[images] if images else None, audio=audio or None, return_tensors="pt")
    return inputs.to(device)


def greedy_answer(model: torch.nn.Module, processor: ProcessorMixin, messages: list[dict[str, Any]],
                  max_new_tokens: int) -> list[int]:
    """The model's greedy answer as token ids, up to and including the end-of-turn token (if reached in time)."""
    inputs = prompt_inputs(messages, processor, model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


class AdapterChat:
    """The run's base model with its trained LoRA, in full precision, answering through transformers."""

    def __init__(self, run: Path, recipe: Recipe) -> None:
        from peft import PeftModel

        from ft.models import load_model, load_processor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        with recipe.blame("model.name"):
            self.processor = load_processor(recipe.model.name, recipe.data.image_soft_tokens)
            base = load_model(recipe.model.name, "bfloat16" if device == "cuda" else "float32", device)
        self.model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()

    def answer(self, messages: list[dict[str, Any]], sampling: Sampling, max_tokens: int) -> Iterator[str]:
        """Stream the text of the next turn (the end-of-turn token not shown)."""
        inputs = prompt_inputs(messages, self.processor, self.model.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        settings = ({"do_sample": False} if sampling.temperature <= 0 else
                    {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
                     "top_p": sampling.top_p})
        torch.manual_seed(sampling.seed)

        def generate() -> None:
            with torch.no_grad():
                self.model.generate(**inputs, max_new_tokens=max_tokens, streamer=streamer, **settings)

        worker = threading.Thread(target=generate, daemon=True)  # transformers' streaming runs generate beside
        worker.start()
        yield from streamer
        worker.join()
