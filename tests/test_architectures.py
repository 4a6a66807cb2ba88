"""The "add an architecture" checklist of the book's about_code page, enforced for every architecture
`build_model` knows (`llfc_core.models.ARCHITECTURES`): each needs small configs here, and then
(a) its permutation spec leaves the function unchanged,
(b) weight matching recovers a planted permutation exactly,
(c) the streaming metrics equal the materialised reference,
(d) its ReLUs and linear ops follow the naming scheme the metrics tap (pre-activations, features, depths).
A newly registered architecture without an entry in SMALL_CONFIGS fails every test below."""
import pytest
import torch

from llfc_core.matching import weight_matching
from llfc_core.models import ARCHITECTURES, build_model
from llfc_core.permutation import apply_permutation, check_invariance, inverse, random_perms

from .test_metrics import assert_streaming_equals_reference
from .test_models import assert_taps_follow_the_naming_scheme, randomise_norm_stats

SMALL_CONFIGS = {  # arch -> small configs covering its variants (each runs in a few seconds on one core)
    "mlp": [{"arch": "mlp", "in_features": 784, "widths": [16, 24, 8]}],
    "vgg16": [{"arch": "vgg16", "norm": "bn", "width": 0.125, "head": "official"},  # conv + BN, then dense layers
              {"arch": "vgg16", "norm": "none", "width": 0.0625}],                    # conv biases, no norm
    "resnet20": [{"arch": "resnet20", "width": 1, "norm": "bn", "blocks_per_stage": 1},  # shortcut convs, BN
                 {"arch": "resnet20", "width": 1, "norm": "ln", "blocks_per_stage": 2}],  # identity shortcuts, LN
}
INPUT_SHAPES = {"mlp": (1, 28, 28), "vgg16": (3, 32, 32), "resnet20": (3, 32, 32)}
CASES = [pytest.param(arch, i, id=f"{arch}-{i}") for arch in sorted(ARCHITECTURES)
         for i in range(max(1, len(SMALL_CONFIGS.get(arch, ()))))]


def small(arch: str, i: int, he_init: bool):
    """Config i of `arch` built with non-trivial norm parameters and statistics, and an input shape."""
    assert arch in SMALL_CONFIGS and arch in INPUT_SHAPES, (
        f"architecture {arch!r} is registered but has no small config: add it to SMALL_CONFIGS and INPUT_SHAPES "
        "in tests/test_architectures.py (the book's 'Recipe: add an architecture')")
    config = SMALL_CONFIGS[arch][i]
    model = build_model(config)
    assert type(model) is ARCHITECTURES[arch]
    return randomise_norm_stats(model, he_init=he_init, shape=INPUT_SHAPES[arch]), INPUT_SHAPES[arch]


def test_every_registered_architecture_has_small_configs():
    assert set(SMALL_CONFIGS) == set(ARCHITECTURES) == set(INPUT_SHAPES)
    for arch, configs in SMALL_CONFIGS.items():
        assert configs and all(c["arch"] == arch for c in configs), arch


@pytest.mark.parametrize("arch,i", CASES)
def test_spec_leaves_the_function_unchanged(arch, i):
    model, shape = small(arch, i, he_init=False)  # outputs of order 1, as trained networks have
    x = torch.randn(8, *shape)
    for seed in range(3):
        assert check_invariance(model, model.permutation_spec(), x, seed=seed, atol=1e-5) <= 1e-5


@pytest.mark.parametrize("arch,i", CASES)
def test_weight_matching_recovers_a_planted_permutation(arch, i):
    a, _ = small(arch, i, he_init=True)  # distinct, live units: the planted permutation is identifiable
    spec = a.permutation_spec()
    planted = random_perms(spec.sizes(a.state_dict()), seed=7)
    assert any(not torch.equal(v, torch.arange(len(v))) for v in planted.values())
    b = apply_permutation(a, spec, planted)
    found = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0).perms
    assert set(found) == set(planted)
    for p, v in planted.items():
        assert torch.equal(found[p], inverse(v)), p
    back = apply_permutation(b, spec, found).state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("arch,i", CASES)
def test_streaming_metrics_equal_the_materialised_reference(arch, i):
    torch.manual_seed(1)
    a, shape = small(arch, i, he_init=True)
    torch.manual_seed(2)
    b, _ = small(arch, i, he_init=True)
    fast = assert_streaming_equals_reference(a, b, torch.randn(24, *shape), alphas=(0.25, 0.75))
    assert fast["llfc"].cos_dist.max() > 1e-3  # two different networks: the comparison is not of zeros


@pytest.mark.parametrize("arch,i", CASES)
def test_taps_follow_the_naming_scheme(arch, i):
    model, shape = small(arch, i, he_init=False)
    assert_taps_follow_the_naming_scheme(model, torch.randn(5, *shape))
