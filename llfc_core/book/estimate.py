"""Minutes before a run: what the book's chapters would compute, costed from counted FLOPs and measured speed.

Everything is an estimate of a cold run (empty cache, nothing committed read) of `python -m llfc_core run`
on one device, in the order the chapters run, so a model, a permutation or a table that an earlier chapter
(or setting, or sweep cell) of the same run has made costs nothing again, as in the real run. Nothing is
trained and nothing is written.

Training (`train`): every model of `pairs.model_plan` (the spawn parent's prefix once, the children the
remaining epochs), the spawn study's children, chapter 5's cells' two networks and STE's epochs (as
training: batches of `pairs.STE_BATCH`, plus a warm-started weight matching per step), each as
epochs x images / throughput (`llfc_core.estimate.training_minutes`; the throughput measured by timed
steps, or scaled by FLOPs from a narrower model of the family for a model too big to time).

Evaluation (`evaluate`): counted work, converted at measured rates, times one calibration constant
`EVAL_OVERHEAD`:
  * forward passes, at the model's own rate (training FLOPs x fp32 throughput: evaluation is fp32):
    curves: curve_points x corrections x (eval_train + eval_test) x pairs (plus the calibration batches
    of every point under a BatchNorm reset); layer metrics: eval_test x (A, B, one per alpha, and ~5
    for the commutativity terms of every linear op) per pair and correction; chapter 4's matching gaps,
    stitching (a pass of B per ReLU layer) and principal angles, chapter 6's feature averaging, the
    statistics passes of AM, CM and Sigma-WM, and the test evaluation after every training;
  * Gram and moment products (AM's feature correlations, CM's and chapter 5's input moments, principal
    angles' Grams, in float64 counted twice; W M W^T per model for chapter 5's dimensions and transport
    costs; weight matching's cost matrices), at the device's fp32 matmul rate (`dense_flop_rate`);
  * linear assignments, at scipy's measured speed on this host (`assignment_seconds`): weight matching
    `WM_SWEEPS` sweeps over its permutations, AM and Sigma-WM one each, CM's search `CM_ROUNDS`.
What is not counted: Python and pandas, norms and activations (only products are FLOPs here), model
copies, cache writes, and decoding the CIFAR-10 JPEG copy once (about half a minute here).

`EVAL_OVERHEAD` is the one constant fitted to measured minutes (chapters 2 and 4 of the committed `cpu`
run, which only evaluate); the other chapters are checks of the model, see the "Estimates" section of
book/reproduce.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import pandas as pd
import torch

from ..estimate import (HOW, MEASURE_LIMIT, MIN_SECONDS, TEST_SIZES, TRAIN_SIZES, WARMUP_STEPS, assignment_seconds,
                        dense_flop_rate, describe_device, estimated_throughput, flops_per_sample, train_samples)
from ..recipes import Recipe
from ..runtime import default_device, training_precision
from .pairs import STE_BATCH, model_plan
from .profiles import Setting, seeds
from .tables import CHAPTER_TABLES, LAYER_ALPHAS, TABLES, spawn_epochs, table_settings
from .width import Sweep

# Fitted on chapters 2 and 4 of the committed cpu run, which only evaluate (book/reproduce.md, "Estimates"):
# their measured minutes (5.80 + 5.13) over the mean of this module's evaluation minutes for them with
# EVAL_OVERHEAD = 1 (7.00 in seven estimates on 2 threads, fp32, 2026-12-01). It stands for what is not
# counted: Python, pandas, norms and activations, copies of theta_alpha, evaluation batches that run a
# device below its training rate.
EVAL_OVERHEAD = 1.56
WM_SWEEPS = 10      # weight matching from scratch: sweeps over all permutations (MLPs 3x512 / 3x2048 at init, 1
                    # thread: 0.50 / 19.5 s measured, 0.60 / 20.8 s by this model; the trained cpu MLPs: 0.55-0.77 s)
STE_WM_SWEEPS = 1   # STE's projection per step, warm-started from the last: about one sweep (MNIST MLP 3x512 at
                    # init, 1 thread: 0.10 s measured for a warm-started call, 0.06 s by this model)
CM_ROUNDS = 8       # CM's search: assignments per permutation (its linearised, AM's and cycle moves, 1-2 sweeps)
COMMUTATIVITY_FORWARDS = 5  # metrics.layer_metrics: lhs (2), rhs (2) and the difference term per linear op

PROFILE_ORDER = ("smoke", "cpu", "paper")
# The time a profile may take when none is asked for, per device class (`choose_profile`): a working day
# on a GPU (the paper's conv nets train for hours), an afternoon on a CPU or an Apple GPU.
DEFAULT_BUDGET_MINUTES = {"cuda": 8 * 60.0, "mps": 3 * 60.0, "cpu": 3 * 60.0}


@dataclass
class Cost:
    """Seconds of training and of (uncalibrated) evaluation work."""
    train: float = 0.0
    evaluate: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.train + other.train, self.evaluate + other.evaluate)


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class Estimator:
    """Costs of a cold run on `device`. `precision` overrides every recipe's training precision (default:
    the policy, `runtime.training_precision(device, recipe.precision)`). `done` holds what the run has
    computed so far (models, permutations, tables, cells), so shared work is counted once."""

    def __init__(self, device=None, precision: str | None = None, steps: int = 5, eval_overhead: float | None = None):
        self.device = torch.device(device or default_device())
        self.precision = precision
        self.steps = steps
        self.eval_overhead = EVAL_OVERHEAD if eval_overhead is None else eval_overhead
        self.done: set = set()

    # ----------------------------------------------------------------------------------------- rates
    def precision_of(self, recipe: Recipe) -> str:
        return self.precision or training_precision(self.device, recipe.precision)

    def throughput(self, recipe: Recipe) -> float:
        return estimated_throughput(recipe, self.device, self.precision_of(recipe), self.steps)

    def forward_seconds(self, recipe: Recipe, samples: float) -> float:
        """Seconds of `samples` forward passes (fp32) at the model's own rate."""
        if samples <= 0:
            return 0.0
        flops = flops_per_sample(recipe.model, recipe.dataset)
        rate = flops["train"] * estimated_throughput(recipe, self.device, "fp32", self.steps)
        return samples * flops["forward"] / rate

    def dense_seconds(self, flops: float) -> float:
        return flops / dense_flop_rate(self.device) if flops > 0 else 0.0

    def once(self, *key) -> bool:
        """True the first time `key` is met in this run (the work is done then), False afterwards."""
        key = _json(key)
        if key in self.done:
            return False
        self.done.add(key)
        return True

    # -------------------------------------------------------------------------------------- training
    def _recipe_key(self, recipe: Recipe) -> str:
        return _json([recipe.to_dict(), self.precision_of(recipe)])

    def train_model(self, recipe: Recipe, init: int, data_seed: int, spawn: dict | None = None) -> Cost:
        """A model as `train.get_or_train` makes it: its parent's prefix (once for all children), its own
        epochs, and the test evaluation that follows."""
        cost = Cost()
        epochs = recipe.epochs
        if spawn is not None:
            k = spawn["spawn_epoch"]
            if k > 0 and self.once("parent", self._recipe_key(recipe), init, spawn["parent_data_seed"], k):
                cost.train += k * train_samples(recipe) / self.throughput(recipe)
            epochs -= k
        key = ("model", self._recipe_key(recipe), init, data_seed, spawn and [spawn["spawn_epoch"], spawn["parent_data_seed"]])
        if self.once(*key):
            cost.train += epochs * train_samples(recipe) / self.throughput(recipe)
            cost.evaluate += self.forward_seconds(recipe, TEST_SIZES[recipe.dataset])
        return cost

    def models(self, setting: Setting) -> Cost:
        cost = Cost()
        for init, data_seed, spawn in model_plan(setting).values():
            cost += self.train_model(setting.recipe, init, data_seed, spawn)
        return cost

    # ------------------------------------------------------------------------------------ matchings
    def _assignments(self, recipe: Recipe, rounds: float) -> float:
        return rounds * sum(assignment_seconds(n) for n in flops_per_sample(recipe.model, recipe.dataset)["perm_sizes"])

    def weight_matching(self, recipe: Recipe, sweeps: float = WM_SWEEPS) -> float:
        """Seconds of weight matching: `sweeps` sweeps of cost matrices and assignments. A model with one
        permutation needs one: its cost matrix depends on no other permutation."""
        flops = flops_per_sample(recipe.model, recipe.dataset)
        sweeps = min(sweeps, 1) if len(flops["perm_sizes"]) == 1 else sweeps
        return sweeps * self.dense_seconds(flops["wm_sweep"]) + self._assignments(recipe, sweeps)

    def ste_recipe(self, setting: Setting) -> Recipe:
        """STE as a training recipe: SGD on batches of `pairs.STE_BATCH`, in fp32 (no autocast)."""
        return Recipe(f"{setting.recipe.name}-ste", setting.recipe.dataset, setting.recipe.model, epochs=setting.ste_epochs,
                      batch_size=STE_BATCH, optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=0.0,
                      schedule="constant", train_subset=setting.ste_subset, precision="fp32")

    def perms(self, setting: Setting, method: str) -> Cost:
        """The permutations of one matching of the setting's independent B to A (cached by the run)."""
        recipe = setting.recipe
        if method in ("spawn", "naive") or not self.once("perms", self._recipe_key(recipe), setting.replicate,
                                                        setting.statistics_samples, method,
                                                        method == "ste" and [setting.ste_epochs, setting.ste_subset]):
            return Cost()
        flops = flops_per_sample(recipe.model, recipe.dataset)
        stats = setting.statistics_samples
        if method == "wm":
            return Cost(evaluate=self.weight_matching(recipe))
        if method == "am":
            return Cost(evaluate=self.forward_seconds(recipe, 2 * stats) + self.dense_seconds(stats * flops["features"])
                        + self._assignments(recipe, 1))
        if method == "ste":
            ste = self.ste_recipe(setting)
            steps = ste.epochs * math.ceil(train_samples(ste) / STE_BATCH)
            train = ste.epochs * train_samples(ste) / estimated_throughput(ste, self.device, "fp32", self.steps)
            return Cost(train=train + steps * self.weight_matching(recipe, STE_WM_SWEEPS),
                        evaluate=self.weight_matching(recipe))
        if method == "cm":  # its statistics pass, its two starts (WM again, AM cached), the search
            moments = self.forward_seconds(recipe, 2 * stats) + self.dense_seconds(3 * stats * flops["moments_hidden"])
            search = self._assignments(recipe, CM_ROUNDS) + self.dense_seconds(CM_ROUNDS * flops["sandwich"])
            return Cost(evaluate=moments + self.weight_matching(recipe) + search) + self.perms(setting, "am")
        return Cost(evaluate=self.weight_matching(recipe))  # another method: as costly as WM

    def all_perms(self, setting: Setting) -> Cost:
        cost = Cost()
        for pair in setting.pairs:
            cost += self.perms(setting, pair)
        return cost

    # ---------------------------------------------------------------------------------- evaluation
    def _sizes(self, setting: Setting) -> tuple[int, int, int]:
        name = setting.recipe.dataset
        train = TRAIN_SIZES[name] if setting.eval_train is None else min(setting.eval_train, TRAIN_SIZES[name])
        test = TEST_SIZES[name] if setting.eval_test is None else min(setting.eval_test, TEST_SIZES[name])
        return train, test, min(setting.calibration_samples, TRAIN_SIZES[name])

    @staticmethod
    def _calibrated(setting: Setting, correction: str) -> bool:
        return correction == "repair" or (correction == "bn_reset" and setting.recipe.model.get("norm") == "bn")

    def curves(self, setting: Setting, pairs: int, corrections) -> float:
        """`interpolation_curve` for `pairs` pairs under each correction."""
        e_train, e_test, cal = self._sizes(setting)
        samples = sum(pairs * setting.curve_points * (e_train + e_test + (cal if self._calibrated(setting, c) else 0))
                      for c in corrections)
        return self.forward_seconds(setting.recipe, samples)

    def layer_pass(self, setting: Setting, pairs: int, alphas: int, corrections) -> float:
        """`metrics.layer_metrics` for `pairs` pairs at `alphas` alphas, once per correction."""
        _, e_test, cal = self._sizes(setting)
        samples = sum(pairs * (e_test * (2 + alphas + COMMUTATIVITY_FORWARDS) + (alphas * cal if self._calibrated(setting, c) else 0))
                      for c in corrections)
        return self.forward_seconds(setting.recipe, samples)

    # -------------------------------------------------------------------------------- the producers
    def producer(self, name: str, setting: Setting) -> Cost:
        """What one producer of `tables.TABLES` (by its function's name) adds to the run for `setting`: its
        function once per replicate (`tables.Producer.__call__`)."""
        cost = Cost()
        for r in range(setting.replicates):
            cost += self._producer(name, setting.at_replicate(r))
        return cost

    def _producer(self, name: str, setting: Setting) -> Cost:
        if not self.once("producer", name, setting.name, setting.replicate, _json(setting.to_dict())):
            return Cost()
        s, recipe = setting, setting.recipe
        flops = flops_per_sample(recipe.model, recipe.dataset)
        _, e_test, _ = self._sizes(s)
        pairs = len(s.pairs)
        first = s.corrections[:1]
        if name == "lmc_tables":
            return self.models(s) + self.all_perms(s) + Cost(evaluate=self.curves(s, pairs, s.corrections))
        if name == "layer_tables":
            return self.models(s) + self.all_perms(s) + Cost(evaluate=self.layer_pass(s, pairs, len(LAYER_ALPHAS), s.corrections))
        if name == "matching_tables":  # identity, random and every aligned B, at alpha = 0.5
            aligned = len([p for p in s.pairs if p not in ("spawn", "naive")])
            return self.models(s) + self.all_perms(s) + Cost(evaluate=self.layer_pass(s, 2 + aligned, 1, ["none"]))
        if name == "appendix_tables":  # stitching (A once, B per ReLU layer), principal angles (float64 Grams)
            stitch = self.forward_seconds(recipe, pairs * e_test * (1 + flops["relus"]))
            angles = self.forward_seconds(recipe, pairs * e_test * 2) + self.dense_seconds(pairs * e_test * 2 * 2 * flops["features"])
            return self.models(s) + self.all_perms(s) + Cost(evaluate=stitch + angles)
        if name == "spectra_tables":
            return self.models(s)
        if name == "cm_tables":
            extra = self.perms(s, "ste") if "ste" in s.pairs else Cost()
            objectives = self.dense_seconds((4 + ("ste" in s.pairs)) * flops["sandwich"])
            return self.models(s) + self.perms(s, "am") + extra + self.perms(s, "cm") + Cost(evaluate=objectives)
        if name == "cm_lmc_tables":
            return self.models(s) + self.perms(s, "cm") + Cost(evaluate=self.curves(s, 1, s.corrections))
        if name == "cm_layer_tables":
            return self.models(s) + self.perms(s, "cm") + Cost(evaluate=self.layer_pass(s, 1, len(LAYER_ALPHAS), first))
        if name == "averaging_tables":  # A, B, theta_alpha at 3 alphas, and a pass per ReLU layer at 0.5
            passes = (pairs + 1) * e_test * (2 + len(LAYER_ALPHAS) + flops["relus"])
            return (self.models(s) + self.all_perms(s) + self.perms(s, "cm")
                    + Cost(evaluate=self.forward_seconds(recipe, passes)))
        if name == "merge_tables":  # `merge_comparison`: per linear op, the fit data through merged, A and B
            # (aligned and unaligned B) with its least-squares Grams; seven models on test
            stats, ops = min(s.statistics_samples, TRAIN_SIZES[recipe.dataset]), flops["relus"] + 1
            fit = self.forward_seconds(recipe, 2 * 3 * ops * stats) + self.dense_seconds(2 * stats * flops["moments"])
            return self.models(s) + self.perms(s, "am") + Cost(evaluate=fit + self.forward_seconds(recipe, 7 * e_test))
        if name == "spawn_tables":
            cost = Cost()
            table = seeds(s.replicate)
            for epoch in spawn_epochs(s):
                for seed in ("data_a", "data_spawn"):
                    cost += self.train_model(recipe, table["init_a"], table[seed],
                                             {"spawn_epoch": epoch, "parent_data_seed": table["parent_data"]})
                cost += Cost(evaluate=self.curves(s, 1, first) + self.layer_pass(s, 1, 1, first))
            return cost
        raise KeyError(f"no cost model for producer {name!r}")

    def cell(self, sweep: Sweep, cell: dict) -> Cost:
        """One chapter 5 cell (`width.measure_cell`), once per run even when two sweeps share it."""
        if not self.once("cell", cell):
            return Cost()
        g = cell["grid"]
        recipe = replace(sweep.recipe(g["hidden_layers"], g["width"], g["lr"]), precision=self.precision or sweep.precision)
        cost = Cost()
        for init, data_seed in (cell["seeds"]["a"], cell["seeds"]["b"]):
            cost += self.train_model(recipe, init, data_seed)
        flops = flops_per_sample(recipe.model, recipe.dataset)
        name = recipe.dataset
        e_train = TRAIN_SIZES[name] if cell["eval_train"] is None else min(cell["eval_train"], TRAIN_SIZES[name])
        e_test = TEST_SIZES[name] if cell["eval_test"] is None else min(cell["eval_test"], TEST_SIZES[name])
        stats = min(cell["statistics"], TRAIN_SIZES[name])
        inner = len([x for x in cell["alphas"] if 0 < x < 1])
        ends = len(cell["alphas"]) - inner
        forwards = stats + ends * (e_train + e_test)  # A's input moments, the endpoints
        dense = stats * flops["moments"]
        seconds = 0.0
        for method in cell["methods"]:
            forwards += inner * (e_train + e_test) + e_test * (2 + 1 + COMMUTATIVITY_FORWARDS)
            dense += flops["sandwich"]  # matching_distances
            if method == "wm":
                seconds += self.weight_matching(recipe)
            elif method == "swm":
                dense += flops["sandwich"]
                seconds += self._assignments(recipe, 1)
            elif method == "am":
                forwards += 2 * stats
                dense += stats * flops["features"]
                seconds += self._assignments(recipe, 1)
            elif method != "naive":
                seconds += self.weight_matching(recipe)
        forwards += 3 * stats  # the dimensions: input moments of B, and of A and B at init
        dense += 3 * stats * flops["moments"] + 4 * flops["sandwich"]
        return cost + Cost(evaluate=self.forward_seconds(recipe, forwards) + self.dense_seconds(dense) + seconds)

    def sweep(self, sweep: Sweep) -> Cost:
        cost = Cost()
        for cell in sweep.cells():
            cost += self.cell(sweep, cell)
        return cost

    def minutes(self, cost: Cost) -> dict[str, float]:
        """{'train', 'evaluate', 'total'} minutes, evaluation times `eval_overhead`."""
        train, evaluate = cost.train / 60, cost.evaluate * self.eval_overhead / 60
        return {"train": train, "evaluate": evaluate, "total": train + evaluate}


