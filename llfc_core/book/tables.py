"""What each chapter computes for one setting: tidy tables, declared once in `TABLES`.

A `Producer` is one computation of a setting (or a sweep) that yields one or more named tables; `TABLES`
maps every table name to its producer, its version and what its rows depend on beyond the setting.
To add a table: write its producer function here (returning {table name: frame}), declare it at the
bottom, and list it in `CHAPTER_TABLES`; a chapter then reads it with `ch.table(name)`.
Bumping a producer's `version` recomputes its tables from the cached models (nothing is retrained).

Every per-(setting, pair) frame is cached by the models' keys and the producer's version
(`_pair_frame`), so chapters that need the same pass (chapters 2 and 3 share `layer_tables`) compute it once.
"""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pandas as pd
import torch

from .. import cache, data
from ..interpolate import barriers, interpolation_curve
from ..matching import commutativity_matching, commutativity_moments, commutativity_objective, weight_matching
from ..merge import merge_comparison
from ..metrics import layer_metrics, layer_summary
from ..probes import feature_averaging, principal_angles, stitching_errors, weight_principal_angles, weight_spectra
from ..taps import find_taps
from .claims import CM_CORRECTION
from .pairs import (METHOD_OPTIONS, STATS_BATCH, SettingModels, alignment_data, build_pairs, calibration, eval_splits,
                    pair_perms, train_models)
from ..permutation import apply_permutation, identity_perms, perturb_perms, random_perms
from .profiles import Setting, seeds, setting_hash
from ..train import get_or_train
from ..runtime import default_device, fit_batch
from .width import TABLE_KINDS as WIDTH_KINDS, CELL_VERSION, Sweep, sweep_frames

LAYER_ALPHAS = (0.25, 0.5, 0.75)  # where the layerwise metrics are taken (the paper's figures use these)


def _metric_batches(setting: Setting, device, model=None):
    """The test batches of the layer metrics; on a GPU, with `model`, of a size whose features fit its free
    memory (`runtime.fit_batch`: A, B and theta_alpha held at once; refused before any work when not even one
    sample fits). On the CPU the setting's `metric_batch`, as always."""
    test = eval_splits(setting, device)["test"]
    size = setting.metric_batch
    if model is not None:
        size = fit_batch(model, tuple(test.images.shape[1:]), size, device, training=False, models=3,
                         what=f"{setting.name}: the layer-metric pass").micro_batch
    return data.batches(test, size)


# The version of the producer now running (`Producer.__call__` sets it): it keys the frames that producer
# caches, so a bumped version recomputes them while the models, keyed by their own version, stay cached.
_VERSION = contextvars.ContextVar("table_version", default=1)


def _pair_frame(kind: str, models: SettingModels, pair: str, compute, extra: dict | None = None) -> pd.DataFrame:
    """A per-(setting, pair) frame cached by the models' keys, so chapters share one computation."""
    config = {"kind": kind, "setting": setting_hash(models.setting), "keys": models.keys, "pair": pair, **(extra or {})}
    frame = cache.get_or_compute_frame("frames", config, compute, version=_VERSION.get())
    frame.insert(0, "pair", pair)
    frame.insert(0, "setting", models.setting.name)
    return frame


def lmc_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """'lmc': loss and error along alpha on train and test for every pair and BatchNorm convention (chapter 1)."""
    device = device or default_device()
    models = train_models(setting, device)
    return {"lmc": _lmc_frames(setting, models, build_pairs(models, device), device, setting.corrections)}


def _lmc_frames(setting: Setting, models: SettingModels, pairs: dict, device, corrections) -> pd.DataFrame:
    frames = [_pair_frame("lmc", models, pair, partial(_curve, setting, a, b, device, c), {"correction": c})
              for pair, (a, b) in pairs.items() for c in corrections]
    return pd.concat(frames, ignore_index=True)


