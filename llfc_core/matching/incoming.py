"""Incoming-weight matching (IWM): layer by layer from the input, one exact assignment per permutation
matches neurons by their incoming weights and biases alone -- Ferbach, Goujaud, Gidel & Dieuleveut,
AISTATS 2024, the plain-norm matching of their proof.

The difference from Git Re-Basin's weight matching (`wm`): WM also compares outgoing weights, so each
permutation's cost depends on the layers on both sides and it needs coordinate descent; IWM compares a
neuron's row [w_i, b_i] only, whose input side is fixed once the layer below is solved, so one pass from
the input solves each permutation once. It is `swm` with the input moment M replaced by the identity:
given the permutations below, layer l's assignment is the exact W2 transport between A's cloud of
incoming weights and B's (`neurons.cloud_distance`, `neurons.layer_transport`).
"""
from __future__ import annotations

import torch

from ..permutation import PermutationSpec
from . import MatchResult, register
from .layerwise import solve_layerwise


@torch.no_grad()
def incoming_weight_matching(model_a, model_b, spec: PermutationSpec) -> MatchResult:
    """Match B's neurons to A's by their incoming weights, after Ferbach et al. (AISTATS 2024): in forward
    order of the ops whose outputs they permute, each permutation pi is one exact assignment minimising
    sum_i ||[w, b]_A,i - [w, b]_B,pi(i)||^2 over the rows of the ops producing it, with B's input side
    already permuted by the permutations solved before (a conv's row: its in x k x k weights, bias last;
    norm layers are not part of a neuron, as in `swm`). No coordinate descent, no outgoing weights.

    Objective (goal 'min'): that sum over every permuted op at the permutations found, i.e. ||W~_A -
    pi(W~_B)||_F^2 over the incoming sides; divided by an op's width, its term is the W2^2 between the
    two clouds given the layers below. A permutation that several ops produce (a residual stream) sums
    their costs; a spec where an op's input permutation is not yet known when its output's is solved (no
    feed-forward order, e.g. ResNet's streams) is refused."""
    # ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j: over permutations only the cross term varies,
    # so the assignment maximises it (exact float64 products, as Sigma-WM's)
    perms, steps = solve_layerwise(model_a, model_b, spec, "incoming weight matching", lambda n, wa, wb: wa @ wb.T)
    total = sum(float(((wa - wb[perm.to(wb.device)]) ** 2).sum()) for _, perm, rows in steps for _, wa, wb in rows)
    return MatchResult(perms, [total], 1, goal="min")


@register("iwm", label="incoming-weight matching", goal="min",
          source="Ferbach, Goujaud, Gidel & Dieuleveut, Proving Linear Mode Connectivity of Neural Networks via "
                 "Optimal Transport, AISTATS 2024")
def _iwm(model_a, model_b, spec, data, **options) -> MatchResult:
    return incoming_weight_matching(model_a, model_b, spec, **options)
