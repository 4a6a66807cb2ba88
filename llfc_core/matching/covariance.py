"""Covariance-weighted weight matching (Sigma-WM): layer by layer from the input, one exact assignment per
permutation matches neurons in A's input-covariance norm -- Ferbach et al., AISTATS 2024.
"""
from __future__ import annotations

import torch

from ..neurons import input_moments
from ..permutation import PermutationSpec
from . import MatchResult, register
from .layerwise import solve_layerwise


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
    moments = moments if moments is not None else input_moments(model_a, batches)
    # ||w_A,i - w_B,j||_M^2 = const_i + const_j - 2 w_A,i M w_B,j: the assignment maximises the cross term
    perms, steps = solve_layerwise(model_a, model_b, spec, "covariance weight matching",
                                   lambda n, wa, wb: wa @ moments[n].to(wa.device) @ wb.T)
    total = sum(float(cost[torch.arange(len(perm)), perm.to(cost.device)].sum()) for cost, perm, _ in steps)
    return MatchResult(perms, [total], 1, goal="max")


@register("swm", label="covariance-weighted weight matching", goal="max", needs=("batches",),
          source="Ferbach, Goujaud, Gidel & Dieuleveut, Proving Linear Mode Connectivity of Neural Networks via "
                 "Optimal Transport, AISTATS 2024")
def _swm(model_a, model_b, spec, data, **options) -> MatchResult:
    return covariance_weight_matching(model_a, model_b, spec, data.batches, **options)
