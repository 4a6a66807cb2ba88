"""Peak host memory and time of the streaming layer metrics (LLFC + both conditions, three alphas) on
VGG-16 over the CIFAR-10 test set (10k), against a materialising reference (stack every feature, then
compute) on a subset where it fits; checks that both give the same numbers. Last line: `peak_rss_gb: <N>`.

The two networks are full-width VGG-16 (BatchNorm) at initialisation with statistics measured on
training data: memory and agreement do not depend on training, and the script trains nothing.

    python benchmarks/metrics_memory.py          # 2,000 test samples: about 2 min on 2 cores (<= 5 min)
    python benchmarks/metrics_memory.py --full   # the whole test set (10k): about 6 min alone on 2 cores

Memory that does not grow with the number of samples shows at 2,000 as well as at 10,000: the
streaming peak is compared with the peak for a single batch.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB


def models(device):
    from llfc_core import data
    from llfc_core.interpolate import reset_bn
    from llfc_core.models import build_model

    calib = list(data.batches(data.load("cifar10", "train").subset(1000, 0), 250, device=device))
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(reset_bn(build_model({"arch": "vgg16", "norm": "bn"}).to(device), calib))
    return out


def streaming(samples: int, batch: int) -> None:
    """Child process: the streaming pass alone, so its peak RSS is its own."""
    from llfc_core import data
    from llfc_core.metrics import layer_metrics
    from llfc_core.runtime import default_device

    device = default_device()
    a, b = models(device)
    test = data.load("cifar10", "test").subset(samples, 0)
    start = time.perf_counter()
    out = layer_metrics(a, b, data.batches(test, batch, device=device))
    seconds = time.perf_counter() - start
    print(f"RESULT {seconds:.1f} {peak_rss_gb():.3f} {len(out['llfc'])} {out['llfc'].cos_dist.mean():.6f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--full", action="store_true", help="the whole CIFAR-10 test set (10,000 samples)")
    parser.add_argument("--reference-samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.samples = 10000
    from llfc_core.runtime import configure_threads

    configure_threads()
    if args.child:
        streaming(args.samples, args.batch)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def child(samples):
        done = subprocess.run([sys.executable, __file__, "--child", "--samples", str(samples), "--batch",
                               str(args.batch)], capture_output=True, text=True, check=True)
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
        seconds, rss, rows, mean = line.split()[1:]
        return float(seconds), float(rss)

    base_s, base_rss = child(args.batch)  # one batch: the fixed cost (interpreter, torch, data, models)
    full_s, full_rss = child(args.samples)
    print(f"streaming, {args.batch} samples:   {base_s:7.1f} s, peak RSS {base_rss:.2f} GB")
    print(f"streaming, {args.samples} samples: {full_s:7.1f} s, peak RSS {full_rss:.2f} GB "
          f"(growth over one batch: {full_rss - base_rss:+.2f} GB)")

    # Agreement and the reference's memory, on a subset where materialising fits.
    from llfc_core import data
    from llfc_core.metrics import layer_metrics
    from llfc_core.reference import layer_metrics_materialised

    a, b = models("cpu")
    x = torch.cat([xb for xb, _ in data.batches(data.load("cifar10", "test").subset(args.reference_samples, 0), 100)])
    before = peak_rss_gb()
    start = time.perf_counter()
    ref = layer_metrics_materialised(a, b, x)
    ref_s, ref_rss = time.perf_counter() - start, peak_rss_gb()
    fast = layer_metrics(a, b, [(x[i:i + 50], None) for i in range(0, len(x), 50)])
    worst = 0.0
    for _, row in fast["llfc"].iterrows():
        for col in ("cos_dist", "cos_dist_baseline", "scale_c", "thm1_dist"):
            e = ref["llfc"][(row.layer, row.alpha)][col]
            worst = max(worst, abs(row[col] - e) / max(abs(e), 1e-12))
    cond = fast["conditions"]
    for _, row in cond[cond.kind == "relu"].iterrows():
        e = ref["sigma"][(row.layer, row.alpha)]
        worst = max(worst, abs(row.dist_sigma - e) / max(abs(e), 1e-12))
    for _, row in cond[cond.kind == "linear"].iterrows():
        for col in ("dist_com", "dist_w", "dist_h"):
            e = ref["com"][row.layer][col]
            worst = max(worst, abs(row[col] - e) / max(abs(e), 1e-12))
    per_sample = max(ref_rss - before, 1e-9) / args.reference_samples
    print(f"reference, {args.reference_samples} samples: {ref_s:7.1f} s, peak RSS {ref_rss:.2f} GB "
          f"(+{ref_rss - before:.2f} GB, {per_sample * 1024:.1f} MB per sample)")
    print(f"reference extrapolated to {args.samples} samples: {per_sample * args.samples:.1f} GB "
          f"= {per_sample * args.samples / max(full_rss, 1e-9):.0f}x the streaming peak")
    print(f"largest relative difference streaming vs reference: {worst:.2e} ({'ok' if worst <= 1e-6 else 'ABOVE 1e-6'})")
    print(f"peak_rss_gb: {full_rss:.2f}")


if __name__ == "__main__":
    main()
