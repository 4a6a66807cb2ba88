"""Issue #20 on the CPU: what a GPU run relies on, checked where it can be (no GPU is needed)."""
import numpy as np
import pytest
import torch
from torch import nn

from llfc_core import data, runtime, train
from llfc_core.interpolate import interpolate, reset_bn
from llfc_core.matching import weight as wm
from llfc_core.metrics import _HIST_CENTRES, _HIST_EDGES, PairAccumulator, layer_metrics
from llfc_core.models import build_model
from llfc_core.permutation import identity_perms
from llfc_core.probes import feature_averaging, principal_angles, stitching_errors
from llfc_core.runtime import BatchPlan, DeviceMemoryError, exact_matmul, fit_batch, sample_memory

READS = ("item", "__float__", "__int__", "__bool__", "cpu", "tolist")  # every way a tensor reaches the host


class _Count:
    """Counts calls of tensor methods that read a device tensor back to the host."""

    def __init__(self, monkeypatch, names=("item", "cpu", "tolist")):
        self.calls = {n: 0 for n in names}
        for n in names:
            original = getattr(torch.Tensor, n)

            def counted(self_, *a, _n=n, _f=original, **k):
                self.calls[_n] += 1
                return _f(self_, *a, **k)
            monkeypatch.setattr(torch.Tensor, n, counted)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def reads(monkeypatch, fn) -> int:
    """How many host reads `fn()` makes (the counter is removed afterwards)."""
    with monkeypatch.context() as m:
        count = _Count(m, READS)
        fn()
    return count.total


def test_evaluation_runs_with_tf32_off_and_restores_it(monkeypatch):
    seen = []
    model = build_model({"arch": "mlp", "in_features": 784, "widths": [8], "num_classes": 10})
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                                     torch.backends.cudnn.allow_tf32)), original(x))[1])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        ds = data.load("mnist", "test").subset(100)
        train.evaluate(model, ds, batch_size=50)
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        with exact_matmul():
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults


def test_the_accumulator_reads_nothing_back_per_batch(monkeypatch):
    acc = PairAccumulator()
    batches = [(torch.randn(64, 10), torch.randn(64, 10)) for _ in range(20)]
    count = _Count(monkeypatch)
    for x, y in batches:
        acc.add(x, y)
    assert count.calls == {"item": 0, "cpu": 0, "tolist": 0}
    acc.summary()  # the one read, at the end
    assert count.total == 1


def test_scatter_histogram_equals_bincount():
    idx = torch.randint(0, 481, (10_000,))
    counts = torch.zeros(481, dtype=torch.float64).scatter_add_(0, idx, torch.ones(10_000, dtype=torch.float64))
    assert torch.equal(counts, torch.bincount(idx, minlength=481).double())


def test_batches_copy_the_normalisation_constants_once(monkeypatch):
    ds = data.load("cifar10", "test").subset(64)
    first = next(data.batches(ds, 32, augment=True, shuffle=True, seed=1))
    made = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (made.append(1), original(*a, **k))[1])
    batches = list(data.batches(ds, 32, augment=True, shuffle=True, seed=1))
    assert made == []  # cached per (data set, device): nothing rebuilt per batch
    assert torch.equal(batches[0][0], first[0])  # and the same numbers as before the cache existed
    mean, std = (original(s).view(1, -1, 1, 1) for s in data.STATS["cifar10"])
    assert torch.equal(data.normalise(ds.images[:4], "cifar10"), (ds.images[:4].float() - mean) / std)


