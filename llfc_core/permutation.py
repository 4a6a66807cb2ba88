"""Permutation symmetry: which permutation acts on which axis of which parameter, and applying it.

A `PermutationSpec` maps every entry of a model's state dict (parameters and buffers) to a tuple with
one item per axis: the name of the permutation acting on that axis, or None. Hidden units permuted
by P^(l) give W'^(l) = P^(l) W^(l) P^(l-1)^T, b'^(l) = P^(l) b^(l); a residual stream shares one
permutation; norm parameters and BatchNorm running statistics follow their channels.

A permutation is stored as an index vector `perm` with the convention  permuted[i] = original[perm[i]]
along the axis (i.e. `index_select(axis, perm)`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .runtime import exact_matmul


class SpecError(ValueError):
    """A spec does not fit the model or the permutation given; the message names the parameter."""


@dataclass
class PermutationSpec:
    axes: dict[str, tuple]  # state-dict key -> per-axis permutation name or None
    # permutation name -> modules whose output carries it on dim 1 (used by activation matching)
    activations: dict[str, list[str]] = field(default_factory=dict)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for key, names in self.axes.items():
            for axis, p in enumerate(names):
                if p is not None:
                    out.setdefault(p, []).append((key, axis))
        return out

    def sizes(self, state: dict[str, torch.Tensor]) -> dict[str, int]:
        """Length of each permutation, checking that every axis it acts on agrees."""
        self.check_covers(state)
        sizes: dict[str, int] = {}
        for p, places in self.perm_to_axes.items():
            for key, axis in places:
                n = state[key].shape[axis]
                if sizes.setdefault(p, n) != n:
                    raise SpecError(f"permutation {p!r} acts on axes of length {sizes[p]} and {n} ({key}, axis {axis})")
        return sizes

    def check_covers(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in state if k not in self.axes]
        extra = [k for k in self.axes if k not in state]
        if missing or extra:
            raise SpecError(f"spec does not match the model: not covered {missing[:5]}, unknown {extra[:5]}")
        for key, names in self.axes.items():
            if len(names) != state[key].dim():
                raise SpecError(f"spec gives {len(names)} axes for {key!r}, which has shape {tuple(state[key].shape)}")


# ------------------------------------------------------------------------- building blocks for specs
def dense_axes(name: str, p_out, p_in, bias: bool = True) -> dict[str, tuple]:
    """Axes of a linear layer: weight (out, in), bias (out,)."""
    axes = {f"{name}.weight": (p_out, p_in)}
    if bias:
        axes[f"{name}.bias"] = (p_out,)
    return axes


def conv_axes(name: str, p_out, p_in, bias: bool = False) -> dict[str, tuple]:
    axes = {f"{name}.weight": (p_out, p_in, None, None)}
    if bias:
        axes[f"{name}.bias"] = (p_out,)
    return axes


def norm_axes(name: str, p, module: nn.Module) -> dict[str, tuple]:
    """Axes for a norm layer's parameters and buffers, all following channel permutation p."""
    if isinstance(module, nn.Identity):
        return {}
    axes = {f"{name}.weight": (p,), f"{name}.bias": (p,)}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        axes.update({f"{name}.running_mean": (p,), f"{name}.running_var": (p,), f"{name}.num_batches_tracked": ()})
    return axes


# ------------------------------------------------------------------------------------------ applying
def identity_perms(sizes: dict[str, int], device=None) -> dict[str, torch.Tensor]:
    return {p: torch.arange(n, device=device) for p, n in sizes.items()}


def random_perms(sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in sorted(sizes.items())}


