"""Training, spawning and resuming, with the whole data set on the device.

* `train` runs a recipe from a fresh init (or a given state) epoch by epoch; data order and
  augmentation of epoch e depend only on (data_seed, e), dropout masks too (the global RNG is seeded
  per epoch, and restored when training ends), and the lr only on the step, so a run checkpointed after
  every epoch (weights, optimizer, gradient scaler) resumes to exactly the weights an uninterrupted run
  reaches.
* Precision: `runtime.training_precision` resolves the recipe's `precision` ('auto' by default) on the
  device: bf16 autocast (+ channels_last for conv nets, fused optimizer) where the hardware has native
  bf16, fp16 autocast with a GradScaler on CUDA below compute capability 8.0, else fp32. Weights and
  optimizer state stay fp32. On the CPU the fp32 path is exactly the code this module always ran (NCHW,
  no autocast, foreach optimizer), so fp32 CPU weights are bit-identical to earlier versions'.
  Evaluation is always fp32.
* Memory: on a GPU, a batch whose activations do not fit the free memory runs as equal micro-batches whose
  gradients are accumulated into one step (`batch_plan`): the optimiser sees the recipe's batch and, up to
  float summation order, its gradient. How many depends on the memory free when the run starts, so two GPU
  runs of one model may differ in the last bits. BatchNorm networks are refused instead (their batch
  statistics would be a micro-batch's), and so is any run that cannot fit one sample. The CPU runs the
  recipe's batch as is.
* `get_or_train` is the cached entry point: a model is keyed by (recipe, seeds, spawn point, precision,
  device class, code version); an existing entry is loaded, a missing one trained. A spawned child
  continues from its parent's saved epoch-k state (optimizer included): the shared prefix is trained once.

The key rule (`model_config`, `model_key`): `model_config(...)` is the model's identity, which results
hash too; it holds `recipe.to_dict()` (without `precision`), the seeds, the spawn point and stop epoch,
plus `"precision": <resolved>` only when the resolved precision is not 'fp32'. The cache key is
`cache.config_hash(model_config(...))` on the CPU, and `cache.config_hash({**model_config(...),
"device": <device type>})` on any other device class ('cuda', 'mps'), so a GPU-trained model never
resumes or replaces a CPU one. An fp32 CPU model therefore keeps exactly the key it had before precision
existed.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cache, data
from .models import build_model
from .recipes import Recipe
from .runtime import (PRECISIONS, BatchPlan, DeviceMemoryError, default_device, exact_matmul, fit_batch, progress,
                      training_precision)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of the run is kept."""


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int                      # epochs completed
    history: list = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None  # fp16 only


# ------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=8)
def dataset_on(name: str, split: str, device: str, subset: int | None = None) -> data.Dataset:
    """A split loaded once per process and kept on `device` (uint8: CIFAR-10 train is 150 MB)."""
    return data.load(name, split).subset(subset).to(device)


def training_data(recipe: Recipe, device) -> data.Dataset:
    """The images a network of this recipe is trained on (its `train_subset` of the training split): every
    "train" measurement, calibration batch and alignment statistic of its networks is drawn from these."""
    return dataset_on(recipe.dataset, "train", str(device), recipe.train_subset)


def build_optimizer(recipe: Recipe, model: torch.nn.Module, precision: str = "fp32") -> torch.optim.Optimizer:
    """SGD or AdamW over `model`'s parameters (`optimizer_for`)."""
    return optimizer_for(recipe, model.parameters(), precision)


