"""ft: fine-tune Gemma 4 with one LoRA over the whole multimodal model, then ship GGUF files."""

# llama.cpp is loaded before anything imports numpy (or torch, which imports it). With a CUDA build of
# llama-cpp-python 0.3.36, a process that had imported numpy first crashed (SIGSEGV) loading a 12B-shaped GGUF on an
# H200, while the same load with llama_cpp imported first ran; see docs/BENCHMARKS.md. eval and quantize import ft
# first for the same reason.
import llama_cpp  # noqa: F401

__version__ = "0.1.0"
