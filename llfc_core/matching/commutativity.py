"""Commutativity matching (CM): a search over the permutations for the smallest commutativity residual
sum_op ||(W_A - P W_B P'^T)(H_A - P' H_B)||^2 (normalised), Condition II of Zhou et al. (NeurIPS 2023).
The paper names a permutation seeking commutativity as a future direction; these algorithms are this
project's: `search="descent"` (the default, a short coordinate descent) and `search="full"` (exact 2-opt, a
Frank-Wolfe relaxation, restarts and kicks; see "the full search" below). `commutativity_objectives`
evaluates given permutations on other batches (held-out values).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ..neurons import patch_rows, store_input
from ..permutation import PermutationSpec, check_same_architecture, identity_perms, random_perms
from ..runtime import progress
from . import MatchResult, patch_index, register, solve_assignment
from .activation import activation_matching
from .weight import weight_matching


# The paper's future direction: a permutation that seeks commutativity itself. For each linear op with
# output permutation P and input permutation P' (identity where the spec has none), the residual is
#   R = (W_A - P W_B P'^T)(H_A - P' H_B),
# and CM minimises sum_op ||R||_F^2 / (||W_A H_A||_F ||W_B H_B||_F) (the normaliser does not depend on
# the permutations, so every op counts on one scale). ||R||^2 needs only the inputs' second moments
# E[h_A h_A^T], E[h_A h_B^T], E[h_B h_B^T] (conv inputs as k x k patches), collected in one pass; after
# that every evaluation is exact linear algebra.
@dataclass
class _OpMoments:
    """One linear op: its weights flattened to (out, in * k * k) and its inputs' second moments."""
    key: str                    # the weight's state-dict key
    p_out: str | None
    p_in: str | None
    taps: int                   # patch entries per input channel (k * k; 1 for a linear layer)
    wa: torch.Tensor
    wb: torch.Tensor
    aa: torch.Tensor
    ab: torch.Tensor
    bb: torch.Tensor

    scale: float = field(init=False)  # 1 / (||W_A H_A|| ||W_B H_B||) / n: does not depend on the permutations

    def __post_init__(self):
        norm_a = ((self.wa @ self.aa) * self.wa).sum().clamp_min(0).sqrt()
        norm_b = ((self.wb @ self.bb) * self.wb).sum().clamp_min(0).sqrt()
        self.scale = 1.0 / max(float(norm_a * norm_b), 1e-30)

    def patch_index(self, perm: torch.Tensor | None) -> torch.Tensor:
        """A channel permutation as an index over the flattened (channel, kernel position) patch."""
        if perm is None:
            return torch.arange(self.wa.shape[1], device=self.wa.device)
        return patch_index(perm.to(self.wa.device), self.taps)

    def dd(self, idx: torch.Tensor) -> torch.Tensor:
        """E[D D^T] for D = H_A - P' H_B, with P' given as a patch index."""
        return self.aa - self.ab[:, idx] - self.ab[:, idx].T + self.bb[idx][:, idx]

    def residual(self, perms: dict) -> torch.Tensor:
        """||R||^2 / n for the given permutations, exactly (float64)."""
        idx = self.patch_index(perms.get(self.p_in))
        out = perms[self.p_out].to(self.wa.device) if self.p_out else slice(None)
        dw = self.wa - self.wb[out][:, idx]
        return ((dw @ self.dd(idx)) * dw).sum()

    def out_cost(self, perms: dict) -> torch.Tensor:
        """||R||^2 is linear in P on permutation matrices: ||R||^2 = const - 2 sum_i C[i, perm[i]] with
        C = W_A (D D^T) (W_B P'^T)^T; this returns C."""
        idx = self.patch_index(perms.get(self.p_in))
        return self.wa @ self.dd(idx) @ self.wb[:, idx].T

    def in_gradient(self, perms: dict) -> torch.Tensor:
        """The gradient of ||R||^2 with respect to P' (as a relaxed permutation matrix, at the current one).
        P' enters twice, in W_B P'^T and in P' H_B, so ||R||^2 is quadratic in it. With the patch
        permutation Pi = P' (x) I_k, E = W_A - P W_B Pi^T, M = D D^T and K = E^T E:
            d||R||^2 / dPi = -2 M E^T (P W_B) + 2 K (Pi G_BB - G_AB),
        summed over each kernel position's diagonal block to give the gradient for P'. Every product
        keeps a factor of E (out x patch), so the cost is (patch)^2 x out, never (patch)^3."""
        idx = self.patch_index(perms[self.p_in])
        v = self.wb[perms[self.p_out].to(self.wb.device)] if self.p_out else self.wb
        e = self.wa - v[:, idx]
        grad = -2 * (self.dd(idx) @ e.T) @ v + 2 * e.T @ (e @ (self.bb[idx] - self.ab))
        n, k = len(perms[self.p_in]), self.taps
        return grad.reshape(n, k, n, k).diagonal(dim1=1, dim2=3).sum(-1)


