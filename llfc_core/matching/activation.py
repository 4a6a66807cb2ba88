"""Activation matching (AM): one pass collects A^T B of every permuted layer's features, then one exact linear
assignment per permutation maximises <H_A, P H_B> -- Ainsworth et al., Git Re-Basin (ICLR 2023), Sec. 3.1.
"""
from __future__ import annotations

import torch

from ..permutation import PermutationSpec, SpecError, check_same_architecture
from ..runtime import cross_products
from . import MatchResult, register, solve_assignment
from .weight import GIT_RE_BASIN


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
                    ra, rb = (_channels_last_rows(captured[t].pop(name)) for t in ("a", "b"))
                    fa, fb = ra.double(), rb.double()
                    s = stats[p] or {"ab": 0.0, "a": 0.0, "b": 0.0, "aa": 0.0, "bb": 0.0, "n": 0}
                    s["ab"] = s["ab"] + cross_products(ra, rb)
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
    return MatchResult(perms, [total], 1, goal="max")


def _store(bucket: dict, name: str):
    def hook(module, inputs, output):
        bucket[name] = output.detach()
    return hook


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C) or (N, C, H, W) -> rows of channel vectors: every sample and position is an observation."""
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


@register("am", label="activation matching", goal="max", needs=("batches",),
          source=GIT_RE_BASIN + ", Sec. 3.1 (activation matching); the objective min ||H_A - P H_B||_F^2 of "
                 "Zhou et al., Going Beyond Linear Mode Connectivity (NeurIPS 2023)")
def _am(model_a, model_b, spec, data, **options) -> MatchResult:
    return activation_matching(model_a, model_b, spec, data.batches, **options)
