"""Sample answers while training (train.sample_prompts): written at the sampled steps into samples.jsonl and wandb's
offline files, each the greedy answer of the model as it stood at that step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DEMO_DATA, run_ft, write_recipe

IMAGE = DEMO_DATA / "images" / "heldout_0001.png"
AUDIO = DEMO_DATA / "audio" / "heldout_0013.wav"
PROMPTS = [
    "What is 3 + 4?",
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "image", "path": str(IMAGE)}, {"type": "audio", "path": str(AUDIO)},
                                  {"type": "text", "text": "What shape is in the picture?"}]}],
]
TOKENS = 6


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step training of the tiny model that samples every 3 steps (so at steps 3 and 4, the end), wandb offline."""
    folder = tmp_path_factory.mktemp("samples")
    path = write_recipe(folder / "recipe.yaml", train={
        "max_steps": 4, "batch_size": 2, "sample_prompts": PROMPTS, "sample_every": 3, "sample_tokens": TOKENS,
        "log_every": 1, "eval_every": 100, "save_every": 100, "warmup_steps": 0}, logging={"wandb": "offline"})
    recipe = yaml.safe_load(path.read_text())
    del recipe["export"], recipe["eval"], recipe["data"]["eval"]  # training alone
    path.write_text(yaml.safe_dump(recipe))
    result = run_ft("train", str(path))
    assert result.returncode == 0, result.stderr
    assert "sampling 2 prompts at step 3" in result.stdout + result.stderr  # the progress line says so
    return Path(recipe["output"]["dir"])


def test_samples_at_the_sampled_steps(sampled_run: Path, tiny) -> None:
    ends = set(tiny[0].generation_config.eos_token_id)
    lines = [json.loads(line) for line in (sampled_run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [(3, 0), (3, 1), (4, 0), (4, 1)]
    for record in lines:
        assert 1 <= len(record["tokens"]) <= TOKENS
        assert record["stopped"] == any(token in ends for token in record["tokens"])


def test_last_samples_are_the_trained_adapters_greedy_answers(sampled_run: Path) -> None:
    """The step-4 answer to the text prompt is what the saved adapter (the model after step 4) answers greedily,
    through transformers' own chat template and generate."""
    from peft import PeftModel

    from ft.tiny import build_tiny

    base, processor = build_tiny()  # its own copy: the LoRA goes onto it
    model = PeftModel.from_pretrained(base, str(sampled_run / "adapter")).eval()
    ids = processor.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
    expected = out[0, ids["input_ids"].shape[1]:].tolist()
    last = [json.loads(line) for line in (sampled_run / "samples.jsonl").read_text().splitlines()][2]
    assert last["tokens"] == expected


def test_samples_in_wandb_offline_files(sampled_run: Path) -> None:
    tables = sorted((sampled_run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert tables, "no samples table in wandb's offline run"
    newest = max(tables, key=lambda p: json.loads(p.read_text())["data"].__len__())
    table = json.loads(newest.read_text())
    lines = [json.loads(line) for line in (sampled_run / "samples.jsonl").read_text().splitlines()]
    assert table["columns"] == ["step", "prompt", "answer"]
    assert table["data"] == [[r["step"], r["prompt"], r["answer"]] for r in lines]


def test_a_sample_prompt_must_end_with_a_user_turn(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", train={"sample_prompts": [[{"role": "assistant", "content": "x"}]]})
    result = run_ft("validate", str(path))
    assert result.returncode == 2
    assert "train.sample_prompts" in result.stderr and "must end with a user message" in result.stderr


def test_a_missing_sample_image_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    prompt = [{"role": "user", "content": [{"type": "image", "path": str(missing)}, {"type": "text", "text": "?"}]}]
    path = write_recipe(tmp_path / "recipe.yaml", train={"sample_prompts": [prompt]})
    result = run_ft("validate", str(path))
    assert result.returncode == 2
    assert f"train.sample_prompts[0]: image file not found: {missing}" in result.stderr
