"""The full commutativity search (`commutativity_matching(..., search="full")`): exact swap deltas against
recomputation, the relaxation against autograd and against SciPy's FAQ where both apply, the global optimum
by enumeration on tiny MLPs, and held-out evaluation."""
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import quadratic_assignment
from torch import nn

from llfc_core.matching import (AlignmentData, align, commutativity_matching, commutativity_moments,
                                commutativity_objective, solve_assignment)
from llfc_core.matching.commutativity import (_frank_wolfe, _relaxation, _swap_deltas, _two_opt,
                                              commutativity_objectives, commutativity_search)
from llfc_core.models import build_model
from llfc_core.permutation import apply_permutation, inverse, random_perms

from .test_commutativity import batches_of
from .test_models import CONFIGS, randomise_norm_stats


def names_of(moments):
    return sorted({p for m in moments for p in (m.p_out, m.p_in) if p is not None})


def double_pair(name, seed=0):
    config, shape = CONFIGS[name]
    torch.manual_seed(seed)
    a, b = (randomise_norm_stats(build_model(config)).double() for _ in range(2))
    return a, b, [(x.double(), y) for x, y in batches_of(shape, n=16)]


# ------------------------------------------------------------------------------------------- exact deltas
@pytest.mark.parametrize("name", ["mlp", "vgg16-bn", "resnet20-bn"])
def test_swap_deltas_equal_recomputed_objectives(name):
    """Every permutation, 12 random swaps each (mlp 36 swaps; vgg16 156: 3 x 3 taps; resnet20 144: several
    ops per stream permutation), float64: the delta against objective(after) - objective(before), relative
    error < 1e-9. Measured worst: 8e-14 (mlp), 2e-11 (vgg16), 6e-11 (resnet20); the smallest |delta| is
    1e-6 of the objective, so the difference `expected` is itself exact to ~1e-10."""
    a, b, batches = double_pair(name)
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, batches)
    perms = random_perms(spec.sizes(a.state_dict()), seed=3)
    before = commutativity_objective(moments, perms)
    g = torch.Generator().manual_seed(0)
    for p in names_of(moments):
        deltas = _swap_deltas([m for m in moments if p in (m.p_out, m.p_in)], perms, p)
        assert torch.allclose(deltas, deltas.T, rtol=1e-9, atol=1e-12 * before)
        for _ in range(12):
            i, j = torch.randperm(len(perms[p]), generator=g)[:2].tolist()
            swapped = perms[p].clone()
            swapped[[i, j]] = swapped[[j, i]]
            expected = commutativity_objective(moments, {**perms, p: swapped}) - before
            assert abs(float(deltas[i, j]) - expected) <= 1e-9 * abs(expected), (p, i, j)


