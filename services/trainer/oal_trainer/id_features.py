"""The evaluated model's outputs on the ID training images: what fitted detectors (ViM, KNN, ...) learn from.

Computed once per model on the run's own un-augmented ID training set (the seeded `train_subset` it
trained on; never test data) and cached in the run dir as `id_train_features.safetensors`, under a
key that hashes the model's weights and the exact input tensor: `oal-train eval RUN --scorer knn`
re-uses what `fit` stored, and a changed model or data set never reads a stale file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from oal_trainer.checkpoint import CheckpointError, read_safetensors, save_safetensors
from oal_trainer.data.streamed import StreamedImages
from oal_trainer.scorers import IDFeatures
from oal_trainer.teacher import compute_teacher_outputs

logger = logging.getLogger(__name__)

ID_FEATURES_FILE = "id_train_features.safetensors"
_SCHEMA_VERSION = "1"


def features_key(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 over the model's state (names, shapes, values), the input tensor and the labels."""
    digest = hashlib.sha256(f"v{_SCHEMA_VERSION}/".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(images, StreamedImages):  # image files: their fingerprint, not a tensor held in memory
        digest.update(images.fingerprint().encode())
    else:
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
    digest.update(str(tuple(labels.shape)).encode())
    digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def id_train_features(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    cache_path: Path | None = None,
) -> IDFeatures:
    """`model`'s logits and features on `images` (N, C, H, W, standardised), from `cache_path` when it fits."""
    key = features_key(model, images, labels)
    if cache_path is not None and Path(cache_path).is_file():
        try:
            tensors, metadata = read_safetensors(Path(cache_path))
            if metadata.get("key") == key:
                logger.info("ID training features read from %s", cache_path)
                return IDFeatures(tensors["logits"], tensors["features"], tensors["labels"])
            logger.info("ID training features in %s belong to another model or data; recomputing", cache_path)
        except (CheckpointError, KeyError) as exc:
            logger.warning("ID training features unreadable (%s); recomputing", exc)
    logger.info("Computing ID training features for %d images", images.shape[0])
    was_training = model.training
    model.eval()
    try:
        logits, features = compute_teacher_outputs(model, images, batch_size, device, channels_last=False)
    finally:
        model.train(was_training)
    result = IDFeatures(logits.contiguous(), features.contiguous(), labels.to(torch.int64).contiguous())
    if cache_path is not None:
        tensors = {"logits": result.logits, "features": result.features, "labels": result.labels}
        save_safetensors(Path(cache_path), tensors, {"key": key})
    return result
