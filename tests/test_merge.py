import math

import numpy as np
import pytest
import torch
from torch import nn

from llfc_core.interpolate import interpolate
from llfc_core.merge import (MergeError, OutputEnsemble, ensemble_agreement, merge_by_features, merge_comparison)
from llfc_core.taps import find_taps
from llfc_core.models import build_model
from llfc_core.permutation import SpecError, apply_permutation, random_perms

from .test_models import randomise_norm_stats

ARCHS = {
    "mlp": ({"arch": "mlp", "in_features": 20, "widths": [16, 12], "num_classes": 5}, (20,)),
    "vgg16-bn": ({"arch": "vgg16", "norm": "bn", "width": 0.0625}, (3, 32, 32)),
    "resnet20-bn": ({"arch": "resnet20", "width": 1, "norm": "bn", "blocks_per_stage": 1}, (3, 16, 16)),
}


def _model(name, seed):
    config, shape = ARCHS[name]
    torch.manual_seed(seed)
    model = build_model(config)
    if config["arch"] != "mlp":
        randomise_norm_stats(model, he_init=False, shape=shape)  # non-trivial BN weights and statistics
    return model.eval()


def _batches(shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def _outputs(model, batches):
    with torch.no_grad():
        return torch.cat([model.eval()(x) for x, _ in batches])


def _features(model, batches):
    """Every ReLU's output and the logits, flattened and concatenated per sample: an op that misses its
    target shows even where a later layer (a head with more inputs than fit samples) could hide it."""
    relus = find_taps(model, batches[0][0])["relus"]
    modules, seen, out = dict(model.named_modules()), {}, []
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in relus]
    try:
        with torch.no_grad():
            for x, _ in batches:
                logits = model.eval()(x)
                out.append(torch.cat([seen[n].flatten(1) for n in relus] + [logits], 1))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


