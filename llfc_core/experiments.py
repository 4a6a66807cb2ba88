"""The book's experiments: named settings, the smoke / cpu / paper profiles, and building the pairs.

Pairs of a setting (all share model A):
  A       spawn child 1: init seed 0, trained to the spawn epoch with data seed 0, then data seed 1
  spawn   (A, spawn child 2): same parent state, continued with data seed 2
  naive   (A, B): B is trained independently (init seed 1, data seed 3), not aligned
  wm/am/ste  (A, pi(B)): B aligned to A by weight matching / activation matching / STE
A is an ordinary fully trained network (a child costs no more epochs than a straight run), so one
A serves every pair and the spawned prefix is trained once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace

import torch

from . import cache, data
from .matching import activation_matching, ste_matching, weight_matching
from .permutation import apply_permutation
from .recipes import CIFAR_MLP, MNIST_MLP, Recipe, get_recipe
from .settings import default_device
from .train import dataset_on, get_or_train, model_config, model_key

PAIRS = ("spawn", "naive", "wm", "am", "ste")
SEEDS = {"init_a": 0, "parent_data": 0, "data_a": 1, "data_spawn": 2, "init_b": 1, "data_b": 3}


@dataclass(frozen=True)
class Setting:
    name: str
    recipe: Recipe
    pairs: tuple = ("spawn", "naive", "wm", "am")
    spawn_epoch: int = 1
    correction: str = "none"          # how theta_alpha is evaluated: 'none' | 'bn_reset' | 'repair'
    alphas: int = 21                  # points on the interpolation curve
    eval_train: int | None = 10000    # train samples for the curves (None: all)
    eval_test: int | None = None      # test samples for curves and layer metrics (None: all)
    calibration: int = 5000           # train samples for BN reset / REPAIR / activation matching
    metric_batch: int = 250
    ste_epochs: int = 1
    ste_subset: int = 10000
    notes: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def _mlp(name, dataset, widths, **kw) -> Recipe:
    model = dict(MNIST_MLP if dataset == "mnist" else CIFAR_MLP, widths=list(widths))
    return Recipe(name, dataset, model, **kw)


def _conv(name, model, **kw) -> Recipe:
    return Recipe(name, "cifar10", model, augment=True, **kw)


TRIANGLE = {"schedule": "triangle", "warmup_epochs": 0.5}

PROFILES: dict[str, dict[str, Setting]] = {
    # Tiny everything: every code path of every setting in seconds (the tests run the book with it).
    "smoke": {
        "mnist-mlp": Setting("mnist-mlp", _mlp("smoke-mlp-mnist", "mnist", (32, 32, 32), epochs=2, lr=0.05,
                                                train_subset=2000, **TRIANGLE),
                             pairs=PAIRS, alphas=5, eval_train=500, eval_test=500, calibration=500,
                             ste_subset=1000),
        "cifar10-mlp": Setting("cifar10-mlp", _mlp("smoke-mlp-cifar10", "cifar10", (32, 32, 32), epochs=2, lr=0.02,
                                                    train_subset=1000, **TRIANGLE),
                               pairs=("spawn", "naive", "wm", "am"), alphas=5, eval_train=500, eval_test=500,
                               calibration=500),
        "cifar10-vgg16": Setting("cifar10-vgg16", _conv("smoke-vgg16-bn", {"arch": "vgg16", "norm": "bn", "width": 0.0625},
                                                        epochs=2, lr=0.05, train_subset=500, **TRIANGLE),
                                 pairs=("spawn", "naive", "wm", "am"), correction="bn_reset", alphas=5,
                                 eval_train=300, eval_test=300, calibration=300),
        "cifar10-resnet20": Setting("cifar10-resnet20", _conv("smoke-resnet20-bn", {"arch": "resnet20", "width": 1, "norm": "bn",
                                                                                   "blocks_per_stage": 1},
                                                              epochs=2, lr=0.05, train_subset=500, **TRIANGLE),
                                    pairs=("spawn", "naive", "wm", "am"), correction="bn_reset", alphas=5,
                                    eval_train=300, eval_test=300, calibration=300),
        "cifar10-resnet20x32-ln": Setting("cifar10-resnet20x32-ln",
                                          _conv("smoke-resnet20-ln", {"arch": "resnet20", "width": 1, "norm": "ln",
                                                                      "blocks_per_stage": 1},
                                                epochs=2, lr=0.05, train_subset=500, **TRIANGLE),
                                          pairs=("naive", "wm", "am"), alphas=5, eval_train=300, eval_test=300,
                                          calibration=300, notes="width 1 and one block per stage in smoke"),
    },
    # What 2 CPU cores do in about half an hour for the whole book.
    "cpu": {
        "mnist-mlp": Setting("mnist-mlp", get_recipe("cpu-mlp-mnist"), pairs=PAIRS, spawn_epoch=1,
                             eval_train=10000, ste_subset=10000),
        "cifar10-mlp": Setting("cifar10-mlp", _mlp("cpu-mlp-cifar10", "cifar10", (512, 512, 512), epochs=10, lr=0.02,
                                                    **TRIANGLE),
                               pairs=("spawn", "naive", "wm", "am"), spawn_epoch=1, eval_train=10000),
        "cifar10-vgg16": Setting("cifar10-vgg16", _conv("cpu-vgg16-bn-w025", {"arch": "vgg16", "norm": "bn", "width": 0.25},
                                                        epochs=10, lr=0.05, train_subset=20000, **TRIANGLE),
                                 pairs=("spawn", "naive", "wm"), spawn_epoch=2, correction="bn_reset", alphas=11,
                                 eval_train=2000, eval_test=2000, calibration=2000,
                                 notes="VGG-16 at 1/4 width, 20k training images, 10 epochs"),
        "cifar10-resnet20": Setting("cifar10-resnet20", _conv("cpu-resnet20-bn", {"arch": "resnet20", "width": 1, "norm": "bn"},
                                                              epochs=8, lr=0.05, train_subset=8000, **TRIANGLE),
                                    pairs=("spawn", "naive", "wm"), spawn_epoch=2, correction="bn_reset", alphas=11,
                                    eval_train=2000, eval_test=2000, calibration=2000,
                                    notes="ResNet-20 x1, 8k training images, 8 epochs"),
    },
    # The paper's settings (one GPU).
    "paper": {
        "mnist-mlp": Setting("mnist-mlp", get_recipe("rebasin-mlp-mnist"), pairs=PAIRS, spawn_epoch=1),
        "cifar10-mlp": Setting("cifar10-mlp", get_recipe("rebasin-mlp-cifar10"), pairs=PAIRS, spawn_epoch=1),
        "cifar10-vgg16": Setting("cifar10-vgg16", get_recipe("paper-vgg16-bn"), pairs=("spawn", "naive", "wm"),
                                 spawn_epoch=5, correction="bn_reset"),
        "cifar10-resnet20": Setting("cifar10-resnet20", get_recipe("paper-resnet20-bn"), pairs=("spawn", "naive", "wm"),
                                    spawn_epoch=5, correction="bn_reset"),
        "cifar10-resnet20x32-ln": Setting("cifar10-resnet20x32-ln", get_recipe("rebasin-resnet20x32-ln"),
                                          pairs=("naive", "wm", "am")),
    },
}


def default_profile() -> str:
    return "paper" if torch.cuda.is_available() else "cpu"


def get_settings(profile: str | None = None, only: list | None = None, **overrides) -> dict[str, Setting]:
    """The settings of a profile (default: 'paper' with a GPU, else 'cpu'), optionally a subset, with
    field overrides applied to every setting (e.g. alphas=11)."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    settings = PROFILES[profile]
    if isinstance(only, str):  # from the command line: '["a", "b"]' or 'a,b'
        only = json.loads(only) if only.strip().startswith("[") else [n.strip() for n in only.split(",") if n.strip()]
    if only:
        unknown = set(only) - set(settings)
        if unknown:
            raise KeyError(f"profile {profile!r} has no settings {sorted(unknown)}; it has {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in only}
    return {k: replace(v, **overrides) if overrides else v for k, v in settings.items()}


# --------------------------------------------------------------------------------------- the models
@dataclass
class SettingModels:
    setting: Setting
    a: torch.nn.Module
    others: dict = field(default_factory=dict)   # 'spawn' / 'independent' -> model
    keys: dict = field(default_factory=dict)     # model name -> cache key
    meta: dict = field(default_factory=dict)     # model name -> training metadata


def model_plan(setting: Setting) -> dict[str, tuple]:
    """name -> (init seed, data seed, spawn kwargs) of the models a setting needs."""
    s = SEEDS
    spawn = {"spawn_epoch": setting.spawn_epoch, "parent_data_seed": s["parent_data"]}
    plan = {"a": (s["init_a"], s["data_a"], spawn)}
    if "spawn" in setting.pairs:
        plan["spawn"] = (s["init_a"], s["data_spawn"], spawn)
    if set(setting.pairs) - {"spawn"}:
        plan["independent"] = (s["init_b"], s["data_b"], {})
    return plan


def model_hashes(setting: Setting) -> dict[str, str]:
    """The cache keys of a setting's models, without training anything."""
    return {name: cache.config_hash(model_config(setting.recipe, init, data_seed, **kw))
            for name, (init, data_seed, kw) in model_plan(setting).items()}


def train_models(setting: Setting, device=None) -> SettingModels:
    """A, the spawn partner and the independent B of a setting, from the cache or trained."""
    device = device or default_device()
    out = SettingModels(setting, None)
    for name, (init, data_seed, kw) in model_plan(setting).items():
        model, meta = get_or_train(setting.recipe, init, data_seed, device=device, **kw)
        out.keys[name], out.meta[name] = meta["key"], {"test": meta["test"], "data": meta.get("data")}
        if name == "a":
            out.a = model
        else:
            out.others[name] = model
    return out


def build_pairs(models: SettingModels, device=None) -> dict[str, tuple]:
    """pair name -> (A, B') for the setting's pairs; permutations are cached by the models' keys."""
    setting, device = models.setting, device or default_device()
    a, b = models.a, models.others.get("independent")
    spec = a.permutation_spec()
    pairs = {}
    for pair in setting.pairs:
        if pair == "spawn":
            pairs[pair] = (a, models.others["spawn"])
        elif pair == "naive":
            pairs[pair] = (a, b)
        else:
            config = {"a": models.keys["a"], "b": models.keys["independent"], "method": pair,
                      "calibration": setting.calibration, "ste": [setting.ste_epochs, setting.ste_subset]}
            perms = cache.get_or_compute_tensors("perms", config, lambda: _match(pair, a, b, spec, setting, device))
            pairs[pair] = (a, apply_permutation(b, spec, perms))
    return pairs


def _match(method: str, a, b, spec, setting: Setting, device) -> dict:
    train = dataset_on(setting.recipe.dataset, "train", str(device))
    if method == "wm":
        return weight_matching(spec, a.state_dict(), b.state_dict()).perms
    if method == "am":
        return activation_matching(a, b, spec, data.batches(train.subset(setting.calibration, 1), 500)).perms
    if method == "ste":
        subset = train.subset(setting.ste_subset, 2)
        return ste_matching(a, b, spec, lambda e: data.batches(subset, 500, shuffle=True, seed=e),
                            epochs=setting.ste_epochs).perms
    raise ValueError(f"unknown matching method {method!r}")


def eval_splits(setting: Setting, device=None) -> dict[str, data.Dataset]:
    device = str(device or default_device())
    name = setting.recipe.dataset
    return {"train": dataset_on(name, "train", device).subset(setting.eval_train, 3),
            "test": dataset_on(name, "test", device).subset(setting.eval_test, 4)}


def calibration_set(setting: Setting, device=None) -> data.Dataset:
    return dataset_on(setting.recipe.dataset, "train", str(device or default_device())).subset(setting.calibration, 5)


def setting_hash(setting: Setting) -> str:
    """What a setting's results depend on: the setting itself and the seeds (training keys follow)."""
    return cache.config_hash({"setting": setting.to_dict(), "seeds": SEEDS,
                              "a": model_key(setting.recipe, SEEDS["init_a"], SEEDS["data_a"])})


# ------------------------------------------------------------------------ what each chapter computes
def _metric_batches(setting: Setting, device):
    return data.batches(eval_splits(setting, device)["test"], setting.metric_batch)


def _pair_frame(kind: str, models: SettingModels, pair: str, compute, extra: dict | None = None):
    """A per-(setting, pair) frame cached by the models' keys, so chapters share one computation."""
    config = {"kind": kind, "setting": setting_hash(models.setting), "keys": models.keys, "pair": pair, **(extra or {})}
    frame = cache.get_or_compute_frame("frames", config, compute)
    frame.insert(0, "pair", pair)
    frame.insert(0, "setting", models.setting.name)
    return frame


def lmc_table(setting: Setting, device=None):
    """Loss and error along alpha on train and test for every pair (chapter 1)."""
    import pandas as pd

    from .interpolate import interpolation_curve

    device = device or default_device()
    models = train_models(setting, device)
    frames = []
    for pair, (a, b) in build_pairs(models, device).items():
        frames.append(_pair_frame("lmc", models, pair, lambda: interpolation_curve(
            a, b, eval_splits(setting, device), alphas=setting.alphas, correction=setting.correction,
            calibration=calibration_set(setting, device))))
    return pd.concat(frames, ignore_index=True)


def layer_tables(setting: Setting, device=None, alphas=(0.25, 0.5, 0.75)):
    """LLFC and the two conditions per layer for every pair (chapters 2 and 3 share this pass)."""
    import pandas as pd

    from .interpolate import calibration_batches
    from .metrics import layer_metrics

    device = device or default_device()
    models = train_models(setting, device)
    out = {"llfc": [], "conditions": []}
    for pair, (a, b) in build_pairs(models, device).items():
        result = {}  # one pass gives both frames; it runs only if one of them is not cached

        def compute(kind, a=a, b=b, result=result):
            if not result:
                calib = calibration_batches(calibration_set(setting, device), device)
                result.update(layer_metrics(a, b, _metric_batches(setting, device), alphas=alphas,
                                            correction=setting.correction, calibration=calib))
            return result[kind]
        for kind in out:
            out[kind].append(_pair_frame(kind, models, pair, lambda kind=kind: compute(kind), {"alphas": list(alphas)}))
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def matching_table(setting: Setting, device=None, seed: int = 0):
    """Chapter 4: for identity, random, WM and AM permutations of the independent B, per linear op the
    weight gap dist(W_A, P W_B P'^T), the feature gap dist(H_A, P' H_B) and the commutativity residual."""
    import pandas as pd

    from .metrics import layer_metrics
    from .permutation import identity_perms, random_perms

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
        def compute(pb=pb):
            cond = layer_metrics(a, pb, _metric_batches(setting, device), alphas=(0.5,))["conditions"]
            cond = cond[cond.kind == "linear"]
            return cond.rename(columns={"dist_w": "weight_gap", "dist_h": "feature_gap"})[
                ["layer", "depth", "weight_gap", "feature_gap", "dist_com", "dist_com_sample"]]
        frames.append(_pair_frame("matching", models, method, compute, {"seed": seed}).rename(columns={"pair": "method"}))
    return pd.concat(frames, ignore_index=True)


def appendix_tables(setting: Setting, device=None, k: int = 10):
    """Stitching errors and principal angles per ReLU layer for every pair (chapter 4's appendix view)."""
    import pandas as pd

    from .metrics import principal_angles, stitching_errors

    device = device or default_device()
    models = train_models(setting, device)
    stitch, angles = [], []
    for pair, (a, b) in build_pairs(models, device).items():
        stitch.append(_pair_frame("stitch", models, pair, lambda a=a, b=b: stitching_errors(
            a, b, _metric_batches(setting, device))))
        angles.append(_pair_frame("angles", models, pair, lambda a=a, b=b: principal_angles(
            a, b, _metric_batches(setting, device), k=k), {"k": k}))
    return pd.concat(stitch, ignore_index=True), pd.concat(angles, ignore_index=True)


def spectra_table(setting: Setting, device=None):
    """Weight singular-value summaries (`metrics.weight_spectra`) of A, its spawn partner and the
    independent B, per linear op, with each layer's depth (chapter 4's low-rank view)."""
    import pandas as pd

    from .metrics import find_taps, weight_spectra

    device = device or default_device()
    models = train_models(setting, device)
    example = next(data.batches(eval_splits(setting, device)["test"], 2))[0]
    depth = find_taps(models.a, example)["depth"]
    frames = []
    for name, model in {"a": models.a, **models.others}.items():
        frame = weight_spectra(model)
        frame.insert(0, "model", name)
        frame.insert(0, "setting", setting.name)
        frame.insert(3, "depth", frame.layer.map(depth))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
