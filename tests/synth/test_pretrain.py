"""Pretraining the embedded generator: the folder it writes, its info and report, presets, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from oal_shared.errors import ConfigError
from oal_synth.generators.base import GENERATOR_INFO_FILE
from oal_synth.generators.condition_encoder import ConditionEncoder, ConditionEncoderConfig, encoder_space_hash
from oal_synth.generators.files import PRETRAIN_REPORT_FILE, content_hash, read_generator_info
from oal_synth.pretrain import (
    PRESETS,
    PretrainConfig,
    encode_dataset,
    pad_to_vae,
    train_condition_encoder,
    with_overrides,
)
from tests.utils.tiny_sd import smoke_generator_folder, tiny_model_runtime


@pytest.fixture(autouse=True)
def _tiny_model_kernels():
    with tiny_model_runtime():
        yield


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory) -> Path:
    return smoke_generator_folder(tmp_path_factory.getbasetemp())


def test_smoke_pretrain_writes_a_complete_generator_folder(smoke_folder):
    for part in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "condition_encoder/config.json",
        "condition_encoder/model.safetensors",
        GENERATOR_INFO_FILE,
        PRETRAIN_REPORT_FILE,
    ):
        assert (smoke_folder / part).is_file(), part
    assert not [p for p in smoke_folder.rglob("*") if p.suffix in {".bin", ".pkl", ".pt", ".ckpt"}]
    index = json.loads((smoke_folder / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    # Trained in a hidden sibling folder and renamed: nothing is left beside the result.
    assert [p.name for p in smoke_folder.parent.iterdir()] == [smoke_folder.name]


def test_generator_info_pins_the_files_and_the_space(smoke_folder):
    info = read_generator_info(smoke_folder)
    assert info.content_hash == content_hash(smoke_folder)
    encoder = ConditionEncoder.from_pretrained(smoke_folder / "condition_encoder")
    assert info.space == f"fmnist-ldm/{encoder_space_hash(encoder)}"
    assert (info.kind, info.embed_dim, info.latent_shape) == ("embedded", 64, (4, 8, 8))
    assert info.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")


def test_scaling_factor_is_one_over_the_latent_std(smoke_folder):
    from oal_shared.data.benchmark import load_benchmark

    info = read_generator_info(smoke_folder)
    report = json.loads((smoke_folder / PRETRAIN_REPORT_FILE).read_text())
    vae = AutoencoderKL.from_pretrained(smoke_folder / "vae").eval()
    assert (
        vae.config.scaling_factor
        == pytest.approx(info.scaling_factor)
        == pytest.approx(report["vae"]["scaling_factor"])
    )
    # Re-measure on the same images (posterior means; the training draw adds the posterior noise).
    images = load_benchmark("fmnist-osr").id_train.images[:256]
    mean, std = encode_dataset(vae, pad_to_vae(images))
    measured = 1.0 / float(torch.sqrt(mean.var() + std.pow(2).mean()))
    assert info.scaling_factor == pytest.approx(measured, rel=0.15)


def test_pretrain_report_records_config_losses_and_quality(smoke_folder):
    report = json.loads((smoke_folder / PRETRAIN_REPORT_FILE).read_text())
    smoke = PRESETS["smoke"]
    assert report["config"]["name"] == "smoke" and report["config"]["unet_steps"] == smoke.unet_steps
    assert [len(report["losses"][stage]) for stage in ("encoder", "vae", "unet")] == [
        smoke.encoder_steps,
        smoke.vae_steps,
        smoke.unet_steps,
    ]
    assert 0.0 <= report["encoder"]["test_accuracy"] <= 1.0
    assert 0.0 < report["vae"]["test_reconstruction_mse"] < 1.0
    assert report["train_images"] == smoke.train_images


def test_condition_encoder_pulls_classes_apart():
    # Two separable synthetic "classes" (bright top half vs bright bottom half): a few dozen steps
    # of cos/tau cross-entropy must classify them and leave the class means far apart on the sphere.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(128, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), 64)
    images[labels == 0, :14] += 180
    images[labels == 1, 14:] += 180
    config = with_overrides(PRESETS["smoke"], encoder_steps=40, encoder_batch=32, warmup_steps=2)
    encoder_config = ConditionEncoderConfig(widths=(8, 16), num_classes=2, class_names=("top", "bottom"))
    encoder, run = train_condition_encoder(images, labels, encoder_config, config, progress=False)
    vectors = encoder.embed(images)
    accuracy = float((encoder.logits(vectors).argmax(1).numpy() == labels).mean())
    cosine = torch.nn.functional.cosine_similarity(vectors[:64].mean(0), vectors[64:].mean(0), dim=0)
    assert accuracy == 1.0 and run.losses[-1] < run.losses[0]
    assert cosine < 0.5


def test_condition_encoder_round_trips_through_safetensors(tmp_path):
    encoder = ConditionEncoder(ConditionEncoderConfig(widths=(8, 16), class_names=tuple("abcdef"))).eval()
    encoder.save_pretrained(tmp_path / "enc")
    loaded = ConditionEncoder.from_pretrained(tmp_path / "enc")
    images = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    torch.testing.assert_close(loaded.embed(images), encoder.embed(images))
    assert loaded.config == encoder.config and encoder_space_hash(loaded) == encoder_space_hash(encoder)


def test_condition_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    ConditionEncoder(ConditionEncoderConfig(widths=(8, 16))).save_pretrained(tmp_path / "enc")
    config_path = tmp_path / "enc" / "config.json"
    config = json.loads(config_path.read_text())
    config["embed_dim"] = 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model.safetensors: weights do not fit"):
        ConditionEncoder.from_pretrained(tmp_path / "enc")


def test_presets_and_overrides_are_checked():
    assert PretrainConfig.preset("demo").name == "demo"
    with pytest.raises(ConfigError, match="pretrain preset must be one of smoke, demo, full, got 'huge'"):
        PretrainConfig.preset("huge")
    with pytest.raises(ConfigError, match="unet_steps must be >= 1, got 0"):
        with_overrides(PRESETS["smoke"], unet_steps=0)
    with pytest.raises(ConfigError, match=r"unknown pretrain config fields: \['epochs'\]"):
        with_overrides(PRESETS["smoke"], epochs=3)


def test_pretrain_cli_set_overrides_the_preset_and_names_a_bad_item(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from oal_synth.cli import app

    monkeypatch.setenv("OAL_TORCH_THREADS", "1")
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(app, ["pretrain", "--preset", "smoke", "--out", str(out), "--set", "vae_steps=5"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / PRETRAIN_REPORT_FILE).read_text())
    assert report["config"]["vae_steps"] == 5 and len(report["losses"]["vae"]) == 5
    assert report["config"]["unet_steps"] == PRESETS["smoke"].unet_steps

    for item, words in (("vea_steps=5", "unknown pretrain field 'vea_steps'"), ("vae_steps=many", "must be int")):
        result = runner.invoke(app, ["pretrain", "--preset", "smoke", "--out", str(tmp_path / "x"), "--set", item])
        assert result.exit_code == 3 and words in result.output, result.output
        assert not (tmp_path / "x").exists()
