"""Aligning B to A by permutations: one module per family of methods, every method behind one registry.

    naive  identity permutations (no alignment)                   weight.py
    wm     weight matching (Git Re-Basin)                          weight.py
    swm    covariance-weighted weight matching (Ferbach et al.)    covariance.py
    am     activation matching                                     activation.py
    ste    straight-through estimator (Git Re-Basin)               ste.py
    cm     commutativity matching                                  commutativity.py
    iwm    incoming-weight matching (Ferbach et al.'s plain WM)    incoming.py

`align(name, model_a, model_b, data=AlignmentData(...), **options)` runs any of them by name; `METHODS[name]`
says what it learns from (`needs`), whether its objective is maximised or minimised (`goal`) and where it
comes from (`source`); `ALIGNMENTS` lists the names in display order. The family functions
(`weight_matching`, `activation_matching`, ...) stay importable from here and are what `align` calls.

Every method returns permutations in the convention of `llfc_core.permutation` (B's unit perm[i] moves to
position i), to be applied with `apply_permutation(model_b, spec, perms)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

GOALS = ("max", "min")


@dataclass
class MatchResult:
    """What every alignment returns.

    perms: permutation name -> index vector (CPU), B's unit perm[i] moves to position i.
    objective: the method's own objective: after each sweep (WM, CM; the first entry is the start's), or its
        final value (AM, Sigma-WM, STE, naive).
    sweeps: coordinate-descent sweeps (WM, CM), optimisation steps (STE), 1 for the one-shot methods.
    loss_trace: STE only: the midpoint training loss of every step.
    goal: 'max' if `objective` is maximised (similarities: WM, AM, Sigma-WM, and naive, which reports the
        WM objective of the identity) or 'min' if it is minimised (STE: midpoint loss; CM: commutativity
        residual). Every method sets it, so that "better" is `max` or `min` of objectives without knowing
        the method; objectives of different methods are on different scales and are not comparable.
    """
    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    loss_trace: list[float] = field(default_factory=list)
    goal: str = ""

    def __post_init__(self):
        if self.goal not in GOALS:
            raise ValueError(f"MatchResult.goal must be one of {GOALS}, got {self.goal!r}")


def patch_index(perm: torch.Tensor, taps: int) -> torch.Tensor:
    """A channel permutation as an index over a flattened (channel, k x k taps) patch: column c * taps + t."""
    return (perm[:, None] * taps + torch.arange(taps, device=perm.device)).reshape(-1)


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """argmax_perm sum_i cost[i, perm[i]], with scipy's Jonker-Volgenant solver (on the CPU, float64).
    `lap.lapjv` was measured against it and is not faster from n = 512 on: benchmarks/assignment_speed.py."""
    _, cols = linear_sum_assignment(cost.detach().cpu().double().numpy(), maximize=True)
    return torch.from_numpy(cols.astype(np.int64))


# ------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class AlignmentData:
    """What the data-driven methods learn from: the training data of the pair.

    batches: a re-iterable of (x, y) statistics batches (AM, Sigma-WM, CM); a list is fine.
    epoch_batches: STE: epoch -> that epoch's (shuffled) training batches.
    """
    batches: object = None
    epoch_batches: Callable[[int], Iterable] | None = None


@dataclass(frozen=True)
class Method:
    """One registered alignment. `fn(model_a, model_b, spec, data, **options) -> MatchResult`."""
    name: str
    label: str
    needs: tuple        # the AlignmentData fields it learns from: () / ("batches",) / ("epoch_batches",)
    fn: Callable
    source: str         # where the method comes from
    goal: str           # 'max' or 'min': the `goal` of every MatchResult it returns


METHODS: dict[str, Method] = {}


def register(name: str, *, label: str, source: str, goal: str, needs: tuple = ()):
    """Decorator: register `fn(model_a, model_b, spec, data, **options) -> MatchResult` as method `name`.
    Registration order is display order."""
    known = {f.name for f in fields(AlignmentData)}
    if not set(needs) <= known:
        raise ValueError(f"{name}: needs {sorted(set(needs) - known)}, which AlignmentData does not have")
    if goal not in GOALS:
        raise ValueError(f"{name}: goal must be one of {GOALS}, got {goal!r}")

    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"alignment method {name!r} is registered twice")
        METHODS[name] = Method(name, label, tuple(needs), fn, source, goal)
        return fn
    return decorate


def align(method: str, model_a, model_b, spec=None, data: AlignmentData | None = None, **options) -> MatchResult:
    """Align `model_b` to `model_a` with the registered `method`; `spec` defaults to
    `model_a.permutation_spec()`, `options` go to the method's function unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; known methods: {', '.join(METHODS)}")
    m = METHODS[method]
    data = data if data is not None else AlignmentData()
    missing = [n for n in m.needs if getattr(data, n) is None]
    if missing:
        raise ValueError(f"alignment method {method!r} ({m.label}) learns from data: pass "
                         f"data=AlignmentData({', '.join(f'{n}=...' for n in missing)}); "
                         f"missing: {', '.join(missing)}")
    spec = spec if spec is not None else model_a.permutation_spec()
    return m.fn(model_a, model_b, spec, data, **options)


# The families register themselves on import, in this (display) order; they import the pieces above.
from .weight import float_entries, identity_alignment, weight_matching, weight_matching_objective  # noqa: E402
from .covariance import covariance_weight_matching  # noqa: E402
from .activation import activation_matching  # noqa: E402
from .ste import ste_matching  # noqa: E402
from .commutativity import (commutativity_matching, commutativity_moments, commutativity_objective,  # noqa: E402
                            commutativity_objectives, commutativity_search)
from .incoming import incoming_weight_matching  # noqa: E402

ALIGNMENTS: tuple[str, ...] = tuple(METHODS)  # ('naive', 'wm', 'swm', 'am', 'ste', 'cm', 'iwm')

__all__ = ["ALIGNMENTS", "AlignmentData", "GOALS", "METHODS", "MatchResult", "Method", "activation_matching", "align",
           "commutativity_matching", "commutativity_moments", "commutativity_objective", "commutativity_objectives",
           "commutativity_search", "covariance_weight_matching",
           "float_entries", "identity_alignment", "patch_index", "register", "solve_assignment", "ste_matching",
           "weight_matching", "weight_matching_objective"]
