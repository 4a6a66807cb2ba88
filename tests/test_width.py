"""Chapter 5's core: the neuron cloud (moments, dimension, distances), covariance-weighted weight matching,
the cosine schedule, the sweep runner (in-process and on Ray) and the width claims in both directions."""
import math

import pandas as pd
import pytest
import torch

from llfc_core.book import claims, sweep
from llfc_core.matching import covariance_weight_matching
from llfc_core.models import MLP
from llfc_core.neurons import augmented_weight, input_moments, linear_ops, matching_distances, neuron_dimensions, participation_ratio
from llfc_core.permutation import PermutationSpec, SpecError, apply_permutation, random_perms
from llfc_core.recipes import Recipe, get_recipe
from llfc_core.train import get_or_train
from llfc_core.book.width import Sweep, measure_cell

torch.set_default_dtype(torch.float32)


def _batches(n=3, size=64, features=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def test_cosine_schedule_warms_up_then_follows_a_half_cosine_to_zero():
    r = get_recipe("cpu-mlp-mnist", schedule="cosine", epochs=10, warmup_epochs=2, lr=0.4)
    assert r.lr_at(1) == pytest.approx(0.2)                      # halfway through the warm-up
    assert r.lr_at(2) == pytest.approx(0.4)                      # the peak
    assert r.lr_at(6) == pytest.approx(0.2)                      # half of the decay: cos(pi/2) -> half the peak
    assert r.lr_at(4) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert r.lr_at(10) == pytest.approx(0.0, abs=1e-12)


def test_participation_ratio_by_hand():
    assert participation_ratio(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert participation_ratio(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(16 / 10)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))  # invariant under rotations
    x = q @ torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    assert participation_ratio(x) == pytest.approx(1.6)


def _two_neuron_mlp():
    net = MLP(in_features=3, widths=(2,), num_classes=1)
    with torch.no_grad():
        net.fc1.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        net.fc1.bias.zero_()
        net.head.weight.copy_(torch.tensor([[1.0, 1.0]]))
        net.head.bias.zero_()
    return net


def test_neuron_dimensions_by_hand():
    net = _two_neuron_mlp()
    # plain: W W^T = diag(1, 4) -> (1 + 4)^2 / (1 + 16). Sigma = diag(4, 1, 1) (bias entry 1, mean 0):
    # W~ M W~^T = diag(4, 4) -> 2: the covariance makes the two neurons equally long.
    moments = {"fc1": torch.diag(torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
               "head": torch.eye(3, dtype=torch.float64)}
    row = neuron_dimensions(net, moments).set_index("layer").loc["fc1"]
    assert row.pr_plain == pytest.approx(25 / 17) and row.pr_sigma == pytest.approx(2.0)
    assert (row.neurons, row.fan_in) == (2, 3)


def test_input_moments_are_the_augmented_second_moments():
    net = MLP(in_features=6, widths=(5, 4), num_classes=3)
    batches = _batches()
    m = input_moments(net, batches)
    x = torch.cat([b[0] for b in batches])
    z = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    torch.testing.assert_close(m["fc1"], z.T @ z / len(z))
    h = torch.relu(net.fc1(x)).detach()
    z2 = torch.cat([h, torch.ones(len(h), 1)], 1).double()
    torch.testing.assert_close(m["fc2"], z2.T @ z2 / len(z2), rtol=1e-5, atol=1e-6)


def test_matching_distances_by_hand_and_zero_for_the_same_net():
    a, b = _two_neuron_mlp(), _two_neuron_mlp()
    with torch.no_grad():
        b.fc1.weight[0, 0] = 0.0  # D = [[1, 0, 0 | 0], [0]]: ||D|| = 1, ||W~_A|| = sqrt(5)
    moments = {"fc1": torch.diag(torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
               "head": torch.eye(3, dtype=torch.float64)}
    row = matching_distances(a, b, moments).set_index("layer").loc["fc1"]
    assert row.dist_plain == pytest.approx(1 / math.sqrt(5))
    assert row.dist_sigma == pytest.approx(math.sqrt(4 / (4 + 4)))  # D M D^T = 4, W~ M W~^T = 4 + 4
    same = matching_distances(a, a, moments)
    assert (same.dist_plain == 0).all() and (same.dist_sigma == 0).all()


def test_sigma_wm_recovers_a_planted_permutation_exactly():
    torch.manual_seed(3)
    a = MLP(in_features=6, widths=(16, 12, 8), num_classes=3)
    spec = a.permutation_spec()
    planted = random_perms(spec.sizes(a.state_dict()), seed=5)
    b = apply_permutation(a, spec, planted)
    found = covariance_weight_matching(a, b, spec, _batches()).perms
    back = apply_permutation(b, spec, found).state_dict()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_sigma_wm_uses_the_covariance():
    """Two B neurons equally far from A's in the plain norm; the input covariance makes one closer."""
    a = MLP(in_features=2, widths=(2,), num_classes=1)
    b = MLP(in_features=2, widths=(2,), num_classes=1)
    with torch.no_grad():
        for net in (a, b):
            net.fc1.bias.zero_(), net.head.bias.zero_(), net.head.weight.fill_(1.0)
        a.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        # plain: identity and swap both cost 1 + 1, a tie
        b.fc1.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    spec = a.permutation_spec()
    x = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])  # input variance only along the first coordinate
    perms = covariance_weight_matching(a, b, spec, [(x, torch.zeros(2, dtype=torch.long))]).perms
    # in the Sigma norm only the first coordinate counts: a0 = (1, .) is b1 = (1, .), a1 = (0, .) is b0
    assert perms["P1"].tolist() == [1, 0]


def test_sigma_wm_refuses_a_spec_without_feed_forward_order():
    a, b = MLP(in_features=4, widths=(4, 4), num_classes=2), MLP(in_features=4, widths=(4, 4), num_classes=2)
    spec = a.permutation_spec()
    axes = dict(spec.axes, **{"fc1.weight": ("P1", "P2")})  # fc1's input said to carry fc2's permutation
    bad = PermutationSpec(axes, spec.activations)
    with pytest.raises(SpecError, match="feed-forward"):
        covariance_weight_matching(a, b, bad, _batches(features=4))


# ------------------------------------------------------------------------------------ the runner
_calls = []


def _counting_measure(cell: dict) -> dict:
    _calls.append(cell["i"])
    return {"rows": pd.DataFrame({"i": [cell["i"]], "square": [cell["i"] ** 2 / 3]})}


def test_sweep_caches_each_cell_and_resumes(cache_dir):
    _calls.clear()
    first = sweep.run(_counting_measure, [{"i": i} for i in range(3)])
    assert _calls == [0, 1, 2]
    again = sweep.run(_counting_measure, [{"i": i} for i in range(4)])  # one new cell: only it runs
    assert _calls == [0, 1, 2, 3]
    for got, want in zip(again, first):
        pd.testing.assert_frame_equal(got["rows"], want["rows"])
    assert again[3]["rows"].square.iloc[0] == pytest.approx(3.0)


def _tiny_sweep():
    return Sweep("tiny", "mnist", widths=(8, 16), replicates=2, epochs=1, train_subset=500, eval_train=200,
                 eval_test=200, statistics=200)


@pytest.mark.slow
def test_a_sweep_on_local_ray_gives_the_in_process_tables(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the Ray path needs the optional extra .[sweep]")
    cells = _tiny_sweep().cells()
    assert len(cells) == 4
    monkeypatch.setenv("LLFC_CACHE", str(tmp_path / "in-process"))
    here = sweep.run(measure_cell, cells)
    monkeypatch.setenv("LLFC_CACHE", str(tmp_path / "ray"))  # an empty cache: Ray computes every cell
    try:
        sweep.start_ray("local", num_cpus=2)
        there = sweep.run(measure_cell, cells, ray_address="local")
    finally:
        ray.shutdown()
    assert (tmp_path / "ray" / "models").exists()  # the workers trained into the cache they were given
    for a, b in zip(here, there):
        assert set(a) == {"lmc", "layers", "cost", "dims"} == set(b)
        for kind in a:
            pd.testing.assert_frame_equal(a[kind], b[kind])


def test_measure_cell_rows(cache_dir):
    cell = _tiny_sweep().cells()[0]
    out = measure_cell(cell)
    lmc = out["lmc"]
    assert set(lmc.method) == {"naive", "wm", "iwm", "swm", "am"} and set(lmc.split) == {"train", "test"}
    assert lmc[["hidden_layers", "width", "lr", "replicate"]].iloc[0].tolist() == [1, 8, 0.1, 0]
    assert out["layers"].depth.tolist()[:2] == [1, 2]  # the layer's own depth (relu1, logits), not the grid's
    # the endpoints do not depend on how B is permuted
    assert lmc.groupby("split").error_ends.nunique().eq(1).all()
    # The matched clouds are closer than the naive ones, where each method guarantees it. Sigma-WM solves
    # fc1's permutation (the only one: one hidden layer) exactly in A's input norm, so its fc1 dist_sigma
    # is at most naive's; WM maximises <A, pi(B)> over every permuted tensor, i.e. minimises the summed
    # squared plain distance sum_l (dist_plain_l ||W~_A,l||)^2 (head.bias, never permuted, adds the same
    # constant to every method).
    cost = out["cost"].set_index(["method", "layer"])
    assert set(cost.loc["naive"].index) == {"fc1", "head"}
    assert cost.loc[("swm", "fc1"), "dist_sigma"] < cost.loc[("naive", "fc1"), "dist_sigma"] - 0.1  # 1.18 vs 1.44
    recipe = Recipe(**dict(cell["recipe"], milestones=tuple(cell["recipe"]["milestones"])))
    a, _ = get_or_train(recipe, *cell["seeds"]["a"], device="cpu")  # from the cache measure_cell filled
    norm2 = {name: float(augmented_weight(m).double().norm() ** 2) for name, m in linear_ops(a).items()}
    total = {method: sum(cost.loc[(method, l), "dist_plain"] ** 2 * norm2[l] for l in norm2) for method in ("naive", "wm")}
    assert total["wm"] < 0.9 * total["naive"], total
    assert cost.loc["wm"].dist_plain.mean() < cost.loc["naive"].dist_plain.mean()  # 1.23 vs 1.39
    # W2 per hidden op (none for the head's fixed rows); IWM's first layer is the exact W2 of the two clouds,
    # so no permutation (naive's identity, WM's) has a lower one
    assert cost.loc[("iwm", "head"), "w2_sq"] != cost.loc[("iwm", "head"), "w2_sq"]  # NaN
    assert cost.loc[("iwm", "fc1"), "w2_sq"] <= min(cost.loc[(m, "fc1"), "w2_sq"] for m in ("naive", "wm")) + 1e-12
    dims = out["dims"]
    assert set(zip(dims.model, dims.stage)) == {("a", "init"), ("a", "trained")} and set(dims.layer) == {"fc1"}
    # a centred cloud of m points spans at most m - 1 directions (and at most fan_in + 1)
    assert ((dims.pr_centred >= 1 - 1e-9) & (dims.pr_centred <= dims.neurons - 1 + 1e-9)).all()
    assert (dims.twonn > 0).all() and (dims.twonn_sigma > 0).all()


# ------------------------------------------------------------------------------------ the claims
def _width_frames(matched_slope: float, naive_barrier: float, swm_factor: float, llfc_sign: float, dim_sign: float):
    """Synthetic chapter-5 tables: one sweep over widths (barrier = c * width^slope), one over rates."""
    lmc, layers, dims = [], [], []
    for setting, widths, lrs in (("w", (16, 64, 256, 1024), (0.1,)), ("lr", (512,), (1e-3, 1e-2, 3e-2, 1e-1))):
        for width in widths:
            for i, lr in enumerate(lrs):
                for replicate in range(2):
                    cell = {"setting": setting, "hidden_layers": 1, "width": width, "lr": lr, "replicate": replicate}
                    for method in ("naive", "wm", "swm", "am"):
                        if method == "naive":
                            b = naive_barrier
                        else:
                            b = 0.5 * (width / 16) ** matched_slope * (swm_factor if method == "swm" else 1.0)
                            b *= (1 + i) if setting == "lr" else 1.0
                        lmc.append({**cell, "method": method, "split": "test", "loss_barrier": b, "error_barrier": b / 5})
                        layers.append({**cell, "method": method, "layer": "relu1",
                                       "cos_dist": 0.5 + llfc_sign * b, "cos_dist_baseline": 1.0})
                    dims.append({**cell, "model": "a", "stage": "trained", "layer": "fc1",
                                 "twonn": 10 + dim_sign * i, "twonn_sigma": 3.0})
    return pd.DataFrame(lmc), pd.DataFrame(layers), pd.DataFrame(dims)


def _statuses(frames):
    rows = claims.width_claims(*frames, "cpu")
    return {(r["claim"], r["setting"], r["pair"]): r["passed"] for r in rows}


def test_width_claims_pass_where_the_theory_holds():
    got = _statuses(_width_frames(matched_slope=-0.5, naive_barrier=2.0, swm_factor=0.8, llfc_sign=1, dim_sign=1))
    assert got[("width.barrier_falls", "w", "wm")] and got[("width.barrier_falls", "w", "swm")]
    assert got[("width.matching_needed", "w", "am")]
    assert got[("width.sigma_wm", "w", "swm")] and got[("width.sigma_wm", "lr", "swm")]
    assert got[("width.dimension_barrier", "lr", "wm")]
    assert all(got[("width.llfc_follows_lmc", "w", m)] for m in ("wm", "swm", "am"))
    assert ("width.llfc_follows_lmc", "w", "naive") not in got and ("width.llfc_follows_lmc", "lr", "wm") not in got
    assert ("width.barrier_falls", "lr", "wm") not in got  # one width: no slope to fit


def test_width_claims_fail_where_it_does_not():
    got = _statuses(_width_frames(matched_slope=0.0, naive_barrier=0.2, swm_factor=1.3, llfc_sign=-1, dim_sign=-1))
    assert not got[("width.barrier_falls", "w", "wm")]          # flat in width
    assert not got[("width.matching_needed", "w", "wm")]        # naive no worse than matched
    assert not got[("width.sigma_wm", "w", "swm")]              # Sigma-WM worse than WM
    assert not got[("width.dimension_barrier", "lr", "wm")]     # dimension falls as the barrier rises
    assert not got[("width.llfc_follows_lmc", "w", "am")]       # the barrier is flat in width: no correlation