@torch.no_grad()
def commutativity_moments(model_a, model_b, spec: PermutationSpec, batches, max_rows: int = 1 << 16) -> list[_OpMoments]:
    """One streaming pass: per linear op (Linear / Conv2d carrying a permutation), the second moments of
    its inputs in A and in B (unpermuted). Conv inputs are unfolded into patches `max_rows` at a time.
    Ops whose input is the same in A and B (the first layer) are left out: their residual is zero."""
    from ..metrics import find_taps  # imported here: metrics sits above matching in the module order

    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("commutativity matching got no batches")
    ops = [n for n in find_taps(model_a, first[0])["linears"] if any(spec.axes.get(f"{n}.weight", (None,))[:2])]
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    seen = {"a": {}, "b": {}}
    hooks = [mods[n].register_forward_hook(store_input(seen[tag], n))
             for tag, mods in (("a", mods_a), ("b", mods_b)) for n in ops]
    sums = {n: [0.0, 0.0, 0.0] for n in ops}
    count = {n: 0 for n in ops}
    try:
        model_a.eval(), model_b.eval()
        for i, (x, _) in enumerate(chain([first], batches)):
            model_a(x), model_b(x)
            if i == 0:  # an op that sees the same input in A and B (the first) has R = 0 for any permutation
                ops = [n for n in ops if spec.axes[f"{n}.weight"][1] is not None
                       or not torch.equal(seen["a"][n], seen["b"][n])]
            for n in ops:
                for ha, hb in zip(*(patch_rows(mods_a[n], seen[t][n], max_rows) for t in ("a", "b"))):
                    # products in the models' precision, sums over chunks in float64
                    s = sums[n]
                    s[0] = s[0] + (ha.T @ ha).double()
                    s[1] = s[1] + (ha.T @ hb).double()
                    s[2] = s[2] + (hb.T @ hb).double()
                    count[n] += ha.shape[0]
    finally:
        for h in hooks:
            h.remove()
    out = []
    for n in ops:
        p_out, p_in = spec.axes[f"{n}.weight"][:2]
        wa, wb = (m[n].weight.detach().double().reshape(m[n].weight.shape[0], -1) for m in (mods_a, mods_b))
        taps = wa.shape[1] // mods_a[n].weight.shape[1]
        aa, ab, bb = (s / count[n] for s in sums[n])
        out.append(_OpMoments(f"{n}.weight", p_out, p_in, taps, wa, wb, aa, ab, bb))
    return out


def commutativity_objective(op_moments: list[_OpMoments], perms: dict) -> float:
    """sum over ops of ||R||^2 / (||W_A H_A|| ||W_B H_B||) for B permuted by `perms`."""
    return float(sum(m.residual(perms) * m.scale for m in op_moments))


SEARCHES = ("descent", "full")


