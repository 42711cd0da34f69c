"""The embedded generator's conditioning space: a small CNN that maps an image to a unit vector.

Trained Dream-OOD style (docs/METHOD.md, Stage A): the embedding z = normalise(f(x)) is classified by cosine
similarity to learned class anchors a_c, logits_c = cos(z, a_c) / tau with tau = 0.1, under
cross-entropy. The low temperature pulls each class into a tight cluster around its anchor and
pushes the clusters apart, so boundary sampling in this space finds meaningful low-density regions.

Saved as `condition_encoder/config.json` + `condition_encoder/model.safetensors` beside the
diffusers folder (no pickles).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from oal_shared.errors import ConfigError
from oal_synth.generators.files import short_hash

ENCODER_SUBFOLDER = "condition_encoder"
ENCODER_CONFIG_FILE = "config.json"
ENCODER_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ConditionEncoderConfig:
    image_size: int = 28  # images are (image_size, image_size) grey
    widths: tuple[int, ...] = (32, 64)  # channels of the stride-2 stages
    embed_dim: int = 64  # D of the conditioning space
    num_classes: int = 6
    temperature: float = 0.1  # tau of the cosine logits
    pixel_mean: float = 0.5  # of ID train pixels in [0, 1]
    pixel_std: float = 0.5
    class_names: tuple[str, ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_json(cls, data: dict, source: str) -> ConditionEncoderConfig:
        try:
            return cls(
                image_size=int(data["image_size"]),
                widths=tuple(int(w) for w in data["widths"]),
                embed_dim=int(data["embed_dim"]),
                num_classes=int(data["num_classes"]),
                temperature=float(data["temperature"]),
                pixel_mean=float(data["pixel_mean"]),
                pixel_std=float(data["pixel_std"]),
                class_names=tuple(str(name) for name in data.get("class_names", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed condition-encoder config ({exc!r})") from exc


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConditionEncoder(nn.Module):
    """images (B, 1, S, S) normalised -> unit embeddings (B, D); `logits` scores them per class."""

    def __init__(self, config: ConditionEncoderConfig):
        super().__init__()
        self.config = config
        stages, channels = [], 1
        for width in config.widths:
            # A stride-2 conv first (docs/BENCHMARKS.md: 4x cheaper than full resolution, same accuracy).
            stages += [_conv_bn_relu(channels, width, stride=2), _conv_bn_relu(width, width, stride=1)]
            channels = width
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(channels, config.embed_dim)
        self.anchors = nn.Parameter(torch.randn(config.num_classes, config.embed_dim))  # a_c, (K, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images).mean(dim=(2, 3))  # (B, C) global average pool
        return F.normalize(self.head(features), dim=1)  # (B, D), unit norm

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(z, a_c) / tau for unit embeddings z (B, D): (B, K)."""
        return embeddings @ F.normalize(self.anchors, dim=1).T / self.config.temperature

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S) -> float (N, 1, S, S), standardised with the ID train pixel statistics."""
        size = self.config.image_size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
            raise ConfigError(
                f"images: expected uint8 grey images of shape (N, {size}, {size}), got {images.dtype} {images.shape}"
            )
        pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # a copy: inputs may be read-only
        return ((pixels - self.config.pixel_mean) / self.config.pixel_std)[:, None]

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """Unit embeddings of uint8 images (N, S, S): (N, D) float32 on the CPU (eval mode)."""
        was_training = self.training
        self.eval()
        device = self.anchors.device
        try:
            out = [
                self(self.preprocess(images[start : start + batch_size]).to(device)).float().cpu()
                for start in range(0, images.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros((0, self.config.embed_dim))

    def save_pretrained(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ENCODER_CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2), encoding="utf-8")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / ENCODER_WEIGHTS_FILE))
        return folder

    @classmethod
    def from_pretrained(cls, folder: Path) -> ConditionEncoder:
        folder = Path(folder)
        config_path = folder / ENCODER_CONFIG_FILE
        try:
            config = ConditionEncoderConfig.from_json(
                json.loads(config_path.read_text(encoding="utf-8")), str(config_path)
            )
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read condition-encoder config ({exc})") from exc
        encoder = cls(config)
        weights_path = folder / ENCODER_WEIGHTS_FILE
        try:
            state = load_file(str(weights_path))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{weights_path}: cannot read condition-encoder weights ({exc})") from exc
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"{weights_path}: weights do not fit {config_path} ({exc})") from exc
        return encoder.eval()


def encoder_space_hash(encoder: ConditionEncoder) -> str:
    """Short sha256 over the encoder's weights in a fixed order: the id part of its space."""
    digest = b"".join(
        name.encode("utf-8") + tensor.detach().cpu().float().contiguous().numpy().tobytes()
        for name, tensor in sorted(encoder.state_dict().items())
        if tensor.is_floating_point()
    )
    return short_hash(digest)
