import math

import pandas as pd
import pytest
import torch

from llfc_core import data
from llfc_core.interpolate import interpolate
from llfc_core.metrics import PairAccumulator, layer_metrics, lemma1_check
from llfc_core.probes import principal_angles, stitching_errors
from llfc_core.taps import LOGITS
from llfc_core.models import build_model
from llfc_core.reference import layer_metrics_materialised

from .test_models import CONFIGS, randomise_norm_stats


def tiny_pair():
    """2-2-2 MLPs with hand-picked weights (see the hand computation in the test below)."""
    a, b = (build_model({"arch": "mlp", "in_features": 2, "widths": [2], "num_classes": 2}) for _ in range(2))
    with torch.no_grad():
        for m in (a, b):
            for p in m.parameters():
                p.zero_()
        a.fc1.weight.copy_(torch.eye(2)), a.head.weight.copy_(torch.eye(2))
        b.fc1.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]])), b.head.weight.copy_(2 * torch.eye(2))
    return a, b


def test_metrics_equal_hand_computed_values():
    a, b = tiny_pair()
    x = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    out = layer_metrics(a, b, [(x, None)], alphas=(0.5,))
    llfc = out["llfc"].set_index("layer")
    cond = out["conditions"].set_index("layer")
    # relu1: f_A = (1,0),(1,0); f_B = (0,1),(0,1); theta_0.5 has W1 = [[.5,.5],[.5,.5]] so
    # f_alpha = (.5,.5),(0,0); f_lin = (.5,.5),(.5,.5). Per sample 1 - cos = 0 and 1 (a zero vector).
    assert llfc.loc["relu1", "cos_dist"] == pytest.approx(0.5)
    assert llfc.loc["relu1", "cos_dist_baseline"] == pytest.approx(1.0)  # f_A orthogonal to f_B
    assert llfc.loc["relu1", "scale_c"] == pytest.approx(1.0)  # <f_lin, f_a> = 0.5 = ||f_a||^2
    assert llfc.loc["relu1", "thm1_dist"] == pytest.approx(0.5 / math.sqrt(0.5))  # ||d||^2 = .5, norms sqrt(.5), 1
    assert cond.loc["relu1", "dist_sigma"] == pytest.approx(0.5 / math.sqrt(0.5))  # same two tensors here
    # logits: W2_alpha = 1.5 I, so logits_alpha = (.75,.75),(0,0); f_lin = .5 (1,0) + .5 (0,2) = (.5, 1).
    cos = (0.75 * 0.5 + 0.75 * 1.0) / (math.hypot(0.75, 0.75) * math.hypot(0.5, 1.0))
    assert llfc.loc[LOGITS, "cos_dist"] == pytest.approx(((1 - cos) + 1) / 2)
    assert llfc.loc[LOGITS, "scale_c"] == pytest.approx(1.125 / 1.125)
    # commutativity at the head: W_A = I, W_B = 2I, H_A = (1,0), H_B = (0,1) per sample:
    # lhs = H_A + 2 H_B = (1,2), rhs = H_B + 2 H_A = (2,1): ||lhs - rhs||^2 = 2 per sample, ||lhs||^2 = 5.
    assert cond.loc["head", "dist_com"] == pytest.approx(4 / 10)
    assert cond.loc["head", "dist_w"] == pytest.approx(2 / (math.sqrt(2) * math.sqrt(8)))
    assert cond.loc["head", "dist_h"] == pytest.approx(4 / 2)
    assert cond.loc["fc1", "dist_com"] == 0 and cond.loc["fc1", "dist_h"] == 0  # both see the input


def test_accumulator_quantiles_and_zero_vectors():
    acc = PairAccumulator()
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    acc.add(x, y)
    s = acc.summary()
    expected = [0.0, 0.0, 1 - 1 / math.sqrt(2), 1.0]
    assert s["cos_dist"] == pytest.approx(sum(expected) / 4)
    assert s["cos_dist_p90"] == pytest.approx(1.0, rel=0.03)
    assert s["cos_dist_p50"] == 0.0  # half the samples are identical
    assert s["dist_sample"] == pytest.approx((0 + 0 + 1 / math.sqrt(2) + 2 / 1) / 4)