def commutativity_matching(model_a, model_b, spec: PermutationSpec, batches, *, init: dict | None = None,
                           op_moments: list | None = None, max_sweeps: int = 20, max_cycles: int = 8, rtol: float = 1e-2,
                           seed: int = 0, search: str = "descent", restarts: int = 4, kicks: int = 8,
                           fw_iters: int = 30, starts: str = "all", search_sweeps: int | None = None,
                           descent: MatchResult | None = None) -> MatchResult:
    """Commutativity matching (CM): minimise sum_op ||R_op||^2 / (||W_A H_A|| ||W_B H_B||) over the
    permutations. `search` picks the algorithm; "descent" is the default (the book runs "full" from the
    descent, `book.pairs.METHOD_OPTIONS`).

    search="descent" (unchanged, bit for bit): a descent from `init`; by default from whichever of weight
    matching's and activation matching's (on the same batches) has the lower objective, so CM ends at or
    below both. Each step takes one permutation p, the others fixed. p is the output permutation of some
    ops, where ||R||^2 is exactly linear in it (a linear assignment), and the input permutation of others,
    where it is quadratic (it enters W_B P'^T and P' H_B): the step solves the assignment of the linearised
    objective (a Frank-Wolfe vertex), and if that does not lower the exact objective, tries the cycles in
    which the vertex differs from the current permutation one by one (most promising first, at most
    `max_cycles`), then the best single swaps. A move is kept only if it lowers the exact objective, so
    the objective never increases; sweeps stop when one lowers it by less than `rtol` (1 %).
    `objective`: the value after each sweep (the first entry is the start's).

    search="full": the descent above, then `commutativity_search` (exact 2-opt over every swap, plus a
    Frank-Wolfe relaxation rounded and polished, per permutation, until a sweep changes nothing) from the
    descent's result, the identity, WM and AM (when `init` is not given; AM where the spec has activations)
    and `restarts` seeded random permutations, then from `kicks` random perturbations of the best so far
    (iterated local search); the best by the exact objective wins, so it ends at or below the descent.
    `objective`: the descent's start, then the best value so far after each restart and each kick;
    `sweeps`: all sweeps of all runs. `fw_iters`: Frank-Wolfe iterations per relaxation; `max_sweeps` caps
    each run. Costs far more than the descent (3 x 128 MNIST MLP: ~35 s on one core against 0.3 s).
    `starts`: "all" (above) or "descent" (only from the descent's result: a local search that continues where
    the descent stopped); `search_sweeps` caps each run of the search (default `max_sweeps`), for budgets
    where a 2-opt sweep of a wide layer costs minutes.

    `op_moments`: those of `commutativity_moments` on these batches, when the caller has them (saves the pass).
    `descent`: the result of the descent above on the same moments and options, when the caller has it
    (search="full" continues from it instead of running it again; WM and AM are then computed only as the
    other starts of starts="all").
    """
    if search not in SEARCHES:
        raise ValueError(f"commutativity_matching: search must be one of {SEARCHES}, got {search!r}")
    if starts not in ("all", "descent"):
        raise ValueError(f"commutativity_matching: starts must be 'all' or 'descent', got {starts!r}")
    batches = list(batches)
    op_moments = op_moments or commutativity_moments(model_a, model_b, spec, batches)
    sizes = spec.sizes(model_a.state_dict())
    wanted = init is None and (descent is None or (search == "full" and starts == "all"))
    start_perms = _wm_am(model_a, model_b, spec, batches, seed) if wanted else []
    if descent is None:
        if init is None:
            init = min(start_perms, key=lambda start: commutativity_objective(op_moments, start))
        descent = _descent(op_moments, sizes, init, max_sweeps, max_cycles, rtol, seed)
    if search == "descent":
        return descent
    if starts == "descent":
        begin, restarts = [], 0
    else:
        begin = [identity_perms(sizes), *start_perms]
    return _full(op_moments, sizes, descent, begin, search_sweeps or max_sweeps, restarts, kicks, fw_iters, seed)


def _wm_am(model_a, model_b, spec, batches, seed) -> list[dict]:
    """The descent's candidate starts: weight matching's and (where the spec has activations) AM's."""
    starts = [weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=seed).perms]
    if spec.activations:
        starts.append(activation_matching(model_a, model_b, spec, batches).perms)
    return starts


def _descent(op_moments, sizes, init, max_sweeps, max_cycles, rtol, seed) -> MatchResult:
    """search="descent" (see `commutativity_matching`)."""
    perms = {p: v.clone() for p, v in init.items()}
    history = [commutativity_objective(op_moments, perms)]
    rng = np.random.default_rng(seed)
    names = sorted(p for p in sizes if any(p in (m.p_out, m.p_in) for m in op_moments))
    bar = progress(total=max_sweeps, desc="commutativity matching", leave=False)
    sweep = 0
    for sweep in range(1, max_sweeps + 1):
        for p in rng.permutation(names):
            _cm_step(op_moments, perms, p, max_cycles)
        history.append(commutativity_objective(op_moments, perms))
        bar.update(1)
        if history[-1] >= history[-2] * (1 - rtol):
            break
    bar.close()
    return MatchResult({p: v.cpu() for p, v in perms.items()}, history, sweep, goal="min")


