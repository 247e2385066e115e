"""llama.cpp (through llama-cpp-python) as the judge: load a GGUF, score chunks of text, decode greedily.

A file that llama.cpp cannot load is reported as an `EvalError` naming it, not a crash: its header is checked first
(`check_gguf`), since llama.cpp aborts the process on some malformed files instead of raising.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ft.errors import FtError


class EvalError(FtError):
    """A model file cannot be evaluated (unreadable, corrupt, or rejected by llama.cpp)."""


def _quiet() -> None:
    """Silence llama.cpp's C-side logging (it writes straight to stderr otherwise); FT_LLAMA_LOG=1 keeps it."""
    from quantize.llama_lib import llama_cpp

    if os.environ.get("FT_LLAMA_LOG") == "1":
        return

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    _quiet.callback = _drop  # keep a reference: the C library calls it later


class _GGUFParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]  # ggml's struct gguf_init_params


@functools.cache
def _gguf_library() -> ctypes.CDLL:
    """ggml's GGUF parser (in the ggml library that llama-cpp-python ships, which has no Python binding for it)."""
    from quantize.llama_lib import libggml

    libggml.gguf_init_from_file.restype = ctypes.c_void_p
    libggml.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFParams]
    for name in ("gguf_get_n_tensors", "gguf_get_data_offset", "gguf_get_tensor_offset", "gguf_get_tensor_size"):
        getattr(libggml, name).restype = ctypes.c_int64 if name == "gguf_get_n_tensors" else ctypes.c_size_t
        getattr(libggml, name).argtypes = [ctypes.c_void_p] + ([ctypes.c_int64] if "tensor_" in name else [])
    libggml.gguf_free.argtypes = [ctypes.c_void_p]
    return libggml


def check_gguf(path: Path) -> None:
    """Raise EvalError if `path` is not a readable GGUF model file: a header llama.cpp's own parser accepts, with
    at least one tensor, and every tensor's data inside the file.

    ggml's C parser rather than the `gguf` package's reader: the reader builds numpy views of every metadata value,
    which takes seconds at a 262,144-token vocabulary (docs/BENCHMARKS.md#measurements-behind-design-decisions).
    """
    if not path.is_file():
        raise EvalError(f"model file not found: {path}")
    _quiet()
    lib = _gguf_library()
    header = lib.gguf_init_from_file(str(path).encode(), _GGUFParams(True, None))
    if not header:
        raise EvalError(f"{path}: not a valid GGUF file (llama.cpp cannot parse its header)")
    try:
        tensors = lib.gguf_get_n_tensors(header)
        data_end = lib.gguf_get_data_offset(header) + max(
            (lib.gguf_get_tensor_offset(header, i) + lib.gguf_get_tensor_size(header, i) for i in range(tensors)),
            default=0)
    finally:
        lib.gguf_free(header)
    if tensors == 0:
        raise EvalError(f"{path}: not a valid GGUF file (no tensors)")
    if data_end > path.stat().st_size:
        raise EvalError(f"{path}: not a valid GGUF file (its tensor data runs past the end of the file)")