# Every numeric column `layer_metrics` returns is either compared with `reference.layer_metrics_materialised`
# (REFERENCE_COLUMNS, by `assert_streaming_equals_reference`) or listed in NOT_COMPARED with the reason;
# `test_every_metric_column_is_compared_or_allowed` fails on a column in neither (the "add a metric" checklist
# of the book's about_code page).
REFERENCE_COLUMNS = {  # (frame, row kind) -> columns compared with the reference
    ("llfc", None): ("cos_dist", "cos_dist_baseline", "scale_c", "thm1_dist"),
    ("conditions", "relu"): ("dist_sigma",),
    ("conditions", "linear"): ("dist_com", "dist_w", "dist_h"),
}
NOT_COMPARED = {  # numeric columns the reference does not produce, and why that is safe
    "llfc": {
        "depth": "a key, checked against the taps in test_models",
        "alpha": "a key: the alphas asked for",
        "cos_dist_std": "spread of the per-sample values whose mean, cos_dist, is compared",
        "cos_dist_p50": "quantile of the same per-sample values (histogram; hand-checked in test_accumulator_quantiles)",
        "cos_dist_p90": "quantile of the same per-sample values (histogram; hand-checked in test_accumulator_quantiles)",
        "frob_cos_dist": "1 - <x,y>/(|x||y|) of the same sums as scale_c and thm1_dist: checked through that "
                         "identity in assert_streaming_equals_reference",
        "frob_cos_dist_baseline": "the same sum-level cosine for A vs B (PairAccumulator.summary, as frob_cos_dist)",
    },
    "conditions": {
        "depth": "a key, checked against the taps in test_models",
        "alpha": "a key: the alphas asked for",
        "dist_sigma_sample": "per-sample mean of the distance whose data-set value, dist_sigma, is compared",
        "dist_com_sample": "per-sample mean of the distance whose data-set value, dist_com, is compared",
        "dist_h_sample": "per-sample mean of the distance whose data-set value, dist_h, is compared",
    },
}


def _reference_value(ref: dict, frame: str, row) -> dict:
    """The reference's numbers for one row of `layer_metrics`' frame."""
    if frame == "llfc":
        return ref["llfc"][(row.layer, row.alpha)]
    if row.kind == "relu":
        return {"dist_sigma": ref["sigma"][(row.layer, row.alpha)]}
    return ref["com"][row.layer]


def assert_streaming_equals_reference(a, b, x: torch.Tensor, alphas=(0.25, 0.75), batches: int = 4) -> dict:
    """layer_metrics over `x` cut into random, uneven batches equals the materialised reference in every
    REFERENCE_COLUMNS column of every row (float64 sums of float32 features: rel 1e-6). Returns the frames."""
    cuts = sorted(torch.randperm(len(x) - 2)[:batches - 1].add(1).tolist())
    fast = layer_metrics(a, b, [(x[i:j], None) for i, j in zip([0] + cuts, cuts + [len(x)])], alphas=alphas)
    ref = layer_metrics_materialised(a, b, x, alphas=alphas)
    for (frame, kind), columns in REFERENCE_COLUMNS.items():
        rows = fast[frame] if kind is None else fast[frame][fast[frame].kind == kind]
        assert len(rows), (frame, kind)
        for _, row in rows.iterrows():
            expected = _reference_value(ref, frame, row)
            for col in columns:
                assert row[col] == pytest.approx(expected[col], rel=1e-6, abs=1e-9), (row.layer, row.alpha, col)
    # frob_cos_dist from the compared columns: with r = |f_lin| / |f_alpha| and cos = 1 - frob_cos_dist,
    # scale_c = cos r and thm1_dist = r + 1/r - 2 cos.
    llfc = fast["llfc"]
    cos = 1 - llfc.frob_cos_dist
    r = llfc.scale_c / cos
    assert (r + 1 / r - 2 * cos).to_numpy() == pytest.approx(llfc.thm1_dist.to_numpy(), rel=1e-6, abs=1e-9)
    return fast


def _random_pair(name: str):
    config, shape = CONFIGS[name]
    torch.manual_seed(1)
    a = randomise_norm_stats(build_model(config))
    torch.manual_seed(2)
    b = randomise_norm_stats(build_model(config))
    return a, b, torch.randn(48, *shape[1:])


@pytest.mark.parametrize("name", ["mlp", "vgg16-bn", "resnet20-bn",
                                  pytest.param("resnet20x2-ln", marks=pytest.mark.slow)])  # 15-25 s on one core
def test_streaming_equals_materialised_reference(name):
    assert_streaming_equals_reference(*_random_pair(name))


