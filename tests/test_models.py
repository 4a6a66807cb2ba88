import pytest
import torch
from torch import nn

from llfc_core.metrics import LOGITS, TapError, find_taps
from llfc_core.models import build_model
from llfc_core.permutation import SpecError, check_invariance

CONFIGS = {
    "mlp": ({"arch": "mlp", "in_features": 784, "widths": [16, 24, 8]}, (5, 1, 28, 28)),
    "vgg16-bn": ({"arch": "vgg16", "norm": "bn", "width": 0.125}, (5, 3, 32, 32)),
    "vgg16-ln": ({"arch": "vgg16", "norm": "ln", "width": 0.125}, (5, 3, 32, 32)),
    "vgg16-none": ({"arch": "vgg16", "norm": "none", "width": 0.125}, (5, 3, 32, 32)),
    "vgg16-official-head": ({"arch": "vgg16", "norm": "bn", "width": 0.125, "head": "official"}, (5, 3, 32, 32)),
    "resnet20-bn": ({"arch": "resnet20", "width": 1, "norm": "bn"}, (5, 3, 32, 32)),
    "resnet20x2-ln": ({"arch": "resnet20", "width": 2, "norm": "ln"}, (5, 3, 32, 32)),
}


def randomise_norm_stats(model, he_init: bool = True):
    """Non-trivial norm parameters and BN statistics measured on random data (so activations stay alive
    through 13+ layers), so that the invariance checks are not vacuous."""
    from llfc_core.interpolate import reset_bn

    for m in model.modules():
        if he_init and isinstance(m, (nn.Linear, nn.Conv2d)):
            # He init keeps the signal's size through 13+ plain layers; positive biases keep units alive
            # (dead units are interchangeable, which would make a planted permutation unidentifiable).
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                m.bias.data.uniform_(0.1, 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
    shape = next(s for c, s in CONFIGS.values() if c == model.config or c["arch"] == model.config["arch"])
    return reset_bn(model, [(torch.randn(64, *shape[1:]), None)])


@pytest.mark.parametrize("name", CONFIGS)
def test_permutation_leaves_function_unchanged(name):
    config, shape = CONFIGS[name]
    model = randomise_norm_stats(build_model(config), he_init=False)  # outputs of order 1, as trained nets have
    x = torch.randn(shape)
    for seed in range(3):
        assert check_invariance(model, model.permutation_spec(), x, seed=seed, atol=1e-5) <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_spec_catches_a_missing_axis(name):
    config, shape = CONFIGS[name]
    model = randomise_norm_stats(build_model(config))
    spec = model.permutation_spec()
    key = next(k for k, v in spec.axes.items() if k.endswith("weight") and len(v) >= 2 and v[1] is not None)
    spec.axes[key] = (spec.axes[key][0], None) + tuple(spec.axes[key][2:])  # forget the input permutation
    with pytest.raises(SpecError, match="different function"):
        check_invariance(model, spec, torch.randn(shape))


def test_vacuous_check_is_refused():
    model = build_model(CONFIGS["mlp"][0])
    with torch.no_grad():
        model.head.weight.zero_()
    with pytest.raises(ValueError, match="same output for every example"):
        check_invariance(model, model.permutation_spec(), torch.randn(4, 784))


def test_spec_must_cover_every_tensor():
    model = build_model(CONFIGS["mlp"][0])
    spec = model.permutation_spec()
    del spec.axes["fc2.bias"]
    with pytest.raises(SpecError, match="fc2.bias"):
        check_invariance(model, spec, torch.randn(2, 784))


@pytest.mark.parametrize("name", CONFIGS)
def test_taps_have_documented_shapes(name):
    config, shape = CONFIGS[name]
    model = build_model(config)
    taps = find_taps(model, torch.randn(shape))
    modules = dict(model.named_modules())
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert sorted(taps["relus"]) == sorted(relus)  # every ReLU module is measured
    assert taps["depth"][LOGITS] == len(relus) + 1
    seen = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].shape, o.shape)))
             for n in taps["relus"]]
    model.eval()(torch.randn(shape))
    for h in hooks:
        h.remove()
    for n in taps["relus"]:
        pre, post = seen[n]
        assert pre == post and pre[0] == shape[0]  # pre-activation and feature: (N, C) or (N, C, H, W)
        # dense (N, C) after a Linear (MLPs, the official VGG head's hidden layers), else (N, C, H, W)
        dense = isinstance(modules.get(n.replace("relu", "fc")), nn.Linear)
        assert len(pre) == (2 if dense else 4)


def test_resnet_every_relu_is_tapped_including_inside_blocks():
    model = build_model({"arch": "resnet20", "width": 1, "norm": "bn"})
    taps = find_taps(model, torch.randn(2, 3, 32, 32))
    assert len(taps["relus"]) == 19  # stem + 9 blocks x 2
    assert "stage2.0.relu1" in taps["relus"] and "stage3.2.relu2" in taps["relus"]
    assert "stage2.0.shortcut.conv" in taps["linears"]
    # The shortcut conv and conv2 both feed relu2 of the block: same depth.
    assert taps["depth"]["stage2.0.shortcut.conv"] == taps["depth"]["stage2.0.conv2"] == taps["depth"]["stage2.0.relu2"]


def test_vgg_has_13_convs_and_relus():
    model = build_model({"arch": "vgg16", "width": 0.125})
    taps = find_taps(model, torch.randn(2, 3, 32, 32))
    assert len(taps["relus"]) == 13 and len(taps["linears"]) == 14


def test_reused_relu_is_refused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 2))
    with pytest.raises(TapError, match="more than once"):
        find_taps(model, torch.randn(3, 4))


def test_inplace_relu_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with pytest.raises(TapError, match="in-place"):
        find_taps(model, torch.randn(3, 4))


@pytest.mark.parametrize("config,match", [
    ({"arch": "transformer"}, "unknown architecture"),
    ({"arch": "mlp", "widths": [0, 4]}, "positive sizes"),
    ({"arch": "vgg16", "norm": "weird"}, "unknown norm"),
    ({"arch": "resnet20", "width": 0}, "width >= 1"),
    ({"arch": "mlp", "depth": 3}, "bad settings for mlp"),
])
def test_bad_model_configs(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


def test_mlp_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="expects 784 input features, got 3072"):
        build_model({"arch": "mlp"})(torch.randn(2, 3, 32, 32))


def test_invariance_check_is_strict_for_large_outputs(monkeypatch):
    """Outputs of size ~100: a correct spec passes (rounding only), while a permuted model that differs by
    5e-4 fails at atol 1e-5. Before, the absolute tolerance was scaled by the outputs and let it through."""
    from llfc_core import permutation

    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "in_features": 784, "widths": [64, 64], "num_classes": 10})
    with torch.no_grad():
        model.head.weight.mul_(300.0)
    x = torch.randn(8, 784)
    spec = model.permutation_spec()
    assert model(x).abs().max() > 50
    check_invariance(model, spec, x)
    honest = permutation.apply_permutation

    def off_by_a_little(model, spec, perms):
        out = honest(model, spec, perms)
        with torch.no_grad():
            out.head.bias.add_(5e-4)
        return out

    monkeypatch.setattr(permutation, "apply_permutation", off_by_a_little)
    with pytest.raises(SpecError, match="different function"):
        check_invariance(model, spec, x)
