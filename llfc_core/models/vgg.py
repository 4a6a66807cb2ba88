"""VGG-16, CIFAR variant: 13 conv layers (conv_i, norm_i, relu_i; max-pools between stages), head."""
from __future__ import annotations

import torch
from torch import nn

from ..permutation import PermutationSpec, conv_axes, dense_axes, norm_axes
from .norm import make_norm

VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    def __init__(self, norm: str = "bn", width: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        self.config = {"arch": "vgg16", "norm": norm, "width": width, "num_classes": num_classes,
                       "in_channels": in_channels}
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
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for item in self.plan:
            if item == "M":
                x = self.pool(x)
            else:
                x = getattr(self, f"relu{item}")(getattr(self, f"norm{item}")(getattr(self, f"conv{item}")(x)))
        return self.head(x.flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        axes, prev = {}, None
        for i in range(1, self.num_convs + 1):
            conv = getattr(self, f"conv{i}")
            axes.update(conv_axes(f"conv{i}", f"P{i}", prev, bias=conv.bias is not None))
            axes.update(norm_axes(f"norm{i}", f"P{i}", getattr(self, f"norm{i}")))
            prev = f"P{i}"
        axes.update(dense_axes("head", None, prev))
        return PermutationSpec(axes, {f"P{i}": [f"relu{i}"] for i in range(1, self.num_convs + 1)})