def test_every_metric_column_is_compared_or_allowed():
    """Add a metric: its column must be compared with the reference (REFERENCE_COLUMNS) or be listed, with its
    reason, in NOT_COMPARED. A column in neither fails here; so does an allow-list entry for a column that is
    gone, or one that is also compared."""
    a, b = tiny_pair()
    out = layer_metrics(a, b, [(torch.tensor([[1.0, 0.0], [1.0, -1.0]]), None)], alphas=(0.5,))
    for frame in ("llfc", "conditions"):
        numeric = set(out[frame].select_dtypes("number").columns)
        compared = {c for (f, _), cols in REFERENCE_COLUMNS.items() if f == frame for c in cols}
        allowed = set(NOT_COMPARED[frame])
        assert not compared & allowed, f"{frame}: both compared and allow-listed: {sorted(compared & allowed)}"
        assert numeric - compared - allowed == set(), (
            f"{frame}: new columns {sorted(numeric - compared - allowed)}: compare them with "
            "llfc_core.reference in REFERENCE_COLUMNS, or list them in NOT_COMPARED with the reason")
        assert (compared | allowed) - numeric == set(), f"{frame}: no longer returned: {sorted((compared | allowed) - numeric)}"


@pytest.mark.parametrize("name", ["mlp", "resnet20-bn"])
def test_a_model_with_itself_satisfies_everything(name):
    config, shape = CONFIGS[name]
    a = randomise_norm_stats(build_model(config))
    out = layer_metrics(a, a, [(torch.randn(16, *shape[1:]), None)])
    assert (out["llfc"].cos_dist.abs() < 1e-6).all() and (out["llfc"].thm1_dist.abs() < 1e-6).all()
    assert ((out["llfc"].scale_c - 1).abs() < 1e-5).all()
    cond = out["conditions"]
    assert (cond.dist_sigma.dropna() == 0).all() and (cond.dist_com.dropna() == 0).all()


def conditions_pair():
    """A two-layer pair built to satisfy both conditions exactly on any data:
    W1_B = 2 W1_A, b1_B = 2 b1_A (same activation patterns: weak additivity), and W2_B = W2_A + D where
    D touches only hidden units that are dead on the data (so (W2_A - W2_B) H = 0: commutativity)."""
    torch.manual_seed(0)
    a = build_model({"arch": "mlp", "in_features": 6, "widths": [10], "num_classes": 3})
    with torch.no_grad():
        a.fc1.bias[7:] = -1e3  # units 7, 8, 9 never fire
    b = interpolate(a, a, 1.0)
    with torch.no_grad():
        b.fc1.weight.mul_(2), b.fc1.bias.mul_(2)
        b.head.weight[:, 7:] += torch.randn(3, 3)
        b.head.bias.add_(0.5)
    return a, b


def test_theorem1_holds_exactly_when_its_conditions_hold():
    a, b = conditions_pair()
    out = layer_metrics(a, b, [(torch.randn(64, 6), None)], alphas=(0.25, 0.5, 0.75))
    cond, llfc = out["conditions"], out["llfc"]
    assert (cond.dist_sigma.dropna() < 1e-12).all()      # Condition I
    assert (cond.dist_com.dropna() < 1e-12).all()        # Condition II
    assert (cond[cond.layer == "head"].dist_w > 0.01).all()  # ... with genuinely different weights
    assert (llfc.thm1_dist < 1e-10).all()                # conclusion: LLFC ...
    assert ((llfc.scale_c - 1).abs() < 1e-6).all()       # ... with c = 1, in every layer


def test_unrelated_pair_violates_the_conditions():
    torch.manual_seed(0)
    config = {"arch": "mlp", "in_features": 20, "widths": [32, 32], "num_classes": 5}
    a, b = build_model(config), build_model(config)
    out = layer_metrics(a, b, [(torch.randn(128, 20), None)])
    cond = out["conditions"]
    assert (cond.dist_sigma.dropna() > 0.01).all()
    hidden = cond[(cond.kind == "linear") & (cond.layer != "fc1")]
    assert (hidden.dist_com > 0.1).all()
    assert (out["llfc"][out["llfc"].layer != LOGITS].cos_dist > 0.01).all()


def test_every_resnet_relu_is_measured():
    a = build_model({"arch": "resnet20", "width": 1})
    out = layer_metrics(a, a, [(torch.randn(4, 3, 32, 32), None)], alphas=(0.5,))
    layers = set(out["llfc"].layer)
    assert len(layers) == 20 and {f"stage{s}.{b}.relu{r}" for s in (1, 2, 3) for b in range(3) for r in (1, 2)} < layers
    assert set(out["conditions"][out["conditions"].kind == "linear"].layer) >= {"stage2.0.shortcut.conv", "head"}


