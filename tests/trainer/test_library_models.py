"""torchvision and timm models behind build_model: the trainer's interface at 32 to 224 px, grey or RGB.

Weights files: tests/trainer/test_weights.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from oal_shared.errors import ConfigError
from oal_trainer.models import MODEL_NAMES, TORCHVISION_MODELS, LibraryModel, build_model, count_parameters

torch.set_num_threads(1)

NUM_CLASSES = 7
TORCHVISION_NAMES = [f"torchvision.{arch}" for arch in TORCHVISION_MODELS]
# One per family (ResNet, inverted residuals, ViT) at full size; the rest share their code paths.
AT_224 = ["torchvision.resnet18", "torchvision.efficientnet_b0", "torchvision.vit_b_32"]


def _check_interface(model: torch.nn.Module, in_channels: int, size: int) -> None:
    """What the trainer relies on: logits (B, K), features (B, feature_dim), head(features) = logits."""
    model.eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        logits, features = model(x, return_feature=True)
        plain = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert features.shape == (2, model.feature_dim)
    assert model.num_classes == NUM_CLASSES and model.in_channels == in_channels
    torch.testing.assert_close(model.head(features), logits)
    torch.testing.assert_close(plain, logits)


def test_every_torchvision_name_is_registered():
    assert set(TORCHVISION_NAMES) <= set(MODEL_NAMES)
    assert {"torchvision.resnet18", "torchvision.resnet50", "torchvision.wide_resnet50_2"} <= set(MODEL_NAMES)
    assert "torchvision.vit_b_16" in MODEL_NAMES


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_each_torchvision_model_runs_on_small_grey_images(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, in_channels=1, image_size=32)
    assert isinstance(model, LibraryModel)
    _check_interface(model, 1, 32)


@pytest.mark.parametrize("name", AT_224)
def test_torchvision_families_run_on_224_rgb_images(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, in_channels=3, image_size=224)
    assert model.stem == "imagenet"
    _check_interface(model, 3, 224)


def _last_stage_side(model: LibraryModel, size: int) -> int:
    seen = {}
    hook = model.backbone.layer4.register_forward_hook(lambda _m, _i, out: seen.update(side=out.shape[-1]))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    hook.remove()
    return seen["side"]


def test_cifar_stem_keeps_resolution_and_the_weights_shapes():
    cifar = build_model("torchvision.resnet18", NUM_CLASSES, 3, 32, stem="cifar")
    imagenet = build_model("torchvision.resnet18", NUM_CLASSES, 3, 32, stem="imagenet")
    # 32 px: the ImageNet stem leaves 1x1 at the last stage, the stride-1 stem without max-pool 4x4.
    assert _last_stage_side(cifar, 32) == 4 and _last_stage_side(imagenet, 32) == 1
    assert isinstance(cifar.backbone.maxpool, torch.nn.Identity)
    assert cifar.backbone.conv1.stride == (1, 1) and cifar.backbone.conv1.kernel_size == (7, 7)
    # Same tensors, same shapes as torchvision's own ResNet-18: its weights load into either stem.
    reference = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    assert count_parameters(cifar) == count_parameters(imagenet) == count_parameters(reference)
    ours = {k.removeprefix("backbone."): v.shape for k, v in cifar.state_dict().items()}
    theirs = {
        k.replace("fc.", "head.", 1) if k.startswith("fc.") else k: v.shape for k, v in reference.state_dict().items()
    }
    assert ours == theirs


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("torchvision.resnet18", 28, "cifar"),
        ("torchvision.resnet18", 63, "cifar"),
        ("torchvision.resnet18", 64, "imagenet"),
        ("torchvision.efficientnet_b0", 32, "cifar"),
        ("torchvision.convnext_tiny", 32, "imagenet"),  # a patchify stem has no stride-1 form
        ("torchvision.vit_b_16", 32, "imagenet"),
    ],
)
def test_auto_stem_follows_the_image_size(name, size, expected):
    assert build_model(name, NUM_CLASSES, 3, size).stem == expected


def test_grey_first_convolution_takes_one_channel():
    model = build_model("torchvision.resnet34", NUM_CLASSES, 1, 32)
    assert model.backbone.conv1.in_channels == 1
    assert model.first_conv_key == "backbone.conv1.weight"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("torchvision.vit_b_16", {"image_size": 28}, "image size 28 is not a multiple of 16"),
        ("torchvision.vit_b_16", {"image_size": 32, "stem": "cifar"}, "model_stem: torchvision.vit_b_16 has no cifar"),
        (
            "torchvision.resnet18",
            {"image_size": 32, "stem": "tiny"},
            "model_stem: must be one of auto, imagenet, cifar",
        ),
        ("resnet_small", {"stem": "cifar"}, "model_stem: resnet_small has its stem in its name"),
        ("torchvision.alexnet", {}, "unknown torchvision model 'alexnet'; known: torchvision.resnet18"),
        ("tv.resnet18", {}, "model: unknown name 'tv.resnet18'.*timm.<any timm model>"),
    ],
)
def test_models_that_cannot_be_built_say_why(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, NUM_CLASSES, 3, **kwargs)


def test_channels_last_gives_the_same_output_for_a_library_model():
    torch.manual_seed(0)
    model = build_model("torchvision.resnet18", NUM_CLASSES, 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# timm is an optional extra (oal-ood[models]; the dev extra pulls it in).
@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install 'oal-ood[models]')")


@pytest.mark.parametrize(("arch", "size", "in_channels"), [("resnet18", 32, 1), ("resnet18", 224, 3)])
def test_timm_cnn_runs_at_its_sizes(timm, arch, size, in_channels):
    torch.manual_seed(0)
    model = build_model(f"timm.{arch}", NUM_CLASSES, in_channels, size)
    assert model.source_head == "fc" and model.feature_dim == 512
    _check_interface(model, in_channels, size)


@pytest.mark.parametrize("size", [32, 224])
def test_timm_vit_is_built_for_the_image_size(timm, size):
    torch.manual_seed(0)
    model = build_model("timm.vit_tiny_patch16_224", NUM_CLASSES, 1, size)
    assert model.backbone.patch_embed.img_size == (size, size)
    assert model.feature_dim == 192
    _check_interface(model, 1, size)


def test_vit_b16_is_timms_vit_base_without_download(timm):
    model = build_model("vit_b16", NUM_CLASSES, 3, 224)
    assert model.feature_dim == 768 and model.name == "vit_b16"
    assert model.backbone.pretrained_cfg["architecture"] == "vit_base_patch16_224"
    _check_interface(model, 3, 224)


@pytest.mark.parametrize(
    ("name", "stem", "match"),
    [
        ("timm.not_a_model", "auto", "timm has no model 'not_a_model'"),
        ("timm.resnet18", "cifar", "model_stem: cifar is offered for torchvision models only"),
    ],
)
def test_timm_models_that_cannot_be_built_say_why(timm, name, stem, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, NUM_CLASSES, 3, 32, stem=stem)
