"""All but One (Hong, Lee, Woo; AAAI 2024), the paper this project implements, apart from the core.

- :mod:`erasure.allbutone.ours`      the method: Algorithm 1 with the explicit erasing signal (Eq. 12-13)
- :mod:`erasure.allbutone.implicit`  the implicit erasing signal (Prompt-to-Prompt attention re-weighting)
- :mod:`erasure.allbutone.purify`    concept purification (Fig. 1b, Fig. 10): DDIM inversion and regeneration
"""
