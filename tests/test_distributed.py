"""Training one run in several processes (torchrun, DDP over gloo on the CPU, the tiny model): two processes train as
one process with the same global batch does, every row once an epoch; a killed rank's run resumes exactly; one
process writes the run; `train.devices=2` is one command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file

from ft.batching import LengthGroupedEpochSampler
from ft.callbacks import read_metrics
from ft.data import load_rows
from ft.data_checks import check_rows
from ft.recipe import DataSection
from ft.recipe_io import load_recipe
from ft.tiny import tiny_processor
from conftest import DEMO_DATA, ROOT, ft_command, ft_env, run_ft, run_ft_in_process, write_recipe

DEMO = ROOT / "recipes" / "demo.yaml"
COMPARED = ("step", "epoch", "loss", "eval_loss", "grad_norm", "learning_rate")


def dealt(lengths: list[int], batch: int, ranks: int, epoch: int, seed: int = 5) -> list[list[list[int]]]:
    """Each rank's micro-batches of one epoch as the Trainer's DataLoader yields them: ft's sampler, batched by the
    DataLoader and sharded by accelerate's own `prepare_data_loader`, the code the Trainer runs."""
    sampler = LengthGroupedEpochSampler(lengths, batch, seed=seed, ranks=ranks)
    sampler.set_epoch(epoch)
    items = list(range(len(lengths) + sampler.fillers))
    loader = torch.utils.data.DataLoader(items, batch_size=batch, sampler=sampler, collate_fn=list)
    return [[b for b in prepare_data_loader(loader, num_processes=ranks, process_index=rank, put_on_device=False)]
            for rank in range(ranks)]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("rows", [96, 37, 26])  # whole global batches; a short last one; rows % batch < ranks