def _check_identity_bns(merged, model):
    """Every BN of the merged network is exactly x + bias in eval mode."""
    bns = [m for m in merged.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
        x = torch.randn(3, bn.num_features, 4, 4) * 50
        assert torch.equal(bn(x), x + bn.bias.view(1, -1, 1, 1))


# ------------------------------------------------------------------------------------ (a) exactness
@pytest.mark.parametrize("name", ARCHS)
def test_merging_a_network_with_itself_gives_it_back(name):
    model = _model(name, 0)
    shape = ARCHS[name][1]
    fit, held_out = _batches(shape, (24, 40), seed=1), _batches(shape, (32,), seed=2)
    merged = merge_by_features(model, model, fit, ridge=0.0)
    # On the fit data always; on other data only where the fit inputs span every op's input space (the
    # MLP here; the conv nets' last layers see fewer rows than they have inputs, and the minimum-norm
    # solution differs from the original off the span).
    for data in (fit, held_out) if name == "mlp" else (fit,):
        out, ref = _features(merged, data), _features(model, data)
        assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    if name != "mlp":
        _check_identity_bns(merged, model)
    assert not merged.training


@pytest.mark.parametrize("name", ARCHS)
def test_alpha_one_gives_a_and_alpha_zero_gives_b(name):
    """Each op targets its own output (residual branches included): at alpha = 1 the target is A's, on
    inputs that are A's, so A comes back exactly; at 0 B."""
    a, b = _model(name, 0), _model(name, 1)
    fit = _batches(ARCHS[name][1], (32,), seed=3)
    for alpha, ref in ((1.0, a), (0.0, b)):
        merged = merge_by_features(a, b, fit, alpha=alpha, ridge=0.0)
        assert (_features(merged, fit) - _features(ref, fit)).abs().max() <= 1e-5


def test_chunked_unfolding_gives_the_same_merge():
    a, b = _model("resnet20-bn", 0), _model("resnet20-bn", 1)
    fit = _batches(ARCHS["resnet20-bn"][1], (12, 12), seed=4)
    whole = merge_by_features(a, b, fit, ridge=1e-3)
    chunked = merge_by_features(a, b, fit, ridge=1e-3, max_elements=2000)  # ~1 sample per chunk, Linear 20 rows
    for (k, v), w in zip(whole.state_dict().items(), chunked.state_dict().values()):
        if v.is_floating_point():
            assert torch.allclose(v, w, atol=1e-5, rtol=1e-4), k


def test_a_and_b_are_left_unchanged_and_in_their_mode():
    a, b = _model("vgg16-bn", 0), _model("vgg16-bn", 1)
    a.train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    merge_by_features(a, b, _batches(ARCHS["vgg16-bn"][1], (8,)))
    assert a.training and not b.training
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


# ---------------------------------------------------------------------- (b) closed form in numpy
def _positive_mlp(seed):
    """4 -> 3 -> 2 with positive first-layer weights and biases: on positive inputs its ReLU is the
    identity, so the network is linear."""
    g = torch.Generator().manual_seed(seed)
    m = build_model({"arch": "mlp", "in_features": 4, "widths": [3], "num_classes": 2})
    with torch.no_grad():
        m.fc1.weight.copy_(torch.rand(3, 4, generator=g) + 0.1), m.fc1.bias.copy_(torch.rand(3, generator=g) + 0.1)
        m.head.weight.copy_(torch.randn(2, 3, generator=g)), m.head.bias.copy_(torch.randn(2, generator=g))
    return m.eval()


def _ridge_fit(x, y, ridge):
    """min ||[x 1] theta - y||^2 + lam ||W||^2, lam = ridge * tr(x^T x) / dim x, bias unpenalised."""
    xt = np.hstack([x, np.ones((len(x), 1))])
    pen = np.diag([1.0] * x.shape[1] + [0.0]) * ridge * np.trace(x.T @ x) / x.shape[1]
    theta = np.linalg.solve(xt.T @ xt + pen, xt.T @ y)
    return theta[:-1].T, theta[-1]


def test_linear_network_merge_is_the_closed_form_least_squares_answer():
    a, b = _positive_mlp(0), _positive_mlp(1)
    g = torch.Generator().manual_seed(5)
    fit = [(torch.rand(n, 4, generator=g), torch.zeros(n, dtype=torch.long)) for n in (30, 20)]
    alpha, ridge = 0.3, 1e-2
    merged = merge_by_features(a, b, fit, alpha=alpha, ridge=ridge)

    np_ = {k: v.double().numpy() for k, v in [*(("a." + k, v) for k, v in a.state_dict().items()),
                                              *(("b." + k, v) for k, v in b.state_dict().items())]}
    x = torch.cat([x for x, _ in fit]).double().numpy()
    lin = lambda h, net, layer: h @ np_[f"{net}.{layer}.weight"].T + np_[f"{net}.{layer}.bias"]  # noqa: E731
    # Layer 1: target alpha * (A's fc1 output) + (1 - alpha) * (B's) on the inputs x.
    w1, b1 = _ridge_fit(x, alpha * lin(x, "a", "fc1") + (1 - alpha) * lin(x, "b", "fc1"), ridge)
    # Layer 2: the merged network's own features (not A's, not B's), target the average of the heads'.
    h = np.maximum(x @ w1.T + b1, 0)
    assert (x @ w1.T + b1 > 0).all()  # the ReLU is the identity: the network is linear
    fa, fb = np.maximum(lin(x, "a", "fc1"), 0), np.maximum(lin(x, "b", "fc1"), 0)
    y2 = alpha * lin(fa, "a", "head") + (1 - alpha) * lin(fb, "b", "head")
    w2, b2 = _ridge_fit(h, y2, ridge)

    for got, want in ((merged.fc1.weight, w1), (merged.fc1.bias, b1), (merged.head.weight, w2), (merged.head.bias, b2)):
        np.testing.assert_allclose(got.detach().double().numpy(), want, atol=2e-5, rtol=1e-4)
    # The test tells inputs apart: fitting the head on A's features instead gives another answer.
    w2_on_a, _ = _ridge_fit(fa, y2, ridge)
    assert np.abs(w2_on_a - w2).max() > 1e-2


# --------------------------------------------------------------------- (c) closer to the average
def _mlp_and_noisy_copy():
    torch.manual_seed(0)
    a = build_model({"arch": "mlp", "in_features": 10, "widths": [32, 32], "num_classes": 5}).eval()
    b = build_model({"arch": "mlp", "in_features": 10, "widths": [32, 32], "num_classes": 5}).eval()
    g = torch.Generator().manual_seed(7)
    b.load_state_dict({k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in a.state_dict().items()})
    return a, b


def _mlp_features(net, x):
    with torch.no_grad():
        h1 = net.relu1(net.fc1(x))
        h2 = net.relu2(net.fc2(h1))
        return h1, h2, net.head(h2)


def test_merged_features_are_closer_to_the_average_features_than_the_weight_average():
    """B = A + noise. The first op of the merge fits alpha W_A x + (1 - alpha) W_B x on x itself, i.e. it
    *is* the weight average when x has full rank (ridge 0); from the second op on, the merge fits the
    average features on its own inputs and beats theta_alpha on held-out data."""
    a, b = _mlp_and_noisy_copy()
    g = torch.Generator().manual_seed(8)
    fit = [(torch.randn(256, 10, generator=g), torch.zeros(256, dtype=torch.long)) for _ in range(2)]
    x_test = torch.randn(512, 10, generator=g)
    theta = interpolate(a, b, 0.5)
    merged0 = merge_by_features(a, b, fit, ridge=0.0)
    assert torch.allclose(merged0.fc1.weight, theta.fc1.weight, atol=1e-6)
    assert torch.allclose(merged0.fc1.bias, theta.fc1.bias, atol=1e-6)

    merged = merge_by_features(a, b, fit)  # default ridge
    fa, fb, fm, ft = (_mlp_features(n, x_test) for n in (a, b, merged, theta))
    gap = lambda f, i: float(((f[i] - (fa[i] + fb[i]) / 2) ** 2).sum())  # noqa: E731
    assert gap(fm, 0) == pytest.approx(gap(ft, 0), rel=0.01)   # layer 1: the same map
    assert gap(fm, 1) < 0.85 * gap(ft, 1)                      # layer 2 (post-ReLU features)
    assert gap(fm, 2) < 0.85 * gap(ft, 2)                      # logits


# -------------------------------------------------------------------------- (d) agreement by hand
class _Slice(nn.Module):
    """A 'model' whose logits are columns [start, start + 3) of its input."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def forward(self, x):
        return x[:, self.start:self.start + 3]


class _Constant(nn.Module):
    """Predicts class k for every sample."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return 5.0 * nn.functional.one_hot(torch.full((len(x),), self.k), 3).double()


# Each sample holds (A's logits, B's logits).
#   s1 A=(2,0,0)   B=(0,0,0)   -> 0
#   s2 A=(0,3,0)   B=(0,3,0)   -> 1
#   s3 A=(4,0,0)   B=(0,1,0)   pA=(.965,.018,.018) pB=(.212,.576,.212): mean (.588,.297,.115) -> 0
#   s4 A=(1,0,-20) B=(0,0,4)   pA=(.731,.269,0)   pB=(.018,.018,.965): mean (.374,.143,.482) -> 2
#                              (the logit average (.5, 0, -8) would say 0; with alpha = .9 the mixture is
#                               (.660,.244,.096) -> 0)
#   s5 A=(0,0,5)   B=(0,0,5)   -> 2
_SAMPLES = torch.tensor([[2, 0, 0, 0, 0, 0], [0, 3, 0, 0, 3, 0], [4, 0, 0, 0, 1, 0], [1, 0, -20, 0, 0, 4],
                         [0, 0, 5, 0, 0, 5]], dtype=torch.float64)
_LABELS = torch.tensor([0, 1, 1, 0, 2])
_PREDS = [0, 1, 0, 2, 2]


def _hand_batches():
    return [(_SAMPLES[:2], _LABELS[:2]), (_SAMPLES[2:], _LABELS[2:])]


def test_ensemble_agrees_with_itself():
    a, b = _Slice(0), _Slice(3)
    res = ensemble_agreement(OutputEnsemble(a, b), a, b, _hand_batches())
    assert res["agreement"] == 1.0
    assert res["n"] == 5
    assert res["error"] == res["ensemble_error"] == pytest.approx(2 / 5)  # s3 (says 0, is 1), s4 (says 2, is 0)
    assert res["loss"] == pytest.approx(res["ensemble_loss"])
    # its loss is the mixture's cross-entropy
    pa, pb = torch.softmax(_SAMPLES[:, :3], 1), torch.softmax(_SAMPLES[:, 3:], 1)
    assert res["ensemble_loss"] == pytest.approx(float(-torch.log(((pa + pb) / 2)[range(5), _LABELS]).mean()))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_constant_model_agrees_on_its_class_share(k):
    a, b = _Slice(0), _Slice(3)
    res = ensemble_agreement(_Constant(k), a, b, _hand_batches())
    assert res["agreement"] == pytest.approx(_PREDS.count(k) / 5)   # 2/5, 1/5, 2/5
    assert res["error"] == pytest.approx(float((_LABELS != k).double().mean()))


def test_agreement_follows_alpha_and_the_ensemble_kind():
    a, b = _Slice(0), _Slice(3)
    # s4 goes to class 0 with the logit average, and with alpha = 0.9 (A weighted): class 0 on s1, s3, s4
    logits = ensemble_agreement(_Constant(0), a, b, _hand_batches(), ensemble="logits")
    assert logits["agreement"] == pytest.approx(3 / 5)
    assert ensemble_agreement(_Constant(0), a, b, _hand_batches(), alpha=0.9)["agreement"] == pytest.approx(3 / 5)
    # alpha = 1 is A alone: A predicts 0, 1, 0, 0, 2
    assert ensemble_agreement(_Slice(0), a, b, _hand_batches(), alpha=1.0)["agreement"] == 1.0


# ------------------------------------------------------------------------------ merge_comparison
def test_merge_comparison_rows_and_columns():
    a, b = _model("resnet20-bn", 0), _model("resnet20-bn", 1)
    spec = b.permutation_spec()
    b_shuffled = apply_permutation(b, spec, random_perms(spec.sizes(b.state_dict()), seed=3))
    shape = ARCHS["resnet20-bn"][1]
    fit, test = _batches(shape, (16, 16), seed=5), _batches(shape, (20,), seed=6)
    frame = merge_comparison(a, b, b_shuffled, fit, iter(test))
    assert list(frame.columns) == ["method", "aligned", "error", "loss", "agreement_with_ensemble"]
    assert list(frame.method) == ["A", "B", "ensemble", "theta_alpha", "feature_merge", "theta_alpha", "feature_merge"]
    assert frame.aligned.isna().tolist() == [True] * 3 + [False] * 4
    assert frame.aligned[3:].tolist() == [True, True, False, False]
    row = frame.set_index("method")
    assert row.loc["ensemble", "agreement_with_ensemble"] == 1.0
    assert row.loc["A", "error"] == pytest.approx(ensemble_agreement(a, a, b, test)["error"])
    assert row.loc["A", "agreement_with_ensemble"] == pytest.approx(ensemble_agreement(a, a, b, test)["agreement"])
    assert frame[["error", "loss", "agreement_with_ensemble"]].notna().all().all()


def test_merge_comparison_of_identical_networks():
    """B = A: every method computes A (the merge with ridge 0)."""
    a = _model("mlp", 0)
    fit, test = _batches((20,), (64,), seed=1), _batches((20,), (50,), seed=2)
    frame = merge_comparison(a, a, a, fit, test, ridge=0.0)
    assert np.allclose(frame.error, frame.error[0]) and np.allclose(frame.agreement_with_ensemble, 1.0)
    assert np.allclose(frame.loss, frame.loss[0], atol=1e-5)


# ------------------------------------------------------------------------------- (e) validation
def test_bad_alpha_is_refused():
    a = _model("mlp", 0)
    fit = _batches((20,), (8,))
    for alpha in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            merge_by_features(a, a, fit, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            ensemble_agreement(a, a, a, fit, alpha=alpha)
    with pytest.raises(ValueError, match="ridge"):
        merge_by_features(a, a, fit, ridge=-1.0)
    with pytest.raises(ValueError, match="ensemble"):
        ensemble_agreement(a, a, a, fit, ensemble="median")


def test_empty_or_one_shot_batches_are_refused():
    a = _model("mlp", 0)
    with pytest.raises(ValueError, match="empty"):
        merge_by_features(a, a, [])
    with pytest.raises(ValueError, match="re-iterable"):
        merge_by_features(a, a, iter(_batches((20,), (8,))))
    with pytest.raises(ValueError, match="empty"):
        ensemble_agreement(a, a, a, [])
    with pytest.raises(ValueError, match="empty"):
        merge_comparison(a, a, a, _batches((20,), (8,)), [])


def test_nan_weights_and_different_architectures_are_refused():
    a, b = _model("mlp", 0), _model("mlp", 1)
    fit = _batches((20,), (8,))
    with torch.no_grad():
        b.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model B has NaN.*fc2\.weight"):
        merge_by_features(a, b, fit)
    other = build_model({"arch": "mlp", "in_features": 20, "widths": [16, 13], "num_classes": 5})
    with pytest.raises(SpecError, match="shape"):
        merge_by_features(a, other, fit)


@pytest.mark.parametrize("config", [{"arch": "resnet20", "width": 1, "norm": "ln", "blocks_per_stage": 1},
                                    {"arch": "vgg16", "norm": "ln", "width": 0.0625}])
def test_per_sample_norms_are_refused(config):
    m = build_model(config)
    with pytest.raises(MergeError, match="GroupNorm.*normalises each sample"):
        merge_by_features(m, m, _batches((3, 32, 32), (4,)))


def test_a_layernorm_and_a_batchnorm_not_after_an_op_are_refused():
    ln = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(MergeError, match="LayerNorm"):
        merge_by_features(ln, ln, _batches((6,), (4,)))
    late = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 2)).eval()
    with pytest.raises(MergeError, match="does not take a linear op's output"):
        merge_by_features(late, late, _batches((6,), (4,)))
    emb = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.PReLU(), nn.Linear(5, 2))
    with pytest.raises(MergeError, match="PReLU"):
        merge_by_features(emb, emb, _batches((6,), (4,)))


def test_batchnorm1d_after_a_linear_is_folded_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        net[1].running_mean.normal_(), net[1].running_var.uniform_(0.5, 2)
        net[1].weight.normal_(), net[1].bias.normal_()
    fit = _batches((6,), (40,))
    merged = merge_by_features(net, net, fit, ridge=0.0)
    assert (_outputs(merged, fit) - _outputs(net, fit)).abs().max() <= 1e-5
    assert torch.equal(merged[1].running_var + merged[1].eps, torch.ones(5))
