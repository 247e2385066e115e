"""K-quants and IQ-quants of a GGUF language model, made by llama.cpp itself through llama-cpp-python's C API.

`quantize` calls `llama_model_quantize` in-process: the same code as llama.cpp's `llama-quantize` tool, with the
importance matrix handed over as an array of already-normalised per-channel values (see `quantize.imatrix`) and
per-tensor type overrides as (regex, type) pairs. llama.cpp's messages are captured, so a failure surfaces as one
`QuantizeError` saying why, and the output appears under its final name only when it is complete.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from ft.tiny import save_tiny
    >>> from quantize.gguf_lm import write_language_model
    >>> work = Path(tempfile.mkdtemp())
    >>> f32 = write_language_model(save_tiny(work / "tiny"), work / "tiny-F32.gguf", "F32")
    >>> quantize(f32, work / "tiny-Q4_K_M.gguf", "Q4_K_M", threads=2).name
    'tiny-Q4_K_M.gguf'
    >>> quantize(f32, work / "tiny-IQ2_XXS.gguf", "IQ2_XXS")
    Traceback (most recent call last):
    ...
    quantize.llama_quant.QuantizeError: IQ2_XXS needs an importance matrix: ...
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ft.atomic import staged_file
from ft.errors import FtError
from ft.quant_types import NEEDS_IMATRIX, QUANT_TYPES
from quantize.llama_lib import llama_cpp

log = logging.getLogger(__name__)

# Tensor types a per-tensor override may name (ggml types that ggml_quantize_chunk can produce).
TENSOR_TYPES: dict[str, int] = {
    name: int(GGMLQuantizationType[name])
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    )
}

# ggml asserts (aborting the whole process) when these types get no imatrix row. llama.cpp's own pre-check skips
# the embedding and output tables, and no imatrix covers them, so an override must never send them there.
_ABORTS_WITHOUT_IMATRIX = frozenset({"IQ1_S", "IQ2_XXS", "IQ2_XS"})
_UNCOVERED_TENSORS = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")

# enum ggml_log_level in ggml.h (llama-cpp-python's _logger still uses an older numbering).
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5


class QuantizeError(FtError):
    """A quantization cannot be made: unknown type, missing importance matrix, or llama.cpp refused the input."""


def quantize(
    src: Path,
    dst: Path,
    qtype: str,
    imatrix: dict[str, np.ndarray] | None = None,
    tensor_types: dict[str, str] | None = None,
    threads: int | None = None,
) -> Path:
    """Quantize the GGUF `src` (F32/F16/BF16) to `qtype`, written atomically to `dst`; returns `dst`.

    `imatrix` maps weight names (`blk.3.attn_q.weight`) to normalised per-input-channel values
    (`quantize.imatrix.normalized`). `tensor_types` maps regexes searched in tensor names to tensor types
    (`{"token_embd.weight": "Q8_0"}`); the first match wins, as in llama-quantize's `--tensor-type`.
    `threads` defaults to every core.
    """
    qtype = qtype.upper()
    ftype = _ftype(qtype)
    if imatrix is None and qtype in NEEDS_IMATRIX:
        raise QuantizeError(
            f"{qtype} needs an importance matrix: enable export.imatrix (or pass one), "
            "or choose a type that does not need it, such as IQ3_M, IQ4_XS, Q2_K or Q3_K_M"
        )
    overrides = _parse_overrides(tensor_types or {}, imatrix is not None)
    if not Path(src).is_file():
        raise QuantizeError(f"cannot quantize {src}: no such file")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    # The C side only borrows these buffers, so they must stay referenced until the call returns.
    keep_alive: list[object] = []
    if imatrix is not None:
        params.imatrix = _imatrix_array(imatrix, keep_alive)
    if overrides:
        params.tt_overrides = _override_array(overrides, keep_alive)

    backend_init()
    with staged_file(Path(dst)) as tmp, _captured_llama_log() as messages:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {qtype}: {_error_text(messages)}")
    return Path(dst)


def backend_init() -> None:
    """Initialise llama.cpp's backends once per process, sharing llama_cpp.Llama's own once-only flag, so that
    quantizing and then loading models in one process (`ft eval` makes missing quants first) initialises once.

    The crashes first blamed on a second initialisation (CUDA build, 12B model) came from how llama.cpp's libraries
    were loaded (see quantize/llama_lib.py); initialising once is still what llama.cpp asks for.
    """
    if not getattr(llama_cpp.Llama, "_Llama__backend_initialized", False):
        llama_cpp.llama_backend_init()
        llama_cpp.Llama._Llama__backend_initialized = True


def _ftype(qtype: str) -> int:
    if qtype not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {qtype!r}; known: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[qtype]


def _parse_overrides(tensor_types: dict[str, str], have_imatrix: bool) -> list[tuple[str, int]]:
    """(pattern, ggml type id) pairs, checked here because llama.cpp would abort the process on some of them."""
    overrides = []
    for pattern, type_name in tensor_types.items():
        name = type_name.upper()
        if name not in TENSOR_TYPES:
            raise QuantizeError(
                f"tensor type override {pattern!r}: unknown tensor type {type_name!r}; known: {', '.join(TENSOR_TYPES)}"
            )
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise QuantizeError(f"tensor type override {pattern!r} is not a valid regular expression: {exc}") from exc
        if name in _ABORTS_WITHOUT_IMATRIX:
            uncovered = [t for t in _UNCOVERED_TENSORS if regex.search(t)]
            if uncovered or not have_imatrix:
                what = f"{uncovered[0]} has no importance matrix" if uncovered else "no importance matrix was given"
                raise QuantizeError(f"tensor type override {pattern!r} -> {name}: {name} needs an importance matrix, "
                                    f"but {what}; pick another type (e.g. IQ4_XS or Q4_K) for these tensors")
        overrides.append((pattern, TENSOR_TYPES[name]))
    return overrides


def _imatrix_array(imatrix: dict[str, np.ndarray], keep_alive: list[object]) -> ctypes.Array:
    """NULL-terminated `llama_model_imatrix_data[]`; llama.cpp copies the values before the call returns."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for entry, (name, values) in zip(entries, imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        keep_alive.append(data)
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    keep_alive.append(entries)
    return entries


