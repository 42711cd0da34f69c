"""Pulling features onto fixed class rows: the one training loop of both `oal-train embed` methods.

Dream-OOD's objective (docs/METHOD.md, Stage A): a unit embedding z = normalise(g(x)) is scored
against the class target rows t_c (unit, fixed) by logits_c = cos(z, t_c) / tau, under
cross-entropy. tau = 0.1 makes tight class clusters around their rows. For `text-aligned`, g is an
image encoder plus a linear map, trained together; for `projected`, g is only the linear map, on
the frozen penultimate features of a trained classifier (computed once, so it trains in seconds).

Inputs stay as they come (a uint8 image array, image files decoded when indexed, or cached
features) and `prepare` turns one batch into model input, so memory holds no float copy of the
images, and image files are read a batch at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from oal_shared.data.image_files import ImageFiles
from oal_shared.schedules import warmup_cosine
from oal_trainer.data.seeds import seeded_generator

logger = logging.getLogger(__name__)

WARMUP_FRACTION = 0.05  # of all steps: a short linear warm-up before the cosine
WEIGHT_DECAY = 1e-4

Inputs = np.ndarray | ImageFiles | torch.Tensor  # anything indexed by rows or slices, with len()
Prepare = Callable[[np.ndarray | torch.Tensor], torch.Tensor]


class TokenHead(nn.Module):
    """The learned linear map: features (B, F) -> unit vectors in the token space (B, D)."""

    def __init__(self, feature_dim: int, token_dim: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=1)


class ImageToToken(nn.Module):
    """A classifier backbone's penultimate features, then a TokenHead: images -> unit token-space vectors."""

    def __init__(self, backbone: nn.Module, token_dim: int, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = TokenHead(feature_dim, token_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, features = self.backbone(images, return_feature=True)  # (B, F)
        return self.head(features)


@torch.no_grad()
def feature_dim_of(model: nn.Module, example: torch.Tensor) -> int:
    """Width of the penultimate features, read off one forward pass (any model of `forward(x, return_feature)`)."""
    was_training = model.training
    model.eval()
    try:
        _, features = model(example, return_feature=True)
    finally:
        model.train(was_training)
    return int(features.shape[1])


def alignment_logits(embeddings: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(z, t_c) / tau for unit z (B, D) and unit targets (K, D): (B, K)."""
    return embeddings @ targets.T / temperature


def nearest_row_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of embeddings whose most similar target row (by cosine) is their own class's."""
    if embeddings.shape[0] == 0:
        return float("nan")
    nearest = (F.normalize(embeddings, dim=1) @ targets.T).argmax(dim=1)
    return float((nearest == labels).float().mean())


@dataclass(frozen=True)
class AlignSettings:
    epochs: int
    lr: float
    batch_size: int
    temperature: float
    seed: int


@dataclass(frozen=True)
class AlignResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def _steps(num_items: int, batch_size: int) -> int:
    # Whole batches only when there are enough (BatchNorm and the loss see B items per step).
    return max(1, num_items // batch_size)


def fit_alignment(
    module: nn.Module,
    inputs: Inputs,
    labels: np.ndarray,
    prepare: Prepare,
    targets: torch.Tensor,
    settings: AlignSettings,
    device: torch.device,
    description: str,
    progress: bool = False,
) -> AlignResult:
    """Train `module` so that module(prepare(inputs[i])) lies next to targets[labels[i]]; in place."""
    num_items = len(labels)
    steps_per_epoch = _steps(num_items, settings.batch_size)
    total = steps_per_epoch * settings.epochs
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=WEIGHT_DECAY)
    schedule = warmup_cosine(optimizer, total, int(total * WARMUP_FRACTION))
    targets = targets.to(device)
    label_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    module.to(device).train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=description, unit="step", disable=not progress or None, leave=True)
    try:
        for epoch in range(settings.epochs):
            order = torch.randperm(num_items, generator=seeded_generator(settings.seed, "embed-order", epoch))
            for step in range(steps_per_epoch):
                rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]  # (B,)
                batch = inputs[rows] if isinstance(inputs, torch.Tensor) else inputs[rows.numpy()]
                x, y = prepare(batch).to(device), label_tensor[rows].to(device)
                loss = F.cross_entropy(alignment_logits(module(x), targets, settings.temperature), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    module.eval()
    seconds = time.perf_counter() - started
    logger.info("%s: %d steps in %.1f s, loss %.4f -> %.4f", description, total, seconds, losses[0], losses[-1])
    return AlignResult(steps=total, seconds=seconds, first_loss=losses[0], last_loss=losses[-1])


@torch.no_grad()
def embed_inputs(
    module: nn.Module, inputs: Inputs, prepare: Prepare, batch_size: int, device: torch.device
) -> torch.Tensor:
    """module(prepare(inputs)) in eval mode, batch by batch: (N, D) float32 on the CPU."""
    module.to(device).eval()
    out = [
        module(prepare(inputs[start : start + batch_size]).to(device)).float().cpu()
        for start in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out)
