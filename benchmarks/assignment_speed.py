"""The linear assignment solver behind `matching.solve_assignment`: scipy's `linear_sum_assignment` against
`lap.lapjv`, both Jonker-Volgenant, on random float64 cost matrices (maximisation), n = 256 ... 2048.
Prints one row per size: the best-of-`--repeats` seconds of each, scipy / lap, and whether both reach the
same optimal total (they must, to 1e-9 relative). One thread; well under a minute on 2 cores.

    LLFC_THREADS=1 python benchmarks/assignment_speed.py

Decision: `solve_assignment` would use lap only if it were at least 1.3x faster at n >= 1024. It is not, so
it keeps scipy and the project adds no dependency. Measured on 2 shared cores, one thread, best of 5
(lap 0.5.13, scipy 1.17.1, numpy 2.4.6):

         n   scipy s     lap s  scipy/lap  same optimum
       256    0.0022    0.0010       2.11  True
       512    0.0098    0.0120       0.82  True
      1024    0.0381    0.0483       0.79  True
      2048    0.2752    0.3978       0.69  True

lap wins only where both take about a millisecond; from n = 512 on scipy's C++ Jonker-Volgenant is faster.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

SIZES = (256, 512, 1024, 2048)


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def scipy_max(cost: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(cost, maximize=True)[1]


def lap_max(cost: np.ndarray) -> np.ndarray:
    import lap

    return lap.lapjv(-cost, return_cost=False)[0]  # lapjv minimises: maximise by negating


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import lap  # noqa: F401
    except ImportError:
        raise SystemExit("lap is not installed: pip install lap")
    rng = np.random.default_rng(0)
    print(f"{'n':>6s} {'scipy s':>9s} {'lap s':>9s} {'scipy/lap':>10s}  same optimum")
    for n in SIZES:
        cost = rng.standard_normal((n, n))
        t_scipy, cols_scipy = best_time(lambda: scipy_max(cost), args.repeats)
        t_lap, cols_lap = best_time(lambda: lap_max(cost), args.repeats)
        rows = np.arange(n)
        v_scipy, v_lap = cost[rows, cols_scipy].sum(), cost[rows, cols_lap].sum()
        same = abs(v_scipy - v_lap) <= 1e-9 * max(1.0, abs(v_scipy))
        print(f"{n:6d} {t_scipy:9.4f} {t_lap:9.4f} {t_scipy / t_lap:10.2f}  {same} ({v_scipy:.9g} / {v_lap:.9g})")


if __name__ == "__main__":
    main()
