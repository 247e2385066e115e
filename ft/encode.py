"""Turn a chat row into model inputs with the model's own chat template, and mark what carries loss.

Loss falls on assistant turns only: the tokens after `<|turn>model\\n` up to and including the closing `<turn|>`
(so the model learns to stop). Image and audio placeholder tokens never carry loss.

A row longer than `data.max_seq_length` is cut (`data.too_long: truncate`, `truncate`) so that it ends as the chat
template ends a row:
- text is cut at the end, token by token; a cut that would fall inside an image or audio span (from its begin token
  through its end token) moves to before the span, and the media after the cut leave the row with their tokens
  (their pixel values or audio frames too);
- a cut inside a turn closes that turn with the template's own closing tokens (the tokens from the row's last
  `<turn|>` to its end), which carry no loss: the model is not taught to stop where the cut fell; a cut inside a turn's
  header (`<|turn>model` and its newline) drops the whole turn;
- labels stay where the assistant spoke; a row left with no labelled token is dropped (None).
Token-level, as LLaMA-Factory's `cutoff_len` and axolotl's `truncate` are, so that the row keeps exactly
`max_length` tokens, not a guess from characters.

    >>> from ft.tiny import tiny_processor
    >>> from ft.data import load_rows
    >>> row = next(r for r in load_rows(Path("data/demo/train.jsonl")) if r.media("audio"))
    >>> features = encode_row(row, tiny_processor())
    >>> sorted(features)
    ['attention_mask', 'input_features', 'input_features_mask', 'input_ids', 'labels', 'mm_token_type_ids']
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from ft.data import Row, load_audio, load_image

IGNORE_INDEX = -100
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
MODEL_ROLE = "model"
MODEL_HEADER = f"{TURN_OPEN}{MODEL_ROLE}\n"


def render(row: Row, processor: ProcessorMixin) -> str:
    """The row as training text, rendered by the processor's (the model's) chat template, each model turn opening
    as the template opens a turn it asks the model to write (`answer_prefix`): what follows it is what the model
    is trained to say, after the very tokens it will see when asked in ft eval, llama.cpp or Ollama."""
    text = processor.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=False)
    prefix = answer_prefix(processor)
    return text.replace(MODEL_HEADER, MODEL_HEADER + prefix) if prefix else text


_PREFIXES: dict[str, str] = {}


def answer_prefix(processor: ProcessorMixin) -> str:
    r"""What the chat template writes after a model turn's header when it prompts for an answer
    (`add_generation_prompt`) but not when it renders a turn already written: Gemma 4's empty thought block
    (`<|channel>thought\n<channel|>`, thinking off). A model trained without it would first meet it when asked.

    >>> from ft.tiny import tiny_processor
    >>> answer_prefix(tiny_processor())
    '<|channel>thought\n<channel|>'
    """
    template = processor.chat_template
    if template not in _PREFIXES:
        asked = [{"role": "user", "content": "?"}]
        written = processor.apply_chat_template(asked, tokenize=False, add_generation_prompt=False)
        prompt = processor.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        opening = prompt.removeprefix(written)
        _PREFIXES[template] = opening.removeprefix(MODEL_HEADER) if opening.startswith(MODEL_HEADER) else ""
    return _PREFIXES[template]


@functools.lru_cache(maxsize=4096)
def _decoded(tokenizer: PreTrainedTokenizerBase, tokens: tuple[int, ...]) -> str:
    """A turn header's tokens as text; the few headers of a dataset recur in every row."""
    return tokenizer.decode(list(tokens))


