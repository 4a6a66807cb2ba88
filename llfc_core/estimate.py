"""How long training a recipe takes on a device: FLOPs counted, throughput measured, minutes estimated.

* `flops_per_sample(model_config, dataset)` counts, with `torch.utils.flop_counter.FlopCounterMode`, the
  FLOPs of one forward pass (eval mode) and of one real training step (forward + cross entropy +
  backward, train mode) on a batch of 2 on the meta device (nothing is allocated or computed, so
  VGG-16 with the official head or ResNet-20 x32 are counted in a second). The counter counts matrix
  products and convolutions only, 2 FLOPs per multiply-add: no bias adds, norms, activations, losses or
  optimizer updates, so an MLP's forward is exactly 2 * sum(in * out) per sample. The training step is
  counted, not assumed to be 3x the forward: the first layer computes no input gradient, so an MNIST
  MLP 3x512 step is 2.57 forwards. It also gives the sizes the book's estimate needs beyond FLOPs
  (the Gram matrices of layer inputs and features, the permutations).
* `measure_throughput(recipe, device)`: images/s of real training steps as `train.train` runs them
  (the precision policy `runtime.training_precision`, autocast, channels_last for conv nets where
  `train` uses it, the recipe's optimizer, fused under autocast, the GradScaler for fp16, batches
  normalised and augmented on the device by `data.batches`) on random uint8 images of the data set's
  shape: batch size / median seconds of `steps` timed steps after one untimed warm-up step (the median:
  other processes on shared cores make single steps slow), more steps for a fast model until the timed
  ones add up to `MIN_SECONDS` (a few milliseconds of steps vary by half between runs). Cached in this
  process per (model config,
  data set, batch size, augmentation, optimizer, precision, device name, threads).
* `estimated_throughput(recipe, device)` applies the FLOP scaling rule:

      a recipe whose training step costs at most MEASURE_LIMIT[device type] FLOPs (train FLOPs per
      sample x batch size) is measured itself; a bigger one is not run: its family's anchor is
      measured instead -- the same architecture, norm, head, depth, data set, batch size,
      augmentation, optimizer, precision and device, shrunk in width until one step fits the limit --
      and the recipe is assumed to reach the anchor's achieved FLOP rate:
          throughput(recipe) = throughput(anchor) x train_FLOPs(anchor) / train_FLOPs(recipe).

  Wider layers usually run a device closer to its peak, so for a recipe far above its anchor the rule
  errs on the slow side (and the work the counter does not count, norms and activations, grows with
  width, not width squared).
* `training_minutes(recipe, device, throughput=None)` = epochs x training-set size (`train_subset`, else
  the whole split: 60,000 MNIST / 50,000 CIFAR-10) / throughput / 60; with `throughput` given nothing
  is measured.

`dense_flop_rate` (an fp32 matmul) and `assignment_seconds` (scipy's linear assignment, which matching
runs on the host) are the two other rates the book's estimate (`llfc_core.book.estimate`) needs.
"""
from __future__ import annotations

import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import data
from .models import build_model
from .recipes import Recipe
from .runtime import default_device, device_name, training_precision

INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
TRAIN_SIZES = {name: data.SIZES[(name, "train")] for name in INPUT_SHAPES}
TEST_SIZES = {name: data.SIZES[(name, "test")] for name in INPUT_SHAPES}

# Training FLOPs of one step above which a recipe is not run but scaled from a smaller family member
# (`estimated_throughput`): about a second per step at what each device class reaches.
MEASURE_LIMIT = {"cpu": 5e10, "cuda": 5e13, "mps": 5e12}
WARMUP_STEPS = 1
# Timed steps last at least this long in all (more steps than asked for a fast model: a few milliseconds
# of steps vary by half between runs on a shared CPU), up to MAX_STEPS steps.
MIN_SECONDS = 0.5
MAX_STEPS = 200


