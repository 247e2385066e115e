"""The decoder's layers compiled with torch.compile, on the hf backend when `train.compile_layers` asks: fewer, fused
kernels a step.

Eager, a training step at the 12B shape launches about 14,000 kernels from Python (the LoRA around each 4-bit
projection, the norms, rotary embeddings, residual adds, each in the forward, the recomputation and the backward),
and at a few thousand tokens the GPU waits on those launches more than it computes
(docs/BENCHMARKS.md#training-speed-on-users-data). Compiling each decoder layer ("regional compilation") lets
Inductor fuse the elementwise work around the matrix products into few kernels, and because every layer runs the same
code, one compilation serves all 48 layers: Dynamo compiles a handful of graphs (sliding and full attention layers,
the layers that keep their keys for sharing), not one per layer. Each of those is compiled again for a batch of one
row against several and when transformers hands the layers a batch's extra arguments (labels), so a run can hold
more graphs than torch's default limit of 8 a function: `RECOMPILE_LIMIT` lets Dynamo keep them all instead of
falling back to eager code for the layers it meets last (the tiny model's test hit the default).

Shapes are compiled dynamic (`dynamic=True`): every micro-batch of users' data has its own length, and a graph
specialised to one length would recompile for the next. ft's chunked attention stays outside the graphs
(`ft.attention` marks it), because its chunk layout changes with the row; the graph breaks there once a layer.
ft's fused kernels (`ft.kernels`) are not used with compiled layers: Inductor fuses the same RMSNorm and GeGLU
itself (Dynamo could not trace Liger's RMSNorm, a Triton autograd Function as its GeGLU is).

The layers run under gradient checkpointing as before: the checkpoint wraps the compiled call, and its recomputation
runs the compiled forward again.

Why it is not the default: at the 12B shape it cuts a step's launches by more than half, yet the step stays bound by
the host (autograd, checkpointing and offloading hooks, Dynamo's guards) and gets only a few percent faster, after a
first step that waits minutes for compilation (docs/BENCHMARKS.md#training-speed-on-users-data).
"""

from __future__ import annotations

import torch
from torch import nn

DECODER_LAYER = "Gemma4UnifiedTextDecoderLayer"
RECOMPILE_LIMIT = 64


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer of `model` in place (lazily: Dynamo traces on the first step); returns how many.
    `backend` is torch.compile's: the CPU tests trace with "aot_eager" (Dynamo and AOTAutograd, no code generation)."""
    layers = [module for module in model.modules() if type(module).__name__ == DECODER_LAYER]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def compiled_graphs() -> int:
    """How many graphs Dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
