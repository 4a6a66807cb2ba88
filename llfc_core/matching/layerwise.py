"""The scheme Sigma-WM and IWM share (Ferbach et al., AISTATS 2024): layer by layer from the input, each
permutation is solved once, by one exact assignment over the rows [w_i, b_i] of the ops that produce it,
with B's input side already permuted by the permutations solved before. No coordinate descent."""
from __future__ import annotations

import torch

from ..neurons import augmented_weight, linear_ops
from ..permutation import PermutationSpec, SpecError, check_same_architecture, identity_perms
from . import patch_index, solve_assignment


@torch.no_grad()
def solve_layerwise(model_a, model_b, spec: PermutationSpec, method: str, score) -> tuple[dict, list]:
    """Permutations in forward order of the ops whose outputs they permute. `score(op, w_A, w_B)` gives an
    op's (out x out) matrix to maximise, rows [w, b] augmented (a conv's row: in x k x k weights, bias last),
    B's input side in A's order; a permutation several ops produce (a residual stream) sums their scores.
    A spec where an op's input permutation is not known when its output's is solved (no feed-forward
    order) is refused, naming `method`. Returns (perms on the CPU, [(score matrix, perm, [(op, w_A, w_B)])])."""
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    ops_a, ops_b = linear_ops(model_a), linear_ops(model_b)
    perms = identity_perms(spec.sizes(model_a.state_dict()))
    axes = {n: spec.axes.get(f"{n}.weight", (None, None))[:2] for n in ops_a}
    solved, steps = set(), []
    for p in dict.fromkeys(out for out, _ in axes.values() if out is not None):
        rows = []
        for n in (n for n, (out, _) in axes.items() if out == p):
            p_in = axes[n][1]
            if p_in is not None and p_in not in solved:
                raise SpecError(f"{method} needs a feed-forward order: op {n!r} produces {p!r} from {p_in!r}, "
                                "which no earlier op produces")
            wa, wb = augmented_weight(ops_a[n]), augmented_weight(ops_b[n]).to(ops_a[n].weight.device)
            if p_in is not None:  # B's input side in A's order: columns by channel, each k x k taps, bias last
                taps = ops_a[n].weight[0].numel() // ops_a[n].weight.shape[1]
                wb = torch.cat([wb[:, patch_index(perms[p_in].to(wb.device), taps)], wb[:, -1:]], 1)
            rows.append((n, wa, wb))
        cost = sum(score(n, wa, wb) for n, wa, wb in rows)
        perms[p] = solve_assignment(cost)
        steps.append((cost, perms[p], rows))
        solved.add(p)
    return {p: v.cpu() for p, v in perms.items()}, steps
