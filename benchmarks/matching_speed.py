"""Weight matching: our implementation vs a straightforward reference (every step rebuilds the whole
cost matrix from freshly permuted tensors, as in the published ports), same models, same seed, one run.
Both are the same algorithm, so the final objectives must agree. The last line is
`resnet20x32 wm seconds: <N>`.

    python benchmarks/matching_speed.py          # ours on all models, the reference up to ResNet-20 x4 (<= 5 min)
    python benchmarks/matching_speed.py --full   # the reference on every model (x32: 2 more minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import time

import torch

from llfc_core.matching import weight_matching
from llfc_core.models import build_model
from llfc_core.reference import weight_matching_naive
from llfc_core.runtime import configure_threads, default_device

MODELS = [
    ("mlp 3x512", {"arch": "mlp", "in_features": 784, "widths": [512, 512, 512]}, 1),
    ("vgg16", {"arch": "vgg16", "norm": "bn"}, 1),
    ("resnet20x1", {"arch": "resnet20", "width": 1, "norm": "ln"}, 1),
    ("resnet20x4", {"arch": "resnet20", "width": 4, "norm": "ln"}, 4),
    ("resnet20x16", {"arch": "resnet20", "width": 16, "norm": "ln"}, 16),
    ("resnet20x32", {"arch": "resnet20", "width": 32, "norm": "ln"}, 32),
]


def pair(config, device):
    """Two independently initialised networks: the harder case for matching (nothing to recover)."""
    torch.manual_seed(0)
    a = build_model(config).to(device)
    torch.manual_seed(1)
    b = build_model(config).to(device)
    return a.permutation_spec(), a.state_dict(), b.state_dict()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-reference-above", type=int, default=4, help="largest ResNet width for the reference")
    parser.add_argument("--full", action="store_true", help="the reference on every model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.full:
        args.skip_reference_above = 32
    threads = configure_threads(args.threads)
    device = default_device()
    print(f"device {device}, torch {torch.__version__}, {threads} CPU threads")
    print(f"{'model':12s} {'params':>8s} {'ours s':>8s} {'sweeps':>6s} {'reference s':>12s} {'speedup':>8s}  objective (ours / reference)")
    ours_x32 = float("nan")
    for name, config, width in MODELS:
        spec, sa, sb = pair(config, device)
        params = sum(v.numel() for v in sa.values()) / 1e6
        result, t_ours = timed(lambda: weight_matching(spec, sa, sb, seed=0))
        if width <= args.skip_reference_above:
            (perms, history), t_ref = timed(lambda: weight_matching_naive(spec, sa, sb, seed=0))
            same = all(torch.equal(perms[p].cpu(), result.perms[p]) for p in perms)
            ref = f"{t_ref:12.2f} {t_ref / t_ours:7.1f}x  {result.objective[-1]:.6g} / {history[-1]:.6g}" + \
                  ("  (same permutations)" if same else "  (DIFFERENT permutations)")
        else:
            ref = f"{'skipped':>12s} {'':>8s}  {result.objective[-1]:.6g}"
        print(f"{name:12s} {params:7.1f}M {t_ours:8.2f} {result.sweeps:6d} {ref}", flush=True)
        if name == "resnet20x32":
            ours_x32 = t_ours
        del spec, sa, sb
    print(f"resnet20x32 wm seconds: {ours_x32:.2f}")


if __name__ == "__main__":
    main()