def test_cross_products_are_float64_sums_and_exact_on_the_cpu():
    from llfc_core.runtime import cross_products

    a, b = torch.randn(300, 7), torch.randn(300, 5)
    got = cross_products(a, b)
    assert got.dtype == torch.float64 and torch.equal(got, a.double().T @ b.double())  # the CPU path: float64 throughout
    # the GPU path's arithmetic (fp32 products, float64 result), run here on the CPU: within fp32 rounding
    assert torch.allclose((a.float().T @ b.float()).double(), got, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------- host reads in hot loops
def test_the_read_counter_sees_every_kind_of_read(monkeypatch):
    """The counter the tests below rely on: each way of reading a tensor counts once (so a loop that reads
    per batch shows up as a count that grows with the batches)."""
    t = torch.ones(())
    for read in (lambda x: x.item(), float, int, bool, lambda x: x.cpu(), lambda x: x.tolist()):
        assert reads(monkeypatch, lambda: read(t)) == 1
    assert reads(monkeypatch, lambda: [float(t) for _ in range(5)]) == 5


BN_MODELS = [{"arch": "vgg16", "norm": "bn", "width": 0.0625}, {"arch": "resnet20", "width": 1, "norm": "bn"}]


def _random_batches(n, shape=(3, 32, 32), size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _reset_bn_momentum_none(model, batches):
    """reset_bn as it was before issue #20: torch's cumulative average (momentum=None), which reads the
    batch counter back to the host in every BatchNorm layer for every batch."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("config", BN_MODELS, ids=lambda c: c["arch"])
def test_bn_reset_is_the_same_average_without_host_reads(monkeypatch, config):
    torch.manual_seed(0)
    a, b = build_model(config), build_model(config)
    batches = _random_batches(4)
    ours, old = interpolate(a, b, 0.5), interpolate(a, b, 0.5)
    assert reads(monkeypatch, lambda: reset_bn(ours, batches)) == 0
    assert reads(monkeypatch, lambda: _reset_bn_momentum_none(old, batches)) > 0  # the counter would see it
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in ours.state_dict().items())  # bit-identical
    assert all(m.momentum == 0.1 for m in ours.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    fewer = reset_bn(interpolate(a, b, 0.5), batches[:3])  # the comparison can fail: another average
    assert not all(torch.equal(v, ours.state_dict()[k]) for k, v in fewer.state_dict().items())


def test_accumulator_summaries_are_the_per_accumulator_reads_of_before():
    """The one-transfer read gives exactly the numbers the old per-accumulator reads gave: totals and every
    quantile (the code before issue #20, written out here), and the bins' centres of the old formula."""
    acc = PairAccumulator()
    g = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-3, 1.0):  # spread the cosines over many bins
        x = torch.randn(200, 12, generator=g)
        acc.add(x, x + scale * torch.randn(200, 12, generator=g))
    sums, hist = acc.sums.clone(), acc.hist.clone()
    totals = dict(zip(PairAccumulator._SUMS, sums.tolist()))

    def quantile_before(q):
        cdf = torch.cumsum(hist, 0) / max(totals["n"], 1)
        i = min(int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))), len(_HIST_EDGES) - 2)
        return 0.0 if i == 0 else float((_HIST_EDGES[i] * _HIST_EDGES[i + 1]).sqrt())

    assert acc.totals() == totals
    qs = np.linspace(0.005, 0.995, 199)
    assert [acc.quantile(float(q)) for q in qs] == [quantile_before(float(q)) for q in qs]
    assert len({acc.quantile(float(q)) for q in qs}) > 10  # many different bins were compared
    assert [float(c) for c in _HIST_CENTRES[1:]] == [float((_HIST_EDGES[i] * _HIST_EDGES[i + 1]).sqrt())
                                                      for i in range(1, len(_HIST_EDGES) - 1)]


def test_the_metric_pass_reads_once_whatever_the_batches(monkeypatch):
    """One host transfer at the end of `layer_metrics` (with a BN reset on calibration batches), not one per
    batch, layer or alpha (before issue #20: 1,641 reads on this VGG at any number of batches)."""
    torch.manual_seed(0)
    a, b = build_model(BN_MODELS[0]), build_model(BN_MODELS[0])
    counts = [reads(monkeypatch, lambda: layer_metrics(a, b, _random_batches(n), correction="bn_reset",
                                                       calibration=_random_batches(n, seed=1)))
              for n in (2, 5)]
    assert counts == [1, 1]


@pytest.mark.parametrize("probe", [stitching_errors, feature_averaging, principal_angles], ids=lambda f: f.__name__)
def test_probes_read_once_whatever_the_batches(monkeypatch, probe):
    """Before issue #20: stitching read once per layer and batch (13 x batches here), feature averaging three
    times per row and batch, principal angles three times per layer."""
    torch.manual_seed(0)
    a, b = build_model(BN_MODELS[0]), build_model(BN_MODELS[0])
    assert [reads(monkeypatch, lambda: probe(a, b, _random_batches(n))) for n in (2, 5)] == [1, 1]


