"""Random-weight checkpoints of the exact Gemma 4 12B shape, written straight to safetensors shards.

Memory and time of export and decoding do not depend on weight values, so benchmarks use random weights built
from transformers' config classes (no download). Tensors are generated one at a time and written shard by shard in
the layout Google publishes (`model.vision_embedder.*`), so building 24 GB never needs 24 GB of RAM.

    python -c "from bench.shapes import *; write_checkpoint(Path('/tmp/g12'), config_12b())"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAudioFeatureExtractor,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedImageProcessor,
    Gemma4UnifiedProcessor,
    Gemma4UnifiedVideoProcessor,
)

from ft.tiny import special_token_ids, tiny_tokenizer

SHARD_BYTES = 4 << 30


def config_12b() -> Gemma4UnifiedConfig:
    """google/gemma-4-12B-it's shape: 48 layers (5 sliding : 1 full), width 3840, k_eq_v full layers."""
    text = {
        "vocab_size": 262144, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 262144,
    }
    vision = {"mm_embed_dim": 3840, "mm_posemb_size": 1120, "output_proj_dims": 3840}
    return Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config={"audio_embed_dim": 640})


def drafter_config_12b() -> Gemma4UnifiedAssistantConfig:
    """An MTP drafter shaped for the 12B target: 4 layers at width 1024 whose attention matches the target's last
    sliding and full layers (the drafter reads the target's KV cache)."""
    text = {
        "vocab_size": 262144, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "final_logit_softcapping": 30.0, "max_position_embeddings": 262144,
    }
    return Gemma4UnifiedAssistantConfig(text_config=text, backbone_hidden_size=3840)


def _disk_name(name: str) -> str:
    for memory, disk in (("model.embed_vision.multimodal_embedder.embedding_projection.",
                          "model.embed_vision.embedding_projection."),
                         ("model.embed_vision.", "model.vision_embedder.")):
        if name.startswith(memory):
            return disk + name[len(memory) :]
    return name


def _random(shape: torch.Size, name: str, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 or name.endswith("layer_scalar"):
        return torch.ones(shape, dtype=torch.bfloat16)
    device = generator.device
    return (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()


def write_weights(model_cls: type, config: object, directory: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Random bf16 weights for `model_cls(config)`, in shards of about 4 GiB, with an index.

    device="cuda" draws the numbers on the GPU (seconds instead of minutes for 12B); the files are the same kind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = model_cls(config)
    generator = torch.Generator(device).manual_seed(seed)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    names = [(n, t.shape) for n, t in meta.state_dict().items() if n not in tied]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map = {}
    for name, shape in names:
        tensor = _random(shape, name, generator)
        if size and size + tensor.numel() * 2 > SHARD_BYTES:
            _flush(shards, directory)
            size = 0
        disk = _disk_name(name)
        shards[-1][disk] = tensor
        weight_map[disk] = len(shards)
        size += tensor.numel() * 2
    _flush(shards, directory)
    total = len(shards) - 1
    files = {k: f"model-{v:05d}-of-{total:05d}.safetensors" for k, v in weight_map.items()}
    for i in range(1, total + 1):
        (directory / f"part-{i}.safetensors").rename(directory / f"model-{i:05d}-of-{total:05d}.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    config.save_pretrained(directory)
    return directory


def _flush(shards: list[dict[str, torch.Tensor]], directory: Path) -> None:
    save_file(shards[-1], directory / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    shards[-1] = {}
    shards.append({})


def write_checkpoint(directory: Path, config: Gemma4UnifiedConfig, seed: int = 0, device: str = "cpu") -> Path:
    """A complete random checkpoint folder: weights, config, and a processor with a tokenizer of the config's
    vocabulary size (262144 for 12B) whose special-token ids the saved config takes."""
    tokenizer = tiny_tokenizer(config.text_config.vocab_size)
    text_ids, media_ids = special_token_ids(tokenizer)
    config.text_config.update(text_ids)
    config.update(media_ids)
    write_weights(Gemma4UnifiedForConditionalGeneration, config, directory, seed, device)
    Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(), image_processor=Gemma4UnifiedImageProcessor(),
        tokenizer=tokenizer, video_processor=Gemma4UnifiedVideoProcessor(), chat_template=tokenizer.chat_template,
    ).save_pretrained(directory)
    return directory


def write_adapter(directory: Path, checkpoint: Path, r: int = 16, seed: int = 0) -> Path:
    """A random peft LoRA adapter (r, alpha 2r) over every language-model projection of a checkpoint."""
    from quantize.checkpoint import Checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    base = Checkpoint(checkpoint)
    weights = {}
    for name in base.names():
        if ".language_model.layers." not in name or not name.endswith("_proj.weight"):
            continue
        out_features, in_features = base.shape(name)
        module = f"base_model.model.{name.removesuffix('.weight')}"
        weights[f"{module}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) / r
        weights[f"{module}.lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 1e-3
    save_file(weights, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": sorted({k.split(".")[-3] for k in weights}), "bias": "none", "use_rslora": False,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(checkpoint)}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
