"""Merging two networks through their features, and how a model agrees with the output ensemble.

The LLFC paper's "feature averaging" direction, done as a merge rather than as a check: build one
network of the architecture of A and B whose every linear op reproduces, as well as one linear map can,
the alpha-average of A's and B's outputs of that op.

`merge_by_features(A, B, batches)` fits the linear ops (nn.Linear / nn.Conv2d) one at a time in forward
order (`llfc_core.taps.find_taps`). Op k is fitted in closed form by ridge least squares

    min_{W, b}  sum_rows || W z + b - (alpha y_A + (1 - alpha) y_B) ||^2  +  lam ||W||_F^2,
    lam = ridge * tr(Z^T Z) / dim(z)      (relative to the mean diagonal of the Gram matrix; b is not penalised)

where z runs over the inputs that the *merged* network itself (ops 1..k-1 already fitted) produces at op
k on the fitting data - a conv's k x k patches, one row per sample and output position - and y_A, y_B
are A's and B's outputs of that op on the same samples. Fitting on the merged network's own inputs lets
each op absorb the errors of the ops before it. The sums Z^T Z, Z^T Y (and the bias sums) are streamed in
float64 (products too), the conv patches unfolded a few samples at a time, so memory does not grow with
the data; each op takes one pass over `batches` (3 partial forward passes per batch: the merged
network up to op k, A and B up to op k's target).

B must already be aligned to A (permuted with `llfc_core.matching.align` + `apply_permutation`): the
target averages A's unit i with B's unit i, which is only meaningful when they compute the same feature.

Norm layers:
  * BatchNorm (eval mode) directly after an op: the op is fitted to the average of A's and B's *BN
    outputs*, and the merged BN is set to the identity plus the fitted intercept (weight 1, running mean
    0, running var 1 - eps, bias = the intercept when the op has no bias of its own - the book's convs
    before BN have none - else 0). That is exactly the identity in eval mode, which is checked on a probe
    input each time. The merged network is meant for evaluation: training it again (BN in train mode)
    renormalises with batch statistics and changes the function.
  * GroupNorm / LayerNorm / InstanceNorm / LocalResponseNorm are refused: they normalise each sample by
    statistics of the op's own output, so no linear fit reaches their output and they cannot be set to
    the identity. Neither can functional normalisations in a model's forward (not detectable; not used by
    the book's models).
Residual blocks need nothing special: each op (and its BN) targets the average of A's and B's outputs of
*that* op, so a sum of branches targets the average of A's and B's sums.

`ensemble_agreement(X, A, B, batches)`: per-sample agreement of X's predictions with the output
ensemble argmax(alpha softmax(A) + (1 - alpha) softmax(B)), with X's error and loss. The ensemble is the
*probability* average (a mixture of the two predictive distributions): its log is a proper
log-probability, so its loss is the mixture's cross-entropy, and it does not depend on how A's and B's
logits are shifted or scaled against each other. (The logit average is theta_alpha's LLFC target at the
last layer; `llfc_core.probes.feature_averaging` reports agreement with that one; pass
ensemble="logits" here for it.)

`merge_comparison(...)`: A, B, the output ensemble, theta_alpha and the feature merge (with and without
alignment) on test data: error, loss, agreement with the ensemble.
"""
from __future__ import annotations

import copy
import itertools
import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .interpolate import corrected_interpolation, has_batchnorm
from .neurons import unfold_rows
from .taps import LINEAR_OPS, find_taps, probe_forward
from .permutation import check_same_architecture

BATCHNORMS = nn.modules.batchnorm._BatchNorm
# Per-sample normalisations: no linear fit reaches their output, and no setting makes them the identity.
SAMPLE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
ENSEMBLES = ("probs", "logits")


class MergeError(ValueError):
    """The models cannot be merged through their features (unsupported layers, bad data)."""


# --------------------------------------------------------------------------------------- validation
def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        raise ValueError(f"alpha must lie in [0, 1] (1 is A, 0 is B), got {alpha}")
    return alpha


def _check_finite(model: nn.Module, label: str) -> None:
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"model {label} has NaN or infinite values in {key!r}; refusing to merge it")


def _first_batch(batches, *, reiterable: bool):
    """(the first (x, y) of `batches`, an iterable over all of them, the first included); ValueError
    when there is none, or when a one-shot iterator is given where several passes are needed."""
    if reiterable and iter(batches) is batches:
        raise ValueError("batches must be re-iterable (a list of (x, y), or an object whose __iter__ starts "
                         "over): the merge reads them once per linear op; got a one-shot iterator")
    it = iter(batches)
    for first in it:
        return first, (batches if reiterable else itertools.chain([first], it))
    raise ValueError("batches is empty: there is no data to fit or evaluate on")


