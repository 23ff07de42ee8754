"""refimpl: reference implementation of "Deliberation in Latent Space via Differentiable Cache Augmentation"
(Liu, Pfeiffer, Wu, Xie, Szlam, ICML 2025, arXiv 2412.17747); docs/algorithm.md maps its sections to code."""

__version__ = "0.1.0"
