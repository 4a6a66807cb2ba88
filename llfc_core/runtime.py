"""Process-wide settings: thread count, devices and the default folders.

Torch with 2 threads on a 2-core machine slows down 15-30x as soon as another process competes for
the cores, so the thread count is a setting (LLFC_THREADS) rather than torch's guess; tests and CI
use 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads from `n`, else from $LLFC_THREADS; returns the count in force."""
    if n is None and os.environ.get("LLFC_THREADS"):
        n = int(os.environ["LLFC_THREADS"])
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def default_device() -> torch.device:
    """CUDA when present, else CPU ($LLFC_DEVICE overrides)."""
    if os.environ.get("LLFC_DEVICE"):
        return torch.device(os.environ["LLFC_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def repo_root() -> Path:
    """The checkout this package lives in (for an editable install), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def data_root() -> Path:
    """Where data sets live: $LLFC_DATA, else the repository's shipped `data/` folder."""
    return Path(os.environ.get("LLFC_DATA", repo_root() / "data"))


def cache_root() -> Path:
    """Where trained models and computed results are cached: $LLFC_CACHE, else `<repo>/.cache/llfc`."""
    return Path(os.environ.get("LLFC_CACHE", repo_root() / ".cache" / "llfc"))


def show_progress() -> bool:
    """Progress bars on unless $LLFC_PROGRESS=0 (CI logs stay readable)."""
    return os.environ.get("LLFC_PROGRESS", "1") != "0"


def progress(**kwargs):
    """A tqdm bar (a widget in notebooks when ipywidgets is there, text otherwise), or a silent one
    when $LLFC_PROGRESS=0; book builds turn bars off so no stderr lands in the rendered pages."""
    if not show_progress():
        from tqdm.std import tqdm

        return tqdm(disable=True, **kwargs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when ipywidgets is missing, then falls back to text
        from tqdm.auto import tqdm
    return tqdm(mininterval=1.0, **kwargs)
