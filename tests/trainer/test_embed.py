"""`oal-train embed`: embedding sets in a Stable Diffusion folder's token space, on the tiny random SD.

Real parts throughout: the diffusers folder written by tiny-random, transformers' CLIPTokenizer and
CLIPTextModel loaded from it, fmnist-osr's ID images, and a `ce` run trained here for `projected`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from oal_shared.data.fashion_mnist import FMNIST_CLASSES
from oal_shared.embeddings import load_embedding_set
from oal_shared.errors import ConfigError
from oal_shared.settings import Settings
from oal_synth.generators import diffusion as stage_c
from oal_synth.generators.files import read_generator_info
from oal_synth.generators.stable_diffusion import StableDiffusionGenerator, describe_pipeline
from oal_trainer import cli
from oal_trainer.embed import EmbedConfig, class_tokens, load_token_space, make_embedding_set
from oal_trainer.fit import fit
from tests.utils.tiny_sd import tiny_model_runtime, tiny_sd_folder, tiny_text_side_folder
from tests.utils.trainer_runs import tiny_config

pytestmark = pytest.mark.slow

# Sized for seconds on 2 busy cores; measured on this machine (see docs/GENERATOR.md for the full run).
SMALL = {"model": "resnet_tiny", "per_class": 20, "train_per_class": 200, "eval_per_class": 100, "batch_size": 64}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def tiny_sd(base) -> Path:
    return tiny_sd_folder(base)


@pytest.fixture(scope="module")
def text_aligned(tiny_sd):
    with tiny_model_runtime():
        return make_embedding_set(EmbedConfig(generator=tiny_sd, epochs=3, **SMALL))


def test_the_set_lives_in_the_space_the_synthesis_service_gives_the_same_folder(tiny_sd, text_aligned):
    es = text_aligned.embedding_set
    # The synthesis side loads the whole pipeline (in float16 here, float32 in embed) and describes it.
    pipeline = stage_c.load_pipeline(str(tiny_sd), torch.float16, local_files_only=True)
    described = describe_pipeline(pipeline, generator_id="x", weights_hash="")

    assert es.space == described.space == read_generator_info(tiny_sd).space
    assert es.space.startswith("sd-token:")
    assert es.dim == described.embed_dim == 32
    assert text_aligned.record["space"] == es.space and text_aligned.record["generator_id"] == "tiny-random"


def test_text_aligned_lands_next_to_the_class_rows_on_held_out_images(text_aligned):
    record, es = text_aligned.record, text_aligned.embedding_set

    # Measured 0.84 (3 epochs, 200 images per class); chance is 1/6.
    assert record["nearest_row_accuracy"] > 0.5
    assert record["held_out_images"] == 600 and record["held_out_set"] == "fmnist-id-test"
    assert record["method"] == "text-aligned" and record["encoder"] == {"model": "resnet_tiny"}
    assert record["final_loss"] < 1.0  # it started at about ln 6 + a random-row penalty (2.6)
    assert len(es) == 6 * 20 and [len(es.for_class(c)) for c in range(6)] == [20] * 6
    assert es.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")
    assert torch.allclose(torch.from_numpy(es.embeddings).norm(dim=1), torch.ones(len(es)), atol=1e-5)
    assert json.loads(es.source) == record


def test_class_tokens_are_the_ids_the_generator_replaces_and_a_multi_token_name_takes_their_mean(tiny_sd):
    tokens = load_token_space(tiny_sd)
    generator = StableDiffusionGenerator.from_pretrained(tiny_sd, device="cpu", dtype="float32")
    targets = class_tokens(tokens, FMNIST_CLASSES)

    for name, ids in zip(FMNIST_CLASSES, targets.token_ids, strict=True):
        prompt_ids, positions = generator.class_token_rows(name)
        assert list(ids) == prompt_ids[positions].tolist(), name
    shirt = FMNIST_CLASSES.index("T-shirt/top")
    assert len(targets.token_ids[shirt]) > 1
    rows = F.normalize(generator.token_embedding.weight.detach()[list(targets.token_ids[shirt])], dim=1)
    assert torch.allclose(targets.targets[shirt], F.normalize(rows.mean(dim=0), dim=0), atol=1e-6)
    assert torch.allclose(targets.targets.norm(dim=1), torch.ones(len(FMNIST_CLASSES)))


def test_the_code_path_does_not_depend_on_the_hidden_size(base):
    folder = tiny_text_side_folder(base, hidden_size=48, seed=1)
    with tiny_model_runtime():
        result = make_embedding_set(EmbedConfig(generator=folder, epochs=2, **SMALL))

    assert result.embedding_set.dim == 48
    space = result.embedding_set.space
    assert space == load_token_space(folder).space != read_generator_info(tiny_sd_folder(base)).space
    assert result.record["nearest_row_accuracy"] > 0.5  # measured 0.80 at 2 epochs; chance is 1/6


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed-ce")
    with tiny_model_runtime():
        fit(tiny_config("ce", train_subset=600, epochs=2), root / "ce", settings=Settings(artifact_dir=root / "a"))
    return root / "ce"


def test_projected_maps_a_trained_classifier_into_the_token_space(tiny_sd, ce_run):
    with tiny_model_runtime():
        result = make_embedding_set(EmbedConfig(generator=tiny_sd, method="projected", run=ce_run, **SMALL))
    record = result.record

    assert record["method"] == "projected"
    assert record["encoder"]["run"] == str(ce_run) and record["encoder"]["model"] == "resnet_tiny"
    assert len(record["encoder"]["run_weights_sha256"]) == 64
    assert result.embedding_set.space == read_generator_info(tiny_sd).space
    assert record["nearest_row_accuracy"] > 0.5  # measured 0.82 (30 epochs) from a 2-epoch, 600-image ce run


def test_the_same_seed_gives_the_same_set(tiny_sd, ce_run):
    config = EmbedConfig(generator=tiny_sd, method="projected", run=ce_run, epochs=3, **SMALL)
    with tiny_model_runtime():
        first, again = make_embedding_set(config), make_embedding_set(config)
        other = make_embedding_set(replace(config, seed=1))

    assert first.embedding_set.content_id() == again.embedding_set.content_id()
    assert first.embedding_set.content_id() != other.embedding_set.content_id()


def test_the_command_writes_a_set_and_reports_its_accuracy(tiny_sd, tmp_path):
    out = tmp_path / "set.safetensors"
    with tiny_model_runtime():
        result = CliRunner().invoke(
            cli.app,
            ["embed", "--generator", str(tiny_sd), "--out", str(out), "--epochs", "1", "--no-progress"]
            + [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()],
        )

    assert result.exit_code == 0, result.output
    es = load_embedding_set(out)
    record = json.loads(es.source)
    assert (len(es), es.space) == (120, read_generator_info(tiny_sd).space)
    assert f"{record['nearest_row_accuracy']:.3f}" in result.output and es.space in result.output


def test_class_names_can_be_given_and_an_unknown_token_is_named(tiny_sd, tmp_path):
    names = ["Coat", "Sandal", "Shirt", "Ankle boot", "Bag", "Trouser"]
    tokens = load_token_space(tiny_sd)
    assert class_tokens(tokens, names).class_names == tuple(names)

    runner = CliRunner()
    args = ["embed", "--generator", str(tiny_sd), "--out", str(tmp_path / "x.safetensors")]
    unknown = runner.invoke(cli.app, [*args, *(f"--class-name={n}" for n in ["zebra", *names[1:]])])
    assert unknown.exit_code == 2
    assert "class name 'zebra'" in unknown.output and "no token for part of it" in unknown.output
    too_few = runner.invoke(cli.app, [*args, "--class-name", "Coat"])
    assert too_few.exit_code == 2 and "--class-name: 1 names given" in too_few.output
    assert not (tmp_path / "x.safetensors").exists()


def test_a_generator_folder_without_a_text_encoder_is_named(tiny_sd, tmp_path):
    folder = tmp_path / "no-text"
    shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "text_encoder")

    with pytest.raises(ConfigError, match=r"--generator: .*no-text has no text_encoder"):
        load_token_space(folder)
    with pytest.raises(ConfigError, match="holds no model_index.json"):
        load_token_space(tmp_path)


def test_a_run_dir_without_a_model_is_named(tiny_sd, ce_run, tmp_path):
    run = tmp_path / "half-run"
    run.mkdir()
    shutil.copy(ce_run / "config.json", run / "config.json")

    with pytest.raises(ConfigError, match=r"--run: .*half-run holds no model.safetensors"):
        make_embedding_set(EmbedConfig(generator=tiny_sd, method="projected", run=run, **SMALL))
    with pytest.raises(ConfigError, match="--run: --method projected"):
        EmbedConfig(generator=tiny_sd, method="projected")
    with pytest.raises(ConfigError, match="--per-class: must be >= 1"):
        EmbedConfig(generator=tiny_sd, per_class=0)
    with pytest.raises(ConfigError, match="--method: expected one of text-aligned, projected"):
        EmbedConfig(generator=tiny_sd, method="dream")


def test_a_folder_benchmark_is_read_from_its_files_a_batch_at_a_time(tiny_sd, tmp_path):
    from oal_shared.data.benchmark import load_benchmark
    from tests.utils.folder_benchmark import write_folder_benchmark

    settings = Settings(data_dir=tmp_path)
    write_folder_benchmark(tmp_path, train_per_class=40, test_per_class=20, size=16, channels=3)
    assert load_benchmark("shapes.toml", settings).id_train.on_disk
    # The folder names (circle, square, stripe) are not in the tiny vocabulary: words that are.
    names = ("Coat", "Sandal", "Shirt")
    config = EmbedConfig(
        generator=tiny_sd, benchmark="shapes.toml", class_names=names, epochs=4, **{**SMALL, "batch_size": 20}
    )
    with tiny_model_runtime():
        result = make_embedding_set(config, settings=settings)

    es = result.embedding_set
    assert es.class_names == names and [len(es.for_class(c)) for c in range(3)] == [20, 20, 20]
    assert result.record["held_out_images"] == 60 and result.record["train_images"] == 120
    assert result.record["nearest_row_accuracy"] > 0.6  # measured 1.0; chance 1/3 (the classes differ in colour)
