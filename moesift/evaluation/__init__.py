"""Proofs and quality: verify, perplexity evaluation, budget sweeps."""