# ---------------------------------------------------------------------------------------- public API
def setting_minutes(setting: Setting, device=None, *, precision: str | None = None,
                    estimator: Estimator | None = None) -> dict[str, float]:
    """Minutes of one setting's core, from an empty cache: training every model of `pairs.model_plan` (the
    spawn parent's prefix once) and STE's epochs where 'ste' is a pair; evaluation: the matchings, the
    curves (curve_points x corrections x (eval_train + eval_test) x pairs) and the layer metrics (3 alphas
    x eval_test x pairs, a few forwards each). {'train', 'evaluate', 'total'}."""
    est = estimator or Estimator(device, precision)
    return est.minutes(est.producer("lmc_tables", setting) + est.producer("layer_tables", setting))


def sweep_minutes(sweep: Sweep, device=None, *, precision: str | None = None,
                  estimator: Estimator | None = None) -> dict[str, float]:
    """Minutes of one chapter 5 sweep from an empty cache: its cells' trainings and measurements."""
    est = estimator or Estimator(device, precision)
    return est.minutes(est.sweep(sweep))


def _chapters(chapters) -> list[str]:

    if chapters is None:
        return list(CHAPTER_TABLES)
    if isinstance(chapters, str):
        chapters = [c.strip() for c in chapters.split(",") if c.strip()]
    unknown = sorted(set(chapters) - set(CHAPTER_TABLES))
    if unknown:
        raise KeyError(f"unknown chapters {unknown}; choose from {sorted(CHAPTER_TABLES)}")
    return list(chapters)


