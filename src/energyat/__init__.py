"""energyat: adversarial training through the lens of energy-based models (Mirza et al., arXiv 2505.22486)."""
import os

# OpenMP threads that spin while waiting steal the other core from a busy 2-core machine (an SVD went from 1 s to
# 27 s under load); passive waiting costs nothing measurable here. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS busy-waits the same way: under load one 2048-d FID square root took 152 s wall with 2 threads and
# 52 s with 1 (about 3 s either way on an idle machine)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
