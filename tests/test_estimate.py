"""Estimates before a run (issue #20): FLOPs counted exactly, minutes linear in epochs and inverse in
throughput, the profile a budget buys, and `run --estimate`, which trains nothing."""
import time
from dataclasses import replace

import pytest
import torch

from llfc_core import estimate
from llfc_core.book import cli
from llfc_core.book import estimate as book_estimate
from llfc_core.book.profiles import PROFILES
from llfc_core.recipes import Recipe


@pytest.fixture(autouse=True)
def _fresh_measurements():
    estimate.clear_cache()
    yield
    estimate.clear_cache()


def _mlp(widths=(32, 16), dataset="mnist", **kw) -> Recipe:
    model = {"arch": "mlp", "in_features": 784 if dataset == "mnist" else 3072, "widths": list(widths), "num_classes": 10}
    return Recipe("test-mlp", dataset, model, **{"epochs": 3, "precision": "fp32", **kw})


@pytest.fixture
def fixed_rates(monkeypatch):
    """Every measured rate replaced by a constant: costs become a pure function of the counts."""
    monkeypatch.setattr(book_estimate, "estimated_throughput", lambda recipe, *a, **k: 1000.0)
    monkeypatch.setattr(book_estimate, "dense_flop_rate", lambda *a, **k: 1e10)
    monkeypatch.setattr(book_estimate, "assignment_seconds", lambda n: 1e-3)


def test_mlp_forward_flops_are_the_hand_count_and_the_step_is_counted_not_assumed():
    sizes = [(784, 32), (32, 16), (16, 10)]
    flops = estimate.flops_per_sample(_mlp().model, "mnist")
    # FlopCounterMode counts 2 FLOPs per multiply-add of every matrix product and no bias additions
    assert flops["forward"] == 2 * sum(i * o for i, o in sizes)
    # training step: the forward, a weight gradient per layer, an input gradient for all but the first layer
    assert flops["train"] == 3 * flops["forward"] - 2 * 784 * 32
    assert flops["ratio"] < 3
    assert flops["perm_sizes"] == [32, 16] and flops["relus"] == 2 and flops["linears"] == 3


def test_big_models_are_counted_without_being_built():
    start = time.perf_counter()
    wide = estimate.flops_per_sample({"arch": "resnet20", "width": 32, "norm": "ln"}, "cifar10")
    narrow = estimate.flops_per_sample({"arch": "resnet20", "width": 1, "norm": "ln"}, "cifar10")
    assert time.perf_counter() - start < 5  # the meta device: 270 M parameters never allocated
    assert 900 < wide["forward"] / narrow["forward"] < 1100  # convolutions scale as width^2


def test_training_minutes_are_linear_in_epochs_and_inverse_in_throughput(monkeypatch):
    monkeypatch.setattr(estimate, "estimated_throughput", lambda *a, **k: pytest.fail("a given throughput measures nothing"))
    recipe = _mlp(epochs=3)
    one = estimate.training_minutes(recipe, "cpu", throughput=1234.5)
    assert one == 3 * 60000 / 1234.5 / 60  # the whole MNIST training split
    assert estimate.training_minutes(replace(recipe, epochs=6), "cpu", throughput=1234.5) == 2 * one
    assert estimate.training_minutes(recipe, "cpu", throughput=2 * 1234.5) == one / 2
    assert estimate.training_minutes(replace(recipe, train_subset=6000), "cpu", throughput=1234.5) == 3 * 6000 / 1234.5 / 60
    cifar = _mlp(dataset="cifar10", epochs=3)
    assert estimate.training_minutes(cifar, "cpu", throughput=1000.0) == 3 * 50000 / 1000.0 / 60


