"""DiffSep: diffusion-based generative speech source separation for SpeechBrain.

Scheibler, Ji, Chung, Byun, Choe, Choi, "Diffusion-based Generative Speech Source
Separation", ICASSP 2023 (arXiv 2210.17327).
"""

__version__ = "0.1.0"
