"""Greedy decoding with and without Gemma 4's MTP drafter (`gemma4-assistant`), through llama.cpp's C API.

Protocol (ft's own implementation of what llama.cpp's `common/speculative.cpp` draft-mtp path does): the drafter
context shares the target's KV cache (`ctx_other`) and reads the target's last hidden state (`h_nextn`, exported by
the target for every row). Each step drafts k tokens from (last token, its hidden state), all at the same position,
then the target verifies [last, d1..dk] in one batch; the longest prefix that matches the target's own greedy choice
is kept, plus the target's next token, and the target's KV cache beyond it is dropped. With greedy target and
greedy drafter the output equals plain greedy decoding by construction; `decode` reports whether it did.

Both modes use the same low-level calls so that their speeds compare fairly.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.runner import EvalError, _quiet, check_gguf


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float  # generation only, after the prompt
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def timed_tokens(self) -> int:
        """Tokens produced inside the timed loop (the first one comes from the prompt pass, before the timer)."""
        return max(len(self.tokens) - 1, 0)

    @property
    def tokens_per_second(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


def _backend_init() -> None:
    """Initialise llama.cpp's backends once per process, sharing llama_cpp.Llama's own once-only flag.

    A second initialisation was followed by a crash in model loading with a CUDA build on the H100 machine.
    """
    import llama_cpp as L

    if not getattr(L.Llama, "_Llama__backend_initialized", False):
        L.llama_backend_init()
        L.Llama._Llama__backend_initialized = True


class _Model:
    """A model and one context over it, freed together."""

    def __init__(self, path: Path, n_ctx: int, threads: int, other: _Model | None = None, batch: int = 512) -> None:
        import llama_cpp as L

        check_gguf(path)
        _quiet()
        _backend_init()
        model_params = L.llama_model_default_params()
        model_params.n_gpu_layers = 999  # all layers on the GPU when llama.cpp was built with one; ignored on CPU
        model_params.use_extra_bufts = False  # see eval.runner.plain_cpu_kernels
        self.model = L.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise EvalError(f"{path}: llama.cpp cannot load it")
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = batch
        params.n_ubatch = batch
        params.n_threads = params.n_threads_batch = threads
        if other is not None:
            params.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
            params.ctx_other = other.ctx
            params.n_rs_seq = 0
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise EvalError(f"{path}: llama.cpp cannot create a context for it" + (" as an MTP drafter" if other else ""))
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_embd_out = L.llama_model_n_embd_out(self.model)

    def argmax(self, row: int) -> int:
        import llama_cpp as L

        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        return int(logits.argmax())

    def hidden(self, row: int) -> np.ndarray:
        from llama_cpp import llama_cpp_ext as X

        return np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(self.ctx, row), shape=(self.n_embd_out,)).copy()

    def decode(self, tokens: list[int], start: int, logits: str = "last") -> None:
        """Decode tokens at positions start.. (logits for the last row, or 'all' rows)."""
        import llama_cpp as L

        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = logits == "all" or i == len(tokens) - 1
            if L.llama_decode(self.ctx, batch) != 0:
                raise EvalError("llama_decode failed (context full or invalid batch)")
        finally:
            L.llama_batch_free(batch)

    def drop_after(self, position: int) -> None:
        import llama_cpp as L

        L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), 0, position, -1)

    def close(self) -> None:
        import llama_cpp as L

        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


class _DraftBatch:
    """A one-row drafter batch carrying both a token and a hidden-state row (llama.cpp's MTP hook batch)."""

    def __init__(self, width: int) -> None:
        import llama_cpp as L

        self.batch = L.llama_batch_init(1, width, 1)
        # llama_batch_init allocates no token array when it allocates embeddings; attach one owned by Python.
        self.token = (L.llama_token * 1)()
        self.batch.token = ctypes.cast(self.token, ctypes.POINTER(L.llama_token))
        self.width = width

    def fill(self, token: int, position: int, hidden: np.ndarray) -> None:
        batch = self.batch
        batch.n_tokens = 1
        self.token[0] = token
        batch.pos[0] = position
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = True
        row = np.ascontiguousarray(hidden, dtype=np.float32)
        ctypes.memmove(batch.embd, row.ctypes.data, self.width * 4)

    def free(self) -> None:
        import llama_cpp as L

        self.batch.token = ctypes.POINTER(L.llama_token)()  # not ours to free in C
        L.llama_batch_free(self.batch)


def decode(target: Path, prompt: list[int], n_new: int, drafter: Path | None = None, draft_len: int = 3,
           threads: int | None = None) -> Decoded:
    """Greedy decode n_new tokens after prompt; with a drafter, through MTP speculative decoding."""
    from llama_cpp import llama_cpp_ext as X

    threads = threads or os.cpu_count() or 1
    n_ctx = len(prompt) + n_new + draft_len + 8
    main = _Model(target, n_ctx, threads)
    helper = None
    draft_batch = None
    try:
        if drafter is not None:
            X.llama_set_embeddings_nextn(main.ctx, True, False)
            helper = _Model(drafter, n_ctx, threads, other=main, batch=max(8, draft_len + 1))
            X.llama_set_embeddings_nextn(helper.ctx, True, True)
            draft_batch = _DraftBatch(main.n_embd_out)
        main.decode(prompt, 0)
        last = main.argmax(-1)
        hidden = main.hidden(len(prompt) - 1) if helper else None
        out = [last]
        n_past = len(prompt)
        result = Decoded([], 0.0)
        started = time.perf_counter()
        while len(out) < n_new:
            if helper is None:
                main.decode([last], n_past)
                n_past += 1
                last = main.argmax(-1)
                out.append(last)
                continue
            drafts = _draft(helper, draft_batch, last, n_past, hidden, min(draft_len, n_new - len(out)))
            main.decode([last, *drafts], n_past, logits="all")
            choices = [main.argmax(j) for j in range(len(drafts) + 1)]
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
                accepted += 1
            hidden = main.hidden(accepted)
            out.extend(choices[: accepted + 1])
            n_past += 1 + accepted
            main.drop_after(n_past)
            last = choices[accepted]
            result.drafted += len(drafts)
            result.accepted += accepted
            result.steps += 1
        result.seconds = time.perf_counter() - started
        result.tokens = out[:n_new]
        return result
    finally:
        if draft_batch is not None:
            draft_batch.free()
        if helper is not None:
            helper.close()
        main.close()


def _draft(helper: _Model, batch: _DraftBatch, token: int, position: int, hidden: np.ndarray, k: int) -> list[int]:
    """k greedy drafter tokens; every step sits at the same position (the drafter reads the target's KV)."""
    import llama_cpp as L

    drafts = []
    for _ in range(k):
        batch.fill(token, position, hidden)
        if L.llama_decode(helper.ctx, batch.batch) != 0:
            raise EvalError("drafter llama_decode failed")
        token = helper.argmax(0)
        hidden = helper.hidden(0)
        drafts.append(token)
    return drafts