def _override_array(overrides: list[tuple[str, int]], keep_alive: list[object]) -> ctypes.Array:
    """`llama_model_tensor_override[]` ending with {NULL, GGML_TYPE_COUNT}, as llama-quantize builds it."""
    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for entry, (pattern, type_id) in zip(entries, overrides):
        entry.pattern = pattern.encode()
        entry.type = type_id
    entries[len(overrides)].type = llama_cpp.GGML_TYPE_COUNT
    keep_alive.append(entries)
    return entries


_sink: list[tuple[int, str]] | None = None


@llama_cpp.llama_log_callback
def _collect_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if _sink is not None:
        _sink.append((level, text.decode("utf-8", errors="replace")))


@contextlib.contextmanager
def _captured_llama_log() -> Iterator[list[tuple[int, str]]]:
    """Route llama.cpp's log (process-wide) into a list for the duration, then back to llama-cpp-python's logger.

    Quantizing logs a line per tensor; that goes to debug logging, and the error lines into the exception.
    """
    global _sink
    messages: list[tuple[int, str]] = []
    _sink = messages
    llama_cpp.llama_log_set(_collect_log, ctypes.c_void_p(0))
    try:
        yield messages
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
        _sink = None
        log.debug("%s", "".join(text for _, text in messages))


def _error_text(messages: list[tuple[int, str]]) -> str:
    """The error-level lines of a llama.cpp log (continuation pieces included), without banner rules."""
    pieces, level = [], 0
    for new_level, text in messages:
        level = level if new_level == _GGML_LOG_CONT else new_level
        if level == _GGML_LOG_ERROR:
            pieces.append(text)
    prefix = "llama_model_quantize: failed to quantize: "
    lines = [line.strip().removeprefix(prefix) for line in "".join(pieces).splitlines()]
    kept = [line for line in lines if line.strip("=")]
    return "; ".join(dict.fromkeys(kept)) or "llama.cpp gave no reason (see debug log)"
