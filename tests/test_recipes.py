"""`Recipe.lr_at`, the learning rate at a fractional epoch, against values computed by hand for every
schedule (the cosine schedule's warm-up and half cosine are in tests/test_width.py)."""
import math

import pytest

from llfc_core.recipes import Recipe


def recipe(**kw):
    return Recipe("lr-test", "mnist", {"arch": "mlp", "widths": [4]}, **{"epochs": 10, "lr": 0.2, **kw})


def test_step_multiplies_by_gamma_at_each_milestone():
    r = recipe(schedule="step", milestones=(3, 7), gamma=0.5)
    assert r.lr_at(0) == pytest.approx(0.2)
    assert r.lr_at(2.999) == pytest.approx(0.2)      # just before the first milestone
    assert r.lr_at(3) == pytest.approx(0.1)          # the milestone itself is already decayed
    assert r.lr_at(6.5) == pytest.approx(0.1)
    assert r.lr_at(7) == pytest.approx(0.05)         # 0.2 x 0.5^2
    assert r.lr_at(9.75) == pytest.approx(0.05)


def test_step_counts_milestones_in_any_order_and_ignores_warm_up():
    unordered = recipe(schedule="step", milestones=(7, 3), gamma=0.1, warmup_epochs=2)
    assert [unordered.lr_at(e) for e in (0, 1.5, 3.5, 8)] == pytest.approx([0.2, 0.2, 0.02, 0.002])
    assert recipe(schedule="step").lr_at(9.9) == 0.2  # no milestones: constant


def test_triangle_warms_up_linearly_then_decays_linearly_to_zero_at_the_last_epoch():
    r = recipe(schedule="triangle", warmup_epochs=2)          # peak 0.2 at epoch 2, 0 at epoch 10
    assert r.lr_at(0) == 0.0
    assert r.lr_at(0.5) == pytest.approx(0.05)                # 0.2 x 0.5 / 2
    assert r.lr_at(1.5) == pytest.approx(0.15)
    assert r.lr_at(2) == pytest.approx(0.2)                   # the peak
    assert r.lr_at(4) == pytest.approx(0.15)                  # 0.2 x (10 - 4) / (10 - 2)
    assert r.lr_at(6) == pytest.approx(0.1)                   # half-way down
    assert r.lr_at(9.5) == pytest.approx(0.0125)              # 0.2 x 0.5 / 8
    assert r.lr_at(10) == 0.0
    assert r.lr_at(10.5) == 0.0                               # past the end it stays at zero, never negative


def test_triangle_without_warm_up_starts_at_the_peak():
    r = recipe(schedule="triangle", epochs=4, lr=0.1)
    assert [r.lr_at(e) for e in (0, 1, 2.5, 4)] == pytest.approx([0.1, 0.075, 0.0375, 0.0])


def test_cosine_without_warm_up_and_at_fractional_epochs():
    r = recipe(schedule="cosine", epochs=4, lr=0.1)
    assert r.lr_at(0) == pytest.approx(0.1)
    assert r.lr_at(1) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.0853553
    assert r.lr_at(2) == pytest.approx(0.05)
    assert r.lr_at(3.5) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3.5 / 4)))
    assert r.lr_at(4) == pytest.approx(0.0, abs=1e-15)


def test_constant_ignores_warm_up_and_milestones():
    r = recipe(schedule="constant", warmup_epochs=3, milestones=(2,), lr=0.01)
    assert [r.lr_at(e) for e in (0, 0.5, 2, 9.99)] == [0.01] * 4
