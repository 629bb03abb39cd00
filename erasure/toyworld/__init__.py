"""The toy world: a synthetic shapes-and-colours world with a trained text-to-image model in Stable
Diffusion's architecture (``model/``), its detector and its tiny CLIP. Rebuilt by ``make toyworld``."""
