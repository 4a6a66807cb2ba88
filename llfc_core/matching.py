"""Aligning B to A by permutations: weight matching (WM), activation matching (AM), STE, covariance-weighted
weight matching (Sigma-WM, Ferbach et al.) and commutativity matching (CM).

All of them return permutations in the convention of `llfc_core.permutation` (B's unit perm[i] moves to
position i), to be applied with `apply_permutation(model_b, spec, perms)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .permutation import (PermutationSpec, SpecError, apply_permutation, check_same_architecture, identity_perms,
                          permute_param, permute_state, random_perms)
from .neurons import augmented_weight, input_moments, linear_ops, patch_rows, store_input
from .runtime import progress


@dataclass
class MatchResult:
    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)  # after each sweep (WM) / the final value (AM, STE)
    sweeps: int = 0
    loss_trace: list[float] = field(default_factory=list)  # STE: the midpoint training loss of every step


def patch_index(perm: torch.Tensor, taps: int) -> torch.Tensor:
    """A channel permutation as an index over a flattened (channel, k x k taps) patch: column c * taps + t."""
    return (perm[:, None] * taps + torch.arange(taps, device=perm.device)).reshape(-1)


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """argmax_perm sum_i cost[i, perm[i]], with scipy's Jonker-Volgenant solver."""
    _, cols = linear_sum_assignment(cost.detach().cpu().double().numpy(), maximize=True)
    return torch.from_numpy(cols.astype(np.int64))


# -------------------------------------------------------------------------------------- weight matching
def _float_entries(spec: PermutationSpec, state: dict) -> dict:
    """Weight matching uses parameters and running statistics alike, but not integer counters."""
    return {k: v for k, v in state.items() if v.is_floating_point() and any(a is not None for a in spec.axes[k])}


def weight_matching_objective(spec: PermutationSpec, perms, state_a, state_b) -> float:
    """sum over matched tensors of <W_A, pi(W_B)>; maximising it minimises sum ||W_A - pi(W_B)||^2."""
    a = _float_entries(spec, state_a)
    return float(sum((a[k] * permute_param(spec, perms, state_b, k)).sum(dtype=torch.float64) for k in a))


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
    a = {k: v.to(device, torch.float32) for k, v in _float_entries(spec, state_a).items()}
    b = {k: v.to(device, torch.float32) for k, v in _float_entries(spec, state_b).items()}
    sizes = spec.sizes(state_a)
    perms = {p: v.to(device) for p, v in (init or identity_perms(sizes)).items()}
    terms = _CostTerms(spec, a, b, sizes, device)
    solved_with: dict[str, tuple] = {}  # p -> the neighbour vectors its last solve saw
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    # The objective is linear in each permutation's cost matrix (when no tensor carries the same
    # permutation on two axes), so each accepted step raises it by exactly new_value - old_value: it is
    # tracked from those gains, and recomputed from the weights once at the end as a check.
    objective = weight_matching_objective(spec, perms, a, b)
    history = [objective]
    bar = progress(total=max_sweeps, desc="weight matching", leave=False)
    sweep = 0  # max_sweeps=0 returns the starting permutations and their objective
    for sweep in range(1, max_sweeps + 1):
        improved = False
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
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value.item())):
                perms[p], improved = new, True
                objective += (new_value - old_value).item()
        history.append(objective)
        bar.update(1)
        if not improved:
            break
    bar.close()
    history[-1] = weight_matching_objective(spec, perms, a, b)
    return MatchResult({p: v.cpu() for p, v in perms.items()}, history, sweep)


# ---------------------------------------------------------------------------------- activation matching
@torch.no_grad()
def activation_matching(model_a, model_b, spec: PermutationSpec, batches, *, normalize: bool = False) -> MatchResult:
    """One streaming pass: accumulate A^T B (float64) per permutation over every tap carrying it, then
    solve one assignment per permutation. `normalize=True` matches correlations instead of raw inner
    products (Git Re-Basin's choice); the default follows the paper's min ||H_A - P H_B||_F^2.
    """
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    if not spec.activations:
        raise SpecError("this spec names no activations to match (PermutationSpec.activations is empty)")
    stats = {p: None for p in spec.activations}
    model_a.eval(), model_b.eval()
    captured = {"a": {}, "b": {}}
    hooks = []
    for tag, model in (("a", model_a), ("b", model_b)):
        modules = dict(model.named_modules())
        for p, names in spec.activations.items():
            for name in names:
                if name not in modules:
                    raise SpecError(f"spec names activation {name!r}, which the model does not have")
                hooks.append(modules[name].register_forward_hook(_store(captured[tag], name)))
    try:
        for x, _ in batches:
            model_a(x), model_b(x)
            for p, names in spec.activations.items():
                for name in names:
                    fa, fb = (_channels_last_rows(captured[t].pop(name)).double() for t in ("a", "b"))
                    s = stats[p] or {"ab": 0.0, "a": 0.0, "b": 0.0, "aa": 0.0, "bb": 0.0, "n": 0}
                    s["ab"] = s["ab"] + fa.T @ fb
                    s["a"], s["b"] = s["a"] + fa.sum(0), s["b"] + fb.sum(0)
                    s["aa"], s["bb"] = s["aa"] + (fa * fa).sum(0), s["bb"] + (fb * fb).sum(0)
                    s["n"] += fa.shape[0]
                    stats[p] = s
    finally:
        for h in hooks:
            h.remove()
    perms, total = {}, 0.0
    for p, s in stats.items():
        if s is None:
            raise ValueError("activation matching got no batches")
        cost = s["ab"]
        if normalize:
            n = s["n"]
            mean_a, mean_b = s["a"] / n, s["b"] / n
            cov = cost / n - torch.outer(mean_a, mean_b)
            std_a = (s["aa"] / n - mean_a ** 2).clamp_min(0).sqrt()
            std_b = (s["bb"] / n - mean_b ** 2).clamp_min(0).sqrt()
            cost = cov / (torch.outer(std_a, std_b) + 1e-12)
        perms[p] = solve_assignment(cost)
        total += cost[torch.arange(len(perms[p])), perms[p].to(cost.device)].sum().item()
    return MatchResult(perms, [total], 1)


