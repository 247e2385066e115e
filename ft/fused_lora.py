"""One autograd node per LoRA projection: the base matmul and the low-rank update in one forward and one backward.

peft's LoRA layer runs its frozen base (bitsandbytes' 4-bit matmul: its own autograd node), clones the result, then
`lora_B(lora_A(x)) * scaling` and an add: five autograd nodes, a copy of the output and, under autocast, casts of x
and of both float32 LoRA weights, for each of the 328 projections of the 12B in each of a checkpointed step's three
passes. ft's hf step is bound by that host work, not by the GPU ("Training speed on users' data" in
docs/BENCHMARKS.md), so ft runs each projection as one `torch.autograd.Function` whose backward is written out:

    y  = x W^T + s (x A^T) B^T                 W dequantised from NF4 in the forward and again in the backward
    dx = g W + s (g B) A      dA = s (g B)^T x      dB = s g^T (x A^T)

It keeps x and x A^T (peft keeps x, a cast copy of x and x A^T) and computes in autocast's dtype (bfloat16 in
training, as peft's matmuls do there), with A and B cast to it once per optimizer step rather than in every pass,
and the base weight dequantised by bitsandbytes' kernels without its Python layers (`ft.nf4`); the LoRA gradients
come back in the weights' own float32, written so by the matmul itself on CUDA. peft and
bitsandbytes have no such path; unsloth's `fast_lora` does the same inside unsloth (read, not copied), which is
why it is written here. What it cannot express keeps peft's forward: dropout on the LoRA input, DoRA and other
variants, several active adapters, a merged or disabled adapter, and single-token inputs (generation, where
bitsandbytes' own matrix-vector kernel is faster than dequantising).

    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> fuse_lora_projections(model)
    1
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ft.nf4 import dequantize


def _compute_copies(module: nn.Module, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A and B in the compute dtype, cast once per optimizer step rather than in each of a step's
    three passes: kept on the module, keyed by the weights' version counters, which every in-place update (the
    optimizer's, a checkpoint's load) advances. In their own dtype they are the weights themselves."""
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if a.dtype == dtype and b.dtype == dtype:
        return a, b
    key = (name, dtype, a._version, b._version)
    cached = module.__dict__.get("_ft_compute_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, a.to(dtype), b.to(dtype))
        module.__dict__["_ft_compute_copies"] = cached
    return cached[1], cached[2]


def _weight_grad(m1: torch.Tensor, m2: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * m1 @ m2 in `dtype`; on CUDA the matmul writes `dtype` itself (no separate cast kernel)."""
    if m1.is_cuda and m1.dtype != dtype:
        return torch.mm(m1, m2, out_dtype=dtype).mul_(scale)
    return torch.mm(m1, m2).mul_(scale).to(dtype)


class _LoraProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_: torch.Tensor, b_: torch.Tensor,
                base: nn.Module, scale: float) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        x = x.to(a_.dtype)
        rows = x.reshape(-1, x.shape[-1])
        out = rows @ dequantize(base.weight, x.dtype).t()
        xa = rows @ a_.t()
        out.addmm_(xa, b_.t(), alpha=scale)
        if base.bias is not None:
            out += base.bias.to(x.dtype)
        ctx.save_for_backward(x, xa)  # the activations, through the checkpoint's hooks; the weights below are not
        ctx.weights, ctx.base, ctx.scale = (a, b, a_, b_), base, scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa = ctx.saved_tensors
        (a, b, a_, b_), base, scale = ctx.weights, ctx.base, ctx.scale
        rows = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
        gb = g @ b_  # [tokens, r], shared by dx and dA
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = g @ dequantize(base.weight, x.dtype)
            dx.addmm_(gb, a_, alpha=scale)
            dx = dx.view(x.shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            da = _weight_grad(gb.t(), rows, scale, a.dtype)
        if ctx.needs_input_grad[2]:
            db = _weight_grad(g.t(), xa, scale, b.dtype)
        return dx, da, db, None, None, None, None


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward through `_LoraProjection`, or peft's own where the fused one does not apply."""
    active = self.active_adapters
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or x.numel() == x.shape[-1]
            or active[0] not in self.lora_A):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    # autocast would run peft's matmuls in its dtype: so does this
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    a_, b_ = _compute_copies(self, name, dtype)
    return _LoraProjection.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, a_, b_, self.base_layer,
                                 self.scaling[name])


def fuse_lora_projections(model: nn.Module) -> int:
    """Give every plain LoRA projection of a peft model the fused forward; returns how many.

    Projections with dropout or a LoRA variant (DoRA) keep peft's forward for good; the rest fall back to it per
    call (see the module docstring).
    """
    fused = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and isinstance(module.lora_A, nn.ModuleDict)):
            continue
        if not isinstance(module.base_layer, nn.Linear):  # bitsandbytes' Linear4bit is an nn.Linear too
            continue
        if any(not isinstance(d, nn.Identity) for d in module.lora_dropout.values()) or module.lora_variant:
            continue
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused
