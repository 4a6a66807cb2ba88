"""Replicates trained together (`llfc_core.stacked.train_stacked`, vmap over networks) against one by one
(`train.train`): wall seconds for R MLPs of one recipe, and the largest weight difference between the two.
The difference starts as float rounding (batched products sum in another order) but training can amplify it:
with this Adam recipe one replicate of three drifts to ~2e-3 within 16 steps on the CPU, exactly as the same
network drifts from itself when its batches are merely split in two (`training_step(micro_batch=250)`).
On a GPU a small MLP leaves the device idle, so the stacked run should take about the time of one; on a CPU
the cores are busy either way and the ratio is ~1 (measured: 0.99x, 3 replicates, 1 thread).

    python benchmarks/stacked_training.py                # 3 x Git Re-Basin's MNIST MLP, 1 epoch on 10k images
    python benchmarks/stacked_training.py --replicates 8 --full   # all 60k images

The last line is `speedup: <N>x` (one by one / together). Stacked training runs in fp32 only, so both do.
"""
from __future__ import annotations

import argparse
import time

import torch

from llfc_core.recipes import get_recipe
from llfc_core.runtime import configure_threads, default_device
from llfc_core.stacked import train_stacked
from llfc_core.train import train, training_data


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="all 60k training images")
    args = parser.parse_args()
    configure_threads()
    device = default_device()
    recipe = get_recipe("rebasin-mlp-mnist", epochs=1, precision="fp32", train_subset=None if args.full else 10_000)
    seeds = [(r, r) for r in range(args.replicates)]
    training_data(recipe, device)  # load the data before timing
    train_stacked(recipe, seeds[:1], until=1, device=device)  # warm-up (vmap's first trace)
    together, t_stacked = timed(lambda: train_stacked(recipe, seeds, device=device), device)
    alone, t_alone = timed(lambda: [train(recipe, init_seed=i, data_seed=d, device=device) for i, d in seeds], device)
    diff = max((v - a.model.state_dict()[k]).abs().max().item()
               for s, a in zip(together, alone) for k, v in s.model.state_dict().items())
    print(f"{device}, {args.replicates} x {recipe.name}, 1 epoch on {len(training_data(recipe, device))} images")
    print(f"one by one {t_alone:.2f} s, together {t_stacked:.2f} s; largest weight difference {diff:.1e}")
    print(f"speedup: {t_alone / t_stacked:.2f}x")


if __name__ == "__main__":
    main()
