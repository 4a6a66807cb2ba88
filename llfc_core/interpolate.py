"""Linear interpolation theta_alpha = alpha * theta_A + (1 - alpha) * theta_B (alpha = 1 is A), the
BatchNorm corrections it needs, loss/error curves along alpha, and barriers.

Corrections, named in every result:
  * 'none'     - the interpolated weights and running statistics as they are;
  * 'bn_reset' - recompute BatchNorm running statistics on training batches (Frankle et al.);
  * 'repair'   - REPAIR (Jordan et al. 2023): rescale every channel at each norm output (or linear
                 output, for models without norms) so its mean and std on data equal the alpha-
                 interpolation of A's and B's, folded into that layer's affine parameters. BatchNorm
                 models get a BN reset first.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import data
from .permutation import check_same_architecture
from .train import evaluate
from .runtime import exact_matmul

CORRECTIONS = ("none", "bn_reset", "repair")


def interpolate_state(state_a: dict, state_b: dict, alpha: float) -> dict:
    """Float tensors are interpolated; integer buffers (BN batch counters) are taken from A."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (1 is A, 0 is B), got {alpha}")
    check_same_architecture(state_a, state_b)
    return {k: alpha * a + (1 - alpha) * state_b[k] if a.is_floating_point() else a.clone()
            for k, a in state_a.items()}


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    model = copy.deepcopy(model_a)
    model.load_state_dict(interpolate_state(model_a.state_dict(), model_b.state_dict(), alpha))
    return model.eval()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def calibration_batches(ds: data.Dataset, device, batch_size: int = 500):
    """All of `ds` (training data the caller has already subset), without augmentation, as batches for
    statistics. It takes no sample count of its own: an earlier version re-subset to 5000, silently
    cutting any larger calibration set."""
    return list(data.batches(ds, batch_size, device=device))


@exact_matmul()
@torch.no_grad()
def reset_bn(model: nn.Module, batches) -> nn.Module:
    """Recompute every BatchNorm's running mean/var as the plain average over `batches` (in place).

    Batch k (from 0) is blended in with momentum 1 / (k + 1): the cumulative average, and exactly what
    torch's `momentum=None` computes, which reads the batch counter back from the device (a host sync
    per BatchNorm per batch on a GPU); the counter here is a Python int."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.train()
    for k, (x, _) in enumerate(batches):
        for m in bns:
            m.momentum = 1.0 / (k + 1)
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def repair_points(model: nn.Module) -> list[str]:
    """Where REPAIR rescales channels: every affine norm, or every hidden linear op if there are none."""
    norms = [n for n, m in model.named_modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None]
    if norms:
        return norms
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "head"]


@torch.no_grad()
def channel_stats(model: nn.Module, names: list[str], batches, renormalise_to: dict | None = None) -> dict:
    """Per-channel mean and std (float64, over all samples and positions) of the named modules' outputs.

    With `renormalise_to={name: (mean, std)}`, each output is also renormalised with its batch statistics
    to that target as the pass goes (REPAIR's reset layers), so later points see corrected inputs; the
    statistics returned are those of the outputs before renormalisation.
    """
    sums: dict[str, list] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, inputs, out):
            rows = out.movedim(1, -1).reshape(-1, out.shape[1]).double()
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + rows.sum(0), s[1] + (rows * rows).sum(0), s[2] + rows.shape[0]
            if renormalise_to is None:
                return None
            shape = (1, -1) + (1,) * (out.dim() - 2)
            mean, var = rows.mean(0).view(shape), rows.var(0, unbiased=False).view(shape)
            mu_t, sd_t = (t.view(shape) for t in renormalise_to[name])
            return ((out.double() - mean) / (var + 1e-10).sqrt() * sd_t + mu_t).to(out.dtype)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model.eval()
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (s1, s2, count) in sums.items():
        mean = s1 / count
        out[n] = (mean, ((s2 / count - mean ** 2).clamp_min(0) + 1e-10).sqrt())  # floor: dead channels
    return out


@torch.no_grad()
def repair(model: nn.Module, model_a: nn.Module, model_b: nn.Module, alpha: float, batches) -> nn.Module:
    """REPAIR in place: target statistics are the alpha-interpolation of A's and B's per-channel mean and
    std at every repair point; one renormalising pass measures the interpolated model's statistics there,
    which are then folded into each point's weight and bias (exact for the first point, approximate
    after it, as in the original)."""
    names = repair_points(model)
    stats_a, stats_b = channel_stats(model_a, names, batches), channel_stats(model_b, names, batches)
    target = {n: (alpha * stats_a[n][0] + (1 - alpha) * stats_b[n][0],
                  alpha * stats_a[n][1] + (1 - alpha) * stats_b[n][1]) for n in names}
    measured = channel_stats(model, names, batches, renormalise_to=target)
    modules = dict(model.named_modules())
    for n in names:
        m, (mean, std) = modules[n], measured[n]
        if m.bias is None:
            raise ValueError(f"REPAIR needs a bias at {n!r} to fold the shift into")
        scale = target[n][1] / std
        m.weight.mul_(scale.view((-1,) + (1,) * (m.weight.dim() - 1)).to(m.weight.dtype))
        m.bias.copy_(((m.bias.double() - mean) * scale + target[n][0]).to(m.bias.dtype))
    return model


def needs_calibration(model: nn.Module, correction: str) -> bool:
    """Whether building theta_alpha with this correction needs training batches."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose from {CORRECTIONS}")
    return correction == "repair" or (correction == "bn_reset" and has_batchnorm(model))