def _check_structure(model: nn.Module) -> None:
    """Refuse layers the merge would silently leave as A's or cannot fit through."""
    for name, m in model.named_modules():
        if isinstance(m, SAMPLE_NORMS):
            raise MergeError(
                f"cannot merge through {type(m).__name__} {name!r}: it normalises each sample by statistics of "
                "the layer's own output, so the op before it cannot be fitted by least squares to its output and it "
                "cannot be set to the identity. Feature merging supports BatchNorm or norm-free models")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise MergeError(f"conv {name!r}: only groups=1 and zero padding are supported "
                             f"(groups={m.groups}, padding_mode={m.padding_mode!r})")
        if isinstance(m, BATCHNORMS) and not m.track_running_stats:
            raise MergeError(f"BatchNorm {name!r} has no running statistics (it normalises with batch statistics "
                             "in eval mode), so it cannot be set to the identity")
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, (*LINEAR_OPS, BATCHNORMS)):
            raise MergeError(f"module {name!r} ({type(m).__name__}) has parameters {own} that the merge cannot fit; "
                             "only nn.Linear, nn.Conv2d and BatchNorm layers are supported")


# ------------------------------------------------------------------------------------ the structure
def _norm_after_ops(model: nn.Module, x: torch.Tensor, ops: list[str]) -> tuple[dict, dict]:
    """One forward pass: which BatchNorm takes which op's output directly ({op: bn}), and each BN's input
    shape. A BN fed by anything else (a sum, a pooling, a functional op) is refused."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (op, output): the tensor kept alive
    follows, shapes, orphans = {}, {}, []

    def op_hook(name):
        def fn(module, inputs, output):
            outputs[id(output)] = (name, output)
        return fn

    def bn_hook(name):
        def fn(module, inputs):
            hit = outputs.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0]:
                if hit[0] in follows:
                    raise MergeError(f"op {hit[0]!r} feeds two BatchNorms ({follows[hit[0]]!r}, {name!r})")
                follows[hit[0]] = name
            else:
                orphans.append(name)
            shapes[name] = tuple(inputs[0].shape[1:])
        return fn

    handles = [modules[n].register_forward_hook(op_hook(n)) for n in ops]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    probe_forward(model, x, handles)
    if orphans:
        raise MergeError(f"BatchNorm {orphans[0]!r} does not take a linear op's output directly; the merge can only "
                         "fold a BatchNorm that directly follows an nn.Linear / nn.Conv2d")
    return follows, shapes


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the tensor it needs has been seen."""


