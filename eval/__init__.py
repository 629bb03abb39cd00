"""Evaluation: image generation, metrics registry and Table-1 reports."""
