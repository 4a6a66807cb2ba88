"""Chapter 5: width, the dimension of the neuron cloud and optimal transport (Ferbach et al., AISTATS 2024),
and what no one has measured: LLFC and its two conditions against width.

A `Sweep` is a grid hidden layers x width x peak learning rate x replicate of MLP pairs trained by one recipe;
each grid point is a cell (`measure_cell`), run through `llfc_core.sweep` (in this process, or on Ray)
and cached by its configuration, so sweeps that share a grid point (the lr sweep's 3 x 512 at the width
sweeps' lr) train and measure it once. A cell trains or loads its two networks A and B and, for each way
of aligning B to A (`METHODS`), measures
  lmc     loss / error barriers on train and test, the midpoint's loss and error, the endpoints'
  layers  per feature layer at alpha = 0.5: cos_dist, its baseline, c, Dist_sigma, Dist_com
  cost    per linear op: B's neurons' relative distance to A's, plain and in A's input norm, and per hidden op
          the W2 between A's and aligned B's clouds (`neurons.layer_transport`: after `iwm`, Ferbach et al.'s
          incoming-weight matching, the exact layerwise W2 of their bounds)
and, for A at initialisation and trained,
  dims    per hidden linear op (the classifier's 10 fixed rows left out): the dimension of the neuron cloud,
          centred participation ratio and TwoNN (scikit-dimension), plain and in the Sigma norm
          (`neurons.cloud_dimensions`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import cache, data
from . import sweep as engine
from ..interpolate import barriers, interpolation_curve
from ..matching import ALIGNMENTS, AlignmentData, align
from ..metrics import layer_metrics, layer_summary
from ..neurons import (cloud_dimensions, fitted_rate, flat_torus_transport_curve, input_moments, layer_transport,
                       matching_distances, rate_slope)
from .pairs import STATS_BATCH, SUBSET_SEEDS
from ..permutation import apply_permutation
from ..recipes import Recipe
from ..runtime import default_device, training_precision
from ..train import dataset_on, get_or_train, new_state, training_data

# of `matching.ALIGNMENTS`; iwm: Ferbach et al.'s incoming-weight WM (their plain baseline), swm: their
# covariance-weighted WM; wm: Git Re-Basin's joint WM
METHODS = ("naive", "wm", "iwm", "swm", "am")
DIMENSION = "twonn"        # the dimension d the rate is read with (`neurons.cloud_dimensions`); pr_centred beside it
ESTIMATORS = ("twonn",)
MATCHED = ("wm", "iwm", "swm", "am")
# The barrier at the midpoint, as Ferbach et al. measure it (the book's other chapters take the max over 11-21 points).
ALPHAS = (0.0, 0.5, 1.0)
CELL_VERSION = 3  # bump when measure_cell's output changes (3: iwm, W2, centred / TwoNN dimensions, A only)
IN_FEATURES = {"mnist": 784, "cifar10": 3072}
TABLE_KINDS = ("lmc", "layers", "cost", "dims")
GRID = ["hidden_layers", "width", "lr", "replicate"]  # a cell's coordinates, the first columns of its rows
# (a layer's own `depth`, as in chapters 2-3, stays the column of that name in the layer rows)


@dataclass(frozen=True)
class Sweep:
    """A grid of MLP pairs. The recipe follows Ferbach et al.'s learning-rate study (Sec. 5 and the
    official notebook damienferbach/OT_LMC, as issue #12 summarises them): SGD with momentum, linear
    warm-up then cosine decay, batch 500. Momentum 0.9, no weight decay and the epoch budget are ours."""
    name: str
    dataset: str
    hidden_layers: tuple = (1,)       # numbers of hidden layers, each of `width` units
    widths: tuple = (512,)
    lrs: tuple = (0.1,)
    replicates: int = 3               # independent pairs per grid point; replicate k: A = (init 2k, data 2k), B = (2k+1, 2k+1)
    epochs: int = 4
    train_subset: int | None = 10000  # None: the whole training set
    warmup_epochs: float = 0.5
    batch_size: int = 500
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_train: int | None = 1000     # samples for the barriers (None: all)
    eval_test: int | None = 1000      # ... and for the layer metrics
    statistics: int = 2000            # training samples for Sigma, AM and the dimensions
    methods: tuple = METHODS
    precision: str = "auto"           # training precision (runtime.training_precision)
    gpu_fraction: float = 0.25        # of one GPU per cell on Ray (several small trainings share one)
    notes: str = ""

    def __post_init__(self):
        unknown = set(self.methods) - set(ALIGNMENTS)
        if unknown:
            raise ValueError(f"sweep {self.name!r}: unknown methods {sorted(unknown)}; choose from {ALIGNMENTS}")

    def recipe(self, hidden: int, width: int, lr: float) -> Recipe:
        model = {"arch": "mlp", "in_features": IN_FEATURES[self.dataset], "widths": [int(width)] * int(hidden),
                 "num_classes": 10}
        return Recipe(f"sweep-mlp-{self.dataset}", self.dataset, model, epochs=self.epochs, batch_size=self.batch_size,
                      optimizer="sgd", lr=float(lr), momentum=self.momentum, weight_decay=self.weight_decay,
                      schedule="cosine", warmup_epochs=self.warmup_epochs, train_subset=self.train_subset,
                      precision=self.precision)

    def cells(self) -> list[dict]:
        """One JSON-able dict per grid point: everything its results depend on, nothing else (no name),
        so two sweeps sharing a grid point share its cache entry."""
        # the precision the cells train in, resolved here (the recipe's dict leaves it out); recorded when not fp32
        resolved = self.resolved_precision()
        precision = {} if resolved == "fp32" else {"precision": resolved}
        return [{"recipe": self.recipe(h, w, lr).to_dict(), "grid": {"hidden_layers": h, "width": w, "lr": lr, "replicate": k},
                 "seeds": {"a": [2 * k, 2 * k], "b": [2 * k + 1, 2 * k + 1]}, "eval_train": self.eval_train,
                 "eval_test": self.eval_test, "statistics": self.statistics, "methods": list(self.methods),
                 "alphas": list(ALPHAS), "version": CELL_VERSION, **precision}
                for h in self.hidden_layers for w in self.widths for lr in self.lrs for k in range(self.replicates)]

    def resolved_precision(self) -> str:
        return training_precision(default_device(), self.precision)

    def results_hash(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("gpu_fraction")  # where a cell runs does not change its numbers
        d["precision"] = self.resolved_precision()
        return cache.config_hash({"sweep": d, "cell_version": CELL_VERSION})

    def provenance(self) -> dict:
        """What the manifest records about a computed sweep (the form `results.load_or_compute` takes)."""
        return {"setting": {"hash": self.results_hash(), "sweep": dataclasses.asdict(self),
                            "recipe": self.recipe(self.hidden_layers[0], self.widths[0], self.lrs[0]).to_dict(),
                            "seeds": "replicate k: A = (init 2k, data 2k), B = (init 2k+1, data 2k+1)"},
                "data": {self.dataset: dataset_on(self.dataset, "test", "cpu").source},
                "seeds": {}}  # the settings' seed table (profiles.SEEDS) does not apply: the rule is above


# The sweeps per profile. cpu (issue #23: trained to convergence, as far as 2 cores allow): all 60,000 MNIST
# images (50,000 CIFAR-10) for 5 epochs, 600 steps at batch 500 (was 80; the paper profile: 20 epochs), widths up to
# 1,024 (2,048 would be half of the sweep's minutes), under the device's precision policy. The learning-rate
# study keeps rates that train: at 1e-4 and 1e-3 (10 epochs of 10k images) the committed cpu networks did not
# train, so a correlation across rates mixed trained and untrained networks; it spans 3e-3 ... 0.1 instead.
_WIDTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
_CPU_WIDTHS = _WIDTHS[:-1]
_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
_CPU_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
_CPU = {"epochs": 5, "train_subset": None, "eval_train": 2000, "eval_test": 2000}
SWEEPS: dict[str, dict[str, Sweep]] = {
    # smoke: three widths and three rates, the fewest that give every figure and check of the chapter
    "smoke": {"mnist-depth1": Sweep("mnist-depth1", "mnist", widths=(8, 16, 32), replicates=1, epochs=1, train_subset=1000,
                                    eval_train=300, eval_test=300, statistics=300),
              "mnist-lr": Sweep("mnist-lr", "mnist", hidden_layers=(3,), widths=(16,), lrs=(1e-3, 1e-2, 1e-1), replicates=1,
                                epochs=1, train_subset=1000, eval_train=300, eval_test=300, statistics=300)},
    "cpu": {"mnist-depth1": Sweep("mnist-depth1", "mnist", widths=_CPU_WIDTHS, **_CPU),
            "mnist-depth3": Sweep("mnist-depth3", "mnist", hidden_layers=(3,), widths=_CPU_WIDTHS, **_CPU),
            "cifar10-depth3": Sweep("cifar10-depth3", "cifar10", hidden_layers=(3,), widths=(64, 256, 1024), **_CPU),
            "mnist-lr": Sweep("mnist-lr", "mnist", hidden_layers=(3,), widths=(512,), lrs=_CPU_LRS, **_CPU)},
    "paper": {"mnist-depth1": Sweep("mnist-depth1", "mnist", widths=_WIDTHS + (4096,), replicates=5, epochs=20,
                                    train_subset=None, eval_train=10000, eval_test=None, statistics=5000),
              "mnist-depth3": Sweep("mnist-depth3", "mnist", hidden_layers=(3,), widths=_WIDTHS + (4096,), replicates=5, epochs=20,
                                    train_subset=None, eval_train=10000, eval_test=None, statistics=5000),
              "cifar10-depth3": Sweep("cifar10-depth3", "cifar10", hidden_layers=(3,), widths=(64, 256, 1024, 4096), replicates=5,
                                      epochs=40, train_subset=None, eval_train=10000, eval_test=None, statistics=5000),
              "mnist-lr": Sweep("mnist-lr", "mnist", hidden_layers=(3,), widths=(512,), lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                                replicates=5, epochs=20, train_subset=None, eval_train=10000, eval_test=None, statistics=5000)},
}


def get_sweeps(profile: str, names: list | str | None = None) -> dict[str, Sweep]:
    """The sweeps of a profile, optionally only those `names` (a list or 'a,b')."""
    if profile not in SWEEPS:
        raise KeyError(f"unknown profile {profile!r}; choose from {sorted(SWEEPS)}")
    sweeps = SWEEPS[profile]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names:
        unknown = set(names) - set(sweeps)
        if unknown:
            raise KeyError(f"profile {profile!r} has no sweeps {sorted(unknown)}; it has {sorted(sweeps)}")
        sweeps = {k: v for k, v in sweeps.items() if k in names}
    return sweeps


# ------------------------------------------------------------------------------------- one cell
def measure_cell(cell: dict) -> dict[str, pd.DataFrame]:
    """Train or load the cell's A and B, align B by each method and measure (see the module docstring)."""
    device = default_device()
    recipe = Recipe(**dict(cell["recipe"], milestones=tuple(cell["recipe"]["milestones"]),
                           precision=cell.get("precision", "fp32")))
    (init_a, data_a), (init_b, data_b) = cell["seeds"]["a"], cell["seeds"]["b"]
    a, _ = get_or_train(recipe, init_a, data_a, device=device)
    b, _ = get_or_train(recipe, init_b, data_b, device=device)
    train = training_data(recipe, device)
    splits = {"train": train.subset(cell["eval_train"], SUBSET_SEEDS["eval_train"]),
              "test": dataset_on(recipe.dataset, "test", str(device)).subset(cell["eval_test"], SUBSET_SEEDS["eval_test"])}
    stats = list(data.batches(train.subset(cell["statistics"], SUBSET_SEEDS["statistics"]), STATS_BATCH))
    spec = a.permutation_spec()
    moments_a = input_moments(a, stats)
    out = {kind: [] for kind in TABLE_KINDS}
    # the endpoints are the same networks whatever the permutation: evaluated once, the inner points per method
    inner = [x for x in cell["alphas"] if 0 < x < 1]
    ends = interpolation_curve(a, b, splits, alphas=[x for x in cell["alphas"] if x in (0, 1)])
    for method in cell["methods"]:
        options = {"moments": moments_a} if method == "swm" else {}  # A's input moments, already taken
        aligned = apply_permutation(b, spec, align(method, a, b, spec, AlignmentData(batches=stats), **options).perms)
        curve = pd.concat([ends, interpolation_curve(a, aligned, splits, alphas=inner)], ignore_index=True)
        out["lmc"].append(_lmc_rows(curve).assign(method=method))
        metrics = layer_metrics(a, aligned, data.batches(splits["test"], STATS_BATCH), alphas=(0.5,))
        out["layers"].append(layer_summary(metrics["llfc"], metrics["conditions"]).assign(method=method))
        cost = matching_distances(a, aligned, moments_a).merge(layer_transport(a, aligned, spec)[["layer", "w2_sq", "w2"]],
                                                               on="layer", how="left")  # the head has no W2 row
        out["cost"].append(cost.assign(method=method))
    # A's clouds only: B's are draws of the same law (A's at init are the i.i.d. draws the rate is calibrated on)
    start = new_state(recipe, init_a, device).model.eval()  # the same init A started from
    for stage, model in (("init", start), ("trained", a)):
        moments = moments_a if model is a else input_moments(model, stats)  # A's trained moments were taken above
        out["dims"].append(cloud_dimensions(model, spec, moments, ESTIMATORS).assign(model="a", stage=stage))
    grid = cell["grid"]
    return {kind: pd.concat(frames, ignore_index=True).assign(**grid)[GRID + _rest(frames[0])]
            for kind, frames in out.items()}