def _curve(setting: Setting, a, b, device, correction: str) -> pd.DataFrame:
    return interpolation_curve(a, b, eval_splits(setting, device), alphas=setting.curve_points, correction=correction,
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
            self.result.update(layer_metrics(self.a, self.b, _metric_batches(self.setting, self.device, self.a),
                                             alphas=self.alphas, correction=self.correction,
                                             calibration=calibration(self.setting, self.device)))
        return self.result[kind].assign(correction=self.correction) if kind == "llfc" else self.result[kind]


def layer_tables(setting: Setting, device=None, alphas=LAYER_ALPHAS) -> dict[str, pd.DataFrame]:
    """LLFC per layer for every pair and convention, and the two conditions per layer for every pair
    (chapters 2 and 3 share this pass). The conditions compare the endpoints' own features and weights,
    so they do not depend on how theta_alpha is corrected: they come from the first convention's pass."""
    device = device or default_device()
    models = train_models(setting, device)
    return _layer_frames(setting, models, build_pairs(models, device), device, alphas, setting.corrections)


def _layer_frames(setting: Setting, models: SettingModels, pairs: dict, device, alphas, corrections) -> dict:
    out = {"llfc": [], "conditions": []}
    for pair, (a, b) in pairs.items():
        for i, correction in enumerate(corrections):
            layer_pass = _LayerPass(setting, a, b, device, tuple(alphas), correction)
            extra = {"alphas": list(alphas), "correction": correction}
            out["llfc"].append(_pair_frame("llfc", models, pair, partial(layer_pass, "llfc"), extra))
            if i == 0:
                out["conditions"].append(_pair_frame("conditions", models, pair, partial(layer_pass, "conditions"),
                                                     {"alphas": list(alphas)}))
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def matching_tables(setting: Setting, device=None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """'matching' (chapter 4): for identity, random, WM and AM permutations of the independent B, per linear op the
    weight gap dist(W_A, P W_B P'^T), the feature gap dist(H_A, P' H_B) and the commutativity residual."""
    device = device or default_device()
    models = train_models(setting, device)
    a, b = models.a, models.others["independent"]
    spec = a.permutation_spec()
    sizes = spec.sizes(a.state_dict())
    aligned = {p: pb for p, (_, pb) in build_pairs(models, device).items() if p not in ("spawn", "naive")}
    candidates = {"identity": apply_permutation(b, spec, identity_perms(sizes)),
                  "random": apply_permutation(b, spec, random_perms(sizes, seed)), **aligned}
    frames = []
    for method, pb in candidates.items():
        gaps = partial(_gaps, setting, a, pb, device)
        frames.append(_pair_frame("matching", models, method, gaps, {"seed": seed}).rename(columns={"pair": "method"}))
    return {"matching": pd.concat(frames, ignore_index=True)}


def _gaps(setting: Setting, a, b, device) -> pd.DataFrame:
    cond = layer_metrics(a, b, _metric_batches(setting, device, a), alphas=(0.5,))["conditions"]
    cond = cond[cond.kind == "linear"]
    return cond[["layer", "depth", "dist_w", "dist_h", "dist_com", "dist_com_sample"]]


def appendix_tables(setting: Setting, device=None, k: int = 10) -> dict[str, pd.DataFrame]:
    """'stitching' errors per ReLU layer and principal 'angles' for every pair (chapter 4's appendix view):
    `space` 'features' per ReLU layer (test data), 'weights' per linear op (the official script's view)."""
    device = device or default_device()
    models = train_models(setting, device)
    stitch, angles = [], []
    for pair, (a, b) in build_pairs(models, device).items():
        stitch.append(_pair_frame("stitch", models, pair, partial(_on_test, stitching_errors, setting, a, b, device)))
        angles.append(_pair_frame("angles", models, pair, partial(_angles, setting, a, b, device, k),
                                  {"k": k, "spaces": ["features", "weights"]}))
    return {"stitching": pd.concat(stitch, ignore_index=True), "angles": pd.concat(angles, ignore_index=True)}


def _on_test(measure, setting: Setting, a, b, device) -> pd.DataFrame:
    return measure(a, b, _metric_batches(setting, device, a))


def _depths(setting: Setting, model, device) -> dict:
    """Each tapped layer's depth (`taps.find_taps`), from one test batch."""
    return find_taps(model, next(_metric_batches(setting, device))[0])["depth"]


def _angles(setting: Setting, a, b, device, k: int) -> pd.DataFrame:
    features = _on_test(partial(principal_angles, k=k), setting, a, b, device).assign(space="features")
    weights = weight_principal_angles(a, b, k=k).assign(space="weights")
    weights.insert(1, "depth", weights.layer.map(_depths(setting, a, device)))
    return pd.concat([features, weights], ignore_index=True)


def spectra_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """'spectra': weight singular-value summaries (`probes.weight_spectra`) of A, its spawn partner and the
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
    return {"spectra": pd.concat(frames, ignore_index=True)}


# ----------------------------------------------------------------------------- chapter 6 (beyond)
def _cm_pair(models: SettingModels, device) -> dict:
    """The CM pair, and the AM pair where the setting's own pairs lack it (the conv nets: chapter 6 compares
    CM with the better of WM and AM everywhere)."""
    return build_pairs(models, device, names=("cm",) + (() if "am" in models.setting.pairs else ("am",)))


def _cm_correction(setting: Setting) -> str:
    """The convention chapter 6 compares permutations under (`claims.CM_CORRECTION` where a setting has it)."""
    return CM_CORRECTION if CM_CORRECTION in setting.corrections else setting.corrections[0]


SCATTER_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4)  # share of each permutation's positions moved (cm_scatter)


def cm_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """'cm': per permutation of the independent B (identity, WM, AM, STE where the setting has it, CM's descent
    and CM's full search, `pairs.METHOD_OPTIONS`): the commutativity objective CM minimises
    (`matching.commutativity_objective`) on CM's training subset (`objective`) and on held-out test data
    (`objective_test`), and the seconds WM and each CM search take here (CM's include its statistics pass).
    'cm_scatter': the same objective beside the test barriers of theta_alpha for many permutations: those,
    and CM's and AM's perturbed at growing distances (`permutation.perturb_perms`), the paper's causal story
    (commutativity buys LMC) made testable."""
    device = device or default_device()
    models = train_models(setting, device)
    costs = _CmStudy(setting, models, device)
    return {"cm": _pair_frame("cm_cost", models, "cm", costs.table).drop(columns="pair"),
            "cm_scatter": _pair_frame("cm_scatter", models, "cm", costs.scatter,
                                      {"fractions": list(SCATTER_FRACTIONS), "correction": _cm_correction(setting)}
                                      ).drop(columns="pair")}


@dataclass
class _CmStudy:
    """The permutations of chapter 6's CM study, computed once per setting and replicate."""
    setting: Setting
    models: SettingModels
    device: object
    found: dict = field(default_factory=dict)

    def perms(self) -> dict:
        if self.found:
            return self.found
        a, b = self.models.a, self.models.others["independent"]
        spec = a.permutation_spec()
        batches = list(alignment_data(self.setting, self.device).batches)
        start = time.perf_counter()
        wm = weight_matching(spec, a.state_dict(), b.state_dict())
        seconds = {"wm": time.perf_counter() - start}
        start = time.perf_counter()
        moments = commutativity_moments(a, b, spec, batches)  # timed with CM: they are its statistics pass
        descent = commutativity_matching(a, b, spec, batches, op_moments=moments)
        seconds["cm_descent"] = time.perf_counter() - start
        start = time.perf_counter()
        cm = commutativity_matching(a, b, spec, batches, op_moments=moments, descent=descent, **METHOD_OPTIONS["cm"])
        seconds["cm"] = seconds["cm_descent"] + time.perf_counter() - start  # the full search continues the descent
        pair_perms(self.models, "cm", self.device, computed=cm.perms)  # the CM pair of the other tables uses these
        perms = {"identity": identity_perms(spec.sizes(a.state_dict())), "wm": wm.perms,
                 "am": pair_perms(self.models, "am", self.device)}
        if "ste" in self.setting.pairs:
            perms["ste"] = pair_perms(self.models, "ste", self.device)
        perms.update({"cm_descent": descent.perms, "cm": cm.perms})
        test = list(data.batches(eval_splits(self.setting, self.device)["test"], STATS_BATCH))
        self.found.update(perms=perms, seconds=seconds, sweeps={"cm_descent": descent.sweeps, "cm": cm.sweeps},
                          moments={"objective": moments, "objective_test": commutativity_moments(a, b, spec, test)})
        return self.found

    def objectives(self, perms: dict) -> dict:
        return {k: commutativity_objective(m, perms) for k, m in self.perms()["moments"].items()}

    def table(self) -> pd.DataFrame:
        found = self.perms()
        return pd.DataFrame([{"method": m, **self.objectives(p), "seconds": found["seconds"].get(m, float("nan")),
                              "sweeps": found["sweeps"].get(m)} for m, p in found["perms"].items()])

    def scatter(self) -> pd.DataFrame:
        """Per permutation: its objectives and theta_alpha's test barriers (alpha 0.25, 0.5, 0.75 against the
        endpoints, which do not depend on B's permutation), under `_cm_correction`."""
        found, setting = self.perms(), self.setting
        a, b = self.models.a, self.models.others["independent"]
        spec = a.permutation_spec()
        candidates = dict(found["perms"])
        for base in ("cm", "am"):
            for i, f in enumerate(SCATTER_FRACTIONS):
                candidates[f"{base}~{f:g}"] = perturb_perms(found["perms"][base], f, seed=i)
        split = {"test": eval_splits(setting, self.device)["test"]}
        run = partial(interpolation_curve, splits=split, correction=_cm_correction(setting),
                      calibration=calibration(setting, self.device))
        ends = run(a, b, alphas=[0.0, 1.0])
        rows = []
        for label, perms in candidates.items():
            curve = pd.concat([ends, run(a, apply_permutation(b, spec, perms), alphas=[0.25, 0.5, 0.75])])
            rows.append({"permutation": label, **self.objectives(perms), **barriers(curve).iloc[0].drop("split").to_dict()})
        return pd.DataFrame(rows).drop(columns="correction", errors="ignore")


def cm_lmc_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """'cm_lmc': chapter 1's curves for the CM pair (A, CM(B)), and the AM pair where the setting lacks it,
    per BatchNorm convention."""
    device = device or default_device()
    models = train_models(setting, device)
    return {"cm_lmc": _lmc_frames(setting, models, _cm_pair(models, device), device, setting.corrections)}


def cm_layer_tables(setting: Setting, device=None, alphas=LAYER_ALPHAS) -> dict[str, pd.DataFrame]:
    """'cm_llfc' and 'cm_conditions': chapters 2 and 3's per-layer frames for the CM pair (and AM where the
    setting lacks it), under every convention of the setting (BatchNorm nets: both)."""
    device = device or default_device()
    models = train_models(setting, device)
    frames = _layer_frames(setting, models, _cm_pair(models, device), device, alphas, setting.corrections)
    return {f"cm_{kind}": frame for kind, frame in frames.items()}


def merge_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """'merge': the feature-averaging merge (`merge.merge_comparison`: each linear op fitted by least squares
    on the merged network's own inputs to the average of A's and aligned B's pre-activations) against
    theta_0.5, the output ensemble and the endpoints, on test data, with B aligned by AM and unaligned;
    fitted on the setting's statistics subset of its training data."""
    device = device or default_device()
    models = train_models(setting, device)
    a, b = models.a, models.others["independent"]

    def compute() -> pd.DataFrame:  # only where the frame is not cached
        fit = list(alignment_data(setting, device).batches)
        test = data.batches(eval_splits(setting, device)["test"], STATS_BATCH)
        aligned = apply_permutation(b, a.permutation_spec(), pair_perms(models, "am", device))
        return merge_comparison(a, aligned, b, fit, test).assign(alignment="am")

    return {"merge": _pair_frame("merge", models, "am", compute).drop(columns="pair")}


def averaging_tables(setting: Setting, device=None, alphas=LAYER_ALPHAS) -> dict[str, pd.DataFrame]:
    """'averaging': weight averaging against feature averaging (`probes.feature_averaging`) for every pair and CM,
    on test data, under the paper's convention: theta_alpha and the ensemble at `alphas`, feature
    averaging at every ReLU layer at alpha = 0.5 (a forward pass per layer)."""
    device = device or default_device()
    models = train_models(setting, device)
    pairs = {**build_pairs(models, device), **_cm_pair(models, device)}
    frames = []
    for pair, (a, b) in pairs.items():
        measure = partial(feature_averaging, alphas=tuple(alphas), layer_alphas=(0.5,),
                          correction=setting.corrections[0], calibration=calibration(setting, device))
        frames.append(_pair_frame("averaging", models, pair, partial(_on_test, measure, setting, a, b, device),
                                  {"alphas": list(alphas), "layer_alphas": [0.5], "correction": setting.corrections[0]}))
    return {"averaging": pd.concat(frames, ignore_index=True)}


# Chapter 6's settings by default: the two MLPs and the BatchNorm conv nets that the profile trains (at cpu
# VGG-16 1/4 and ResNet-20 x1, from the cold runs of issue #22); at paper ResNet-20, BN and x32 LayerNorm.
BEYOND_SETTINGS = {"smoke": ["mnist-mlp", "cifar10-mlp"],
                   "cpu": ["mnist-mlp", "cifar10-mlp", "cifar10-vgg16", "cifar10-resnet20"],
                   "paper": ["mnist-mlp", "cifar10-mlp", "cifar10-resnet20", "cifar10-resnet20x32-ln"]}

# Spawn times studied per recipe (epochs; 0: the children share only the initialisation). A recipe not
# listed is not part of the study. The conv nets are where instability exists (Frankle et al.): VGG-16 1/4 at
# cpu, spawned at 0 beside the setting's own 5 (the paper's ~2,000 steps), on its 15-epoch schedule: the
# fewest points that can show an onset (each child costs 15 - k epochs, about 12 minutes on one core). The
# MNIST MLP has no onset to find (the cpu study of its earlier SGD recipe at epochs 0-3: error barriers 0.09 /
# 0.04 / 0.02 / 0.01 points; at Git Re-Basin's recipe the epoch-1 children of all 3 replicates are 0.00
# apart). The CIFAR-10 MLP at Git Re-Basin's recipe has one: spawned at epoch 1 (500 steps of batch 100) its
# children are 8.2 +- 2.4 test points apart, at epoch 4 (2,000 steps, the paper's count) 1.9 +- 2.1 (4.4 / 0.5 /
# 0.9: one replicate of three still unstable), at epoch 10 (5,000 steps) 0.7 +- 0.7, every replicate within 1.4;
# so the study spawns it at 1, 4 and 10, and the setting spawns at 10 (`profiles.BASE`).
# Each MLP child costs 100 - k epochs, about 9 minutes on 2 threads. The study runs on every replicate of its
# setting (issue #22: >= 3 for the MLPs, >= 2 for the conv nets), so the onset is read on the replicate mean
# with each replicate's barrier beside it; children a setting's pairs already use (its own spawn epoch) cost
# nothing more. The paper profile spawns its conv nets at six epochs.
SPAWN_STUDY = {"smoke-mlp-mnist": (0, 1), "cpu-vgg16-bn-w025": (0, 5), "rebasin-mlp-cifar10": (1, 4, 10),
               "paper-vgg16-bn": (0, 1, 2, 3, 5, 10), "paper-resnet20-bn": (0, 1, 2, 3, 5, 10)}


def spawn_epochs(setting: Setting) -> tuple:
    return tuple(e for e in SPAWN_STUDY.get(setting.recipe.name, ()) if e < setting.recipe.epochs)


def spawn_models(setting: Setting, epoch: int, device) -> tuple:
    """The two children branched at `epoch` (A's and the spawn partner's data seeds), and their keys."""
    s = seeds(setting.replicate)
    kids = [get_or_train(setting.recipe, s["init_a"], s[seed], device=device, spawn_epoch=epoch,
                         parent_data_seed=s["parent_data"]) for seed in ("data_a", "data_spawn")]
    return tuple(m for m, _ in kids), [meta["key"] for _, meta in kids]


def spawn_tables(setting: Setting, device=None) -> dict[str, pd.DataFrame]:
    """Per spawn epoch of the study: the pair's curves ('spawn_lmc') and, at alpha = 0.5, LLFC and the two
    conditions per layer ('spawn_layers'), under the paper's convention."""
    device = device or default_device()
    out = {"spawn_lmc": [pd.DataFrame()], "spawn_layers": [pd.DataFrame()]}
    paper = setting.corrections[:1]
    for epoch in spawn_epochs(setting):
        (a, b), keys = spawn_models(setting, epoch, device)
        models = SettingModels(setting, a, {"spawn": b}, {"a": keys[0], "spawn": keys[1]})
        layers = _layer_frames(setting, models, {"spawn": (a, b)}, device, (0.5,), paper)
        out["spawn_lmc"].append(_lmc_frames(setting, models, {"spawn": (a, b)}, device, paper).assign(spawn_epoch=epoch))
        out["spawn_layers"].append(layer_summary(layers["llfc"], layers["conditions"]).assign(spawn_epoch=epoch))
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def width_tables(sweep: Sweep, device=None, ray_address: str | None = None) -> dict[str, pd.DataFrame]:
    """Chapter 5's tables of one sweep (`width.sweep_frames`); `device` is unused (each cell picks its own)."""
    return {f"width_{kind}": frame for kind, frame in sweep_frames(sweep, ray_address).items()}


# ------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Producer:
    """One computation of a setting (or a sweep) that yields the tables `outputs`.

    fn(setting, device=None, **options) -> {table name: frame}. `version`: bump it when the rows change
    (a new column, a fixed formula): the tables are recomputed from the cached models, which are keyed by
    their own version. `depends(setting)`: what the rows depend on beyond the setting, as a JSON-able dict.
    `covers(setting)`: whether the producer applies to a setting at all (default: every setting)."""
    fn: Callable
    outputs: tuple
    version: int = 1
    depends: Callable | None = None
    covers: Callable | None = None

    def __call__(self, setting, device=None, **options) -> dict[str, pd.DataFrame]:
        """The tables of every replicate of a setting, with a `replicate` column after `setting` (a sweep's
        cells are its replicates already)."""
        token = _VERSION.set(self.version)
        try:
            if isinstance(setting, Sweep):
                return self.fn(setting, device, **options)
            out: dict[str, list] = {}
            for r in range(setting.replicates):
                for name, frame in self.fn(setting.at_replicate(r), device, **options).items():
                    out.setdefault(name, []).append(_with_replicate(frame, r))
            return {name: pd.concat(frames, ignore_index=True) for name, frames in out.items()}
        finally:
            _VERSION.reset(token)


def _with_replicate(frame: pd.DataFrame, replicate: int) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(int("setting" in frame.columns), "replicate", replicate)
    return frame


def _spawn_study(setting: Setting) -> dict:
    return {"spawn_epochs": list(spawn_epochs(setting))}


_PRODUCERS = [
    Producer(lmc_tables, ("lmc",)),
    Producer(layer_tables, ("llfc", "conditions")),
    Producer(matching_tables, ("matching",)),
    Producer(appendix_tables, ("stitching", "angles")),
    Producer(spectra_tables, ("spectra",)),
    # version 2 (issue #23): CM's full search (pairs.METHOD_OPTIONS), its descent and held-out objectives beside it,
    # AM pairs for the conv nets, CM's layer metrics under every convention
    Producer(cm_tables, ("cm", "cm_scatter"), version=2),
    Producer(cm_lmc_tables, ("cm_lmc",), version=2),
    Producer(cm_layer_tables, ("cm_llfc", "cm_conditions"), version=2),
    Producer(averaging_tables, ("averaging",), version=2),  # its CM pair is the full search's
    Producer(merge_tables, ("merge",)),
    # version 2: the study runs on every replicate of its setting, not on the first only
    Producer(spawn_tables, ("spawn_lmc", "spawn_layers"), version=2, depends=_spawn_study,
             covers=lambda s: bool(spawn_epochs(s))),
    # a sweep's rows are versioned by its cells (`width.CELL_VERSION`, part of every cell and of the sweep's hash)
    Producer(width_tables, tuple(f"width_{kind}" for kind in WIDTH_KINDS), version=CELL_VERSION),
]
TABLES: dict[str, Producer] = {name: p for p in _PRODUCERS for name in p.outputs}


def producer(table: str) -> Producer:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; the tables are {sorted(TABLES)}")
    return TABLES[table]


def compute_table(table: str, setting, device=None, **options) -> pd.DataFrame:
    """One table of one setting (or sweep), from the cache or computed."""
    return producer(table)(setting, device, **options)[table]


def results_hash(table: str, setting) -> str:
    """The hash a table's committed rows of one setting are recorded under: the setting's with the table's
    version, plus what the table depends on beyond it (the spawn study's epochs). Sweeps hash themselves."""
    if isinstance(setting, Sweep):
        return setting.results_hash()
    p = producer(table)
    if p.depends is not None:
        return cache.config_hash({"setting": setting_hash(setting), **p.depends(setting)}, version=p.version)
    return setting_hash(setting, version=p.version)


def table_settings(table: str, settings: dict) -> list[str] | None:
    """Which of `settings` a table covers (the spawn study's: only those in `SPAWN_STUDY`); None: all."""
    covers = producer(table).covers
    return None if covers is None else [name for name, s in settings.items() if covers(s)]


# The tables each chapter reads (in the order it reads them).
CHAPTER_TABLES = {"01_lmc": ["lmc"], "02_llfc": ["llfc", "lmc"], "03_conditions": ["conditions", "llfc"],
                  "04_matching": ["matching", "stitching", "angles", "lmc", "spectra"],
                  "05_width": [f"width_{kind}" for kind in WIDTH_KINDS],
                  "06_beyond": ["cm", "cm_scatter", "cm_lmc", "cm_llfc", "cm_conditions", "lmc", "llfc", "conditions",
                                "averaging", "merge", "spawn_lmc", "spawn_layers"]}
SWEEP_CHAPTERS = ("05_width",)  # chapters whose rows come from sweeps (`llfc_core.width`), not settings
# Chapters that default to a subset of a profile's settings: chapter -> profile -> setting names.
CHAPTER_SETTINGS = {"06_beyond": BEYOND_SETTINGS}
