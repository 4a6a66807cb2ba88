"""The norm layers a model can use; all commute with channel permutations."""
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """'bn' BatchNorm2d, 'ln' LayerNorm over (C, H, W) with per-channel affine (GroupNorm with one
    group, which commutes with channel permutations), 'none' identity."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose 'bn', 'ln' or 'none'")
