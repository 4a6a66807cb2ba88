import re

import pytest
import torch
from torch import nn

from llfc_core.taps import LOGITS, TapError, find_taps
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


def randomise_norm_stats(model, he_init: bool = True, shape: tuple | None = None):
    """Non-trivial norm parameters and BN statistics measured on random data (so activations stay alive
    through 13+ layers), so that the invariance checks are not vacuous. `shape`: the input's shape without
    the batch axis (default: that of the model's architecture in CONFIGS)."""
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
    if shape is None:
        shape = next(s for c, s in CONFIGS.values() if c == model.config or c["arch"] == model.config["arch"])[1:]
    return reset_bn(model, [(torch.randn(64, *shape), None)])


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


def _fed_relu(op: str) -> str:
    """The feature layer a linear op feeds, by the documented naming scheme: fc<k>/conv<k> -> relu<k>,
    a ResNet block's conv2 and shortcut.conv -> its relu2, stem.conv -> stem.relu, head -> logits."""
    if op == "head":
        return LOGITS
    op = op.replace("shortcut.conv", "conv2")
    prefix, _, leaf = op.rpartition(".")
    return (prefix + "." if prefix else "") + re.sub(r"^(fc|conv)", "relu", leaf)


def _expected_pre(relu: str, outputs: dict, modules: dict) -> torch.Tensor:
    """A ReLU's pre-activation from the outputs of the ops before it: norm<k> (fc<k> where there is no
    norm module), plus the shortcut's output (or the block input, through nn.Identity) for a ResNet relu2."""
    prefix, _, leaf = relu.rpartition(".")
    join = (lambda s: f"{prefix}.{s}") if prefix else (lambda s: s)
    k = leaf[len("relu"):]
    source = next(join(f"{kind}{k}") for kind in ("norm", "fc") if join(f"{kind}{k}") in modules)
    pre = outputs[source]
    if leaf == "relu2" and join("shortcut") in modules:
        pre = pre + outputs[join("shortcut")]  # the same sum, in the same order, as BasicBlock.forward
    return pre


def assert_taps_follow_the_naming_scheme(model, x: torch.Tensor) -> None:
    """On a real forward pass, what the metrics' recorder keeps for each ReLU is the output of the ops
    before it (its pre-activation) and relu of that (its feature), with the documented shapes; the
    ReLUs are listed in execution order with depths 1..L-1, and every linear op has the depth of the ReLU
    its name says it feeds. Also used by tests/test_architectures.py for every registered architecture."""
    from llfc_core.taps import Recorder  # what layer_metrics records per batch

    model.eval()
    taps = find_taps(model, x)
    modules = dict(model.named_modules())
    calls, outputs = [], {}

    def keep(n):
        def hook(module, inputs, output):
            calls.append(n)
            outputs[n] = output.detach()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items() if n]
    rec = Recorder(model, taps["relus"], taps["linears"])
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        rec.remove()
        for h in handles:
            h.remove()
    relus = [n for n in calls if isinstance(modules[n], nn.ReLU)]
    assert sorted(taps["relus"]) == sorted(n for n, m in modules.items() if isinstance(m, nn.ReLU))  # none escapes
    assert taps["relus"] == relus  # execution order ...
    assert [taps["depth"][n] for n in relus] == list(range(1, len(relus) + 1))  # ... is depth order
    assert taps["depth"][LOGITS] == len(relus) + 1 and torch.equal(outputs["head"], logits)
    assert taps["linears"] == [n for n in calls if isinstance(modules[n], (nn.Linear, nn.Conv2d))]
    for op in taps["linears"]:
        assert taps["depth"][op] == taps["depth"][_fed_relu(op)], op
    for n in relus:
        pre, post = rec.pre[n], rec.post[n]
        assert torch.equal(pre, _expected_pre(n, outputs, modules)), n
        assert torch.equal(post, torch.relu(pre)), n
        assert (pre < 0).any() and (pre > 0).any(), n  # the ReLU acts: pre and feature genuinely differ
        # dense (N, C) after a Linear (MLPs, the official VGG head's hidden layers), else (N, C, H, W)
        dense = isinstance(modules.get(n.replace("relu", "fc")), nn.Linear)
        assert pre.shape[0] == len(x) and pre.dim() == (2 if dense else 4), n


@pytest.mark.parametrize("name", CONFIGS)
def test_taps_record_pre_activations_features_and_depths(name):
    config, shape = CONFIGS[name]
    assert_taps_follow_the_naming_scheme(randomise_norm_stats(build_model(config), he_init=False), torch.randn(shape))


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
