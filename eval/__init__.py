"""Quant-sensitivity evaluation (KL divergence, accuracy, decode speed): see the roadmap in docs/."""
