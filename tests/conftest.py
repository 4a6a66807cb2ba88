"""Test settings: one torch thread, no progress bars, and a private cache and results folder, set before
llfc_core is imported (the kernels papermill starts inherit them)."""
import os
import tempfile

os.environ.setdefault("LLFC_THREADS", "1")
os.environ["LLFC_PROGRESS"] = "0"
os.environ["LLFC_STRICT_CLAIMS"] = "1"  # unexplained failed claims raise, as in the book build
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


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session at the smoke profile with -W; returns the HTML folder."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("book")
    env = dict(os.environ, LLFC_PROFILE="smoke")
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.argv[0] = 'jupyter-book'; "
           "sys.exit(main())", "build", str(root), "-W", "--path-output", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out / "_build" / "html"