def test_stitching_and_angles_of_a_model_with_itself():
    ds = data.load("mnist", "test").subset(400)
    a = build_model({"arch": "mlp", "widths": [16, 16]})
    batches = list(data.batches(ds, 100))
    err = sum(int((a(x).argmax(1) != y).sum()) for x, y in batches) / 400
    stitch = stitching_errors(a, a, batches)
    assert (stitch.stitch_error == err).all() and list(stitch.layer) == ["relu1", "relu2"]
    angles = principal_angles(a, a, batches, k=4)
    assert (angles.max_angle < 1e-3).all()


def test_lemma1_check():
    curve = pd.DataFrame({"alpha": [0, 0.5, 1], "split": "test", "error": [0.1, 0.25, 0.12]})
    row = lemma1_check(curve).iloc[0]
    assert row.bound == pytest.approx(0.24) and row.max_error == 0.25 and not row.holds


def test_weight_spectra_of_a_known_matrix():
    from llfc_core.probes import weight_spectra

    model = build_model({"arch": "mlp", "in_features": 3, "widths": [3], "num_classes": 3})
    with torch.no_grad():
        model.fc1.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 1.0])))
        model.head.weight.copy_(torch.eye(3))
    row = weight_spectra(model).set_index("layer").loc["fc1"]
    assert row.sv2 == pytest.approx(0.5) and row.full_rank == 3
    assert row.stable_rank == pytest.approx((16 + 4 + 1) / 16) and row.energy_top10 == pytest.approx(1.0)


def test_weight_principal_angles_see_permutations_and_unrelated_weights():
    """B = a permuted copy of A: its weights span other subspaces until aligned, then every angle is 0;
    an unrelated network's are far from A's."""
    from llfc_core.probes import weight_principal_angles
    from llfc_core.models import build_model
    from llfc_core.permutation import apply_permutation, inverse, random_perms

    torch.manual_seed(0)
    a = build_model({"arch": "mlp", "in_features": 784, "widths": [32, 32], "num_classes": 10})
    spec = a.permutation_spec()
    perms = random_perms(spec.sizes(a.state_dict()), 1)
    b = apply_permutation(a, spec, perms)
    aligned = apply_permutation(b, spec, {p: inverse(v) for p, v in perms.items()})
    assert weight_principal_angles(a, aligned, k=5).max_angle.max() < 1e-4
    assert weight_principal_angles(a, b, k=5).set_index("layer").loc["fc2", "mean_angle"] > 10
    torch.manual_seed(1)
    other = build_model({"arch": "mlp", "in_features": 784, "widths": [32, 32], "num_classes": 10})
    assert weight_principal_angles(a, other, k=5).set_index("layer").loc["fc2", "mean_angle"] > 10


def test_feature_averaging_equals_weight_averaging_when_theorem1_holds_exactly():
    """Both conditions hold exactly, so LLFC holds with c = 1 in every layer: averaging the features at any
    layer (or the logits) gives theta_alpha's own predictions, sample by sample."""
    from llfc_core.probes import feature_averaging

    a, b = conditions_pair()
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    frame = feature_averaging(a, b, [(x[:128], y[:128]), (x[128:], y[128:])], alphas=(0.25, 0.5), layer_alphas=(0.5,))
    assert set(frame.layer) == {"weights", "relu1", LOGITS} and len(frame) == 5
    half = frame[frame.alpha == 0.5].set_index("layer")
    assert half.error.nunique() == 1 and (half.agreement == 1.0).all()
    assert half.loss.max() - half.loss.min() < 1e-6


def test_feature_averaging_ensemble_row_is_the_hand_computed_ensemble():
    from llfc_core.probes import feature_averaging

    torch.manual_seed(0)
    config = {"arch": "mlp", "in_features": 20, "widths": [32, 32], "num_classes": 5}
    a, b = build_model(config), build_model(config)
    x, y = torch.randn(200, 20), torch.randint(0, 5, (200,))
    frame = feature_averaging(a, b, [(x, y)], alphas=(0.3,), layer_alphas=())
    with torch.no_grad():
        ensemble = 0.3 * a(x) + 0.7 * b(x)
        theta = interpolate(a, b, 0.3)(x)
    rows = frame.set_index("layer")
    assert rows.loc[LOGITS, "error"] == pytest.approx((ensemble.argmax(1) != y).float().mean().item())
    assert rows.loc["weights", "error"] == pytest.approx((theta.argmax(1) != y).float().mean().item())
    assert rows.loc["weights", "agreement"] == pytest.approx((theta.argmax(1) == ensemble.argmax(1)).float().mean().item())
    assert rows.loc["weights", "agreement"] < 1.0  # unrelated nets: weight averaging is not the ensemble
