"""`oal-synth export`: a finished job's outliers decoded to PNG, in formats other OOD tools read.

- `openood`: `images/<key>.png` and `imglist.txt`, one `images/<key>.png -1` line per outlier:
  OpenOOD's image-list format, usable as the `oe` split of an OpenOOD config (`data_dir` = the
  export folder, `imglist_pth` = its imglist.txt). Label -1 marks an outlier: OpenOOD gives
  negative labels a uniform soft label, as outlier exposure wants.
- `imagefolder`: `<NNN>_<class>/<key>.png`, one folder per source ID class, numbered in class
  order, so torchvision's `ImageFolder` (which sorts folder names) indexes them in that order.

Beside the images, `provenance.json` holds the job's manifest as written, the generator (id,
content hash, the folder decoded with) and the export's own facts; `samples.jsonl` holds per image
its path, sample key, source class and the sample's provenance from the shard. The generator folder
is checked against the manifest before any decode (oal_shared.outlier_images). The export is built
in a temp folder beside `out` and renamed into place whole, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from oal_shared.errors import ConfigError, ShardError
from oal_shared.outlier_images import LatentImageDecoder, to_uint8_hwc
from oal_shared.shards import OutlierManifest, OutlierSample, iter_outlier_samples, load_manifest, verify_shards

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("openood", "imagefolder")
IMGLIST_FILE = "imglist.txt"
PROVENANCE_FILE = "provenance.json"
SAMPLES_FILE = "samples.jsonl"
OUTLIER_LABEL = -1  # OpenOOD and pytorch-ood: a negative label is an outlier
EXPORT_SCHEMA_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    count: int
    files: dict[str, Path]


def class_folder(cls: int, names: list[str] | None) -> str:
    """`003_Dress`: the class index first (ImageFolder's order), then the name in file-safe characters."""
    name = names[cls] if names is not None and 0 <= cls < len(names) else f"class{cls}"
    return f"{cls:03d}_{_UNSAFE.sub('_', name).strip('_') or 'class'}"


def _batches(manifest: OutlierManifest, batch_size: int) -> Iterator[list[OutlierSample]]:
    batch: list[OutlierSample] = []
    for sample in iter_outlier_samples(manifest.shard_paths, on_error="raise", layout=manifest.layout):
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(path, format="PNG")


def export_job(
    job_dir: Path,
    out: Path,
    *,
    format: Literal["openood", "imagefolder"],
    generator_dir: Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> ExportResult:
    """Decode every outlier of the finished job in `job_dir` with `generator_dir`'s VAE and write `out`."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder; choose a new one")
    manifest = load_manifest(Path(job_dir))
    verify_shards(manifest.folder)  # every listed shard present, with the size and sha256 recorded
    decoder = LatentImageDecoder(generator_dir, manifest, device=device)
    names = (manifest.document.get("embeddings") or {}).get("class_names")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        count, lines, records, image_shape = 0, [], [], ()
        for batch in _batches(manifest, batch_size):
            latents = torch.from_numpy(np.stack([s.latent.astype(np.float32) for s in batch]))
            pixels = to_uint8_hwc(decoder.decode(latents))  # (B, H, W, C)
            image_shape = pixels.shape[1:]
            for sample, image in zip(batch, pixels, strict=True):
                folder = "images" if format == "openood" else class_folder(sample.cls, names)
                relative = f"{folder}/{sample.key}.png"
                (staging / folder).mkdir(exist_ok=True)
                _save_png(staging / relative, image)
                lines.append(f"{relative} {OUTLIER_LABEL}\n")
                records.append({"path": relative, "key": sample.key, "class": sample.cls, "meta": sample.meta})
                count += 1
        if count == 0:
            raise ShardError(f"no outliers to export in {manifest.folder}")
        files = _write_records(staging, manifest, decoder, format, count, lines, records, image_shape)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Exported %d outliers of %s to %s (%s)", count, manifest.folder, out, format)
    return ExportResult(out, format, count, {name: out / path.name for name, path in files.items()})


def _write_records(
    staging: Path,
    manifest: OutlierManifest,
    decoder: LatentImageDecoder,
    format: str,
    count: int,
    lines: list[str],
    records: list[dict],
    image_shape: tuple[int, ...],
) -> dict[str, Path]:
    files = {}
    if format == "openood":
        files["imglist"] = staging / IMGLIST_FILE
        files["imglist"].write_text("".join(lines), encoding="utf-8")
    files["samples"] = staging / SAMPLES_FILE
    files["samples"].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    provenance = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "format": format,
        "count": count,
        "label": OUTLIER_LABEL,
        "image_shape_hwc": list(image_shape),
        "job_dir": str(manifest.folder),
        "generator": {
            "id": manifest.generator.id,
            "content_hash": decoder.content_hash,
            "folder": str(decoder.generator_dir),
        },
        "decode": "diffusers AutoencoderKL.decode(z0), (x / 2 + 0.5) clamped to [0, 1], x 255 rounded to uint8",
        "manifest": manifest.document,
    }
    files["provenance"] = staging / PROVENANCE_FILE
    files["provenance"].write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return files
