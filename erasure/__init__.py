"""Concept erasure for text-to-image diffusion models: All but One and its baselines on one trainer."""

__version__ = "0.1.0"
