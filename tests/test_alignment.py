"""The alignment registry: every method by name recovers a planted permutation, the registry's refusals
name what is wrong, and `align(name, ...)` is exactly the family function (the registry adds nothing)."""
import pytest
import torch

from llfc_core.matching import (ALIGNMENTS, incoming_weight_matching, METHODS, AlignmentData, MatchResult, activation_matching, align,
                                commutativity_matching, commutativity_moments, covariance_weight_matching,
                                identity_alignment, register, ste_matching, weight_matching)
from llfc_core.models import build_model
from llfc_core.neurons import input_moments
from llfc_core.permutation import apply_permutation, inverse, random_perms

from .test_models import CONFIGS, randomise_norm_stats

GOALS = {"naive": "max", "wm": "max", "swm": "max", "am": "max", "ste": "min", "cm": "min", "iwm": "min"}
OPTIONS = {"ste": {"epochs": 2}, "cm": {"max_sweeps": 3}}  # small enough for a test (seconds)


def training_data(n=64, seed=0) -> AlignmentData:
    """Random inputs and labels: two statistics batches, and the same two as every STE epoch."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *CONFIGS["mlp"][1][1:], generator=g), torch.randint(10, (n,), generator=g)
    batches = [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])]
    return AlignmentData(batches=batches, epoch_batches=lambda epoch: batches)


def mlp(seed):
    torch.manual_seed(seed)
    return randomise_norm_stats(build_model(CONFIGS["mlp"][0]))


@pytest.fixture(scope="module")
def planted():
    """A random MLP (He init, live units), B = a random permutation of it, and the permutations undoing it."""
    a = mlp(0)
    spec = a.permutation_spec()
    perms = random_perms(spec.sizes(a.state_dict()), seed=1)
    return a, apply_permutation(a, spec, perms), {p: inverse(v) for p, v in perms.items()}


@pytest.fixture(scope="module")
def independent():
    """Two independently initialised MLPs: nothing to recover, so every method has choices to make."""
    return mlp(0), mlp(1)


@pytest.mark.parametrize("name", [m for m in ALIGNMENTS if m != "naive"])
def test_every_method_recovers_a_planted_permutation(name, planted):
    # STE recovers it too: it starts from weight matching's projection (exact here), and a proxy that moves
    # a few SGD steps away from A still projects onto the same point of B's orbit.
    a, b, truth = planted
    result = align(name, a, b, data=training_data(), **OPTIONS.get(name, {}))
    assert result.perms.keys() == truth.keys()
    for p in truth:
        assert torch.equal(result.perms[p], truth[p]), (name, p)
    realigned = apply_permutation(b, a.permutation_spec(), result.perms).state_dict()
    assert all(torch.equal(realigned[k], v) for k, v in a.state_dict().items())


def test_naive_returns_identity(planted):
    a, b, truth = planted
    result = align("naive", a, b)
    assert result.perms.keys() == truth.keys()
    assert all(torch.equal(v, torch.arange(len(truth[p]))) for p, v in result.perms.items())
    assert result.sweeps == 0 and result.goal == "max"


def test_unknown_method_names_the_known_ones(independent):
    a, b = independent
    with pytest.raises(ValueError, match="unknown alignment method 'git-rebasin'; known methods: "
                                         "naive, wm, swm, am, ste, cm, iwm"):
        align("git-rebasin", a, b)


@pytest.mark.parametrize("name, field", [("swm", "batches"), ("am", "batches"), ("cm", "batches"),
                                         ("ste", "epoch_batches")])
def test_a_data_driven_method_without_its_data_names_the_missing_field(name, field, independent):
    a, b = independent
    assert METHODS[name].needs == (field,)
    for data in (None, AlignmentData()):
        with pytest.raises(ValueError, match=rf"'{name}'.*missing: {field}$"):
            align(name, a, b, data=data)
    other = {"batches": AlignmentData(epoch_batches=lambda e: []), "epoch_batches": AlignmentData(batches=[])}[field]
    with pytest.raises(ValueError, match=rf"missing: {field}$"):  # the other field does not stand in for it
        align(name, a, b, data=other)


def test_alignments_are_the_registry_in_display_order_and_results_report_their_goal(independent):
    assert ALIGNMENTS == tuple(METHODS) == ("naive", "wm", "swm", "am", "ste", "cm", "iwm")
    assert {n: m.goal for n, m in METHODS.items()} == GOALS
    assert METHODS["naive"].label == "no alignment" and METHODS["naive"].needs == () == METHODS["wm"].needs
    assert all(m.name == n and m.label and m.source for n, m in METHODS.items())
    a, b = independent
    for name in ALIGNMENTS:
        result = align(name, a, b, data=training_data(), **OPTIONS.get(name, {}))
        assert result.goal == GOALS[name], name


def test_a_result_must_say_its_goal_and_a_name_is_registered_once():
    with pytest.raises(ValueError, match="goal"):
        MatchResult({})
    with pytest.raises(ValueError, match="'wm' is registered twice"):
        register("wm", label="again", source="-", goal="max")(lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="goal"):
        register("best", label="-", source="-", goal="up")
    with pytest.raises(ValueError, match="AlignmentData does not have"):
        register("best", label="-", source="-", goal="max", needs=("labels",))
    assert "best" not in METHODS


def _direct(name, a, b, spec, data, **options):
    """Each method's family function, called as a caller would without the registry."""
    return {
        "naive": lambda: identity_alignment(spec, a.state_dict(), b.state_dict()),
        "wm": lambda: weight_matching(spec, a.state_dict(), b.state_dict(), **options),
        "swm": lambda: covariance_weight_matching(a, b, spec, data.batches, **options),
        "am": lambda: activation_matching(a, b, spec, data.batches, **options),
        "ste": lambda: ste_matching(a, b, spec, data.epoch_batches, **options),
        "cm": lambda: commutativity_matching(a, b, spec, data.batches, **options),
        "iwm": lambda: incoming_weight_matching(a, b, spec, **options),
    }[name]()