def _cm_step(op_moments: list[_OpMoments], perms: dict, p: str, max_cycles: int) -> None:
    """One coordinate step on permutation p (see `commutativity_matching`), in place."""
    rows = torch.arange(len(perms[p]))
    outs = [m for m in op_moments if m.p_out == p and m.p_in != p]   # ||R||^2 linear in p: exact from C
    ins = [m for m in op_moments if m.p_in == p]                    # quadratic in p: recomputed
    costs = [m.out_cost(perms) * m.scale for m in outs]
    start = perms[p]
    base = sum(float(m.residual(perms) * m.scale) for m in outs)

    def value(candidate):
        trial = {**perms, p: candidate}
        linear = sum(float(c[rows, candidate].sum() - c[rows, start].sum()) for c in costs)
        return base - 2 * linear + sum(float(m.residual(trial) * m.scale) for m in ins)

    # Gain of moving to each assignment, to first order: -(change of the objective).
    gain = sum((2 * c for c in costs), torch.zeros(len(rows), len(rows), dtype=torch.float64, device=op_moments[0].wa.device))
    for m in ins:
        gain = gain - m.in_gradient(perms) * m.scale
    before = value(perms[p])
    tol = 1e-12 * max(1.0, abs(before))
    moved = False
    for vertex in (solve_assignment(gain), _feature_vertex(ins, p)):
        current = perms[p]
        if vertex is None or torch.equal(vertex, current):
            continue
        new = value(vertex)
        if new < before - tol:
            perms[p], before, moved = vertex, new, True
            continue
        for cycle in _cycles_by_gain(current, vertex, gain)[:max_cycles]:
            candidate = perms[p].clone()
            candidate[cycle] = vertex[cycle]
            new = value(candidate)
            if new < before - tol:
                perms[p], before, moved = candidate, new, True
    if not moved:  # the smallest moves: the transpositions with the largest first-order gain
        for i, j in _best_swaps(perms[p], gain, max_cycles):
            candidate = perms[p].clone()
            candidate[[i, j]] = candidate[[j, i]]
            new = value(candidate)
            if new < before - tol:
                perms[p], before, moved = candidate, new, True


