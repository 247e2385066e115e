"""Quant-sensitivity evaluation (KL divergence, accuracy, decode speed): see docs/DESIGN.md."""

import llama_cpp  # noqa: F401  (loaded before numpy: see quantize/__init__.py)
