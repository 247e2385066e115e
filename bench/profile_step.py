"""Where a training step's time goes: `ft train` on one repeated row under PyTorch's profiler, at the 12B shape.

The run is ft's own (`ft.train.train` on a recipe written by bench.train_12b, the backend the recipe forces), with
one extra Trainer callback: it times each step's phases with the GPU synchronized at their ends (the decoder's
forward; the LM head, loss and backward; gradient clipping + optimizer, the rest: scheduler, zero_grad, logging, callbacks), and profiles `--profiled` steps
after the warm-up. From the profile it reports how much of the profiled wall time the GPU was busy (the union of
kernel and copy intervals), GPU time by kind of kernel (matrix products, 4-bit dequantization, attention, Triton,
copies, optimizer, other), host-side synchronisations, and the top operators by host and device time. A step whose
GPU is idle most of its wall time is bound by the host (Python, kernel launches, waits), not by arithmetic.

    python -m bench.profile_step --work /tmp/t12 --tokens 2048 --out $OUT/profile.json --switches sdpa no-liger
    python -m bench.profile_step --work /tmp/t12 --out $OUT/profile.json --switches before-fusing default \
        --switch-steps 4                                    # ft's fused projections and norm against peft + Liger
    python -m bench.profile_step --work /tmp/t12 --out $OUT/profile.json --warmup 5 --profiled 0 \
        --switches bnb-dequant default --switch-steps 3                                # an A/B on unprofiled steps
    python -m bench.profile_step --work /tmp/t12 --out $OUT/profile.json --label no-offload \
        --set train.offload_activations=off                                                # a variant beside it
    python -m bench.profile_step --work /tmp/t12 --out $OUT/profile.json --label compiled \
        --set train.compile_layers=true                                                     # compiled decoder layers
    python -m bench.profile_step --work /tmp/t --shape tiny --tokens 512 --out /tmp/p.json --switches sdpa
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import gzip
import json
import pstats
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

# GPU kernels by kind, first match wins (names as CUDA, cuBLAS, bitsandbytes, PyTorch and Triton give them)
KINDS = (
    ("nf4 dequantize", re.compile(r"dequant|kQuantize", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|ampere_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("triton (liger, fused loss)", re.compile(r"triton|_rms_norm|geglu|liger|cross_entropy", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
)
SYNCS = re.compile(r"cuda(Stream|Device|Event)Synchronize|cudaMemcpy(?!Async)")


def use_sdpa(model: torch.nn.Module, on: bool) -> None:
    """transformers' `sdpa` attention (one masked kernel over every key) in place of ft's chunked attention."""
    from ft import attention

    model.get_base_model().set_attn_implementation("sdpa" if on else attention.IMPLEMENTATION)


_SWAPPED: dict[str, dict[torch.nn.Module, Any]] = {}  # per switch: each module's forward before it
_SAVED: dict[str, Any] = {}  # per switch: the value `_set` replaced


def _set(switch: str, on: bool, owner: Any, name: str, value: Any) -> None:
    """Switch on: `owner.name` becomes `value`; off: its value before."""
    if on:
        _SAVED[switch] = getattr(owner, name)
        setattr(owner, name, value)
    else:
        setattr(owner, name, _SAVED.pop(switch))


def _swap(model: torch.nn.Module, switch: str, on: bool, select: Any, forward: Any | None) -> None:
    """Switch on: each module `select` accepts gets `forward` (None: its class's own); off: its forward before."""
    if on:
        saved = _SWAPPED.setdefault(switch, {})
        for module in filter(select, model.modules()):
            saved[module] = module.__dict__.pop("forward", None)
            if forward is not None:
                module.forward = types.MethodType(forward, module)
    else:
        for module, before in _SWAPPED.pop(switch, {}).items():
            module.__dict__.pop("forward", None)
            if before is not None:
                module.forward = before


def _norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and "forward" in module.__dict__


def drop_liger(model: torch.nn.Module, on: bool) -> None:
    """transformers' own RMSNorm and MLP in place of the fused kernels (`ft.kernels` sets them per module)."""
    _swap(model, "no-liger", on, lambda m: "forward" in m.__dict__ and (_norm(m) or type(m).__name__ ==
                                                                     "Gemma4UnifiedTextMLP"), None)


def _liger_rms_norm(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(hidden_states, self.weight, self.eps, offset=0.0, casting_mode="gemma", in_place=False)


def liger_norm(model: torch.nn.Module, on: bool) -> None:
    """Liger's RMSNorm kernel (ft's before torch's fused one) in place of torch's."""
    _swap(model, "liger-norm", on, _norm, _liger_rms_norm)


def peft_lora(model: torch.nn.Module, on: bool) -> None:
    """peft's own LoRA forward in place of ft's fused projections (`ft.fused_lora`)."""
    _swap(model, "peft-lora", on, lambda m: hasattr(m, "lora_A") and "forward" in m.__dict__, None)


def before_fusing(model: torch.nn.Module, on: bool) -> None:
    """peft's LoRA forward and Liger's RMSNorm: ft's hf step as it was before `ft.fused_lora` and torch's norm."""
    peft_lora(model, on)
    liger_norm(model, on)


def bnb_dequant(model: torch.nn.Module, on: bool) -> None:
    """bitsandbytes' own `dequantize_4bit` (its Python checks and custom-op dispatches) in place of `ft.nf4`'s direct
    call of the same kernels."""
    from ft import nf4

    _set("bnb-dequant", on, nf4, "_direct", lambda *_: False)


def empty_cache(model: torch.nn.Module, on: bool) -> None:
    """trl's activation offloading as trl has it, emptying PyTorch's allocator cache at every step's start."""
    from trl.models.activation_offloading import OffloadActivations

    from ft.train import OffloadKeepingAllocatorCache

    _set("empty-cache", on, OffloadKeepingAllocatorCache, "__enter__", OffloadActivations.__enter__)


def chunk_checkpoint(model: torch.nn.Module, on: bool) -> None:
    """Every masked attention chunk recomputed in the backward pass, however small its mask (ft's before
    `ft.attention.KEPT_MASKS_BYTES`)."""
    from ft import attention

    _set("chunk-checkpoint", on, attention, "KEPT_MASKS_BYTES", 0)


def no_gc(model: torch.nn.Module, on: bool) -> None:
    """Python's cyclic garbage collector off: whether its passes over a step's many short-lived objects cost time."""
    (gc.disable if on else gc.enable)()


SWITCHES = {"sdpa": use_sdpa, "no-gc": no_gc, "no-liger": drop_liger, "liger-norm": liger_norm, "peft-lora": peft_lora,
            "before-fusing": before_fusing, "bnb-dequant": bnb_dequant, "empty-cache": empty_cache,
            "chunk-checkpoint": chunk_checkpoint,
            "default": lambda model, on: None}  # each runs --switch-steps steps after the profiled ones; "default"
# again between them (`--switches before-fusing default before-fusing`) spreads a slow drift over both


class StepProfiler(TrainerCallback):
    """Times the phases of every step, profiles steps `start` .. `start + count - 1` (1-based) with PyTorch's
    profiler and the next `python_count` with Python's (where the host's time goes, by Python function), then runs
    `switch_steps` steps with each of `switches` on (one at a time), each step labelled with its variant."""

    def __init__(self, start: int, count: int, trace: Path | None, switches: list[str], switch_steps: int,
                 python_count: int = 0) -> None:
        self.start, self.count, self.trace, self.switches = start, count, trace, switches
        self.switch_steps, self.python_count = switch_steps, python_count
        self.steps: list[dict[str, Any]] = []
        self.profile: dict[str, Any] = {}
        self.python_profile: list[dict[str, Any]] = []
        self.peak_reserved_gib = 0.0
        self._python: cProfile.Profile | None = None
        self._marks: dict[str, float] = {}
        self._prof: torch.profiler.profile | None = None
        self._model: torch.nn.Module | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module, **_: Any) -> None:
        self._model = model
        decoder = model.get_base_model().model  # the decoder alone: the LM head and loss come after it
        decoder.register_forward_pre_hook(lambda *_: self._mark("forward_begin"))
        decoder.register_forward_hook(lambda *_: self._mark("forward_end"))

    def _variant(self, step: int) -> str:
        """The switch on at 1-based `step` ('default' before and between them)."""
        first = self.start + self.count + self.python_count
        index = (step - first) // self.switch_steps
        return self.switches[index] if step >= first and index < len(self.switches) else "default"

    def _switch(self, step: int) -> None:
        before, now = self._variant(step - 1), self._variant(step)
        if before != now:
            if before != "default":
                SWITCHES[before](self._model, False)
            if now != "default":
                SWITCHES[now](self._model, True)

    def _mark(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._marks[name] = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._switch(state.global_step + 1)
        if self.count and state.global_step + 1 == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        if self.python_count and state.global_step + 1 == self.start + self.count:
            self._python = cProfile.Profile()
            self._python.enable()
        self._marks = {}
        if torch.cuda.is_available():  # each step's own peak; the run's is kept here, as the reset clears it
            self.peak_reserved_gib = max(self.peak_reserved_gib, torch.cuda.max_memory_reserved() / 2**30)
            torch.cuda.reset_peak_memory_stats()
        self._mark("begin")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._mark("backward_end")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._mark("optimizer_end")

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._mark("end")
        m = self._marks
        self.steps.append({
            "step": state.global_step, "variant": self._variant(state.global_step), "seconds": m["end"] - m["begin"],
            "before_forward": m.get("forward_begin", m["begin"]) - m["begin"],
            "decoder_forward": m.get("forward_end", 0.0) - m.get("forward_begin", 0.0),
            "head_loss_backward": m.get("backward_end", 0.0) - m.get("forward_end", 0.0),
            "clip_and_optimizer": m.get("optimizer_end", 0.0) - m.get("backward_end", 0.0),
            "after_optimizer": m["end"] - m.get("optimizer_end", m["end"]),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        })
        print(f"step {state.global_step} ({self.steps[-1]['variant']}): {self.steps[-1]['seconds']:.3f} s", flush=True)
        if self._prof is not None and state.global_step == self.start + self.count - 1:
            self._prof.__exit__(None, None, None)
            wall = sum(s["seconds"] for s in self.steps[-self.count:])
            self.profile = summarize_profile(self._prof, wall, self.count, self.trace)
            self._prof = None
        if self._python is not None and state.global_step == self.start + self.count + self.python_count - 1:
            self._python.disable()
            self.python_profile = summarize_python(self._python, self.python_count)
            self._python = None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals.

    >>> busy_seconds([(0, 2), (1, 3), (5, 6)])
    4
    """
    total, reach = 0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kind_of(kernel: str) -> str:
    """>>> kind_of("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>"), kind_of("elementwise_kernel")
    ('nf4 dequantize', 'other')
    """
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "other")


def summarize_profile(prof: torch.profiler.profile, wall: float, steps: int, trace: Path | None) -> dict[str, Any]:
    """Per profiled step: wall time, GPU busy time, GPU time by kernel kind, host synchronisations, top operators."""
    path = Path(prof_trace := f"/tmp/ft-profile-{time.time_ns()}.json")
    prof.export_chrome_trace(prof_trace)
    events = json.loads(path.read_text())["traceEvents"]
    if trace is not None:
        with gzip.open(trace, "wt") as f:
            json.dump({"traceEvents": events}, f)
    path.unlink()
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_kind: dict[str, float] = {}
    for e in gpu:
        by_kind[kind_of(e["name"])] = by_kind.get(kind_of(e["name"]), 0.0) + e["dur"] / 1e6
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and SYNCS.search(e.get("name", ""))]
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", "")]
    averages = prof.key_averages()
    device_time = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"

    def top(key: str, n: int = 25) -> list[dict[str, Any]]:
        rows = sorted(averages, key=lambda a: getattr(a, key, 0), reverse=True)[:n]
        return [{"name": a.key[:120], "calls": a.count // steps, "self_cpu_s": a.self_cpu_time_total / 1e6 / steps,
                 "self_gpu_s": getattr(a, device_time, 0) / 1e6 / steps} for a in rows]

    per_step = 1 / steps
    return {
        "profiled_steps": steps,
        "wall_s": wall * per_step,
        "gpu_busy_s": busy_seconds([(e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in gpu]) * per_step,
        "gpu_kernels": len(gpu) // steps,
        "kernel_launches": len(launches) // steps,
        "gpu_seconds_by_kind": {k: round(v * per_step, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "host_syncs": len(syncs) // steps,
        "host_sync_s": sum(e["dur"] for e in syncs) / 1e6 * per_step,
        "top_host_ops": top("self_cpu_time_total"),
        "top_gpu_ops": top(device_time),
    }


def summarize_python(prof: cProfile.Profile, steps: int, n: int = 40) -> list[dict[str, Any]]:
    """The `n` Python functions (and C functions called from Python) with the most time of their own, per step;
    cProfile's own cost a call inflates the figures, so they rank where the host's time goes rather than time it."""
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own time, cumulative, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [{"function": f"{Path(file).name}:{line}({name})" if line else name, "calls": calls // steps,
             "own_s": own / steps, "cumulative_s": cumulative / steps}
            for (file, line, name), (_, calls, own, cumulative, _) in rows]


def table(result: dict[str, Any]) -> str:
    p, lines = result["profile"], [f"{result['tokens']} tokens, {result['backend']} backend"]
    if p:
        lines.append(f"profiled {p['profiled_steps']} steps: wall {p['wall_s']:.3f} s a step; GPU busy "
                     f"{p['gpu_busy_s']:.3f} s; {p['gpu_kernels']} kernels, {p['kernel_launches']} launches, "
                     f"{p['host_syncs']} host syncs ({p['host_sync_s']:.3f} s)")
    for step in result["steps"]:
        lines.append("step {step} ({variant}): {seconds:.3f} s = decoder forward {decoder_forward:.3f} + head, loss and backward "
                     "{head_loss_backward:.3f} + clip/optimizer "
                     "{clip_and_optimizer:.3f} + after {after_optimizer:.3f} (before forward {before_forward:.3f})"
                     .format(**step))
    lines += [f"  GPU {kind:28} {s:8.4f} s" for kind, s in p.get("gpu_seconds_by_kind", {}).items()]
    lines += [f"  host {r['name'][:60]:60} {r['self_cpu_s']:7.4f} s x{r['calls']}"
              for r in p.get("top_host_ops", [])[:12]]
    lines += [f"  python {r['function'][:58]:58} own {r['own_s']:7.4f} s, with callees {r['cumulative_s']:7.4f} s "
              f"x{r['calls']}" for r in result.get("python_profile", [])[:20]]
    return "\n".join(lines)


def main() -> None:
    from bench.environment import environment
    from bench.train_12b import build_checkpoint, recipe_for
    from ft import rundir
    from ft.recipe_io import load_recipe
    from ft.resolve import choose_backend, this_machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trace", type=Path, help="also write the chrome trace here (gzip)")
    parser.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--path", default="ft-hf", help="a bench.train_12b ft path (the backend it forces)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    parser.add_argument("--profiled", type=int, default=2,
                        help="steps profiled (0: none, so the switches follow the warm-up on unprofiled steps)")
    parser.add_argument("--python-profiled", type=int, default=0,
                        help="steps under Python's profiler after the PyTorch-profiled ones")
    parser.add_argument("--switches", nargs="*", default=[], choices=list(SWITCHES),
                        help="variants of the loaded model, run --switch-steps steps each after the profiled steps")
    parser.add_argument("--switch-steps", type=int, default=2,
                        help="steps per switch (the first may warm up new kernels)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for this variant, e.g. train.offload_activations=off")
    parser.add_argument("--label", default="", help="a name for this variant in --out (default: the path)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.work, args.shape)
    recipe_path = recipe_for(args.work, args.path, str(args.tokens), model, args.shape == "tiny")
    steps = args.warmup + args.profiled + args.python_profiled + args.switch_steps * len(args.switches)
    recipe = load_recipe(recipe_path, [f"train.max_steps={steps}", *args.set])
    with rundir.claim(recipe.output.dir, "run"):
        backend = choose_backend(recipe, this_machine())
        from ft.train import train

        profiler = StepProfiler(args.warmup + 1, args.profiled, args.trace, args.switches, args.switch_steps,
                                args.python_profiled)
        summary = train(recipe, backend, callbacks=[profiler], started_at=psutil.Process().create_time())
    if summary.get("memory"):
        summary["memory"]["peak_reserved_gib"] = round(max(summary["memory"]["peak_reserved_gib"],
                                                           profiler.peak_reserved_gib), 2)
    result = {"tokens": args.tokens, "backend": backend.name, "overrides": args.set, "summary_throughput": summary["throughput"],
              "first_step_after_seconds": summary.get("first_step_after_seconds"),
              "compiled_graphs": summary.get("compiled_graphs"),
              "memory": summary.get("memory"), "steps": profiler.steps, "profile": profiler.profile,
              "python_profile": profiler.python_profile}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"variants": {}}
    previous["variants"][args.label or args.path] = result
    previous.update(benchmark="profile_step", date=datetime.date.today().isoformat(),
                    device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    result["environment"] = environment(sys.argv)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
