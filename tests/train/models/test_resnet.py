"""The ResNet-50 family: the torchvision model wrapped with stages, logits and a loss."""

from __future__ import annotations

import torch

from train.models import build_model
from train.models.resnet import ResNetConfig


def test_resnet50_wrapper_has_stages_logits_and_loss():
    torch.manual_seed(0)
    model = build_model(ResNetConfig(num_classes=10))
    assert len(model.layers) == 4
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    assert model(images).shape == (2, 10)
    assert torch.isfinite(model(images, labels))
