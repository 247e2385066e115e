"""A 4-bit base weight dequantised to a dense matrix: bitsandbytes' own CUDA kernels, called without its Python layers.

Each training step of the hf path dequantises every one of the 12B's 328 NF4 projections three times (the forward, the
checkpoint's recomputation, the backward). bitsandbytes' `dequantize_4bit` reaches its two CUDA kernels (the nested
absmax's and the weight's) through its Python checks and two `torch.library` custom-op dispatches, host time in a
step that the host bounds (docs/BENCHMARKS.md, "Training speed on users' data"). On CUDA this calls the same two
kernels of bitsandbytes' library, with the same arguments bitsandbytes' CUDA backend passes them, straight through
ctypes (as unsloth's `fast_dequantize` does); elsewhere, and for any layout it does not cover, it is bitsandbytes'
`dequantize_4bit` itself. `tests/test_gpu.py` checks the two equal bit for bit on the GPU.

    >>> import torch
    >>> dequantize(torch.nn.Linear(3, 2).weight, torch.float16).dtype
    torch.float16
"""

from __future__ import annotations

from typing import Any

import torch

_KERNELS: dict[str, Any] = {}  # bitsandbytes' library, once loaded


def _library() -> Any:
    if not _KERNELS:
        from bitsandbytes.cextension import lib

        import bitsandbytes.backends.cuda.ops  # noqa: F401  (declares the kernels' ctypes argument types)

        _KERNELS["lib"] = lib
        _KERNELS["weight"] = {dtype: getattr(lib, f"cdequantize_blockwise_{name}_nf4") for dtype, name in
                              ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"))}
    return _KERNELS


def _direct(weight: torch.Tensor, state: Any, dtype: torch.dtype) -> bool:
    """Whether this call is one the direct path covers: NF4 on the current CUDA device, a nested absmax of
    float32, into a 16/32-bit float."""
    return (weight.is_cuda and state.quant_type == "nf4" and state.nested and state.state2.dtype == torch.float32
            and dtype in (torch.bfloat16, torch.float16, torch.float32) and state.dtype == dtype
            and weight.device.index == torch.cuda.current_device())


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base layer's `weight` as a dense [out, in] matrix in `dtype` (dequantised when it is 4-bit)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.to(dtype)
    if not _direct(weight, state, dtype):
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
    kernels, nested, stream = _library(), state.state2, torch._C._cuda_getCurrentRawStream(weight.device.index)
    absmax = torch.empty(state.absmax.shape, dtype=torch.float32, device=weight.device)
    kernels["lib"].cdequantize_blockwise_fp32(nested.code.data_ptr(), state.absmax.data_ptr(),
                                             nested.absmax.data_ptr(), absmax.data_ptr(), nested.blocksize,
                                             state.absmax.numel(), stream)
    absmax += state.offset
    out = torch.empty(state.shape, dtype=dtype, device=weight.device)
    kernels["weight"][dtype](None, weight.data_ptr(), absmax.data_ptr(), out.data_ptr(), state.blocksize, out.numel(),
                             stream)
    return out
