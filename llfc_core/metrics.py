"""The paper's layerwise quantities for a pair (A, B), computed in one streaming pass over the data.

Taps (see `llfc_core.models`): every `nn.ReLU` module (input = pre-activation H~, output = feature f),
every `nn.Linear` / `nn.Conv2d` (input = layer input H, used by commutativity), and the logits.
For each batch the pass runs A and B once, keeps their taps for that batch only, then runs each
theta_alpha; its hooks compare on the fly. Everything is reduced per sample at once and summed in
float64 accumulators, so memory does not grow with the number of samples.

Per feature layer l (each ReLU, then the logits) and alpha:
  cos_dist          E_x[1 - cos(f_l(theta_alpha; x), alpha f_l(A; x) + (1-alpha) f_l(B; x))]   (LLFC)
  cos_dist_baseline E_x[1 - cos(f_l(A; x), f_l(B; x))]
  scale_c           <f_interp, f_alpha> / ||f_alpha||^2 over the data set (Theorem 1 predicts 1)
  thm1_dist         dist(f_l(theta_alpha), alpha f_A + (1-alpha) f_B) over the data set: how far
                    Theorem 1's conclusion (LLFC with c = 1) is from holding exactly
  dist_sigma        dist(relu(alpha H~_A + (1-alpha) H~_B), alpha relu(H~_A) + (1-alpha) relu(H~_B))   (Condition I)
Per linear op (its depth is the feature layer it feeds):
  dist_com          dist(W_A H_A + W_B H_B, W_A H_B + W_B H_A), with the op's own conv/linear, no bias  (Condition II)
  dist_w, dist_h    dist(W_A, W_B), dist(H_A, H_B)
with dist(x, y) = ||x - y||^2 / (||x|| ||y||), given over the whole data set (Frobenius) and as
`*_sample`, the mean over samples.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .interpolate import corrected_interpolation
from .permutation import check_same_architecture
from .taps import LOGITS, Recorder, apply_linear, check_same_taps, find_taps
from .runtime import exact_matmul, to_host

# Log-spaced bins for per-sample 1 - cos in [1e-10, 2] (below goes to a bin starting at 0): neighbouring
# edges differ by 5 %, and a quantile is reported as its bin's geometric centre (within 2.5 %).
_HIST_EDGES = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-10, math.log10(2.0), 480, dtype=torch.float64)])
_HIST_CENTRES = (_HIST_EDGES[:-1] * _HIST_EDGES[1:]).sqrt().numpy()  # bin i's geometric centre, on the host


# ------------------------------------------------------------------------------------------ accumulator
class PairAccumulator:
    """Sums over samples for a pair of tensors (x, y) with a leading sample axis. The sums stay on the
    tensors' device in float64 (no host synchronisation per batch) until they are read: `fetch` reads
    many accumulators in one transfer at the end of a pass; `summary()` reads its own if not yet read."""

    _SUMS = ("xx", "yy", "xy", "dd", "cos_dist", "cos_dist_sq", "dist", "n", "n_zero")

    def __init__(self):
        self.sums = None
        self.hist = None
        self.edges = None  # the histogram edges on the data's device, copied once
        self.host = None   # (sums, histogram) as host arrays, once read; `add` discards them

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, diff: torch.Tensor | None = None) -> None:
        """Add a batch; `diff` (x - y computed without cancellation) may be given when known."""
        x, y = x.flatten(1).double(), y.flatten(1).double()
        d = (x - y) if diff is None else diff.flatten(1).double()
        xx, yy, xy, dd = (x * x).sum(1), (y * y).sum(1), (x * y).sum(1), (d * d).sum(1)
        denom = (xx * yy).sqrt()
        zero = denom == 0
        both_zero = (xx == 0) & (yy == 0)
        # Two all-zero vectors are the same point: cosine 1, distance 0.
        cos = torch.where(both_zero, torch.ones_like(xy), xy / denom.clamp_min(1e-300))
        cos_dist = (1 - cos).clamp(0, 2)
        batch = torch.stack([xx.sum(), yy.sum(), xy.sum(), dd.sum(), cos_dist.sum(), (cos_dist * cos_dist).sum(),
                             torch.where(zero, torch.zeros_like(dd), dd / denom.clamp_min(1e-300)).sum(),
                             xx.new_full((), float(len(x))),  # made on the device: no host copy
                             (zero & ~both_zero).sum().double()])
        if self.edges is None or self.edges.device != x.device:
            self.edges = _HIST_EDGES.to(x.device)
        idx = (torch.bucketize(cos_dist, self.edges, right=True) - 1).clamp(0, len(self.edges) - 1)
        # scatter_add, not bincount: on a GPU bincount reads the largest index back to the host on every call
        counts = torch.zeros(len(self.edges), dtype=torch.float64, device=x.device).scatter_add_(
            0, idx, torch.ones_like(cos_dist))
        self.sums = batch if self.sums is None else self.sums + batch
        self.hist = counts if self.hist is None else self.hist + counts
        self.host = None

    @staticmethod
    def fetch(accumulators, extra=()) -> list[np.ndarray]:
        """Read the sums of many accumulators, and the `extra` tensors (returned as arrays), to the host in
        one transfer: one synchronisation per pass, not one per layer and alpha."""
        unread = [a for a in accumulators if a.sums is not None and a.host is None]
        arrays = to_host([t for a in unread for t in (a.sums, a.hist)] + list(extra))
        for i, a in enumerate(unread):
            a.host = (arrays[2 * i], arrays[2 * i + 1])
        return arrays[2 * len(unread):]

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        if self.host is None:
            self.fetch([self])
        return self.host

    def totals(self) -> dict[str, float]:
        """The sums as plain numbers."""
        return dict(zip(self._SUMS, self._read()[0].tolist())) if self.sums is not None else dict.fromkeys(self._SUMS, 0.0)

    def quantile(self, q: float) -> float:
        if self.hist is None:
            return float("nan")
        # the counts are integers, so the cumulative sum is exact in any order
        cdf = np.cumsum(self._read()[1]) / max(self.totals()["n"], 1)
        i = min(int(np.searchsorted(cdf, q)), len(_HIST_EDGES) - 2)
        return 0.0 if i == 0 else float(_HIST_CENTRES[i])

    def summary(self, prefix: str = "") -> dict[str, float]:
        """cos_dist (mean 1-cos), its std and quantiles, frob_cos_dist, scale (<x,y>/||x||^2), dist, dist_sample."""
        t = self.totals()
        n, norm = max(t["n"], 1), math.sqrt(t["xx"] * t["yy"])
        mean = t["cos_dist"] / n
        return {f"{prefix}cos_dist": mean,
                f"{prefix}cos_dist_std": math.sqrt(max(t["cos_dist_sq"] / n - mean ** 2, 0.0)),
                f"{prefix}cos_dist_p50": self.quantile(0.5),
                f"{prefix}cos_dist_p90": self.quantile(0.9),
                f"{prefix}frob_cos_dist": 1 - t["xy"] / norm if norm > 0 else 0.0,
                f"{prefix}scale": t["xy"] / t["xx"] if t["xx"] > 0 else float("nan"),
                f"{prefix}dist": t["dd"] / norm if norm > 0 else 0.0,
                f"{prefix}dist_sample": t["dist"] / max(t["n"] - t["n_zero"], 1)}


def dist_tensor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x - y||^2 / (||x|| ||y||) over whole tensors, as a float64 tensor on their device."""
    x, y = x.double(), y.double()
    return ((x - y) ** 2).sum() / (x.norm() * y.norm())


