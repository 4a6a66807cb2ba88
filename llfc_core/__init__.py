"""llfc_core: linear mode connectivity and layerwise linear feature connectivity, measured.

The pipeline, one module per step:
    data -> models -> recipes/train/cache -> permutation/matching -> interpolate -> metrics -> results/plots
"""
from .runtime import configure_threads, default_device, repo_root

__version__ = "0.1.0"
configure_threads()

__all__ = ["configure_threads", "default_device", "repo_root", "__version__"]
