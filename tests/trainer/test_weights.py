"""Weights files into models: torchvision / timm state dicts as safetensors, heads of another size,
grey images, pickles refused, and every tensor that does not fit named with both shapes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from oal_shared.errors import ConfigError
from oal_shared.settings import Settings
from oal_trainer.checkpoint import save_weights, sha256_file
from oal_trainer.fit import fit
from oal_trainer.models import build_model
from oal_trainer.recipes import resolve_config
from oal_trainer.teacher import load_run_model, load_weights_model
from oal_trainer.weights import fit_state_dict, load_weights_file, read_state_dict
from tests.utils.trainer_runs import tiny_config

torch.set_num_threads(1)


class NotATensor:
    """A pickled object that is no tensor: torch.load(weights_only=True) must refuse to build it."""


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """What a user makes: torchvision's ResNet-18 state dict (ImageNet's 1000 classes) saved as safetensors."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(weights=None).state_dict(), str(path))
    return path


def _reference(path: Path) -> torchvision.models.ResNet:
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(read_state_dict(path, "test"))
    return model.eval()


def test_a_torchvision_state_dict_round_trips(resnet18_file):
    model = build_model("torchvision.resnet18", 1000, 3, 224).eval()
    fit = load_weights_file(model, resnet18_file, "init_weights", reinit_head=True)
    assert not fit.head_reinitialised and fit.adapted == ()
    assert fit.sha256 == sha256_file(resnet18_file)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(resnet18_file)(x))


def test_a_trained_model_goes_back_into_the_plain_torchvision_model():
    torch.manual_seed(0)
    model = build_model("torchvision.resnet18", 10, 3, 224).eval()
    plain = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    plain.load_state_dict(model.library_state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_a_head_of_another_size_is_reinitialised_and_the_rest_loaded(resnet18_file, caplog):
    torch.manual_seed(1)
    model = build_model("torchvision.resnet18", 10, 3, 32)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="oal_trainer.weights"):
        fit = load_weights_file(model, resnet18_file, "init_weights", reinit_head=True)
    assert fit.head_reinitialised
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, fresh_head[key]), f"head.{key} was overwritten"
    reference = _reference(resnet18_file).state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert "fc.weight (1000, 512) in the file, (10, 512) here" in caplog.text
    assert "re-initialised" in caplog.text


def test_a_teacher_head_of_another_size_is_an_error(resnet18_file):
    with pytest.raises(ConfigError) as excinfo:
        load_weights_model(
            resnet18_file, "teacher_weights", "torchvision.resnet18", num_classes=10, in_channels=3, image_size=32
        )
    message = str(excinfo.value)
    assert message.startswith(f"teacher_weights: {resnet18_file} does not fit torchvision.resnet18")
    assert "trained on this benchmark's 10 classes" in message
    assert "fc.weight is (1000, 512) in the file, (10, 512) in the model" in message


def test_a_tensor_of_another_shape_is_named_with_both_shapes(resnet18_file, tmp_path):
    state = read_state_dict(resnet18_file, "test")
    state["layer2.0.conv1.weight"] = torch.zeros(96, 64, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError) as excinfo:
        load_weights_file(build_model("torchvision.resnet18", 10, 3, 32), path, "init_weights", reinit_head=True)
    message = str(excinfo.value)
    assert message.startswith(f"init_weights: {path} does not fit torchvision.resnet18:")
    assert "layer2.0.conv1.weight is (96, 64, 3, 3) in the file, (128, 64, 3, 3) in the model" in message


def test_missing_and_unexpected_tensors_are_named(resnet18_file, tmp_path):
    state = read_state_dict(resnet18_file, "test")
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError) as excinfo:
        load_weights_file(build_model("torchvision.resnet18", 1000, 3, 224), path, "init_weights")
    message = str(excinfo.value)
    assert "layer4.1.bn2.running_var is missing from the file (the model has (512,))" in message
    assert "extra.weight is in the file but not in the model" in message


def test_another_architecture_lists_the_first_problems_and_counts_the_rest(resnet18_file):
    with pytest.raises(ConfigError, match=r"does not fit torchvision.resnet34: .*; and \d+ more"):
        load_weights_file(build_model("torchvision.resnet34", 10, 3, 32), resnet18_file, "init_weights")