def _weight_matching_before(spec, state_a, state_b, seed=0):
    """weight_matching's loop before issue #20, which read the objective and each step's acceptance to the host
    at every step (the rest is the same code)."""
    a, b = ({k: v.float() for k, v in wm.float_entries(spec, s).items()} for s in (state_a, state_b))
    sizes = spec.sizes(state_a)
    perms = identity_perms(sizes)
    terms, solved_with, rng = wm._CostTerms(spec, a, b, sizes, torch.device("cpu")), {}, np.random.default_rng(seed)
    objective = wm.weight_matching_objective(spec, perms, a, b)
    history = [objective]
    for sweep in range(1, 101):
        improved = False
        for p in rng.permutation(sorted(sizes)):
            inputs = terms.inputs_of(p, perms)
            last = solved_with.get(p)
            if last is not None and all(torch.equal(x, y) for (_, x), (_, y) in zip(inputs, last)):
                continue
            cost = terms.cost(p, perms)
            new = wm.solve_assignment(cost)
            rows = torch.arange(sizes[p])
            old_value, new_value = cost[rows, perms[p]].sum(), cost[rows, new].sum()
            solved_with[p] = tuple((q, v.clone()) for q, v in inputs)
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value.item())):
                perms[p], improved = new, True
                objective += (new_value - old_value).item()
        history.append(objective)
        if not improved:
            break
    history[-1] = wm.weight_matching_objective(spec, perms, a, b)
    return perms, history, sweep


def test_weight_matching_reads_once_per_sweep_and_finds_what_it_found_before(monkeypatch):
    torch.manual_seed(0)
    config = {"arch": "mlp", "in_features": 784, "widths": [64, 64, 64], "num_classes": 10}
    a, b = build_model(config), build_model(config)
    spec = a.permutation_spec()
    steps, solve = [], wm.solve_assignment
    result = []
    with monkeypatch.context() as m:
        m.setattr(wm, "solve_assignment", lambda cost: steps.append(1) or solve(cost))
        # not .cpu(): each step copies its cost matrix to scipy's solver on the host, by design
        count = _Count(m, ("item", "__float__", "__int__", "__bool__", "tolist"))
        result.append(wm.weight_matching(spec, a.state_dict(), b.state_dict()))
    ours = result[0]
    assert len(steps) > ours.sweeps + 2  # more steps than sweeps, so a read per step would show
    assert count.total <= ours.sweeps + 1  # the stopping rule once per sweep, the final objective once
    perms, history, sweeps = _weight_matching_before(spec, a.state_dict(), b.state_dict())
    assert ours.objective == history and ours.sweeps == sweeps  # bit-identical objectives
    assert all(torch.equal(ours.perms[p], perms[p]) for p in perms)
    assert _weight_matching_before(spec, a.state_dict(), b.state_dict(), seed=1)[1] != history  # can fail


# ----------------------------------------------------------------------------- batch sizes from device memory
MLP = {"arch": "mlp", "in_features": 784, "widths": [16, 16], "num_classes": 10}


