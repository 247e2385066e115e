"""How many ATen operations one training step of ft's hf path dispatches, per decoder layer and per fused LoRA
projection, on the tiny model on the CPU (no GPU needed).

ft's hf step is bound by the host (docs/BENCHMARKS.md, "Training speed on users' data"): each operation costs
Python and dispatcher time and, on CUDA, most cost a kernel launch. This counts them with a TorchDispatchMode over
one forward and backward (NF4 base, bfloat16 weights under bfloat16 autocast, gradient checkpointing, LoRA on every
language-model projection, as a CUDA run has them), so a change that should remove operations can be checked here
before a GPU measures its time. The layer-level counts differ from CUDA's where CUDA swaps in fused kernels
(`ft.kernels`: RMSNorm, GeGLU), which the CPU does not; the projections' counts are the same code on both.

    python -m bench.op_census --out /tmp/census.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.environment import environment

VIEWS = {"detach", "view", "t", "transpose", "expand", "unsqueeze", "slice", "select", "reshape", "_unsafe_view",
         "alias", "as_strided", "permute", "squeeze"}  # no kernel of their own


class Census(TorchDispatchMode):
    """Counts every ATen operation dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def census(tokens: int) -> dict[str, Any]:
    from ft import attention, fused_lora
    from ft.lora import apply_lora
    from ft.models import load_model
    from ft.recipe import LoraSection

    model = load_model("tiny-random:gemma4-unified", "bfloat16", "cpu", "nf4")
    model.set_attn_implementation(attention.register())
    model = apply_lora(model, LoraSection(r=4))
    projections = fused_lora.fuse_lora_projections(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = len(model.get_base_model().model.language_model.layers)
    ids = torch.randint(10, 200, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # the first step warms up (lazy initialisations)
    inside: collections.Counter[str] = collections.Counter()
    function = fused_lora._LoraProjection
    forward, backward = function.forward, function.backward

    def counted(pass_name: str, original: Any) -> Any:
        def run(ctx: Any, *args: Any) -> Any:
            with Census() as c:
                result = original(ctx, *args)
            inside.update({f"{pass_name} {name}": n for name, n in c.counts.items()})
            return result
        return staticmethod(run)

    function.forward, function.backward = counted("forward", forward), counted("backward", backward)
    try:
        with Census() as whole:
            step()
    finally:
        function.forward, function.backward = forward, backward
    kernels = {name: n for name, n in whole.counts.items() if name not in VIEWS}
    return {
        "tokens": tokens, "layers": layers, "fused_projections": projections,
        "operations": sum(whole.counts.values()), "operations_not_views": sum(kernels.values()),
        "per_layer_not_views": {name: round(n / layers, 1) for name, n in
                                sorted(kernels.items(), key=lambda kv: -kv[1])},
        "per_projection": {name: round(n / projections, 2) for name, n in sorted(inside.items())
                           if name.split()[1] not in VIEWS},
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['operations_not_views']} operations that are not views in one step "
             f"({result['operations']} in all), {result['layers']} layers, {result['fused_projections']} fused projections"]
    lines.append("  a layer (the step's count over the layers):")
    lines += [f"  {name:32} {n:7.1f}" for name, n in list(result["per_layer_not_views"].items())[:15]]
    lines.append("  per fused projection (forward counts both passes of the checkpointed layer):")
    lines += [f"  {name:32} {n:7.2f}" for name, n in result["per_projection"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"benchmark": "op_census", **census(args.tokens), "environment": environment(sys.argv)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
