"""A PNG grid of decoded outliers: one row per source class, so a person can see what the job made.

Decoding goes through the trainer's `PixelDecoder` (the generator's VAE via diffusers), with an
identity normalisation so the grid shows pixels in [0, 1].
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from oal_shared.shards import OutlierManifest, iter_outlier_samples, load_manifest
from oal_trainer.decode import PixelDecoder

logger = logging.getLogger(__name__)


def collect_latents_per_class(
    manifest: OutlierManifest, per_class: int
) -> tuple[dict[int, list[np.ndarray]], dict[int, str]]:
    """The first `per_class` latents of each source class, in the manifest's shard order, and the
    class names their provenance records."""
    picked: dict[int, list[np.ndarray]] = defaultdict(list)
    names: dict[int, str] = {}
    for sample in iter_outlier_samples(manifest.shard_paths):
        if len(picked[sample.cls]) < per_class:
            picked[sample.cls].append(sample.latent.astype(np.float32))
            names.setdefault(sample.cls, str(sample.meta.get("class_name", f"class {sample.cls}")))
    return dict(sorted(picked.items())), names


def draw_outlier_grid(
    shard_dir: Path,
    generator_dir: Path,
    out_png: Path,
    *,
    per_class: int = 8,
    image_size: int = 28,
    in_channels: int = 1,
) -> Path:
    manifest = load_manifest(shard_dir)  # refuses a running or crashed job; names the generator to check
    latents, class_names = collect_latents_per_class(manifest, per_class)
    decoder = PixelDecoder(
        generator_dir,
        image_size=image_size,
        in_channels=in_channels,
        mean=(0.0,) * in_channels,
        std=(1.0,) * in_channels,
        device=torch.device("cpu"),
        manifest=manifest,
    )
    rows = len(latents)
    figure = Figure(figsize=(per_class * 0.8 + 1.6, rows * 0.8 + 0.4))
    axes = figure.subplots(rows, per_class, squeeze=False)
    for row, (cls, class_latents) in enumerate(latents.items()):
        images = decoder.decode(torch.from_numpy(np.stack(class_latents)))  # (n, C, H, W) in [0, 1]
        for col in range(per_class):
            ax = axes[row][col]
            ax.set_axis_off()
            if col < len(images):
                picture = images[col].permute(1, 2, 0).numpy()
                ax.imshow(picture.squeeze(-1) if in_channels == 1 else picture, cmap="gray", vmin=0, vmax=1)
        label = class_names[cls]
        axes[row][0].text(-0.08, 0.5, label, transform=axes[row][0].transAxes, fontsize=7, ha="right", va="center")
    figure.suptitle(f"decoded outliers ({shard_dir.name})", fontsize=9)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110, bbox_inches="tight")
    logger.info("Outlier grid: %s", out_png)
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shards", type=Path, help="a job's shard folder")
    parser.add_argument("--generator-dir", type=Path, required=True, help="the generator folder (its vae/)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=28)
    args = parser.parse_args(argv)
    draw_outlier_grid(
        args.shards,
        args.generator_dir,
        args.out,
        per_class=args.per_class,
        image_size=args.image_size,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