def _rest(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in GRID]


def _lmc_rows(curve: pd.DataFrame) -> pd.DataFrame:
    """Per split: the barriers, the midpoint's loss and error, and the endpoints' (A at alpha 1, B at 0)."""
    rows = barriers(curve.drop(columns="correction")).set_index("split")
    for split, g in curve.groupby("split"):
        at = g.set_index("alpha")
        for metric in ("loss", "error"):
            rows.loc[split, f"{metric}_mid"] = at.loc[0.5, metric]
            rows.loc[split, f"{metric}_ends"] = (at.loc[1.0, metric] + at.loc[0.0, metric]) / 2
    return rows.reset_index()


# ------------------------------------------------------------------------------- the sweep's tables
def sweep_frames(sweep: Sweep, ray_address: str | None = None) -> dict[str, pd.DataFrame]:
    """Every cell of `sweep` (cached ones read), as one frame per kind with the sweep's name as `setting`."""
    gpus = sweep.gpu_fraction if default_device().type == "cuda" else 0.0
    results = engine.run(measure_cell, sweep.cells(), ray_address=ray_address, num_gpus=gpus, desc=sweep.name)
    frames = {}
    for kind in TABLE_KINDS:
        frame = pd.concat([r[kind] for r in results], ignore_index=True)
        frame.insert(0, "setting", sweep.name)
        frames[kind] = frame
    return frames


