"""Straight-through estimator (STE): a proxy of A is trained so that the midpoint between A and B projected
onto it by weight matching has low loss -- Ainsworth et al., Git Re-Basin (ICLR 2023), Sec. 3.3.
"""
from __future__ import annotations

import math

import torch

from ..permutation import PermutationSpec, permute_state
from ..runtime import progress
from . import MatchResult, register
from .weight import GIT_RE_BASIN, weight_matching


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
    return MatchResult({p: v.cpu() for p, v in best[1].items()}, [best[0]], len(losses), losses, goal="min")


@register("ste", label="straight-through estimator", goal="min", needs=("epoch_batches",),
          source=GIT_RE_BASIN + ", Sec. 3.3 (straight-through estimator; src/mnist_mlp_ste2.py)")
def _ste(model_a, model_b, spec, data, **options) -> MatchResult:
    return ste_matching(model_a, model_b, spec, data.epoch_batches, **options)
