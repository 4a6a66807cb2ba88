"""The architectures, built from plain dict configs so the cache can rebuild them.

Layer naming, shared by every model (see the book's "about the code" page):
  * every ReLU is its own `nn.ReLU` module named `relu…`: its input is the pre-activation H̃^(l),
    its output the feature f^(l) = H^(l); nothing applies a ReLU functionally, so no layer escapes;
  * every linear op is an `nn.Linear` / `nn.Conv2d` named `fc…`, `conv…` or `shortcut.conv`: its input
    is the layer input H^(l-1) that the commutativity metric uses;
  * the classifier is `head`, whose output is the logits f^(L).
Each model also has `permutation_spec()` (see `llfc_core.permutation`).
"""
from __future__ import annotations

from torch import nn

from .mlp import MLP
from .norm import make_norm
from .resnet import ResNet20
from .vgg import VGG16

ARCHITECTURES = {"mlp": MLP, "vgg16": VGG16, "resnet20": ResNet20}


def build_model(config: dict) -> nn.Module:
    """`config` = {"arch": name, **constructor kwargs}; the model keeps it as `.config`."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**config)
    except TypeError as e:
        raise ValueError(f"bad settings for {arch}: {e}") from e


__all__ = ["ARCHITECTURES", "MLP", "VGG16", "ResNet20", "build_model", "make_norm"]