# ------------------------------------------------------------------------------------- the analysis
# What chapter 5 shows and checks, from the sweep's tables: `claims.width_claims` and the notebook use
# these, so a number in a table and the check beside it are computed once.
SWEPT = 3  # a sweep varies a coordinate (width, lr) when it takes at least this many values: the fewest that
# a fitted slope or a rank correlation says anything on
BEST_MATCHING = {"plain": "iwm", "sigma": "swm"}  # each norm's own matching (Ferbach et al.'s two): its cost is the transport cost


def swept(frame: pd.DataFrame, coordinate: str) -> pd.DataFrame:
    """The rows of `frame` from the sweeps that vary `coordinate`: 'width' (the width sweeps) or 'lr' (the
    learning-rate sweeps), at least `SWEPT` values of it."""
    return frame[frame.groupby("setting")[coordinate].transform("nunique") >= SWEPT]


def fit_slopes(frame: pd.DataFrame, y: str, by: list[str], x: str = "width", floor: float = 1e-4) -> pd.DataFrame:
    """Least-squares slope of log(mean y) against log(x) per group `by` (means over replicates first;
    means below `floor` are set to it, so a barrier that reaches zero counts as small, not as missing)."""
    rows = []
    for key, g in frame.groupby(by, sort=False):
        means = g.groupby(x)[y].mean()
        if len(means) < 2:
            continue
        slope, _ = np.polyfit(np.log(means.index.to_numpy(float)), np.log(means.clip(lower=floor).to_numpy()), 1)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "slope": float(slope),
                     "points": len(means), f"{y}_first": float(means.iloc[0]), f"{y}_last": float(means.iloc[-1])})
    return pd.DataFrame(rows)


