"""`OutlierDataset`: a finished job's outliers as a map-style torch Dataset, latent or decoded.

Each item is `(x, target)`: x the outlier's latent z0 (C, h, w) float32 (`mode="latent"`), or its
image decoded by the job's generator VAE (C, H, W) float32 in [0, 1] (`mode="decoded"`, then
`transform`), and `target` = -1 (`OUTLIER_TARGET`), pytorch-ood's mark of an outlier: its
`OutlierExposure` and `EnergyRegularizedLoss` treat targets < 0 as outliers, so the dataset can be
concatenated with an ID dataset and trained on directly (example in docs/TRAINER.md, "Using the
outliers elsewhere"). `targets="class"` gives the source ID class instead.

The manifest is opened first: only the shards it lists are read, each checked against the layout
it records; all latents are held in memory (the embedded generator's 4x8x8 float16 latents are
512 bytes each). Decoding runs per item through `oal_shared.outlier_images`, after the generator
folder's content hash is checked against the manifest; for many epochs over decoded images,
export them once (`oal-synth export`) and read the PNGs instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from oal_shared.errors import ConfigError, ShardError
from oal_shared.shards import OutlierManifest, iter_outlier_samples, load_manifest

OUTLIER_TARGET = -1


class OutlierDataset(Dataset):
    """The outliers of the finished job folder `job_dir`, in the manifest's shard order."""

    def __init__(
        self,
        job_dir: str | Path,
        *,
        mode: Literal["latent", "decoded"] = "latent",
        generator_dir: str | Path | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        targets: Literal["outlier", "class"] = "outlier",
        device: str | torch.device = "cpu",
    ):
        if mode not in ("latent", "decoded"):
            raise ConfigError(f"mode: expected 'latent' or 'decoded', got {mode!r}")
        if targets not in ("outlier", "class"):
            raise ConfigError(f"targets: expected 'outlier' or 'class', got {targets!r}")
        if mode == "decoded" and generator_dir is None:
            raise ConfigError("generator_dir: mode='decoded' needs the job's generator folder (its vae/ decodes)")
        self.manifest: OutlierManifest = load_manifest(Path(job_dir))
        self.mode = mode
        self.transform = transform
        self.targets = targets
        keys, classes, latents = [], [], []
        for sample in iter_outlier_samples(self.manifest.shard_paths, on_error="raise", layout=self.manifest.layout):
            keys.append(sample.key)
            classes.append(sample.cls)
            latents.append(sample.latent)
        if not keys:
            raise ShardError(f"no outliers in {self.manifest.folder}")
        self.keys: tuple[str, ...] = tuple(keys)
        self.classes = np.asarray(classes, dtype=np.int64)  # (N,) source ID class per outlier
        self.latents = np.stack(latents)  # (N, C, h, w), the shards' dtype
        self.decoder = None
        if mode == "decoded":
            from oal_shared.outlier_images import LatentImageDecoder

            self.decoder = LatentImageDecoder(Path(generator_dir), self.manifest, device=device)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.latents[index].astype(np.float32))  # (C, h, w)
        if self.decoder is not None:
            x = self.decoder.decode(x.unsqueeze(0))[0]  # (C, H, W) in [0, 1]
        if self.transform is not None:
            x = self.transform(x)
        target = int(self.classes[index]) if self.targets == "class" else OUTLIER_TARGET
        return x, target
