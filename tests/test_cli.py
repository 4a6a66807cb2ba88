"""The headless driver `python -m llfc_core run` (llfc_core/__main__.py -> llfc_core/book/cli.py): its help,
its refusals, and one real run of chapter 01 at the smoke profile into a temporary results folder."""
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from llfc_core.book import cli
from llfc_core.book.tables import CHAPTER_TABLES


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    """`cli.run` sets $LLFC_STRICT_CLAIMS in its process; undo that after the in-process calls."""
    monkeypatch.setenv("LLFC_STRICT_CLAIMS", os.environ.get("LLFC_STRICT_CLAIMS", "1"))


def llfc(*args, env=None, cwd=None, timeout=600):
    """`python -m llfc_core ARGS` in a fresh interpreter (the entry point as a user runs it)."""
    env = dict(os.environ, LLFC_THREADS="1", LLFC_PROGRESS="0", LLFC_DEVICE="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "llfc_core", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_help_exits_0_and_names_run(tmp_path):
    done = llfc("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "{run,share}" in done.stdout and "python -m llfc_core run" in done.stdout
    assert "python -m llfc_core share" in done.stdout
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--help"])
    assert exit_.value.code == 0


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2 and "run" in capsys.readouterr().err


def test_unknown_chapter_is_refused_with_its_name_and_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--profile", "smoke", "--chapters", "01_lmc,07_nowhere"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2  # argparse's usage error, before anything runs
    assert "unknown chapters ['07_nowhere']" in err
    assert all(name in err for name in CHAPTER_TABLES) and "01_lmc" in CHAPTER_TABLES


def test_unknown_profile_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--profile", "tiny", "--chapters", "01_lmc"])
    assert exit_.value.code == 2  # a usage error like an unknown chapter, before anything runs
    assert "unknown profile 'tiny'; choose from ['cpu', 'paper', 'smoke']" in capsys.readouterr().err


def test_unknown_setting_is_refused_with_the_profile_and_its_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--profile", "smoke", "--chapters", "01_lmc", "--settings", "mnist-mlp,mnist-cnn"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "profile 'smoke' has no settings ['mnist-cnn']; it has [" in err and "'mnist-mlp'" in err


@pytest.mark.slow  # 7-12 s on a shared core: trains the smoke MLPs
def test_a_smoke_run_of_chapter_01_writes_its_table_and_manifest(tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    start = time.time()
    done = llfc("run", "--profile", "smoke", "--chapters", "01_lmc", "--settings", "mnist-mlp",
                env={"LLFC_RESULTS": str(results), "LLFC_CACHE": str(cache)}, cwd=tmp_path)
    print(f"smoke run of 01_lmc / mnist-mlp: {time.time() - start:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "01_lmc" in done.stdout and "(computed)" in done.stdout
    lmc = pd.read_csv(results / "smoke" / "lmc.csv")
    assert set(lmc.setting) == {"mnist-mlp"} and len(lmc)
    assert list(lmc.columns[:8]) == ["setting", "replicate", "pair", "correction", "split", "alpha", "loss", "error"]
    assert lmc.alpha.min() == 0 and lmc.alpha.max() == 1 and lmc.error.between(0, 1).all()
    manifest = json.loads((results / "smoke" / "manifest.json").read_text())
    assert manifest["profile"] == "smoke"
    assert set(manifest["tables"]["lmc"]) == {"mnist-mlp"}  # the setting, with its configuration hash
    assert isinstance(manifest["tables"]["lmc"]["mnist-mlp"], str) and manifest["tables"]["lmc"]["mnist-mlp"]
    assert "mnist-mlp" in manifest["settings"] and "01_lmc" in manifest["chapters"]
    assert any(cache.iterdir())  # the models were trained into the given cache, not the default one
