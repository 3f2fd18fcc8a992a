"""energyat: adversarial training through the lens of energy-based models (Mirza et al., arXiv 2505.22486)."""
import os

# OpenMP threads that spin while waiting steal the other core from a busy 2-core machine (an SVD went from 1 s to
# 27 s under load); passive waiting costs nothing measurable here. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
