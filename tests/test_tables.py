"""The book's wiring: the table registry, versions per artefact, the pairs of a setting, the settings' coverage."""
import json
from dataclasses import replace

import pytest
import torch

from llfc_core import train
from llfc_core.book import chapter, claims, pairs, profiles, tables
from llfc_core.matching import ALIGNMENTS


def smoke_mlp(**overrides):
    return profiles.get_settings("smoke", ["mnist-mlp"], **overrides)


def test_every_table_a_chapter_reads_is_declared_once():
    read = {t for names in tables.CHAPTER_TABLES.values() for t in names}
    assert read <= set(tables.TABLES)
    for name, producer in tables.TABLES.items():
        assert name in producer.outputs
    with pytest.raises(KeyError, match="unknown table 'lcm'"):
        tables.producer("lcm")


def test_a_table_version_bump_recomputes_without_training(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path / "results"))
    settings = smoke_mlp(pairs=("spawn", "naive", "wm"))
    first = chapter.Chapter("01_lmc", "smoke", settings)
    before = first.table("lmc")
    assert first.computed

    def no_training(*args, **kwargs):
        raise AssertionError("a table version bump retrained a model")

    monkeypatch.setattr(train, "train", no_training)
    again = chapter.Chapter("01_lmc", "smoke", settings)
    again.table("lmc")
    assert not again.computed  # same version: read from results/, nothing computed
    bumped = replace(tables.TABLES["lmc"], version=2)
    monkeypatch.setitem(tables.TABLES, "lmc", bumped)
    third = chapter.Chapter("01_lmc", "smoke", settings)
    after = third.table("lmc")
    assert third.computed  # recomputed from the cached models: no_training was never called
    assert after.equals(before)  # same code, same numbers
    recorded = json.loads((tmp_path / "results" / "smoke" / "manifest.json").read_text())["tables"]["lmc"]
    assert recorded["mnist-mlp"] == tables.results_hash("lmc", settings["mnist-mlp"])
    assert recorded["mnist-mlp"] != profiles.setting_hash(settings["mnist-mlp"])  # version 2 enters the hash


def test_version_one_keeps_the_hashes_made_before_versions(monkeypatch):
    """Results committed before versions were per artefact stay valid: version 1 is the old global one."""
    from llfc_core import cache

    setting = smoke_mlp()["mnist-mlp"]
    assert tables.results_hash("lmc", setting) == profiles.setting_hash(setting)
    assert cache.config_hash({"x": 1}) == cache.config_hash({"x": 1}, version=1) != cache.config_hash({"x": 1}, 2)


def test_every_base_setting_runs_at_smoke_and_has_claims():
    """A setting without a smoke override never runs in the tests; one without LMC pairs gets no checks."""
    assert set(profiles.OVERRIDES["smoke"]) == set(profiles.BASE)
    assert set(claims.LMC_PAIRS) == set(profiles.BASE)
    for profile, chosen in profiles.PROFILES.items():
        for name, setting in chosen.items():
            assert set(setting.pairs) <= {"spawn"} | set(ALIGNMENTS), (profile, name, setting.pairs)
            assert set(claims.LMC_PAIRS[name]) <= {"spawn"} | set(ALIGNMENTS), name


def test_calibration_takes_every_sample_it_is_given():
    """A calibration set above 5000 samples used to be cut to 5000 while the manifest said otherwise."""
    setting = smoke_mlp(calibration_samples=6000)["mnist-mlp"]
    setting = replace(setting, recipe=replace(setting.recipe, train_subset=None))  # trained on all 60k images
    batches = pairs.calibration(setting, "cpu")
    assert sum(len(y) for _, y in batches) == 6000


def _rows(batches) -> set:
    """The normalised images of (x, y) batches, one hashable row per image (with its label)."""
    return {(x.numpy().tobytes(), int(y)) for xb, yb in batches for x, y in zip(xb, yb)}


def test_train_measurements_are_drawn_from_the_images_the_networks_trained_on():
    """Issue #22: "train" curves, calibration batches and the alignments' statistics (AM, CM, Sigma-WM, STE)
    come from the recipe's training subset, not from the whole training split."""
    from llfc_core import data

    setting = smoke_mlp(eval_train=1500, calibration_samples=1500, statistics_samples=1500, ste_subset=1500)["mnist-mlp"]
    assert setting.recipe.train_subset == 2000  # of 60,000: a draw from the whole split would leave it
    trained_on = _rows(data.batches(train.training_data(setting.recipe, "cpu"), 500))
    alignment = pairs.alignment_data(setting, "cpu")
    drawn = {"eval train": _rows(data.batches(pairs.eval_splits(setting, "cpu")["train"], 500)),
             "calibration": _rows(pairs.calibration(setting, "cpu")),
             "statistics": _rows(alignment.batches), "ste": _rows(alignment.epoch_batches(0))}
    for what, rows in drawn.items():
        assert len(rows) == 1500 and rows <= trained_on, what
    # the control: the same draw from the whole split (what the code did before) leaves the training subset
    whole = train.dataset_on("mnist", "train", "cpu").subset(1500, pairs.SUBSET_SEEDS["eval_train"])
    assert not _rows(data.batches(whole, 500)) <= trained_on