def test_throughput_is_measured_once_per_config_and_leaves_the_rng_alone(monkeypatch):
    calls = []
    real = estimate._step_seconds

    def counted(*args):
        calls.append(args[0].model)
        return real(*args)

    monkeypatch.setattr(estimate, "_step_seconds", counted)
    state = torch.random.get_rng_state()
    first = estimate.measure_throughput(_mlp(batch_size=64), "cpu", steps=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first > 0 and len(calls) == 1
    assert estimate.measure_throughput(replace(_mlp(batch_size=64), epochs=9, lr=0.5), "cpu", steps=2) == first
    assert len(calls) == 1  # epochs and lr do not change a step: the same entry
    estimate.measure_throughput(_mlp(batch_size=32), "cpu", steps=2)
    assert len(calls) == 2  # another batch size is another measurement


def test_a_model_too_big_to_time_is_scaled_by_flops_from_a_narrower_one(monkeypatch):
    measured = []

    def fake(recipe, device, precision, steps, min_seconds=0.0):
        measured.append(recipe.model["widths"])
        return [0.5] * steps  # a step takes half a second, whatever the model

    monkeypatch.setattr(estimate, "_step_seconds", fake)
    big = _mlp(widths=(2048, 2048), batch_size=100)
    flops = estimate.flops_per_sample(big.model, "mnist")["train"]
    monkeypatch.setitem(estimate.MEASURE_LIMIT, "cpu", flops * 100 / 10)  # a tenth of one of its steps
    rate = estimate.estimated_throughput(big, "cpu")
    (anchor,) = measured
    assert max(anchor) < 2048  # the narrower member was run, the big one never
    anchor_flops = estimate.flops_per_sample(dict(big.model, widths=anchor), "mnist")["train"]
    assert anchor_flops * 100 <= flops * 100 / 10
    assert rate == pytest.approx(200.0 * anchor_flops / flops, rel=1e-12)  # the anchor's FLOP rate


def test_the_spawn_prefix_is_trained_once_and_ste_counts_as_training(fixed_rates):
    setting = PROFILES["smoke"]["mnist-mlp"]  # spawn, naive, wm, am, ste; spawn epoch 1 of 2; 2 replicates
    recipe, reps = setting.recipe, setting.replicates
    n, k, epochs = recipe.train_subset, setting.spawn_epoch, recipe.epochs
    # per replicate: the parent prefix once, A and the spawn partner; the independent B is the next replicate's
    # spawn partner (pairs.model_plan), trained once
    models = reps * (k + 2 * (epochs - k)) * n / 1000.0
    ste = reps * setting.ste_epochs * setting.ste_subset / 1000.0
    ste_steps = reps * setting.ste_epochs * -(-setting.ste_subset // 1000)
    projection = book_estimate.Estimator("cpu").weight_matching(recipe, book_estimate.STE_WM_SWEEPS)
    minutes = book_estimate.setting_minutes(setting, "cpu")
    assert minutes["train"] == pytest.approx((models + ste + ste_steps * projection) / 60, rel=1e-12)
    assert minutes["total"] == pytest.approx(minutes["train"] + minutes["evaluate"], rel=1e-12)
    assert minutes["evaluate"] > 0


def test_each_replicate_trains_and_measures_its_own_models(fixed_rates):
    setting = replace(PROFILES["smoke"]["cifar10-mlp"], pairs=("naive", "wm", "am"))  # A and B per replicate
    one = book_estimate.setting_minutes(setting, "cpu")
    three = book_estimate.setting_minutes(replace(setting, replicates=3), "cpu")
    assert three["train"] == pytest.approx(3 * one["train"], rel=1e-12)
    assert three["evaluate"] == pytest.approx(3 * one["evaluate"], rel=1e-12)
    # with a spawn pair, B is the next replicate's spawn partner: R replicates train R networks fewer
    spawned = replace(setting, pairs=("spawn", "naive", "wm"))
    one, three = (book_estimate.setting_minutes(replace(spawned, replicates=r), "cpu") for r in (1, 3))
    b = setting.recipe.epochs * setting.recipe.train_subset / 1000.0 / 60  # one B, at the fixed 1000 samples/s
    assert three["train"] == pytest.approx(3 * (one["train"] - b), rel=1e-12)


def test_work_shared_between_chapters_is_counted_once(fixed_rates):
    frame = book_estimate.profile_minutes("cpu", "cpu", chapters=["01_lmc", "02_llfc", "03_conditions"])
    by = frame.set_index(["chapter", "setting"])
    assert (by.loc["02_llfc", "train"] == 0).all()  # the models of chapter 1
    assert (by.loc["03_conditions", "total"] == 0).all()  # chapter 2's layer pass gave its tables
    assert frame.iloc[-1]["chapter"] == "total"
    assert frame.iloc[-1]["total"] == pytest.approx(frame.iloc[:-1]["total"].sum())
    alone = book_estimate.profile_minutes("cpu", "cpu", chapters=["03_conditions"])
    assert (alone.iloc[:-1]["total"] > 0).all()  # on its own it trains and measures


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_table_of_every_chapter_has_a_cost_model(fixed_rates, profile):
    """A whole cold run of each profile is estimated, chapter 6's merge included (a producer without a cost
    model once broke `run --estimate` and the GPU's default-profile choice)."""
    frame = book_estimate.profile_minutes(profile, "cpu")
    rows = frame.iloc[:-1]
    assert set(rows.chapter) == set(book_estimate.CHAPTER_TABLES)
    assert (rows.total >= 0).all() and frame.iloc[-1]["total"] == pytest.approx(rows.total.sum())  # work made once
    beyond = rows[rows.chapter == "06_beyond"]
    assert (beyond.evaluate > 0).all()  # chapter 6 measures things of its own in every setting (CM, merge, ...)


@pytest.mark.parametrize("device", ["cuda", "mps", "cpu"])
def test_choose_profile_grows_with_the_budget_and_never_picks_paper_on_a_cpu(monkeypatch, device):
    minutes = {"smoke": 5.0, "cpu": 60.0, "paper": 600.0}
    asked = []

    def total(profile, device=None, precision=None):
        asked.append(profile)
        return minutes[profile]

    monkeypatch.setattr(book_estimate, "profile_total_minutes", total)
    picks = [book_estimate.choose_profile(device, budget)[0] for budget in (1, 10, 100, 1000, 1e9)]
    if device == "cpu":
        assert picks == ["smoke", "smoke", "cpu", "cpu", "cpu"]
        assert "paper" not in asked  # not even estimated
        assert "never" in book_estimate.choose_profile(device, 1e9)[1]
    else:
        assert picks == ["smoke", "smoke", "cpu", "paper", "paper"]
    profile, reason = book_estimate.choose_profile(device, 1)
    assert profile == "smoke" and "no profile fits" in reason
    # the default budget of the device class: 3 h on a CPU or an Apple GPU, 8 h on a CUDA GPU
    default = book_estimate.DEFAULT_BUDGET_MINUTES[device]
    assert book_estimate.choose_profile(device)[0] == ("cpu" if default < minutes["paper"] or device == "cpu" else "paper")


def test_run_estimate_prints_a_line_per_setting_and_a_total_and_trains_nothing(monkeypatch, capsys, cache_dir, tmp_path):
    import llfc_core.train

    def refuse(*args, **kwargs):
        raise AssertionError("--estimate must not train")

    monkeypatch.setattr(llfc_core.train, "train", refuse)
    monkeypatch.setattr(llfc_core.train, "get_or_train", refuse)
    monkeypatch.setattr(estimate, "MIN_SECONDS", 0.0)  # 5 timed steps per model are enough here
    monkeypatch.setenv("LLFC_RESULTS", str(tmp_path / "results"))
    start = time.perf_counter()
    assert cli.main(["run", "--estimate", "--profile", "smoke", "--chapters", "01_lmc,05_width"]) == 0
    print(f"run --estimate at smoke: {time.perf_counter() - start:.1f} s")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimate on cpu (") and " thread" in lines[0]
    assert "timed training steps (5 steps after 1 warm-up step" in lines[0]
    for name in list(PROFILES["smoke"]) + ["mnist-depth1", "mnist-lr"]:
        assert any(line.split()[:2] in (["01_lmc", name], ["05_width", name]) for line in lines), name
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1 and float(total[0].split()[-1]) > 0
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))  # nothing trained, loaded or written
    assert not (tmp_path / "results").exists()


def test_run_estimate_refuses_fp16_on_the_cpu(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--estimate", "--profile", "smoke", "--precision", "fp16"])
    assert exit_.value.code == 2 and "fp16" in capsys.readouterr().err


def test_the_default_profile_on_a_gpu_is_the_largest_that_fits(monkeypatch, capsys):
    from llfc_core.book import estimate, profiles

    monkeypatch.setattr(profiles.torch.cuda, "is_available", lambda: False)
    assert profiles.default_profile() == "cpu"  # no GPU: the cpu profile, nothing estimated
    monkeypatch.setattr(profiles.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(estimate, "choose_profile", lambda device: ("cpu", "paper needs 900 min > 480"))
    assert profiles.default_profile() == "cpu"
    assert "paper needs 900 min > 480" in capsys.readouterr().out