@functools.lru_cache(maxsize=16)
def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """`text`'s tokens (no special tokens added); the answer prefix is the same in every row."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_mask(input_ids: Sequence[int], processor: ProcessorMixin) -> np.ndarray:
    """True for tokens of model turns: after the `<|turn>model` header's newline and the template's answer prefix
    (`answer_prefix`), through `<turn|>`."""
    tokenizer = processor.tokenizer
    ids = np.asarray(input_ids)
    turn_open, turn_close = tokenizer.convert_tokens_to_ids([TURN_OPEN, TURN_CLOSE])
    prefix = _token_ids(tokenizer, answer_prefix(processor))
    closes = np.flatnonzero(ids == turn_close)
    mask = np.zeros(len(ids), dtype=bool)
    resume = 0  # a turn marker inside a turn's text opens nothing
    for start in np.flatnonzero(ids == turn_open).tolist():
        if start < resume:
            continue
        # The role name runs up to the first newline; read it token by token since BPE may split it.
        header_end = start + 1
        while header_end < len(ids) and "\n" not in _decoded(tokenizer, tuple(ids[start + 1 : header_end + 1])):
            header_end += 1
        role = _decoded(tokenizer, tuple(ids[start + 1 : header_end + 1])).split("\n")[0].strip()
        later = closes[closes > header_end]
        resume = int(later[0]) + 1 if len(later) else len(ids)
        if role == MODEL_ROLE:
            answer = header_end + 1
            if prefix and tuple(ids[answer : answer + len(prefix)]) == prefix:  # the prompt's part, never trained
                answer += len(prefix)
            mask[answer:resume] = True
    return mask


def _text_features(input_ids: list[int], processor: ProcessorMixin) -> dict[str, Any]:
    ids = torch.from_numpy(np.array(input_ids, dtype=np.int64))  # numpy reads a list of ints far faster than torch
    keep = torch.from_numpy(assistant_mask(input_ids, processor))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.where(keep, ids, IGNORE_INDEX),
            "mm_token_type_ids": torch.zeros_like(ids)}


def encode_row(row: Row, processor: ProcessorMixin) -> dict[str, Any]:
    """Processor outputs for one row (unbatched), plus `labels` for causal-LM loss. A row without media needs only
    the tokenizer, which is what the processor runs on its text."""
    images = [load_image(p) for p in row.media("image")]
    audio = [load_audio(p) for p in row.media("audio")]
    if not images and not audio:
        return _text_features(processor.tokenizer(render(row, processor))["input_ids"], processor)
    batch = processor(
        text=[render(row, processor)],
        images=[images] if images else None,
        audio=audio or None,
        return_tensors="pt",
        padding=False,
    )
    input_ids = batch["input_ids"][0]
    keep = torch.from_numpy(assistant_mask(input_ids.tolist(), processor))
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


def encode_rows(rows: list[Row], processor: ProcessorMixin) -> list[dict[str, Any]]:
    """`encode_row` of every row, the rows without media rendered first and tokenized in one call (the fast
    tokenizer's batch runs on every core): a quarter of the time, row for row, of the processor's call (docs/BENCHMARKS.md,
    "Data checks and encoding")."""
    text = [i for i, row in enumerate(rows) if not row.media("image") and not row.media("audio")]
    tokenized = processor.tokenizer([render(rows[i], processor) for i in text])["input_ids"] if text else []
    by_text = dict(zip(text, tokenized, strict=True))
    return [_text_features(by_text[i], processor) if i in by_text else encode_row(row, processor)
            for i, row in enumerate(rows)]


def length_of(row: Row, processor: ProcessorMixin) -> int:
    """Token count of a row as the model sees it (placeholders expanded)."""
    return int(encode_row(row, processor)["input_ids"].numel())


MEDIA = (("image", "boi_token", "eoi_token", ("pixel_values", "image_position_ids")),
         ("audio", "boa_token", "eoa_token", ("input_features", "input_features_mask")))


def _spans(ids: list[int], begin: int, end: int) -> list[tuple[int, int]]:
    """[start, stop) of every begin ... end span."""
    spans, start = [], None
    for i, token in enumerate(ids):
        if token == begin:
            start = i
        elif token == end and start is not None:
            spans.append((start, i + 1))
            start = None
    return spans


def _turn_body_start(ids: list[int], turn_open: int, newline: set[int], cut: int) -> tuple[int, int] | None:
    """(start, body start) of the last turn opened before `cut`; None before the first turn."""
    start = max((i for i in range(cut) if ids[i] == turn_open), default=None)
    if start is None:
        return None
    body = next((i + 1 for i in range(start + 1, len(ids)) if ids[i] in newline), len(ids))
    return start, body


def truncate(features: dict[str, Any], max_length: int, processor: ProcessorMixin) -> dict[str, Any] | None:
    """`features` cut to at most `max_length` tokens as the module says; None when no labelled token is left."""
    tokenizer = processor.tokenizer
    ids = features["input_ids"].tolist()
    if len(ids) <= max_length:
        return features
    turn_open, turn_close = tokenizer.convert_tokens_to_ids([TURN_OPEN, TURN_CLOSE])
    closing = ids[max(i for i, t in enumerate(ids) if t == turn_close):]
    newline = {t for t in set(ids) if "\n" in tokenizer.decode([t])}
    cut = max_length - len(closing)
    spans = {kind: _spans(ids, *tokenizer.convert_tokens_to_ids([getattr(processor, b), getattr(processor, e)]))
             for kind, b, e, _ in MEDIA}
    for start, stop in (s for kind_spans in spans.values() for s in kind_spans):
        if start < cut < stop:
            cut = start
    tail: list[int] = []
    turn = _turn_body_start(ids, turn_open, newline, cut)
    if turn is not None:
        start, body = turn
        close = next((i for i in range(start, len(ids)) if ids[i] == turn_close), len(ids))
        if cut < body:  # inside the header: the turn goes
            cut = start
        elif cut < close + len(closing):  # inside the body, or the turn's closing tokens
            cut, tail = min(cut, close), closing
    out = dict(features)
    out["input_ids"] = torch.tensor(ids[:cut] + tail, dtype=features["input_ids"].dtype)
    out["labels"] = torch.cat([features["labels"][:cut], torch.full((len(tail),), IGNORE_INDEX,
                                                                    dtype=features["labels"].dtype)])
    out["attention_mask"] = torch.ones_like(out["input_ids"], dtype=features["attention_mask"].dtype)
    out["mm_token_type_ids"] = torch.cat([features["mm_token_type_ids"][:cut],
                                          torch.zeros(len(tail), dtype=features["mm_token_type_ids"].dtype)])
    for kind, _, _, keys in MEDIA:
        kept = sum(1 for _, stop in spans[kind] if stop <= cut)
        for key in keys:
            if key in out:
                out[key] = out[key][:kept]
                if not kept:
                    del out[key]
    if not (out["labels"] != IGNORE_INDEX).any():
        return None
    return out


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


def encoded_dataset(rows: list[Row], processor: ProcessorMixin, max_length: int | None = None,
                    fillers: Sequence[int] = ()) -> datasets.Dataset:
    """The rows as a `datasets.Dataset` (what trl's trainers take) that encodes a row only when it is read, so image
    pixels never pile up in memory; each item is {"features": encode_row(...)}, cut to `max_length` tokens where
    given (rows that `truncate` would drop were dropped by the data checks), batched by `collate_items`. A checked
    row without media is not tokenized again: its ids and labels came with it (`Row.encoding`). After the rows come
    `fillers`: the rows of those indices again with no label, so no loss (what fills a rank's share of a short last
    batch, `ft.batching`)."""

    def encode(row: Row) -> dict[str, Any]:
        if row.encoding is not None:  # tokenized by the data checks, or kept from an earlier run's
            ids, labels = (torch.from_numpy(a.astype(np.int64)) for a in row.encoding)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "mm_token_type_ids": torch.zeros_like(ids)}
        features = encode_row(row, processor)
        return features if max_length is None else truncate(features, max_length, processor) or features

    def encode_batch(batch: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
        features = [encode(rows[i]) for i in batch["row"]]
        for item, loss in zip(features, batch["loss"], strict=True):
            if not loss:
                item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return {"features": features}

    dataset = datasets.Dataset.from_dict({"row": [*range(len(rows)), *fillers],
                                          "loss": [True] * len(rows) + [False] * len(fillers)})
    dataset.set_transform(encode_batch)
    return dataset


def collate_items(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` for the items of `encoded_dataset`."""
    return collate([item["features"] for item in items], pad_token_id)