def profile_minutes(profile: str, device=None, *, chapters=None, settings=None, precision: str | None = None,
                    estimator: Estimator | None = None) -> pd.DataFrame:
    """Minutes of a cold `python -m llfc_core run --profile <profile>` (optionally only `chapters` and
    `settings`): one row per (chapter, setting or sweep), in run order, each with what it adds to the run
    (work an earlier row made is not counted again), and a last row 'total'. Columns: chapter, setting,
    train, evaluate, total (minutes)."""
    from . import chapter as chapter_module

    est = estimator or Estimator(device, precision)
    rows = []
    for name in _chapters(chapters):
        _, chosen = chapter_module.resolve(name, profile, settings)
        for setting_name, item in chosen.items():
            if isinstance(item, Sweep):
                cost = est.sweep(item)
            else:
                cost = Cost()
                for table in CHAPTER_TABLES[name]:
                    covered = table_settings(table, chosen)
                    if covered is None or setting_name in covered:
                        cost += est.producer(TABLES[table].fn.__name__, item)
            rows.append({"chapter": name, "setting": setting_name, **est.minutes(cost)})
    frame = pd.DataFrame(rows, columns=["chapter", "setting", "train", "evaluate", "total"])
    total = {"chapter": "total", "setting": "", **frame[["train", "evaluate", "total"]].sum().to_dict()}
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