def _best_swaps(current: torch.Tensor, gain: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k transpositions (i, j) of `current` with the largest positive first-order gain."""
    at = gain[:, current.to(gain.device)]           # at[i, j] = gain of giving position i the value at j
    keep = at.diagonal()
    swap = at + at.T - keep[:, None] - keep[None, :]
    swap = torch.triu(swap, diagonal=1) + torch.tril(torch.full_like(swap, -float("inf")))
    top = torch.topk(swap.flatten(), min(k, swap.numel())).indices
    return [(int(t) // swap.shape[1], int(t) % swap.shape[1]) for t in top if swap.flatten()[t] > 0]


def _feature_vertex(ins: list[_OpMoments], p: str) -> torch.Tensor | None:
    """Activation matching's assignment for p from the moments at hand: max <H_A, P H_B> over the inputs
    that carry p. Where p's layer has H_A = P H_B, its output residual vanishes whatever comes next, so
    the linearisation sees no reason to move there; this candidate does."""
    if not ins:
        return None
    n = len(ins[0].patch_index(None)) // ins[0].taps
    cost = sum(m.ab.reshape(n, m.taps, n, m.taps).diagonal(dim1=1, dim2=3).sum(-1) for m in ins)
    return solve_assignment(cost)


def _cycles_by_gain(current: torch.Tensor, target: torch.Tensor, gain: torch.Tensor) -> list[torch.Tensor]:
    """The position sets on which `target` differs from `current` and that can be changed on their own
    (the cycles of the permutation taking one to the other), most first-order gain first."""
    where = {int(v): i for i, v in enumerate(current.tolist())}  # value -> position now holding it
    seen, cycles = set(), []
    for start in range(len(current)):
        if start in seen or int(current[start]) == int(target[start]):
            continue
        cycle, i = [], start
        while i not in seen:
            seen.add(i)
            cycle.append(i)
            i = where[int(target[i])]  # the position whose value moves to i
        cycles.append(torch.tensor(cycle))
    rows = torch.arange(len(current))

    def first_order(c):
        return float(gain[rows[c], target[c]].sum() - gain[rows[c], current[c]].sum())

    return sorted(cycles, key=first_order, reverse=True)


# ------------------------------------------------------------------------------------------ the full search
# With the other permutations fixed, the objective is a quadratic assignment problem in one permutation p.
# `commutativity_search` solves it per p with (1) exact swap deltas, (2) best-improvement 2-opt on them and
# (3) a Frank-Wolfe relaxation rounded to a permutation and polished by 2-opt, sweeping over the
# permutations until a sweep changes nothing; `_full` restarts it from several starts.
#
# Exact swap deltas (the derivation behind `_in_swap_deltas`). Write the op with B as permuted now:
# V = P W_B Pi^T, C = E[h_A (Pi h_B)^T], G = E[(Pi h_B)(Pi h_B)^T], E = W_A - V, Q = C - G,
# M = E[D D^T] = A - C - C^T + G, f = ||R||^2 = tr(E M E^T). Swapping input channels i and j is
# Pi -> T Pi with T = I - U U^T, U = (e_i - e_j) (x) I_k (k taps per channel), so V -> V T, C -> C T,
# G -> T G T, and with the k x k "pair forms" <X> = U^T X U = X_ii + X_jj - X_ij - X_ji (blocks):
#   E' = E + V U U^T,   M' = M + Q U U^T + U U^T Q^T + U <G> U^T,
#   f' - f = 2 tr<K Q> + <<G>, <K>> + <<M> + 2<Q> + 2<Q>^T + 4<G>, <V^T V>>
#            + 2 (tr<M E^T V> + tr(<Q> <E^T V>) + 2 tr<Q^T E^T V> + 2 tr(<G> <E^T V>)),
# K = E^T E; <X, Y> is the Frobenius product of k x k blocks. Every term is a pair form of a matrix computed
# once, so all n(n-1)/2 deltas cost a few (out x N x N) products (N = n k) and O(k^2) per pair.
# On the output side f is linear in P on permutations: f' - f = 2 <W_A M V^T> (k = 1 there).
#
# The relaxation. On permutations Pi^T Pi = I, so R = E (H_A - Pi H_B) = W_A H_A + V0 H_B - W_A Pi H_B
# - V0 Pi^T H_A (V0 = P W_B, the op's input not yet permuted) is linear in Pi and ||R||^2 is quadratic:
# relaxing Pi to S (x) I_k with S doubly stochastic gives a convex quadratic that equals the exact
# objective on permutations, so the objective on a Frank-Wolfe line is a quadratic in the step whose two
# coefficients are <gradient, direction D> and E||W_A D~ h_B + V0 D~^T h_A||^2. Output ops contribute their
# linear form. (Putting S into E and D of R = E D as they stand would give a quartic: S enters both.)
#
# Why not scipy.optimize.quadratic_assignment: it minimises the Koopmans-Beckmann form trace(A^T P B P^T).
# On permutations our subproblem is const + <L, P> + tr(W_A^T W_A P G_BB P^T) + tr(G_AA P V0^T V0 P^T)
# + 2 tr(V0^T W_A P G_AB^T P) (for k = 1): two Koopmans-Beckmann terms (one pair (A, B) cannot hold both),
# a linear term, and a cross term in P ... P rather than P ... P^T, which is no Koopmans-Beckmann term at
# all; for convs P enters as P (x) I_k. So it does not map; its FAQ is Frank-Wolfe from the barycentre with
# an exact line search, which `_frank_wolfe` does on our relaxation (tests/test_cm_search.py checks ours
# against SciPy's FAQ and 2-opt on Koopmans-Beckmann instances, where both apply).
def commutativity_search(op_moments: list[_OpMoments], start: dict, *, max_sweeps: int = 20,
                         fw_iters: int = 30) -> tuple[dict, list[float], int]:
    """From `start`, per permutation p (the others fixed): 2-opt to a swap-local optimum, and a Frank-Wolfe
    relaxation rounded and polished by 2-opt; p takes whichever is lower. Sweeps over the permutations
    until one changes nothing (at most `max_sweeps`). Returns (perms, objective after each sweep with the
    start's first, sweeps). The objective never increases."""
    perms = {p: v.clone().cpu() for p, v in start.items()}
    names = sorted({p for m in op_moments for p in (m.p_out, m.p_in) if p is not None})
    ops = {p: [m for m in op_moments if p in (m.p_out, m.p_in)] for p in names}
    relaxed_for = {}  # p -> its neighbours' permutations when p's relaxation was last solved
    trace, sweep = [commutativity_objective(op_moments, perms)], 0
    for sweep in range(1, max_sweeps + 1):
        changed = False
        for p in names:
            # the relaxation depends on the neighbours only: if they have not moved, its answer is known
            around = [perms[q] for m in ops[p] for q in (m.p_out, m.p_in) if q not in (None, p)]
            relax = p not in relaxed_for or any(not torch.equal(u, v) for u, v in zip(around, relaxed_for[p]))
            relaxed_for[p] = [v.clone() for v in around] if relax else relaxed_for[p]
            changed |= _full_step(ops[p], perms, p, fw_iters if relax else 0, trace[-1])
        trace.append(commutativity_objective(op_moments, perms))
        if not changed:
            break
    return perms, trace, sweep


def commutativity_objectives(model_a, model_b, spec: PermutationSpec, batches,
                             candidates: dict[str, dict]) -> dict[str, float]:
    """The objective of each candidate (name -> perms) on `batches`, from those batches' moments: with
    held-out batches this is CM's objective out of sample, next to the training value."""
    moments = commutativity_moments(model_a, model_b, spec, batches)
    return {name: commutativity_objective(moments, perms) for name, perms in candidates.items()}


def _full(op_moments, sizes, descent: MatchResult, starts: list[dict], max_sweeps, restarts, kicks, fw_iters,
          seed) -> MatchResult:
    """search="full" (see `commutativity_matching`): restarts of `commutativity_search`, then kicks of the
    best (iterated local search), the best kept."""
    starts = [descent.perms, *starts, *(random_perms(sizes, seed=seed + 1 + r) for r in range(restarts))]
    seen = {p for m in op_moments for p in (m.p_out, m.p_in) if p is not None}
    rng = torch.Generator().manual_seed(seed)
    best, trace, sweeps = None, [descent.objective[0]], 0
    bar = progress(total=len(starts) + kicks, desc="commutativity search", leave=False)
    for r in range(len(starts) + kicks):
        # permutations no op sees keep the descent's values, whatever the start
        start = starts[r] if r < len(starts) else {p: _kick(best[p], rng) for p in seen}
        start = {p: start[p] if p in seen else descent.perms[p] for p in descent.perms}
        perms, values, n = commutativity_search(op_moments, start, max_sweeps=max_sweeps, fw_iters=fw_iters)
        sweeps += n
        if best is None or values[-1] < trace[-1]:
            best = perms
        trace.append(min(trace[-1], values[-1]) if len(trace) > 1 else values[-1])
        bar.update(1)
    bar.close()
    return MatchResult(best, trace, sweeps, goal="min")


def _kick(perm: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A random perturbation for iterated local search: max(2, n / 10) random transpositions, enough to
    leave a point where every permutation is optimal given the others (which 2-opt sweeps cannot)."""
    perm = perm.clone()
    for _ in range(max(2, len(perm) // 10)):
        i, j = torch.randperm(len(perm), generator=rng)[:2].tolist()
        perm[[i, j]] = perm[[j, i]]
    return perm


def _full_step(ops: list[_OpMoments], perms: dict, p: str, fw_iters: int, scale: float) -> bool:
    """One permutation's step of `commutativity_search`, in place; True if p changed."""
    if any(m.p_out == m.p_in == p for m in ops):
        raise ValueError(f"search='full' needs p's output and input sides apart; an op has both {p!r}")
    tol = 1e-10 * abs(scale) + 1e-14     # a swap gaining less than this is rounding noise

    def deltas(perm):
        return _swap_deltas(ops, {**perms, p: perm}, p)

    def value(perm):
        return sum(float(m.residual({**perms, p: perm}) * m.scale) for m in ops)

    before = perms[p]
    perms[p] = _two_opt(before, deltas, tol, value)
    if fw_iters > 0:
        gradient, curvature, _ = _relaxation(ops, perms, p)
        relaxed = _frank_wolfe(gradient, curvature, len(before), fw_iters, ops[0].wa)
        rounded = _two_opt(solve_assignment(relaxed), deltas, tol, value)
        if value(rounded) < value(perms[p]) - tol:
            perms[p] = rounded
    return not torch.equal(perms[p], before)


def _two_opt(perm: torch.Tensor, deltas, tol: float, value=None, max_moves: int | None = None) -> torch.Tensor:
    """Best-improvement 2-opt: take the swap with the most negative exact delta until none is below -tol
    (a local optimum with respect to every transposition). `deltas(perm)`: the n x n deltas. With
    `value(perm)` (the exact objective), each round also tries every improving swap on disjoint positions
    at once (greedily, best first) and keeps that batch if it beats the best swap alone: deltas of disjoint
    swaps do not add up exactly, so the batch is checked, but far from a local optimum it saves most rounds."""
    perm, n = perm.clone(), len(perm)
    for _ in range(max_moves or 50 * n):  # a guard: each move lowers the objective by > tol
        d = deltas(perm).cpu()
        d = d.masked_fill(~torch.ones(n, n, dtype=torch.bool).triu(1), float("inf"))
        order = torch.argsort(d.flatten())
        i, j = divmod(int(order[0]), n)
        if float(d[i, j]) >= -tol:
            break
        single = perm.clone()
        single[[i, j]] = single[[j, i]]
        batch = _disjoint_swaps(perm, d, order, tol) if value is not None else None
        perm = batch if batch is not None and value(batch) < value(perm) + float(d[i, j]) else single
    return perm


def _disjoint_swaps(perm: torch.Tensor, d: torch.Tensor, order: torch.Tensor, tol: float) -> torch.Tensor | None:
    """perm with every improving swap applied whose positions no better swap has taken (None if only one)."""
    n, used, out, count = len(perm), set(), perm.clone(), 0
    for flat in order[: int((d.flatten() < -tol).sum())].tolist():
        i, j = divmod(flat, n)
        if i not in used and j not in used:
            used.update((i, j))
            out[[i, j]] = out[[j, i]]
            count += 1
    return out if count > 1 else None


def _swap_deltas(ops: list[_OpMoments], perms: dict, p: str) -> torch.Tensor:
    """delta[i, j]: the exact change of the objective (these ops: those that see p) when positions i and j
    of p swap, for all pairs at once (symmetric; the diagonal is meaningless)."""
    return sum(m.scale * (_in_swap_deltas(m, perms) if m.p_in == p else _out_swap_deltas(m, perms)) for m in ops)


def _out_swap_deltas(m: _OpMoments, perms: dict) -> torch.Tensor:
    """Swap deltas of ||R||^2 for the op's output permutation: linear, 2 <W_A M V^T> (see above)."""
    idx = m.patch_index(perms.get(m.p_in))
    v = m.wb[perms[m.p_out].to(m.wb.device)][:, idx]
    return 2 * _pair_trace(m.wa @ m.dd(idx) @ v.T)


def _in_swap_deltas(m: _OpMoments, perms: dict) -> torch.Tensor:
    """Swap deltas of ||R||^2 for the op's input permutation (the formula above)."""
    n, k = len(perms[m.p_in]), m.taps
    idx = m.patch_index(perms[m.p_in])
    v = (m.wb[perms[m.p_out].to(m.wb.device)] if m.p_out else m.wb)[:, idx]
    c, g = m.ab[:, idx], m.bb[idx][:, idx]
    q, e = c - g, m.wa - v
    mm, f, ev = m.aa - c - c.T + g, e @ q, e.T @ v
    d = 2 * _pair_trace(_block_trace(e, f, n, k)) + _pair_inner(g, e.T @ e, n, k)
    d = d + _pair_inner(mm + 2 * q + 2 * q.T + 4 * g, v.T @ v, n, k)
    return d + 2 * (_pair_trace(_block_trace(e @ mm, v, n, k)) + _pair_inner(q, ev.T, n, k)
                    + 2 * _pair_trace(_block_trace(f, v, n, k)) + 2 * _pair_inner(g, ev, n, k))


def _pair_trace(t: torch.Tensor) -> torch.Tensor:
    """tr <X> for all pairs from t = the block traces of X (n x n): t_ii + t_jj - t_ij - t_ji."""
    diag = t.diagonal()
    return diag[:, None] + diag[None, :] - t - t.T


def _block_trace(x: torch.Tensor, y: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The block traces of x^T y (n x n), without forming the (n k) x (n k) product."""
    return torch.einsum("oia,oja->ij", x.reshape(-1, n, k), y.reshape(-1, n, k))


def _pair_inner(x: torch.Tensor, y: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """<<X>, <Y>> (Frobenius, k x k pair forms) for all pairs. With <X> = S_X - O_X, S the diagonal blocks
    X_ii + X_jj and O the off-diagonal ones X_ij + X_ji, each of the four products is a contraction of
    size (n k)^2: no n^2 k^2 tensor is formed."""
    if k == 1:
        return _pair_trace(x) * _pair_trace(y)
    xb, yb = x.reshape(n, k, n, k), y.reshape(n, k, n, k)
    dx, dy = (b.diagonal(dim1=0, dim2=2).permute(2, 0, 1) for b in (xb, yb))   # (n, k, k): X_ii
    ox, oy = (b + b.permute(2, 1, 0, 3) for b in (xb, yb))                        # blocks X_ij + X_ji
    own = (dx * dy).sum((1, 2))
    cross = dx.reshape(n, -1) @ dy.reshape(n, -1).T
    ss = own[:, None] + own[None, :] + cross + cross.T

    def so(d, o):  # <D_ii + D_jj, O_ij>
        return torch.einsum("iab,iajb->ij", d, o) + torch.einsum("jab,iajb->ij", d, o)

    return ss - so(dx, oy) - so(dy, ox) + (ox * oy).sum((1, 3))


def _relaxation(ops: list[_OpMoments], perms: dict, p: str):
    """The convex relaxation of p's subproblem (see above): (gradient, curvature, value) as functions of a
    doubly-stochastic S (n x n, S[i, perm[i]] = 1 at a permutation). curvature(D) is the coefficient of
    t^2 in value(S + t D); value equals the exact objective of these ops at permutations."""
    n = len(perms[p])
    ins = [m for m in ops if m.p_in == p]
    outs = [(m, m.out_cost(perms) * m.scale) for m in ops if m.p_in != p]    # linear in p on permutations
    rows = torch.arange(n)
    const = sum(float(m.residual(perms) * m.scale + 2 * c[rows, perms[p]].sum()) for m, c in outs)

    def unpermuted(m):  # V0: B's weights with the output permutation, the input one left to S
        return m.wb[perms[m.p_out].to(m.wb.device)] if m.p_out else m.wb

    def residuals(m, s):  # R = Ea h_A + Eb h_B with Ea = W_A - V0 S~^T, Eb = V0 - W_A S~
        v = unpermuted(m)
        return m.wa - _kron_right(v, s.T, m.taps), v - _kron_right(m.wa, s, m.taps)

    def gradient(s):
        g = sum((-2 * c for _, c in outs), torch.zeros_like(s))
        for m in ins:
            ea, eb = residuals(m, s)
            rb, ra = ea @ m.ab + eb @ m.bb, ea @ m.aa + eb @ m.ab.T     # E[R h_B^T], E[R h_A^T]
            full = -2 * m.wa.T @ rb - 2 * ra.T @ unpermuted(m)
            g = g + m.scale * full.reshape(n, m.taps, n, m.taps).diagonal(dim1=1, dim2=3).sum(-1)
        return g

    def curvature(d):
        return sum(m.scale * _energy(m, _kron_right(unpermuted(m), d.T, m.taps), _kron_right(m.wa, d, m.taps))
                   for m in ins)

    def value(s):
        return const - 2 * sum(float((c * s).sum()) for _, c in outs) + sum(
            m.scale * _energy(m, *residuals(m, s)) for m in ins)

    return gradient, curvature, value


def _energy(m: _OpMoments, ea: torch.Tensor, eb: torch.Tensor) -> float:
    """E||ea h_A + eb h_B||^2 from the moments."""
    return float(((ea @ m.aa) * ea).sum() + 2 * ((ea @ m.ab) * eb).sum() + ((eb @ m.bb) * eb).sum())


def _kron_right(x: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """x @ (s (x) I_k): s acts on channels, the k taps of each ride along."""
    if k == 1:
        return x @ s
    n = s.shape[0]
    return torch.einsum("aib,ij->ajb", x.reshape(x.shape[0], n, k), s).reshape(x.shape[0], n * k)


def _frank_wolfe(gradient, curvature, n: int, iters: int, like: torch.Tensor, tol: float = 0.01) -> torch.Tensor:
    """Frank-Wolfe over the doubly-stochastic n x n matrices from the barycentre, with the exact step of a
    quadratic: value(S + t D) = value(S) + t <g, D> + t^2 curvature(D). Stops after `iters` steps, when no
    direction descends, or when a step moves S by less than tol sqrt(n) (Frobenius): FAQ's rule. FAQ's
    tol 0.03 found the global optimum of 55 of 60 tiny MLPs (seeds 100-159 of tests/test_cm_search.py),
    0.01 of 59, 0 (all `iters` steps) of 56: within noise, so 0.01, at two thirds of the time of 0."""
    s = torch.full((n, n), 1.0 / n, dtype=like.dtype, device=like.device)
    for _ in range(iters):
        g = gradient(s)
        vertex = torch.zeros_like(s)
        vertex[torch.arange(n, device=s.device), solve_assignment(-g).to(s.device)] = 1.0
        d = vertex - s
        slope = float((g * d).sum())
        if slope >= 0:
            break
        curv = curvature(d)
        step = (1.0 if curv <= 0 else min(1.0, -slope / (2 * curv))) * d
        s = s + step
        if float(step.norm()) < tol * n ** 0.5:
            break
    return s


@register("cm", label="commutativity matching", goal="min", needs=("batches",),
          source="Zhou et al., Going Beyond Linear Mode Connectivity: The Layerwise Linear Feature Connectivity "
                 "(NeurIPS 2023): Condition II, and a future direction of its conclusion; "
                 "the descent is this project's")
def _cm(model_a, model_b, spec, data, **options) -> MatchResult:
    return commutativity_matching(model_a, model_b, spec, data.batches, **options)
