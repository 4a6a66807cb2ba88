"""Covariance-weighted weight matching (Sigma-WM): layer by layer from the input, one exact assignment per
permutation matches neurons in A's input-covariance norm -- Ferbach et al., AISTATS 2024.
"""
from __future__ import annotations

import torch

from ..neurons import augmented_weight, input_moments, linear_ops
from ..permutation import PermutationSpec, SpecError, check_same_architecture, identity_perms
from . import MatchResult, patch_index, register, solve_assignment


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
    return MatchResult({p: v.cpu() for p, v in perms.items()}, [total], 1, goal="max")


@register("swm", label="covariance-weighted weight matching", goal="max", needs=("batches",),
          source="Ferbach, Goujaud, Gidel & Dieuleveut, Proving Linear Mode Connectivity of Neural Networks via "
                 "Optimal Transport, AISTATS 2024")
def _swm(model_a, model_b, spec, data, **options) -> MatchResult:
    return covariance_weight_matching(model_a, model_b, spec, data.batches, **options)
