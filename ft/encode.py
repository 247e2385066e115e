"""Turn a chat row into model inputs with the model's own chat template, and mark what carries loss.

Loss falls on assistant turns only: the tokens after `<|turn>model\\n` up to and including the closing `<turn|>`
(so the model learns to stop). Image and audio placeholder tokens never carry loss.

    >>> from ft.tiny import tiny_processor
    >>> from ft.data import load_rows
    >>> row = load_rows(Path("data/demo/train.jsonl"))[0]
    >>> features = encode_row(row, tiny_processor())
    >>> sorted(features)
    ['attention_mask', 'input_features', 'input_features_mask', 'input_ids', 'labels', 'mm_token_type_ids']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import ProcessorMixin

from ft.data import Row, load_audio, load_image

IGNORE_INDEX = -100
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
MODEL_ROLE = "model"


def render(row: Row, processor: ProcessorMixin) -> str:
    """The row as training text, rendered by the processor's (the model's) chat template."""
    return processor.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=False)


def assistant_mask(input_ids: list[int], processor: ProcessorMixin) -> list[bool]:
    """True for tokens of model turns: after the `<|turn>model` header's newline, through `<turn|>`."""
    tokenizer = processor.tokenizer
    turn_open = tokenizer.convert_tokens_to_ids(TURN_OPEN)
    turn_close = tokenizer.convert_tokens_to_ids(TURN_CLOSE)
    mask = [False] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i] != turn_open:
            i += 1
            continue
        # The role name runs up to the first newline; read it token by token since BPE may split it.
        header_end = i + 1
        while header_end < len(input_ids) and "\n" not in tokenizer.decode(input_ids[i + 1 : header_end + 1]):
            header_end += 1
        role = tokenizer.decode(input_ids[i + 1 : header_end + 1]).split("\n")[0].strip()
        j = header_end + 1
        while j < len(input_ids) and input_ids[j] != turn_close:
            if role == MODEL_ROLE:
                mask[j] = True
            j += 1
        if role == MODEL_ROLE and j < len(input_ids):
            mask[j] = True
        i = j + 1
    return mask


def encode_row(row: Row, processor: ProcessorMixin) -> dict[str, Any]:
    """Processor outputs for one row (unbatched), plus `labels` for causal-LM loss."""
    images = [load_image(p) for p in row.media("image")]
    audio = [load_audio(p) for p in row.media("audio")]
    batch = processor(
        text=[render(row, processor)],
        images=[images] if images else None,
        audio=audio or None,
        return_tensors="pt",
        padding=False,
    )
    input_ids = batch["input_ids"][0]
    keep = torch.tensor(assistant_mask(input_ids.tolist(), processor))
    if "mm_token_type_ids" in batch:
        keep &= batch["mm_token_type_ids"][0] == 0
    features: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": batch["attention_mask"][0],
        "labels": torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        "mm_token_type_ids": batch.get("mm_token_type_ids", torch.zeros_like(input_ids[None]))[0],
    }
    if images:
        features["pixel_values"] = batch["pixel_values"]
        features["image_position_ids"] = batch["image_position_ids"]
    if audio:
        features["input_features"] = batch["input_features"]
        features["input_features_mask"] = batch["input_features_mask"]
    return features


def length_of(row: Row, processor: ProcessorMixin) -> int:
    """Token count of a row as the model sees it (placeholders expanded)."""
    return int(encode_row(row, processor)["input_ids"].numel())


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows into a batch; images and audio clips are stacked across rows in order.

    The model scatters image and audio soft tokens into the placeholders left to right, so concatenating each
    row's media in row order keeps every clip next to its own placeholders.
    """
    width = max(f["input_ids"].numel() for f in features)

    def pad(key: str, value: int) -> torch.Tensor:
        out = torch.full((len(features), width), value, dtype=features[0][key].dtype)
        for i, f in enumerate(features):
            out[i, : f[key].numel()] = f[key]
        return out

    batch = {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
    }
    if any("pixel_values" in f for f in features):
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in features if "pixel_values" in f])
        batch["image_position_ids"] = torch.cat([f["image_position_ids"] for f in features if "pixel_values" in f])
    clips = [f for f in features if "input_features" in f]
    if clips:
        frames = max(f["input_features"].shape[1] for f in clips)
        n = sum(f["input_features"].shape[0] for f in clips)
        dim = clips[0]["input_features"].shape[2]
        batch["input_features"] = torch.zeros(n, frames, dim, dtype=clips[0]["input_features"].dtype)
        batch["input_features_mask"] = torch.zeros(n, frames, dtype=torch.bool)
        k = 0
        for f in clips:
            for clip, mask in zip(f["input_features"], f["input_features_mask"], strict=True):
                batch["input_features"][k, : clip.shape[0]] = clip
                batch["input_features_mask"][k, : mask.shape[0]] = mask
                k += 1
    return batch


def encoded_dataset(rows: list[Row], processor: ProcessorMixin, fillers: Sequence[int] = ()) -> datasets.Dataset:
    """The rows as a `datasets.Dataset` (what trl's trainers take) that encodes a row only when it is read, so image
    pixels never pile up in memory; each item is {"features": encode_row(...)}, batched by `collate_items`. After
    them come `fillers`: the rows of those indices again with no label, so no loss (what fills a rank's share of a
    short last batch, `ft.batching`)."""
    dataset = datasets.Dataset.from_dict({"row": [*range(len(rows)), *fillers],
                                          "loss": [True] * len(rows) + [False] * len(fillers)})

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
        features = [encode_row(rows[i], processor) for i in batch["row"]]
        for item, loss in zip(features, batch["loss"], strict=True):
            if not loss:
                item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return {"features": features}

    dataset.set_transform(encode)
    return dataset


def collate_items(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` for the items of `encoded_dataset`."""
    return collate([item["features"] for item in items], pad_token_id)
