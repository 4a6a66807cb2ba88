"""Weight matching (WM): coordinate descent over the permutations, one exact linear assignment per step, to
maximise sum <W_A, pi(W_B)> -- Ainsworth, Hayase & Srinivasa, Git Re-Basin (ICLR 2023), Sec. 3.2.

Also the `naive` method (identity permutations, reported with the WM objective of the identity).
"""
from __future__ import annotations

import numpy as np
import torch

from ..permutation import PermutationSpec, check_same_architecture, identity_perms, permute_param, random_perms
from ..runtime import progress, to_host
from . import MatchResult, register, solve_assignment

GIT_RE_BASIN = ("Ainsworth, Hayase & Srinivasa, Git Re-Basin: Merging Models modulo Permutation Symmetries, "
                "ICLR 2023")


def float_entries(spec: PermutationSpec, state: dict) -> dict:
    """The entries of `state` that weight matching uses: floating-point tensors with at least one permuted axis
    (parameters and running statistics alike, but not integer counters)."""
    return {k: v for k, v in state.items() if v.is_floating_point() and any(a is not None for a in spec.axes[k])}


def weight_matching_objective(spec: PermutationSpec, perms, state_a, state_b) -> float:
    """sum over matched tensors of <W_A, pi(W_B)>; maximising it minimises sum ||W_A - pi(W_B)||^2."""
    return float(_objective(spec, perms, state_a, state_b))


def _objective(spec: PermutationSpec, perms, state_a, state_b) -> torch.Tensor:
    """`weight_matching_objective` as a float64 tensor on the weights' device (no host read)."""
    a = float_entries(spec, state_a)
    return sum((a[k] * permute_param(spec, perms, state_b, k)).sum(dtype=torch.float64) for k in a)


class _CostTerms:
    """The cost matrix of permutation p is a sum of terms, one per (tensor w, axis d) carrying p:
    A_w (axis d moved to rows) @ pi_{-d}(B_w)^T. A term depends only on w's *other* permutations, so
    each is kept with the permutation vectors it was built with and brought up to date cheaply:
      * unchanged neighbours: reused as is;
      * one permuted neighbour axis whose vector changed in few positions: only those slices are
        re-multiplied (a rank-k update: cost proportional to the number of changed positions);
      * otherwise: rebuilt with one matmul.
    """

    def __init__(self, spec: PermutationSpec, a: dict, b: dict, sizes: dict, device):
        self.spec, self.a, self.b, self.sizes, self.device = spec, a, b, sizes, device
        self.places = {p: [(k, ax) for k, ax in spec.perm_to_axes[p] if k in a] for p in sizes}
        self.terms: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}

    def _rows(self, w: torch.Tensor, ax: int) -> torch.Tensor:
        return torch.movedim(w, ax, 0).reshape(w.shape[ax], -1)

    def _neighbours(self, key: str, ax: int) -> dict[int, str]:
        return {i: q for i, q in enumerate(self.spec.axes[key]) if i != ax and q is not None}

    def term(self, key: str, ax: int, perms: dict) -> torch.Tensor:
        neighbours = self._neighbours(key, ax)
        cached = self.terms.get((key, ax))
        if cached is not None:
            used, value = cached
            changed = {i: (used[i] != perms[q]).nonzero().flatten() for i, q in neighbours.items()}
            n_changed = sum(len(c) for c in changed.values())
            if n_changed == 0:
                return value
            if len(neighbours) == 1:
                (i, idx), = changed.items()
                if len(idx) <= self.a[key].shape[i] // 2:
                    q = neighbours[i]
                    a_sub = self._rows(self.a[key].index_select(i, idx), ax)
                    b_new = self._rows(self.b[key].index_select(i, perms[q][idx]), ax)
                    b_old = self._rows(self.b[key].index_select(i, used[i][idx]), ax)
                    value = value + a_sub @ (b_new - b_old).T
                    self.terms[(key, ax)] = ({i: perms[q].clone()}, value)
                    return value
        b_perm = permute_param(self.spec, perms, self.b, key, except_axis=ax)
        value = self._rows(self.a[key], ax) @ self._rows(b_perm, ax).T
        self.terms[(key, ax)] = ({i: perms[q].clone() for i, q in neighbours.items()}, value)
        return value

    def cost(self, p: str, perms: dict) -> torch.Tensor:
        total = torch.zeros(self.sizes[p], self.sizes[p], device=self.device, dtype=torch.float64)
        for key, ax in self.places[p]:
            total += self.term(key, ax, perms).double()
        return total

    def inputs_of(self, p: str, perms: dict) -> tuple:
        """What p's cost depends on: the current vectors of every neighbouring permutation."""
        names = sorted({q for key, ax in self.places[p] for q in self._neighbours(key, ax).values()})
        return tuple((q, perms[q]) for q in names)


