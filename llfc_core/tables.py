"""What each chapter computes for one setting: tidy tables, one function per table.

Every per-(setting, pair) frame is cached by the models' keys (`_pair_frame`), so chapters that need
the same pass (chapters 2 and 3 share `layer_tables`) compute it once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import pandas as pd
import torch

from . import cache, data
from .interpolate import interpolation_curve
from .metrics import (find_taps, layer_metrics, principal_angles, stitching_errors, weight_principal_angles,
                      weight_spectra)
from .pairs import SettingModels, build_pairs, calibration, eval_splits, train_models
from .permutation import apply_permutation, identity_perms, random_perms
from .profiles import Setting, setting_hash
from .runtime import default_device

LAYER_ALPHAS = (0.25, 0.5, 0.75)  # where the layerwise metrics are taken (the paper's figures use these)


def _metric_batches(setting: Setting, device):
    return data.batches(eval_splits(setting, device)["test"], setting.metric_batch)


def _pair_frame(kind: str, models: SettingModels, pair: str, compute, extra: dict | None = None) -> pd.DataFrame:
    """A per-(setting, pair) frame cached by the models' keys, so chapters share one computation."""
    config = {"kind": kind, "setting": setting_hash(models.setting), "keys": models.keys, "pair": pair, **(extra or {})}
    frame = cache.get_or_compute_frame("frames", config, compute)
    frame.insert(0, "pair", pair)
    frame.insert(0, "setting", models.setting.name)
    return frame


def lmc_table(setting: Setting, device=None) -> pd.DataFrame:
    """Loss and error along alpha on train and test for every pair and BatchNorm convention (chapter 1)."""
    device = device or default_device()
    models = train_models(setting, device)
    frames = []
    for pair, (a, b) in build_pairs(models, device).items():
        for correction in setting.corrections:
            curve = partial(_curve, setting, a, b, device, correction)
            frames.append(_pair_frame("lmc", models, pair, curve, {"correction": correction}))
    return pd.concat(frames, ignore_index=True)


def _curve(setting: Setting, a, b, device, correction: str) -> pd.DataFrame:
    return interpolation_curve(a, b, eval_splits(setting, device), alphas=setting.alphas, correction=correction,
                               calibration=calibration(setting, device))


@dataclass
class _LayerPass:
    """One `layer_metrics` pass for a pair under one convention, run on the first request; it yields both
    the 'llfc' and the 'conditions' frame, so a pair whose frames are both cached costs nothing."""
    setting: Setting
    a: torch.nn.Module
    b: torch.nn.Module
    device: object
    alphas: tuple
    correction: str
    result: dict = field(default_factory=dict)

    def __call__(self, kind: str) -> pd.DataFrame:
        if not self.result:
            self.result.update(layer_metrics(self.a, self.b, _metric_batches(self.setting, self.device),
                                             alphas=self.alphas, correction=self.correction,
                                             calibration=calibration(self.setting, self.device)))
        return self.result[kind].assign(correction=self.correction) if kind == "llfc" else self.result[kind]


def layer_tables(setting: Setting, device=None, alphas=LAYER_ALPHAS) -> dict[str, pd.DataFrame]:
    """LLFC per layer for every pair and convention, and the two conditions per layer for every pair
    (chapters 2 and 3 share this pass). The conditions compare the endpoints' own features and weights,
    so they do not depend on how theta_alpha is corrected: they come from the first convention's pass."""
    device = device or default_device()
    models = train_models(setting, device)
    out = {"llfc": [], "conditions": []}
    for pair, (a, b) in build_pairs(models, device).items():
        for i, correction in enumerate(setting.corrections):
            layer_pass = _LayerPass(setting, a, b, device, tuple(alphas), correction)
            extra = {"alphas": list(alphas), "correction": correction}
            out["llfc"].append(_pair_frame("llfc", models, pair, partial(layer_pass, "llfc"), extra))
            if i == 0:
                out["conditions"].append(_pair_frame("conditions", models, pair, partial(layer_pass, "conditions"),
                                                     {"alphas": list(alphas)}))
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def matching_table(setting: Setting, device=None, seed: int = 0) -> pd.DataFrame:
    """Chapter 4: for identity, random, WM and AM permutations of the independent B, per linear op the
    weight gap dist(W_A, P W_B P'^T), the feature gap dist(H_A, P' H_B) and the commutativity residual."""
    device = device or default_device()
    models = train_models(setting, device)
    a, b = models.a, models.others["independent"]
    spec = a.permutation_spec()
    sizes = spec.sizes(a.state_dict())
    aligned = {p: pb for p, (_, pb) in build_pairs(models, device).items() if p in ("wm", "am", "ste")}
    candidates = {"identity": apply_permutation(b, spec, identity_perms(sizes)),
                  "random": apply_permutation(b, spec, random_perms(sizes, seed)), **aligned}
    frames = []
    for method, pb in candidates.items():
        gaps = partial(_gaps, setting, a, pb, device)
        frames.append(_pair_frame("matching", models, method, gaps, {"seed": seed}).rename(columns={"pair": "method"}))
    return pd.concat(frames, ignore_index=True)


