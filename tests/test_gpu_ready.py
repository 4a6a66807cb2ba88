"""Issue #20 on the CPU: what a GPU run relies on, checked where it can be (no GPU is needed)."""
import torch

from llfc_core import data, train
from llfc_core.metrics import PairAccumulator
from llfc_core.models import build_model
from llfc_core.runtime import exact_matmul


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
    assert count.calls["tolist"] >= 1


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
