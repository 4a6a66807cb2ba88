"""Probes of a pair (A, B) beyond the streaming pass: stitching, feature substitution (does theta_alpha
behave like the averaged features?), principal angles of features and weights, weight spectra."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .interpolate import corrected_interpolation
from .runtime import cross_products, to_host
from .taps import LINEAR_OPS, LOGITS, Recorder, Replace, find_taps


@torch.no_grad()
def stitching_errors(model_a: nn.Module, model_b: nn.Module, batches) -> pd.DataFrame:
    """Feed A's layer-l feature into B's remaining layers (B's own output at l is replaced), per ReLU l."""
    batches = list(batches)
    taps = find_taps(model_a, batches[0][0])
    wrong = {l: 0 for l in taps["relus"]}  # counts stay on the device until the end (no host read per batch)
    total = 0
    modules_b = dict(model_b.named_modules())
    rec_a = Recorder(model_a.eval(), taps["relus"], [])
    try:
        for x, y in batches:
            model_a(x)
            total += len(y)
            for l in taps["relus"]:
                h = modules_b[l].register_forward_hook(Replace(rec_a.post[l]))
                try:
                    wrong[l] = wrong[l] + (model_b.eval()(x).argmax(1) != y).sum()
                finally:
                    h.remove()
    finally:
        rec_a.remove()
    counts = to_host(torch.as_tensor(wrong[l]) for l in taps["relus"])
    return pd.DataFrame([{"layer": l, "depth": taps["depth"][l], "stitch_error": int(c) / total}
                         for l, c in zip(taps["relus"], counts)])


@torch.no_grad()
def feature_averaging(model_a: nn.Module, model_b: nn.Module, batches, *, alphas=(0.25, 0.5, 0.75),
                      layer_alphas=(0.5,), correction: str = "none", calibration: list | None = None) -> pd.DataFrame:
    """Weight averaging against feature averaging. Rows ('layer'): 'weights' is theta_alpha itself and
    'logits' the logit ensemble alpha f_A + (1 - alpha) f_B, at every alpha of `alphas`; a ReLU layer l
    (at the alphas of `layer_alphas`, one forward pass each) is the network that runs A and B up to l,
    takes alpha f_A + (1 - alpha) f_B there and continues with theta_alpha's remaining layers. Where LLFC
    holds with c = 1 at l, the row for l errs like 'weights' (Theorem 1's conclusion, read forwards).
    Columns: error, loss, and agreement, the share of samples on which the row predicts what the
    ensemble predicts."""
    batches = iter(batches)
    first = next(batches)
    taps = find_taps(model_a, first[0])
    relus = taps["relus"]
    every = sorted(set(alphas) | set(layer_alphas))
    nets = {a: corrected_interpolation(model_a, model_b, a, correction, calibration).eval() for a in every}
    modules = {a: dict(net.named_modules()) for a, net in nets.items()}
    rows = {a: (["weights", LOGITS] if a in alphas else []) + (relus if a in layer_alphas else []) for a in every}
    sums = {(a, r): 0.0 for a in every for r in rows[a]}  # (loss, wrong, agree) on the device until the end
    total = 0
    rec_a, rec_b = Recorder(model_a.eval(), relus, []), Recorder(model_b.eval(), relus, [])
    try:
        for x, y in itertools.chain([first], batches):
            logits_a, logits_b = model_a(x), model_b(x)
            total += len(y)
            for a, net in nets.items():
                ensemble = a * logits_a + (1 - a) * logits_b
                outputs = {r: _averaged_at(net, None if r == "weights" else modules[a][r], x, a,
                                           rec_a.post.get(r), rec_b.post.get(r)) for r in rows[a] if r != LOGITS}
                outputs[LOGITS] = ensemble
                target = ensemble.argmax(1)
                for r in rows[a]:
                    out = outputs[r]
                    pred = out.argmax(1)
                    sums[(a, r)] = sums[(a, r)] + torch.stack([F.cross_entropy(out.float(), y, reduction="sum").double(),
                                                               (pred != y).sum().double(), (pred == target).sum().double()])
    finally:
        rec_a.remove(), rec_b.remove()
    depth = {"weights": 0, **taps["depth"]}
    read = to_host(sums.values())
    return pd.DataFrame([{"alpha": a, "layer": r, "depth": depth[r], "loss": float(v[0]) / total,
                          "error": float(v[1]) / total, "agreement": float(v[2]) / total}
                         for (a, r), v in zip(sums, read)])


def _averaged_at(net: nn.Module, module: nn.Module | None, x, alpha: float, feat_a, feat_b) -> torch.Tensor:
    """theta_alpha's logits with `module`'s output replaced by the endpoints' averaged features there
    (None: nothing replaced, theta_alpha itself)."""
    if module is None:
        return net(x)
    hook = module.register_forward_hook(Replace(alpha * feat_a + (1 - alpha) * feat_b))
    try:
        return net(x)
    finally:
        hook.remove()


@torch.no_grad()
def principal_angles(model_a: nn.Module, model_b: nn.Module, batches, k: int = 10) -> pd.DataFrame:
    """Per ReLU layer: principal angles (degrees) between the top-k left singular subspaces of A's and B's
    features (channels x (samples * positions)), from streamed Gram matrices. Columns: layer, depth, k,
    mean_angle, max_angle, and energy_top_k_a, the share of A's feature energy in its top k directions."""
    batches = iter(batches)
    first = next(batches)
    taps = find_taps(model_a, first[0])
    relus = taps["relus"]
    gram = {(t, l): 0.0 for t in "ab" for l in relus}
    rec_a, rec_b = Recorder(model_a.eval(), relus, []), Recorder(model_b.eval(), relus, [])
    try:
        for x, _ in itertools.chain([first], batches):
            model_a(x), model_b(x)
            for l in relus:
                for t, rec in (("a", rec_a), ("b", rec_b)):
                    f = rec.post[l]
                    rows = f if f.dim() == 2 else f.movedim(1, -1).reshape(-1, f.shape[1])
                    gram[(t, l)] = gram[(t, l)] + cross_products(rows, rows)
    finally:
        rec_a.remove(), rec_b.remove()
    per_layer = []  # (angles, energy share) per layer, on the device: read in one transfer below
    for l in relus:
        (ev_a, u_a), (ev_b, u_b) = (torch.linalg.eigh(gram[(t, l)]) for t in "ab")
        kk = min(k, u_a.shape[0])
        sv_a = ev_a.flip(0).clamp_min(0).sqrt()
        per_layer += [_subspace_angles(u_a[:, -kk:], u_b[:, -kk:]),  # eigh sorts ascending
                      (sv_a[:kk] ** 2).sum() / (sv_a ** 2).sum().clamp_min(1e-300)]
    read = to_host(per_layer)
    return pd.DataFrame([{"layer": l, "depth": taps["depth"][l], "k": len(angles), "mean_angle": float(np.mean(angles)),
                          "max_angle": float(np.max(angles)), "energy_top_k_a": float(energy)}
                         for l, angles, energy in zip(relus, read[0::2], read[1::2])])


def _subspace_angles(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees) between the column spaces of two orthonormal bases."""
    return torch.rad2deg(torch.arccos(torch.linalg.svdvals(u_a.T @ u_b).clamp(-1, 1)))


@torch.no_grad()
def weight_principal_angles(model_a: nn.Module, model_b: nn.Module, k: int = 10) -> pd.DataFrame:
    """Per linear op: principal angles (degrees) between the top-k left singular subspaces of W_A and W_B
    (each weight as out x rest) - the weights' low-rank view of the official scripts/principal_angle.py,
    as opposed to `principal_angles`, which compares the features. Needs no data."""
    mods_b = dict(model_b.named_modules())
    rows = []
    for name, m in model_a.named_modules():
        if isinstance(m, LINEAR_OPS):
            wa, wb = (w.weight.detach().flatten(1).double().cpu() for w in (m, mods_b[name]))
            kk = min(k, *wa.shape)
            u_a, u_b = torch.linalg.svd(wa, full_matrices=False)[0], torch.linalg.svd(wb, full_matrices=False)[0]
            angles = _subspace_angles(u_a[:, :kk], u_b[:, :kk]).numpy()  # the weights were copied to the host
            rows.append({"layer": name, "k": kk, "mean_angle": float(np.mean(angles)), "max_angle": float(np.max(angles))})
    return pd.DataFrame(rows)


def weight_spectra(model: nn.Module) -> pd.DataFrame:
    """The low-rank view of each linear op's weight (out x rest): normalised singular values s_i / s_1 at
    a few ranks, the stable rank ||W||_F^2 / ||W||_2^2, and the share of ||W||_F^2 in the top 10 values."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, LINEAR_OPS):
            s = torch.linalg.svdvals(m.weight.detach().flatten(1).double().cpu())
            energy = s ** 2
            row = {"layer": name, "full_rank": len(s), "stable_rank": float(energy.sum() / energy[0]),
                   "energy_top10": float(energy[:10].sum() / energy.sum())}
            for k in (2, 5, 10, 20):
                row[f"sv{k}"] = float(s[k - 1] / s[0]) if len(s) >= k else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)