def dist(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y||^2 / (||x|| ||y||) over whole tensors (float64)."""
    return float(dist_tensor(x, y))


# ------------------------------------------------------------------------------------------ the pass
@dataclass
class _LayerSums:
    """The accumulators of one `layer_metrics` pass, keyed by layer (and alpha)."""
    relus: list
    linears: list
    depth: dict
    alphas: list
    llfc: dict = field(init=False)      # (feature layer, alpha): theta_alpha vs interpolated features
    base: dict = field(init=False)      # feature layer: A vs B
    sigma: dict = field(init=False)     # (relu, alpha): Condition I
    com: dict = field(init=False)       # linear op: Condition II
    hdist: dict = field(init=False)     # linear op: layer inputs of A vs B

    def __post_init__(self):
        self.feats = self.relus + [LOGITS]
        self.llfc = {(l, a): PairAccumulator() for l in self.feats for a in self.alphas}
        self.base = {l: PairAccumulator() for l in self.feats}
        self.sigma = {(l, a): PairAccumulator() for l in self.relus for a in self.alphas}
        self.com = {l: PairAccumulator() for l in self.linears}
        self.hdist = {l: PairAccumulator() for l in self.linears}

    def llfc_frame(self) -> pd.DataFrame:
        rows = []
        for l in self.feats:
            b = self.base[l].summary()
            for a in self.alphas:
                s = self.llfc[(l, a)].summary()
                rows.append({"layer": l, "depth": self.depth[l], "alpha": a, "cos_dist": s["cos_dist"],
                             "cos_dist_std": s["cos_dist_std"], "cos_dist_p50": s["cos_dist_p50"],
                             "cos_dist_p90": s["cos_dist_p90"], "frob_cos_dist": s["frob_cos_dist"],
                             "cos_dist_baseline": b["cos_dist"], "frob_cos_dist_baseline": b["frob_cos_dist"],
                             "scale_c": s["scale"], "thm1_dist": s["dist"]})
        return pd.DataFrame(rows)

    def read(self, mods_a: dict, mods_b: dict) -> dict[str, float]:
        """Bring every sum to the host in one transfer; returns dist_w per linear op (read with them)."""
        accumulators = [*self.llfc.values(), *self.base.values(), *self.sigma.values(), *self.com.values(),
                        *self.hdist.values()]
        dist_w = PairAccumulator.fetch(accumulators, [dist_tensor(mods_a[l].weight, mods_b[l].weight)
                                                      for l in self.linears])
        return {l: float(d) for l, d in zip(self.linears, dist_w)}

    def conditions_frame(self, dist_w: dict[str, float]) -> pd.DataFrame:
        rows = []
        for a in self.alphas:
            for l in self.relus:
                s = self.sigma[(l, a)].summary()
                rows.append({"layer": l, "kind": "relu", "depth": self.depth[l], "alpha": a,
                             "dist_sigma": s["dist"], "dist_sigma_sample": s["dist_sample"]})
            for l in self.linears:
                c, h = self.com[l].summary(), self.hdist[l].summary()
                rows.append({"layer": l, "kind": "linear", "depth": self.depth[l], "alpha": a,
                             "dist_com": c["dist"], "dist_com_sample": c["dist_sample"],
                             "dist_w": dist_w[l],
                             "dist_h": h["dist"], "dist_h_sample": h["dist_sample"]})
        return pd.DataFrame(rows)


@exact_matmul()
@torch.no_grad()
def layer_metrics(model_a: nn.Module, model_b: nn.Module, batches, *, alphas=(0.25, 0.5, 0.75),
                  correction: str = "none", calibration: list | None = None,
                  interpolated: dict | None = None) -> dict[str, pd.DataFrame]:
    """LLFC, Condition I, Condition II and the Theorem 1 residual for every layer, in one streaming pass.

    `batches`: an iterable of (x, y) on the models' device (the evaluation data; y is unused).
    `correction` / `calibration` (training batches): how theta_alpha is built (see
    `llfc_core.interpolate.corrected_interpolation`); or pass the models directly as
    `interpolated={alpha: model}`.
    Returns {"llfc": frame per (layer, alpha), "conditions": frame per (layer, alpha)}.
    """
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    batches = iter(batches)
    first = next(batches)
    taps = find_taps(model_a, first[0])
    relus, linears = taps["relus"], taps["linears"]
    check_same_taps(model_b, first[0], taps)
    if interpolated is None:
        interpolated = {a: corrected_interpolation(model_a, model_b, a, correction, calibration) for a in alphas}
    sums = _LayerSums(relus, linears, taps["depth"], sorted(interpolated))
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    rec_a, rec_b = Recorder(model_a.eval(), relus, linears), Recorder(model_b.eval(), relus, linears)
    try:
        for x, _ in itertools.chain([first], batches):
            logits_a, logits_b = model_a(x), model_b(x)
            fa, fb = {**rec_a.post, LOGITS: logits_a}, {**rec_b.post, LOGITS: logits_b}
            for l in sums.feats:
                sums.base[l].add(fa[l], fb[l])
            for l in linears:
                m, wa, wb = mods_a[l], mods_a[l].weight, mods_b[l].weight
                ha, hb = rec_a.inputs[l], rec_b.inputs[l]
                lhs = apply_linear(m, wa, ha) + apply_linear(m, wb, hb)
                rhs = apply_linear(m, wa, hb) + apply_linear(m, wb, ha)
                sums.com[l].add(lhs, rhs, diff=apply_linear(m, wa - wb, ha - hb))  # bilinearity, exact
                sums.hdist[l].add(ha, hb)
            for a in sums.alphas:
                for l in relus:
                    pa, pb = rec_a.pre[l], rec_b.pre[l]
                    sums.sigma[(l, a)].add(F.relu(a * pa + (1 - a) * pb), a * F.relu(pa) + (1 - a) * F.relu(pb))
                _interpolated_features(interpolated[a], x, relus, fa, fb, a, sums.llfc)
    finally:
        rec_a.remove(), rec_b.remove()
    dist_w = sums.read(mods_a, mods_b)
    return {"llfc": sums.llfc_frame(), "conditions": sums.conditions_frame(dist_w)}


def layer_summary(llfc: pd.DataFrame, conditions: pd.DataFrame) -> pd.DataFrame:
    """One row per feature layer of `layer_metrics`' frames (one alpha): LLFC there, Dist_sigma of its ReLU,
    and the largest Dist_com of the ops feeding it."""
    keep = [c for c in ("setting", "pair", "layer", "depth", "cos_dist", "cos_dist_baseline", "scale_c") if c in llfc]
    sigma = conditions[conditions.kind == "relu"].set_index("layer").dist_sigma
    com = conditions[conditions.kind == "linear"].groupby("depth").dist_com.max()
    frame = llfc[keep].copy()
    frame["dist_sigma"] = frame.layer.map(sigma)
    frame["dist_com"] = frame.depth.map(com)
    return frame


class _CompareHook:
    """Forward hook on a ReLU of theta_alpha: compares its output with alpha f_A + (1 - alpha) f_B, formed
    only when the hook runs (so one layer's target is in memory at a time)."""

    def __init__(self, accumulator: PairAccumulator, fa: torch.Tensor, fb: torch.Tensor, alpha: float):
        self.accumulator, self.fa, self.fb, self.alpha = accumulator, fa, fb, alpha

    def __call__(self, module, inputs, output):
        self.accumulator.add(output, self.alpha * self.fa + (1 - self.alpha) * self.fb)


def _interpolated_features(model, x, relus, fa, fb, alpha, llfc) -> None:
    """Run theta_alpha; each ReLU hook compares its output with the interpolated endpoint features."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(_CompareHook(llfc[(n, alpha)], fa[n], fb[n], alpha)) for n in relus]
    try:
        logits = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    llfc[(LOGITS, alpha)].add(logits, alpha * fa[LOGITS] + (1 - alpha) * fb[LOGITS])


@torch.no_grad()
def lemma1_check(curve: pd.DataFrame) -> pd.DataFrame:
    """Lemma 1: error(theta_alpha) <= 2 max(Err_A, Err_B). Per split: the worst error along alpha and the bound."""
    rows = []
    keys = [c for c in ("setting", "pair", "correction", "split") if c in curve.columns]
    for group, g in curve.groupby(keys, sort=False):
        ends = g[g.alpha.isin([g.alpha.min(), g.alpha.max()])].error
        rows.append({**dict(zip(keys, group if isinstance(group, tuple) else (group,))),
                     "max_error": float(g.error.max()), "bound": 2 * float(ends.max()),
                     "holds": bool(g.error.max() <= 2 * ends.max())})
    return pd.DataFrame(rows)