@pytest.mark.parametrize("name", ["mlp", "vgg16-bn"])
def test_relaxation_equals_the_objective_on_permutations_and_autograd_inside(name):
    """The relaxed value at a permutation is the exact objective; its gradient is autograd's; the value on a
    line is exactly value + t <g, D> + t^2 curvature(D) (what the line search minimises)."""
    a, b, batches = double_pair(name)
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, batches)
    perms = random_perms(spec.sizes(a.state_dict()), seed=5)
    for p in names_of(moments)[:3]:
        ops = [m for m in moments if p in (m.p_out, m.p_in)]
        gradient, curvature, value = _relaxation(ops, perms, p)
        n = len(perms[p])
        at = torch.zeros(n, n, dtype=torch.float64)
        at[torch.arange(n), perms[p]] = 1.0
        exact = sum(float(m.residual(perms) * m.scale) for m in ops)
        assert value(at) == pytest.approx(exact, rel=1e-10)
        s = (0.5 * at + 0.5 / n).requires_grad_(True)
        total = _value_autograd(ops, perms, p, s)
        total.backward()
        assert float(total.detach()) == pytest.approx(value(s.detach()), rel=1e-10)
        assert torch.allclose(gradient(s.detach()), s.grad, rtol=1e-8, atol=1e-10 * s.grad.abs().max())
        direction = torch.rand(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 0.5
        line = value(s.detach() + 0.3 * direction)
        expected = value(s.detach()) + 0.3 * float((s.grad * direction).sum()) + 0.09 * curvature(direction)
        assert line == pytest.approx(expected, rel=1e-10)


def _value_autograd(ops, perms, p, s):
    """The relaxation written out independently: ||W_A H_A + V0 H_B - W_A S~ H_B - V0 S~^T H_A||^2 for the
    ops reading p (S~ = S (x) I_k by an explicit Kronecker product), the exact residual for the others."""
    total = 0
    for m in ops:
        if m.p_in != p:  # linear on permutations: const - 2 <C, S>, its value at the current permutation
            c = m.out_cost(perms) * m.scale
            rows = torch.arange(len(perms[p]))
            total = total + m.residual(perms) * m.scale + 2 * c[rows, perms[p]].sum() - 2 * (c * s).sum()
            continue
        big = torch.kron(s, torch.eye(m.taps, dtype=s.dtype))
        v0 = m.wb[perms[m.p_out]] if m.p_out else m.wb
        ea, eb = m.wa - v0 @ big.T, v0 - m.wa @ big
        total = total + m.scale * (((ea @ m.aa) * ea).sum() + 2 * ((ea @ m.ab) * eb).sum() + ((eb @ m.bb) * eb).sum())
    return total


# ------------------------------------------------------------------- against SciPy where both apply
def kb_instance(n, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    return torch.from_numpy(a), torch.from_numpy(b)


def kb_value(a, b, perm):  # SciPy's objective trace(A^T P B P^T), P[i, perm[i]] = 1
    return float((a * b[perm][:, perm]).sum())


def test_frank_wolfe_is_scipys_faq_on_koopmans_beckmann_instances():
    """Our subproblem is not Koopmans-Beckmann (see the comment in commutativity.py), so SciPy's
    quadratic_assignment cannot solve it; on KB instances, where both apply, our `_frank_wolfe` (gradient
    and curvature of trace(A^T S B S^T)) followed by the linear assignment must be SciPy's FAQ: same
    start (barycentre), same exact line search. Threshold fixed before running: the same permutation in
    >= 90 % of 20 instances (measured: 20 / 20). Then 2-opt: ours (best improvement, from our FAQ) against
    SciPy's 2opt (from SciPy's FAQ), printed; ours must be a swap-local optimum no worse than FAQ's."""
    same, ours_total, scipy_total = 0, 0.0, 0.0
    for seed in range(20):
        a, b = kb_instance(12, seed)
        faq = quadratic_assignment(a.numpy(), b.numpy(), method="faq")  # maxiter 30, tol 0.03
        relaxed = _frank_wolfe(lambda s: a @ s @ b.T + a.T @ s @ b, lambda d: float((a * (d @ b @ d.T)).sum()),
                               12, 30, a, tol=0.03)
        perm = solve_assignment(relaxed)
        same += bool(np.array_equal(perm.numpy(), faq.col_ind))

        def deltas(v):
            out = torch.zeros(12, 12, dtype=torch.float64)
            for i, j in itertools.combinations(range(12), 2):
                w = v.clone()
                w[[i, j]] = w[[j, i]]
                out[i, j] = out[j, i] = kb_value(a, b, w) - kb_value(a, b, v)
            return out

        polished = _two_opt(perm, deltas, 1e-12)
        assert float(deltas(polished).triu(1)[torch.ones(12, 12).triu(1) > 0].min()) >= -1e-12
        assert kb_value(a, b, polished) <= kb_value(a, b, perm) + 1e-12
        guess = np.stack([np.arange(12), faq.col_ind], 1)
        two_opt = quadratic_assignment(a.numpy(), b.numpy(), method="2opt",
                                       options={"partial_guess": guess, "rng": np.random.default_rng(seed)})
        ours_total += kb_value(a, b, polished)
        scipy_total += two_opt.fun
    print(f"\nKB n=12: our FW = SciPy FAQ in {same}/20; mean after 2-opt: ours {ours_total / 20:.4f}, "
          f"SciPy {scipy_total / 20:.4f}")
    assert same >= 18


# ---------------------------------------------------------------------- ground truth by enumeration
WIDTHS = (6, 6)  # two permutations: 720^2 = 518,400 joint permutations


def tiny_pair(seed, planted: bool):
    """Random tiny MLPs (5 -> 6 -> 6 -> 4; He weights, biases around 0.1), or B = a permuted, noisy A."""
    torch.manual_seed(seed)

    def random_mlp():
        model = build_model({"arch": "mlp", "in_features": 5, "widths": list(WIDTHS), "num_classes": 4}).double()
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.uniform_(m.bias, -0.2, 0.4)
        return model

    a = random_mlp()
    if not planted:
        return a, random_mlp()
    b = apply_permutation(a, a.permutation_spec(), random_perms(dict(zip(("P1", "P2"), WIDTHS)), seed=seed))
    with torch.no_grad():
        for prm in b.parameters():
            prm.add_(0.4 * prm.std() * torch.randn_like(prm))
    return a, b


def enumerate_objective(moments):
    """The objective of every joint permutation (P1, P2) as a 720 x 720 table, from the moments directly:
    fc2 (out P2, in P1): tr(W_A M W_A^T) - 2 sum_i C[i, pi2[i]] + tr(W_B' M W_B'^T), W_B' = W_B[:, pi1],
    M = M(pi1), C = W_A M W_B'^T; head (in P2): ||(W_A - W_B[:, pi2]) ... ||^2 by the same formula."""
    all_perms = torch.tensor(list(itertools.permutations(range(WIDTHS[0]))))
    by_key = {m.key: m for m in moments}
    fc2, head = by_key["fc2.weight"], by_key["head.weight"]

    def m_of(op):  # M(pi) for every pi: (720, n, n)
        rows, cols = all_perms[:, :, None], all_perms[:, None, :]
        ab = op.ab[:, all_perms].permute(1, 0, 2)
        return op.aa - ab - ab.transpose(1, 2) + op.bb[rows, cols]

    m1, wb1 = m_of(fc2), fc2.wb[:, all_perms].permute(1, 0, 2)               # (720, out, n)
    c = fc2.wa @ m1 @ wb1.transpose(1, 2)                                    # (720, out, out)
    quad = ((fc2.wa @ m1) * fc2.wa).sum((1, 2)) + ((wb1 @ m1) * wb1).sum((1, 2))
    linear = c[:, torch.arange(WIDTHS[1]), all_perms].sum(-1)               # [pi1, pi2]
    m2, wb2 = m_of(head), head.wb[:, all_perms].permute(1, 0, 2)
    e2 = head.wa - wb2
    tail = ((e2 @ m2) * e2).sum((1, 2))
    return fc2.scale * (quad[:, None] - 2 * linear) + head.scale * tail[None, :], all_perms


def test_enumeration_agrees_with_the_objective():
    a, b = tiny_pair(0, planted=False)
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, inputs(0))
    table, all_perms = enumerate_objective(moments)
    g = torch.Generator().manual_seed(0)
    for i, j in torch.randint(len(all_perms), (20, 2), generator=g).tolist():
        perms = {"P1": all_perms[i], "P2": all_perms[j]}
        assert float(table[i, j]) == pytest.approx(commutativity_objective(moments, perms), rel=1e-10)


def inputs(seed, n=96):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return [(x[:n // 2], None), (x[n // 2:], None)]


def test_full_search_finds_the_global_optimum_of_tiny_mlps():
    """30 instances (24 pairs of independent random MLPs 5-6-6-4, 6 planted: B = a permutation of A with
    40 % weight noise), the global optimum over all 518,400 joint permutations by enumeration.
    Threshold fixed before running: the full search reaches it (relative 1e-9) in >= 90 % of the instances.
    Measured: full 29 / 30, descent 10 / 30 (all 6 planted ones and 4 random). On every instance full <=
    descent (by construction: the descent's result is one of full's starts). History, for the record: the
    first version (restarts only, no kicks) reached 25 / 30 here and failed; the kicks were then added and
    checked on other seeds (100-159: 59 / 60), the threshold left as it was."""
    hits = {"full": 0, "descent": 0}
    for seed in range(30):
        a, b = tiny_pair(seed, planted=seed >= 24)
        spec, batches = a.permutation_spec(), inputs(seed)
        moments = commutativity_moments(a, b, spec, batches)
        optimum = float(enumerate_objective(moments)[0].min())
        found = {s: commutativity_matching(a, b, spec, batches, op_moments=moments, search=s).objective[-1]
                 for s in ("descent", "full")}
        assert found["full"] <= found["descent"] * (1 + 1e-12), (seed, found)
        assert found["full"] >= optimum * (1 - 1e-9)  # nothing below the enumerated minimum
        for s, value in found.items():
            hits[s] += value <= optimum * (1 + 1e-9)
    print(f"\nglobal optimum found (30 tiny MLPs): full {hits['full']}/30, descent {hits['descent']}/30")
    assert hits["full"] >= 27


# -------------------------------------------------------------------------- API: options and held-out
def test_full_search_is_reached_through_the_registry_and_recovers_a_planted_permutation():
    config, shape = CONFIGS["mlp"]
    torch.manual_seed(0)
    a = randomise_norm_stats(build_model(config))
    spec = a.permutation_spec()
    planted = random_perms(spec.sizes(a.state_dict()), seed=1)
    b = apply_permutation(a, spec, planted)
    result = align("cm", a, b, data=AlignmentData(batches=batches_of(shape)), search="full", restarts=1)
    assert all(torch.equal(result.perms[p], inverse(v)) for p, v in planted.items())
    assert result.goal == "min" and result.objective[-1] <= 1e-12
    assert all(later <= earlier for earlier, later in zip(result.objective[1:], result.objective[2:]))


def test_descent_is_the_default_and_unknown_searches_are_refused():
    a, b, batches = double_pair("mlp")
    spec = a.permutation_spec()
    default = commutativity_matching(a, b, spec, batches)
    descent = commutativity_matching(a, b, spec, batches, search="descent")
    assert default.objective == descent.objective
    assert all(torch.equal(default.perms[p], descent.perms[p]) for p in default.perms)
    with pytest.raises(ValueError, match="search must be one of"):
        commutativity_matching(a, b, spec, batches, search="anneal")


def test_search_never_increases_and_objectives_on_other_batches():
    a, b, batches = double_pair("vgg16-bn")
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, batches)
    start = random_perms(spec.sizes(a.state_dict()), seed=2)
    perms, trace, sweeps = commutativity_search(moments, start, max_sweeps=2, fw_iters=10)
    assert sweeps >= 1 and all(later <= earlier * (1 + 1e-12) for earlier, later in zip(trace, trace[1:]))
    assert commutativity_objective(moments, perms) == pytest.approx(trace[-1], rel=1e-12)
    held_out = [(x.double(), y) for x, y in batches_of(CONFIGS["vgg16-bn"][1], n=16, seed=9)]
    values = commutativity_objectives(a, b, spec, held_out, {"start": start, "found": perms})
    other = commutativity_moments(a, b, spec, held_out)
    assert values == {"start": commutativity_objective(other, start), "found": commutativity_objective(other, perms)}
    same = commutativity_objectives(a, b, spec, batches, {"found": perms})["found"]
    assert same == pytest.approx(trace[-1], rel=1e-12)


def test_the_books_local_search_continues_from_the_descent():
    """The book's CM (`pairs.METHOD_OPTIONS`: only from the descent's result, sweeps capped) ends at or below the
    descent, at or above the full search from every start; unknown `starts` are refused."""
    from llfc_core.book.pairs import METHOD_OPTIONS

    a, b, batches = double_pair("mlp")
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, batches)
    descent = commutativity_matching(a, b, spec, batches, op_moments=moments)
    local = commutativity_matching(a, b, spec, batches, op_moments=moments, **METHOD_OPTIONS["cm"])
    full = commutativity_matching(a, b, spec, batches, op_moments=moments, search="full")
    value = {name: commutativity_objective(moments, r.perms) for name, r in
             (("descent", descent), ("local", local), ("full", full))}
    assert value["full"] <= value["local"] + 1e-12 <= value["descent"] + 2e-12
    assert local.sweeps <= descent.sweeps + METHOD_OPTIONS["cm"]["search_sweeps"]
    with pytest.raises(ValueError, match="starts must be 'all' or 'descent'"):
        commutativity_matching(a, b, spec, batches, search="full", starts="random")


def test_a_descent_already_run_is_continued_not_repeated(monkeypatch):
    """`descent=`: the full search continues the caller's descent: the same permutations, objectives and
    sweeps as running it again, and neither the descent nor WM/AM run a second time (starts='descent')."""
    from llfc_core.book.pairs import METHOD_OPTIONS
    from llfc_core.matching import commutativity as cm

    a, b, batches = double_pair("mlp")
    spec = a.permutation_spec()
    moments = commutativity_moments(a, b, spec, batches)
    descent = commutativity_matching(a, b, spec, batches, op_moments=moments)
    again = commutativity_matching(a, b, spec, batches, op_moments=moments, **METHOD_OPTIONS["cm"])
    monkeypatch.setattr(cm, "_descent", lambda *args: pytest.fail("the descent ran again"))
    monkeypatch.setattr(cm, "_wm_am", lambda *args: pytest.fail("WM and AM ran again"))
    continued = commutativity_matching(a, b, spec, batches, op_moments=moments, descent=descent, **METHOD_OPTIONS["cm"])
    assert all(torch.equal(again.perms[p], continued.perms[p]) for p in again.perms)
    assert (again.objective, again.sweeps) == (continued.objective, continued.sweeps)
