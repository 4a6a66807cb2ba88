"""Commutativity matching: today's descent against the full search (`search="full"`), on small trained MNIST
MLPs (3 x 64 and 3 x 128, two pairs each, 2 epochs on a 10,000-image subset; trained once and cached).
For identity, WM, AM, descent CM and full CM: the CM objective on the training batches it was fitted on
and on held-out test batches, and the seconds each took (full CM's include the descent it starts with).
Training uses LLFC_THREADS; the alignments run on `--search-threads` (default 1): their matrices are at most
128 wide, where a second thread buys little and, on 2 cores shared with another process, costs 15-30x
(README; measured here: 3 x 64 full CM 6 s on one thread, 113 s on two while another job ran).

    LLFC_THREADS=2 python benchmarks/cm_search.py            # <= 5 min on 2 cores, training included
    python benchmarks/cm_search.py --widths 64 --pairs 1      # quicker
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace

import torch

from llfc_core import data
from llfc_core.matching import activation_matching, commutativity_matching, commutativity_moments, weight_matching
from llfc_core.matching.commutativity import commutativity_objective, commutativity_objectives
from llfc_core.permutation import identity_perms
from llfc_core.recipes import get_recipe
from llfc_core.runtime import configure_threads, default_device
from llfc_core.train import dataset_on, get_or_train


def recipe_for(width: int):
    return replace(get_recipe("cpu-mlp-mnist"), name=f"cm-search-mlp{width}", epochs=2, train_subset=10_000,
                   model={"arch": "mlp", "in_features": 784, "widths": [width] * 3, "num_classes": 10})


def first_batches(ds, n: int, batch_size: int = 500) -> list:
    return list(itertools.islice(data.batches(ds, batch_size), n // batch_size))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(a, b, train, held_out) -> list[tuple[str, float, float, float]]:
    """(method, train objective, held-out objective, seconds) for each alignment of b to a."""
    spec = a.permutation_spec()
    moments, t_moments = timed(lambda: commutativity_moments(a, b, spec, train))
    found = {"identity": (identity_perms(spec.sizes(a.state_dict())), 0.0)}
    found["wm"] = timed(lambda: weight_matching(spec, a.state_dict(), b.state_dict()).perms)
    found["am"] = timed(lambda: activation_matching(a, b, spec, train).perms)
    for search in ("descent", "full"):
        result, seconds = timed(lambda: commutativity_matching(a, b, spec, train, op_moments=moments, search=search))
        found[f"cm {search}"] = (result.perms, seconds + t_moments)  # CM's statistics pass counts as CM's
    held = commutativity_objectives(a, b, spec, held_out, {k: perms for k, (perms, _) in found.items()})
    return [(k, commutativity_objective(moments, perms), held[k], s) for k, (perms, s) in found.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--pairs", type=int, default=2, help="independently trained pairs per width")
    parser.add_argument("--samples", type=int, default=2000, help="training (and held-out) images for the moments")
    parser.add_argument("--threads", type=int, default=None, help="training threads (default: LLFC_THREADS)")
    parser.add_argument("--search-threads", type=int, default=1, help="threads for the alignments")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    device = default_device()
    print(f"device {device}, torch {torch.__version__}, {threads} CPU threads for training, "
          f"{args.search_threads} for the alignments")
    start = time.perf_counter()
    for width in args.widths:
        recipe = recipe_for(width)
        train = first_batches(dataset_on("mnist", "train", str(device), recipe.train_subset), args.samples)
        held_out = first_batches(dataset_on("mnist", "test", str(device)), args.samples)
        for pair in range(args.pairs):
            (a, meta_a), t_a = timed(lambda: get_or_train(recipe, 2 * pair, 2 * pair, device=device))
            (b, meta_b), t_b = timed(lambda: get_or_train(recipe, 2 * pair + 1, 2 * pair + 1, device=device))
            acc = "/".join(f"{1 - m['test']['error']:.3f}" for m in (meta_a, meta_b))
            print(f"\nmlp 3x{width}, pair {pair} (seeds {2 * pair}, {2 * pair + 1}; test accuracy {acc}; "
                  f"trained or loaded in {t_a + t_b:.0f} s)")
            print(f"  {'method':10s} {'train':>9s} {'held-out':>9s} {'vs AM train':>11s} {'vs AM held':>10s} "
                  f"{'seconds':>8s}")
            torch.set_num_threads(args.search_threads)
            rows = compare(a, b, train, held_out)
            torch.set_num_threads(threads)
            am = next(r for r in rows if r[0] == "am")
            for name, tr, ho, s in rows:
                print(f"  {name:10s} {tr:9.4f} {ho:9.4f} {100 * (tr / am[1] - 1):+10.2f}% "
                      f"{100 * (ho / am[2] - 1):+9.2f}% {s:8.2f}", flush=True)
    print(f"\ntotal seconds: {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
