"""GGUF export (merge, convert, quantize): see docs/DESIGN.md."""

import ft  # noqa: F401  (loads llama.cpp before numpy: see ft/__init__.py)