def test_rgb_weights_in_a_grey_model_equal_the_grey_image_repeated(resnet18_file, caplog):
    rgb = build_model("torchvision.resnet18", 1000, 3, 32).eval()
    grey = build_model("torchvision.resnet18", 1000, 1, 32).eval()
    load_weights_file(rgb, resnet18_file, "init_weights")
    with caplog.at_level(logging.INFO, logger="oal_trainer.weights"):
        fit = load_weights_file(grey, resnet18_file, "init_weights")
    assert fit.adapted and "summed over their input channels" in caplog.text
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_vit_position_embeddings_for_another_image_size_are_resampled(tmp_path, caplog):
    torch.manual_seed(0)
    state = torchvision.models.vit_b_32(weights=None).state_dict()  # 224 px: a 7x7 grid of patches
    # Embeddings that spell out their own grid position: channel 0 the row, channel 1 the column,
    # so a resampling that is right (bicubic is exact on a linear ramp) can be checked cell by cell.
    rows, cols = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    positions = torch.zeros(1, 1 + 49, 768)
    positions[0, 0, :] = 7.0  # the class token's position
    positions[0, 1:, 0], positions[0, 1:, 1] = rows.flatten(), cols.flatten()
    state["encoder.pos_embedding"] = positions
    path = tmp_path / "vit_b_32.safetensors"
    save_file(state, str(path))
    model = build_model("torchvision.vit_b_32", 10, 3, 96)  # 3x3 patches
    with caplog.at_level(logging.INFO, logger="oal_trainer.weights"):
        load_weights_file(model, path, "init_weights", reinit_head=True)
    assert "position embeddings resampled from a 7x7 to a 3x3 grid" in caplog.text
    loaded = model.backbone.encoder.pos_embedding.detach()
    assert loaded.shape == (1, 1 + 3 * 3, 768)
    torch.testing.assert_close(loaded[0, 0], positions[0, 0])  # the class token's, untouched
    # torchvision resamples with corners on corners: the 3x3 cells sit at rows and columns 0, 3, 6.
    centres = [0.0, 3.0, 6.0]
    for r in range(3):
        for c in range(3):
            cell = loaded[0, 1 + 3 * r + c]
            torch.testing.assert_close(cell[:2], torch.tensor([centres[r], centres[c]]), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_a_pickle_is_refused_without_the_flag_and_says_how_to_convert(resnet18_file, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(read_state_dict(resnet18_file, "test"), path)
    with pytest.raises(ConfigError) as excinfo:
        read_state_dict(path, "init_weights")
    message = str(excinfo.value)
    assert message.startswith(f"init_weights: {path} is a pickle file")
    assert "can run code" in message and "allow_pickle_weights=true" in message
    assert f"save_file(torch.load('{path}', weights_only=True), '{tmp_path / 'resnet18.safetensors'}')" in message


def test_with_the_flag_a_pickle_is_read_weights_only(resnet18_file, tmp_path):
    state = read_state_dict(resnet18_file, "test")
    path = tmp_path / "checkpoint.pt"
    # A training script's checkpoint: the state dict nested, names from a DDP-wrapped model.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = build_model("torchvision.resnet18", 1000, 3, 224)
    load_weights_file(model, path, "init_weights", allow_pickle=True)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_with_the_flag_a_pickle_holding_other_objects_is_still_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(ConfigError, match=r"init_weights: .*evil.pth: torch.load\(weights_only=True\) could not read"):
        read_state_dict(path, "init_weights", allow_pickle=True)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.safetensors", None, "no such file"),
        ("weights.npz", b"PK", "expected a .safetensors file"),
        ("broken.safetensors", b"not a safetensors file", "not a readable safetensors file"),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"init_weights: .*{name}.*{match}"):
        read_state_dict(path, "init_weights")


def test_a_run_model_file_loads_in_the_project_layout(tmp_path):
    torch.manual_seed(0)
    source = build_model("torchvision.resnet18", 6, 1, 28)
    path = save_weights(source, tmp_path / "model.safetensors", {"model": "torchvision.resnet18"})
    torch.manual_seed(1)
    target = build_model("torchvision.resnet18", 6, 1, 28)
    fit_state_dict(target, read_state_dict(path, "test"), path, "init_weights", reinit_head=False)
    for (key, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_a_timm_state_dict_round_trips(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'oal-ood[models]')")
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
    path = tmp_path / "timm-resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    model = build_model("timm.resnet18", 1000, 3, 64).eval()
    load_weights_file(model, path, "init_weights")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_a_timm_vit_loads_at_another_size_and_channel_count(tmp_path, caplog):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'oal-ood[models]')")
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model("timm.vit_tiny_patch16_224", 10, 1, 32)  # grey, 2x2 patches
    with caplog.at_level(logging.INFO, logger="oal_trainer.weights"):
        fit = load_weights_file(model, path, "init_weights", reinit_head=True)
    assert fit.head_reinitialised and len(fit.adapted) == 3
    assert "resampled from a 14x14 to a 2x2 grid" in caplog.text and "summed over" in caplog.text
    positions = model.backbone.pos_embed.detach()
    assert positions.shape == (1, 1 + 2 * 2, 192)
    torch.testing.assert_close(positions[:, 0], reference.pos_embed.detach()[:, 0])
    conv = model.backbone.patch_embed.proj.weight.detach()
    torch.testing.assert_close(conv, reference.patch_embed.proj.weight.detach().sum(dim=1, keepdim=True))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["init_from=/runs/ce", "init_weights=/w.safetensors"], "init_weights: give init_from .* not both"),
        (["teacher_run=/runs/t", "teacher_weights=/t.safetensors", "teacher_model=resnet_wide"], "not both"),
        (["teacher_weights=/t.safetensors"], "teacher_model: required with teacher_weights"),
        (["teacher_model=resnet_wide"], "teacher_model: only with teacher_weights"),
        (["model_stem=small"], "model_stem"),
    ],
)
def test_weights_fields_that_do_not_go_together_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("kd", overrides=overrides)