def profile_total_minutes(profile: str, device=None, precision: str | None = None) -> float:
    """The estimated minutes of a whole cold run of `profile` (every chapter, every setting)."""
    return float(profile_minutes(profile, device, precision=precision).iloc[-1]["total"])


def choose_profile(device=None, budget_minutes: float | None = None) -> tuple[str, str]:
    """(profile, reason): the largest profile of smoke < cpu < paper whose estimated cold run fits
    `budget_minutes` (default: `DEFAULT_BUDGET_MINUTES` of the device class: 8 h on a GPU, 3 h on a CPU).
    `paper` is never chosen on a CPU, whatever the budget; when nothing fits, `smoke`."""
    device = torch.device(device or default_device())
    budget = DEFAULT_BUDGET_MINUTES.get(device.type, DEFAULT_BUDGET_MINUTES["cpu"]) if budget_minutes is None else float(budget_minutes)
    candidates = [p for p in PROFILE_ORDER if not (p == "paper" and device.type == "cpu")]
    chosen, fitted, over = "smoke", None, None
    for profile in candidates:
        minutes = profile_total_minutes(profile, device)
        if minutes > budget:
            over = (profile, minutes)
            break
        chosen, fitted = profile, minutes
    where = f"on {device.type} with a budget of {budget:.0f} min"
    if fitted is None:
        reason = f"smoke: no profile fits {where} (smoke is estimated at {over[1]:.0f} min); smoke is the smallest"
    else:
        reason = f"{chosen}: estimated {fitted:.0f} min {where}"
        if over is not None:
            reason += f"; {over[0]} would take about {over[1]:.0f} min"
    if device.type == "cpu":
        reason += "; paper is never chosen on a CPU"
    return chosen, reason


