"""VGG-16, CIFAR variant: 13 conv layers (conv_i, norm_i, relu_i; max-pools between stages), then the head.

Two heads: 'linear', one Linear(512 w, 10) (the small CPU profiles), and 'official', the classifier of the
LLFC paper's src/model/cifar_vgg.py: 512 -> 4096 -> 4096 -> 10 with ReLU and dropout 0.5 after each
hidden layer (dropout is off in evaluation). Its hidden layers follow the naming scheme: fc14, relu14,
fc15, relu15, so the metrics measure them like any other layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..permutation import PermutationSpec, conv_axes, dense_axes, norm_axes
from .norm import make_norm

VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
OFFICIAL_HIDDEN = 4096  # the official classifier's width (scaled by the width multiplier)
HEADS = ("linear", "official")


class VGG16(nn.Module):
    def __init__(self, norm: str = "bn", width: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                 head: str = "linear"):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        if head not in HEADS:
            raise ValueError(f"unknown VGG-16 head {head!r}; choose from {HEADS}")
        self.config = {"arch": "vgg16", "norm": norm, "width": width, "num_classes": num_classes,
                       "in_channels": in_channels, "head": head}
        self.plan, prev, i = [], in_channels, 0
        for item in VGG16_PLAN:
            if item == "M":
                self.plan.append("M")
                continue
            i, out = i + 1, max(1, int(round(item * width)))
            # A bias is redundant before BatchNorm; keep it only without a norm.
            setattr(self, f"conv{i}", nn.Conv2d(prev, out, 3, padding=1, bias=(norm == "none")))
            setattr(self, f"norm{i}", make_norm(norm, out))
            setattr(self, f"relu{i}", nn.ReLU())
            self.plan.append(i)
            prev = out
        self.num_convs = i
        self.pool = nn.MaxPool2d(2)
        self.hidden = []  # the official head's hidden layers: (index, dropout)
        if head == "official":
            hidden = max(1, int(round(OFFICIAL_HIDDEN * width)))
            for j in (i + 1, i + 2):
                setattr(self, f"fc{j}", nn.Linear(prev, hidden))
                setattr(self, f"relu{j}", nn.ReLU())
                setattr(self, f"dropout{j}", nn.Dropout(0.5))
                self.hidden.append(j)
                prev = hidden
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for item in self.plan:
            if item == "M":
                x = self.pool(x)
            else:
                x = getattr(self, f"relu{item}")(getattr(self, f"norm{item}")(getattr(self, f"conv{item}")(x)))
        x = x.flatten(1)
        for j in self.hidden:
            x = getattr(self, f"dropout{j}")(getattr(self, f"relu{j}")(getattr(self, f"fc{j}")(x)))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        axes, prev = {}, None
        for i in range(1, self.num_convs + 1):
            conv = getattr(self, f"conv{i}")
            axes.update(conv_axes(f"conv{i}", f"P{i}", prev, bias=conv.bias is not None))
            axes.update(norm_axes(f"norm{i}", f"P{i}", getattr(self, f"norm{i}")))
            prev = f"P{i}"
        for j in self.hidden:
            axes.update(dense_axes(f"fc{j}", f"P{j}", prev))
            prev = f"P{j}"
        axes.update(dense_axes("head", None, prev))
        relus = list(range(1, self.num_convs + 1)) + self.hidden
        return PermutationSpec(axes, {f"P{i}": [f"relu{i}"] for i in relus})
