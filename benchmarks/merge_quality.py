"""How good is a merge through features? A, B, their output ensemble, the weight average theta_alpha and
the feature merge (`llfc_core.merge.merge_by_features`), with B aligned to A and unaligned, on the test
set: error, loss, and agreement with the ensemble's predictions (`llfc_core.merge.merge_comparison`).

Pairs (trained once, then read from the model cache, $LLFC_CACHE):
  * MNIST MLP 3 x 128, two seeds, 5 epochs on a 10k training subset; B aligned by activation matching
    ('am'; `--align am,wm` adds weight matching); merge fitted on those 10k, tested on the 10k test set;
  * MNIST ResNet (width 1, one block per stage, BatchNorm; 1 input channel), two seeds, 2 epochs on a
    5k subset; B aligned by activation matching; merge and theta_alpha's BN reset on 500 samples of the
    training subset, tested on 2k test samples.

    LLFC_THREADS=2 python benchmarks/merge_quality.py               # both pairs
    LLFC_THREADS=2 python benchmarks/merge_quality.py --pairs mlp   # the MLP pair only

Measured from the cache with 2 threads on 2 cores shared with other jobs (load about 5): about 3 min (MLP
comparison 12-39 s, ResNet 136-154 s; the MLP's takes 5 s with 1 thread on a quieter machine). Training
the four models the first time adds about a minute.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch


def pair(recipe, device):
    from llfc_core.train import get_or_train

    (a, meta_a), (b, meta_b) = (get_or_train(recipe, seed, seed, device=device) for seed in (0, 1))
    return a.eval(), b.eval()


def compare(name, recipe, methods, device, fit_samples, batch_size, test_samples=None):
    from llfc_core import data
    from llfc_core.matching import AlignmentData, align
    from llfc_core.merge import merge_comparison
    from llfc_core.permutation import apply_permutation
    from llfc_core.train import dataset_on

    start = time.perf_counter()
    a, b = pair(recipe, device)
    trained = time.perf_counter() - start
    train_ds = dataset_on(recipe.dataset, "train", str(device), recipe.train_subset)
    fit = list(data.batches(train_ds.subset(fit_samples, seed=1), batch_size, device=device))
    test = list(data.batches(dataset_on(recipe.dataset, "test", str(device), test_samples), 1000, device=device))
    spec = a.permutation_spec()
    for method in methods:
        t0 = time.perf_counter()
        b_aligned = apply_permutation(b, spec, align(method, a, b, data=AlignmentData(batches=fit)).perms)
        frame = merge_comparison(a, b_aligned, b, fit, test)
        frame.insert(0, "alignment", method)
        with pd.option_context("display.width", 120, "display.precision", 4):
            print(f"\n== {name}: B aligned by {method!r} (fit on {fit_samples} training samples, "
                  f"test {sum(len(y) for _, y in test)}; models trained or loaded {trained:.0f} s, comparison "
                  f"{time.perf_counter() - t0:.0f} s)")
            print(frame.to_string(index=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="mlp,resnet", help="comma-separated: mlp, resnet (default both)")
    parser.add_argument("--align", default="am", help="comma-separated alignment methods for the MLP pair "
                        "(llfc_core.matching.ALIGNMENTS; default am; the ResNet pair always uses am)")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    if not set(pairs) <= {"mlp", "resnet"}:
        parser.error(f"unknown pairs {sorted(set(pairs) - {'mlp', 'resnet'})}")

    from llfc_core.recipes import Recipe
    from llfc_core.runtime import configure_threads, default_device

    threads = configure_threads()
    device = default_device()
    print(f"torch {torch.__version__}, device {device}, {threads} threads")
    start = time.perf_counter()
    if "mlp" in pairs:
        mlp = Recipe("bench-merge-mlp-mnist", "mnist",
                     {"arch": "mlp", "in_features": 784, "widths": [128, 128, 128], "num_classes": 10},
                     epochs=5, lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=128, schedule="triangle",
                     warmup_epochs=0.5, train_subset=10000)
        compare("MNIST MLP 3x128", mlp, tuple(args.align.split(",")), device, fit_samples=10000, batch_size=1000)
    if "resnet" in pairs:
        resnet = Recipe("bench-merge-resnet-mnist", "mnist",
                        {"arch": "resnet20", "width": 1, "norm": "bn", "in_channels": 1, "blocks_per_stage": 1},
                        epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="triangle",
                        warmup_epochs=0.3, train_subset=5000)
        compare("MNIST ResNet (width 1, 1 block/stage, BN)", resnet, ("am",), device, fit_samples=500,
                batch_size=250, test_samples=2000)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
