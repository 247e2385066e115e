"""GGUF export (merge, convert, quantize): see docs/DESIGN.md. llama.cpp is loaded by `quantize.llama_lib`."""
