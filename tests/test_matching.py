import pytest
import torch
import torch.nn.functional as F

from llfc_core import data
from llfc_core.interpolate import interpolate
from llfc_core.matching import activation_matching, float_entries, ste_matching, weight_matching
from llfc_core.models import build_model
from llfc_core.permutation import SpecError, apply_permutation, identity_perms, inverse, permute_state, random_perms
from llfc_core.reference import weight_matching_naive

from .test_models import CONFIGS, randomise_norm_stats


def planted(name, seed=1):
    config, shape = CONFIGS[name]
    a = randomise_norm_stats(build_model(config))
    spec = a.permutation_spec()
    perms = random_perms(spec.sizes(a.state_dict()), seed)
    return a, apply_permutation(a, spec, perms), spec, perms, shape


@pytest.mark.parametrize("name", CONFIGS)
def test_weight_matching_recovers_a_planted_permutation(name):
    a, b, spec, perms, _ = planted(name)
    found = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0).perms
    # B = pi(A), so aligning B to A must undo pi exactly.
    for p, v in perms.items():
        assert torch.equal(found[p], inverse(v)), p
    realigned = apply_permutation(b, spec, found)
    for k, v in a.state_dict().items():
        assert torch.equal(realigned.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["mlp", "vgg16-bn", "resnet20-bn"])
def test_activation_matching_recovers_planted_permutation_with_noise(name):
    a, b, spec, perms, shape = planted(name)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    x = torch.randn(64, *shape[1:])
    found = activation_matching(a, b, spec, [(x[:32], None), (x[32:], None)]).perms
    for p, v in perms.items():
        assert torch.equal(found[p], inverse(v)), p


def test_weight_matching_objective_never_decreases_and_equals_reference():
    torch.manual_seed(0)
    a, b = build_model(CONFIGS["resnet20-bn"][0]), build_model(CONFIGS["resnet20-bn"][0])
    spec = a.permutation_spec()
    fast = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(fast.objective, fast.objective[1:]))
    # What the objective means: sum ||W_A - pi(W_B)||^2 = const - 2 <W_A, pi(W_B)>, so matching brings B's
    # weights closer to A's than the identity does, by exactly twice the objective's gain.
    def sq_dist(perms):
        permuted = permute_state(spec, perms, b.state_dict())
        return sum(float((v.double() - permuted[k].double()).pow(2).sum())
                   for k, v in float_entries(spec, a.state_dict()).items())
    naive, matched = sq_dist(identity_perms(spec.sizes(a.state_dict()))), sq_dist(fast.perms)
    assert matched < 0.99 * naive
    assert naive - matched == pytest.approx(2 * (fast.objective[-1] - fast.objective[0]), rel=1e-6)
    perms, history = weight_matching_naive(spec, a.state_dict(), b.state_dict(), seed=3)
    assert history[-1] == pytest.approx(fast.objective[-1], rel=1e-9)
    assert all(torch.equal(perms[p], fast.perms[p]) for p in perms)