def hidden_dimension(dims: pd.DataFrame, column: str = DIMENSION, stage: str = "trained", model: str = "a") -> pd.DataFrame:
    """Per cell: the mean of `column` (a dimension of `neurons.cloud_dimensions`) over the hidden layers (the
    dims table has no classifier rows)."""
    d = dims[(dims.stage == stage) & (dims.model == model)]
    return d.groupby(["setting"] + GRID, as_index=False)[column].mean()


def dimension_and_barrier(dims: pd.DataFrame, lmc: pd.DataFrame, method: str = "wm") -> pd.DataFrame:
    """Per cell: the dimension (`DIMENSION`) of A's trained hidden clouds in the plain norm (`hidden_dimension`)
    beside `method`'s rows of `lmc` (pass one split): what the claim `width.dimension_barrier` correlates."""
    return hidden_dimension(dims).merge(lmc[lmc.method == method], on=["setting"] + GRID)


def best_cost(cost: pd.DataFrame) -> pd.DataFrame:
    """The transport cost between A's and B's clouds in each norm after that norm's own matching
    (`BEST_MATCHING`): `cost` rows with `norm` and `cost` (plain: IWM's dist_plain; sigma: Sigma-WM's dist_sigma)."""
    return pd.concat([cost[cost.method == method].assign(norm=norm, cost=cost[f"dist_{norm}"])
                      for norm, method in BEST_MATCHING.items()])


