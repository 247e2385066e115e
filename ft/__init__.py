"""ft: fine-tune Gemma 4 with one LoRA over the whole multimodal model, then ship GGUF files."""

__version__ = "0.1.0"
