"""Answer a conversation with an exported GGUF through llama.cpp, as llama-server and Ollama would run it.

The conversation (ft's data format: a string or text / image / audio parts per message) is rendered by the chat
template stored in the GGUF, through llama-cpp-python's Jinja formatter (the one its server uses); each image and
audio placeholder the template writes becomes mtmd's media marker, and llama.cpp's mtmd tokenizes the text around
the media and runs the projector GGUF on them. Generation stops at a token llama.cpp itself treats as the end of
generation, or at the text of a stop parameter (as Ollama's `PARAMETER stop` does), or after `max_tokens`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from eval.runner import EvalError, LlamaModel
from ft.data import load_audio, load_image
from ft.errors import FtError
from ft.sampling import Sampling

# What Gemma 4's chat template writes for a media part (the processor expands it in training; mtmd here).
PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>"}
BATCH = 512  # tokens per llama_decode of the prompt


@dataclass
class Answer:
    """One generated turn: its tokens (the stop token excluded), its text, and whether it ended by itself."""

    prompt_tokens: list[int]  # text tokens of the prompt (media positions are not tokens)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop: str | None = None  # what ended it: the end-of-generation token's text, or a stop string; None: the limit
    end_of_generation: bool = False  # it ended at a token llama.cpp itself stops at (not only at a stop string)


def media_parts(messages: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    """(kind, file) of every image and audio part, in conversation order."""
    return [(part["type"], Path(part["path"])) for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] in PLACEHOLDERS]


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: media parts carry only their type."""
    return [{**m, "content": [{"type": p["type"]} if p["type"] in PLACEHOLDERS else p for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in messages]


def read_media(kind: str, path: Path) -> np.ndarray:
    """An image as (height, width, 3) uint8 RGB, or audio as 16 kHz mono float32, read by ft's own readers (as
    training reads them); FtError naming the file when it is missing, unreadable or empty."""
    if not path.is_file():
        raise FtError(f"{kind} file not found: {path}")
    try:
        if kind == "image":
            return np.ascontiguousarray(np.asarray(load_image(path), dtype=np.uint8))
        samples = np.ascontiguousarray(load_audio(path), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, RuntimeError) as exc:  # soundfile's errors: RuntimeError
        raise FtError(f"unreadable {kind} {path} ({exc})") from None
    if not len(samples):
        raise FtError(f"audio {path} is empty")
    return samples


class ChatModel:
    """A GGUF language model (and its projector, for images and audio) loaded once; `answer` runs one turn."""

    def __init__(self, gguf: Path, projector: Path | None = None, n_ctx: int = 4096,
                 threads: int | None = None) -> None:
        from quantize.llama_lib import llama_cpp as L

        self.gguf, self.projector = gguf, projector
        self.llm = LlamaModel(gguf, n_ctx, threads, batch=BATCH)
        self.n_ctx = n_ctx
        self.vocab = L.llama_model_get_vocab(self.llm.model)
        self.template = self.metadata("tokenizer.chat_template")
        if self.template is None:
            self.close()
            raise FtError(f"{gguf}: no chat template (tokenizer.chat_template) in the GGUF")
        self.mtmd = None
        if projector is not None:
            from llama_cpp import mtmd_cpp as M

            _quiet_mtmd()
            params = M.mtmd_context_params_default()
            params.use_gpu, params.print_timings, params.warmup = True, False, False
            self.mtmd = M.mtmd_init_from_file(str(projector).encode(), self.llm.model, params)
            if not self.mtmd:
                self.close()
                raise FtError(f"{projector}: llama.cpp's mtmd cannot load this projector for {gguf.name}")

    def metadata(self, key: str) -> str | None:
        from quantize.llama_lib import llama_cpp as L

        size = L.llama_model_meta_val_str(self.llm.model, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        L.llama_model_meta_val_str(self.llm.model, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8")

    def piece_bytes(self, token: int) -> bytes:
        """A token's bytes (a byte token may hold part of a character), control tokens written out."""
        from quantize.llama_lib import llama_cpp as L

        buffer = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:n]

    def piece(self, token: int) -> str:
        return self.piece_bytes(token).decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """The id of a token whose whole text is `text` (a control token such as `<turn|>`), else None."""
        tokens = self.tokenize(text)
        return tokens[0] if len(tokens) == 1 else None

    def tokenize(self, text: str) -> list[int]:
        """Text to tokens, control tokens parsed, nothing added (the template writes <bos> itself)."""
        from quantize.llama_lib import llama_cpp as L

        raw = text.encode("utf-8")
        out = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), out, len(out), False, True)
        return list(out[:n])

    def is_end(self, token: int) -> bool:
        """Whether llama.cpp itself ends generation at this token (llama-server and Ollama stop there)."""
        from quantize.llama_lib import llama_cpp as L

        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for the model's next turn, by the GGUF's own chat template."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        from quantize.llama_lib import llama_cpp as L

        formatter = Jinja2ChatFormatter(self.template, eos_token=self.piece(L.llama_vocab_eos(self.vocab)),
                                        bos_token=self.piece(self.llm.bos), add_generation_prompt=True)
        return formatter(messages=for_template(messages)).prompt

    def answer(self, messages: list[dict[str, Any]], sampling: Sampling = Sampling(), max_tokens: int = 512,
               stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Stream the text of the model's next turn, piece by piece; the finished turn is then `self.last`."""
        self.last = Answer(self._prompt(messages))
        yield from self._generate(self.last, sampling, max_tokens, stop)

    def _prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Evaluate the rendered conversation into a fresh KV cache; returns its text tokens."""
        from quantize.llama_lib import llama_cpp as L

        L.llama_memory_clear(L.llama_get_memory(self.llm.ctx), True)
        text, media = self.render(messages), media_parts(messages)
        if not media:
            tokens = self.tokenize(text)
            self._check_room(len(tokens))
            for start in range(0, len(tokens), BATCH):
                self._decode(tokens[start : start + BATCH], start)
            self.position = len(tokens)
            return tokens
        if self.mtmd is None:
            raise FtError(f"the conversation has {media[0][0]} ({media[0][1]}), but no projector was loaded "
                          f"for {self.gguf.name}")
        return self._prompt_with_media(text, media)

    def _prompt_with_media(self, text: str, media: list[tuple[str, Path]]) -> list[int]:
        from llama_cpp import mtmd_cpp as M
        from quantize.llama_lib import llama_cpp as L

        marker = M.mtmd_default_marker().decode()
        written = [kind for _, kind in sorted(_find_all(text, PLACEHOLDERS))]
        if written != [kind for kind, _ in media]:
            raise FtError(f"{self.gguf.name}: the chat template wrote media placeholders {written}, but the "
                          f"conversation has {[kind for kind, _ in media]}")
        for placeholder in PLACEHOLDERS.values():
            text = text.replace(placeholder, marker)
        bitmaps = [self._bitmap(kind, path) for kind, path in media]
        chunks = M.mtmd_input_chunks_init()
        try:
            prompt = M.mtmd_input_text()
            raw = text.encode("utf-8")
            prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = raw, len(raw), False, True
            array = (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if M.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(prompt), array, len(bitmaps)) != 0:
                raise FtError(f"{self.projector}: mtmd could not tokenize the prompt with its media")
            self._check_room(M.mtmd_helper_get_n_pos(chunks))
            tokens = []
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    pointer = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    tokens += [pointer[j] for j in range(count.value)]
            end = L.llama_pos(0)
            if M.mtmd_helper_eval_chunks(self.mtmd, self.llm.ctx, chunks, 0, 0, BATCH, True, ctypes.byref(end)):
                raise EvalError(f"{self.projector}: llama.cpp could not evaluate the prompt with its media")
            self.position = end.value
            return tokens
        finally:
            M.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                M.mtmd_bitmap_free(bitmap)

    def _bitmap(self, kind: str, path: Path) -> Any:
        """An mtmd bitmap of an image (RGB) or audio clip (16 kHz mono), read as training reads them."""
        from llama_cpp import mtmd_cpp as M

        supported = M.mtmd_support_vision if kind == "image" else M.mtmd_support_audio
        if not supported(self.mtmd):
            raise FtError(f"{self.projector}: this projector has no {kind} encoder ({path})")
        data = read_media(kind, path)
        if kind == "image":
            height, width, _ = data.shape
            return M.mtmd_bitmap_init(width, height, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        return M.mtmd_bitmap_init_from_audio(len(data), data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))

    def _check_room(self, positions: int) -> None:
        if positions >= self.n_ctx:
            raise FtError(f"the conversation takes {positions} positions, more than the context of {self.n_ctx}")

    def _decode(self, tokens: list[int], start: int) -> None:
        from quantize.llama_lib import llama_cpp as L

        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            if L.llama_decode(self.llm.ctx, batch) != 0:
                raise EvalError(f"{self.gguf.name}: llama_decode failed")
        finally:
            L.llama_batch_free(batch)

    def _sampler(self, sampling: Sampling) -> Any:
        from quantize.llama_lib import llama_cpp as L

        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if sampling.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(sampling.top_k))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(sampling.top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(sampling.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(sampling.seed))
        return chain

    def _generate(self, answer: Answer, sampling: Sampling, max_tokens: int, stop: tuple[str, ...]) -> Iterator[str]:
        from quantize.llama_lib import llama_cpp as L

        sampler = self._sampler(sampling)
        pending = b""  # bytes of a character split across tokens
        try:
            while len(answer.tokens) < max_tokens:
                token = L.llama_sampler_sample(sampler, self.llm.ctx, -1)
                if self.is_end(token):
                    answer.stop, answer.end_of_generation = self.piece(token), True
                    break
                answer.tokens.append(token)
                pending += self.piece_bytes(token)
                try:
                    text, pending = pending.decode("utf-8"), b""
                except UnicodeDecodeError:  # wait for the rest of the character, unless it cannot come
                    text = ""
                    if len(pending) >= 4:
                        text, pending = pending.decode("utf-8", errors="replace"), b""
                answer.text += text
                if hit := next((s for s in stop if s in answer.text), None):
                    answer.stop = hit
                    answer.text = answer.text[: answer.text.index(hit)]
                    break
                yield text
                self._check_room(self.position + 1)
                self._decode([token], self.position)
                self.position += 1
        finally:
            L.llama_sampler_free(sampler)

    def close(self) -> None:
        if getattr(self, "mtmd", None):
            from llama_cpp import mtmd_cpp as M

            M.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_mtmd() -> None:
    """Silence mtmd's logging as `eval.runner` silences llama.cpp's (FT_LLAMA_LOG=1 keeps it)."""
    from llama_cpp import mtmd_cpp as M
    from quantize.llama_lib import llama_cpp as L

    if os.environ.get("FT_LLAMA_LOG") == "1":
        return
    _quiet_mtmd.callback = L.llama_log_callback(lambda level, text, user_data: None)  # the C side keeps calling it
    M.mtmd_log_set(_quiet_mtmd.callback, None)
    M.mtmd_helper_log_set(_quiet_mtmd.callback, None)


def _find_all(text: str, placeholders: dict[str, str]) -> list[tuple[int, str]]:
    """(offset, kind) of every placeholder in the text."""
    found = []
    for kind, placeholder in placeholders.items():
        start = text.find(placeholder)
        while start >= 0:
            found.append((start, kind))
            start = text.find(placeholder, start + 1)
    return found