# What each norm's rate is read on: (method, cost column, squared, dimension column of the dims table).
# plain: W2^2 between A's and IWM-aligned B's clouds (`neurons.layer_transport`, the quantity of Ferbach et
# al.'s bounds); sigma: Sigma-WM's relative distance, a W2 in A's input norm (not squared).
RATE_QUANTITIES = {"plain": ("iwm", "w2_sq", True, DIMENSION), "sigma": ("swm", "dist_sigma", False, f"{DIMENSION}_sigma")}


def rate_table(cost: pd.DataFrame, dims: pd.DataFrame) -> pd.DataFrame:
    """Per (sweep, hidden layers, hidden layer, norm): the fitted log-log slope of the transport cost against
    width (`RATE_QUANTITIES`) beside the slope the theory predicts over the same widths
    (`neurons.rate_slope`: W2 between two m-samples of a law of dimension d, log factor at d = 2 included)
    for d = A's trained cloud's `DIMENSION` at the largest width; `d_init` beside it (at init the neurons
    are i.i.d. by construction, the case the rate is exact for)."""
    rows = []
    a = dims[dims.model == "a"]
    keys = ["setting", "hidden_layers", "layer"]
    for norm, (method, column, squared, dim) in RATE_QUANTITIES.items():
        part = cost[(cost.method == method) & cost[column].notna() & cost.layer.isin(set(a.layer))]  # hidden ops
        slopes = fit_slopes(part, column, keys)
        if slopes.empty:
            continue
        for stage, name in (("trained", "dimension"), ("init", "d_init")):
            d = a[a.stage == stage]
            d = d[d.width == d.groupby(["setting", "hidden_layers"]).width.transform("max")]
            slopes = slopes.join(d.groupby(keys)[dim].mean().rename(name), on=keys)
        widths = part.groupby(keys).width.unique()
        slopes["rate"] = [rate_slope(r.dimension, sorted(widths[tuple(getattr(r, k) for k in keys)]), squared=squared)
                          for r in slopes.itertuples()]
        rows.append(slopes.assign(norm=norm, quantity=column).rename(
            columns={f"{column}_first": "cost_first", f"{column}_last": "cost_last"}))
    return pd.concat(rows, ignore_index=True)[keys + ["norm", "quantity", "slope", "rate", "dimension", "d_init",
                                                      "cost_first", "cost_last", "points"]]


def rate_calibration(sizes=(128, 256, 512, 1024), dimensions=(3, 4, 6, 8), seeds: int = 4) -> pd.DataFrame:
    """The rate pipeline where the theory holds: two i.i.d. m-samples of the uniform law on a flat
    d-torus (`neurons.flat_torus_transport_curve`), the exact W2^2 between them, the fitted log-log slope
    against m beside the theory's (`neurons.rate_slope`). A reading of trained networks means something only
    where this recovers the theory."""
    rows = []
    for d in dimensions:
        curve = flat_torus_transport_curve(d, sizes, seeds)
        rows.append({"d": d, "fitted slope of W2^2": fitted_rate(curve), "theory": rate_slope(d, sizes, squared=True)})
    return pd.DataFrame(rows).set_index("d")


def rate_verdicts(rates: pd.DataFrame) -> list[str]:
    """`rate_table` in words, one line per (sweep, norm): per layer the fitted slope against the theory's,
    whether the cost falls, and whether at least at the rate of Ferbach et al.'s bounds."""
    said = []
    for (setting, norm), g in rates.groupby(["setting", "norm"], sort=False):
        layers = [f"{r.layer} {r.slope:+.3f} vs {r.rate:+.4f} (d = {r.dimension:.1f}, "
                  + ("falls" if r.slope < 0 else "rises") + (", at least at the rate)" if r.slope <= r.rate else ")")
                  for r in g.itertuples()]
        said.append(f"{setting}, {norm} norm, fitted slope vs the theory's: " + "; ".join(layers))
    return said


