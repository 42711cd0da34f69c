"""The frozen teacher: loaded from a finished `ce` run dir or a weights file, and its outputs cached per
training image.

KD needs the teacher's logits z_t and penultimate features h_t for the image the student sees. Two
ways, chosen by `teacher_mode`:
- "cache" (default for the fine-tuning recipes): one pass over the un-augmented training images,
  stored as safetensors under a key that hashes the teacher's weights (sha256 of model.safetensors),
  the exact input tensor and the model name; a changed teacher or data set never reads a stale cache.
  Valid only when the student also sees un-augmented images (the config refuses augment + cache).
- "live": the teacher runs on every (augmented) batch; measured 3x slower steps
  (docs/BENCHMARKS.md, Sizing measurements).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oal_shared.errors import ConfigError
from oal_trainer.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    load_weights,
    read_safetensors,
    save_safetensors,
    sha256_file,
)
from oal_trainer.data.streamed import StreamedImages, image_batches
from oal_trainer.models import build_model, is_library_model
from oal_trainer.weights import load_weights_file

logger = logging.getLogger(__name__)

CACHE_SCHEMA_VERSION = "1"


@dataclass(frozen=True, eq=False)
class LoadedRun:
    """A finished run's model (or one from a weights file) in eval mode, with what identifies it."""

    run_dir: Path  # the run dir, or the weights file the model was read from
    model: nn.Module
    model_name: str
    recipe: str
    weights_sha256: str
    stem: str = "auto"  # model_stem it was built with (library models; docs/TRAINER.md, Your own model)


def load_run_model(
    run_dir: Path, field: str, num_classes: int, in_channels: int, image_size: int | None = None
) -> LoadedRun:
    """The model of a finished run dir (config.json + model.safetensors); errors name `field` and the path.

    torchvision and timm models depend on the image size (stem, ViT patches); without `image_size` it
    is the size of the benchmark the run's config names.
    """
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / MODEL_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"{field}: {run_dir} is not a directory (expected a finished run dir)")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{field}: {run_dir} holds no {path.name}; is that run finished?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{field}: {config_path} is not valid JSON ({exc})") from exc
    model_name = config.get("model")
    if not isinstance(model_name, str):
        raise ConfigError(f"{field}: {config_path} names no model")
    stem = str(config.get("model_stem", "auto"))
    if image_size is None and is_library_model(model_name):
        from oal_shared.data.benchmark import load_benchmark  # loaded once per process; only these models need it

        image_size = load_benchmark(str(config.get("benchmark"))).image_size
    model = build_model(model_name, num_classes, in_channels, image_size, stem)
    try:
        load_weights(model, weights_path)
    except CheckpointError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    model.eval()
    return LoadedRun(run_dir, model, model_name, str(config.get("recipe", "")), sha256_file(weights_path), stem=stem)


def load_weights_model(
    path: Path,
    field: str,
    model_name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: str = "auto",
    allow_pickle: bool = False,
) -> LoadedRun:
    """A `model_name` model with every tensor from a weights file, the head included (oal_trainer.weights)."""
    model = build_model(model_name, num_classes, in_channels, image_size, stem)
    fit = load_weights_file(model, path, field, allow_pickle=allow_pickle, reinit_head=False)
    model.eval()
    return LoadedRun(Path(path), model, model_name, "", fit.sha256, stem=stem)


def frozen_teacher(teacher: LoadedRun) -> LoadedRun:
    for param in teacher.model.parameters():
        param.requires_grad_(False)
    if teacher.recipe and teacher.recipe != "ce":
        logger.warning("Teacher run %s was trained with recipe %r, not ce", teacher.run_dir, teacher.recipe)
    return teacher


def load_teacher(run_dir: Path, num_classes: int, in_channels: int, image_size: int | None = None) -> LoadedRun:
    return frozen_teacher(load_run_model(run_dir, "teacher_run", num_classes, in_channels, image_size))


@dataclass(frozen=True, eq=False)
class TeacherOutputs:
    """Teacher logits and features for every training image, row-aligned with the IDTrainSet."""

    logits: torch.Tensor  # (N, K)
    features: torch.Tensor  # (N, D_t)
    key: str


def cache_key(teacher: LoadedRun, images: torch.Tensor | StreamedImages) -> str:
    digest = hashlib.sha256()
    # A chosen stem changes the outputs of the same weights; "auto" follows the image size, which the
    # images' shape below records (and leaves the keys of earlier caches as they were).
    architecture = teacher.model_name if teacher.stem == "auto" else f"{teacher.model_name}+stem={teacher.stem}"
    digest.update(f"v{CACHE_SCHEMA_VERSION}/{architecture}/{teacher.weights_sha256}/".encode())
    digest.update(str(tuple(images.shape)).encode())
    if isinstance(images, StreamedImages):  # the files, rows and normalisation: nothing decoded to hash
        digest.update(images.fingerprint().encode())
    else:
        digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def compute_teacher_outputs(
    model: nn.Module, images: torch.Tensor | StreamedImages, batch_size: int, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, features = [], []
    for batch in image_batches(images, batch_size):  # streamed images: decoded by DataLoader workers
        x = batch.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z, h = model(x, return_feature=True)  # (B, K), (B, D_t)
        logits.append(z.float().cpu())
        features.append(h.float().cpu())
    return torch.cat(logits), torch.cat(features)


def cached_teacher_outputs(
    teacher: LoadedRun,
    images: torch.Tensor | StreamedImages,
    cache_dir: Path,
    *,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    write: bool = True,
) -> TeacherOutputs:
    """Teacher outputs for `images` (N, C, H, W), read from the cache or computed and stored there.

    `write=False` (non-zero ranks) only reads: rank 0 writes the file before the others look.
    """
    key = cache_key(teacher, images)
    path = Path(cache_dir) / f"teacher-{key[:32]}.safetensors"
    if path.is_file():
        try:
            tensors, metadata = read_safetensors(path)
            if metadata.get("key") == key:
                logger.info("Teacher outputs read from cache %s", path)
                return TeacherOutputs(tensors["logits"], tensors["features"], key)
            logger.warning("Teacher cache %s has another key; recomputing", path)
        except CheckpointError as exc:
            logger.warning("Teacher cache unreadable (%s); recomputing", exc)
    model = teacher.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info("Computing teacher outputs for %d images (cache key %s)", images.shape[0], key[:12])
    logits, features = compute_teacher_outputs(model, images, batch_size, device, channels_last)
    if write:
        tensors = {"logits": logits.contiguous(), "features": features.contiguous()}
        metadata = {"key": key, "teacher_run": str(teacher.run_dir), "model": teacher.model_name}
        save_safetensors(path, tensors, metadata)
    return TeacherOutputs(logits, features, key)