# ------------------------------------------------------------------ covariance-weighted weight matching
@torch.no_grad()
def covariance_weight_matching(model_a, model_b, spec: PermutationSpec, batches, *,
                               moments: dict | None = None) -> MatchResult:
    """Weight matching in the input-covariance norm, after Ferbach et al. (AISTATS 2024): layer by layer
    from the input, the neurons of each linear op are matched by one exact assignment minimising
    sum_i E[(w_A,i . z + b_A,i - w_B,pi(i) . z - b_B,pi(i))^2] over A's input z to that op
    (`neurons.input_moments`), with B's input side already permuted by the layers before. Unlike
    Git Re-Basin's WM there is no coordinate descent: each permutation is solved once, given those
    below it. `moments`: A's input moments when already computed (else one pass over `batches`).

    Permutations are solved in forward order of the ops whose outputs they permute; one that several ops
    produce (a residual stream) sums their costs. A spec where an op's input permutation is not yet known
    when its output's is solved (no feed-forward order) is refused."""
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    moments = moments if moments is not None else input_moments(model_a, batches)
    ops_a, ops_b = linear_ops(model_a), linear_ops(model_b)
    perms = identity_perms(spec.sizes(model_a.state_dict()))
    axes = {n: spec.axes.get(f"{n}.weight", (None, None))[:2] for n in ops_a}
    solved, total = set(), 0.0
    for p in dict.fromkeys(out for out, _ in axes.values() if out is not None):
        cost = 0.0
        for n in (n for n, (out, _) in axes.items() if out == p):
            p_in = axes[n][1]
            if p_in is not None and p_in not in solved:
                raise SpecError(f"covariance weight matching needs a feed-forward order: op {n!r} produces "
                                f"{p!r} from {p_in!r}, which no earlier op produces")
            wa, wb = augmented_weight(ops_a[n]), augmented_weight(ops_b[n]).to(ops_a[n].weight.device)
            if p_in is not None:  # B's input side in A's order: columns by channel, each k x k taps, bias last
                taps = ops_a[n].weight[0].numel() // ops_a[n].weight.shape[1]
                wb = torch.cat([wb[:, patch_index(perms[p_in].to(wb.device), taps)], wb[:, -1:]], 1)
            # ||w_A,i - w_B,j||_M^2 = const_i + const_j - 2 w_A,i M w_B,j: the assignment maximises the cross term
            cost = cost + wa @ moments[n].to(wa.device) @ wb.T
        perms[p] = solve_assignment(cost)
        total += float(cost[torch.arange(len(perms[p])), perms[p].to(cost.device)].sum())
        solved.add(p)
    return MatchResult({p: v.cpu() for p, v in perms.items()}, [total], 1)