def test_ste_returns_valid_permutations_and_the_best_steps_midpoint_loss():
    ds = data.load("mnist", "train").subset(512)
    config = {"arch": "mlp", "widths": [16, 16]}
    a, b = build_model(config), build_model(config)
    spec = a.permutation_spec()
    epoch_batches = lambda e: data.batches(ds, 128, shuffle=True, seed=e)  # noqa: E731
    result = ste_matching(a, b, spec, epoch_batches, epochs=3, lr=1e-2)
    for p, v in result.perms.items():
        assert torch.equal(v.sort().values, torch.arange(16))
    assert len(result.loss_trace) == 12 == result.sweeps and result.goal == "min"
    assert result.objective == [min(result.loss_trace)]  # the kept permutation is the best step's
    # ... and the objective is what it says: the loss of the midpoint 0.5 (A + pi(B)), for the returned pi,
    # on the batch of that step (4 batches an epoch), recomputed here without the straight-through proxy.
    step = result.loss_trace.index(result.objective[0])
    x, y = list(epoch_batches(step // 4))[step % 4]
    mid = interpolate(a, apply_permutation(b, spec, result.perms), 0.5)
    with torch.no_grad():
        assert float(F.cross_entropy(mid(x), y)) == pytest.approx(result.objective[0], rel=1e-5)


def test_different_architectures_are_refused():
    a = build_model({"arch": "mlp", "widths": [8, 8]})
    b = build_model({"arch": "mlp", "widths": [8, 9]})
    with pytest.raises(SpecError, match="fc2.weight"):
        weight_matching(a.permutation_spec(), a.state_dict(), b.state_dict())
    c = build_model({"arch": "mlp", "widths": [8, 8, 8]})
    with pytest.raises(SpecError, match="different parameters"):
        activation_matching(a, c, a.permutation_spec(), [(torch.randn(2, 784), None)])


def test_wrong_length_permutation_is_refused():
    a = build_model({"arch": "mlp", "widths": [8, 8]})
    spec = a.permutation_spec()
    perms = {"P1": torch.arange(8), "P2": torch.arange(7)}
    with pytest.raises(SpecError, match="'P2' must be a rearrangement of 0..7"):
        apply_permutation(a, spec, perms)
    with pytest.raises(SpecError, match="no permutation given for 'P2'"):
        apply_permutation(a, spec, {"P1": torch.arange(8)})


def test_apply_leaves_original_untouched():
    a, b, spec, perms, shape = planted("mlp")
    before = {k: v.clone() for k, v in a.state_dict().items()}
    apply_permutation(a, spec, perms)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_tracked_objective_equals_recomputed_objective_every_sweep():
    from llfc_core.matching import weight_matching_objective

    torch.manual_seed(0)
    a, b = build_model(CONFIGS["vgg16-bn"][0]), build_model(CONFIGS["vgg16-bn"][0])
    spec = a.permutation_spec()
    for sweeps in (1, 2, 3):
        partial = weight_matching(spec, a.state_dict(), b.state_dict(), seed=5, max_sweeps=sweeps)
        exact = weight_matching_objective(spec, partial.perms, a.state_dict(), b.state_dict())
        full = weight_matching(spec, a.state_dict(), b.state_dict(), seed=5)
        assert partial.objective[-1] == pytest.approx(exact, rel=1e-9)
        assert full.objective[sweeps] == pytest.approx(exact, rel=1e-6)


def test_restarts_return_the_best_of_independent_runs():
    """restarts=4 must equal running the four starts by hand (seed r, random start for r > 0) and keeping
    the highest objective; the starts must reach different optima, or restarting would test nothing."""
    torch.manual_seed(0)
    a, b = build_model(CONFIGS["mlp"][0]), build_model(CONFIGS["mlp"][0])
    spec = a.permutation_spec()
    sizes = spec.sizes(a.state_dict())
    runs = [weight_matching(spec, a.state_dict(), b.state_dict(), seed=r,
                            init=None if r == 0 else random_perms(sizes, r)) for r in range(4)]
    finals = [run.objective[-1] for run in runs]
    assert len({round(f, 6) for f in finals}) > 1, "every start reached the same optimum"
    best = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0, restarts=4)
    winner = runs[finals.index(max(finals))]
    assert best.objective[-1] == max(finals)
    assert all(torch.equal(best.perms[p], winner.perms[p]) for p in best.perms)


def test_zero_sweeps_returns_the_start():
    torch.manual_seed(0)
    a, b = build_model(CONFIGS["mlp"][0]), build_model(CONFIGS["mlp"][0])
    spec = a.permutation_spec()
    result = weight_matching(spec, a.state_dict(), b.state_dict(), max_sweeps=0)
    assert result.sweeps == 0 and len(result.objective) == 1
    assert all(torch.equal(v, torch.arange(len(v))) for v in result.perms.values())
    with pytest.raises(ValueError, match="max_sweeps"):
        weight_matching(spec, a.state_dict(), b.state_dict(), max_sweeps=-1)


def test_perturb_perms_moves_the_asked_share_and_stays_a_permutation():
    from llfc_core.permutation import perturb_perms

    base = {"P_a": torch.randperm(50, generator=torch.Generator().manual_seed(0)), "P_b": torch.arange(3)}
    moved = perturb_perms(base, 0.2, seed=1)
    for name, perm in moved.items():
        assert sorted(perm.tolist()) == list(range(len(perm)))  # still a permutation
    assert int((moved["P_a"] != base["P_a"]).sum()) == 10 and int((moved["P_b"] != base["P_b"]).sum()) == 2
    assert all(torch.equal(perturb_perms(base, 0.0)[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="fraction must be in"):
        perturb_perms(base, 1.5)
