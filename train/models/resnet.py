"""torchvision's ResNet-50 as a registry spec: an image model, for comparison with public figures.

The family in one file: its config, the model (torchvision's network regrouped for FSDP), its
parameter and FLOP counts from the config alone, and SPEC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.errors import require_positive
from train.models.spec import ModelSpec, ParamCount

# ResNet-50 at 224²: 4.09 G multiply-adds forward (torchvision's "GFLOPS" figure counts a
# multiply-add as one), i.e. 8.18 GFLOP counting both, the unit peak FLOP/s tables use.
RESNET50_FORWARD_FLOPS_224 = 8.18e9
# ResNet-50 without its classifier; the classifier adds (2048 + 1) per class.
RESNET50_BACKBONE_PARAMS = 23_508_032
RESNET50_FEATURES = 2048


@dataclass
class ResNetConfig(ModelConfig):
    """The `model:` keys of model.arch=resnet50."""

    arch: str = "resnet50"
    """The model family."""
    num_classes: int = 1000
    """Classes of the classifier head (an image folder's class folders must not exceed it)."""
    image_size: int = 224
    """Side of the square input images; FLOPs scale with the pixel count."""


class ResNet50(nn.Module):
    """torchvision's ResNet-50 regrouped as stem, `layers` (its four stages, for FSDP) and head."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        import torchvision  # only image runs need it

        net = torchvision.models.resnet50(num_classes=cfg.num_classes)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.pool = net.avgpool
        self.fc = net.fc

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """images [batch, 3, H, W] -> logits [batch, classes], or the mean cross-entropy given labels."""
        x = self.stem(images)
        for stage in self.layers:
            x = stage(x)
        logits = self.fc(torch.flatten(self.pool(x), 1))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels)


def resnet50_params(cfg: ResNetConfig) -> ParamCount:
    """torchvision's ResNet-50 with cfg.num_classes outputs."""
    total = RESNET50_BACKBONE_PARAMS + (RESNET50_FEATURES + 1) * cfg.num_classes
    return ParamCount(total=total, active=total, embedding=0)


def resnet50_flops_per_sample(cfg: ResNetConfig, seq_len: int) -> float:
    """ResNet-50: 3 x forward FLOPs (backward ~ 2 x forward), forward 8.18 GFLOP at 224x224 scaled by
    (image_size / 224)^2 since conv work grows with the pixel count.
    """
    return 3.0 * RESNET50_FORWARD_FLOPS_224 * (cfg.image_size / 224) ** 2


# Numbers ResNet-50 keeps for its backward per input pixel of one image, weights left out: measured with
# torch.autograd.graph.saved_tensors_hooks on torch 2.4.1 (CPU, fp32) at 64 px (441) and 128 px (431);
# 400 keeps the estimate below both (a lower bound, train/memory_bound.py).
SAVED_PER_PIXEL = 400
# Without gradients: the image and the stem's output (64 channels at half the resolution) at once.
LIVE_PER_PIXEL = 3 + 64 // 4


def resnet50_activations(cfg: ResNetConfig, seq_len: int, training: bool) -> float:
    """Numbers one image holds at once, a lower bound: conv activations grow with the pixel count."""
    return float(cfg.image_size) ** 2 * (SAVED_PER_PIXEL if training else LIVE_PER_PIXEL)


def validate_resnet(cfg: ResNetConfig) -> None:
    require_positive({"model.num_classes": cfg.num_classes, "model.image_size": cfg.image_size})


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The four stages (the stem and the classifier stay with the root)."""
    return list(model.layers)


SPEC = ModelSpec(
    name="resnet50",
    config=ResNetConfig,
    build=ResNet50,
    count_params=resnet50_params,
    flops_per_sample=resnet50_flops_per_sample,
    inputs="images",
    shard_units=shard_units,
    validate=validate_resnet,
    cudnn_benchmark=True,
    activations=resnet50_activations,
)
