"""Deterministic tiny random Gemma 4 unified models, for tests and the demo (no hub access needed).

The tiny model has the architecture of `google/gemma-4-12B-it` (`gemma4_unified`): sliding and full attention
layers, full layers with `attention_k_eq_v` (no `v_proj`), the encoder-free vision embedder (48 px patches) and
the raw-waveform audio projection. Only the sizes shrink. Widths are multiples of 256 so that llama.cpp's
K-quants apply without falling back to other types when later stages quantize it.

    >>> from ft.tiny import build_tiny
    >>> model, processor = build_tiny()
    >>> model.config.model_type
    'gemma4_unified'
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    Gemma4UnifiedAudioFeatureExtractor,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedImageProcessor,
    Gemma4UnifiedProcessor,
    Gemma4UnifiedVideoProcessor,
    GemmaTokenizer,
)

TINY_PREFIX = "tiny-random:"
TINY_NAMES = ("gemma4-unified",)

# Gemma 4's control tokens, in the order the real vocabulary lists them after <pad> <eos> <bos> <unk> <mask>.
CONTROL_TOKENS = (
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
)
MEDIA_TOKENS = {
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
}
BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))
VOCAB_SIZE = 1024

# A fixed corpus keeps the BPE merges identical on every machine; it covers the demo data's words and a few
# scripts beyond ASCII (anything else falls back to byte tokens, as in the real tokenizer).
_CORPUS = """
What shape is in the picture? A red circle. A green square. A blue triangle. A yellow circle.
What colour is the shape? Red. Green. Blue. Yellow. Describe the picture.
Is the tone high or low? High. Low. How many beeps do you hear? One beep. Two beeps. Three beeps.
What is 3 + 4? 7. Which is larger, 12 or 9? 12. How many letters are in the word cat? 3.
Answer briefly. The answer is 42. Let us think step by step. First, then, finally, therefore.
Hello, how are you? I am fine, thank you. The quick brown fox jumps over the lazy dog.
Bonjour, comment allez-vous ? Guten Tag, wie geht es Ihnen? ¿Dónde está la biblioteca?
Привет, как дела? 你好，世界。 こんにちは、世界。 안녕하세요. مرحبا بالعالم. नमस्ते दुनिया।
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = < > ( ) [ ] { } : ; , . ! ? ' "
"""


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> GemmaTokenizer:
    """A Gemma-style BPE tokenizer (byte fallback, spaces as '▁') with Gemma 4's control tokens.

    `vocab_size` pads the vocabulary with `<unusedN>` tokens; benchmarks use 262144, the real Gemma 4 size.
    """
    specials = [*BASE_TOKENS, *CONTROL_TOKENS, *BYTE_TOKENS]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    # Pad the vocabulary to exactly vocab_size so the embedding rows stay a round number.
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=MEDIA_TOKENS,
        add_bos_token=False,
        padding_side="right",
    )
    # Control tokens are already in the vocabulary; registering them keeps BPE from splitting their text.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS], special_tokens=True)
    tokenizer.chat_template = (Path(__file__).parent / "chat_template.jinja").read_text()
    return tokenizer


def special_token_ids(tokenizer: GemmaTokenizer) -> tuple[dict[str, object], dict[str, int]]:
    """The config's special-token ids as `tokenizer` numbers them: (text config entries, top-level entries).
    A config keeping its class defaults would look for image and audio placeholders under other ids."""
    ids = tokenizer.convert_tokens_to_ids
    text = {"pad_token_id": ids("<pad>"), "eos_token_id": [ids("<eos>"), ids("<turn|>")], "bos_token_id": ids("<bos>")}
    media = {
        "boi_token_id": ids("<|image>"), "eoi_token_id": ids("<image|>"), "image_token_id": ids("<|image|>"),
        "video_token_id": ids("<|video|>"), "boa_token_id": ids("<|audio>"), "eoa_token_index": ids("<audio|>"),
        "audio_token_id": ids("<|audio|>"),
    }
    return text, media


def tiny_config(tokenizer: GemmaTokenizer) -> Gemma4UnifiedConfig:
    """Config of the tiny model: 12B's layout (5 sliding : 1 full, k_eq_v full layers) at width 256."""
    text_ids, media_ids = special_token_ids(tokenizer)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 128,
        "global_head_dim": 256,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "sliding_window": 64,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 4096,
        **text_ids,
    }
    vision_config = {"mm_embed_dim": 256, "mm_posemb_size": 128, "output_proj_dims": 256}
    audio_config = {"audio_embed_dim": 640}
    return Gemma4UnifiedConfig(
        text_config=text_config, vision_config=vision_config, audio_config=audio_config, **media_ids
    )


def tiny_processor() -> Gemma4UnifiedProcessor:
    """Processor with the real image/audio front ends and the tiny tokenizer (70 soft tokens per image)."""
    tokenizer = tiny_tokenizer()
    return Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(max_soft_tokens=70),
        tokenizer=tokenizer,
        video_processor=Gemma4UnifiedVideoProcessor(max_soft_tokens=70),
        chat_template=tokenizer.chat_template,
        image_seq_length=70,
    )


def temper_attention(model: Gemma4UnifiedForConditionalGeneration) -> None:
    """Give the random model the usual 1/sqrt(head_dim) attention temperature.

    Gemma 4 attends with scale 1 and leaves the temperature to its trained q/k norms. At their initial value 1 a
    random model's attention logits have a standard deviation of sqrt(head_dim) (11 to 16): so chaotic that rounding
    its weights to F16 moves its logits by up to 19%, and no numerical comparison (transformers against llama.cpp,
    16-bit against quantized) would measure anything but that noise.
    """
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            weight = layer.self_attn.q_norm.weight
            weight.fill_(weight.numel() ** -0.5)


def build_tiny(
    name: str = "gemma4-unified", seed: int = 0
) -> tuple[Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedProcessor]:
    """Build the tiny model and its processor; the same seed gives bit-identical weights."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_NAMES)}")
    processor = tiny_processor()
    config = tiny_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4UnifiedForConditionalGeneration(config)
    temper_attention(model)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval(), processor


def save_tiny(directory: Path, name: str = "gemma4-unified", seed: int = 0) -> Path:
    """Write the tiny model as a normal Hugging Face checkpoint directory (what a real download looks like)."""
    model, processor = build_tiny(name, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
