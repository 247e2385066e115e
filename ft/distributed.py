"""One run trained by several processes (GPUs, machines) through PyTorch's own distributed engine: torchrun starts
the processes, torch.distributed connects them, and the Trainer (through accelerate) wraps the model in
DistributedDataParallel. QLoRA's 4-bit base cannot be sharded in the common setups, so this is data parallel: each
process holds the whole model and trains its share of every step's rows; the LoRA's gradients are all-reduced.

    torchrun --nproc-per-node 4 -m ft train recipe.yaml                        # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m ft train recipe.yaml
    ft train recipe.yaml train.devices=4                                       # ft starts torchrun itself

torchrun tells each process who it is in its environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), which
transformers, accelerate and unsloth read as well. What ft adds on top:
- one writer: global rank 0 claims the run directory (marker and lock, `ft.rundir`) and alone writes into it; the
  other ranks wait for it where they need what it wrote (`on_main`).
- one voice: an error in the user's input (recipe, data, model) is found by every rank alike (the checks that read
  the run directory run on every rank before rank 0 writes there, and end together: `together`); rank 0 prints it
  and every rank waits for that at a barrier before exiting 2 (`stop_together`), so the user reads it once.
- the rows: `ft.batching` deals each global batch out to the ranks, every row once an epoch.

On a machine without CUDA the processes train on the CPU and talk over gloo (the tests run two of them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ft.errors import FtError

T = TypeVar("T")

_started = False  # whether this process joined a process group (`start`)


class ProcessDied(FtError):
    """A process of the run died (killed, crashed): not the user's input, so not exit status 2."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes, as torchrun set it (one process: the defaults)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run (global rank 0)."""
        return self.rank == 0


def world() -> World:
    """This process's `World`, from torchrun's environment variables (no torch import)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                 int(env.get("LOCAL_WORLD_SIZE", 1)))


def launch(argv: Sequence[str], devices: int) -> int:
    """Run `python -m ft ARGV...` in `devices` processes on this machine under torchrun, as `torchrun --standalone
    --nproc-per-node DEVICES -m ft ARGV...` would (torchrun's own code, called in this process so that its outcome
    is ft's exit status): 0 when every process succeeded, 2 when they stopped on an error of the user's input (rank
    0 printed it), else ProcessDied saying which process died and how (torchrun stopped the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={devices}", "--module", "ft", *argv]))
    except ChildFailedError as exc:
        if {failure.exitcode for failure in exc.failures.values()} == {FtError.exit_code}:
            return FtError.exit_code
        died = "; ".join(
            f"rank {rank} " + (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                               else f"exited with status {failure.exitcode}")
            for rank, failure in sorted(exc.failures.items()))
        raise ProcessDied(f"training stopped on every process: {died}; `ft train ... --resume` with the same "
                      "train.devices continues from the last checkpoint") from None
    return 0


def start(cuda: bool) -> None:
    """Join the run's process group (NCCL between GPUs, each process on its LOCAL_RANK GPU; gloo on CPUs and for
    the small objects `on_main` and `gather` pass); nothing when this is the only process. accelerate finds the
    group made and uses it."""
    global _started
    here = world()
    if here.size == 1 or _started:
        return
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(here.local_rank)
    else:
        # accelerate would name each CPU process's device "cpu:RANK", a location torch.load cannot map a checkpoint's
        # optimizer state to when the Trainer resumes
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    _started = True


def stop_together() -> None:
    """Wait until every process has come here (each found the same error; rank 0 has printed it)."""
    if _started:
        import torch.distributed as dist

        dist.barrier()


def finish() -> None:
    """Leave the process group once this process's share of the run is done."""
    global _started
    if _started:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        _started = False


def together(step: Callable[[], T]) -> T:
    """Run `step` on every rank and return its result; when it raised a FtError on any rank, raise the lowest such
    rank's on every rank (a check that reads the run directory while rank 0 writes it could fail on one alone)."""
    result, error = None, None
    try:
        result = step()
    except FtError as exc:
        error = exc
    failed = [e for e in gather(None if error is None else (type(error), str(error))) if e is not None]
    if failed:
        kind, message = failed[0]
        raise kind(message)
    return result  # type: ignore[return-value]  # step returned on every rank


def on_main(step: Callable[[], T]) -> T | None:
    """Run `step` on rank 0 alone while the others wait, and return its result there (None elsewhere). A FtError
    it raises is raised on every rank, so that all of them stop together (`stop_together`)."""
    result, error = None, None
    if world().main:
        try:
            result = step()
        except FtError as exc:
            error = exc
    if _started:
        import torch.distributed as dist

        shared: list[Any] = [None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            kind, message = shared[0]
            error = kind(message)
    if error is not None:
        raise error
    return result


def gather(value: T) -> list[T]:
    """`value` of every rank, in rank order, on every rank (`[value]` for one process)."""
    if not _started:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world().size
    dist.all_gather_object(values, value)
    return values
