"""refimpl: reference implementation of differentiable cache augmentation.

Liu, Pfeiffer, Wu, Xie, Szlam, "Deliberation in Latent Space via Differentiable Cache
Augmentation", ICML 2025 (arXiv 2412.17747). See docs/algorithm.md for the map from paper
sections to functions.
"""

__version__ = "0.1.0"
