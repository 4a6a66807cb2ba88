"""Test settings: one torch thread, no progress bars, and a private cache and results folder, set before
llfc_core is imported (the kernels papermill starts inherit them)."""
import os
import tempfile

os.environ.setdefault("LLFC_THREADS", "1")
os.environ["LLFC_PROGRESS"] = "0"
os.environ["LLFC_DEVICE"] = "cpu"
_scratch = tempfile.mkdtemp(prefix="llfc-tests-")
os.environ["LLFC_CACHE"] = os.path.join(_scratch, "cache")
os.environ["LLFC_RESULTS"] = os.path.join(_scratch, "results")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty cache for tests that count trainings."""
    monkeypatch.setenv("LLFC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
