"""torchvision's ResNet-50 as a registry spec: an image model, for comparison with public figures.

The model is train/model.py's ResNet50 wrapper and its counts are train/flops.py's resnet50
counters; each moves into this file once the branches that edit those modules have merged.
"""

from __future__ import annotations

from torch import nn

from train.flops import resnet50_flops_per_sample, resnet50_params
from train.model import ResNet50
from train.models import ModelSpec


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The four stages (the stem and the classifier stay with the root)."""
    return list(model.layers)


SPEC = ModelSpec(
    name="resnet50",
    build=ResNet50,
    count_params=resnet50_params,
    flops_per_sample=resnet50_flops_per_sample,
    inputs="images",
    shard_units=shard_units,
    cudnn_benchmark=True,
)