def _gaps(setting: Setting, a, b, device) -> pd.DataFrame:
    cond = layer_metrics(a, b, _metric_batches(setting, device), alphas=(0.5,))["conditions"]
    cond = cond[cond.kind == "linear"]
    return cond.rename(columns={"dist_w": "weight_gap", "dist_h": "feature_gap"})[
        ["layer", "depth", "weight_gap", "feature_gap", "dist_com", "dist_com_sample"]]


def appendix_tables(setting: Setting, device=None, k: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stitching errors per ReLU layer, and principal angles for every pair (chapter 4's appendix view):
    `space` 'features' per ReLU layer (test data), 'weights' per linear op (the official script's view)."""
    device = device or default_device()
    models = train_models(setting, device)
    stitch, angles = [], []
    for pair, (a, b) in build_pairs(models, device).items():
        stitch.append(_pair_frame("stitch", models, pair, partial(_on_test, stitching_errors, setting, a, b, device)))
        angles.append(_pair_frame("angles", models, pair, partial(_angles, setting, a, b, device, k),
                                  {"k": k, "spaces": ["features", "weights"]}))
    return pd.concat(stitch, ignore_index=True), pd.concat(angles, ignore_index=True)


def _on_test(measure, setting: Setting, a, b, device) -> pd.DataFrame:
    return measure(a, b, _metric_batches(setting, device))


def _depths(setting: Setting, model, device) -> dict:
    """Each tapped layer's depth (`metrics.find_taps`), from one test batch."""
    return find_taps(model, next(_metric_batches(setting, device))[0])["depth"]


def _angles(setting: Setting, a, b, device, k: int) -> pd.DataFrame:
    features = _on_test(partial(principal_angles, k=k), setting, a, b, device).assign(space="features")
    weights = weight_principal_angles(a, b, k=k).assign(space="weights")
    weights.insert(1, "depth", weights.layer.map(_depths(setting, a, device)))
    return pd.concat([features, weights], ignore_index=True)


def spectra_table(setting: Setting, device=None) -> pd.DataFrame:
    """Weight singular-value summaries (`metrics.weight_spectra`) of A, its spawn partner and the
    independent B, per linear op, with each layer's depth (chapter 4's low-rank view)."""
    device = device or default_device()
    models = train_models(setting, device)
    depth = _depths(setting, models.a, device)
    frames = []
    for name, model in {"a": models.a, **models.others}.items():
        frame = weight_spectra(model)
        frame.insert(0, "model", name)
        frame.insert(0, "setting", setting.name)
        frame.insert(3, "depth", frame.layer.map(depth))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def llfc_table(setting: Setting, device=None) -> pd.DataFrame:
    return layer_tables(setting, device)["llfc"]


def conditions_table(setting: Setting, device=None) -> pd.DataFrame:
    return layer_tables(setting, device)["conditions"]


def stitching_table(setting: Setting, device=None) -> pd.DataFrame:
    return appendix_tables(setting, device)[0]


def angles_table(setting: Setting, device=None) -> pd.DataFrame:
    return appendix_tables(setting, device)[1]


# Every result table by name, and the tables each chapter reads (in the order it reads them).
TABLES = {"lmc": lmc_table, "llfc": llfc_table, "conditions": conditions_table, "matching": matching_table,
          "stitching": stitching_table, "angles": angles_table, "spectra": spectra_table}
CHAPTER_TABLES = {"01_lmc": ["lmc"], "02_llfc": ["llfc", "lmc"], "03_conditions": ["conditions", "llfc"],
                  "04_matching": ["matching", "stitching", "angles", "lmc", "spectra"]}