def optimizer_for(recipe: Recipe, params, precision: str = "fp32") -> torch.optim.Optimizer:
    """The recipe's SGD or AdamW over `params`. Under autocast (bf16, fp16) the fused implementation: one
    kernel per step instead of ~10 passes over the parameters (a sixth of an MLP step on the CPU), and with a
    GradScaler no host sync per step. fp32 keeps the default (foreach) implementation its committed models
    were trained with."""
    fused = {"fused": True} if precision != "fp32" else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Split an optimizer state into safetensors-friendly tensors and JSON-friendly param groups."""
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": torch.as_tensor(v) for pid, st in sd["state"].items() for k, v in st.items()
               if v is not None}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def align_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (momentum, moments) its parameter's strides. Fused optimizers
    read tensors as flat memory: torch 2.13's fused CPU SGD applies a contiguous momentum buffer of a
    channels_last weight to the wrong elements, silently. Loaded and spawned states need this."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p.detach(), dtype=v.dtype).copy_(v)


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict | None:
    """A GradScaler's state as JSON-friendly numbers (None without a scaler); read once per epoch."""
    return None if scaler is None else {k: (float(v) if k == "scale" else v) for k, v in scaler.state_dict().items()}


def epoch_seed(data_seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentation. 1_000_003 is a prime above any epoch count, so
    distinct (data_seed, epoch) pairs never share a seed."""
    return 1_000_003 * data_seed + epoch


DROPOUT_SEED_OFFSET = 2 ** 40  # above every epoch_seed of a data seed < 1e6: the two streams never coincide


def dropout_seed(data_seed: int, epoch: int) -> int:
    """The seed of the global RNG during epoch `epoch` (dropout masks), distinct from the data's seed."""
    return DROPOUT_SEED_OFFSET + epoch_seed(data_seed, epoch)


@contextmanager
def global_rng_restored(device: torch.device):
    """Leave the global RNG (CPU, and `device` when CUDA) as it was: training seeds it per epoch."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


def _seed_global_rng(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@exact_matmul()
@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: data.Dataset, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and error (fraction misclassified) over a whole split."""
    device = next(model.parameters()).device
    model.eval()
    loss, wrong = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
    for x, y in data.batches(ds, batch_size, device=device):
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        wrong += (logits.argmax(1) != y).sum()
    return {"loss": loss.item() / len(ds), "error": wrong.item() / len(ds)}


# ------------------------------------------------------------------------------------------ training
def new_state(recipe: Recipe, init_seed: int, device, precision: str = "fp32") -> TrainState:
    torch.manual_seed(init_seed)
    model = build_model(recipe.model).to(device)
    return TrainState(model, build_optimizer(recipe, model, precision), 0)


def uses_channels_last(recipe: Recipe, precision: str, device: torch.device) -> bool:
    """channels_last helps conv nets under autocast (CPU and GPU) and on CUDA; fp32 on the CPU stays NCHW:
    channels_last is faster there too, but oneDNN then sums in another order and the weights change."""
    return recipe.model["arch"] != "mlp" and (precision != "fp32" or device.type == "cuda")


def training_step(model, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str,
                  channels_last: bool, scaler: torch.amp.GradScaler | None = None,
                  micro_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step under the precision policy (the learning rate is the caller's): forward under
    autocast, fp32 loss, backward and step, through `scaler` in fp16. Returns (loss, logits).

    With `micro_batch` below the batch size, the batch runs as passes of that many samples whose gradients
    add up before the one step; each pass's mean loss is weighted by its share of the batch, so the sum is
    the batch's mean loss and the accumulated gradient the batch's gradient."""
    optimizer.zero_grad(set_to_none=True)  # first: every pass's backward adds into .grad
    # one pass (the CPU, and any GPU batch that fits) is exactly the single forward/backward of before
    parts = list(zip(x.split(micro_batch), y.split(micro_batch))) if micro_batch and micro_batch < len(y) else [(x, y)]
    losses, outputs = [], []
    for xs, ys in parts:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                            enabled=precision != "fp32"):
            logits = model(xs.contiguous(memory_format=torch.channels_last) if channels_last else xs)
            loss = F.cross_entropy(logits.float(), ys)
        if len(parts) > 1:
            loss = loss * (len(ys) / len(y))
        (loss if scaler is None else scaler.scale(loss)).backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    if scaler is None:
        optimizer.step()
    else:  # fp16: scaled gradients; the fused optimizer skips steps with inf/NaN gradients itself
        scaler.step(optimizer)
        scaler.update()
    if len(parts) == 1:
        return loss, logits
    return torch.stack(losses).sum(), torch.cat(outputs)


def batch_plan(recipe: Recipe, model: torch.nn.Module, sample_shape, device) -> BatchPlan:
    """How a training batch of `recipe` runs on `device` (`runtime.fit_batch`): on a GPU, micro-batches
    when the activations of the whole batch do not fit its free memory; on the CPU the batch as is.
    Besides activations a step allocates the gradients and the optimizer's state (SGD's momentum, AdamW's
    two moments), one and two more copies of the parameters. Refuses a BatchNorm network that would need
    micro-batches: its statistics would be those of a micro-batch, not of the recipe's batch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    what = f"training recipe {recipe.name!r} ({recipe.model}, batch {recipe.batch_size})"
    plan = fit_batch(model, sample_shape, recipe.batch_size, device, training=True, what=what,
                     fixed_bytes=params * (2 if recipe.optimizer == "sgd" else 3))
    if plan.accumulation > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise DeviceMemoryError(f"{what} fits {device}'s free memory only as {plan.accumulation} micro-batches of "
                                f"{plan.micro_batch}, but its BatchNorm layers would then normalise over micro-batches, "
                                "not the recipe's batch: lower the batch size or use a device with more memory")
    return plan


def train(recipe: Recipe, *, init_seed: int = 0, data_seed: int = 0, until: int | None = None,
          state: TrainState | None = None, checkpoint=None, device=None, callback=None,
          compile: bool = False, precision: str | None = None) -> TrainState:
    """Train from `state` (default: fresh init from `init_seed`) up to epoch `until` (default: all).

    `checkpoint` (a cache folder) is written after every epoch and resumed from when present.
    `callback(state)` runs after each epoch (tests use it to simulate a kill). `precision` ('fp32' |
    'bf16' | 'fp16') is taken as given, without the policy's device checks (the tests run the fp16 path on
    the CPU); by default it is `training_precision(device, recipe.precision)`. A given `state` should come
    from `new_state(..., precision)` or an earlier `train` in the same precision (its optimizer is fused
    under autocast).
    """
    device = torch.device(device or default_device())
    precision = training_precision(device, recipe.precision) if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (resolved); got {precision!r}")
    until = recipe.epochs if until is None else until
    state = state or new_state(recipe, init_seed, device, precision)
    if precision == "fp16" and state.scaler is None:
        state.scaler = torch.amp.GradScaler(device.type)
    if checkpoint is not None and cache.has_entry(checkpoint):
        state = _resume(state, checkpoint, precision)
    ds = training_data(recipe, device)
    plan = batch_plan(recipe, state.model, ds.images.shape[1:], device)  # before any step: a refusal costs nothing
    channels_last = uses_channels_last(recipe, precision, device)
    if channels_last:
        state.model = state.model.to(memory_format=torch.channels_last)
    align_optimizer_state(state.optimizer)  # after a resume or a spawn the state may be in another layout
    step_fn = torch.compile(state.model) if compile else state.model
    scaler = state.scaler if precision == "fp16" else None
    steps_per_epoch = -(-len(ds) // recipe.batch_size)
    bar = progress(total=(until - state.epoch) * steps_per_epoch, desc=f"{recipe.name} seed {init_seed}/{data_seed}",
                   leave=False)
    with global_rng_restored(device):
        for epoch in range(state.epoch, until):
            state.model.train()
            _seed_global_rng(dropout_seed(data_seed, epoch), device)  # dropout masks depend on (data_seed, epoch) only
            loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
            for i, (x, y) in enumerate(data.batches(ds, recipe.batch_size, shuffle=True, augment=recipe.augment,
                                                    seed=epoch_seed(data_seed, epoch), device=device)):
                for group in state.optimizer.param_groups:
                    group["lr"] = recipe.lr_at(epoch + i / steps_per_epoch)
                loss, logits = training_step(step_fn, state.optimizer, x, y, precision, channels_last, scaler,
                                             plan.micro_batch)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                if i % 50 == 0 and not torch.isfinite(loss_sum):  # a sync every 50 steps is cheap
                    break
                bar.update(1)
            if not torch.isfinite(loss_sum):
                bar.close()
                if checkpoint is not None:
                    cache.remove_entry(checkpoint)
                raise TrainingDiverged(f"{recipe.name}: loss became {loss_sum.item()} in epoch {epoch + 1}; "
                                       "lower the learning rate. No checkpoint was kept.")
            state.epoch = epoch + 1
            state.history.append({"epoch": state.epoch, "train_loss": loss_sum.item() / len(ds),
                                  "train_acc": correct.item() / len(ds),
                                  **({"micro_batch": plan.micro_batch} if plan.accumulation > 1 else {})})
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3f}", acc=f"{state.history[-1]['train_acc']:.3f}")
            if checkpoint is not None:
                _save_checkpoint(state, checkpoint, precision)
            if callback is not None:
                callback(state)
    bar.close()
    state.model = state.model.to(memory_format=torch.contiguous_format).eval()
    return state


def _save_checkpoint(state: TrainState, folder, precision: str = "fp32") -> None:
    opt_tensors, groups = optimizer_tensors(state.optimizer)
    cache.write_entry(folder, {"weights": state.model.state_dict(), "optimizer": opt_tensors},
                      {"model": state.model.config, "epoch": state.epoch, "param_groups": groups,
                       "history": state.history, "precision": precision, "scaler": scaler_state(state.scaler)})


def _resume(state: TrainState, folder, precision: str = "fp32") -> TrainState:
    groups, meta = cache.read_entry(folder, ("weights", "optimizer"))
    cache.check_state_shapes(state.model, groups["weights"], str(folder))
    saved = meta.get("precision", "fp32")  # checkpoints from before the precision policy were fp32
    if saved != precision:
        raise cache.CacheError(f"checkpoint {folder} was trained in {saved}, this run is {precision}: "
                               f"delete that folder to restart, or train in {saved}")
    if state.scaler is not None and meta.get("scaler") is None:
        raise cache.CacheError(f"checkpoint {folder} has no gradient scaler state; delete it to restart")
    state.model.load_state_dict(groups["weights"])
    # The tensors stay on the CPU: load_state_dict moves each to its parameter's device and dtype, and
    # keeps Adam's `step` counter on the CPU (on the GPU it would cost a sync per parameter per step).
    load_optimizer(state.optimizer, groups["optimizer"], meta["param_groups"])
    if state.scaler is not None:
        state.scaler.load_state_dict(dict(meta["scaler"]))
    return TrainState(state.model, state.optimizer, meta["epoch"], meta["history"], state.scaler)


# ------------------------------------------------------------------------------------- cached models
def spawn_point(recipe: Recipe, epoch: int, parent_data_seed: int | None = None) -> dict:
    """Where a child branches off: after `epoch` epochs of the parent trained with `parent_data_seed`
    (epoch 0: the children share only the initialisation)."""
    if not 0 <= epoch < recipe.epochs:
        raise ValueError(f"spawn epoch must lie in 0..{recipe.epochs - 1}, got {epoch}")
    return {"epoch": epoch, "parent_data_seed": parent_data_seed if parent_data_seed is not None else 0}


def model_config(recipe: Recipe, init_seed: int, data_seed: int, spawn: dict | None = None,
                 stop_epoch: int | None = None, *, precision: str = "fp32") -> dict:
    """Everything that determines a trained model's weights (the model's identity; see the module
    docstring for the key rule). `spawn` (from `spawn_point`) makes it a child; `stop_epoch` a parent
    stopped early; `precision` is the *resolved* training precision, recorded only when not 'fp32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"model_config needs the resolved precision ({', '.join(PRECISIONS)}), got {precision!r}; "
                         "resolve it with runtime.training_precision(device, recipe.precision)")
    config = {"recipe": recipe.to_dict(), "init_seed": init_seed, "data_seed": data_seed, "spawn": spawn,
              "stop_epoch": stop_epoch}
    if precision != "fp32":
        config["precision"] = precision
    return config


# Bump when a change alters trained weights (a new init, a different loop): every model is retrained,
# nothing else is recomputed that does not depend on the models. Version 1: the keys of every model so far.
MODEL_VERSION = 1


def model_key(config: dict, device) -> str:
    """The cache key of a model trained on `device`: `config_hash(config)` on the CPU; elsewhere the
    device class joins the hash, so models trained on a GPU and on the CPU never share an entry."""
    kind = torch.device(device).type
    return cache.config_hash(config if kind == "cpu" else {**config, "device": kind}, version=MODEL_VERSION)


def model_identity(recipe: Recipe, init_seed: int = 0, data_seed: int = 0, *, spawn_epoch: int | None = None,
                   parent_data_seed: int | None = None, device=None) -> tuple[dict, str, str]:
    """(model_config, cache key, resolved precision) of the model `get_or_train` would return, without
    training or loading anything (what callers record, e.g. a manifest's model keys)."""
    device = torch.device(device or default_device())
    precision = training_precision(device, recipe.precision)
    spawn = spawn_point(recipe, spawn_epoch, parent_data_seed) if spawn_epoch is not None else None
    config = model_config(recipe, init_seed, data_seed, spawn, precision=precision)
    return config, model_key(config, device), precision


def get_or_train(recipe: Recipe, init_seed: int = 0, data_seed: int = 0, *, spawn_epoch: int | None = None,
                 parent_data_seed: int | None = None, device=None, root=None) -> tuple[torch.nn.Module, dict]:
    """Load the model from the cache or train it. With `spawn_epoch=k`, the model is a child branched at
    epoch k from the parent (init_seed, parent_data_seed), continuing with its own `data_seed`."""
    device = torch.device(device or default_device())
    config, key, precision = model_identity(recipe, init_seed, data_seed, spawn_epoch=spawn_epoch,
                                            parent_data_seed=parent_data_seed, device=device)
    spawn = config["spawn"]
    folder = cache.entry_dir("models", key, root)
    if cache.has_entry(folder):
        return cache.load_model(folder, device)
    state = _parent_state(recipe, init_seed, spawn, device, root, precision) if spawn else None
    state = train(recipe, init_seed=init_seed, data_seed=data_seed, state=state,
                  checkpoint=cache.entry_dir("runs", key, root), device=device, precision=precision)
    meta = {"config": config, "key": key, "history": state.history,
            "test": evaluate(state.model, dataset_on(recipe.dataset, "test", str(device))),
            "device": str(device), "precision": precision, "torch": torch.__version__,
            "data": training_data(recipe, device).source}
    cache.save_model(folder, state.model, meta)
    cache.remove_entry(cache.entry_dir("runs", key, root))
    return cache.load_model(folder, device)


def _parent_state(recipe: Recipe, init_seed: int, spawn: dict, device, root, precision: str) -> TrainState:
    """The spawn parent at epoch k (weights + optimizer), from the cache or trained once and stored."""
    config = model_config(recipe, init_seed, spawn["parent_data_seed"], stop_epoch=spawn["epoch"], precision=precision)
    folder = cache.entry_dir("parents", model_key(config, device), root)
    # The parent's epoch checkpoint *is* its cache entry: a finished parent is just resumed (no step
    # runs), an interrupted one continues to epoch k.
    return train(recipe, init_seed=init_seed, data_seed=spawn["parent_data_seed"], until=spawn["epoch"],
                 checkpoint=folder, device=device, precision=precision)
