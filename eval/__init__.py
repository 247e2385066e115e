"""Quant-sensitivity evaluation (KL divergence, accuracy, decode speed): see docs/DESIGN.md."""
