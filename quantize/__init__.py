"""GGUF export (merge, convert, quantize): see the roadmap in docs/."""