def corrected_interpolation(model_a, model_b, alpha: float, correction: str, calibration=None) -> nn.Module:
    """theta_alpha with the named correction applied. `calibration`: a list of (x, y) training batches,
    required by 'repair' and by 'bn_reset' on BatchNorm models (an empty list would reset the
    statistics to mean 0 / variance 1, silently wrong)."""
    if needs_calibration(model_a, correction) and not calibration:
        raise ValueError(f"correction {correction!r} needs `calibration` training batches; got none")
    model = interpolate(model_a, model_b, alpha)
    if correction in ("bn_reset", "repair") and has_batchnorm(model):
        reset_bn(model, calibration)
    if correction == "repair":
        repair(model, model_a, model_b, alpha, calibration)
    return model


def alpha_grid(alphas=21) -> np.ndarray:
    """`alphas` evenly spaced points on [0, 1], or the given values, which must lie in [0, 1]."""
    grid = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, dtype=float)
    if grid.size == 0 or not np.all((grid >= 0) & (grid <= 1)):
        raise ValueError(f"alphas must lie in [0, 1] (1 is A, 0 is B), got {grid.tolist()}")
    return grid


@exact_matmul()
def interpolation_curve(model_a, model_b, splits: dict[str, data.Dataset], *, alphas=21, correction: str = "none",
                        calibration: list | None = None, batch_size: int = 1000) -> pd.DataFrame:
    """Loss and error of theta_alpha on each split; a tidy frame (alpha, split, loss, error, correction).
    `calibration`: training batches for the corrections that need them (see `corrected_interpolation`)."""
    rows = []
    for alpha in alpha_grid(alphas):
        model = corrected_interpolation(model_a, model_b, float(alpha), correction, calibration)
        for split, ds in splits.items():
            rows.append({"alpha": float(alpha), "split": split, **evaluate(model, ds, batch_size),
                         "correction": correction})
    return pd.DataFrame(rows)


def barriers(curve: pd.DataFrame) -> pd.DataFrame:
    """barrier = max_alpha [M(theta_alpha) - (alpha M(theta_A) + (1 - alpha) M(theta_B))] for loss and error,
    per split (and per any other grouping column present: setting, replicate, pair, correction)."""
    keys = [c for c in ("setting", "replicate", "pair", "correction", "split") if c in curve.columns]
    rows = []
    for group, g in curve.groupby(keys, sort=False):
        g = g.sort_values("alpha")
        end_a, end_b = g[g.alpha == g.alpha.max()].iloc[0], g[g.alpha == g.alpha.min()].iloc[0]
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        for metric in ("loss", "error"):
            linear = g.alpha * end_a[metric] + (1 - g.alpha) * end_b[metric]
            row[f"{metric}_barrier"] = float((g[metric] - linear).max())
        rows.append(row)
    return pd.DataFrame(rows)
