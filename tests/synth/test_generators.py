"""Stage C: the tiny Stable Diffusion generator, the embedded generator and the registry.

Real diffusers classes saved to disk and loaded back through the same `from_pretrained` code the
worker uses; tiny sizes and few steps keep the module within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from oal_shared.errors import ConfigError
from oal_synth.generators.base import GENERATOR_INFO_FILE, LatentGenerator
from oal_synth.generators.embedded import EmbeddedGenerator
from oal_synth.generators.files import read_generator_info
from oal_synth.generators.registry import (
    GeneratorNotFoundError,
    clear_generator_cache,
    list_generators,
    load_generator,
    resolve_generator_path,
)
from oal_synth.generators.stable_diffusion import StableDiffusionGenerator, register_stable_diffusion
from oal_synth.generators.tiny_random import TINY_HIDDEN, TINY_RANDOM_ID
from oal_synth.spec import SCHEDULERS, DiffusionConfig
from tests.utils.tiny_sd import smoke_generator_folder, tiny_model_runtime, tiny_sd_folder

FAST = DiffusionConfig(steps=3, guidance_scale=3.0)
SD_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")


@pytest.fixture(autouse=True)
def _tiny_model_kernels():
    with tiny_model_runtime():
        yield


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> StableDiffusionGenerator:
    return StableDiffusionGenerator.from_pretrained(tiny_sd_folder(tmp_path_factory.getbasetemp()), device="cpu")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> EmbeddedGenerator:
    return EmbeddedGenerator.from_pretrained(smoke_generator_folder(tmp_path_factory.getbasetemp()), device="cpu")


def outlier_embeddings(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


# Tiny Stable Diffusion ----------------------------------------------------------------------------


def test_tiny_sd_folder_is_a_diffusers_pipeline_with_our_info(tmp_path_factory):
    folder = tiny_sd_folder(tmp_path_factory.getbasetemp())
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", GENERATOR_INFO_FILE):
        assert (folder / part).exists(), part
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))
    info = read_generator_info(folder)
    assert (info.id, info.kind, info.embed_dim, info.latent_shape) == (
        "tiny-random",
        "tiny-random",
        TINY_HIDDEN,
        (4, 8, 8),
    )
    assert info.space.startswith("sd-token:") and "random" in info.description.lower()


def test_tiny_sd_loads_as_a_latent_generator(tiny_sd):
    assert isinstance(tiny_sd, LatentGenerator)
    assert tiny_sd.pipeline.unet.dtype == torch.float32  # auto dtype on the CPU


def test_every_class_word_is_found_in_the_prompt(tiny_sd):
    ids, positions = tiny_sd.class_token_rows("T-shirt/top")
    tokens = tiny_sd.pipeline.tokenizer.convert_ids_to_tokens(ids[positions].tolist())
    assert tokens == ["t</w>", "-</w>", "shirt</w>", "/</w>", "top</w>"]
    for name in SD_CLASSES[1:]:
        _, positions = tiny_sd.class_token_rows(name)
        assert len(positions) == 1, name  # the learned vocabulary makes each word one token


def test_token_row_replacement_changes_the_text_encoding_from_the_class_word_on(tiny_sd):
    first, second = outlier_embeddings(2, TINY_HIDDEN, seed=1)
    encoded = tiny_sd.prompt_embeddings(torch.stack([first, second]), [1, 1], SD_CLASSES)  # (2, T, H)
    _, positions = tiny_sd.class_token_rows("Trouser")
    start = positions[0]
    # CLIP's text encoder is causal: rows before the class word cannot see it, rows from it on do.
    torch.testing.assert_close(encoded[0, :start], encoded[1, :start])
    assert (encoded[0, start:] - encoded[1, start:]).abs().amax() > 1e-3
    latents = tiny_sd.generate_latents(torch.stack([first, second]), [1, 1], [7, 7], FAST, SD_CLASSES)
    assert (latents[0] - latents[1]).abs().amax() > 1e-3  # same seed, different embedding


def test_replacement_is_rescaled_to_the_token_norm(tiny_sd):
    embedding = outlier_embeddings(1, TINY_HIDDEN, seed=2)
    small = tiny_sd.prompt_embeddings(embedding * 0.01, [2], SD_CLASSES)
    large = tiny_sd.prompt_embeddings(embedding * 100.0, [2], SD_CLASSES)
    torch.testing.assert_close(small, large)  # only the direction of the outlier counts


def test_latents_are_unscaled_and_decode_like_the_pipeline(tiny_sd):
    embeddings = outlier_embeddings(2, TINY_HIDDEN, seed=3)
    latents = tiny_sd.generate_latents(embeddings, [0, 4], [11, 12], FAST, SD_CLASSES)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    prompt = tiny_sd.prompt_embeddings(embeddings, [0, 4], SD_CLASSES)
    negative = tiny_sd.negative_embedding().expand_as(prompt)
    common = {
        "prompt_embeds": prompt,
        "negative_prompt_embeds": negative,
        "num_inference_steps": FAST.steps,
        "guidance_scale": FAST.guidance_scale,
    }
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    scaled = tiny_sd.pipeline(**common, generator=seeds(), output_type="latent").images
    factor = tiny_sd.info.scaling_factor
    torch.testing.assert_close(latents, scaled / factor)
    images = tiny_sd.pipeline(**common, generator=seeds(), output_type="pt").images  # diffusers' own decode
    torch.testing.assert_close(tiny_sd.decode_latents(latents), images, atol=1e-5, rtol=1e-4)


def test_same_seed_gives_the_same_latent_in_any_batch(tiny_sd):
    embeddings = outlier_embeddings(3, TINY_HIDDEN, seed=4)
    together = tiny_sd.generate_latents(embeddings, [0, 1, 2], [5, 6, 7], FAST, SD_CLASSES)
    alone = tiny_sd.generate_latents(embeddings[1:2], [1], [6], FAST, SD_CLASSES)
    reordered = tiny_sd.generate_latents(embeddings[[2, 1]], [2, 1], [7, 6], FAST, SD_CLASSES)
    split = tiny_sd.generate_latents(
        embeddings, [0, 1, 2], [5, 6, 7], FAST.model_copy(update={"batch_size": 2}), SD_CLASSES
    )
    torch.testing.assert_close(alone[0], together[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reordered[1], together[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split, together, atol=1e-4, rtol=1e-4)
    assert (together[0] - together[1]).abs().amax() > 1e-2


def test_every_scheduler_runs(tiny_sd):
    embeddings = outlier_embeddings(2, TINY_HIDDEN, seed=5)
    results = {}
    for name in SCHEDULERS:
        latents = tiny_sd.generate_latents(
            embeddings, [0, 3], [1, 2], FAST.model_copy(update={"scheduler": name}), SD_CLASSES
        )
        assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all(), name
        results[name] = latents
    assert type(tiny_sd.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert not torch.allclose(results["ddim"], results["pndm"]) and not torch.allclose(
        results["ddim"], results["dpm-solver"]
    )


def test_sd_uses_its_own_class_names_when_the_job_gives_none(tiny_sd):
    latents = tiny_sd.generate_latents(outlier_embeddings(1, TINY_HIDDEN), [9], [0], FAST)  # "Ankle boot"
    assert latents.shape == (1, 4, 8, 8)


def test_sd_refuses_to_embed_images(tiny_sd):
    with pytest.raises(ConfigError, match="upload an embedding set.*embeddings.set_id"):
        tiny_sd.embed_images(np.zeros((2, 28, 28), np.uint8))


def test_sd_refuses_embeddings_of_the_wrong_size(tiny_sd):
    with pytest.raises(ConfigError, match=r"embeddings: expected shape \(B, 32\), got \(2, 8\)"):
        tiny_sd.generate_latents(torch.ones(2, 8), [0, 1], [0, 1], FAST, SD_CLASSES)
    with pytest.raises(ConfigError, match="seeds: 1 entries for 2 embeddings"):
        tiny_sd.generate_latents(torch.ones(2, TINY_HIDDEN), [0, 1], [0], FAST, SD_CLASSES)
    with pytest.raises(ConfigError, match="class_ids: 6 is not a class index of 6 class names"):
        tiny_sd.generate_latents(torch.ones(1, TINY_HIDDEN), [6], [0], FAST, SD_CLASSES)


def test_image_size_must_fit_the_vae(tiny_sd):
    with pytest.raises(ConfigError, match="diffusion.height must be a multiple of 2"):
        tiny_sd.generate_latents(
            torch.ones(1, TINY_HIDDEN), [0], [0], FAST.model_copy(update={"height": 15}), SD_CLASSES
        )


# Embedded generator -------------------------------------------------------------------------------


def test_embedded_folder_loads_with_stable_diffusions_loader(tmp_path_factory):
    folder = smoke_generator_folder(tmp_path_factory.getbasetemp())
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True,
    )  # fmt: skip
    assert pipeline.unet.config.cross_attention_dim == 64
    assert pipeline.vae.config.scaling_factor == pytest.approx(read_generator_info(folder).scaling_factor)


def test_embed_images_gives_unit_vectors_in_the_generators_space(embedded):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    vectors = embedded.embed_images(images)
    assert vectors.shape == (5, 64) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5))
    assert embedded.info.space.startswith("fmnist-ldm/") and embedded.info.embed_dim == 64
    torch.testing.assert_close(embedded.embed_images(images[2:3]), vectors[2:3])  # no batch effects (eval mode)


def test_embed_images_refuses_other_image_shapes(embedded):
    with pytest.raises(ConfigError, match=r"images: expected uint8 grey images of shape \(N, 28, 28\)"):
        embedded.embed_images(np.zeros((2, 32, 32), np.uint8))


def test_embedded_generator_denoises_and_decodes(embedded):
    embeddings = embedded.embed_images(np.zeros((3, 28, 28), np.uint8))
    latents = embedded.generate_latents(embeddings, [0, 1, 2], [1, 2, 3], FAST)
    assert latents.shape == (3, *embedded.info.latent_shape) == (3, 4, 8, 8)
    alone = embedded.generate_latents(embeddings[2:], [2], [3], FAST)
    torch.testing.assert_close(alone[0], latents[2], atol=1e-4, rtol=1e-4)
    images = embedded.decode_latents(latents)
    assert images.shape == (3, 1, 28, 28) and 0.0 <= images.min() and images.max() <= 1.0


def test_embedded_generator_conditions_on_the_embedding(embedded):
    first, second = torch.nn.functional.normalize(outlier_embeddings(2, 64, seed=8), dim=1)
    latents = embedded.generate_latents(torch.stack([first, second]), [0, 0], [4, 4], FAST)
    assert (latents[0] - latents[1]).abs().amax() > 1e-4


# Registry -----------------------------------------------------------------------------------------


def test_registry_lists_generators_without_importing_torch(oal_env, tmp_path_factory):
    shutil.copytree(smoke_generator_folder(tmp_path_factory.getbasetemp()), Path(oal_env.generator_root) / "fmnist-ldm")
    script = (
        "import json, sys\n"
        "from oal_shared.settings import get_settings\n"
        "from oal_synth.generators.registry import list_generators\n"
        "infos = [i.to_json() for i in list_generators(get_settings())]\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(json.dumps({'infos': infos, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ), check=True
    )
    answer = json.loads(done.stdout)
    assert answer["heavy"] == []
    by_id = {info["id"]: info for info in answer["infos"]}
    assert set(by_id) == {"fmnist-ldm", "tiny-random"}
    assert by_id["fmnist-ldm"]["space"].startswith("fmnist-ldm/")
    assert by_id["tiny-random"]["content_hash"] == ""  # listed before it is built
    assert "built on first use" in by_id["tiny-random"]["description"]


def test_load_generator_builds_tiny_random_once_and_caches_it(oal_env):
    clear_generator_cache()
    first = load_generator(TINY_RANDOM_ID, oal_env, device="cpu")
    assert isinstance(first, StableDiffusionGenerator)
    assert (Path(oal_env.generator_root) / TINY_RANDOM_ID / GENERATOR_INFO_FILE).is_file()
    assert load_generator(TINY_RANDOM_ID, oal_env, device="cpu") is first
    listed = {info.id: info for info in list_generators(oal_env)}
    assert listed[TINY_RANDOM_ID].content_hash == first.info.content_hash != ""
    clear_generator_cache()


def test_load_generator_picks_the_embedded_kind_by_model_index(oal_env, tmp_path_factory):
    clear_generator_cache()
    target = Path(oal_env.generator_root) / "benchmarks" / "ldm"
    shutil.copytree(smoke_generator_folder(tmp_path_factory.getbasetemp()), target)
    assert resolve_generator_path("fmnist-ldm", oal_env) == target.resolve()  # by the id in its info file
    loaded = load_generator("fmnist-ldm", oal_env, device="cpu")
    assert isinstance(loaded, EmbeddedGenerator)
    assert load_generator("benchmarks/ldm", oal_env, device="cpu").info == loaded.info  # by folder name
    clear_generator_cache()


def test_resolve_refuses_unknown_ids_and_paths_out_of_the_root(oal_env):
    with pytest.raises(GeneratorNotFoundError, match=r"generator 'sd-v9' is neither a known id \(tiny-random\)"):
        resolve_generator_path("sd-v9", oal_env)
    with pytest.raises(GeneratorNotFoundError, match="run `oal-synth pretrain`"):
        resolve_generator_path("fmnist-ldm", oal_env)
    with pytest.raises(GeneratorNotFoundError, match=r"contains '\.\.'"):
        resolve_generator_path("../outside", oal_env)


def test_a_broken_info_file_is_skipped_not_fatal(oal_env, caplog):
    broken = Path(oal_env.generator_root) / "broken"
    broken.mkdir(parents=True)
    (broken / GENERATOR_INFO_FILE).write_text("{not json", encoding="utf-8")
    assert [info.id for info in list_generators(oal_env)] == [TINY_RANDOM_ID]
    assert "skipping generator folder" in caplog.text


def test_a_symlink_out_of_the_root_is_not_followed(oal_env, tmp_path_factory):
    root = Path(oal_env.generator_root)
    root.mkdir(parents=True)
    (root / "elsewhere").symlink_to(smoke_generator_folder(tmp_path_factory.getbasetemp()), target_is_directory=True)
    assert "fmnist-ldm" not in {info.id for info in list_generators(oal_env)}
    with pytest.raises(GeneratorNotFoundError, match="outside"):
        resolve_generator_path("elsewhere", oal_env)


def test_a_stable_diffusion_folder_is_listed_once_registered(oal_env, tmp_path_factory):
    folder = Path(oal_env.generator_root) / "sd-copy"
    shutil.copytree(tiny_sd_folder(tmp_path_factory.getbasetemp()), folder)
    original = read_generator_info(folder)
    (folder / GENERATOR_INFO_FILE).unlink()
    assert "sd-copy" not in {info.id for info in list_generators(oal_env)}
    info = register_stable_diffusion(folder, "sd-copy", class_names=SD_CLASSES)
    assert (info.kind, info.space, info.content_hash) == ("stable-diffusion", original.space, original.content_hash)
    assert {i.id: i for i in list_generators(oal_env)}["sd-copy"] == info


def test_generator_info_names_the_missing_or_malformed_field(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    info = {"id": "x", "kind": "embedded", "space": "s", "embed_dim": 4, "latent_shape": [4, 8, 8],
            "scaling_factor": 0.5, "content_hash": "abc"}  # fmt: skip
    (folder / GENERATOR_INFO_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != "space"}))
    with pytest.raises(ConfigError, match="oal_generator.json: field 'space' is missing"):
        read_generator_info(folder)
    (folder / GENERATOR_INFO_FILE).write_text(json.dumps({**info, "latent_shape": [4, 8]}))
    with pytest.raises(ConfigError, match=r"needs 3 entries \(C, H, W\), got 2"):
        read_generator_info(folder)
    (folder / GENERATOR_INFO_FILE).write_text(json.dumps(info))
    assert read_generator_info(folder).latent_shape == (4, 8, 8)