def test_pairs_of_a_setting(cache_dir, monkeypatch):
    setting = smoke_mlp(pairs=("spawn", "naive", "wm", "am"))["mnist-mlp"]
    models = pairs.train_models(setting, "cpu")
    built = pairs.build_pairs(models, "cpu")
    assert list(built) == ["spawn", "naive", "wm", "am"]
    b = models.others["independent"]
    assert all(a is models.a for a, _ in built.values())
    assert built["naive"][1] is b and built["spawn"][1] is models.others["spawn"]
    x = torch.randn(64, 1, 28, 28)
    for method in ("wm", "am"):  # an aligned B is B permuted: the same function, other weights
        aligned = built[method][1]
        assert torch.allclose(aligned(x), b(x), atol=1e-5)
        assert not torch.equal(aligned.state_dict()["fc1.weight"], b.state_dict()["fc1.weight"])
    # the spawned children share their first epoch, then differ; the independent B shares nothing
    assert not torch.equal(models.a.state_dict()["fc1.weight"], models.others["spawn"].state_dict()["fc1.weight"])
    # permutations are cached: a second request computes nothing
    monkeypatch.setattr(pairs, "_Matcher", lambda *a, **k: lambda: pytest.fail("recomputed cached permutations"))
    again = pairs.pair_perms(models, "wm", "cpu")
    assert all(torch.equal(again[p], v) for p, v in pairs.pair_perms(models, "wm", "cpu").items())


def test_permutation_keys_name_the_data_they_learn_from(cache_dir):
    setting = smoke_mlp()["mnist-mlp"]
    models = pairs.SettingModels(setting, None, keys={"a": "A", "independent": "B"})
    am, wm = pairs.perms_config(models, "am"), pairs.perms_config(models, "wm")
    assert am["statistics"] == [setting.statistics_samples, pairs.SUBSET_SEEDS["statistics"], pairs.STATS_BATCH]
    assert "statistics" not in wm  # weight matching sees no data
    other = pairs.SettingModels(replace(setting, statistics_samples=700), None, keys=models.keys)
    assert pairs.perms_config(other, "am") != am and pairs.perms_config(other, "wm") == wm


def test_replicates_are_independent_and_replicate_0_is_the_single_run(cache_dir):
    one = smoke_mlp(pairs=("spawn", "naive"), replicates=1)["mnist-mlp"]
    two = replace(one, replicates=2)
    assert "replicates" not in one.to_dict()  # no field, so the hash of a single run is what it was before
    assert profiles.setting_hash(two) != profiles.setting_hash(one)
    keys = [pairs.model_hashes(two.at_replicate(r)) for r in (0, 1)]
    single = pairs.model_hashes(one)
    assert {k: keys[0][k] for k in ("a", "spawn")} == {k: single[k] for k in ("a", "spawn")}
    # B of replicate r is replicate r+1's spawn partner (trained once); no network is in two replicates' pairs
    assert keys[0]["independent"] == keys[1]["spawn"] and keys[1]["independent"] == keys[0]["spawn"]
    assert len({keys[r][k] for r in (0, 1) for k in ("a", "independent")}) == 4
    single, both = tables.compute_table("lmc", one), tables.compute_table("lmc", two)
    assert list(both.columns[:2]) == ["setting", "replicate"] and sorted(set(both.replicate)) == [0, 1]
    spawn = both[(both.replicate == 0) & (both.pair == "spawn")].reset_index(drop=True)
    assert spawn.equals(single[single.pair == "spawn"].reset_index(drop=True))
    other = both[both.replicate == 1].reset_index(drop=True)
    assert not other.loss.equals(both[both.replicate == 0].reset_index(drop=True).loss)  # other seeds, networks
    with pytest.raises(ValueError, match="replicate 2 outside 0..1"):
        two.at_replicate(2)


def test_chapter6_cm_study_full_search_and_scatter(cache_dir):
    """CM's full search ends at or below its descent, which ends at or below the better of WM and AM (on the
    training subset it minimises); the scatter holds every permutation of the study and its perturbations."""
    setting = smoke_mlp(pairs=("spawn", "naive", "wm", "am"), replicates=1)["mnist-mlp"]
    cm = tables.compute_table("cm", setting).set_index("method")
    assert set(cm.index) == {"identity", "wm", "am", "cm_descent", "cm"}
    assert cm.objective["cm"] <= cm.objective["cm_descent"] + 1e-12 <= min(cm.objective[["wm", "am"]]) + 2e-12
    assert cm.objective_test.notna().all() and (cm.objective_test > 0).all()
    scatter = tables.compute_table("cm_scatter", setting).set_index("permutation")
    perturbed = [f"{b}~{f:g}" for b in ("cm", "am") for f in tables.SCATTER_FRACTIONS]
    assert set(scatter.index) == set(cm.index) | set(perturbed)
    assert scatter.loc["cm", "objective"] == pytest.approx(cm.objective["cm"])  # one set of moments for both
    assert scatter.loc["cm~0.4", "objective"] > scatter.loc["cm", "objective"]  # moving 40 % of CM's optimum costs
    assert ((scatter.loss_barrier > -1) & scatter.error_barrier.notna()).all()