# ------------------------------------------------------------------------------------------- FLOPs
def _linear_rows(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    """(rows per sample, row length) of an op's input as `neurons.patch_rows` unfolds it."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.shape[-2] * out.shape[-1], module.in_channels * kh * kw // module.groups
    return 1, module.in_features


@functools.lru_cache(maxsize=256)
def _profile(config_json: str, dataset: str) -> dict:
    config = json.loads(config_json)
    with torch.device("meta"):
        model = build_model(config)
    n = 2
    x = torch.empty(n, *INPUT_SHAPES[dataset], device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")
    ops, relus = [], []

    def op_hook(module, inputs, out):
        rows, length = _linear_rows(module, out)
        ops.append((rows, length, module.weight.shape[0]))

    def relu_hook(module, inputs, out):
        relus.append((out[0].numel() // out.shape[1], out.shape[1]))  # (positions, channels) per sample

    handles = [m.register_forward_hook(op_hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles += [m.register_forward_hook(relu_hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x)
    forward = counter.get_total_flops() / n
    for h in handles:
        h.remove()
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops() / n
    state = model.state_dict()
    spec = model.permutation_spec() if hasattr(model, "permutation_spec") else None
    perms, cost_matrix = [], 0.0
    if spec is not None:
        for p, places in spec.perm_to_axes.items():
            size = state[places[0][0]].shape[places[0][1]]
            perms.append(int(size))
            # WM's cost matrix of p: one (n x rest) @ (rest x n) product per tensor axis carrying p
            cost_matrix += sum(2.0 * size * state[k].numel() for k, _ in places if state[k].is_floating_point())
    return {
        "forward": forward,
        "train": train,
        # one Gram matrix (z, 1)(z, 1)^T of every linear op's input rows (conv: patches), per sample
        "moments": float(sum(2 * rows * (length + 1) ** 2 for rows, length, _ in ops)),
        # the same without the first op, whose input is the data (commutativity matching leaves it out)
        "moments_hidden": float(sum(2 * rows * (length + 1) ** 2 for rows, length, _ in ops[1:])),
        # one channels x channels Gram of every ReLU layer's output, per sample
        "features": float(sum(2 * positions * channels ** 2 for positions, channels in relus)),
        # per model: W M W^T for every op (M its input's second moment): no samples
        "sandwich": float(sum(2 * out * (length + 1) ** 2 + 2 * out ** 2 * (length + 1) for _, length, out in ops)),
        "wm_sweep": cost_matrix,  # FLOPs of one weight-matching sweep's cost matrices, built from scratch
        "relus": len(relus),
        "linears": len(ops),
        "perm_sizes": perms,
        "params": int(sum(p.numel() for p in model.parameters())),
    }


def flops_per_sample(model_config: dict, dataset: str) -> dict:
    """FLOPs per sample of a model on a data set, counted by `FlopCounterMode` on the meta device.

    Keys: 'forward' (one eval-mode forward), 'train' (one training step: forward + cross entropy +
    backward, as counted, not 3x the forward), 'ratio' (train / forward); and for the book's estimate
    'moments' (a Gram of every linear op's input rows, conv patches included, with the bias entry;
    'moments_hidden' without the first op),
    'features' (a channels x channels Gram of every ReLU output), 'sandwich' (W M W^T for every op, per
    model, not per sample), 'wm_sweep' (one weight-matching sweep's cost matrices, per model pair),
    'relus', 'linears', 'perm_sizes' and 'params'. Only matrix products and convolutions are counted
    (2 FLOPs per multiply-add; see the module docstring)."""
    if dataset not in INPUT_SHAPES:
        raise ValueError(f"unknown data set {dataset!r}; choose from {sorted(INPUT_SHAPES)}")
    out = dict(_profile(json.dumps(model_config, sort_keys=True), dataset))
    out["perm_sizes"] = list(out["perm_sizes"])
    out["ratio"] = out["train"] / out["forward"]
    return out


def train_samples(recipe: Recipe) -> int:
    """The number of training images one epoch of `recipe` sees (its subset, else the whole split)."""
    size = TRAIN_SIZES[recipe.dataset]
    return size if recipe.train_subset is None else min(recipe.train_subset, size)


# ----------------------------------------------------------------------------------------- devices
def describe_device(device=None, precision: str | None = None) -> str:
    """'cpu (AMD EPYC 7B13, 2 threads, fp32)': the device, its name, torch's thread count and the
    training precision the policy resolves to there (or `precision`)."""
    device = torch.device(device or default_device())
    precision = precision or training_precision(device)
    threads = torch.get_num_threads()
    return f"{device} ({device_name(device)}, {threads} thread{'s' if threads != 1 else ''}, {precision})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --------------------------------------------------------------------------------- measured speed
_THROUGHPUT: dict[tuple, float] = {}
HOW: dict[tuple, dict] = {}  # per (recipe key): how its throughput was obtained (measured / scaled from)


def _key(recipe: Recipe, device: torch.device, precision: str) -> tuple:
    return (json.dumps(recipe.model, sort_keys=True), recipe.dataset, recipe.batch_size, recipe.augment,
            recipe.optimizer, precision, str(device), device_name(device), torch.get_num_threads())


def _step_seconds(recipe: Recipe, device: torch.device, precision: str, steps: int,
                  min_seconds: float = 0.0) -> list[float]:
    """Seconds of each timed training step (after the warm-up), each from the end of the previous one, so the
    batch's normalisation and augmentation count: the loop of `train.train`, on random images. At least
    `steps` steps, and more (up to `MAX_STEPS`) until they add up to `min_seconds`."""
    from .train import global_rng_restored, new_state, training_step, uses_channels_last

    with global_rng_restored(device):  # leave the caller's RNG as it was
        state = new_state(recipe, 0, device, precision)
        model, opt = state.model, state.optimizer
        channels_last = uses_channels_last(recipe, precision, device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        n = recipe.batch_size * (steps + WARMUP_STEPS)
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, *INPUT_SHAPES[recipe.dataset]), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (n,), generator=gen)
        ds = data.Dataset(recipe.dataset, "train", images.to(device), labels.to(device), "random images")
        model.train()
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        seconds: list[float] = []
        _sync(device)
        last = time.perf_counter()
        for epoch in range(MAX_STEPS):  # passes over the random images, as many as the timing needs
            for i, (x, y) in enumerate(data.batches(ds, recipe.batch_size, shuffle=True, augment=recipe.augment,
                                                    seed=epoch, device=device)):
                for group in opt.param_groups:
                    group["lr"] = recipe.lr_at(i / (steps + WARMUP_STEPS))
                loss, logits = training_step(model, opt, x, y, precision, channels_last, scaler)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                _sync(device)
                now = time.perf_counter()
                seconds.append(now - last)
                last = now
            timed = seconds[WARMUP_STEPS:]
            if len(timed) >= steps and (sum(timed) >= min_seconds or len(timed) >= MAX_STEPS):
                return timed
    return seconds[WARMUP_STEPS:]


def measure_throughput(recipe: Recipe, device=None, steps: int = 5, precision: str | None = None) -> float:
    """Images/s of `recipe`'s real training steps on `device` (see the module docstring): batch size over
    the median of at least `steps` timed steps (and at least `MIN_SECONDS` of them) after a warm-up step.
    `precision` default: the policy's,
    `runtime.training_precision(device, recipe.precision)`. Cached per (model config, data set, batch
    size, augmentation, optimizer, precision, device name, threads) in this process."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device or default_device())
    precision = training_precision(device, recipe.precision) if precision is None else precision
    key = _key(recipe, device, precision)
    if key not in _THROUGHPUT:
        _THROUGHPUT[key] = recipe.batch_size / statistics.median(_step_seconds(recipe, device, precision, steps,
                                                                              MIN_SECONDS))
        HOW.setdefault(key, {"how": "measured", "steps": steps})
    return _THROUGHPUT[key]


def shrink(config: dict, factor: float) -> dict:
    """The same model with its width multiplied by `factor` (< 1): an MLP's hidden widths, VGG-16's width
    multiplier, ResNet-20's integer width (at least 1). Other architectures are returned unchanged."""
    arch = config.get("arch")
    if arch == "mlp":
        return dict(config, widths=[max(1, int(round(w * factor))) for w in config["widths"]])
    if arch == "vgg16":
        return dict(config, width=config.get("width", 1.0) * factor)
    if arch == "resnet20":
        return dict(config, width=max(1, int(config.get("width", 1) * factor)))
    return dict(config)


def family_anchor(recipe: Recipe, limit: float) -> Recipe:
    """The member of `recipe`'s family that is measured in its place: its model shrunk in width until one
    training step (train FLOPs per sample x batch size) costs at most `limit` FLOPs, or as small as the
    architecture goes."""
    from dataclasses import replace

    flops = flops_per_sample(recipe.model, recipe.dataset)["train"] * recipe.batch_size
    factor = (limit / flops) ** 0.5
    model = recipe.model
    for _ in range(60):
        model = shrink(recipe.model, factor)
        if flops_per_sample(model, recipe.dataset)["train"] * recipe.batch_size <= limit or model == shrink(model, 0.5):
            break
        factor *= 0.9
    return replace(recipe, model=model)


def estimated_throughput(recipe: Recipe, device=None, precision: str | None = None, steps: int = 5) -> float:
    """Images/s of `recipe` on `device`: measured when one step is cheap, else scaled by training FLOPs
    from the family anchor (`family_anchor`; the rule is in the module docstring)."""
    device = torch.device(device or default_device())
    precision = training_precision(device, recipe.precision) if precision is None else precision
    limit = MEASURE_LIMIT.get(device.type, MEASURE_LIMIT["cpu"])
    flops = flops_per_sample(recipe.model, recipe.dataset)["train"]
    if flops * recipe.batch_size <= limit:
        return measure_throughput(recipe, device, steps, precision)
    anchor = family_anchor(recipe, limit)
    anchor_flops = flops_per_sample(anchor.model, recipe.dataset)["train"]
    rate = measure_throughput(anchor, device, steps, precision)
    HOW[_key(recipe, device, precision)] = {"how": "scaled", "anchor": anchor.model, "flops_ratio": flops / anchor_flops,
                                            "steps": steps}
    return rate * anchor_flops / flops


def training_minutes(recipe: Recipe, device=None, throughput: float | None = None,
                     precision: str | None = None) -> float:
    """Minutes to train `recipe` from scratch: epochs x training images (`train_samples`) / throughput / 60.
    `throughput` (images/s) default: `estimated_throughput(recipe, device, precision)`."""
    if throughput is None:
        throughput = estimated_throughput(recipe, device, precision)
    if throughput <= 0:
        raise ValueError(f"throughput must be positive, got {throughput}")
    return recipe.epochs * train_samples(recipe) / throughput / 60


def flop_rate(recipe: Recipe, device=None, precision: str | None = None) -> float:
    """FLOP/s `recipe`'s model reaches in training on `device` (train FLOPs per sample x images/s)."""
    return flops_per_sample(recipe.model, recipe.dataset)["train"] * estimated_throughput(recipe, device, precision)


_DENSE: dict[tuple, float] = {}


def dense_flop_rate(device=None, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (median of `repeats`, after a warm-up): the rate of
    the big Gram and moment products the book computes beside forward passes."""
    device = torch.device(device or default_device())
    key = (str(device), device_name(device), str(dtype), n, torch.get_num_threads())
    if key not in _DENSE:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
        a @ b
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - start)
        _DENSE[key] = 2 * n ** 3 / statistics.median(times)
    return _DENSE[key]


_ASSIGNMENT: dict[str, tuple] = {}


def assignment_seconds(n: int) -> float:
    """Seconds of one n x n linear assignment (scipy, on the host, as every matching solves them): measured
    at n = 128 and 512 on random costs, extended as a power law in n."""
    import math

    import numpy as np
    from scipy.optimize import linear_sum_assignment

    if "fit" not in _ASSIGNMENT:
        rng = np.random.default_rng(0)
        points = []
        for size in (128, 512):
            cost = rng.standard_normal((size, size))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                linear_sum_assignment(cost, maximize=True)
                times.append(time.perf_counter() - start)
            points.append((size, max(statistics.median(times), 1e-6)))
        (n0, t0), (n1, t1) = points
        exponent = min(3.0, max(2.0, math.log(t1 / t0) / math.log(n1 / n0)))
        _ASSIGNMENT["fit"] = (n1, t1, exponent)
    n1, t1, exponent = _ASSIGNMENT["fit"]
    return t1 * (max(n, 1) / n1) ** exponent


def clear_cache() -> None:
    """Forget every measurement of this process (the tests use it)."""
    _THROUGHPUT.clear()
    HOW.clear()
    _DENSE.clear()
    _ASSIGNMENT.clear()
