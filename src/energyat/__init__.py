"""energyat: adversarial training through the lens of energy-based models (Mirza et al., arXiv 2505.22486)."""

__version__ = "0.1.0"
