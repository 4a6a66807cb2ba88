import json
import os
from pathlib import Path

import pandas as pd
import pytest

from llfc_core import chapter, experiments, results


def test_failed_claim_fails_unless_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    ch = chapter.Chapter("99_test", "cpu", {})
    ch.check("a holds", True, "1 <= 2")
    ch.check("b holds", False, "3 > 2")
    with pytest.raises(chapter.ClaimFailed, match="b holds"):
        ch.report()
    ch = chapter.Chapter("99_test", "cpu", {}, deviations={"b holds": "because of X"}, computed=True)
    ch.check("b holds", False, "3 > 2")
    ch.check("c holds", True, "", deviation="unused when the claim passes")
    frame = ch.report()
    assert list(frame.status) == ["deviates (explained)", "pass"] and frame.explanation[1] == ""
    assert json.loads((tmp_path / "cpu" / "manifest.json").read_text())["chapters"]["99_test"]["minutes"] >= 0


def test_reading_committed_results_leaves_the_manifest_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    settings = experiments.get_settings("smoke", ["mnist-mlp"])
    compute = lambda s: pd.DataFrame({"setting": [s.name], "pair": ["naive"], "value": [1.0]})
    first = chapter.Chapter("99_test", "smoke", settings)
    first.table("demo", compute)
    first.report()
    recorded = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    second = chapter.Chapter("99_test", "smoke", settings)
    second.table("demo", lambda s: pytest.fail("recomputed fresh results"))
    second.report()
    assert not second.computed and json.loads((tmp_path / "smoke" / "manifest.json").read_text()) == recorded


def test_smoke_profile_shows_but_does_not_enforce(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    ch = chapter.Chapter("99_test", "smoke", {})
    ch.check("fails", False)
    assert ch.report().status.tolist() == ["FAIL"]


def test_results_are_reused_when_fresh_and_recomputed_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    settings = experiments.get_settings("smoke", ["mnist-mlp", "cifar10-mlp"])
    calls = []

    def compute(setting):
        calls.append(setting.name)
        return pd.DataFrame({"setting": [setting.name], "pair": ["naive"], "value": [len(calls)]})

    first = results.load_or_compute("smoke", "demo", settings, compute)
    assert calls == ["mnist-mlp", "cifar10-mlp"] and len(first) == 2
    again = results.load_or_compute("smoke", "demo", settings, compute)
    assert calls == ["mnist-mlp", "cifar10-mlp"] and again.value.tolist() == [1, 2]  # read, not recomputed
    changed = experiments.get_settings("smoke", ["mnist-mlp", "cifar10-mlp"], alphas=3)  # new hash
    results.load_or_compute("smoke", "demo", {"mnist-mlp": changed["mnist-mlp"], "cifar10-mlp": settings["cifar10-mlp"]}, compute)
    assert calls == ["mnist-mlp", "cifar10-mlp", "mnist-mlp"]
    results.load_or_compute("smoke", "demo", settings, compute, recompute=True)
    assert calls[-2:] == ["mnist-mlp", "cifar10-mlp"]
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert manifest["tables"]["demo"]["mnist-mlp"] == experiments.setting_hash(settings["mnist-mlp"])
    assert set(manifest["settings"]["mnist-mlp"]["model_keys"]) == {"a", "spawn", "independent"}
    for key in ("profile", "commit", "device", "torch", "seeds", "data"):
        assert key in manifest
    assert "offline copy" in manifest["data"]["mnist"]


def test_unknown_profile_and_setting():
    with pytest.raises(KeyError, match="unknown profile"):
        experiments.get_settings("gpu")
    with pytest.raises(KeyError, match="has no settings"):
        experiments.get_settings("cpu", ["cifar10-resnet20x32-ln"])
    assert list(experiments.get_settings("cpu", "mnist-mlp,cifar10-mlp")) == ["mnist-mlp", "cifar10-mlp"]
    assert list(experiments.get_settings("cpu", '["mnist-mlp"]')) == ["mnist-mlp"]


def test_cache_writes_are_atomic_and_safe(tmp_path):
    import torch

    from llfc_core import cache

    folder = tmp_path / "entry"
    cache.write_entry(folder, {"t": {"x": torch.arange(3)}}, {"k": 1})
    groups, meta = cache.read_entry(folder, ("t",))
    assert torch.equal(groups["t"]["x"], torch.arange(3)) and meta == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary folders left
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(cache.CacheError, match="delete that folder"):
        cache.read_entry(folder, ("t",))
