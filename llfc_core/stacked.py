"""Training replicates together: independent networks of one architecture and recipe trained as one batched
computation (`torch.func.stack_module_state` + `torch.func.vmap`), so that a small model fills a big GPU.

Each network is trained as `train.train` would train it alone: its own init seed, data order and augmentation
(its own `data.batches` stream of each epoch), the recipe's learning rate at each step, and its own optimizer
state (SGD's and AdamW's updates are elementwise, so one update of the stacked parameters is every network's
own). The sum of the networks' mean losses has each network's own gradient in its slice. The numbers are not
bit-identical to one-by-one training: a batched matrix product sums in another order than a single one, and
training carries those last-bit differences along (`tests/test_train.py` bounds them).

Supported: MLPs (no BatchNorm running statistics, no dropout masks, which vmap would draw differently) in
fp32 with the recipe's SGD or AdamW; anything else is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from . import data
from .recipes import Recipe
from .runtime import default_device, training_precision
from .train import TrainingDiverged, TrainState, epoch_seed, new_state, optimizer_for, training_data


def check_stackable(recipe: Recipe, precision: str) -> None:
    """Refuse what stacked training does not reproduce."""
    if recipe.model.get("arch") != "mlp":
        raise ValueError(f"stacked training supports MLPs (no BatchNorm running statistics, no dropout); recipe "
                         f"{recipe.name!r} is a {recipe.model.get('arch')}: train it with train.train, one by one")
    if precision != "fp32":
        raise ValueError(f"stacked training runs in fp32 only; recipe {recipe.name!r} resolves to {precision} here: "
                         "set precision='fp32' (or $LLFC_PRECISION=fp32), or train with train.train")


def train_stacked(recipe: Recipe, seeds: list[tuple[int, int]], *, until: int | None = None,
                  device=None) -> list[TrainState]:
    """Train one network per (init_seed, data_seed) of `seeds` together, from fresh inits up to epoch `until`
    (default: all). Returns their `TrainState`s in the order of `seeds`, each as `train.train(recipe,
    init_seed=..., data_seed=..., until=until)` would return it: weights, optimizer state and history."""
    device = torch.device(device or default_device())
    check_stackable(recipe, training_precision(device, recipe.precision))
    if not seeds:
        raise ValueError("train_stacked needs at least one (init_seed, data_seed) pair")
    until = recipe.epochs if until is None else until
    states = [new_state(recipe, init_seed, device) for init_seed, _ in seeds]
    params, buffers = stack_module_state([s.model for s in states])  # leaves with a leading network axis
    optimizer = optimizer_for(recipe, params.values())
    step = _batched_step(copy.deepcopy(states[0].model).to("meta"))
    ds = training_data(recipe, device)
    steps_per_epoch = -(-len(ds) // recipe.batch_size)
    for epoch in range(until):
        loss_sum, correct = torch.zeros(len(seeds), device=device), torch.zeros(len(seeds), device=device)
        streams = [data.batches(ds, recipe.batch_size, shuffle=True, augment=recipe.augment,
                                seed=epoch_seed(data_seed, epoch), device=device) for _, data_seed in seeds]
        for i, batch in enumerate(zip(*streams)):
            x, y = (torch.stack(t) for t in zip(*batch))  # (networks, batch, ...)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch + i / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            losses, logits = step(params, buffers, x, y)
            losses.sum().backward()
            optimizer.step()
            loss_sum += losses.detach() * y.shape[1]
            correct += (logits.argmax(-1) == y).sum(1)
            if i % 50 == 0 and not torch.isfinite(loss_sum).all():  # as train.train: a sync every 50 steps
                break
        if not torch.isfinite(loss_sum).all():
            bad = [seeds[r] for r in torch.nonzero(~torch.isfinite(loss_sum)).flatten().tolist()]
            raise TrainingDiverged(f"{recipe.name}: the loss of (init_seed, data_seed) {bad} became non-finite in "
                                   f"epoch {epoch + 1}; lower the learning rate.")
        for s, loss, right in zip(states, loss_sum.tolist(), correct.tolist()):  # one read per epoch, as train.train
            s.epoch = epoch + 1
            s.history.append({"epoch": s.epoch, "train_loss": loss / len(ds), "train_acc": right / len(ds)})
    for r, s in enumerate(states):
        _unstack(s, r, params, optimizer)
    return states


def _batched_step(skeleton: torch.nn.Module):
    """(stacked parameters, buffers, x, y) -> (each network's mean loss, its logits), vmapped over networks."""
    def one(p, b, x, y):
        logits = functional_call(skeleton, (p, b), (x,))
        return F.cross_entropy(logits.float(), y), logits
    return vmap(one)


@torch.no_grad()
def _unstack(state: TrainState, r: int, params: dict, optimizer: torch.optim.Optimizer) -> None:
    """Network r's slice of the stacked parameters and optimizer state, into its own model and optimizer."""
    own = dict(state.model.named_parameters())
    for name, stacked in params.items():
        own[name].copy_(stacked[r])
        state.optimizer.state[own[name]] = {k: _slice(v, r, stacked.shape) for k, v in optimizer.state[stacked].items()}
    for group in state.optimizer.param_groups:
        group["lr"] = optimizer.param_groups[0]["lr"]
    state.model.eval()


def _slice(value, r: int, stacked_shape):
    """Network r's part of one optimizer state entry: a per-parameter tensor is sliced; a shared one (AdamW's
    step counter) is copied; anything else is kept."""
    if not torch.is_tensor(value):
        return value
    return (value[r] if value.shape == stacked_shape else value).clone()
