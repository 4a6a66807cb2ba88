"""The book's experiment settings and the smoke / cpu / paper profiles.

A `Setting` is one experiment: a training recipe, the pairs built from it and how they are evaluated.
Each setting has one base (what the paper measures: its pairs, spawn point, BatchNorm conventions);
a profile is that base with a few fields overridden (`PROFILES` lists only what changes).

Pairs of a setting (all share model A; the seeds are in `SEEDS`):
  A       spawn child 1: trained to the spawn epoch with data seed `parent_data`, then `data_a`
  spawn   (A, spawn child 2): same parent state, continued with `data_spawn`
  naive   (A, B): B is trained independently (`init_b`, `data_b`; with several replicates and a spawn pair,
          the next replicate's spawn partner, see `pairs.model_plan`), not aligned
  wm/am/ste/...  (A, pi(B)): B aligned to A by that method of the registry (`matching.ALIGNMENTS`)
A is an ordinary fully trained network (a child costs no more epochs than a straight run), so one
A serves every pair and the spawned prefix is trained once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace

import torch

from .. import cache
from ..matching import ALIGNMENTS
from ..recipes import CIFAR_MLP, MNIST_MLP, Recipe, get_recipe
from ..train import model_identity

# A pair is (A, spawn partner) or (A, B aligned by an alignment method of `matching.ALIGNMENTS`).
PAIR_KINDS = ("spawn",) + ALIGNMENTS
PAIRS = ("spawn", "naive", "wm", "am", "ste")  # the MLP settings' pairs, as in the paper
SEEDS = {"init_a": 0, "parent_data": 0, "data_a": 1, "data_spawn": 2, "init_b": 1, "data_b": 3}
# Replicate r is the same experiment from other seeds: every seed above plus REPLICATE_STRIDE * r, so its A,
# spawn parent and B are independent of every other replicate's (replicate 0 uses `SEEDS` as they are).
REPLICATE_STRIDE = 1000


def seeds(replicate: int = 0) -> dict:
    """The seed table of one replicate of a setting."""
    return {k: v + REPLICATE_STRIDE * replicate for k, v in SEEDS.items()}


@dataclass(frozen=True)
class Setting:
    name: str
    recipe: Recipe
    pairs: tuple = ("spawn", "naive", "wm", "am")
    spawn_epoch: int = 1
    # How theta_alpha is evaluated, each convention reported side by side: 'none' | 'bn_reset' | 'repair'.
    # The claims are checked under `claims.PAPER_CORRECTION` ('none': the official scripts, see BN_CORRECTIONS).
    corrections: tuple = ("none",)
    curve_points: int = 21              # evenly spaced alphas on the interpolation curve
    eval_train: int | None = 10000      # train samples for the curves (None: all)
    eval_test: int | None = None        # test samples for curves and layer metrics (None: all)
    calibration_samples: int = 5000     # train samples for BN reset and REPAIR
    statistics_samples: int = 5000      # train samples AM and CM learn their permutations from
    metric_batch: int = 250
    # STE: 40 epochs is the shortest of 10 / 20 / 40 whose midpoint train loss on the cpu MNIST pair is
    # clearly below WM's (0.0271 / 0.0269 / 0.0242 vs 0.0272); Git Re-Basin's src/mnist_mlp_ste2.py runs 250.
    ste_epochs: int = 40
    ste_subset: int | None = None       # train samples STE learns on (None: all, as Git Re-Basin)
    replicates: int = 1                 # independent replicates (`seeds`): every table has a `replicate` column
    replicate: int = 0                  # the replicate this object describes (set per replicate by `at_replicate`)
    notes: str = ""

    def __post_init__(self):
        unknown = set(self.pairs) - set(PAIR_KINDS)
        if unknown:
            raise ValueError(f"setting {self.name!r}: unknown pairs {sorted(unknown)}; choose from {PAIR_KINDS}")
        if not 0 <= self.replicate < self.replicates:
            raise ValueError(f"setting {self.name!r}: replicate {self.replicate} outside 0..{self.replicates - 1}")

    def at_replicate(self, replicate: int) -> "Setting":
        return replace(self, replicate=replicate)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        if "ste" not in self.pairs:  # fields no result of this setting depends on stay out of its hash
            del d["ste_epochs"], d["ste_subset"]
        del d["replicate"]  # a setting's results hold all its replicates
        if self.replicates == 1:  # the hash of a single-replicate setting is what it was before replicates
            del d["replicates"]
        return d


def setting_hash(setting: Setting, version: int = 1) -> str:
    """What a setting's results depend on: the setting itself and the seeds (training keys follow), with
    the version of the table whose rows are meant (`book.tables.Producer.version`)."""
    a = model_identity(setting.recipe, SEEDS["init_a"], SEEDS["data_a"])[0]  # its precision resolved here
    return cache.config_hash({"setting": setting.to_dict(), "seeds": SEEDS, "a": a}, version=version)


def _mlp(name, dataset, widths, **kw) -> Recipe:
    model = dict(MNIST_MLP if dataset == "mnist" else CIFAR_MLP, widths=list(widths))
    return Recipe(name, dataset, model, **kw)


def _conv(name, model, **kw) -> Recipe:
    return Recipe(name, "cifar10", model, augment=True, **kw)


# ------------------------------------------------------------------------------------ the bases
# BatchNorm networks are evaluated both ways. 'none' is the paper's: the official scripts/LMC.py and
# scripts/LLFC.py (zzp1012/LLFC) interpolate the whole state dict, running statistics included, and
# evaluate without recomputing them. 'bn_reset' recomputes them on training data (Git Re-Basin's and
# REPAIR's convention), which is what makes naive and matched BN pairs comparable at all.
BN_CORRECTIONS = ("none", "bn_reset")

# What each setting measures, as in the paper (recipes: `llfc_core.recipes`).
BASE: dict[str, Setting] = {
    # Replicates: 3 independent ones for the MLPs, 2 for the conv nets (issue #22): every table carries them.
    "mnist-mlp": Setting("mnist-mlp", get_recipe("rebasin-mlp-mnist"), pairs=PAIRS, replicates=3),
    # The CIFAR-10 MLP spawns at epoch 10 (5,000 steps of batch 100), where chapter 6's spawn study finds the
    # children of every replicate linearly connected (test error barrier 8.2 / 1.9 / 0.7 points spawned at 1 / 4 /
    # 10, mean of 3 replicates): at the paper's ~2,000 steps (epoch 4) one replicate of three is still 4.4 points
    # apart. The MNIST MLP is connected from epoch 1 on.
    "cifar10-mlp": Setting("cifar10-mlp", get_recipe("rebasin-mlp-cifar10"), pairs=PAIRS, replicates=3,
                           spawn_epoch=10),
    "cifar10-vgg16": Setting("cifar10-vgg16", get_recipe("paper-vgg16-bn"), pairs=("spawn", "naive", "wm"),
                             spawn_epoch=5, corrections=BN_CORRECTIONS, replicates=2),
    "cifar10-resnet20": Setting("cifar10-resnet20", get_recipe("paper-resnet20-bn"), pairs=("spawn", "naive", "wm"),
                                spawn_epoch=5, corrections=BN_CORRECTIONS, replicates=2),
    "cifar10-resnet20x32-ln": Setting("cifar10-resnet20x32-ln", get_recipe("rebasin-resnet20x32-ln"),
                                      pairs=("naive", "wm", "am"), replicates=2),
}

# ------------------------------------------------------------------------------ the overrides
TRIANGLE = {"schedule": "triangle", "warmup_epochs": 0.5}  # the CPU recipes' schedule
# Tiny everything: every code path of every setting in seconds (the tests run the book with it).
_SMOKE_EVAL = {"curve_points": 5, "spawn_epoch": 1}
_SMOKE_MLP = dict(_SMOKE_EVAL, eval_train=500, eval_test=500, calibration_samples=500, statistics_samples=500)
_SMOKE_CONV = dict(_SMOKE_EVAL, eval_train=300, eval_test=300, calibration_samples=300, statistics_samples=300)
_SMOKE_RESNET = {"arch": "resnet20", "width": 1, "blocks_per_stage": 1}
# The cpu conv nets: a fifth of the paper's evaluation data, and fewer interpolation points.
_CPU_CONV = {"curve_points": 11, "spawn_epoch": 5, "eval_train": 2000, "eval_test": 2000, "calibration_samples": 2000,
             "statistics_samples": 2000}

OVERRIDES: dict[str, dict[str, dict]] = {
    "smoke": {
        # two replicates where it costs nothing, one elsewhere (every path of replicates runs in the tests)
        "mnist-mlp": dict(_SMOKE_MLP, recipe=_mlp("smoke-mlp-mnist", "mnist", (32, 32, 32), epochs=2, lr=0.05,
                                                  train_subset=2000, **TRIANGLE), ste_subset=1000, ste_epochs=1,
                          replicates=2),
        "cifar10-mlp": dict(_SMOKE_MLP, replicates=1, recipe=_mlp("smoke-mlp-cifar10", "cifar10", (32, 32, 32), epochs=2, lr=0.02,
                                                    train_subset=1000, augment="zoom-flip-rotate", **TRIANGLE),
                            pairs=("spawn", "naive", "wm", "am")),
        "cifar10-vgg16": dict(_SMOKE_CONV, replicates=1, recipe=_conv("smoke-vgg16-bn", {"arch": "vgg16", "norm": "bn", "width": 0.0625},
                                                        epochs=2, lr=0.05, train_subset=500, **TRIANGLE),
                              pairs=("spawn", "naive", "wm", "am")),
        "cifar10-resnet20": dict(_SMOKE_CONV, replicates=1, recipe=_conv("smoke-resnet20-bn", dict(_SMOKE_RESNET, norm="bn"), epochs=2,
                                                           lr=0.05, train_subset=500, **TRIANGLE),
                                 pairs=("spawn", "naive", "wm", "am")),
        "cifar10-resnet20x32-ln": dict(_SMOKE_CONV, replicates=1, recipe=_conv("smoke-resnet20-ln", dict(_SMOKE_RESNET, norm="ln"),
                                                                 epochs=2, lr=0.05, train_subset=500, **TRIANGLE),
                                       notes="width 1 and one block per stage in smoke"),
    },
    # What 2 CPU cores do in about three hours for the whole book (issue #22), trained under the device's
    # precision policy (bf16 + channels_last on a CPU with native bf16). The MLP settings *are* the paper's
    # (same setting hash: results/cpu and results/paper share them). The conv nets train on all 50,000 images
    # with the paper's optimizer family (SGD, momentum 0.9, batch 128, crop + flip) on a compressed schedule
    # (`recipes.CPU_CONV`); they are spawned at epoch 5, the paper's ~2,000 steps (Frankle et al. count steps).
    "cpu": {
        "mnist-mlp": {},
        "cifar10-mlp": {},
        "cifar10-vgg16": dict(_CPU_CONV, recipe=get_recipe("cpu-vgg16-bn-w025"),
                              notes="VGG-16 at 1/4 width with one linear layer as head, all 50k images, 15 epochs"),
        "cifar10-resnet20": dict(_CPU_CONV, recipe=get_recipe("cpu-resnet20-bn"),
                                 notes="ResNet-20 x1, all 50k images, 15 epochs"),
    },
    # The paper's settings (one GPU): the bases as they are.
    "paper": {name: {} for name in BASE},
}

PROFILES: dict[str, dict[str, Setting]] = {
    profile: {name: replace(BASE[name], **changes) for name, changes in settings.items()}
    for profile, settings in OVERRIDES.items()
}


def default_profile() -> str:
    """'cpu' without a GPU. With one, the largest profile whose estimate fits the GPU's budget
    (`book.estimate.choose_profile`, from timed training steps on it): 'paper' only where it fits; the
    choice and its reason are printed."""
    if not torch.cuda.is_available():
        return "cpu"
    from .estimate import choose_profile  # imported here: estimate reads the profiles

    profile, reason = choose_profile(torch.device("cuda"))
    print(f"profile {profile!r} chosen for this GPU: {reason} (set LLFC_PROFILE to choose)")
    return profile


def get_settings(profile: str | None = None, names: list | str | None = None, **overrides) -> dict[str, Setting]:
    """The settings of a profile (default: 'paper' with a GPU, else 'cpu'), optionally only those
    `names`, with field overrides applied to every setting (e.g. curve_points=11)."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    settings = PROFILES[profile]
    if isinstance(names, str):  # from the command line: '["a", "b"]' or 'a,b'
        names = json.loads(names) if names.strip().startswith("[") else [n.strip() for n in names.split(",") if n.strip()]
    if names:
        unknown = set(names) - set(settings)
        if unknown:
            raise KeyError(f"profile {profile!r} has no settings {sorted(unknown)}; it has {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in names}
    return {k: replace(v, **overrides) if overrides else v for k, v in settings.items()}