def slopes_vs_theory(lmc: pd.DataFrame, rates: pd.DataFrame,
                     barriers: tuple = ("loss_barrier", "error_barrier")) -> pd.DataFrame:
    """Per sweep and barrier of `lmc` (one split): the fitted log-log slope against width per method
    (`fit_slopes`), beside -1/d for each norm's dimension d (`rate_table`'s, mean over the hidden layers): the
    rate of W2 itself, which bounds the barrier in Ferbach et al.'s theorem."""
    slopes = pd.concat([fit_slopes(lmc, y, ["setting", "method"]).assign(barrier=y) for y in barriers])
    theory = (-1 / rates.pivot_table(index="setting", columns="norm", values="dimension")).add_prefix("-1/d, ")
    return slopes.pivot_table(index=["setting", "barrier"], columns="method", values="slope", sort=False).join(
        theory, on="setting")


def endpoint_accuracy(lmc: pd.DataFrame) -> pd.DataFrame:
    """Per width (rows) and sweep (columns): the endpoints' mean accuracy on `lmc`'s split (1 - error_ends)."""
    ends = lmc.groupby(["setting", "width"]).error_ends.mean().unstack("setting")
    return (1 - ends).rename_axis(columns=f"{'/'.join(lmc.split.unique())} accuracy of the endpoints")


def max_layer(layers: pd.DataFrame, column: str = "cos_dist") -> pd.DataFrame:
    """Per (cell, method): the largest value of `column` over the feature layers."""
    return layers.groupby(["setting"] + GRID + ["method"], as_index=False)[column].max()


def relative_cos_dist(layers: pd.DataFrame) -> pd.DataFrame:
    """`layers` with `relative_cos_dist` = cos_dist / cos_dist_baseline: LLFC's distance as a fraction of the
    endpoints' own distance at that layer. As width grows the endpoints' features (the logits above all)
    come closer by themselves, which lowers cos_dist without the midpoint's features becoming any more the
    average of the endpoints'; the ratio takes that out."""
    return layers.assign(relative_cos_dist=layers.cos_dist / layers.cos_dist_baseline)


def worst_layer(layers: pd.DataFrame, lmc: pd.DataFrame, column: str = "cos_dist") -> pd.DataFrame:
    """Per (cell, method): the worst layer's `column` (`max_layer`; `relative_cos_dist` is added when asked
    for) beside that pair's rows of `lmc` (pass one split)."""
    if column == "relative_cos_dist" and column not in layers.columns:
        layers = relative_cos_dist(layers)
    return max_layer(layers, column).merge(lmc, on=["setting"] + GRID + ["method"])


def llfc_along_width(layers: pd.DataFrame, lmc: pd.DataFrame) -> pd.DataFrame:
    """Per width sweep, matched method (`MATCHED`: no naive rows) and width: the worst layer's
    `relative_cos_dist` (the largest over the feature layers of each cell, then the mean over replicates)
    beside the mean of `lmc`'s error barrier (pass one split): what `width.llfc_follows_lmc` rank-correlates."""
    worst = worst_layer(swept(layers, "width"), lmc, "relative_cos_dist")
    worst = worst[worst.method.isin(MATCHED)]
    return worst.groupby(["setting", "method", "width"], as_index=False, sort=True)[
        ["relative_cos_dist", "error_barrier"]].mean()


def llfc_slopes(layers: pd.DataFrame, lmc: pd.DataFrame) -> pd.DataFrame:
    """Per width sweep and method: the log-log slope against width of the worst layer's cos_dist, of the worst
    layer's cos_dist relative to its baseline (`relative_cos_dist`) and of the loss barrier (`lmc`: one
    split), LLFC read along width as LMC is."""
    layers = relative_cos_dist(swept(layers, "width"))
    names = {"cos_dist": "slope of the worst layer's cos_dist",
             "relative_cos_dist": "slope of the worst layer's cos_dist / baseline",
             "loss_barrier": "slope of the loss barrier"}
    worst, relative = worst_layer(layers, lmc), worst_layer(layers, lmc, "relative_cos_dist")
    slopes = pd.concat([fit_slopes(frame, y, ["setting", "method"]).assign(quantity=y) for frame, y in (
        (worst, "cos_dist"), (relative, "relative_cos_dist"), (worst, "loss_barrier"))])
    return slopes.pivot_table(index=["setting", "method"], columns="quantity", values="slope", sort=False)[
        list(names)].rename(columns=names)
