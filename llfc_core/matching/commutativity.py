"""Commutativity matching (CM): a descent over the permutations on the commutativity residual
sum_op ||(W_A - P W_B P'^T)(H_A - P' H_B)||^2 (normalised), Condition II of Zhou et al. (NeurIPS 2023).
The paper names a permutation seeking commutativity as a future direction; this algorithm is this project's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ..neurons import patch_rows, store_input
from ..permutation import PermutationSpec, check_same_architecture
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


def commutativity_matching(model_a, model_b, spec: PermutationSpec, batches, *, init: dict | None = None,
                           op_moments: list | None = None, max_sweeps: int = 20, max_cycles: int = 8, rtol: float = 1e-2,
                           seed: int = 0) -> MatchResult:
    """Commutativity matching (CM): a descent on sum_op ||R_op||^2 / (||W_A H_A|| ||W_B H_B||) over the
    permutations, from `init`; by default from whichever of weight matching's and activation matching's
    (on the same batches) has the lower objective, so CM ends at or below both.

    Each step takes one permutation p, the others fixed. p is the output permutation of some ops, where
    ||R||^2 is exactly linear in it (a linear assignment), and the input permutation of others, where
    it is quadratic (it enters W_B P'^T and P' H_B): the step solves the assignment of the linearised
    objective (a Frank-Wolfe vertex), and if that does not lower the exact objective, tries the cycles
    in which the vertex differs from the current permutation one by one (most promising first, at most
    `max_cycles`), then the best single swaps. A move is kept only if it lowers the exact objective, so
    the objective never increases; sweeps stop when one lowers it by less than `rtol` (1 %).
    `objective`: the value after each sweep (the first entry is the start's). `op_moments`: those of
    `commutativity_moments` on these batches, when the caller has them (saves the pass).
    """
    batches = list(batches)
    op_moments = op_moments or commutativity_moments(model_a, model_b, spec, batches)
    sizes = spec.sizes(model_a.state_dict())
    if init is None:
        starts = [weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=seed).perms]
        if spec.activations:
            starts.append(activation_matching(model_a, model_b, spec, batches).perms)
        init = min(starts, key=lambda start: commutativity_objective(op_moments, start))
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


@register("cm", label="commutativity matching", goal="min", needs=("batches",),
          source="Zhou et al., Going Beyond Linear Mode Connectivity: The Layerwise Linear Feature Connectivity "
                 "(NeurIPS 2023): Condition II, and a future direction of its conclusion; "
                 "the descent is this project's")
def _cm(model_a, model_b, spec, data, **options) -> MatchResult:
    return commutativity_matching(model_a, model_b, spec, data.batches, **options)
