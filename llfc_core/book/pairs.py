"""A setting's models and the pairs built from them (see `llfc_core.profiles` for what each pair is),
plus the fixed data subsets every table of that setting is evaluated on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import cache, data
from ..matching import METHODS, AlignmentData, align
from ..permutation import apply_permutation
from .profiles import REPLICATE_STRIDE, SEEDS, Setting, seeds
from ..runtime import default_device
from ..train import dataset_on, get_or_train, model_identity, training_data

# Each fixed random subset has its own seed, so changing the size of one leaves the others as they were.
SUBSET_SEEDS = {"statistics": 1, "ste": 2, "eval_train": 3, "eval_test": 4, "calibration": 5}
# Batch size for passes that only collect statistics (no gradients): large enough to be fast, small
# enough for the float64 sums of a conv net to stay within a CPU's memory.
STATS_BATCH = 500
STE_BATCH = 1000  # Git Re-Basin, src/mnist_mlp_ste2.py
PERMS_VERSION = 1  # bump when a change alters the permutations a method finds (recomputes them, not the models)
# Options of the book's methods, part of their permutations' keys. CM: the full search's local search (issue
# #23: the descent stops where activation matching is), continued from the descent's result for at most two
# sweeps of 2-opt and Frank-Wolfe per permutation: at width 512 a sweep costs minutes on one core, so the
# other starts, restarts and kicks of the search that finds the optimum of small instances
# (tests/test_cm_search.py) do not fit the cpu budget. `tables.cm_tables` records the descent beside it.
METHOD_OPTIONS = {"cm": {"search": "full", "starts": "descent", "restarts": 0, "kicks": 0, "search_sweeps": 2}}


@dataclass
class SettingModels:
    setting: Setting
    a: torch.nn.Module
    others: dict = field(default_factory=dict)   # 'spawn' / 'independent' -> model
    keys: dict = field(default_factory=dict)     # model name -> cache key
    meta: dict = field(default_factory=dict)     # model name -> training metadata


def model_plan(setting: Setting) -> dict[str, tuple]:
    """name -> (init seed, data seed, spawn point or None) of the models a setting needs.

    With several replicates and a spawn pair, replicate r's independent B is the spawn partner of replicate
    r + 1 (mod R): a child of another parent, from other seeds, so independent of A, and trained anyway
    (issue #22: a third fewer networks). The pairs (A_r, S_{r+1}) share no network across replicates."""
    plan = {"a": _child(setting.replicate, "data_a", setting.spawn_epoch)}
    if "spawn" in setting.pairs:
        plan["spawn"] = _child(setting.replicate, "data_spawn", setting.spawn_epoch)
    if set(setting.pairs) - {"spawn"}:
        if "spawn" in setting.pairs and setting.replicates > 1:
            plan["independent"] = _child((setting.replicate + 1) % setting.replicates, "data_spawn", setting.spawn_epoch)
        else:
            s = seeds(setting.replicate)
            plan["independent"] = (s["init_b"], s["data_b"], None)
    return plan


def _child(replicate: int, data: str, spawn_epoch: int) -> tuple:
    """A child of replicate `replicate`'s spawn parent, continued with that replicate's seed `data`."""
    s = seeds(replicate)
    return s["init_a"], s[data], {"spawn_epoch": spawn_epoch, "parent_data_seed": s["parent_data"]}


def model_hashes(setting: Setting, device=None) -> dict[str, str]:
    """The cache keys of a setting's models, without training anything."""
    return {name: model_identity(setting.recipe, init, data_seed, device=device or default_device(), **(spawn or {}))[1]
            for name, (init, data_seed, spawn) in model_plan(setting).items()}


def train_models(setting: Setting, device=None) -> SettingModels:
    """A, the spawn partner and the independent B of a setting, from the cache or trained."""
    device = device or default_device()
    out = SettingModels(setting, None)
    for name, (init, data_seed, spawn) in model_plan(setting).items():
        model, meta = get_or_train(setting.recipe, init, data_seed, device=device, **(spawn or {}))
        out.keys[name], out.meta[name] = meta["key"], {"test": meta["test"], "data": meta.get("data")}
        if name == "a":
            out.a = model
        else:
            out.others[name] = model
    return out


def build_pairs(models: SettingModels, device=None, names: tuple | None = None) -> dict[str, tuple]:
    """pair name -> (A, B') for the setting's pairs (or those `names`, e.g. 'cm', which no setting lists:
    chapter 6's commutativity matching); permutations are cached by the models' keys."""
    setting, device = models.setting, device or default_device()
    a, b = models.a, models.others.get("independent")
    spec = a.permutation_spec()
    pairs = {}
    for pair in names or setting.pairs:
        if pair == "spawn":
            pairs[pair] = (a, models.others["spawn"])
        elif pair == "naive":
            pairs[pair] = (a, b)
        else:
            pairs[pair] = (a, apply_permutation(b, spec, pair_perms(models, pair, device)))
    return pairs


def perms_config(models: SettingModels, method: str) -> dict:
    """The cache key of a matching's permutations: the models, the method and the data it learns from
    (which subset, drawn with which seed, in batches of which size)."""
    setting = models.setting
    config = {"a": models.keys["a"], "b": models.keys["independent"], "method": method}
    needs = METHODS[method].needs  # what the registry says the method learns from (`alignment_data`)
    if "batches" in needs:
        config["statistics"] = [setting.statistics_samples, SUBSET_SEEDS["statistics"], STATS_BATCH]
    if "epoch_batches" in needs:  # STE: its budget too
        config["ste"] = [setting.ste_epochs, setting.ste_subset, SUBSET_SEEDS["ste"], STE_BATCH]
    if method in METHOD_OPTIONS:
        config["options"] = METHOD_OPTIONS[method]
    return config


def pair_perms(models: SettingModels, method: str, device=None, computed: dict | None = None) -> dict:
    """The permutations aligning the independent B to A by `method` (`matching.METHODS`), from the cache
    or computed (or, with `computed`, those just computed elsewhere, stored for the next caller)."""
    a, b = models.a, models.others["independent"]
    compute = (lambda: computed) if computed is not None else _Matcher(method, a, b, models.setting,
                                                                      device or default_device())
    return cache.get_or_compute_tensors("perms", perms_config(models, method), compute, version=PERMS_VERSION)


@dataclass
class _Matcher:
    """Computes one alignment's permutations when the cache has none (a callable with its inputs bound)."""
    method: str
    a: torch.nn.Module
    b: torch.nn.Module
    setting: Setting
    device: object

    def __call__(self) -> dict:
        options = {"epochs": self.setting.ste_epochs} if self.method == "ste" else METHOD_OPTIONS.get(self.method, {})
        return align(self.method, self.a, self.b, data=alignment_data(self.setting, self.device), **options).perms


def alignment_data(setting: Setting, device) -> AlignmentData:
    """What the data-driven alignments of a setting learn from: its statistics subset (AM, CM, Sigma-WM) and
    the shuffled epochs of its STE subset, drawn lazily (weight matching reads neither)."""
    train = training_data(setting.recipe, device)
    stats = train.subset(setting.statistics_samples, SUBSET_SEEDS["statistics"])
    return AlignmentData(batches=_Batches(stats, STATS_BATCH),
                         epoch_batches=_EpochBatches(train.subset(setting.ste_subset, SUBSET_SEEDS["ste"]), STE_BATCH))


@dataclass
class _Batches:
    """A data set's batches in a fixed order, re-iterable (every pass yields the same batches)."""
    ds: data.Dataset
    batch_size: int

    def __iter__(self):
        return data.batches(self.ds, self.batch_size)


@dataclass
class _EpochBatches:
    """epoch -> shuffled training batches of one epoch (what STE iterates over)."""
    ds: data.Dataset
    batch_size: int

    def __call__(self, epoch: int):
        return data.batches(self.ds, self.batch_size, shuffle=True, seed=epoch)


def eval_splits(setting: Setting, device=None) -> dict[str, data.Dataset]:
    """The fixed train and test subsets a setting's curves and metrics are computed on: "train" is drawn from
    the images the networks were trained on (`train.training_data`), "test" from the test split."""
    device = str(device or default_device())
    return {"train": training_data(setting.recipe, device).subset(setting.eval_train, SUBSET_SEEDS["eval_train"]),
            "test": dataset_on(setting.recipe.dataset, "test", device).subset(setting.eval_test, SUBSET_SEEDS["eval_test"])}


def calibration(setting: Setting, device=None) -> list:
    """The setting's calibration batches: training data, without augmentation, for BN reset and REPAIR."""
    from ..interpolate import calibration_batches

    device = device or default_device()
    ds = training_data(setting.recipe, device).subset(setting.calibration_samples, SUBSET_SEEDS["calibration"])
    return calibration_batches(ds, device, STATS_BATCH)


def provenance(setting: Setting) -> dict:
    """What the manifest records about a computed setting (the form `results.load_or_compute` takes)."""
    from .profiles import setting_hash

    keys = {f"{name}/r{r}" if r else name: key for r in range(setting.replicates)
            for name, key in model_hashes(setting.at_replicate(r)).items()}
    return {"setting": {"hash": setting_hash(setting), "recipe": setting.recipe.name, "model": setting.recipe.model,
                        "model_keys": keys, "pairs": list(setting.pairs), "replicates": setting.replicates,
                        "corrections": list(setting.corrections), "notes": setting.notes},
            "data": {setting.recipe.dataset: dataset_on(setting.recipe.dataset, "test", "cpu").source},
            "seeds": {**SEEDS, "replicate r": f"every seed + {REPLICATE_STRIDE} r"}}
