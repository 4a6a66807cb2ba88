"""ResNet-20 for CIFAR with a width multiplier: stem, 3 stages x 3 basic blocks, head.

Names: stem.{conv,norm,relu}; stage{s}.{b}.{conv1,norm1,relu1,conv2,norm2,relu2} (block b of stage s); where a block
changes shape its shortcut is stage{s}.0.shortcut.{conv,norm} (1x1 conv + norm), which a channel
permutation can act on; otherwise the shortcut is the identity. relu2 follows the residual sum, so its
input is the block's full pre-activation. Every stage's residual stream shares one permutation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..permutation import PermutationSpec, conv_axes, dense_axes, norm_axes
from .norm import make_norm


class ConvNormReLU(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = make_norm(norm, cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.norm(self.conv(x)))


class Shortcut(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.norm = make_norm(norm, cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, cout)
        self.shortcut = Shortcut(cin, cout, norm, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        h = self.relu1(self.norm1(self.conv1(x)))
        return self.relu2(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, width: int = 1, norm: str = "bn", num_classes: int = 10, in_channels: int = 3,
                 blocks_per_stage: int = 3):
        super().__init__()
        if width < 1 or blocks_per_stage < 1:
            raise ValueError(f"ResNet-20 needs width >= 1 and blocks >= 1, got {width}, {blocks_per_stage}")
        self.config = {"arch": "resnet20", "width": width, "norm": norm, "num_classes": num_classes,
                       "in_channels": in_channels, "blocks_per_stage": blocks_per_stage}
        chans = [16 * width, 32 * width, 64 * width]
        self.stem = ConvNormReLU(in_channels, chans[0], norm)
        prev = chans[0]
        for s, c in enumerate(chans, start=1):
            blocks = [BasicBlock(prev if b == 0 else c, c, norm, stride=(2 if (b == 0 and s > 1) else 1))
                      for b in range(blocks_per_stage)]
            setattr(self, f"stage{s}", nn.Sequential(*blocks))  # children named 0, 1, 2
            prev = c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        axes = conv_axes("stem.conv", "S1", None)
        axes.update(norm_axes("stem.norm", "S1", self.stem.norm))
        acts = {"S1": ["stem.relu"]}
        prev_stream = "S1"
        for s in (1, 2, 3):
            stream = f"S{s}"
            for b, block in enumerate(getattr(self, f"stage{s}")):
                name, inner = f"stage{s}.{b}", f"S{s}B{b}"
                axes.update(conv_axes(f"{name}.conv1", inner, prev_stream))
                axes.update(norm_axes(f"{name}.norm1", inner, block.norm1))
                axes.update(conv_axes(f"{name}.conv2", stream, inner))
                axes.update(norm_axes(f"{name}.norm2", stream, block.norm2))
                if isinstance(block.shortcut, Shortcut):
                    axes.update(conv_axes(f"{name}.shortcut.conv", stream, prev_stream))
                    axes.update(norm_axes(f"{name}.shortcut.norm", stream, block.shortcut.norm))
                acts[inner] = [f"{name}.relu1"]
                acts.setdefault(stream, []).append(f"{name}.relu2")
                prev_stream = stream
        axes.update(dense_axes("head", None, prev_stream))
        return PermutationSpec(axes, acts)