def perturb_perms(perms: dict[str, torch.Tensor], fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """`perms` with, in each permutation, round(fraction * n) of its positions (at least 2 where fraction > 0)
    chosen at random and their entries cyclically shifted among themselves, so each chosen position maps
    elsewhere: a permutation at a controlled distance from the given one (chapter 6's scatter)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"perturb_perms: fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, perm in sorted(perms.items()):
        n = len(perm)
        k = min(n, max(2, round(fraction * n))) if fraction > 0 and n > 1 else 0
        chosen = torch.randperm(n, generator=g)[:k].to(perm.device)
        shifted = perm.clone()
        shifted[chosen] = perm[chosen.roll(1)]
        out[name] = shifted
    return out


def check_perms(spec: PermutationSpec, perms: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    sizes = spec.sizes(state)
    for p, n in sizes.items():
        if p not in perms:
            raise SpecError(f"no permutation given for {p!r} (length {n})")
        v = perms[p]
        if v.shape != (n,) or not torch.equal(v.sort().values.cpu(), torch.arange(n)):
            raise SpecError(f"permutation {p!r} must be a rearrangement of 0..{n - 1}, got shape {tuple(v.shape)}")


def permute_state(spec: PermutationSpec, perms: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  except_axis: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A new state dict with every axis permuted (optionally skipping one (key, axis))."""
    out = {}
    for key, w in state.items():
        for axis, p in enumerate(spec.axes[key]):
            if p is not None and (key, axis) != except_axis:
                w = w.index_select(axis, perms[p].to(w.device))
        out[key] = w
    return out


def permute_param(spec: PermutationSpec, perms, state, key: str, except_axis: int | None = None) -> torch.Tensor:
    w = state[key]
    for axis, p in enumerate(spec.axes[key]):
        if p is not None and axis != except_axis:
            w = w.index_select(axis, perms[p].to(w.device))
    return w


def apply_permutation(model: nn.Module, spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> nn.Module:
    """Return a permuted copy of `model`; the original is untouched."""
    state = model.state_dict()
    check_perms(spec, perms, state)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(spec, perms, state))
    return permuted


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


@torch.no_grad()
def check_same_architecture(state_a: dict, state_b: dict) -> None:
    """Refuse two state dicts that do not hold the same tensors with the same shapes (SpecError naming
    the first difference): interpolating, matching or measuring them would end in a raw size error."""
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise SpecError(f"the two models have different parameters: {diff[:5]}")
    for k in state_a:
        if state_a[k].shape != state_b[k].shape:
            raise SpecError(f"parameter {k!r} has shape {tuple(state_a[k].shape)} in A but {tuple(state_b[k].shape)} in B")


@exact_matmul()
def check_invariance(model: nn.Module, spec: PermutationSpec, example: torch.Tensor, seed: int = 0,
                     atol: float = 1e-5, rtol: float = 1e-6) -> float:
    """Apply a random permutation through `spec`; raise SpecError unless the outputs agree.

    Use it on your own model and spec: a spec that misses an axis changes the function. Agreement is
    torch.allclose's: max |difference| <= atol + rtol * max |output|. The relative part only admits the
    float32 rounding that grows with the outputs' size (about 1e-7 per operation); a mislabelled axis
    changes outputs by far more. Returns the max abs difference of the outputs (eval mode).
    """
    state = model.state_dict()
    perms = random_perms(spec.sizes(state), seed)
    permuted = apply_permutation(model, spec, perms)
    was_training = model.training
    model.eval(), permuted.eval()
    out = model(example)
    diff = (out - permuted(example)).abs().max().item()
    model.train(was_training)
    if len(example) > 1 and (out - out[:1]).abs().max().item() == 0:
        raise ValueError("cannot check the spec: the model gives the same output for every example input "
                         "(dead units or saturated statistics?), so any spec would pass")
    scale = out.abs().max().item()
    if not diff <= atol + rtol * scale:  # `not <=` also catches NaN
        raise SpecError(f"the permuted model computes a different function (max abs diff {diff:.3g}, "
                        f"outputs up to {scale:.3g}, allowed {atol:g} + {rtol:g} x {scale:.3g}): "
                        "the spec misses or mislabels an axis")
    return diff
