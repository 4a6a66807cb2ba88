"""Multi-layer perceptron: fc1, relu1, ..., fcL-1, reluL-1, head."""
from __future__ import annotations

import torch
from torch import nn

from ..permutation import PermutationSpec, dense_axes


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, widths: tuple = (512, 512, 512), num_classes: int = 10):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if in_features < 1 or num_classes < 1 or not widths or min(widths) < 1:
            raise ValueError(f"MLP needs positive sizes, got in={in_features}, widths={widths}, classes={num_classes}")
        self.config = {"arch": "mlp", "in_features": in_features, "widths": list(widths), "num_classes": num_classes}
        self.depth = len(widths)
        sizes = (in_features, *widths)
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
            setattr(self, f"relu{i + 1}", nn.ReLU())
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.config["in_features"]:
            raise ValueError(f"MLP expects {self.config['in_features']} input features, got {x.shape[1]}")
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        axes, prev = {}, None
        for i in range(1, self.depth + 1):
            axes.update(dense_axes(f"fc{i}", f"P{i}", prev))
            prev = f"P{i}"
        axes.update(dense_axes("head", None, prev))
        return PermutationSpec(axes, {f"P{i}": [f"relu{i}"] for i in range(1, self.depth + 1)})
