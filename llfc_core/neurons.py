"""The neuron cloud of a layer (Ferbach et al., AISTATS 2024): its second moment, its dimension, and how
far apart two networks' clouds are.

A linear op's neuron i is the row w_i of its weight (out x in; a conv's out x in*k*k) with its bias b_i.
Two norms, as in Ferbach et al.'s covariance-weighted weight matching:
  plain   ||w_i||^2
  Sigma   E[(w_i . z + b_i)^2] over the op's input z (a conv's k x k patches), i.e. the norm given by the
          augmented second moment M = E[(z, 1)(z, 1)^T]: the difference of two neurons in it is the mean
          squared gap of their pre-activations.
Dimension of a cloud: the participation ratio (sum lambda)^2 / sum lambda^2 of its second-moment
spectrum, plain from W^T W, Sigma from W~ M W~^T (W~ = [W | b]). It needs only tr(X) and ||X||_F^2, so
no eigendecomposition: (tr X)^2 / ||X||_F^2. It lies in [1, rank]: 1 for a cloud on a line, n for n
orthogonal directions of equal weight.

Issue #23 adds (see the block comment before `head_ops`): the clouds without the classifier head, their
centred participation ratio and intrinsic dimension (TwoNN, MLE: the optional extra `rate`), the exact
W2 between two clouds, the theory's rates, and synthetic clouds of known dimension to calibrate them on.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .models import MLP
from .taps import LINEAR_OPS



def store_input(bucket: dict, name: str):
    """A forward hook keeping a module's input of the current batch under `name`."""
    def hook(module, inputs, output):
        bucket[name] = inputs[0].detach()
    return hook


