"""Training, spawning and resuming, with the whole data set on the device.

* `train` runs a recipe from a fresh init (or a given state) epoch by epoch; data order and
  augmentation of epoch e depend only on (data_seed, e), and the lr only on the step, so a run
  checkpointed after every epoch resumes to exactly the weights an uninterrupted run reaches.
* `get_or_train` is the cached entry point: a model is keyed by (recipe, seeds, spawn point, code
  version); an existing entry is loaded, a missing one trained. A spawned child continues from its
  parent's saved epoch-k state (optimizer included): the shared prefix is trained once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cache, data
from .models import build_model
from .recipes import Recipe
from .runtime import default_device, progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of the run is kept."""


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int                      # epochs completed
    history: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=8)
def dataset_on(name: str, split: str, device: str, subset: int | None = None) -> data.Dataset:
    """A split loaded once per process and kept on `device` (uint8: CIFAR-10 train is 150 MB)."""
    return data.load(name, split).subset(subset).to(device)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


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


def epoch_seed(data_seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentation. 1_000_003 is a prime above any epoch count, so
    distinct (data_seed, epoch) pairs never share a seed."""
    return 1_000_003 * data_seed + epoch


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
def new_state(recipe: Recipe, init_seed: int, device) -> TrainState:
    torch.manual_seed(init_seed)
    model = build_model(recipe.model).to(device)
    return TrainState(model, build_optimizer(recipe, model), 0)


def train(recipe: Recipe, *, init_seed: int = 0, data_seed: int = 0, until: int | None = None,
          state: TrainState | None = None, checkpoint=None, device=None, callback=None,
          compile: bool = False) -> TrainState:
    """Train from `state` (default: fresh init from `init_seed`) up to epoch `until` (default: all).

    `checkpoint` (a cache folder) is written after every epoch and resumed from when present.
    `callback(state)` runs after each epoch (tests use it to simulate a kill).
    """
    device = torch.device(device or default_device())
    until = recipe.epochs if until is None else until
    state = state or new_state(recipe, init_seed, device)
    if checkpoint is not None and cache.has_entry(checkpoint):
        state = _resume(state, checkpoint, device)
    ds = dataset_on(recipe.dataset, "train", str(device), recipe.train_subset)
    cuda = device.type == "cuda"
    if cuda and recipe.model["arch"] != "mlp":
        state.model = state.model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(state.model) if compile else state.model
    steps_per_epoch = -(-len(ds) // recipe.batch_size)
    bar = progress(total=(until - state.epoch) * steps_per_epoch, desc=f"{recipe.name} seed {init_seed}/{data_seed}",
                   leave=False)
    for epoch in range(state.epoch, until):
        state.model.train()
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for i, (x, y) in enumerate(data.batches(ds, recipe.batch_size, shuffle=True, augment=recipe.augment,
                                                seed=epoch_seed(data_seed, epoch), device=device)):
            for group in state.optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch + i / steps_per_epoch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = step_fn(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and cuda else x)
                loss = F.cross_entropy(logits.float(), y)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
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
                              "train_acc": correct.item() / len(ds)})
        bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3f}", acc=f"{state.history[-1]['train_acc']:.3f}")
        if checkpoint is not None:
            _save_checkpoint(state, checkpoint)
        if callback is not None:
            callback(state)
    bar.close()
    state.model = state.model.to(memory_format=torch.contiguous_format).eval()
    return state


def _save_checkpoint(state: TrainState, folder) -> None:
    opt_tensors, groups = optimizer_tensors(state.optimizer)
    cache.write_entry(folder, {"weights": state.model.state_dict(), "optimizer": opt_tensors},
                      {"model": state.model.config, "epoch": state.epoch, "param_groups": groups,
                       "history": state.history})


def _resume(state: TrainState, folder, device) -> TrainState:
    groups, meta = cache.read_entry(folder, ("weights", "optimizer"))
    cache.check_state_shapes(state.model, groups["weights"], str(folder))
    state.model.load_state_dict(groups["weights"])
    load_optimizer(state.optimizer, {k: v.to(device) for k, v in groups["optimizer"].items()}, meta["param_groups"])
    return TrainState(state.model, state.optimizer, meta["epoch"], meta["history"])


# ------------------------------------------------------------------------------------- cached models
def spawn_point(recipe: Recipe, epoch: int, parent_data_seed: int | None = None) -> dict:
    """Where a child branches off: after `epoch` epochs of the parent trained with `parent_data_seed`
    (epoch 0: the children share only the initialisation)."""
    if not 0 <= epoch < recipe.epochs:
        raise ValueError(f"spawn epoch must lie in 0..{recipe.epochs - 1}, got {epoch}")
    return {"epoch": epoch, "parent_data_seed": parent_data_seed if parent_data_seed is not None else 0}


def model_config(recipe: Recipe, init_seed: int, data_seed: int, spawn: dict | None = None,
                 stop_epoch: int | None = None) -> dict:
    """Everything that determines a trained model's weights; its hash is the model's cache key.
    `spawn` (from `spawn_point`) makes it a child; `stop_epoch` a parent stopped early."""
    return {"recipe": recipe.to_dict(), "init_seed": init_seed, "data_seed": data_seed, "spawn": spawn,
            "stop_epoch": stop_epoch}


def get_or_train(recipe: Recipe, init_seed: int = 0, data_seed: int = 0, *, spawn_epoch: int | None = None,
                 parent_data_seed: int | None = None, device=None, root=None) -> tuple[torch.nn.Module, dict]:
    """Load the model from the cache or train it. With `spawn_epoch=k`, the model is a child branched at
    epoch k from the parent (init_seed, parent_data_seed), continuing with its own `data_seed`."""
    device = torch.device(device or default_device())
    spawn = spawn_point(recipe, spawn_epoch, parent_data_seed) if spawn_epoch is not None else None
    config = model_config(recipe, init_seed, data_seed, spawn)
    key = cache.config_hash(config)
    folder = cache.entry_dir("models", key, root)
    if cache.has_entry(folder):
        return cache.load_model(folder, device)
    state = _parent_state(recipe, init_seed, spawn, device, root) if spawn else None
    state = train(recipe, init_seed=init_seed, data_seed=data_seed, state=state,
                  checkpoint=cache.entry_dir("runs", key, root), device=device)
    meta = {"config": config, "key": key, "history": state.history,
            "test": evaluate(state.model, dataset_on(recipe.dataset, "test", str(device))),
            "device": str(device), "torch": torch.__version__,
            "data": dataset_on(recipe.dataset, "train", str(device), recipe.train_subset).source}
    cache.save_model(folder, state.model, meta)
    cache.remove_entry(cache.entry_dir("runs", key, root))
    return cache.load_model(folder, device)


def _parent_state(recipe: Recipe, init_seed: int, spawn: dict, device, root) -> TrainState:
    """The spawn parent at epoch k (weights + optimizer), from the cache or trained once and stored."""
    config = model_config(recipe, init_seed, spawn["parent_data_seed"], stop_epoch=spawn["epoch"])
    folder = cache.entry_dir("parents", cache.config_hash(config), root)
    # The parent's epoch checkpoint *is* its cache entry: a finished parent is just resumed (no step
    # runs), an interrupted one continues to epoch k.
    return train(recipe, init_seed=init_seed, data_seed=spawn["parent_data_seed"], until=spawn["epoch"],
                 checkpoint=folder, device=device)