def _free(monkeypatch, free: int) -> None:
    """A GPU with `free` bytes free, as torch.cuda.mem_get_info reports it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2 ** 30))


def test_sample_memory_counts_what_the_pass_holds():
    model = build_model(MLP)
    # Training: what autograd keeps per sample: the input (fc1's), relu1's and relu2's outputs (each kept once
    # for the ReLU's and the next layer's backward), the log-softmax and the int64 label; + 4 bytes / 2
    # samples of the loss's weight total.
    assert sample_memory(model, (1, 28, 28), training=True) == (784 + 16 + 16 + 10) * 4 + 8 + 2
    # Evaluation: every module's output (fc1, relu1, fc2, relu2, head; the model's own output is head's).
    assert sample_memory(model, (1, 28, 28), training=False) == (4 * 16 + 10) * 4
    assert model.training  # left in the mode it was in


def test_fit_batch_keeps_shrinks_or_refuses(monkeypatch):
    model, shape, fixed = build_model(MLP), (1, 28, 28), 10_000
    per_sample = runtime.MEMORY_SAFETY * sample_memory(model, shape, training=True)
    _free(monkeypatch, 2 ** 40)  # plenty: the batch as is
    assert fit_batch(model, shape, 500, "cuda", fixed_bytes=fixed) == BatchPlan(500, 500)
    _free(monkeypatch, fixed + int(260 * per_sample))  # room for 260 samples: two equal passes of 250
    plan = fit_batch(model, shape, 500, "cuda", fixed_bytes=fixed)
    assert plan == BatchPlan(500, 250) and plan.accumulation == 2
    free = fixed + int(0.5 * per_sample)  # not even one sample
    _free(monkeypatch, free)
    with pytest.raises(DeviceMemoryError) as refused:
        fit_batch(model, shape, 500, "cuda", fixed_bytes=fixed, what="recipe 'huge'")
    message = str(refused.value)
    assert "recipe 'huge'" in message and f"{free:,} bytes" in message and f"{int(fixed + per_sample):,} bytes" in message


def test_fit_batch_for_evaluation_holds_every_model(monkeypatch):
    model, shape = build_model(MLP), (1, 28, 28)
    per_sample = runtime.MEMORY_SAFETY * sample_memory(model, shape, training=False)
    _free(monkeypatch, int(300 * per_sample))
    assert fit_batch(model, shape, 1000, "cuda", training=False) == BatchPlan(1000, 250)  # 4 passes of 250
    assert fit_batch(model, shape, 1000, "cuda", training=False, models=3) == BatchPlan(1000, 100)


def test_fit_batch_on_the_cpu_measures_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "sample_memory", lambda *a, **k: pytest.fail("measured on the CPU"))
    assert fit_batch(build_model(MLP), (1, 28, 28), 500, "cpu") == BatchPlan(500, 500)


def test_batch_plan_refuses_to_split_batchnorm_batches(monkeypatch):
    from dataclasses import replace

    from .test_train import TINY_CONV

    recipe = replace(TINY_CONV, batch_size=64)
    model = train.new_state(recipe, 0, "cpu").model
    fixed = 2 * sum(p.numel() * 4 for p in model.parameters())  # gradients + SGD momentum
    per_sample = runtime.MEMORY_SAFETY * sample_memory(model, (3, 32, 32), training=True)
    _free(monkeypatch, fixed + int(64 * per_sample) + 1)  # the whole batch fits: allowed
    assert train.batch_plan(recipe, model, (3, 32, 32), "cuda") == BatchPlan(64, 64)
    _free(monkeypatch, fixed + int(40 * per_sample))
    with pytest.raises(DeviceMemoryError, match="2 micro-batches of 32, but its BatchNorm layers"):
        train.batch_plan(recipe, model, (3, 32, 32), "cuda")


def test_the_metric_pass_sizes_its_batches_from_free_memory_and_refuses_before_work(monkeypatch):
    """The book's layer-metric pass asks `fit_batch` for its test batches (A, B and theta_alpha held at once):
    with the device's free memory mocked, smaller batches where the setting's do not fit, and a refusal naming
    the pass where not even one sample does; without a memory query (the CPU) the setting's batch."""
    from llfc_core.book import profiles, tables

    setting = profiles.get_settings("smoke", ["mnist-mlp"], replicates=1)["mnist-mlp"]
    model = build_model(MLP)
    assert len(next(tables._metric_batches(setting, "cpu", model))[1]) == setting.metric_batch  # 250
    per_sample = runtime.MEMORY_SAFETY * 3 * sample_memory(model, (1, 28, 28), training=False)
    monkeypatch.setattr(runtime, "free_memory", lambda device: int(100 * per_sample))
    sizes = [len(y) for _, y in tables._metric_batches(setting, "cpu", model)]
    assert max(sizes) <= 100 and sum(sizes) == setting.eval_test  # every test sample, in passes that fit
    monkeypatch.setattr(runtime, "free_memory", lambda device: int(per_sample / 2))
    with pytest.raises(DeviceMemoryError, match="mnist-mlp: the layer-metric pass"):
        tables._metric_batches(setting, "cpu", model)
