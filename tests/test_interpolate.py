import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from llfc_core import data
from llfc_core.interpolate import (barriers, corrected_interpolation, interpolate, interpolate_state,
                                   interpolation_curve, repair_points, channel_stats)
from llfc_core.models import build_model
from llfc_core.recipes import Recipe
from llfc_core.train import evaluate, train


def test_alpha_one_is_a_and_zero_is_b():
    a, b = build_model({"arch": "mlp", "widths": [8]}), build_model({"arch": "mlp", "widths": [8]})
    for k, v in interpolate(a, b, 1.0).state_dict().items():
        assert torch.equal(v, a.state_dict()[k])
    for k, v in interpolate(a, b, 0.0).state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    mid = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    assert torch.allclose(mid["fc1.weight"], 0.25 * a.fc1.weight + 0.75 * b.fc1.weight)


def test_barrier_of_a_model_with_itself_is_zero():
    ds = data.load("mnist", "test").subset(300)
    a = build_model({"arch": "mlp", "widths": [16]})
    curve = interpolation_curve(a, a, {"test": ds}, alphas=7)
    row = barriers(curve).iloc[0]
    assert row.loss_barrier == pytest.approx(0, abs=1e-6) and row.error_barrier == pytest.approx(0, abs=1e-12)


def test_barrier_of_a_known_curve():
    alphas = np.linspace(0, 1, 5)
    loss = [1.0, 2.5, 3.0, 2.0, 0.0]  # endpoints: M(B) = 1 at alpha 0, M(A) = 0 at alpha 1
    curve = pd.DataFrame({"alpha": alphas, "split": "test", "loss": loss, "error": [0.1, 0.3, 0.2, 0.1, 0.1]})
    row = barriers(curve).iloc[0]
    # linear reference at alpha: alpha * 0 + (1 - alpha) * 1 -> excess 2.5 - 0.75, 3 - 0.5, 2 - 0.25
    assert row.loss_barrier == pytest.approx(2.5)
    assert row.error_barrier == pytest.approx(0.2)


@pytest.mark.slow  # trains a VGG-16: 15-50 s on one core
def test_bn_reset_restores_accuracy_of_interpolated_bn_model():
    recipe = Recipe("tiny-bn", "cifar10", {"arch": "vgg16", "norm": "bn", "width": 0.125}, epochs=3, lr=0.05,
                    batch_size=64, train_subset=1000, schedule="triangle", warmup_epochs=0.5)
    a = train(recipe, init_seed=0, data_seed=0, device="cpu").model
    b = train(recipe, init_seed=0, data_seed=1, until=None, device="cpu").model  # same init: spawn-like pair
    tr = data.load("cifar10", "train").subset(1000)
    te = data.load("cifar10", "test").subset(500)
    calib = list(data.batches(tr, 250))
    plain = evaluate(corrected_interpolation(a, b, 0.5, "none", calib), te)["error"]
    reset = evaluate(corrected_interpolation(a, b, 0.5, "bn_reset", calib), te)["error"]
    ends = max(evaluate(a, te)["error"], evaluate(b, te)["error"])
    print(f"endpoints {ends:.3f}, interpolated {plain:.3f}, after BN reset {reset:.3f}")
    assert reset < plain and reset <= ends + 0.05


def test_repair_matches_target_statistics():
    torch.manual_seed(0)
    a, b = build_model({"arch": "mlp", "widths": [32, 32]}), build_model({"arch": "mlp", "widths": [32, 32]})
    x = torch.randn(512, 784)
    batches = [(x[:256], None), (x[256:], None)]
    alpha = 0.3
    model = corrected_interpolation(a, b, alpha, "repair", batches)
    names = repair_points(model)
    assert names == ["fc1", "fc2"]
    sa, sb, sm = (channel_stats(m, names, batches) for m in (a, b, model))
    # The first point is exact; later ones match up to the batch-vs-data statistics difference.
    mean_t = alpha * sa["fc1"][0] + (1 - alpha) * sb["fc1"][0]
    std_t = alpha * sa["fc1"][1] + (1 - alpha) * sb["fc1"][1]
    assert torch.allclose(sm["fc1"][0], mean_t, atol=1e-5) and torch.allclose(sm["fc1"][1], std_t, rtol=1e-3)
    mean_t2 = alpha * sa["fc2"][0] + (1 - alpha) * sb["fc2"][0]
    assert torch.allclose(sm["fc2"][0], mean_t2, atol=0.05)


BN_CONFIGS = {"vgg16-bn": {"arch": "vgg16", "norm": "bn", "width": 0.125},
              "resnet20-bn": {"arch": "resnet20", "width": 1, "norm": "bn", "blocks_per_stage": 1}}


def _bn_pair(name):
    """Two different BN networks with non-trivial norm parameters and statistics (measured on N(0, 1)
    inputs), and calibration inputs from another distribution, so that a BN reset alone changes them."""
    from .test_models import randomise_norm_stats

    torch.manual_seed(1)
    a = randomise_norm_stats(build_model(BN_CONFIGS[name]), he_init=False)
    torch.manual_seed(2)
    b = randomise_norm_stats(build_model(BN_CONFIGS[name]), he_init=False)
    return a, b, torch.randn(64, 3, 32, 32) * 1.5 + 0.3


def _target_stats(a, b, names, batches, alpha):
    sa, sb = channel_stats(a, names, batches), channel_stats(b, names, batches)
    return {n: (alpha * sa[n][0] + (1 - alpha) * sb[n][0], alpha * sa[n][1] + (1 - alpha) * sb[n][1]) for n in names}