def test_ranks_train_every_row_once_in_the_single_process_order(ranks: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    lengths = torch.randint(10, 900, (rows,), generator=generator).tolist()
    batch = 4
    for epoch in (0, 1):
        shards = dealt(lengths, batch, ranks, epoch)
        assert len({len(shard) for shard in shards}) == 1  # every rank takes as many steps
        assert all(len(micro) == batch for shard in shards for micro in shard)
        real = [i for shard in shards for micro in shard for i in micro if i < rows]
        assert sorted(real) == list(range(rows))  # every row once, none twice
        fillers = [i for shard in shards for micro in shard for i in micro if i >= rows]
        assert len(fillers) < batch * ranks
        # the ranks' j-th micro-batches together are one process's j-th batch of batch x ranks rows
        single = dealt(lengths, batch * ranks, 1, epoch)[0]
        together = [sorted(i for shard in shards for i in shard[j] if i < rows) for j in range(len(shards[0]))]
        assert together == [sorted(b) for b in single]
        # no rank idles behind a much longer row: the rows of a full step (all ranks) are one stretch of the rows
        # sorted by length (these few rows make one mega-batch of ft.batching), no other row between their lengths
        for step in together:
            if len(step) == batch * ranks:
                low, high = min(lengths[i] for i in step), max(lengths[i] for i in step)
                assert not [i for i in range(rows) if i not in step and low < lengths[i] < high]
        # a short last batch is dealt out row by row: every rank gets rows while there are enough
        for j in range(len(shards[0])):
            counts = [sum(i < rows for i in shard[j]) for shard in shards]
            assert max(counts) - min(counts) <= 1


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 rows of the demo set, beside links to its media folders: 2 images, 2 short clips, 2 long and 3 short texts.
    Grouped by length into global batches of 2 x 2 they make a step of the images (rank 0) and the long texts (rank
    1), one of the clips (rank 0) and short texts (rank 1), and a last step of one row."""
    folder = tmp_path_factory.mktemp("mixed")
    for media in ("images", "audio"):
        (folder / media).symlink_to(DEMO_DATA / media)
    lines = (DEMO_DATA / "train.jsonl").read_text().splitlines()
    rows = load_rows(DEMO_DATA / "train.jsonl")
    data = DataSection(train=DEMO_DATA / "train.jsonl", max_seq_length=256, too_long="error")  # lengths row by row
    lengths = check_rows(rows, tiny_processor_70(), data, "train")[1]
    by_length = sorted(range(len(rows)), key=lengths.__getitem__)
    images = [i for i in by_length if rows[i].media("image")]
    clips = [i for i in by_length if rows[i].media("audio")]
    texts = [i for i in by_length if i not in images and i not in clips]
    picked = images[:2] + clips[:2] + texts[-2:] + texts[:3]
    path = folder / "train.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in picked))
    return path


def train_run(folder: Path, data: Path, processes: int, batch: int, multimodal: bool) -> Path:
    folder.mkdir()
    # held-out rows too: evaluated at step 0, they once kept the Trainer from wrapping the model in DDP at all
    recipe = write_recipe(folder / "recipe.yaml", train={
        "batch_size": batch, "epochs": 1, "log_every": 1, "save_every": 100, "eval_every": 100, "warmup_steps": 0,
        "lr": 3e-3}, data={"train": str(data)}, lora={"vision": multimodal, "audio": multimodal},
        output={"dir": str(folder / "run"), "overwrite": False})
    args = ["train", str(recipe), "export=null", "eval=null"]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
                   "ft", *args]  # torchrun as a user runs it
        result = subprocess.run(command, capture_output=True, text=True, env=ft_env(), cwd=ROOT, timeout=900)
    else:
        result = run_ft(*args)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def assert_same_adam_result(got: torch.Tensor, want: torch.Tensor, lr: float, steps: int, what: str) -> None:
    """The same trained tensor from two summation orders, as AdamW makes it: AdamW moves an element by about lr a step
    whatever its gradient's size, so an element whose gradient is within float32 rounding of zero (lora_A's at the
    step after lora_B leaves zero) may step either way, a difference of up to 2 x lr a step, where the sums' order
    decides. At most 0.1% of a tensor's elements may do that; all the others together are within 1e-3 of the
    tensor's norm. Gradients left unsynchronised, or a loss over another token count, move most elements."""
    diff = (got - want).abs().flatten()
    flipped = max(1, diff.numel() // 1000)
    rest = diff.sort().values[:-flipped]
    assert float(rest.norm()) <= 1e-3 * float(want.norm()), what
    assert float(diff.max()) <= 2 * lr * steps * (1 + 1e-3), what


@pytest.mark.slow
@pytest.mark.parametrize("multimodal", [False, True], ids=["text-lora", "vision-audio-lora"])
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path: Path, mixed_rows: Path,
                                                                multimodal: bool) -> None:
    """2 processes of batch 2 against 1 process of batch 4 on the same rows: the same rows a step and the loss over
    the global count of labelled tokens (as trl's average_tokens_across_devices), so the same sums in another
    order; the last step's one row leaves one rank with fillers only. Tolerances: float32 sums
    taken in another order (two ranks' partial sums, gloo's all-reduce) differ by about 1e-6 relative a step, and
    three AdamW steps at lr 3e-3 keep the losses far below 1e-3 apart, while the faults this guards against moved the
    loss by more on the demo's rows at batch 8 x 2: each rank's own token count by 1.6e-3 at step 1, gradients left
    unsynchronised by 4.5e-3 at step 2. The adapters: see `assert_same_adam_result`."""
    data = DataSection(train=mixed_rows, max_seq_length=256, too_long="error")  # lengths row by row
    lengths = check_rows(load_rows(mixed_rows), tiny_processor_70(), data, "train")[1]
    rows = load_rows(mixed_rows)
    media = [bool(row.media("image") or row.media("audio")) for row in rows]
    shards = dealt(lengths, 2, 2, 0, seed=0)  # the recipe's train.seed
    # a step where one rank's micro-batch is text only while the other's has an image or a clip: the projections'
    # LoRA gets no gradient on that rank
    assert any(any(media[i] for i in shards[0][j] if i < len(rows)) != any(media[i] for i in shards[1][j]
               if i < len(rows)) for j in range(len(shards[0])))
    two = train_run(tmp_path / "two", mixed_rows, 2, 2, multimodal)
    one = train_run(tmp_path / "one", mixed_rows, 1, 4, multimodal)
    got, want = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    losses = [(g["loss"], w["loss"]) for g, w in zip(got, want, strict=True) if "loss" in w]
    assert len(losses) == 3  # one epoch of 9 rows in steps of 4
    for g, w in losses:
        assert g == pytest.approx(w, rel=1e-3)
    a = load_file(two / "adapter" / "adapter_model.safetensors")
    b = load_file(one / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("embed_vision" in key for key in a) == multimodal
    for key in a:  # every tensor trained (lora_B starts at 0), and the same tensor as one process makes
        assert float(b[key].norm()) > 0, key
        assert_same_adam_result(a[key], b[key], lr=3e-3, steps=len(losses), what=key)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    single = json.loads((one / "summary.json").read_text())
    assert summary["throughput"]["step_tokens"] == single["throughput"]["step_tokens"]  # both ranks' tokens


def tiny_processor_70():
    processor = tiny_processor()
    processor.image_processor.max_soft_tokens = 70  # the demo recipe's image_soft_tokens
    return processor


@pytest.fixture(scope="module")
def demo_on_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ft train recipes/demo.yaml train.devices=2`: the README's one command, export and eval included."""
    run = tmp_path_factory.mktemp("demo-two") / "run"
    result = run_ft("train", str(DEMO), f"output.dir={run}", "logging.wandb=disabled", "train.devices=2",
                    timeout=1800)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return run


@pytest.mark.slow
def test_devices_two_runs_the_demo_once(demo_on_two: Path) -> None:
    summary = json.loads((demo_on_two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16
    records = read_metrics(demo_on_two / "metrics.jsonl")
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == summary["steps"]  # one writer: each step once
    epochs = int(load_recipe(DEMO).train.epochs)
    assert summary["steps"] == epochs * 240 // 16  # 240 rows, global batches of 8 x 2
    assert summary["eval_loss_last"] <= 0.7 * summary["eval_loss_first"]
    checkpoint = max((demo_on_two / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert json.loads((checkpoint / "world.json").read_text()) == {"world_size": 2}
    manifest = json.loads((demo_on_two / "gguf" / "manifest.json").read_text())
    assert manifest  # exported once, by rank 0
    results = json.loads((demo_on_two / "eval" / "results.json").read_text())
    assert results
    assert not list(demo_on_two.rglob(".*.tmp-*")) and not (demo_on_two / "checkpoints" / ".staging").exists()


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> PID of the training processes under an `ft train train.devices=N` process."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(item.split("=", 1) for item in status.read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
            parents = int((status.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parents == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(status.parent.name)
    return found


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_continues_it_exactly(demo_on_two: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("train", str(DEMO), f"output.dir={run}", "logging.wandb=disabled", "train.devices=2", "export=null",
            "eval=null")
    launcher = subprocess.Popen(ft_command(*args), cwd=ROOT, env=ft_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    target = run / "checkpoints" / "checkpoint-30"
    deadline = time.time() + 900
    while not target.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # into the next steps
    assert launcher.poll() is None, "training finished before it could be killed"
    ranks = rank_pids(launcher.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 1
    assert "rank 1 was killed by SIGKILL" in stderr and "--resume" in stderr
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()

    # another number of processes cannot continue a checkpoint whose data position is counted per process
    other = run_ft_in_process(*args, "train.devices=1", "--resume")  # one process: this one
    assert other.returncode == 2
    assert "written by a run of 2 processes and this one has 1" in other.stderr
    assert other.stderr.count("ft: error:") == 1

    resumed = run_ft(*args, "--resume", timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    got, want = ([{k: r[k] for k in COMPARED if k in r} for r in read_metrics(path)]
                 for path in (run / "metrics.jsonl", demo_on_two / "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4), g["step"]


@pytest.mark.slow
def test_a_recipe_error_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", train={"devices": 2, "lr": 2.0})
    result = run_ft("train", str(recipe))
    assert result.returncode == 2
    assert result.stderr.count("ft: error:") == 1 and "train.lr" in result.stderr
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn
    recipe = write_recipe(tmp_path / "recipe.yaml", train={"devices": 2}, data={"train": str(data)})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ft", "train",
               str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, env=ft_env(), cwd=ROOT, timeout=900)
    assert result.returncode != 0  # torchrun's own status (1) and report: that rank 0 and 1 exited 2
    assert result.stderr.count("ft: error:") == 1 and "bad.jsonl" in result.stderr
    assert "DataError" not in result.stderr  # no rank's traceback
    assert "exitcode  : 2" in result.stderr