def assert_same(x: MatchResult, y: MatchResult):
    assert x.perms.keys() == y.perms.keys()
    assert all(torch.equal(x.perms[p], y.perms[p]) for p in x.perms)
    assert (x.objective, x.sweeps, x.loss_trace, x.goal) == (y.objective, y.sweeps, y.loss_trace, y.goal)


@pytest.mark.parametrize("name", ALIGNMENTS)
def test_align_is_exactly_the_family_function(name, independent):
    a, b = independent
    spec, data = a.permutation_spec(), training_data()
    options = {"wm": {"seed": 1}, "am": {"normalize": True}, **OPTIONS}.get(name, {})
    via_registry = align(name, a, b, data=data, **options)
    assert_same(via_registry, _direct(name, a, b, spec, data, **options))
    assert_same(via_registry, align(name, a, b, spec=spec, data=data, **options))  # spec defaults to A's


def test_options_pass_through_unchanged(independent):
    a, b = independent
    data = training_data()
    # Precomputed statistics: Sigma-WM's `moments` (A's input moments), CM's `op_moments` (per-op moments).
    swm = align("swm", a, b, data=data, moments=input_moments(a, data.batches))
    assert_same(swm, align("swm", a, b, data=data))
    op_moments = commutativity_moments(a, b, a.permutation_spec(), data.batches)
    cm = align("cm", a, b, data=data, op_moments=op_moments, max_sweeps=2)
    assert_same(cm, align("cm", a, b, data=data, max_sweeps=2))
    with pytest.raises(TypeError, match="moments"):  # one meaning per name: CM's old keyword is gone
        align("cm", a, b, data=data, moments=op_moments)
    start = random_perms(a.permutation_spec().sizes(a.state_dict()), seed=5)
    zero = align("cm", a, b, data=data, init=start, max_sweeps=0)
    assert all(torch.equal(zero.perms[p], start[p]) for p in start)
    assert align("wm", a, b, seed=1).objective != align("wm", a, b, seed=2, init=start).objective