def weight_matching(spec: PermutationSpec, state_a: dict, state_b: dict, *, max_sweeps: int = 100,
                    seed: int = 0, init: dict | None = None, device=None, restarts: int = 1) -> MatchResult:
    """Coordinate descent on the permutations: each step solves one linear assignment problem for one
    permutation, the others fixed (Git Re-Basin's weight matching). Sweeps visit the permutations in a
    seeded random order and stop after a sweep in which no step improved. Exactly the algorithm of
    `reference.weight_matching_naive`, made cheaper by keeping the cost terms up to date
    incrementally (`_CostTerms`) and by not re-solving a problem whose cost matrix has not changed.

    `restarts > 1` runs again with visiting-order seeds seed+1, seed+2, ... (each from `init`, or from
    a random permutation after the first) and returns the run with the highest objective.
    """
    if restarts > 1:
        runs = [weight_matching(spec, state_a, state_b, max_sweeps=max_sweeps, seed=seed + r, device=device,
                                init=init if (r == 0 or init is not None) else random_perms(spec.sizes(state_a), seed + r))
                for r in range(restarts)]
        return max(runs, key=lambda run: run.objective[-1])
    check_same_architecture(state_a, state_b)
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    device = torch.device(device) if device else next(iter(state_a.values())).device
    a = {k: v.to(device, torch.float32) for k, v in float_entries(spec, state_a).items()}
    b = {k: v.to(device, torch.float32) for k, v in float_entries(spec, state_b).items()}
    sizes = spec.sizes(state_a)
    perms = {p: v.to(device) for p, v in (init or identity_perms(sizes)).items()}
    terms = _CostTerms(spec, a, b, sizes, device)
    solved_with: dict[str, tuple] = {}  # p -> the neighbour vectors its last solve saw
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    # The objective is linear in each permutation's cost matrix (when no tensor carries the same
    # permutation on two axes), so each accepted step raises it by exactly new_value - old_value: it is
    # tracked from those gains, and recomputed from the weights once at the end as a check. The objective,
    # the acceptance of a step and `improved` stay on the device: the stopping rule reads one flag per sweep.
    objective = _objective(spec, perms, a, b)
    history = [objective]
    bar = progress(total=max_sweeps, desc="weight matching", leave=False)
    sweep = 0  # max_sweeps=0 returns the starting permutations and their objective
    for sweep in range(1, max_sweeps + 1):
        improved = torch.zeros((), dtype=torch.bool, device=device)
        for p in rng.permutation(names):
            inputs = terms.inputs_of(p, perms)
            last = solved_with.get(p)
            if last is not None and all(torch.equal(x, y) for (_, x), (_, y) in zip(inputs, last)):
                continue  # same cost matrix as last time: the current permutation is already optimal
            cost = terms.cost(p, perms)
            new = solve_assignment(cost).to(device)
            rows = torch.arange(sizes[p], device=device)
            old_value, new_value = cost[rows, perms[p]].sum(), cost[rows, new].sum()
            solved_with[p] = tuple((q, v.clone()) for q, v in inputs)
            # A relative tolerance keeps float noise from bouncing between equal-cost solutions.
            better = new_value > old_value + 1e-12 * old_value.abs().clamp_min(1.0)
            perms[p] = torch.where(better, new, perms[p])
            objective = objective + torch.where(better, new_value - old_value, 0.0)
            improved = improved | better
        history.append(objective)
        bar.update(1)
        if not improved.item():
            break
    bar.close()
    history = [float(v) for v in to_host(history[:-1])] + [weight_matching_objective(spec, perms, a, b)]
    return MatchResult({p: v.cpu() for p, v in perms.items()}, history, sweep, goal="max")


@torch.no_grad()
def identity_alignment(spec: PermutationSpec, state_a: dict, state_b: dict) -> MatchResult:
    """No alignment: identity permutations, with the weight matching objective they give (goal 'max')."""
    check_same_architecture(state_a, state_b)
    perms = identity_perms(spec.sizes(state_a))
    return MatchResult(perms, [weight_matching_objective(spec, perms, state_a, state_b)], 0, goal="max")


@register("naive", label="no alignment", goal="max", source="the baseline: B as trained, not permuted")
def _naive(model_a, model_b, spec, data, **options) -> MatchResult:
    return identity_alignment(spec, model_a.state_dict(), model_b.state_dict(), **options)


@register("wm", label="weight matching", goal="max", source=GIT_RE_BASIN + ", Sec. 3.2 (weight matching)")
def _wm(model_a, model_b, spec, data, **options) -> MatchResult:
    return weight_matching(spec, model_a.state_dict(), model_b.state_dict(), **options)