def _store(bucket: dict, name: str):
    def hook(module, inputs, output):
        bucket[name] = output.detach()
    return hook


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C) or (N, C, H, W) -> rows of channel vectors: every sample and position is an observation."""
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


# ------------------------------------------------------------------------------------------------ STE
def ste_matching(model_a, model_b, spec: PermutationSpec, batches_fn, *, epochs: int = 10, lr: float = 1e-2,
                 momentum: float = 0.9, seed: int = 0) -> MatchResult:
    """Straight-through estimator, as in Git Re-Basin's `src/mnist_mlp_ste2.py`: a proxy theta~ starts at
    A; every step projects it onto B's permutation orbit by weight matching (warm-started from the last
    projection), evaluates the midpoint 0.5 (A + pi(B)) with the projection in the forward pass and
    theta~ in the backward pass, and takes an SGD step (lr 1e-2, momentum 0.9 there; 250 epochs of
    batch 1000 there, `epochs` here). `batches_fn(epoch)` yields (x, y) training batches.

    Returns the permutation of the step with the lowest midpoint batch loss (the script keeps that one
    too), its loss as `objective`, and every step's loss in `loss_trace`.
    """
    import torch.nn.functional as F
    from torch.func import functional_call

    if epochs < 1:
        raise ValueError(f"STE needs at least one epoch, got {epochs}")
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    param_keys = [k for k, _ in model_a.named_parameters()]
    proxy = {k: state_a[k].clone().requires_grad_(True) for k in param_keys}
    opt = torch.optim.SGD(proxy.values(), lr=lr, momentum=momentum)

    def proxy_state():
        return {**state_a, **{k: v.detach() for k, v in proxy.items()}}

    perms = weight_matching(spec, state_a, state_b, seed=seed).perms
    best, losses = (float("inf"), perms), []
    model_a.train()  # BN (if any) uses batch statistics at the midpoint, as in Git Re-Basin
    bar = progress(total=epochs, desc="STE", leave=False)
    try:
        for epoch in range(epochs):
            for x, y in batches_fn(epoch):
                perms = weight_matching(spec, proxy_state(), state_b, seed=seed, init=perms).perms
                projected = permute_state(spec, perms, state_b)
                # Straight-through: the forward pass sees the projection, the gradient flows into the proxy.
                mid = {k: 0.5 * (state_a[k] + proxy[k] + (projected[k] - proxy[k]).detach()) if k in proxy
                       else (0.5 * (state_a[k] + projected[k]) if state_a[k].is_floating_point() else state_a[k])
                       for k in state_a}
                loss = F.cross_entropy(functional_call(model_a, mid, (x,)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"STE: the midpoint loss became {losses[-1]} at step {len(losses)}; "
                                             "lower the learning rate")
                if losses[-1] < best[0]:
                    best = (losses[-1], perms)
            bar.update(1)
    finally:
        bar.close()
        model_a.eval()
    return MatchResult({p: v.cpu() for p, v in best[1].items()}, [best[0]], len(losses), losses)


# ----------------------------------------------------------------------------- commutativity matching
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
    from .metrics import _chain, find_taps

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
        for i, (x, _) in enumerate(_chain(first, batches)):
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


def commutativity_objective(moments: list[_OpMoments], perms: dict) -> float:
    """sum over ops of ||R||^2 / (||W_A H_A|| ||W_B H_B||) for B permuted by `perms`."""
    return float(sum(m.residual(perms) * m.scale for m in moments))


def commutativity_matching(model_a, model_b, spec: PermutationSpec, batches, *, init: dict | None = None,
                           moments: list | None = None, max_sweeps: int = 20, max_cycles: int = 8, rtol: float = 1e-2,
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
    `objective`: the value after each sweep (the first entry is the start's). `moments`: those of
    `commutativity_moments` on these batches, when the caller has them (saves the pass).
    """
    batches = list(batches)
    moments = moments or commutativity_moments(model_a, model_b, spec, batches)
    sizes = spec.sizes(model_a.state_dict())
    if init is None:
        starts = [weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=seed).perms]
        if spec.activations:
            starts.append(activation_matching(model_a, model_b, spec, batches).perms)
        init = min(starts, key=lambda start: commutativity_objective(moments, start))
    perms = {p: v.clone() for p, v in init.items()}
    history = [commutativity_objective(moments, perms)]
    rng = np.random.default_rng(seed)
    names = sorted(p for p in sizes if any(p in (m.p_out, m.p_in) for m in moments))
    bar = progress(total=max_sweeps, desc="commutativity matching", leave=False)
    sweep = 0
    for sweep in range(1, max_sweeps + 1):
        for p in rng.permutation(names):
            _cm_step(moments, perms, p, max_cycles)
        history.append(commutativity_objective(moments, perms))
        bar.update(1)
        if history[-1] >= history[-2] * (1 - rtol):
            break
    bar.close()
    return MatchResult({p: v.cpu() for p, v in perms.items()}, history, sweep)


def _cm_step(moments: list[_OpMoments], perms: dict, p: str, max_cycles: int) -> None:
    """One coordinate step on permutation p (see `commutativity_matching`), in place."""
    rows = torch.arange(len(perms[p]))
    outs = [m for m in moments if m.p_out == p and m.p_in != p]   # ||R||^2 linear in p: exact from C
    ins = [m for m in moments if m.p_in == p]                    # quadratic in p: recomputed
    costs = [m.out_cost(perms) * m.scale for m in outs]
    start = perms[p]
    base = sum(float(m.residual(perms) * m.scale) for m in outs)

    def value(candidate):
        trial = {**perms, p: candidate}
        linear = sum(float(c[rows, candidate].sum() - c[rows, start].sum()) for c in costs)
        return base - 2 * linear + sum(float(m.residual(trial) * m.scale) for m in ins)

    # Gain of moving to each assignment, to first order: -(change of the objective).
    gain = sum((2 * c for c in costs), torch.zeros(len(rows), len(rows), dtype=torch.float64, device=moments[0].wa.device))
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