@contextlib.contextmanager
def plain_cpu_kernels() -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (weight repacking, AMX).

    The AMX kernels of llama-cpp-python's CPU build crash the process in llama_decode on quantized weights on the
    KVM guests ft is tested on; the plain kernels are correct everywhere, and GPU offload is unaffected.
    `llama_cpp.Llama` has no parameter for this, so its default-params factory is wrapped while it loads.
    """
    from quantize.llama_lib import llama_cpp

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
    from quantize.llama_lib import llama_cpp

    check_gguf(path)
    _quiet()
    try:
        with plain_cpu_kernels():
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=logits_all,
                vocab_only=vocab_only, n_threads=threads or os.cpu_count(), n_gpu_layers=-1, seed=0, verbose=False,
            )
    except (ValueError, RuntimeError) as exc:
        raise EvalError(f"{path}: llama.cpp cannot load it ({exc})") from None


class LlamaModel:
    """A GGUF model loaded through llama.cpp's C API, all layers on the GPU when llama.cpp was built with one and
    without the extra CPU buffer types (`plain_cpu_kernels`), and one context over it; freed together.

    `batch` tokens go to one llama_decode, computed `ubatch` (default: all of them) at a time, over up to `sequences`
    sequences; `other` makes this context the MTP drafter of `other`'s (it reads that context's KV cache).
    """

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, batch: int = 512,
                 ubatch: int | None = None, sequences: int = 1, other: LlamaModel | None = None) -> None:
        from quantize.llama_lib import llama_cpp as L

        from quantize.llama_quant import backend_init

        check_gguf(path)
        _quiet()
        backend_init()
        model_params = L.llama_model_default_params()
        model_params.n_gpu_layers = 999  # all layers on the GPU when llama.cpp was built with one; ignored on CPU
        model_params.use_extra_bufts = False  # see plain_cpu_kernels
        self.model = L.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise EvalError(f"{path}: llama.cpp cannot load it")
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = batch
        params.n_ubatch = ubatch or batch
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads or os.cpu_count()
        if other is not None:
            params.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
            params.ctx_other = other.ctx
            params.n_rs_seq = 0
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise EvalError(f"{path}: llama.cpp cannot create a context of {n_ctx} tokens for it"
                            + (" as an MTP drafter" if other else ""))
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self.bos = L.llama_vocab_bos(vocab)
        self.n_embd_out = L.llama_model_n_embd_out(self.model)

    def close(self) -> None:
        from quantize.llama_lib import llama_cpp as L

        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def chunks(tokens: list[int], n_ctx: int, bos: int) -> Iterator[list[int]]:
    """Consecutive windows of n_ctx tokens, each starting with BOS in place of its first token, as llama-perplexity
    cuts the text (which starts with BOS itself: `eval.pipeline.evaluation_tokens`)."""
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = tokens[start : start + n_ctx]
        yield [bos, *window[1:]]


class Scorer:
    """A model and a context that score windows of n_ctx tokens the way llama-perplexity does, and ft's way of
    getting at the logits cheaply.

    Like llama-perplexity (tools/perplexity/perplexity.cpp) it asks for logits only at the scored positions, so the
    output layer runs for those rows alone (most of the work at a 262,144-token vocabulary), and it can decode n_seq
    windows per llama_decode as separate sequences (seq_id w, positions 0..n_ctx-1, one KV stream each), as
    llama-perplexity does with n_seq = n_batch / n_ctx. One window per decode is the default: on the CPU, where
    llama.cpp computes 512-token micro-batches either way, four per decode were no faster and held more logits
    (docs/BENCHMARKS.md#measurements-behind-design-decisions). Unlike llama-perplexity, it does
    not ask for the window's last position, whose prediction lies beyond the window. The logits come back as numpy
    views of llama.cpp's output buffer, not copies.
    """

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, n_seq: int = 1) -> None:
        from quantize.llama_lib import llama_cpp as L

        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.llm = LlamaModel(path, n_seq * n_ctx, threads, batch=n_seq * n_ctx, ubatch=min(n_seq * n_ctx, 512),
                              sequences=n_seq)
        self.n_vocab, self.bos = self.llm.n_vocab, self.llm.bos
        self.batch = L.llama_batch_init(n_seq * n_ctx, 0, 1)

    def score(self, windows: Iterable[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For each window, in order: the logits at its scored positions (its second half but the last) [T, V]
        float32, and the tokens they predict [T]. The logits are a view that the next decode overwrites: use them
        before asking for the next window."""
        windows = iter(windows)
        while group := list(itertools.islice(windows, self.n_seq)):
            self._decode(group)
            for seq, window in enumerate(group):
                yield self._logits(seq), np.array(window[self.n_ctx // 2 + 1 :], dtype=np.int64)

    def _decode(self, group: list[list[int]]) -> None:
        from quantize.llama_lib import llama_cpp as L

        first = self.n_ctx // 2
        batch = self.batch
        batch.n_tokens = 0
        L.llama_memory_clear(L.llama_get_memory(self.llm.ctx), True)
        for seq, window in enumerate(group):
            if len(window) != self.n_ctx:
                raise ValueError(f"a window of {len(window)} tokens, not {self.n_ctx}")
            for position, token in enumerate(window):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = first <= position < self.n_ctx - 1
                batch.n_tokens += 1
        if L.llama_decode(self.llm.ctx, batch) != 0:
            raise EvalError("llama_decode failed on an evaluation batch")

    def _logits(self, seq: int) -> np.ndarray:
        """Rows of window `seq` in the output buffer: its scored positions are consecutive outputs of the batch."""
        from quantize.llama_lib import llama_cpp as L

        rows = self.n_ctx - 1 - self.n_ctx // 2
        start = L.llama_get_logits_ith(self.llm.ctx, seq * self.n_ctx + self.n_ctx // 2)
        return np.ctypeslib.as_array(start, shape=(rows, self.n_vocab))

    def close(self) -> None:
        from quantize.llama_lib import llama_cpp as L

        L.llama_batch_free(self.batch)
        self.llm.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def greedy(llm, prompt_tokens: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of a prompt until a stop token or max_tokens."""
    out: list[int] = []
    llm.reset()
    for token in llm.generate(prompt_tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop or len(out) >= max_tokens:
            break
        out.append(int(token))
    return out