def patch_rows(module, h: torch.Tensor, max_rows: int):
    """The op's input as rows of vectors (conv: one row per sample and output position), in
    chunks of about `max_rows` rows so a wide conv's unfolded input never sits in memory whole."""
    if not isinstance(module, nn.Conv2d):
        yield h.flatten(1)
        return
    positions = F.unfold(h[:1], module.kernel_size, module.dilation, module.padding, module.stride).shape[-1]
    step = max(1, max_rows // positions)
    for i in range(0, h.shape[0], step):
        yield unfold_rows(module, h[i:i + step])


def unfold_rows(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """A conv's input as patch rows, one per sample and output position, in `weight.flatten(1)`'s column
    order (channel, then kernel position): conv(h) = rows @ weight.flatten(1).T, reshaped."""
    cols = F.unfold(h, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def linear_ops(model: nn.Module) -> dict[str, nn.Module]:
    """name -> Linear / Conv2d, in registration order (the forward order for the book's models)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_OPS)}


@torch.no_grad()
def input_moments(model: nn.Module, batches, max_rows: int = 1 << 16) -> dict[str, torch.Tensor]:
    """One streaming pass: per linear op, M = E[(z, 1)(z, 1)^T] (float64) of its input z, bias entry last."""
    ops = linear_ops(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(store_input(seen, n)) for n, m in ops.items()]
    sums: dict[str, torch.Tensor] = {}
    count = dict.fromkeys(ops, 0)
    try:
        model.eval()
        for x, _ in batches:
            model(x)
            for n, m in ops.items():
                for rows in patch_rows(m, seen[n], max_rows):
                    z = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
                    sums[n] = sums.get(n, 0) + (z.T @ z).double()  # products in model precision, sums float64
                    count[n] += len(rows)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("input_moments got no batches")
    return {n: sums[n] / count[n] for n in ops}


def augmented_weight(module: nn.Module) -> torch.Tensor:
    """[W | b] as (out, in * k * k + 1) float64 (b = 0 for an op without bias)."""
    w = module.weight.detach().double().flatten(1)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(len(w), dtype=w.dtype, device=w.device)
    return torch.cat([w, b[:, None]], 1)


def participation_ratio(x: torch.Tensor) -> float:
    """(tr X)^2 / ||X||_F^2 of a symmetric positive semi-definite X: (sum lambda)^2 / sum lambda^2."""
    x = x.double()
    return float(torch.trace(x) ** 2 / (x * x).sum().clamp_min(1e-300))


def neuron_dimensions(model: nn.Module, moments: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per linear op: the participation ratio of its neuron cloud in the plain norm (W^T W, weights only,
    as the spectrum of the cloud's second moment) and in the Sigma norm (W~ M W~^T with the op's own
    input moment `moments[op]`), with the op's fan-in and neuron count."""
    rows = []
    for name, m in linear_ops(model).items():
        # products in float32 (a ratio of two sums needs no more), the ratio itself in float64
        w = m.weight.detach().float().flatten(1)
        wt = augmented_weight(m).float()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # the same nonzero spectrum, the smaller side
        rows.append({"layer": name, "neurons": w.shape[0], "fan_in": w.shape[1],
                     "pr_plain": participation_ratio(gram),
                     "pr_sigma": participation_ratio(wt @ moments[name].to(wt.device, wt.dtype) @ wt.T)})
    return pd.DataFrame(rows)


def matching_distances(model_a: nn.Module, model_b: nn.Module, moments_a: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per linear op, how far B's neurons are from A's (B as given, e.g. already permuted), relative to A's:
    dist_plain = ||W~_A - W~_B||_F / ||W~_A||_F and dist_sigma = the same in A's input norm M_A,
    sqrt(tr(D M_A D^T) / tr(W~_A M_A W~_A^T)), D = W~_A - W~_B (the pre-activations' relative gap on A's inputs).
    For the best permutation this is the transport cost between the two clouds (Ferbach et al.)."""
    ops_b = linear_ops(model_b)
    rows = []
    for name, m in linear_ops(model_a).items():
        wa, wb = augmented_weight(m), augmented_weight(ops_b[name]).to(m.weight.device)
        d, mom = wa - wb, moments_a[name].to(wa.device, torch.float32)
        sq = [float(((v.float() @ mom).double() * v).sum()) for v in (d, wa)]  # v M v^T, product in float32
        rows.append({"layer": name, "dist_plain": float(d.norm() / wa.norm()),
                     "dist_sigma": max(sq[0], 0.0) ** 0.5 / max(sq[1], 1e-300) ** 0.5})
    return pd.DataFrame(rows)


# =====================================================================================================
# Clouds, their dimension and the transport between them (issue #23). Everything below is new; the
# functions above are unchanged (committed results depend on them).
#
# A layer's cloud is the set of its neurons' incoming weights, rows [w_i, b_i] (`augmented_weight`), for
# every linear op but the classifier head: the head's outputs are the logits, in a fixed order, so its
# neurons are not exchangeable and are no sample of anything (`head_ops`, `neuron_clouds`).
#
# Dimension of a cloud, three ways (`cloud_dimensions`):
#   pr_centred     participation ratio of the cloud's covariance (second moment minus the mean's outer
#                  product): the number of linear directions the cloud spreads along, d for an isotropic
#                  law on a d-dim subspace. It is not the dimension of the support: a circle has PR 2.
#   pr_uncentred   the same of the second moment E[x x^T] (the old `pr_plain`, with the bias column):
#                  a common mean dominates it, ~1 whatever the spread.
#   twonn, mle     intrinsic-dimension estimators of scikit-dimension (the optional extra `rate`):
#                  TwoNN (Facco et al. 2017) and Levina & Bickel's MLE (2004): the dimension of the
#                  support, from nearest-neighbour distances.
#
# Transport: `cloud_distance(x, y)`, the exact W2 between two clouds of m points with uniform weights:
# W2^2 = min over permutations pi of (1/m) sum_i ||x_i - y_pi(i)||^2 (an optimal coupling of two uniform
# measures on m points is a permutation: Birkhoff), by one linear assignment.
#
# The rate (`w2_rate`, `rate_slope`): for X_1..X_m, Y_1..Y_m i.i.d. from a law mu whose support has
# dimension d, E W2^2(mu_m, nu_m) (two samples; the one-sample E W2^2(mu_m, mu) has the same rate) is
#   regime 'regular' -- mu with a density bounded above and below on a d-dim cube, torus, or a smooth
#   compact d-dim manifold (a bi-Lipschitz image of one):
#       d = 1   m^-1                 Bobkov & Ledoux, Memoirs AMS 261 (2019) (1/(3(m + 1)) exactly for two
#                                    samples of U[0, 1]: `interval_w2_sq`)
#       d = 2   m^-1 log m           Ajtai, Komlos & Tusnady, Combinatorica 4 (1984); Ambrosio, Stra &
#                                    Trevisan, PTRF 173 (2019) (the constant); Bobkov & Ledoux, arXiv:1909.06193
#       d >= 3  m^(-2/d)             Talagrand, Ann. Probab. 22 (1994); Goldman & Trevisan, Probab. Math.
#                                    Phys. 2 (2021) (the limit of m^(2/d) E W2^2 exists for the cube)
#   regime 'general' -- any mu on R^d with enough moments: Fournier & Guillin, PTRF 162 (2015), Thm 1
#   with p = 2 (upper bounds, attained by some laws): m^-1/2 (d < 4), m^-1/2 log m (d = 4), m^(-2/d)
#   (d > 4); Weed & Bach, Bernoulli 25 (2019), Thm 1: W2 <~ m^(-1/s) for s > 2p = 4 above the upper
#   Wasserstein dimension, and >~ m^(-1/d_*) below the lower one.
# For W2 itself halve the exponent and the power of the log. Ferbach et al.'s m^(-1/d) for W2 is the
# regular rate for d >= 3 (for d = 2 up to a factor (log m)^(1/2)) and the general bound for d > 4; below
# d = 2 (regular) or d = 4 (general) the rate no longer depends on d, and -1/d overstates it.
# =====================================================================================================
RATE_EXTRA = "pip install 'llfc-core[rate]'  (or: pip install scikit-dimension)"
LAWS = ("cube", "gaussian", "torus")
REGIMES = ("regular", "general")


# ------------------------------------------------------------------------------------- clouds of a model
def head_ops(model: nn.Module, spec=None) -> list[str]:
    """The linear ops whose outputs no permutation of `spec` (default `model.permutation_spec()`) acts on:
    the classifier head, whose outputs are the logits. A model without a spec: its last linear op."""
    ops = linear_ops(model)
    if spec is None and hasattr(model, "permutation_spec"):
        spec = model.permutation_spec()
    if spec is None:
        return list(ops)[-1:]
    return [n for n in ops if spec.axes.get(f"{n}.weight", (None,))[0] is None]


def sigma_root(moment: torch.Tensor) -> torch.Tensor:
    """M^(1/2) of a symmetric PSD moment (float64; negative rounding noise clipped): rows r M^(1/2) have
    Euclidean distances equal to the Sigma distances sqrt((r - s) M (r - s)^T)."""
    vals, vecs = torch.linalg.eigh(moment.double())
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


@torch.no_grad()
def neuron_clouds(model: nn.Module, spec=None, moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per linear op but the head (`head_ops`), in forward order: its cloud, one row [w_i, b_i] per neuron,
    float64 on the CPU (a conv's w_i flattened: in * k * k entries). With `moments` (`input_moments`):
    the cloud in the Sigma norm instead, rows [w_i, b_i] M^(1/2) (`sigma_root`)."""
    heads = set(head_ops(model, spec))
    clouds = {}
    for name, m in linear_ops(model).items():
        if name in heads:
            continue
        rows = augmented_weight(m).cpu()
        clouds[name] = rows if moments is None else rows @ sigma_root(moments[name].cpu())
    return clouds


# ------------------------------------------------------------------------------------- dimension
def _as_cloud(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().double()
    if x.dim() != 2:
        raise ValueError(f"a cloud is a matrix, one point per row; got shape {tuple(x.shape)}")
    return x


def cloud_participation_ratio(cloud, centred: bool = True) -> float:
    """(sum lambda)^2 / sum lambda^2 over the spectrum of the cloud's covariance (`centred`) or of its
    second moment E[x x^T] (not centred). Rows are points. In [1, min(m - 1, n)] centred (a cloud of m
    points spans at most m - 1 directions about its mean); an isotropic law on a d-dim subspace gives d
    (up to O(d/m) sampling bias)."""
    x = _as_cloud(cloud)
    if centred:
        x = x - x.mean(0)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # the same nonzero spectrum, the smaller side
    return participation_ratio(gram)


def _skdim():
    try:
        import skdim
    except ImportError as e:
        raise ImportError("TwoNN and MLE intrinsic dimensions use scikit-dimension (import skdim), which is not "
                          f"installed: {RATE_EXTRA}") from e
    return skdim


def twonn_dimension(cloud, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio, Sci. Rep. 2017) by scikit-dimension:
    from the ratio of each point's second to first nearest-neighbour distance; the largest
    `discard_fraction` of ratios are left out (the estimator's default). Needs distinct points."""
    x = _as_cloud(cloud)
    if len(x) < 3:
        raise ValueError(f"TwoNN needs at least 3 points, got {len(x)}")
    return float(_skdim().id.TwoNN(discard_fraction=discard_fraction).fit(x.numpy()).dimension_)


def mle_dimension(cloud, k: int = 20) -> float:
    """Levina & Bickel's maximum-likelihood intrinsic dimension (NeurIPS 2004) by scikit-dimension, from
    each point's `k` nearest neighbours (20: the top of Levina & Bickel's suggested 10-20), the points'
    estimates combined by skdim's default 'mle' (MacKay & Ghahramani's mean of inverses)."""
    x = _as_cloud(cloud)
    if len(x) <= k + 1:
        raise ValueError(f"MLE with k = {k} neighbours needs more than {k + 1} points, got {len(x)}")
    return float(_skdim().id.MLE(K=k).fit(x.numpy(), n_jobs=1).dimension_)


ESTIMATORS = {"twonn": (twonn_dimension, 3), "mle": (mle_dimension, 22)}  # name -> (fn, fewest points)


def cloud_dimensions(model: nn.Module, spec=None, moments: dict[str, torch.Tensor] | None = None,
                     estimators: tuple = ()) -> pd.DataFrame:
    """Per linear op but the head: the dimension of its cloud of incoming weights [w_i, b_i]:
    `pr_centred` and `pr_uncentred` (`cloud_participation_ratio`), each of `estimators` ('twonn', 'mle':
    scikit-dimension, NaN for a cloud too small for it), and with `moments` the same in the Sigma norm
    (`pr_sigma_centred`, `<estimator>_sigma`), with the op's neuron count and fan-in (w_i's length)."""
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown:
        raise ValueError(f"unknown dimension estimators {sorted(unknown)}; choose from {sorted(ESTIMATORS)}")
    if estimators:
        _skdim()  # a missing extra is said before any work
    plain = neuron_clouds(model, spec)
    sigma = neuron_clouds(model, spec, moments) if moments is not None else {}
    rows = []
    for name, cloud in plain.items():
        row = {"layer": name, "neurons": cloud.shape[0], "fan_in": cloud.shape[1] - 1,
               "pr_centred": cloud_participation_ratio(cloud), "pr_uncentred": cloud_participation_ratio(cloud, False)}
        for e in estimators:
            fn, fewest = ESTIMATORS[e]
            row[e] = fn(cloud) if len(cloud) >= fewest else math.nan
        if name in sigma:
            row["pr_sigma_centred"] = cloud_participation_ratio(sigma[name])
            for e in estimators:
                fn, fewest = ESTIMATORS[e]
                row[f"{e}_sigma"] = fn(sigma[name]) if len(cloud) >= fewest else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- transport
def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for every pair of rows, float64."""
    x, y = _as_cloud(x), _as_cloud(y)
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def optimal_matching(x, y) -> torch.Tensor:
    """The permutation pi minimising sum_i ||x_i - y_pi(i)||^2 (one exact linear assignment,
    `matching.solve_assignment`): y[pi] is y in x's order."""
    return min_cost_assignment(squared_distances(x, y))


def min_cost_assignment(cost: torch.Tensor) -> torch.Tensor:
    """argmin_perm sum_i cost[i, perm[i]] (`matching.solve_assignment` on -cost)."""
    from .matching import solve_assignment  # the matching package imports this module

    return solve_assignment(-cost)


def cloud_distance(x, y, squared: bool = False, solver: str = "lap") -> float:
    """The exact 2-Wasserstein distance between the uniform measures on the rows of `x` and of `y` (m rows
    each, same width): W2^2 = min_pi (1/m) sum_i ||x_i - y_pi(i)||^2. `squared`: return W2^2.
    `solver`: 'lap' (`optimal_matching`: scipy's Jonker-Volgenant) or 'pot' (POT's network simplex,
    `ot.emd2`, the optional extra `rate`); they agree to rounding."""
    x, y = _as_cloud(x), _as_cloud(y)
    if x.shape != y.shape:
        raise ValueError(f"cloud_distance needs two clouds of the same size and width, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if solver == "lap":
        perm = optimal_matching(x, y)
        w2_sq = float(((x - y[perm]) ** 2).sum(1).mean())
    elif solver == "pot":
        try:
            import ot
        except ImportError as e:
            raise ImportError(f"solver='pot' uses POT (import ot), which is not installed: {RATE_EXTRA}") from e
        m = len(x)
        weights = np.full(m, 1.0 / m)
        w2_sq = float(ot.emd2(weights, weights, squared_distances(x, y).numpy(), numItermax=max(100_000, 50 * m * m)))
    else:
        raise ValueError(f"unknown solver {solver!r}; choose 'lap' or 'pot'")
    return w2_sq if squared else math.sqrt(w2_sq)


def layer_transport(model_a: nn.Module, model_b: nn.Module, spec=None) -> pd.DataFrame:
    """Per linear op but the head, B as given (e.g. aligned by `iwm`): w2_sq = (1/m) sum_i ||[w, b]_A,i -
    [w, b]_B,i||^2, its root w2, and w2_relative = w2 / the root mean square of A's rows. After `iwm` this
    is, layer by layer, the exact W2 between A's cloud and B's (B's input side in A's order): for the
    first layer the W2 between the two clouds (`cloud_distance`), for the next ones given the
    permutations below."""
    clouds_a, clouds_b = neuron_clouds(model_a, spec), neuron_clouds(model_b, spec)
    rows = []
    for name, a in clouds_a.items():
        w2_sq = float(((a - clouds_b[name]) ** 2).sum(1).mean())
        rms = float((a ** 2).sum(1).mean()) ** 0.5
        rows.append({"layer": name, "neurons": a.shape[0], "fan_in": a.shape[1] - 1, "w2_sq": w2_sq,
                     "w2": w2_sq ** 0.5, "w2_relative": w2_sq ** 0.5 / max(rms, 1e-300)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- the rate
def w2_rate(d: float, squared: bool = False, regime: str = "regular") -> tuple[float, float]:
    """(a, k) with E W2(mu_m, nu_m) ~ m^a (log m)^k for two samples of m points of a law whose support
    has dimension `d` (a real d, e.g. an estimate, is taken as is; the log appears only at the critical
    d), W2^2 with `squared`. regime 'regular' (density bounded above and below on a d-dim cube or
    compact manifold): a = -min(1/2, 1/d), k = 1/2 at d = 2; 'general' (Fournier & Guillin's upper
    bound, p = 2): a = -min(1/4, 1/d), k = 1/2 at d = 4. See the block comment above for the sources."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    if not d > 0:
        raise ValueError(f"a dimension must be positive, got {d}")
    critical, floor = (2.0, 0.5) if regime == "regular" else (4.0, 0.25)
    a, k = -min(floor, 1.0 / d), (0.5 if d == critical else 0.0)
    return (2 * a, 2 * k) if squared else (a, k)


def rate_slope(d: float, sizes, squared: bool = False, regime: str = "regular") -> float:
    """The slope a fitted log-log line through m^a (log m)^k (`w2_rate`) has over the sizes `sizes`: the
    theory's prediction for a slope fitted on that grid (a itself where k = 0; at d = 2, W2^2, m from
    64 to 2048: about -0.82, not -1)."""
    a, k = w2_rate(d, squared, regime)
    log_m = np.log(np.asarray(sizes, float))
    return float(np.polyfit(log_m, a * log_m + k * np.log(log_m), 1)[0])


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def fitted_rate(frame: pd.DataFrame, y: str = "w2_sq", x: str = "m") -> float:
    """`loglog_slope` of the mean of `y` over the rows sharing each `x` (seeds) against `x`."""
    means = frame.groupby(x)[y].mean()
    return loglog_slope(means.index, means.to_numpy())


def interval_w2_sq(m: int) -> float:
    """E W2^2 between two independent samples of m points of U[0, 1]: 1/(3(m + 1)) (the sorted matching,
    sum_i 2 Var U_(i) / m with Var U_(i) = i(m + 1 - i) / ((m + 1)^2 (m + 2)))."""
    return 1.0 / (3 * (m + 1))


# ------------------------------------------------------------------------------------- synthetic clouds
def orthonormal_basis(ambient: int, k: int, seed: int = 0) -> torch.Tensor:
    """`k` random orthonormal columns in R^ambient (float64), from `seed`."""
    if k > ambient:
        raise ValueError(f"cannot place {k} orthonormal directions in R^{ambient}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(ambient, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a unique (Haar) Q


def synthetic_cloud(m: int, d: int, law: str = "cube", ambient: int = 64, seed: int = 0, basis_seed: int = 0,
                    shift: float = 0.0) -> torch.Tensor:
    """m i.i.d. points (float64 rows) of a law on R^ambient whose support has dimension d:
      cube      uniform on [0, 1]^d (covariance I/12: centred PR d; mean (1/2, ...): uncentred PR < 2)
      gaussian  standard normal in d dims (centred PR d)
      torus     uniform on the flat torus R^d / Z^d, embedded by u -> (cos 2 pi u, sin 2 pi u) / (2 pi) in
                R^2d (the Clifford torus: locally isometric, no boundary; it spans 2d directions, so
                its centred PR is 2d while its dimension is d)
    placed in R^ambient by orthonormal columns (`orthonormal_basis`, from `basis_seed` only: two clouds
    with different `seed` are two samples of the same law), plus `shift` times a fixed unit vector."""
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; choose from {LAWS}")
    span = 2 * d if law == "torus" else d
    g = torch.Generator().manual_seed(seed)
    if law == "gaussian":
        z = torch.randn(m, d, generator=g, dtype=torch.float64)
    else:
        z = torch.rand(m, d, generator=g, dtype=torch.float64)
        if law == "torus":
            z = torch.cat([torch.cos(2 * math.pi * z), torch.sin(2 * math.pi * z)], 1) / (2 * math.pi)
    basis = orthonormal_basis(ambient, span + 1, basis_seed)
    return z @ basis[:, :span].T + shift * basis[:, span]


def transport_curve(d: int, law: str = "cube", sizes=(64, 128, 256, 512, 1024, 2048), seeds: int = 4,
                    ambient: int = 64) -> pd.DataFrame:
    """W2^2 between two independent clouds (`synthetic_cloud`, seeds 2s and 2s + 1) for each m in `sizes`
    and s < `seeds`: rows (law, d, m, seed, w2_sq). `fitted_rate` on it is the measured slope."""
    rows = [{"law": law, "d": d, "m": m, "seed": s,
             "w2_sq": cloud_distance(synthetic_cloud(m, d, law, ambient, 2 * s), synthetic_cloud(m, d, law, ambient, 2 * s + 1),
                                     squared=True)}
            for m in sizes for s in range(seeds)]
    return pd.DataFrame(rows)


def flat_torus_transport_curve(d: int, sizes=(64, 128, 256, 512, 1024), seeds: int = 4) -> pd.DataFrame:
    """W2^2 between two samples of the uniform law on the flat torus R^d / Z^d in its own (periodic) metric:
    no boundary (the cube's steepens finite-m slopes) and no curvature (the embedded `torus` law's flattens
    them), so the theory's rate m^(-2/d) (d >= 3) holds there without a shape correction. Rows (law, d, m,
    seed, w2_sq), like `transport_curve`."""
    rows = []
    for m in sizes:
        for s in range(seeds):
            g = torch.Generator().manual_seed(10_000 + 2 * s)
            x, y = torch.rand(m, d, generator=g, dtype=torch.float64), torch.rand(m, d, generator=g, dtype=torch.float64)
            cost = torch.zeros(m, m, dtype=torch.float64)
            for k in range(d):  # per coordinate, the shorter way round
                gap = (x[:, k, None] - y[None, :, k]).abs()
                cost += torch.minimum(gap, 1 - gap) ** 2
            perm = min_cost_assignment(cost)
            rows.append({"law": "flat_torus", "d": d, "m": m, "seed": s, "w2_sq": float(cost[torch.arange(m), perm].mean())})
    return pd.DataFrame(rows)


def init_transport(in_features: int, widths=(64, 128, 256, 512, 1024, 2048), seeds: int = 4,
                   num_classes: int = 10) -> pd.DataFrame:
    """Networks at initialisation: W2^2 between the first-layer clouds [w_i, b_i] of two independently
    initialised one-hidden-layer MLPs (`models.MLP`, PyTorch's default init, seeds 2s and 2s + 1) of each
    width m. That init draws every entry of [w_i, b_i] from U(-1/sqrt(in), 1/sqrt(in)): the rows are
    i.i.d. uniform on a cube of dimension d = in_features + 1 (the `cube` law, scaled), so the rate is the
    synthetic cube's at that d. Rows (in_features, d, m, seed, w2_sq); the global RNG is left as it was."""
    def first_layer(width: int, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MLP(in_features=in_features, widths=(int(width),), num_classes=num_classes)
        return neuron_clouds(net)["fc1"]

    rows = [{"in_features": in_features, "d": in_features + 1, "m": m, "seed": s,
             "w2_sq": cloud_distance(first_layer(m, 2 * s), first_layer(m, 2 * s + 1), squared=True)}
            for m in widths for s in range(seeds)]
    return pd.DataFrame(rows)