@pytest.mark.parametrize("name", BN_CONFIGS)
def test_repair_on_batchnorm_gives_every_norm_output_the_interpolated_statistics(name):
    """REPAIR's promise on BN networks (after their BN reset): every BatchNorm's output channels have, on the
    calibration data, the alpha-interpolation of A's and B's means and stds. With one calibration batch
    the renormalising pass sees the same statistics it folds in, so this holds exactly at every point."""
    a, b, x = _bn_pair(name)
    calib, alpha = [(x, None)], 0.3
    model = corrected_interpolation(a, b, alpha, "repair", calib)
    names = repair_points(model)
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)] and len(names) >= 9
    target = _target_stats(a, b, names, calib, alpha)
    got = channel_stats(model, names, calib)
    plain = channel_stats(corrected_interpolation(a, b, alpha, "none", calib), names, calib)
    for n in names:
        mean_t, std_t = target[n]
        torch.testing.assert_close(got[n][0], mean_t, rtol=0, atol=1e-5 * float(std_t.max()), msg=n)  # seen: 6e-7
        torch.testing.assert_close(got[n][1], std_t, rtol=1e-5, atol=0, msg=n)                         # seen: 4e-7
    # without REPAIR the interpolated network's statistics are far from the target (the check has teeth)
    assert max(float((plain[n][1] / target[n][1] - 1).abs().max()) for n in names) > 0.5


@pytest.mark.parametrize("name", BN_CONFIGS)
def test_repair_on_batchnorm_is_exact_at_the_first_point_with_several_batches(name):
    """With several calibration batches each point is renormalised batch by batch in the measuring pass, so
    only the first point (whose input does not depend on the others) is exact over the whole data."""
    a, b, x = _bn_pair(name)
    calib, alpha = [(c, None) for c in x.chunk(4)], 0.6
    model = corrected_interpolation(a, b, alpha, "repair", calib)
    first = repair_points(model)[0]
    assert first in ("norm1", "stem.norm")
    mean_t, std_t = _target_stats(a, b, [first], calib, alpha)[first]
    mean, std = channel_stats(model, [first], calib)[first]
    torch.testing.assert_close(mean, mean_t, rtol=0, atol=1e-5 * float(std_t.max()))
    torch.testing.assert_close(std, std_t, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", BN_CONFIGS)
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_repair_at_the_endpoints_gives_back_a_and_b(name, alpha):
    """theta_1 is A's weights with statistics reset on other data; REPAIR then restores every BN output's
    per-channel mean and std to A's, and a per-channel affine map is fixed by those two, so the network is
    A again, on any input (one calibration batch: exact at every point). Likewise theta_0 and B."""
    a, b, x = _bn_pair(name)
    end = a if alpha == 1.0 else b
    model = corrected_interpolation(a, b, alpha, "repair", [(x, None)])
    reset = corrected_interpolation(a, b, alpha, "bn_reset", [(x, None)])
    held_out = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        want, got, after_reset = end.eval()(held_out), model(held_out), reset(held_out)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * scale)  # seen: 3e-6 x scale
    assert float((after_reset - want).abs().max()) > 0.01 * scale  # the BN reset alone had changed the function


def test_unknown_correction_and_missing_calibration():
    a = build_model({"arch": "vgg16", "width": 0.0625})
    with pytest.raises(ValueError, match="unknown correction"):
        corrected_interpolation(a, a, 0.5, "magic", [])
    with pytest.raises(ValueError, match="needs `calibration`"):
        interpolation_curve(a, a, {}, correction="bn_reset")


@pytest.mark.slow  # trains a VGG-16: 15-50 s on one core
def test_bn_reset_recovers_when_only_statistics_are_wrong():
    """B = A with corrupted running statistics: theta_0.5 has A's weights and wrong statistics, so a BN
    reset must bring back A's accuracy while the uncorrected interpolation is far off."""
    recipe = Recipe("tiny-bn2", "cifar10", {"arch": "vgg16", "norm": "bn", "width": 0.125}, epochs=3, lr=0.05,
                    batch_size=64, train_subset=2000, schedule="triangle", warmup_epochs=0.5)
    a = train(recipe, init_seed=0, data_seed=0, device="cpu").model
    b = interpolate(a, a, 1.0)
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(25.0)
            m.running_mean.add_(1.0)
    te = data.load("cifar10", "test").subset(1000)
    calib = list(data.batches(data.load("cifar10", "train").subset(2000, 7), 250))
    err_a = evaluate(a, te)["error"]
    plain = evaluate(corrected_interpolation(a, b, 0.5, "none", calib), te)["error"]
    reset = evaluate(corrected_interpolation(a, b, 0.5, "bn_reset", calib), te)["error"]
    print(f"A {err_a:.3f}, interpolated {plain:.3f}, after BN reset {reset:.3f}")
    assert abs(reset - err_a) <= 0.03 and plain >= err_a + 0.1


def test_bad_alphas_and_mismatched_architectures_are_refused():
    """One clear error each, before any computation: alpha outside [0, 1] (the curve's ends would no
    longer be the endpoints) and two models of different widths."""
    from llfc_core.metrics import layer_metrics
    from llfc_core.permutation import SpecError

    a = build_model({"arch": "mlp", "widths": [8, 8]})
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        interpolate(a, a, 1.5)
    with pytest.raises(ValueError, match=r"alphas must lie in \[0, 1\]"):
        interpolation_curve(a, a, {}, alphas=[-0.5, 0.5])
    b = build_model({"arch": "mlp", "widths": [8, 9]})
    with pytest.raises(SpecError, match="fc2.weight"):
        interpolate(a, b, 0.5)
    with pytest.raises(SpecError, match="fc2.weight"):
        layer_metrics(a, b, [(torch.randn(2, 784), None)])
