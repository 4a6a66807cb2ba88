"""Slow, straightforward reference implementations that the tests and benchmarks check the fast ones
against. Not for real work: they materialise every feature, or rebuild every cost matrix from scratch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .interpolate import interpolate
from .matching import float_entries, solve_assignment, weight_matching_objective
from .taps import LOGITS, find_taps
from .permutation import identity_perms, permute_param


@torch.no_grad()
def collect(model, x: torch.Tensor, relus: list[str], linears: list[str]) -> dict:
    """Every tap of `model` on all of x at once (float64): pre/post per ReLU, inputs per linear op, logits."""
    out = {"pre": {}, "post": {}, "inputs": {}}
    modules = dict(model.named_modules())
    def keep(n, relu):
        def hook(module, inputs, output):  # returns None: the forward pass is left as it is
            if relu:
                out["pre"][n], out["post"][n] = inputs[0].double(), output.double()
            else:
                out["inputs"][n] = inputs[0].double()
        return hook

    handles = [modules[n].register_forward_hook(keep(n, True)) for n in relus]
    handles += [modules[n].register_forward_hook(keep(n, False)) for n in linears]
    try:
        out["post"][LOGITS] = model.eval()(x).double()
    finally:
        for h in handles:
            h.remove()
    return out


def _dist(x, y):
    return float(((x - y) ** 2).sum() / (x.norm() * y.norm()))


def _cos_dist(x, y):
    x, y = x.flatten(1), y.flatten(1)
    return float((1 - (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean())


@torch.no_grad()
def layer_metrics_materialised(model_a, model_b, x: torch.Tensor, alphas=(0.25, 0.5, 0.75)) -> dict:
    """The same numbers as `metrics.layer_metrics` (no correction), from fully stacked features."""
    taps = find_taps(model_a, x)
    relus, linears = taps["relus"], taps["linears"]
    fa, fb = collect(model_a, x, relus, linears), collect(model_b, x, relus, linears)
    llfc, sigma, com = {}, {}, {}
    for a in alphas:
        fm = collect(interpolate(model_a, model_b, a), x, relus, linears)
        for l in relus + [LOGITS]:
            f_lin = a * fa["post"][l] + (1 - a) * fb["post"][l]
            f_al = fm["post"][l]
            llfc[(l, a)] = {"cos_dist": _cos_dist(f_al, f_lin), "cos_dist_baseline": _cos_dist(fa["post"][l], fb["post"][l]),
                            "scale_c": float((f_lin * f_al).sum() / (f_al * f_al).sum()), "thm1_dist": _dist(f_al, f_lin)}
        for l in relus:
            pa, pb = fa["pre"][l], fb["pre"][l]
            sigma[(l, a)] = _dist(F.relu(a * pa + (1 - a) * pb), a * F.relu(pa) + (1 - a) * F.relu(pb))
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    for l in linears:
        ma, mb = modules_a[l], modules_b[l]
        wa, wb = ma.weight.double(), mb.weight.double()
        ha, hb = fa["inputs"][l], fb["inputs"][l]

        def op(w, h, m=ma):
            if isinstance(m, torch.nn.Conv2d):
                return F.conv2d(h, w, None, m.stride, m.padding, m.dilation, m.groups)
            return F.linear(h, w)
        com[l] = {"dist_com": _dist(op(wa, ha) + op(wb, hb), op(wa, hb) + op(wb, ha)),
                  "dist_w": _dist(wa, wb), "dist_h": _dist(ha, hb)}
    return {"llfc": llfc, "sigma": sigma, "com": com}


def weight_matching_naive(spec, state_a: dict, state_b: dict, *, max_sweeps: int = 100, seed: int = 0):
    """Weight matching as in the published ports: every step permutes B's tensors anew and rebuilds the
    whole cost matrix from scratch, on the device of A's tensors. Returns (perms, objective after each sweep)."""
    a = float_entries(spec, state_a)
    device = next(iter(a.values())).device
    b = {k: v.to(device) for k, v in float_entries(spec, state_b).items()}
    sizes = spec.sizes(state_a)
    perms = identity_perms(sizes, device)
    rng = np.random.default_rng(seed)
    history = [weight_matching_objective(spec, perms, a, b)]
    for _ in range(max_sweeps):
        improved = False
        for p in rng.permutation(sorted(sizes)):
            n = sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64, device=device)
            for k, ax in spec.perm_to_axes[p]:
                if k not in a:
                    continue
                w_a = torch.movedim(a[k], ax, 0).reshape(n, -1)
                w_b = torch.movedim(permute_param(spec, perms, b, k, except_axis=ax), ax, 0).reshape(n, -1)
                cost += (w_a @ w_b.T).double()
            new = solve_assignment(cost).to(device)
            rows = torch.arange(n, device=device)
            old_value = cost[rows, perms[p]].sum()
            if cost[rows, new].sum() > old_value + 1e-12 * max(1.0, abs(old_value.item())):
                perms[p], improved = new, True
        history.append(weight_matching_objective(spec, perms, a, b))
        if not improved:
            break
    return {p: v.cpu() for p, v in perms.items()}, history
