"""Decode outlier latents to pixels with the generator's own VAE (the pixel-oe baseline).

Decoding is the cost OAL avoids: on 2 CPU cores the embedded generator's VAE decodes 128 latents
in about 1 s, ten times a student step. Outlier sets are finite and every epoch draws each outlier
many times, so `pixel_decode=precompute` (default) decodes every shard sample once, in file order,
and caches the images as safetensors keyed by the VAE's weights and the shards' sha256; the loop
then looks images up by sample key. `per_step` decodes each batch live (sets too large to hold).

Shards store unscaled z0: the VAE's own latent space, already divided by the scaling factor
(see oal_synth's generator contract), so `vae.decode(z)` takes them as they are; the factor in
each sample's provenance is informational here. diffusers is imported directly (the trainer never
imports oal_synth).

The outliers must be decoded by the generator that made them: given the job's manifest, the
decoder recomputes the generator folder's content hash and refuses a folder whose hash differs
from the one the manifest records (docs/METHOD.md, Contracts).

Decoded images come out in [-1, 1] with the VAE's channels and size. They are brought to the ID
images' form: channels averaged (RGB -> grey) or repeated (grey -> RGB); a size at most 25% larger
than the ID size is centre-cropped (the embedded generator pads 28 -> 32, so the crop undoes the
pad), any other size is resized with antialiasing; then standardised with the benchmark's mean/std.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from oal_shared.errors import ConfigError, ShardError
from oal_shared.outlier_images import check_generator
from oal_shared.shards import OutlierManifest, ReadStats, iter_outlier_samples, load_manifest
from oal_trainer.checkpoint import CheckpointError, read_safetensors, save_safetensors, sha256_file

logger = logging.getLogger(__name__)

CROP_TOLERANCE = 1.25  # decoded side / ID side up to which a centre crop (not a resize) is used


class PixelDecoder:
    """Latents (B, C, h, w) -> standardised images (B, C_id, H_id, W_id) matching the ID data.

    With `manifest` (the outlier source's), the generator folder is checked against it first.
    """

    def __init__(
        self,
        generator_dir: Path,
        *,
        image_size: int,
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        manifest: OutlierManifest | None = None,
    ):
        vae_dir = Path(generator_dir) / "vae"
        if not (vae_dir / "config.json").is_file():
            raise ConfigError(f"generator_dir: {vae_dir} holds no diffusers AutoencoderKL (vae/config.json missing)")
        self.generator_dir = Path(generator_dir)
        self.manifest = manifest
        if manifest is not None:
            check_generator(self.generator_dir, manifest)  # the one check every decoder of a job's latents uses
        from diffusers import AutoencoderKL

        try:
            self.vae = (
                AutoencoderKL.from_pretrained(
                    str(vae_dir), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
                )
                .to(device)
                .eval()
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"generator_dir: cannot load the VAE from {vae_dir} ({exc})") from exc
        self.vae.requires_grad_(False)
        self.image_size = image_size
        self.in_channels = in_channels
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        if manifest is not None and manifest.layout.latent_shape[0] != self.latent_channels:
            raise ConfigError(
                f"generator_dir: the VAE takes {self.latent_channels} latent channels, the shards in "
                f"{manifest.folder} hold latents of shape {manifest.layout.latent_shape}"
            )
        self.weights_sha256 = hashlib.sha256(
            "".join(sha256_file(path) for path in sorted(vae_dir.iterdir()) if path.is_file()).encode()
        ).hexdigest()
        logger.info("Pixel decoder: VAE from %s (latent channels %d)", vae_dir, self.latent_channels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ConfigError(
                f"shards: latents of shape {tuple(latents.shape[1:])} do not fit the VAE "
                f"({self.latent_channels} latent channels)"
            )
        images = self.vae.decode(latents.to(self.device, self.vae.dtype), return_dict=False)[0].float()
        images = (images / 2 + 0.5).clamp(0.0, 1.0)  # (B, C_vae, H, W) in [0, 1]
        images = match_channels(images, self.in_channels)
        images = match_size(images, self.image_size)
        return (images - self.mean) / self.std  # (B, C_id, H_id, W_id)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    raise ConfigError(f"generator_dir: the VAE gives {have}-channel images, the ID data has {channels}")


def match_size(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if size <= min(h, w) <= size * CROP_TOLERANCE:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, :, top : top + size, left : left + size]
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DecodedOutliers:
    """Every outlier of a job folder decoded once; `lookup(keys)` gives their images (B, C, H, W).

    `shards` is the job's parsed manifest (an outlier source's `manifest`), its folder, or shard
    paths inside one folder; either way the manifest is opened first and its listed shards are
    decoded. Cached under `cache_dir` by a key over the VAE files, the ID image form and every
    shard's sha256 as the manifest records it, so a changed VAE or shard set is decoded afresh.
    `write=False` (ranks other than 0) only reads or computes, never writes.
    """

    def __init__(
        self,
        decoder: PixelDecoder,
        shards: OutlierManifest | Path | str | Sequence[str],
        cache_dir: Path,
        *,
        batch_size: int = 256,
        on_bad_shard: str = "raise",
        write: bool = True,
    ):
        self.manifest = _job_manifest(shards)
        digest = hashlib.sha256(f"decoded-v1/{decoder.weights_sha256}/{decoder.image_size}/".encode())
        digest.update(f"{decoder.in_channels}/{decoder.mean.tolist()}/{decoder.std.tolist()}".encode())
        for info in self.manifest.shards:
            digest.update(f"/{info.name}:{info.sha256}".encode())
        self.key = digest.hexdigest()
        path = Path(cache_dir) / f"decoded-{self.key[:32]}.safetensors"
        loaded = self._read(path)
        if loaded is None:
            loaded = self._decode_all(decoder, self.manifest, batch_size, on_bad_shard)
            if write:
                images, keys = loaded
                metadata = {"key": self.key, "keys": "\n".join(keys)}
                tensors = {"images": images.contiguous()}
                save_safetensors(path, tensors, metadata)
        self.images, keys = loaded  # (N, C, H, W)
        self.row_of = {key: row for row, key in enumerate(keys)}

    def _read(self, path: Path) -> tuple[torch.Tensor, list[str]] | None:
        if not path.is_file():
            return None
        try:
            tensors, metadata = read_safetensors(path)
        except CheckpointError as exc:
            logger.warning("Decoded-outlier cache unreadable (%s); decoding again", exc)
            return None
        if metadata.get("key") != self.key:
            return None
        logger.info("Decoded outliers read from cache %s", path)
        return tensors["images"], metadata["keys"].split("\n")

    @staticmethod
    def _decode_all(
        decoder: PixelDecoder, manifest: OutlierManifest, batch_size: int, on_bad_shard: str
    ) -> tuple[torch.Tensor, list[str]]:
        keys: list[str] = []
        chunks: list[torch.Tensor] = []
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            chunks.append(decoder.decode(torch.stack(pending)).cpu())
            keys.extend(pending_keys)
            pending.clear()
            pending_keys.clear()

        samples = iter_outlier_samples(
            manifest.shard_paths,
            on_error=on_bad_shard,  # type: ignore[arg-type]
            stats=ReadStats(),
            layout=manifest.layout,
        )
        for sample in samples:
            pending.append(torch.from_numpy(sample.latent.astype("float32")))
            pending_keys.append(sample.key)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        if not keys:
            raise ShardError(f"no readable outlier samples to decode in {manifest.folder}")
        logger.info("Decoded %d outliers with the generator's VAE", len(keys))
        return torch.cat(chunks), keys

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        try:
            rows = [self.row_of[key] for key in keys]
        except KeyError as exc:
            raise ShardError(f"outlier {exc.args[0]} was not among the decoded samples") from exc
        return self.images[rows]


def _job_manifest(shards: OutlierManifest | Path | str | Sequence[str]) -> OutlierManifest:
    if isinstance(shards, OutlierManifest):
        return shards
    if isinstance(shards, str | Path):
        return load_manifest(Path(shards))
    folders = {Path(url).parent for url in shards}
    if len(folders) != 1:
        raise ConfigError(f"shards: expected the shards of one job folder, got {len(folders)} folders")
    manifest = load_manifest(folders.pop())
    listed = {path.name for path in manifest.shard_paths}
    unlisted = sorted(Path(url).name for url in shards if Path(url).name not in listed)
    if unlisted:
        logger.warning("Shards the manifest of %s does not list (not decoded): %s", manifest.folder, unlisted)
    return manifest