def _run_until(model: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """`module`'s input ('input') or output ('output') when `model` runs on x; the pass stops there."""
    seen = {}

    def pre(m, inputs):
        seen["v"] = inputs[0].detach()
        raise _Stop

    def post(m, inputs, output):
        seen["v"] = output.detach()
        raise _Stop

    handle = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "v" not in seen:
        raise MergeError(f"a {type(module).__name__} of the model did not run on this batch")
    return seen["v"]


# --------------------------------------------------------------------------------- least squares
def _rows(op: nn.Module, h: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, max_elements: int):
    """(input rows, A's target rows, B's target rows) of an op, in chunks whose input rows hold about
    `max_elements` numbers: a conv's patches (one row per sample and output position, in `F.unfold`'s
    column order, which is that of `weight.flatten(1)`) are unfolded a few samples at a time, never for a
    whole batch at once."""
    if isinstance(op, nn.Conv2d):
        positions = ya.shape[2] * ya.shape[3]
        dim = op.in_channels * op.kernel_size[0] * op.kernel_size[1]
        step = max(1, max_elements // max(positions * dim, 1))
        for i in range(0, h.shape[0], step):
            yield (unfold_rows(op, h[i:i + step]),
                   *(y[i:i + step].flatten(2).transpose(1, 2).reshape(-1, y.shape[1]) for y in (ya, yb)))
        return
    z, ta, tb = h.reshape(-1, op.in_features), ya.reshape(-1, op.out_features), yb.reshape(-1, op.out_features)
    step = max(1, max_elements // op.in_features)
    for i in range(0, z.shape[0], step):
        yield z[i:i + step], ta[i:i + step], tb[i:i + step]


class _LeastSquares:
    """Streamed float64 sums for min ||Z W^T + b - Y||^2 + lam ||W||^2 (b optional, unpenalised)."""

    def __init__(self, intercept: bool):
        self.intercept = intercept
        self.zz = self.zy = self.z = self.y = None
        self.n = 0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z, y = z.double(), y.double()
        zz, zy = z.T @ z, z.T @ y
        if self.zz is None:
            self.zz, self.zy, self.z, self.y = zz, zy, z.sum(0), y.sum(0)
        else:
            self.zz += zz
            self.zy += zy
            self.z += z.sum(0)
            self.y += y.sum(0)
        self.n += len(z)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W (out x in), b or None), float64."""
        d = self.zz.shape[0]
        lam = ridge * float(torch.trace(self.zz)) / d
        gram, rhs = self.zz.clone(), self.zy
        gram.diagonal().add_(lam)
        if self.intercept:
            n = torch.tensor([[float(self.n)]], dtype=gram.dtype, device=gram.device)
            gram = torch.cat([torch.cat([gram, self.z[:, None]], 1), torch.cat([self.z[None], n], 1)], 0)
            rhs = torch.cat([rhs, self.y[None]], 0)
        theta = _spd_solve(gram, rhs) if lam > 0 else None
        if theta is None:
            theta = _pinv_solve(gram, rhs)
        w = theta[:d].T
        return (w, theta[d]) if self.intercept else (w, None)


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Cholesky solve; None when `a` is not numerically positive definite."""
    chol, info = torch.linalg.cholesky_ex(a)
    return None if int(info) != 0 else torch.cholesky_solve(b, chol)


def _pinv_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution of a symmetric PSD system (eigenvalues below
    dim * eps * largest treated as zero): exact on rank-deficient inputs (dead units, constant pixels)."""
    vals, vecs = torch.linalg.eigh(a)
    keep = vals > vals.abs().max() * a.shape[0] * torch.finfo(a.dtype).eps
    inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return vecs @ (inv[:, None] * (vecs.T @ b))


# ------------------------------------------------------------------------------------ BatchNorm
@torch.no_grad()
def _set_identity_bn(bn: nn.Module, shift: torch.Tensor | None, input_shape: tuple) -> None:
    """Make an eval-mode BatchNorm compute exactly x + shift (shift None: x): weight 1, running mean 0,
    running var 1 - eps, so that (var + eps) is 1 and the normalisation a multiplication by 1; the shift
    goes into the bias (or, without affine parameters, into the running mean as -shift). Checked on a
    probe; if rounding of 1 - eps + eps misses 1, the neighbouring floats of 1 - eps are tried."""
    shift = torch.zeros(bn.num_features, dtype=torch.float64) if shift is None else shift
    rm, rv = bn.running_mean, bn.running_var
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.copy_(shift.to(bn.bias))
        rm.zero_()
    else:
        rm.copy_(-shift.to(rm))
    base = torch.tensor(1.0 - bn.eps, dtype=rv.dtype)
    probe = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    probe = probe.to(device=rv.device, dtype=bn.weight.dtype if bn.affine else rv.dtype)
    view = (1, -1) + (1,) * (probe.dim() - 2)
    expected = probe + shift.to(probe).view(view)
    bn.eval()
    best = None
    for step in (0, 1, -1, 2, -2):
        v = base
        for _ in range(abs(step)):
            v = torch.nextafter(v, torch.tensor(2.0 if step > 0 else 0.0, dtype=v.dtype))
        rv.fill_(float(v))
        err = float((bn(probe) - expected).abs().max())
        if best is None or err < best[0]:
            best = (err, float(v))
        if err == 0:
            return
    rv.fill_(best[1])
    scale = float(expected.abs().max())
    if not best[0] <= 4 * torch.finfo(probe.dtype).eps * max(scale, 1.0):
        raise MergeError(f"could not set a BatchNorm to the identity (max error {best[0]:.3g} on a probe)")


# ------------------------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_by_features(model_a: nn.Module, model_b: nn.Module, batches, *, alpha: float = 0.5,
                      ridge: float = 1e-4, max_elements: int = 1 << 22) -> nn.Module:
    """A network of A's architecture whose linear ops are fitted, one by one from the input, to the
    alpha-average of A's and B's outputs of each op (see the module docstring).

    model_b: B already aligned to A (permuted so that its units correspond to A's); unaligned, the target
        averages unrelated units.
    batches: a re-iterable of (x, y) fitting (training) batches on the models' device; y is unused. It is
        read once per linear op.
    alpha: weight of A (1 gives A back, up to the ridge), in [0, 1].
    ridge: lam = ridge * tr(Z^T Z) / dim(z) is added to the Gram matrix of each op's inputs (not to the
        bias): it keeps directions the data never visits (constant pixels, dead units) at zero weight. With
        ridge = 0 the minimum-norm least-squares solution is used, which reproduces any target that an
        op can reach exactly (e.g. merging a network with itself).
    max_elements: about how many numbers one chunk of an op's unfolded input holds. Memory is bounded by
        one batch's activations plus one chunk (float64) plus the op's Gram matrix, whatever the data size.
    Returns the merged network in eval mode; A and B are unchanged (their train/eval mode is restored).
    """
    alpha = _check_alpha(alpha)
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    _check_finite(model_a, "A"), _check_finite(model_b, "B")
    _check_structure(model_a)
    first, _ = _first_batch(batches, reiterable=True)
    modes = (model_a.training, model_b.training)
    try:
        taps = find_taps(model_a, first[0])
        if find_taps(model_b, first[0])["linears"] != taps["linears"]:
            raise MergeError("A and B run their linear ops in a different order; they are not the same architecture")
        ops = taps["linears"]
        follows, shapes = _norm_after_ops(model_a, first[0], ops)
        merged = copy.deepcopy(model_a).eval()
        mods_m, mods_a, mods_b = (dict(m.named_modules()) for m in (merged, model_a, model_b))
        model_a.eval(), model_b.eval()
        for name in ops:
            op, bn = mods_m[name], follows.get(name)
            target = bn or name  # fit to the BN's output when a BN follows
            sums = _LeastSquares(intercept=op.bias is not None or bn is not None)
            for x, _ in batches:
                h = _run_until(merged, op, x, "input")
                ya = _run_until(model_a, mods_a[target], x, "output")
                yb = _run_until(model_b, mods_b[target], x, "output")
                for z, ta, tb in _rows(op, h, ya, yb, max_elements):  # the target per chunk, in float64
                    t = ta if alpha == 1.0 else tb if alpha == 0.0 else alpha * ta.double() + (1 - alpha) * tb.double()
                    sums.add(z, t)
            if not (bool(torch.isfinite(sums.zz).all()) and bool(torch.isfinite(sums.zy).all())):
                raise MergeError(f"the inputs or targets of {name!r} are not finite (NaN in the data, or an "
                                 "overflow in an earlier fitted layer)")
            w, b = sums.solve(ridge)
            op.weight.copy_(w.reshape(op.weight.shape).to(op.weight))
            if op.bias is not None:
                op.bias.copy_(b.to(op.bias))
            if bn is not None:
                _set_identity_bn(mods_m[bn], None if op.bias is not None else b, shapes[bn])
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])
    return merged.eval()


# -------------------------------------------------------------------------------------- ensembles
def ensemble_log_probs(logits_a: torch.Tensor, logits_b: torch.Tensor, alpha: float,
                       ensemble: str = "probs") -> torch.Tensor:
    """'probs': log(alpha softmax(a) + (1 - alpha) softmax(b)), computed stably (logsumexp); 'logits':
    log_softmax(alpha a + (1 - alpha) b). Either is a log-probability, so its cross-entropy is its loss."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
    la, lb = F.log_softmax(logits_a.double(), 1), F.log_softmax(logits_b.double(), 1)
    if ensemble == "logits":
        return F.log_softmax(alpha * logits_a.double() + (1 - alpha) * logits_b.double(), 1)
    if alpha == 1.0:
        return la
    if alpha == 0.0:
        return lb
    return torch.logsumexp(torch.stack([la + math.log(alpha), lb + math.log(1 - alpha)]), 0)


class OutputEnsemble(nn.Module):
    """The output ensemble of A and B as a model: it returns `ensemble_log_probs` (float64), whose argmax
    is the ensemble's prediction and whose cross-entropy is the ensemble's loss."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, alpha: float = 0.5, ensemble: str = "probs"):
        super().__init__()
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
        self.model_a, self.model_b, self.alpha, self.ensemble = model_a, model_b, _check_alpha(alpha), ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.model_a(x), self.model_b(x), self.alpha, self.ensemble)


@torch.no_grad()
def _evaluate(models: dict, model_a: nn.Module, model_b: nn.Module, batches, alpha: float, ensemble: str) -> dict:
    """One streaming pass: per model, its error and loss and its agreement with the ensemble's
    predictions; plus the ensemble's own error and loss. A and B run once per batch."""
    alpha = _check_alpha(alpha)
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
    nets = [model_a, model_b, *models.values()]
    modes = [m.training for m in nets]
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in models}  # loss, wrong, agree
    ens = torch.zeros(2, dtype=torch.float64)
    n = 0
    try:
        for m in nets:
            m.eval()
        for x, y in batches:
            ens_logp = ensemble_log_probs(model_a(x), model_b(x), alpha, ensemble)
            target = ens_logp.argmax(1)
            ens += torch.stack([F.nll_loss(ens_logp, y, reduction="sum").cpu(), (target != y).sum().double().cpu()])
            n += len(y)
            for key, model in models.items():
                out = model(x)
                pred = out.argmax(1)
                sums[key] += torch.stack([F.cross_entropy(out.double(), y, reduction="sum").cpu(),
                                          (pred != y).sum().double().cpu(), (pred == target).sum().double().cpu()])
    finally:
        for m, mode in zip(nets, modes):
            m.train(mode)
    if n == 0:
        raise ValueError("batches is empty: nothing to evaluate")
    out = {k: {"agreement": float(v[2]) / n, "error": float(v[1]) / n, "loss": float(v[0]) / n}
           for k, v in sums.items()}
    out[None] = {"ensemble_error": float(ens[1]) / n, "ensemble_loss": float(ens[0]) / n, "n": n}
    return out


def ensemble_agreement(model_x: nn.Module, model_a: nn.Module, model_b: nn.Module, batches, alpha: float = 0.5,
                       *, ensemble: str = "probs") -> dict:
    """Share of samples on which `model_x` predicts what the output ensemble of A and B predicts, in one
    streaming pass over `batches` of (x, y).

    The ensemble is argmax(alpha softmax(A) + (1 - alpha) softmax(B)) (ensemble='probs', the mixture of the
    two predictive distributions; 'logits' for the logit average). Ties go to the lower class, as argmax.
    Returns {agreement, error, loss, ensemble_error, ensemble_loss, n}: model_x's error and mean
    cross-entropy (its outputs taken as logits) and the ensemble's, on the labels y.
    """
    res = _evaluate({"x": model_x}, model_a, model_b, batches, alpha, ensemble)
    return {**res["x"], **res[None]}


def merge_comparison(model_a: nn.Module, model_b_aligned: nn.Module, model_b_unaligned: nn.Module, fit_batches,
                     test_batches, alpha: float = 0.5, *, ridge: float = 1e-4) -> pd.DataFrame:
    """A, B, the output ensemble (probability average), theta_alpha (the weight average) and the feature
    merge (`merge_by_features`), the last two with B aligned and unaligned, on `test_batches`.

    `fit_batches` (training data, re-iterable) fit the feature merge and, for BatchNorm networks, reset
    theta_alpha's BN statistics (`corrected_interpolation(..., 'bn_reset')`; without BN theta_alpha is the
    plain weight average). Columns: method ('A', 'B', 'ensemble', 'theta_alpha', 'feature_merge'), aligned
    (nullable boolean: True / False, or <NA> where alignment does not change the function: A, B, the
    ensemble), error,
    loss, agreement_with_ensemble (with the probability ensemble of A and B)."""
    alpha = _check_alpha(alpha)
    check_same_architecture(model_a.state_dict(), model_b_aligned.state_dict())
    check_same_architecture(model_a.state_dict(), model_b_unaligned.state_dict())
    _first_batch(fit_batches, reiterable=True)
    _, test_batches = _first_batch(test_batches, reiterable=False)
    correction = "bn_reset" if has_batchnorm(model_a) else "none"
    models = {("A", None): model_a, ("B", None): model_b_aligned,
              ("ensemble", None): OutputEnsemble(model_a, model_b_aligned, alpha)}
    for aligned, b in ((True, model_b_aligned), (False, model_b_unaligned)):
        models[("theta_alpha", aligned)] = corrected_interpolation(model_a, b, alpha, correction, fit_batches)
        models[("feature_merge", aligned)] = merge_by_features(model_a, b, fit_batches, alpha=alpha, ridge=ridge)
    res = _evaluate(models, model_a, model_b_aligned, test_batches, alpha, "probs")
    frame = pd.DataFrame([{"method": method, "aligned": aligned, "error": res[(method, aligned)]["error"],
                           "loss": res[(method, aligned)]["loss"],
                           "agreement_with_ensemble": res[(method, aligned)]["agreement"]}
                          for method, aligned in models])
    frame["aligned"] = frame["aligned"].astype("boolean")  # True / False / <NA>
    return frame


__all__ = ["MergeError", "OutputEnsemble", "ensemble_agreement", "ensemble_log_probs", "merge_by_features",
           "merge_comparison"]
