"""Classifiers the trainer fits: small ResNets for 28x28 grey images, ResNet-18 for 32x32 and 224x224.

Every model maps images (B, C, H, W) to logits (B, K) and, with `return_feature=True`, also to the
penultimate features h (B, D) that the KD and MICL losses act on. `head` is the final linear layer,
kept separate so outlier features that never pass the backbone (latents) can still get logits.

Built bottom-up: block -> stage -> network -> registry (`build_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oal_shared.errors import ConfigError

logger = logging.getLogger(__name__)


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


class TimmViT(nn.Module):
    """A timm Vision Transformer teacher (the paper's ViT-B/16) from local weights only."""

    def __init__(self, model: nn.Module, num_classes: int, in_channels: int):
        super().__init__()
        self.backbone = model
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = int(model.num_features)
        self.head = model.get_classifier()

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        tokens = self.backbone.forward_features(x)
        h = self.backbone.forward_head(tokens, pre_logits=True)  # (B, D)
        logits = self.head(h)  # (B, K)
        return (logits, h) if return_feature else logits


def _build_timm_vit(num_classes: int, in_channels: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(
            "model vit_b16 needs timm (pip install 'oal-ood[gpu]') and local weights; timm is not installed"
        ) from exc
    try:
        # pretrained=True reads the local Hugging Face cache; offline, a missing file fails here.
        model = timm.create_model(
            "vit_base_patch16_224", pretrained=True, num_classes=num_classes, in_chans=in_channels
        )
    except Exception as exc:  # timm raises several types for "weights not in the local cache"
        raise ConfigError(
            f"model vit_b16: timm could not load local weights for vit_base_patch16_224 ({exc}); "
            "put them in the Hugging Face cache first"
        ) from exc
    return TimmViT(model, num_classes, in_channels)


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet_tiny": ResNetSpec((8, 16, 32), (1, 1, 1), "stride2", "tests only: seconds per tiny slice"),
    "resnet_small": ResNetSpec((32, 64, 128), (1, 1, 1), "stride2", "the student for 28x28 grey"),
    "resnet_wide": ResNetSpec((64, 128, 256), (2, 2, 2), "stride2", "the teacher for 28x28 grey"),
    "resnet18_32": ResNetSpec((64, 128, 256, 512), (2, 2, 2, 2), "cifar", "ResNet-18, CIFAR stem (32x32)"),
    "resnet18_224": ResNetSpec((64, 128, 256, 512), (2, 2, 2, 2), "imagenet", "ResNet-18, ImageNet stem"),
}

OTHER_MODELS: dict[str, Callable[[int, int], nn.Module]] = {"vit_b16": _build_timm_vit}

MODEL_NAMES: tuple[str, ...] = (*RESNET_SPECS, *OTHER_MODELS)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The registry: a fresh model by name. Unknown name -> ConfigError listing the known ones."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    if name in RESNET_SPECS:
        return ResNet(RESNET_SPECS[name], num_classes, in_channels)
    if name in OTHER_MODELS:
        return OTHER_MODELS[name](num_classes, in_channels)
    raise ConfigError(f"model: unknown name {name!r}; known: {', '.join(MODEL_NAMES)}")


class OutlierProjector(nn.Module):
    """P: reduced outlier latent f_ood (B, F) -> a point in the student's feature space (B, D).

    Latent outliers have no pixels, so the student cannot compute their logits; `head(P(f_ood))`
    gives them logits through the student's own classifier (oal-energy). The ReLU matches the
    student's features, which leave a ReLU and an average pool and so are never negative.
    """

    def __init__(self, in_dim: int, feature_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.ReLU())

    def forward(self, f_ood: torch.Tensor) -> torch.Tensor:
        return self.net(f_ood)  # (B, D)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
