import json
from pathlib import Path

import pandas as pd
import pytest

from llfc_core.book import chapter, claims, pairs, profiles, results, width
from llfc_core.book.tables import TABLES, results_hash


def _rows(spawn_barrier):
    from llfc_core.book import claims

    table = pd.DataFrame([{"setting": "cifar10-vgg16", "pair": p, "split": "test", "error_barrier": b}
                          for p, b in (("spawn", spawn_barrier), ("naive", 0.5))])
    return claims.chapter1(table, "cpu")


def test_failed_claim_fails_unless_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    ch = chapter.Chapter("99_test", "cpu", {}, deviations={})
    ch.check(_rows(0.01) + _rows(0.2))
    with pytest.raises(chapter.ClaimFailed, match="lmc.barrier"):
        ch.report()
    key = ("lmc.barrier", "cifar10-vgg16", "spawn")
    ch = chapter.Chapter("99_test", "cpu", {}, deviations={key: "because of X"}, computed=True)
    shown = ch.check(_rows(0.2))
    assert "deviates (explained)" in set(shown.status)
    frame = ch.report()
    assert frame[frame.claim == "lmc.barrier"].explanation.iloc[0] == "because of X"
    assert json.loads((tmp_path / "cpu" / "manifest.json").read_text())["chapters"]["99_test"]["minutes"] >= 0


def test_reading_committed_results_leaves_the_manifest_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    from llfc_core.book.tables import Producer

    settings = profiles.get_settings("smoke", ["mnist-mlp"])
    demo = lambda s, device: {"demo": pd.DataFrame({"setting": [s.name], "pair": ["naive"], "value": [1.0]})}
    monkeypatch.setitem(TABLES, "demo", Producer(demo, ("demo",)))
    first = chapter.Chapter("99_test", "smoke", settings)
    first.table("demo")
    first.report()
    recorded = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    monkeypatch.setitem(TABLES, "demo", Producer(lambda s, device: pytest.fail("recomputed fresh results"), ("demo",)))
    second = chapter.Chapter("99_test", "smoke", settings)
    second.table("demo")
    second.report()
    assert not second.computed and json.loads((tmp_path / "smoke" / "manifest.json").read_text()) == recorded


def test_an_interactive_run_warns_instead_of_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    monkeypatch.setenv("LLFC_STRICT_CLAIMS", "0")
    monkeypatch.delenv("CI", raising=False)
    ch = chapter.Chapter("99_test", "cpu", {}, deviations={})
    ch.check(_rows(0.2))
    with pytest.warns(chapter.ClaimWarning, match="lmc.barrier"):
        frame = ch.report()
    assert "FAIL" in set(frame.status)
    monkeypatch.setenv("CI", "true")  # CI raises whatever the variable says
    with pytest.raises(chapter.ClaimFailed):
        ch.report()


