"""The model registry: shapes, feature widths, ResNet-18 structure, errors naming the model.

torchvision and timm models: tests/trainer/test_library_models.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from oal_shared.errors import ConfigError
from oal_trainer.checkpoint import load_weights, save_weights
from oal_trainer.models import (
    MODEL_NAMES,
    RESNET_SPECS,
    OutlierProjector,
    build_model,
    count_parameters,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_small", "resnet_wide"])
def test_grey_28_models_give_logits_and_penultimate_features(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=6, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, features = model(x, return_feature=True)
    assert logits.shape == (3, 6)
    assert features.shape == (3, model.feature_dim)
    assert model.feature_dim == RESNET_SPECS[name].widths[-1]
    assert model.num_classes == 6
    # The head alone maps features to the same logits (oal-energy relies on that split).
    torch.testing.assert_close(model.head(features), logits)
    torch.testing.assert_close(model(x), logits)


def test_teacher_is_larger_than_student():
    student = build_model("resnet_small", 6, 1)
    teacher = build_model("resnet_wide", 6, 1)
    assert count_parameters(teacher) > 5 * count_parameters(student)
    assert teacher.feature_dim > student.feature_dim


@pytest.mark.parametrize(("name", "size"), [("resnet18_32", 32), ("resnet18_224", 224)])
def test_resnet18_matches_torchvision_parameter_count(name, size):
    model = build_model(name, num_classes=10, in_channels=3).eval()
    reference = torchvision.models.resnet18(num_classes=10)
    assert model.feature_dim == 512
    stem_difference = 0
    if name == "resnet18_32":
        # CIFAR stem: 3x3 conv instead of 7x7 (torchvision's is 64*3*7*7).
        stem_difference = 64 * 3 * 7 * 7 - 64 * 3 * 3 * 3
    assert count_parameters(model) == count_parameters(reference) - stem_difference
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, size, size), return_feature=True)
    assert logits.shape == (1, 10) and features.shape == (1, 512)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 6, 1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_model_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="model: unknown name 'resnet_huge'") as excinfo:
        build_model("resnet_huge", 6, 1)
    for name in MODEL_NAMES:
        assert name in str(excinfo.value)


@pytest.mark.parametrize(("num_classes", "in_channels", "field"), [(1, 1, "num_classes"), (6, 2, "in_channels")])
def test_bad_shapes_are_refused_naming_the_argument(num_classes, in_channels, field):
    with pytest.raises(ConfigError, match=field):
        build_model("resnet_tiny", num_classes, in_channels)


def test_vit_teacher_without_timm_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError, as when not installed
    with pytest.raises(ConfigError, match=r"vit_b16 needs timm.*oal-ood\[models\]"):
        build_model("vit_b16", 6, 3)


def test_weights_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 6, 1).to(memory_format=torch.channels_last)
    path = save_weights(model, tmp_path / "model.safetensors", {"model": "resnet_tiny"})
    torch.manual_seed(1)
    fresh = build_model("resnet_tiny", 6, 1)
    metadata = load_weights(fresh, path)
    assert metadata["model"] == "resnet_tiny"
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*tmp*")), "the atomic write left a temp file"


def test_projector_maps_latents_into_the_non_negative_feature_space():
    projector = OutlierProjector(in_dim=256, feature_dim=32)
    out = projector(torch.randn(5, 256))
    assert out.shape == (5, 32)
    assert (out >= 0).all()
