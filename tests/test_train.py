"""The demo end to end through the CLI: it learns, its run directory is complete, and a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from ft.callbacks import read_metrics
from ft.data import load_rows
from ft.encode import collate, encode_row
from ft.tiny import build_tiny
from conftest import DEMO_DATA, ROOT, Demo, ft_command, ft_env, run_ft

pytestmark = pytest.mark.slow
DEMO = ROOT / "recipes" / "demo.yaml"


def test_demo_learns(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["eval_loss_last"] <= 0.7 * summary["eval_loss_first"], summary


def test_first_step_is_timed_from_fts_own_start(demo: Demo):
    """The demo's ft was exec'ed by a shell that slept first, as `bash -c "pip install ... && ft train ..."` runs it;
    the shell's life is not ft's. Counted from ft's start, the first step ended no later than the moment its first
    logged loss was seen less the steps that ran in between, and ft started no earlier than the sleep's end; counted
    from the shell's start, the figure would hold the sleep too."""
    summary = json.loads((demo.run / "summary.json").read_text())
    logged = next(record["step"] for record in read_metrics(demo.run / "metrics.jsonl") if "loss" in record)
    first_step_end = demo.first_loss_seen - sum(summary["throughput"]["step_seconds"][1:logged])  # at the latest
    bound = first_step_end - demo.ft_not_before + 0.06  # summary.json rounds to 0.1 s and each step to 1 ms
    assert 0 < summary["first_step_after_seconds"] <= bound, (summary["first_step_after_seconds"], bound)


def test_run_directory_is_complete(demo_run):
    recipe = yaml.safe_load((demo_run / "recipe.yaml").read_text())
    assert recipe["model"]["name"] == "tiny-random:gemma4-unified"
    assert Path(recipe["data"]["train"]).is_absolute()
    adapter = json.loads((demo_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16
    weights = load_file(demo_run / "adapter" / "adapter_model.safetensors")
    assert any("embed_vision.patch_dense.lora_A" in k for k in weights)
    assert any("embed_audio.embedding_projection.lora_B" in k for k in weights)
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert (demo_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((demo_run / "wandb").glob("offline-run-*")), "wandb offline run not written"
    assert not list(demo_run.rglob(".*.tmp-*")) and not (demo_run / "checkpoints" / ".staging").exists()


def test_saved_adapter_reproduces_the_reported_heldout_loss(demo_run):
    """Recompute the held-out loss from the adapter on disk, independently of the Trainer that reported it."""
    summary = json.loads((demo_run / "summary.json").read_text())
    base, processor = build_tiny()
    model = PeftModel.from_pretrained(base, demo_run / "adapter").eval()
    rows = [encode_row(row, processor) for row in load_rows(DEMO_DATA / "heldout.jsonl")]
    batch_size = yaml.safe_load(DEMO.read_text())["train"]["batch_size"]
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))], 0)
            losses.append((model(**batch).loss.item(), batch["input_ids"].shape[0]))
    loss = sum(value * n for value, n in losses) / sum(n for _, n in losses)
    assert loss == pytest.approx(summary["eval_loss_last"], rel=1e-4)


def test_killed_run_resumes_to_the_same_result(demo_run, tmp_path):
    run = tmp_path / "run"
    # Training alone: the export and eval stages that follow it in the demo have their own resumability tests.
    stages = ("export=null", "eval=null")
    args = ft_command("train", str(DEMO), f"output.dir={run}", "logging.wandb=disabled", *stages)
    process = subprocess.Popen(args, cwd=ROOT, env=ft_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / "checkpoint-45"
    deadline = time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # into the next steps, maybe mid-write of the next log line
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert (run / ".ft-lock").read_text().strip() == str(process.pid)  # left behind; the kernel dropped the lock

    result = run_ft("train", str(DEMO), f"output.dir={run}", "logging.wandb=disabled", *stages, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    assert not (run / "gguf").exists() and not (run / "eval").exists()  # export=null, eval=null: training alone
    # Every logged step once, with the losses, gradient norms and learning rates of the uninterrupted run.
    compared = ("step", "epoch", "loss", "eval_loss", "grad_norm", "learning_rate")
    resumed_log, uninterrupted_log = ([{k: r[k] for k in compared if k in r} for r in read_metrics(path)]
                                      for path in (run / "metrics.jsonl", demo_run / "metrics.jsonl"))
    assert [r["step"] for r in resumed_log] == [r["step"] for r in uninterrupted_log]
    for got, want in zip(resumed_log, uninterrupted_log, strict=True):
        assert got == pytest.approx(want, rel=1e-4), got["step"]
    resumed = json.loads((run / "summary.json").read_text())
    uninterrupted = json.loads((demo_run / "summary.json").read_text())
    for key in ("steps", "train_loss_last", "eval_loss_first", "eval_loss_last"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-4), key
    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):  # trl also writes a model card (README.md) there
        json.loads((checkpoint / "trainer_state.json").read_text())
        load_file(checkpoint / "adapter_model.safetensors")
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(demo_run / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_existing_run_is_not_clobbered(demo_run):
    def state() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in demo_run.rglob("*") if p.is_file()}

    before = state()
    result = run_ft("train", str(DEMO), f"output.dir={demo_run}", "output.overwrite=false", "logging.wandb=disabled")
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert state() == before
