"""Networks users already have: torchvision and timm architectures, wrapped as the trainer sees a model.

Built with random weights only (torchvision `weights=None`, timm `pretrained=False`): nothing is
downloaded at run time. Weights come from a local file (oal_trainer.weights), in the library's own
state-dict layout, which `LibraryModel.to_model_key` translates.

Small inputs. A ResNet-family stem halves 224 px twice before the first stage; at 32 px that leaves
a 1x1 map at the last stage. The `cifar` stem keeps the first convolution's kernel (so ImageNet
weights still load) at stride 1 and drops the max-pool; `auto` picks it below SMALL_INPUT px.
Grey images: the first convolution takes one channel (weights made for RGB are summed over their
input channels when loaded, which equals feeding the grey image repeated three times). ViTs are
built for the image size; position embeddings made for another are resampled by the library's own
function when loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from oal_shared.errors import ConfigError

STEMS = ("auto", "imagenet", "cifar")
SMALL_INPUT = 64  # px: below this, `auto` picks the cifar stem where a family offers one
DEFAULT_IMAGE_SIZE = 224
TORCHVISION_PREFIX = "torchvision."
TIMM_PREFIX = "timm."


class LibraryModel(nn.Module):
    """backbone: images (B, C, H, W) -> penultimate features h (B, D); head: h -> logits (B, K).

    `source_head` is where the classifier lives in the library's own state dict (e.g. "fc"), so a
    state dict saved from the plain torchvision / timm model maps onto this one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        *,
        name: str,
        in_channels: int,
        source_head: str,
        first_conv: str,
        stem: str,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.num_classes = head.out_features
        self.in_channels = in_channels
        self.feature_dim = head.in_features
        self.source_head = source_head
        self.first_conv_key = f"backbone.{first_conv}.weight"
        self.stem = stem  # resolved: "imagenet" or "cifar"
        # ViTs: the position embeddings' key, how many tokens precede the patch grid, and the library's
        # own resampler (embeddings (1, L, D), new grid side) -> (1, prefix + side^2, D); None for CNNs.
        self.position_key: str | None = None
        self.prefix_tokens = 0
        self.resample_positions: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        h = self.backbone(x)  # (B, D)
        logits = self.head(h)  # (B, K)
        return (logits, h) if return_feature else logits

    def to_model_key(self, source_key: str) -> str:
        """A key of the library's state dict -> the same tensor's key here."""
        if source_key == self.source_head or source_key.startswith(self.source_head + "."):
            return "head" + source_key[len(self.source_head) :]
        return "backbone." + source_key

    def to_source_key(self, model_key: str) -> str:
        if model_key.startswith("head."):
            return self.source_head + model_key[len("head") :]
        return model_key.removeprefix("backbone.")

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors under the library's own names: a trained student back into the plain
        torchvision / timm model (built with the same stem and input channels)."""
        return {self.to_source_key(key): value for key, value in self.state_dict().items()}


@dataclass(frozen=True)
class TorchvisionSpec:
    """Where one torchvision family keeps its first convolution, max-pool and classifier."""

    first_conv: str
    head: str  # the final nn.Linear
    pool: str | None = None  # max-pool right after the first convolution
    small_stem: bool = True  # whether a stride-1 first convolution makes sense (not for patchify stems)
    patch: int | None = None  # ViT patch size: the image size must be a multiple


_RESNET = TorchvisionSpec(first_conv="conv1", head="fc", pool="maxpool")
TORCHVISION_MODELS: dict[str, TorchvisionSpec] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    "resnet101": _RESNET,
    "wide_resnet50_2": _RESNET,
    "resnext50_32x4d": _RESNET,
    "densenet121": TorchvisionSpec(first_conv="features.conv0", head="classifier", pool="features.pool0"),
    "efficientnet_b0": TorchvisionSpec(first_conv="features.0.0", head="classifier.1"),
    "mobilenet_v3_large": TorchvisionSpec(first_conv="features.0.0", head="classifier.3"),
    "convnext_tiny": TorchvisionSpec(first_conv="features.0.0", head="classifier.2", small_stem=False),
    "vit_b_16": TorchvisionSpec(first_conv="conv_proj", head="heads.head", small_stem=False, patch=16),
    "vit_b_32": TorchvisionSpec(first_conv="conv_proj", head="heads.head", small_stem=False, patch=32),
}


def resolve_stem(name: str, stem: str, image_size: int, small_stem: bool) -> str:
    """auto -> cifar below SMALL_INPUT px where the family offers it, else imagenet; cifar where not -> error."""
    if stem not in STEMS:
        raise ConfigError(f"model_stem: must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem == "cifar" and not small_stem:
        raise ConfigError(f"model_stem: {name} has no cifar stem (its first layer cuts patches); use auto or imagenet")
    if stem == "auto":
        return "cifar" if small_stem and image_size < SMALL_INPUT else "imagenet"
    return stem


def _replace(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted `path` inside `model`; returns what was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent.get_submodule(child)
    setattr(parent, child, module)
    return old


@torch.no_grad()
def _adapted_conv(conv: nn.Conv2d, in_channels: int, stride: int | tuple[int, ...]) -> nn.Conv2d:
    """The same convolution for `in_channels` inputs at `stride`, keeping the library's initial weights
    (its first input channels): the kernel shape, and so the weights a file may hold, stay the same."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    new.weight.copy_(conv.weight[:, :in_channels])
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