def test_smoke_profile_shows_but_does_not_enforce(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    ch = chapter.Chapter("99_test", "smoke", {}, deviations={})
    ch.check(_rows(0.2))
    assert "FAIL" in set(ch.report().status)


def test_results_are_reused_when_fresh_and_recomputed_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    settings = profiles.get_settings("smoke", ["mnist-mlp", "cifar10-mlp"])
    calls = []

    def compute(setting):
        calls.append(setting.name)
        return pd.DataFrame({"setting": [setting.name], "pair": ["naive"], "value": [len(calls)]})

    def load(chosen, **kw):
        hashes = {name: profiles.setting_hash(s) for name, s in chosen.items()}
        return results.load_or_compute("smoke", "demo", hashes, lambda name: compute(chosen[name]),
                                       lambda name: pairs.provenance(chosen[name]), **kw)

    first = load(settings)
    assert calls == ["mnist-mlp", "cifar10-mlp"] and len(first) == 2
    again = load(settings)
    assert calls == ["mnist-mlp", "cifar10-mlp"] and again.value.tolist() == [1, 2]  # read, not recomputed
    changed = profiles.get_settings("smoke", ["mnist-mlp", "cifar10-mlp"], curve_points=3)  # new hash
    load({"mnist-mlp": changed["mnist-mlp"], "cifar10-mlp": settings["cifar10-mlp"]})
    assert calls == ["mnist-mlp", "cifar10-mlp", "mnist-mlp"]
    load(settings, recompute=True)
    assert calls[-2:] == ["mnist-mlp", "cifar10-mlp"]
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert manifest["tables"]["demo"]["mnist-mlp"] == profiles.setting_hash(settings["mnist-mlp"])
    assert set(manifest["settings"]["mnist-mlp"]["model_keys"]) == {"a", "spawn", "independent", "a/r1", "spawn/r1",
                                                                    "independent/r1"}  # smoke: 2 replicates
    for key in ("profile", "commit", "device", "torch", "seeds", "data"):
        assert key in manifest
    assert "offline copy" in manifest["data"]["mnist"]
    made = manifest["made_by"]["cifar10-mlp"]["demo"]  # each part of a book computed in parts says what made it
    assert made["commit"] == results.git_commit() and made["device"] == results.device_label() and made["minutes"] >= 0


def test_unknown_profile_and_setting():
    with pytest.raises(KeyError, match="unknown profile"):
        profiles.get_settings("gpu")
    with pytest.raises(KeyError, match="has no settings"):
        profiles.get_settings("cpu", ["cifar10-resnet20x32-ln"])
    assert list(profiles.get_settings("cpu", "mnist-mlp,cifar10-mlp")) == ["mnist-mlp", "cifar10-mlp"]
    assert list(profiles.get_settings("cpu", '["mnist-mlp"]')) == ["mnist-mlp"]


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


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_committed_results_match_the_code(profile):
    """Every committed table was computed with the settings the code defines now, so `make book` reads
    them instead of recomputing (a change to a setting must come with regenerated results)."""
    root = Path(__file__).resolve().parent.parent / "results" / profile
    manifest = json.loads((root / "manifest.json").read_text())
    settings, sweeps = profiles.get_settings(profile), width.get_sweeps(profile)
    for table, recorded in manifest["tables"].items():
        assert (root / f"{table}.csv").exists(), table
        if table.startswith("width_"):  # chapter 5's rows come from sweeps
            stale = {name for name, h in recorded.items() if name not in sweeps or sweeps[name].results_hash() != h}
        else:
            stale = {name for name, h in recorded.items()
                     if name not in settings or results_hash(table, settings[name]) != h}
        assert not stale, f"results/{profile}/{table}.csv is stale for {sorted(stale)}"


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_committed_tables_carry_every_replicate(profile):
    """Issue #22's rule: every committed table of a setting (or sweep) has the rows of each of its replicates,
    and at cpu the MLPs have at least 3, the conv nets and chapter 5's sweeps at least 2 and 3."""
    root = Path(__file__).resolve().parent.parent / "results" / profile
    manifest = json.loads((root / "manifest.json").read_text())
    settings, sweeps = profiles.get_settings(profile), width.get_sweeps(profile)
    for table, recorded in manifest["tables"].items():
        rows = pd.read_csv(root / f"{table}.csv")
        for name in recorded:
            want = (sweeps[name] if table.startswith("width_") else settings[name]).replicates
            assert set(rows[rows.setting == name].replicate) == set(range(want)), (profile, table, name)
    if profile == "cpu":
        assert all(s.replicates >= (3 if s.recipe.model["arch"] == "mlp" else 2) for s in settings.values())
        assert all(s.replicates >= 3 for s in sweeps.values())


def test_profiles_are_overrides_of_one_base():
    """Each profile changes only what it lists: a field no profile overrides is the base's everywhere."""
    for profile, chosen in profiles.PROFILES.items():
        for name, setting in chosen.items():
            base = profiles.BASE[name]
            for key, value in vars(setting).items():
                if key not in profiles.OVERRIDES[profile][name]:
                    assert value == getattr(base, key), (profile, name, key)


def test_share_copies_only_rows_of_the_same_configuration(tmp_path, monkeypatch):
    """The cpu profile's MLP settings are the paper's: their rows are copied, never those of another hash."""
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    src = tmp_path / "cpu"
    src.mkdir()
    for table in ("lmc", "llfc"):
        pd.DataFrame({"setting": ["mnist-mlp", "cifar10-vgg16"], "replicate": [0, 0], "value": [1.0, 2.0]}).to_csv(
            src / f"{table}.csv", index=False)
    made = {"commit": "abc1234", "device": "cpu (test)", "minutes": 3.0, "at": "now"}
    (src / "manifest.json").write_text(json.dumps({
        "profile": "cpu", "tables": {"lmc": {"mnist-mlp": "h1"}, "llfc": {"mnist-mlp": "old"}},
        "settings": {"mnist-mlp": {"hash": "h1"}}, "minutes": {"mnist-mlp": {"lmc": 3.0}},
        "made_by": {"mnist-mlp": {"lmc": made}}, "data": {"mnist": "copy"}, "seeds": {"init_a": 0}}))
    assert results.share("cpu", "paper", "mnist-mlp", {"lmc": "h1", "llfc": "new"}) == ["lmc"]
    copied = pd.read_csv(tmp_path / "paper" / "lmc.csv")
    assert copied.setting.tolist() == ["mnist-mlp"] and copied.value.tolist() == [1.0]
    assert not (tmp_path / "paper" / "llfc.csv").exists()  # another configuration: not the same rows
    manifest = json.loads((tmp_path / "paper" / "manifest.json").read_text())
    assert manifest["tables"]["lmc"] == {"mnist-mlp": "h1"} and "llfc" not in manifest["tables"]
    assert manifest["made_by"]["mnist-mlp"]["lmc"] == made and manifest["shared_from"]["mnist-mlp"]["profile"] == "cpu"
    assert results.share("cpu", "paper", "mnist-mlp", {"lmc": "other"}) == []


def test_share_takes_the_settings_explained_deviations_along(tmp_path, monkeypatch):
    """The same rows fail the same claims: the shared setting's explanations go with them, replacing the
    target's entries of that setting and keeping every other setting's."""
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path))
    for profile in ("cpu", "paper"):
        (tmp_path / profile).mkdir()
    pd.DataFrame({"setting": ["mnist-mlp"], "replicate": [0], "value": [1.0]}).to_csv(tmp_path / "cpu" / "lmc.csv", index=False)
    (tmp_path / "cpu" / "manifest.json").write_text(json.dumps({
        "profile": "cpu", "tables": {"lmc": {"mnist-mlp": "h1"}}, "settings": {"mnist-mlp": {"hash": "h1"}}}))
    entry = lambda setting, why: {"claim": "lmc.barrier", "setting": setting, "pair": "wm", "explanation": why}
    (tmp_path / "cpu" / "deviations.json").write_text(json.dumps({"deviations": [
        entry("mnist-mlp", "from cpu's rows"), entry("cifar10-vgg16", "cpu only")]}))
    (tmp_path / "paper" / "deviations.json").write_text(json.dumps({"deviations": [
        entry("mnist-mlp", "stale"), entry("cifar10-resnet20", "paper's own")]}))
    assert results.share("cpu", "paper", "mnist-mlp", {"lmc": "h1"}) == ["lmc"]
    assert claims.read_deviations("paper") == {("lmc.barrier", "mnist-mlp", "wm"): "from cpu's rows",
                                               ("lmc.barrier", "cifar10-resnet20", "wm"): "paper's own"}
