"""Layer taps: which modules of a network are measured, in what order, at what depth, and forward hooks
that keep their inputs and outputs for the current batch.

A model is measurable when every ReLU is its own (not in-place) `nn.ReLU` module and its linear maps are
`nn.Linear` / `nn.Conv2d` modules, each run once per forward pass (see the book's "About the code").
Feature layers are the ReLUs in execution order (depth 1..L-1), then the logits (depth L); a linear op
gets the depth of the feature layer it feeds.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_OPS = (nn.Linear, nn.Conv2d)
LOGITS = "logits"


class TapError(ValueError):
    """The model's taps cannot be measured (reused or in-place ReLU modules, missing layers)."""


def _record_call(order: list, name: str, module, inputs, output) -> None:
    order.append(name)


def probe_forward(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One eval-mode forward pass on two samples of `example`, for the hooks `handles` to observe the
    model's structure; the hooks are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            model.eval()(example[:2])
    finally:
        for h in handles:
            h.remove()


def find_taps(model: nn.Module, example: torch.Tensor) -> dict:
    """Run one forward pass and list the tapped modules in execution order, with each layer's depth.

    Returns {"relus": [...], "linears": [...], "depth": {name: l}} where depth counts feature layers
    (ReLUs, then the logits at depth L) and a linear op gets the depth of the feature layer it feeds.
    """
    order: list[str] = []  # module names in the order they ran (a name twice: the module is reused)
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU) and m.inplace:
            raise TapError(f"ReLU {name!r} is in-place, which destroys its pre-activation; use nn.ReLU()")
        if isinstance(m, (nn.ReLU, *LINEAR_OPS)):
            handles.append(m.register_forward_hook(partial(_record_call, order, name)))
    probe_forward(model, example, handles)
    reused = sorted({n for n in order if order.count(n) > 1})
    if reused:
        raise TapError(f"modules {reused[:3]} run more than once per forward pass; give each use its own module")
    modules = dict(model.named_modules())
    relus = [n for n in order if isinstance(modules[n], nn.ReLU)]
    if not relus:
        raise TapError("the model has no nn.ReLU modules to measure (functional ReLUs cannot be tapped)")
    depth, pending = {}, []
    for n in order:
        if isinstance(modules[n], nn.ReLU):
            depth[n] = relus.index(n) + 1
            for p in pending:
                depth[p] = depth[n]
            pending = []
        else:
            pending.append(n)
    depth[LOGITS] = len(relus) + 1
    for p in pending:
        depth[p] = depth[LOGITS]
    return {"relus": relus, "linears": [n for n in order if not isinstance(modules[n], nn.ReLU)], "depth": depth}


class Recorder:
    """Forward hooks that keep a model's taps for the current batch."""

    def __init__(self, model: nn.Module, relus: list[str], linears: list[str]):
        self.pre, self.post, self.inputs = {}, {}, {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._relu(n)) for n in relus]
        self.handles += [modules[n].register_forward_hook(self._linear(n)) for n in linears]

    def _relu(self, name):
        def fn(module, inputs, output):
            self.pre[name], self.post[name] = inputs[0].detach(), output.detach()
        return fn

    def _linear(self, name):
        def fn(module, inputs, output):
            self.inputs[name] = inputs[0].detach()
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def apply_linear(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's own linear map with another weight and no bias (no unfolding of convolutions)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)



def check_same_taps(model_b, example, taps_a) -> None:
    taps_b = find_taps(model_b, example)
    if taps_b["relus"] != taps_a["relus"] or taps_b["linears"] != taps_a["linears"]:
        raise TapError("A and B have different layers: "
                       f"{sorted(set(taps_a['relus'] + taps_a['linears']) ^ set(taps_b['relus'] + taps_b['linears']))[:5]}")


class Replace:
    """Forward hook that replaces a module's output with a given tensor."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self, module, inputs, output):
        return self.value
