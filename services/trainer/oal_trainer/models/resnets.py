"""The project's own ResNets: small ones for 28x28 grey images, ResNet-18 for 32x32 and 224x224.

Built bottom-up: block -> stage -> network; `RESNET_SPECS` names each variant (models/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oal_shared.errors import ConfigError


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@dataclass(frozen=True)
class ResNetSpec:
    """Shape of one ResNet variant; the registry holds one per model name."""

    widths: tuple[int, ...]  # channels per stage
    blocks: tuple[int, ...]  # residual blocks per stage
    stem: str  # "stride2" (28x28: 3x3 stride 2), "cifar" (3x3 stride 1), "imagenet" (7x7 stride 2 + max-pool)
    description: str = ""


class ResNet(nn.Module):
    """A ResNet with a chosen stem; stage i > 0 halves the resolution."""

    first_conv_key = "stem.0.weight"  # what a weights file for RGB images is adapted at (oal_trainer.weights)

    def __init__(self, spec: ResNetSpec, num_classes: int, in_channels: int):
        super().__init__()
        if len(spec.widths) != len(spec.blocks):
            raise ConfigError(f"ResNetSpec widths {spec.widths} and blocks {spec.blocks} differ in length")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = spec.widths[-1]
        first = spec.widths[0]
        if spec.stem == "stride2":
            # Halving 28x28 at once cuts compute 4x at the same accuracy (docs/BENCHMARKS.md).
            stem = [nn.Conv2d(in_channels, first, 3, stride=2, padding=1, bias=False)]
        elif spec.stem == "cifar":
            stem = [nn.Conv2d(in_channels, first, 3, stride=1, padding=1, bias=False)]
        elif spec.stem == "imagenet":
            stem = [nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False)]
        else:
            raise ConfigError(f"ResNetSpec stem must be stride2, cifar or imagenet, got {spec.stem!r}")
        stem += [nn.BatchNorm2d(first), nn.ReLU(inplace=True)]
        if spec.stem == "imagenet":
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages = []
        channels = first
        for index, (width, count) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            blocks = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(self.feature_dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features h: (B, C, H, W) -> (B, D)."""
        out = self.stages(self.stem(x))  # (B, D, h, w)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # (B, D)

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        h = self.features(x)  # (B, D)
        logits = self.head(h)  # (B, K)
        return (logits, h) if return_feature else logits


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet_tiny": ResNetSpec((8, 16, 32), (1, 1, 1), "stride2", "tests only: seconds per tiny slice"),
    "resnet_small": ResNetSpec((32, 64, 128), (1, 1, 1), "stride2", "the student for 28x28 grey"),
    "resnet_wide": ResNetSpec((64, 128, 256), (2, 2, 2), "stride2", "the teacher for 28x28 grey"),
    "resnet18_32": ResNetSpec((64, 128, 256, 512), (2, 2, 2, 2), "cifar", "ResNet-18, CIFAR stem (32x32)"),
    "resnet18_224": ResNetSpec((64, 128, 256, 512), (2, 2, 2, 2), "imagenet", "ResNet-18, ImageNet stem"),
}
