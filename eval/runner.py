"""llama.cpp (through llama-cpp-python) as the judge: load a GGUF, score chunks of text, decode greedily.

A file that llama.cpp cannot load is reported as an `EvalError` naming it, not a crash: the header is read with the
`gguf` package first, since llama.cpp aborts the process on some malformed files instead of raising.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ft.errors import FtError


class EvalError(FtError):
    """A model file cannot be evaluated (unreadable, corrupt, or rejected by llama.cpp)."""


def _quiet() -> None:
    """Silence llama.cpp's C-side logging (it writes straight to stderr otherwise); FT_LLAMA_LOG=1 keeps it."""
    import ctypes

    import llama_cpp

    if os.environ.get("FT_LLAMA_LOG") == "1":
        return

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    _quiet.callback = _drop  # keep a reference: the C library calls it later


def check_gguf(path: Path) -> None:
    """Raise EvalError if `path` is not a readable GGUF model file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise EvalError(f"model file not found: {path}")
    try:
        reader = GGUFReader(path)
        if not reader.tensors:
            raise ValueError("no tensors")
    except Exception as exc:  # GGUFReader raises ValueError, struct.error, IndexError... on damaged files
        raise EvalError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def plain_cpu_kernels() -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (weight repacking, AMX).

    The AMX kernels of llama-cpp-python's CPU build crash the process in llama_decode on quantized weights on the
    KVM guests ft is tested on; the plain kernels are correct everywhere, and GPU offload is unaffected.
    `llama_cpp.Llama` has no parameter for this, so its default-params factory is wrapped while it loads.
    """
    import llama_cpp

    original = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> llama_cpp.llama_model_params:
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original


def load(path: Path, n_ctx: int, logits_all: bool = False, threads: int | None = None, vocab_only: bool = False):
    """A llama.cpp model with a context of n_ctx tokens (all positions' logits kept when logits_all); with
    vocab_only, just its tokenizer (no weights are read)."""
    import llama_cpp

    check_gguf(path)
    _quiet()
    try:
        with plain_cpu_kernels():
            return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=logits_all, vocab_only=vocab_only,
            n_threads=threads or os.cpu_count(), n_gpu_layers=-1, seed=0, verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise EvalError(f"{path}: llama.cpp cannot load it ({exc})") from None


def chunks(tokens: list[int], n_ctx: int, bos: int) -> Iterator[list[int]]:
    """Consecutive windows of n_ctx tokens, each starting with BOS in place of its first token, as llama-perplexity
    cuts the text (which starts with BOS itself: `eval.pipeline.evaluation_tokens`)."""
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = tokens[start : start + n_ctx]
        yield [bos, *window[1:]]


def scored_logits(llm, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Logits at the scored positions of a window (its second half, as llama.cpp) and the tokens they predict."""
    llm.reset()
    llm.eval(window)
    first = len(window) // 2
    logits = np.array(llm.scores[first : len(window) - 1], dtype=np.float32)
    return logits, np.array(window[first + 1 :], dtype=np.int64)


def greedy(llm, prompt_tokens: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of a prompt until a stop token or max_tokens."""
    out: list[int] = []
    llm.reset()
    for token in llm.generate(prompt_tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop or len(out) >= max_tokens:
            break
        out.append(int(token))
    return out
