"""The neuron cloud of a layer (Ferbach et al., AISTATS 2024): its second moment, its dimension, and how
far apart two networks' clouds are.

A linear op's neuron i is the row w_i of its weight (out x in; a conv's out x in*k*k) with its bias b_i.
Two norms, as in Ferbach et al.'s covariance-weighted weight matching:
  plain   ||w_i||^2
  Sigma   E[(w_i . z + b_i)^2] over the op's input z (a conv's k x k patches), i.e. the norm given by the
          augmented second moment M = E[(z, 1)(z, 1)^T]: the difference of two neurons in it is the mean
          squared gap of their pre-activations.
Dimension of a cloud: the participation ratio (sum lambda)^2 / sum lambda^2 of its second-moment
spectrum, plain from W^T W, Sigma from W~ M W~^T (W~ = [W | b]). It needs only tr(X) and ||X||_F^2, so
no eigendecomposition: (tr X)^2 / ||X||_F^2. It lies in [1, rank]: 1 for a cloud on a line, n for n
orthogonal directions of equal weight.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

LINEAR_OPS = (nn.Linear, nn.Conv2d)


def store_input(bucket: dict, name: str):
    """A forward hook keeping a module's input of the current batch under `name`."""
    def hook(module, inputs, output):
        bucket[name] = inputs[0].detach()
    return hook


def patch_rows(module, h: torch.Tensor, max_rows: int):
    """The op's input as rows of vectors (conv: one row per sample and output position), in
    chunks of about `max_rows` rows so a wide conv's unfolded input never sits in memory whole."""
    if not isinstance(module, nn.Conv2d):
        yield h.flatten(1)
        return
    positions = F.unfold(h[:1], module.kernel_size, module.dilation, module.padding, module.stride).shape[-1]
    step = max(1, max_rows // positions)
    for i in range(0, h.shape[0], step):
        cols = F.unfold(h[i:i + step], module.kernel_size, module.dilation, module.padding, module.stride)
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1])


def linear_ops(model: nn.Module) -> dict[str, nn.Module]:
    """name -> Linear / Conv2d, in registration order (the forward order for the book's models)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_OPS)}


@torch.no_grad()
def input_moments(model: nn.Module, batches, max_rows: int = 1 << 16) -> dict[str, torch.Tensor]:
    """One streaming pass: per linear op, M = E[(z, 1)(z, 1)^T] (float64) of its input z, bias entry last."""
    ops = linear_ops(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(store_input(seen, n)) for n, m in ops.items()]
    sums: dict[str, torch.Tensor] = {}
    count = dict.fromkeys(ops, 0)
    try:
        model.eval()
        for x, _ in batches:
            model(x)
            for n, m in ops.items():
                for rows in patch_rows(m, seen[n], max_rows):
                    z = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
                    sums[n] = sums.get(n, 0) + (z.T @ z).double()  # products in model precision, sums float64
                    count[n] += len(rows)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("input_moments got no batches")
    return {n: sums[n] / count[n] for n in ops}


def augmented_weight(module: nn.Module) -> torch.Tensor:
    """[W | b] as (out, in * k * k + 1) float64 (b = 0 for an op without bias)."""
    w = module.weight.detach().double().flatten(1)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(len(w), dtype=w.dtype, device=w.device)
    return torch.cat([w, b[:, None]], 1)


def participation_ratio(x: torch.Tensor) -> float:
    """(tr X)^2 / ||X||_F^2 of a symmetric positive semi-definite X: (sum lambda)^2 / sum lambda^2."""
    x = x.double()
    return float(torch.trace(x) ** 2 / (x * x).sum().clamp_min(1e-300))


def neuron_dimensions(model: nn.Module, moments: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per linear op: the participation ratio of its neuron cloud in the plain norm (W^T W, weights only,
    as the spectrum of the cloud's second moment) and in the Sigma norm (W~ M W~^T with the op's own
    input moment `moments[op]`), with the op's fan-in and neuron count."""
    rows = []
    for name, m in linear_ops(model).items():
        # products in float32 (a ratio of two sums needs no more), the ratio itself in float64
        w = m.weight.detach().float().flatten(1)
        wt = augmented_weight(m).float()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # the same nonzero spectrum, the smaller side
        rows.append({"layer": name, "neurons": w.shape[0], "fan_in": w.shape[1],
                     "pr_plain": participation_ratio(gram),
                     "pr_sigma": participation_ratio(wt @ moments[name].to(wt.device, wt.dtype) @ wt.T)})
    return pd.DataFrame(rows)


def matching_distances(model_a: nn.Module, model_b: nn.Module, moments_a: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per linear op, how far B's neurons are from A's (B as given, e.g. already permuted), relative to A's:
    dist_plain = ||W~_A - W~_B||_F / ||W~_A||_F and dist_sigma = the same in A's input norm M_A,
    sqrt(tr(D M_A D^T) / tr(W~_A M_A W~_A^T)), D = W~_A - W~_B (the pre-activations' relative gap on A's inputs).
    For the best permutation this is the transport cost between the two clouds (Ferbach et al.)."""
    ops_b = linear_ops(model_b)
    rows = []
    for name, m in linear_ops(model_a).items():
        wa, wb = augmented_weight(m), augmented_weight(ops_b[name]).to(m.weight.device)
        d, mom = wa - wb, moments_a[name].to(wa.device, torch.float32)
        sq = [float(((v.float() @ mom).double() * v).sum()) for v in (d, wa)]  # v M v^T, product in float32
        rows.append({"layer": name, "dist_plain": float(d.norm() / wa.norm()),
                     "dist_sigma": max(sq[0], 0.0) ** 0.5 / max(sq[1], 1e-300) ** 0.5})
    return pd.DataFrame(rows)