def build_torchvision(arch: str, num_classes: int, in_channels: int, image_size: int, stem: str) -> LibraryModel:
    import torchvision
    from torchvision.models.vision_transformer import interpolate_embeddings

    name = TORCHVISION_PREFIX + arch
    spec = TORCHVISION_MODELS.get(arch)
    if spec is None:
        known = ", ".join(TORCHVISION_PREFIX + known_arch for known_arch in TORCHVISION_MODELS)
        raise ConfigError(f"model: unknown torchvision model {arch!r}; known: {known}")
    kwargs: dict[str, int] = {}
    if spec.patch is not None:
        if image_size % spec.patch:
            raise ConfigError(
                f"model: {name} cuts {spec.patch}x{spec.patch} patches; image size {image_size} is not a multiple "
                f"of {spec.patch} (resize the benchmark's images, or pick another model)"
            )
        kwargs["image_size"] = image_size
    stem = resolve_stem(name, stem, image_size, spec.small_stem)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    head = _replace(net, spec.head, nn.Identity())
    conv = net.get_submodule(spec.first_conv)
    if in_channels != conv.in_channels or stem == "cifar":
        _replace(net, spec.first_conv, _adapted_conv(conv, in_channels, 1 if stem == "cifar" else conv.stride))
    if stem == "cifar" and spec.pool is not None:
        _replace(net, spec.pool, nn.Identity())
    model = LibraryModel(
        net,
        head,
        name=name,
        in_channels=in_channels,
        source_head=spec.head,
        first_conv=spec.first_conv,
        stem=stem,
    )
    if spec.patch is not None:
        patch = spec.patch
        model.position_key, model.prefix_tokens = "backbone.encoder.pos_embedding", 1  # the class token
        model.resample_positions = lambda positions, side: interpolate_embeddings(
            side * patch, patch, OrderedDict({"encoder.pos_embedding": positions})
        )["encoder.pos_embedding"]
    return model


def build_timm(arch: str, num_classes: int, in_channels: int, image_size: int, stem: str, name: str) -> LibraryModel:
    """Any timm model by its timm name; ViT-like models (fixed input size) are built for `image_size`."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"model {name} needs timm, which is not installed (pip install 'oal-ood[models]')") from exc
    if stem == "cifar":
        raise ConfigError(f"model_stem: cifar is offered for torchvision models only; {name} keeps timm's own stem")
    if not timm.is_model(arch):
        raise ConfigError(f"model: timm has no model {arch!r} (timm.list_models() lists them)")
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    kwargs: dict[str, int] = {}
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_size  # position embeddings are sized for the input
    # num_classes=0: timm's model ends at the pooled pre-logits features; the head is ours.
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
    except (AssertionError, ValueError, TypeError, RuntimeError) as exc:  # timm's checks of sizes and options
        raise ConfigError(
            f"model: timm could not build {arch} for {in_channels}-channel {image_size} px images ({exc})"
        ) from exc
    source_head, first_conv = net.pretrained_cfg.get("classifier"), net.pretrained_cfg.get("first_conv")
    if not isinstance(source_head, str) or not isinstance(first_conv, str):
        raise ConfigError(f"model: {name} has several classifier heads or input layers; pick a single-head model")
    feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    model = LibraryModel(
        net,
        nn.Linear(feature_dim, num_classes),
        name=name,
        in_channels=in_channels,
        source_head=source_head,
        first_conv=first_conv,
        stem="imagenet",
    )
    if isinstance(getattr(net, "pos_embed", None), nn.Parameter):
        # As timm's own checkpoint filter counts them: no class-token position when no_embed_class.
        prefix = 0 if getattr(net, "no_embed_class", False) else int(getattr(net, "num_prefix_tokens", 1))
        model.position_key, model.prefix_tokens = "backbone.pos_embed", prefix
        model.resample_positions = lambda positions, side: timm.layers.resample_abs_pos_embed(
            positions, [side, side], num_prefix_tokens=prefix
        )
    return model
