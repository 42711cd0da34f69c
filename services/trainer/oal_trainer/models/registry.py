"""The model registry: a fresh model by name, with the interface the trainer relies on.

Every model maps images (B, C, H, W) to logits (B, K) and, with `return_feature=True`, also to the
penultimate features h (B, D) that the KD and MICL losses act on; `feature_dim` is D. `head` is the
final linear layer, kept separate so outlier features that never pass the backbone (latents) can
still get logits.

Names: the project's own ResNets (`RESNET_SPECS`), `torchvision.<arch>` for the torchvision
architectures in `TORCHVISION_MODELS`, `timm.<name>` for any timm model (optional extra), and
`vit_b16`, the paper's ViT-B/16 teacher (timm's vit_base_patch16_224).
"""

from __future__ import annotations

from torch import nn

from oal_shared.errors import ConfigError
from oal_trainer.models.library import (
    DEFAULT_IMAGE_SIZE,
    STEMS,
    TIMM_PREFIX,
    TORCHVISION_MODELS,
    TORCHVISION_PREFIX,
    build_timm,
    build_torchvision,
)
from oal_trainer.models.resnets import RESNET_SPECS, ResNet

MODEL_ALIASES = {"vit_b16": TIMM_PREFIX + "vit_base_patch16_224"}

MODEL_NAMES: tuple[str, ...] = (
    *RESNET_SPECS,
    *MODEL_ALIASES,
    *(TORCHVISION_PREFIX + arch for arch in TORCHVISION_MODELS),
)


def is_library_model(name: str) -> bool:
    """Whether `name` is built by torchvision or timm (and so depends on the image size and stem)."""
    name = MODEL_ALIASES.get(name, name)
    return name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX))


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int | None = None, stem: str = "auto"
) -> nn.Module:
    """A fresh model by name, for images of `image_size` px (library models; default 224).

    `stem` (auto, imagenet, cifar) shapes the first layers of torchvision models (models/library.py);
    the project's ResNets have theirs in the name. Unknown name -> ConfigError listing the known ones.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    if stem not in STEMS:
        raise ConfigError(f"model_stem: must be one of {', '.join(STEMS)}, got {stem!r}")
    size = image_size or DEFAULT_IMAGE_SIZE
    if name in RESNET_SPECS:
        if stem != "auto":
            raise ConfigError(f"model_stem: {name} has its stem in its name; leave model_stem=auto")
        return ResNet(RESNET_SPECS[name], num_classes, in_channels)
    library_name = MODEL_ALIASES.get(name, name)
    if library_name.startswith(TORCHVISION_PREFIX):
        return build_torchvision(library_name.removeprefix(TORCHVISION_PREFIX), num_classes, in_channels, size, stem)
    if library_name.startswith(TIMM_PREFIX):
        return build_timm(library_name.removeprefix(TIMM_PREFIX), num_classes, in_channels, size, stem, name)
    raise ConfigError(f"model: unknown name {name!r}; known: {', '.join(MODEL_NAMES)}, or timm.<any timm model>")
