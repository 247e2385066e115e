"""GGUF export (merge, convert, quantize): see docs/DESIGN.md."""

# llama.cpp is loaded before anything imports numpy (or torch, which imports it). With a CUDA build of
# llama-cpp-python 0.3.36, a process that had imported numpy first crashed (SIGSEGV) loading a 12B-shaped GGUF on an
# H200, while the same load with llama_cpp imported first ran; see docs/BENCHMARKS.md. `eval` does the same, and
# `ft train` imports the stages it chains before it loads torch. Training alone never loads llama.cpp.
import llama_cpp  # noqa: F401
