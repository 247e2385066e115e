"""Greedy decoding with and without Gemma 4's MTP drafter (`gemma4-assistant`), through llama.cpp's C API.

Protocol (ft's own implementation of what llama.cpp's `common/speculative.cpp` draft-mtp path does): the drafter
context shares the target's KV cache (`ctx_other`) and reads the target's last hidden state (`h_nextn`, exported by
the target for every row). Each step drafts k tokens from (last token, its hidden state), all at the same position,
then the target verifies [last, d1..dk] in one batch; the longest prefix that matches the target's own greedy choice
is kept, plus the target's next token, and the target's KV cache beyond it is dropped. With greedy target and
greedy drafter the output equals plain greedy decoding by construction, up to rounding: on a GPU the one-row and
the verify-batch kernels add in different orders, which can break near-ties differently (`mismatches` says where,
and by how much the top token led there).

Both modes use the same low-level calls so that their speeds compare fairly.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from eval.runner import EvalError, LlamaModel


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float  # generation only, after the prompt
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit per token, when asked for

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


class _Model(LlamaModel):
    """A model and its context (`eval.runner.LlamaModel`), with the decoding steps of greedy and MTP decoding."""

    def argmax(self, row: int, margins: list[float] | None = None) -> int:
        """The top token of a row; with `margins`, also append its lead over the runner-up (in logits)."""
        from quantize.llama_lib import llama_cpp as L

        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        if margins is not None:
            second, first = np.partition(logits, -2)[-2:]
            margins.append(float(first - second))
        return int(logits.argmax())

    def hidden(self, row: int) -> np.ndarray:
        from quantize.llama_lib import llama_cpp_ext as X

        return np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(self.ctx, row), shape=(self.n_embd_out,)).copy()

    def decode(self, tokens: list[int], start: int, logits: str = "last") -> None:
        """Decode tokens at positions start.. (logits for the 'last' row, the 'first' row, or 'all' rows)."""
        from quantize.llama_lib import llama_cpp as L

        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = logits == "all" or i == {"first": 0, "last": len(tokens) - 1}[logits]
            if L.llama_decode(self.ctx, batch) != 0:
                raise EvalError("llama_decode failed (context full or invalid batch)")
        finally:
            L.llama_batch_free(batch)

    def drop_after(self, position: int) -> None:
        from quantize.llama_lib import llama_cpp as L

        L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), 0, position, -1)


class _DraftBatch:
    """A one-row drafter batch carrying both a token and a hidden-state row (llama.cpp's MTP hook batch)."""

    def __init__(self, width: int) -> None:
        from quantize.llama_lib import llama_cpp as L

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
        from quantize.llama_lib import llama_cpp as L

        self.batch.token = ctypes.POINTER(L.llama_token)()  # not ours to free in C
        L.llama_batch_free(self.batch)


class Decoder:
    """A target model, and optionally its MTP drafter, loaded once and used for many prompts (greedy decoding).

    Without a drafter it decodes one token per step (plain decoding). `pad_to=k+1` makes plain decoding run each
    step as a batch of k+1 rows (the token and k fillers, dropped afterwards), the shape of MTP's verify step with k
    drafts: a check that MTP's output differs from plain decoding on a GPU by batch-shape rounding alone.

        with Decoder(Path("model-Q4_K_M.gguf"), n_ctx=256, drafter=Path("drafter.gguf")) as decoder:
            result = decoder([2, 105, 2364], 32)
    """

    def __init__(self, target: Path, n_ctx: int, drafter: Path | None = None, draft_len: int = 3,
                 threads: int | None = None, pad_to: int = 1) -> None:
        from quantize.llama_lib import llama_cpp_ext as X

        threads = threads or os.cpu_count() or 1
        self.draft_len, self.pad_to, self.n_ctx = draft_len, pad_to, n_ctx
        self.main: _Model | None = _Model(target, n_ctx, threads, batch=max(512, pad_to, draft_len + 1))
        self.helper: _Model | None = None
        self.draft_batch: _DraftBatch | None = None
        if drafter is not None:
            try:
                X.llama_set_embeddings_nextn(self.main.ctx, True, False)
                self.helper = _Model(drafter, n_ctx, threads, other=self.main, batch=max(8, draft_len + 1))
                X.llama_set_embeddings_nextn(self.helper.ctx, True, True)
                self.draft_batch = _DraftBatch(self.main.n_embd_out)
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.draft_batch is not None:
            self.draft_batch.free()
            self.draft_batch = None
        if self.helper is not None:
            self.helper.close()
            self.helper = None
        if self.main is not None:
            self.main.close()
            self.main = None

    def __call__(self, prompt: list[int], n_new: int, margins: bool = False,
                 proposals: list[int] | None = None) -> Decoded:
        """Greedy decode n_new tokens after prompt; margins=True also records each token's logit lead over the
        runner-up (slower: leave it off when timing), which tells a real divergence from a near-tie.

        `proposals` (with a drafter): the tokens the verify step is offered in place of the drafter's, by output
        index; given the target's own plain greedy output, every draft is accepted (up to rounding on a GPU), so the
        speed is the best this loop can reach at this draft length. The drafter still runs, for its cost."""
        from quantize.llama_lib import llama_cpp as L

        needed = len(prompt) + n_new + max(self.draft_len, self.pad_to) + 1
        if needed > self.n_ctx:
            raise EvalError(f"prompt of {len(prompt)} tokens + {n_new} new needs a context of {needed} > {self.n_ctx}")
        main, helper = self.main, self.helper
        if main is None:
            raise EvalError("the decoder is closed")
        outside = [t for t in prompt if not 0 <= t < main.n_vocab]
        if outside or not prompt:
            raise EvalError(f"prompt token ids {outside[:5]} are outside the model's vocabulary of {main.n_vocab}"
                            if outside else "empty prompt")
        L.llama_memory_clear(L.llama_get_memory(main.ctx), True)  # the drafter reads the target's cache: no own
        result = Decoded([], 0.0)
        kept = result.margins if margins else None
        main.decode(prompt, 0)
        last = main.argmax(-1, kept)
        hidden = main.hidden(len(prompt) - 1) if helper else None
        out = [last]
        n_past = len(prompt)
        started = time.perf_counter()
        while len(out) < n_new:
            if helper is None:
                fillers = [last] * min(self.pad_to - 1, n_new - len(out))
                main.decode([last, *fillers], n_past, logits="first" if fillers else "last")
                n_past += 1
                if fillers:
                    main.drop_after(n_past)
                last = main.argmax(0 if fillers else -1, kept)
                out.append(last)
                continue
            drafts = _draft(helper, self.draft_batch, last, n_past, hidden, min(self.draft_len, n_new - len(out)))
            if proposals is not None:
                drafts = proposals[len(out) : len(out) + len(drafts)]
            main.decode([last, *drafts], n_past, logits="all")
            row_margins: list[float] | None = [] if margins else None
            choices = [main.argmax(j, row_margins) for j in range(len(drafts) + 1)]
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
                accepted += 1
            if row_margins is not None:
                result.margins.extend(row_margins[: accepted + 1])
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
        del result.margins[n_new:]
        return result


def tokens_per_second(runs: list[Decoded]) -> float:
    """Timed tokens over timed seconds, across runs."""
    return sum(d.timed_tokens for d in runs) / sum(d.seconds for d in runs)


def mtp_summary(plain: list[Decoded], mtp: list[Decoded]) -> dict[str, Any]:
    """Speed with MTP off and on over the same prompts, the drafter's acceptance, and whether outputs agree.

    >>> s = mtp_summary([Decoded([1, 2, 3], 1.0)], [Decoded([1, 2, 3], 0.5, drafted=4, accepted=1, steps=2)])
    >>> s["plain_tokens_per_second"], s["mtp_tokens_per_second"], s["acceptance_rate"], s["identical"]
    (2.0, 4.0, 0.25, True)
    """
    drafted, accepted, steps = (sum(getattr(d, k) for d in mtp) for k in ("drafted", "accepted", "steps"))
    return {
        "plain_tokens_per_second": tokens_per_second(plain),
        "mtp_tokens_per_second": tokens_per_second(mtp),
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted": accepted / steps if steps else 0.0,
        "identical": all(a.tokens == b.tokens for a, b in zip(plain, mtp, strict=True)),
    }


def decode_all(target: Path, prompts: list[list[int]], n_new: int, drafter: Path | None = None, draft_len: int = 3,
               threads: int | None = None, margins: bool = False, pad_to: int = 1,
               proposals: list[list[int]] | None = None) -> list[Decoded]:
    """Greedy decode every prompt with one loaded model (and drafter: MTP decoding), after one warm-up run that
    pays the one-time costs (kernel loading, graph allocation) outside the timings. `proposals`, one list per
    prompt, replace the drafter's tokens (`Decoder.__call__`)."""
    n_ctx = max(len(p) for p in prompts) + n_new + max(draft_len, pad_to) + 8
    offered = proposals or [None] * len(prompts)
    with Decoder(target, n_ctx, drafter, draft_len, threads, pad_to) as decoder:
        decoder(prompts[0], min(n_new, 4))
        return [decoder(p, n_new, margins, o) for p, o in zip(prompts, offered, strict=True)]


def divergence(plain: Decoded, mtp: Decoded) -> int | None:
    """Index of the first token where two greedy outputs differ, or None when they are identical.

    >>> divergence(Decoded([1, 2, 3], 0.0), Decoded([1, 2, 4], 0.0))
    2
    >>> divergence(Decoded([1, 2], 0.0), Decoded([1, 2], 0.0)) is None
    True
    """
    for index, (a, b) in enumerate(zip(plain.tokens, mtp.tokens)):
        if a != b:
            return index
    return None if len(plain.tokens) == len(mtp.tokens) else min(len(plain.tokens), len(mtp.tokens))


def mismatches(target: Path, prompts: list[list[int]], plain: list[Decoded], mtp: list[Decoded], drafter: Path,
               draft_len: int, threads: int | None = None) -> list[dict[str, float]]:
    """For each prompt whose MTP output differs from plain decoding: at which token, and by how much the chosen
    token led the runner-up there in each mode (in logits).

    The differing prompts are decoded again in both modes with margins on (same lengths, so the same batch shapes).
    A lead near zero is a near-tie that rounding decides: GPU kernels for a one-row batch and for the verify batch
    add in different orders. Over many tokens those roundings also pile up in the KV cache, so later flips can show
    larger leads; plain decoding padded to the verify width (`Decoder(pad_to=...)`) tells whether batch shape alone
    explains them.
    """
    differing = [(n, index) for n, (a, b) in enumerate(zip(plain, mtp, strict=True))
                 if (index := divergence(a, b)) is not None]
    if not differing:
        return []
    again = [prompts[n] for n, _ in differing]
    n_new = len(plain[differing[0][0]].tokens)
    again_plain = decode_all(target, again, n_new, threads=threads, margins=True)
    again_mtp = decode_all(target, again, n_new, drafter, draft_len, threads, margins=True)
    return [{"prompt": n, "token": index, "plain_margin": a.margins[index], "mtp_margin": b.margins[index]}
            for (n, index), a, b in zip(differing, again_plain, again_mtp, strict=True)]


def _draft(helper: _Model, batch: _DraftBatch, token: int, position: int, hidden: np.ndarray, k: int) -> list[int]:
    """k greedy drafter tokens; every step sits at the same position (the drafter reads the target's KV)."""
    from quantize.llama_lib import llama_cpp as L

    drafts = []
    for _ in range(k):
        batch.fill(token, position, hidden)
        if L.llama_decode(helper.ctx, batch.batch) != 0:
            raise EvalError("drafter llama_decode failed")
        token = helper.argmax(0)
        hidden = helper.hidden(0)
        drafts.append(token)
    return drafts