# ------------------------------------------------------------------------------------ the command line
def measurement_note(device=None, precisions=(), steps: int = 5) -> str:
    """The first line of `run --estimate`: the device and how its speed was measured."""
    device = torch.device(device or default_device())
    precision = "/".join(sorted(set(precisions))) or training_precision(device)
    limit = MEASURE_LIMIT.get(device.type, MEASURE_LIMIT["cpu"])
    return (f"estimate on {describe_device(device, precision)}: throughput from timed training steps "
            f"({steps} steps after {WARMUP_STEPS} warm-up step per model, more to fill {MIN_SECONDS:g} s, the median; "
            f"a model above {limit:.0e} "
            f"FLOPs per step scaled by FLOPs from a narrower one of its family), evaluation from counted FLOPs "
            f"at the measured rates x {EVAL_OVERHEAD:g}; nothing is trained")


def report(profile: str, device=None, *, chapters=None, settings=None, precision: str | None = None,
           steps: int = 5, out=print) -> pd.DataFrame:
    """Print what `python -m llfc_core run --estimate` prints and return the frame of `profile_minutes`."""
    from . import chapter as chapter_module

    device = torch.device(device or default_device())
    est = Estimator(device, precision, steps)
    precisions = set()
    for name in _chapters(chapters):
        _, chosen = chapter_module.resolve(name, profile, settings)
        for item in chosen.values():
            requested = item.precision if isinstance(item, Sweep) else item.recipe.precision
            precisions.add(precision or training_precision(device, requested))
    out(measurement_note(device, precisions, steps))
    frame = profile_minutes(profile, device, chapters=chapters, settings=settings, precision=precision, estimator=est)
    out(f"profile {profile}, a cold run (empty cache), minutes:")
    out(f"{'chapter':<15}{'setting':<26}{'train':>11}{'evaluate':>11}{'total':>11}")
    for row in frame.itertuples():
        label = "total" if row.chapter == "total" else row.chapter
        out(f"{label:<15}{row.setting:<26}{row.train:>11.2f}{row.evaluate:>11.2f}{row.total:>11.2f}")
    for key, how in HOW.items():
        if how["how"] == "scaled" and key[6] == str(device):
            anchor = {k: round(v, 3) if isinstance(v, float) else v for k, v in how["anchor"].items()}
            out(f"not timed, scaled by FLOPs: {key[0]} (batch {key[2]}, {key[5]}) from {_json(anchor)}, "
                f"{how['flops_ratio']:.1f}x its training FLOPs")
    return frame
