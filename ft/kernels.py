"""Fused kernels in Gemma 4's decoder, on CUDA: torch's own fused RMSNorm and Liger-Kernel's GeGLU MLP.

transformers' Gemma 4 RMSNorm upcasts to float32 and autograd keeps that float32 copy of its input for the backward
pass (4 bytes per element, five norms a layer); the MLP keeps gelu(gate) and gelu(gate) * up besides gate and up.
The fused kernels compute the same functions keeping only the bf16 input and one float per row (RMSNorm), and gate
and up (GeGLU), which is most of what a layer holds while it is recomputed under gradient checkpointing. The norm is
torch's `rms_norm` (one CUDA kernel each way, the same float32 arithmetic as transformers' and as Liger's "gemma"
casting) rather than Liger's, whose Python launch costs several times the host time a call of torch's kernel, in a
step that the host bounds (measured in docs/BENCHMARKS.md, "Training speed on users' data"). liger-kernel's own
Gemma 4 patch targets `modeling_gemma4`, whose classes `gemma4_unified` does not use, so ft applies the GeGLU kernel to
the model's modules itself. Triton runs on CUDA only: CPUs keep transformers' code, and `tests/test_gpu.py` checks the
two against each other on the GPU.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # Gemma 4's norm scales by the weight itself (no 1 + w offset), as torch's does.
    return torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.eps)


def _geglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_geglu

    return self.down_proj(liger_geglu(self.gate_proj(x), self.up_proj(x)))


def use_fused_kernels(model: nn.Module) -> int:
    """Swap every scaled RMSNorm and every decoder MLP of `model` to the fused kernels; returns how many modules.

    The scale-free value norm stays as it is. The MLP's activation must be the
    tanh-approximated GELU that Liger's GeGLU computes.
    """
    swapped = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and getattr(module, "with_scale", False):
            module.forward = types.MethodType(_rms_norm_forward, module)
            swapped += 1
        elif kind == "Gemma4UnifiedTextMLP":
            if module.config.hidden_activation != "gelu_pytorch_tanh":
                continue
            module.forward = types.MethodType(_geglu_forward, module)
            swapped += 1
    return swapped