def test_kd_accepts_a_teacher_given_as_weights():
    config = resolve_config("kd", overrides=["teacher_weights=/t.safetensors", "teacher_model=torchvision.resnet18"])
    assert config.uses_teacher and config.teacher_run is None


# A torchvision ResNet-18 at the smoke slice's 28 px (stride-1 stem), a few steps: seconds, not minutes.
SMALL_TORCHVISION_RUN = {"model": "torchvision.resnet18", "train_subset": 64, "eval_subset": 32, "batch_size": 32}


def test_fit_with_a_torchvision_model_from_a_weights_file_end_to_end(resnet18_file, tmp_path):
    settings = Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1)
    ce = fit(tiny_config("ce", init_weights=resnet18_file, **SMALL_TORCHVISION_RUN), tmp_path / "ce", settings=settings)
    assert ce.steps == 2 and 0.0 <= ce.metrics["id_accuracy"] <= 1.0
    info = json.loads((tmp_path / "ce" / "run.json").read_text())
    assert info["model"]["name"] == "torchvision.resnet18" and info["model"]["feature_dim"] == 512
    assert info["init_from"]["weights_sha256"] == sha256_file(resnet18_file)
    # The run dir reloads as it was trained (stride-1 stem at 28 px), from the benchmark its config names.
    loaded = load_run_model(tmp_path / "ce", "run dir", num_classes=6, in_channels=1)
    assert loaded.model.stem == "cifar" and loaded.model.in_channels == 1
    # The finished student as a teacher given by its weights file and architecture.
    kd = tiny_config(
        "kd",
        teacher_weights=tmp_path / "ce" / "model.safetensors",
        teacher_model="torchvision.resnet18",
        init_from=tmp_path / "ce",
        evaluate=False,
        **SMALL_TORCHVISION_RUN,
    )
    result = fit(kd, tmp_path / "kd", settings=settings)
    assert result.steps == 2
    info = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert info["teacher"]["weights_sha256"] == sha256_file(tmp_path / "ce" / "model.safetensors")
